"""Node types, node indices, and the short ids every command accepts wherever a node is expected.

n1.234@5     MLP neuron 234 of layer 1 at token 5
h2.3@7:4     attention head 3 of layer 2, query token 7, key token 4
h2.3@7       the same head at query token 7, all keys (where a node is ablated)
e@5          the embedding at token 5 (token + position embedding)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import torch
from torch import Tensor

from tdb.errors import TdbError


class NodeType(StrEnum):
    EMBEDDING = "embedding"
    ATTENTION_HEAD = "attention_head"
    MLP_NEURON = "mlp_neuron"
    AUTOENCODER_LATENT = "autoencoder_latent"


class ModelShape(Protocol):
    @property
    def n_layer(self) -> int: ...
    @property
    def n_head(self) -> int: ...
    @property
    def d_mlp(self) -> int: ...


# A node index as one row of a LongTensor, so blocks of nodes are tensors, not lists of objects.
LAYER, TOKEN, KEY_TOKEN, INDEX = range(4)
NO_COORD = -1
NODE_TEMPLATE = (NO_COORD, NO_COORD, NO_COORD, 0)  # the coordinates a node type does not have


@dataclass(frozen=True, order=True)
class NodeIndex:
    """Which node: `NodeIndex(NodeType.ATTENTION_HEAD, layer=2, token=7, index=3, key_token=4)`."""

    node_type: NodeType
    layer: int | None
    token: int
    index: int
    key_token: int | None = None

    @property
    def id(self) -> str:
        if self.node_type is NodeType.EMBEDDING:
            return f"e@{self.token}"
        if self.node_type is NodeType.ATTENTION_HEAD:
            keys = "" if self.key_token is None else f":{self.key_token}"
            return f"h{self.layer}.{self.index}@{self.token}{keys}"
        if self.node_type is NodeType.MLP_NEURON:
            return f"n{self.layer}.{self.index}@{self.token}"
        return f"a{self.layer}.{self.index}@{self.token}"

    def coords(self) -> tuple[int, int, int, int]:
        return (
            NO_COORD if self.layer is None else self.layer,
            self.token,
            NO_COORD if self.key_token is None else self.key_token,
            self.index,
        )

    @staticmethod
    def from_coords(node_type: NodeType, row: Tensor | tuple[int, ...]) -> NodeIndex:
        layer, token, key_token, index = (int(v) for v in row)
        return NodeIndex(
            node_type,
            None if layer == NO_COORD else layer,
            token,
            index,
            None if key_token == NO_COORD else key_token,
        )


def check_node(node: NodeIndex, config: ModelShape, n_pos: int, what: str) -> NodeIndex:
    """The node, if it exists in this model on a prompt of `n_pos` tokens; else a TdbError."""
    problems = []
    if not 0 <= node.token < n_pos:
        problems.append(f"token {node.token} is outside the prompt (0..{n_pos - 1})")
    if node.node_type is not NodeType.EMBEDDING and not 0 <= (node.layer or 0) < config.n_layer:
        problems.append(f"layer {node.layer} is outside 0..{config.n_layer - 1}")
    if node.node_type is NodeType.MLP_NEURON and not 0 <= node.index < config.d_mlp:
        problems.append(f"neuron {node.index} is outside 0..{config.d_mlp - 1}")
    if node.node_type is NodeType.ATTENTION_HEAD:
        if not 0 <= node.index < config.n_head:
            problems.append(f"head {node.index} is outside 0..{config.n_head - 1}")
        if node.key_token is not None and not 0 <= node.key_token <= node.token:
            problems.append(f"key token {node.key_token} must be in 0..{node.token} (the query)")
    if node.node_type is NodeType.AUTOENCODER_LATENT:
        problems.append("autoencoder latents are not supported yet")
    if problems:
        raise TdbError(f"{what} {node.id}: " + "; ".join(problems))
    return node


def coords_tensor(nodes: list[NodeIndex]) -> Tensor:
    """[n, 4] long tensor of (layer, token, key_token, index)."""
    return torch.tensor([n.coords() for n in nodes], dtype=torch.long).reshape(-1, 4)


_ID_PATTERNS = {
    NodeType.EMBEDDING: re.compile(r"e@(\d+)"),
    NodeType.ATTENTION_HEAD: re.compile(r"h(\d+)\.(\d+)@(\d+)(?::(\d+))?"),
    NodeType.MLP_NEURON: re.compile(r"n(\d+)\.(\d+)@(\d+)"),
    NodeType.AUTOENCODER_LATENT: re.compile(r"a(\d+)\.(\d+)@(\d+)"),
}


def parse_node_id(text: str) -> NodeIndex:
    """The node of a short id: `parse_node_id("h2.3@7:4")`."""
    for node_type, pattern in _ID_PATTERNS.items():
        match = pattern.fullmatch(text.strip())
        if match is None:
            continue
        nums = [int(g) for g in match.groups() if g is not None]
        if node_type is NodeType.EMBEDDING:
            return NodeIndex(node_type, None, nums[0], 0)
        if node_type is NodeType.ATTENTION_HEAD:
            key = nums[3] if len(nums) == 4 else None
            return NodeIndex(node_type, nums[0], nums[2], nums[1], key_token=key)
        return NodeIndex(node_type, nums[0], nums[2], nums[1])
    raise TdbError(
        f"node id {text!r} is not one of: n<layer>.<neuron>@<token>, "
        "h<layer>.<head>@<query>:<key> (or h<layer>.<head>@<query> for all keys), e@<token>, "
        "a<layer>.<latent>@<token>"
    )
