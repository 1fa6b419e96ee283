"""Adding a metric is one registry entry: a toy metric, registered and nothing else, becomes a
column of the node table, ranked by the multi-group top-k like the built-in ones."""

from __future__ import annotations

from enum import StrEnum

import pytest
import torch

from tdb.checkpoint import LoadedModel
from tdb.metrics import METRIC_SPECS, Group, MetricSpec
from tdb.nodes import NodeType
from tdb.table import node_table

TOKENS = [5, 17, 99, 3, 42, 8, 61, 23, 7, 11]


class Toy(StrEnum):
    ACTIVATION_SQUARED = "activation_squared"


TOY = MetricSpec(
    signed=False,
    needs_gradient=False,
    needs_values=False,
    functions={
        NodeType.EMBEDDING: lambda x: torch.ones(x.resid.shape[0]),
        NodeType.ATTENTION_HEAD: lambda x: x.probs**2,
        NodeType.MLP_NEURON: lambda x: x.post**2,
        NodeType.AUTOENCODER_LATENT: lambda x: x.z**2,
    },
)


def test_a_registered_toy_metric_is_a_ranked_column(
    loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(METRIC_SPECS, Toy.ACTIVATION_SQUARED, TOY)  # type: ignore[index]
    groups = [Group.ACTIVATION, Toy.ACTIVATION_SQUARED]
    table = node_table(loaded, TOKENS, 5, 6, k=3, groups=groups)  # type: ignore[arg-type]
    assert table.to_json()["groups"] == ["activation", "activation_squared"]
    squared = table.values[Toy.ACTIVATION_SQUARED]  # type: ignore[index]
    activation = table.values[Group.ACTIVATION]
    assert squared == pytest.approx([a * a for a in activation], rel=1e-5)
    # Its top 3 per node type is the brute-force top 3 of every node's activation squared.
    dense = node_table(loaded, TOKENS, 5, 6, k=10**6, groups=[Group.ACTIVATION])
    for node_type in (NodeType.MLP_NEURON, NodeType.ATTENTION_HEAD):
        every = [
            (v * v, n)
            for n, v in zip(dense.nodes, dense.values[Group.ACTIVATION], strict=True)
            if n.node_type is node_type
        ]
        best = sorted(v for v, _ in every)[-3:]
        shown = sorted(
            s for n, s in zip(table.nodes, squared, strict=True) if n.node_type is node_type
        )[-3:]
        assert shown == pytest.approx(best, rel=1e-5)
