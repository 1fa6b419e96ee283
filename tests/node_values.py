"""Shared by the metric tests: every node of a dense store, and a node's four metrics read off a
naive reference run (tests/reference.py for GPT-2, tests/reference_rotary.py for the others)."""

from __future__ import annotations

from typing import Protocol

import torch

from tdb.metrics import Group
from tdb.nodes import NodeIndex, NodeType
from tdb.store import GridBlock, ListBlock, ScalarStore


class NaiveRun(Protocol):
    resid: torch.Tensor
    resid_grad: torch.Tensor
    probs: list[list[torch.Tensor]]
    probs_grad: list[list[torch.Tensor]]
    head_writes: list[list[torch.Tensor]]
    post: list[torch.Tensor]
    post_grad: list[torch.Tensor]
    neuron_writes: list[torch.Tensor]

    def contribution(self, write: torch.Tensor) -> torch.Tensor: ...


def reference_values(ref: NaiveRun, node: NodeIndex, position: int) -> dict[Group, float]:
    """The four metrics of one node, from the naive model alone."""
    if node.node_type is NodeType.EMBEDDING:
        activation = 1.0
        write = ref.resid[node.token]
        act_times_grad = float((ref.resid[node.token] * ref.resid_grad[node.token]).sum())
    elif node.node_type is NodeType.ATTENTION_HEAD:
        assert node.layer is not None and node.key_token is not None
        q, k = node.token, node.key_token
        activation = float(ref.probs[node.layer][node.index][q, k])
        write = ref.head_writes[node.layer][node.index][q, k]
        act_times_grad = activation * float(ref.probs_grad[node.layer][node.index][q, k])
    else:
        assert node.layer is not None
        activation = float(ref.post[node.layer][node.token, node.index])
        write = ref.neuron_writes[node.layer][node.token, node.index]
        act_times_grad = activation * float(ref.post_grad[node.layer][node.token, node.index])
    return {
        Group.ACTIVATION: activation,
        Group.WRITE_NORM: float(write.norm()),
        Group.DIRECT_EFFECT: float(ref.contribution(write)) if node.token == position else 0.0,
        Group.ACT_TIMES_GRAD: act_times_grad,
    }


def all_nodes(store: ScalarStore) -> list[NodeIndex]:
    """Every node a dense store holds (NaN entries are not nodes)."""
    nodes = []
    for node_type, block in store.blocks.items():
        if isinstance(block, ListBlock):  # SAE latents: a list of nodes, dense unless pruned
            assert block.pruned_k is None
            nodes += [NodeIndex.from_coords(node_type, row) for row in block.node_coords]
            continue
        assert isinstance(block, GridBlock)
        flat = torch.arange(len(block.values[Group.ACTIVATION]))
        valid = ~torch.isnan(block.values[Group.ACTIVATION])
        nodes += [NodeIndex.from_coords(node_type, row) for row in block.coords(flat[valid])]
    return nodes
