"""The multi-group top-k that builds the node table (the semantics are in docs/node-table.md).

1. For each group, for each node type: the k largest values (and, for signed groups, the k most
   negative), after an optional transform of the values.
2. Each winner's node index, through an optional index map; the union in first-seen order:
   group order, then node type order (the store's), then top-k ranks, then bottom-k ranks.
3. Every group's (untransformed) value at every node of the union.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from tdb.errors import TdbError
from tdb.metrics import Metric, is_signed
from tdb.nodes import TOKEN, NodeIndex, NodeType
from tdb.store import NodeBlock, ScalarStore, check_pruned, ranked

# transform(block, group, flat values) -> flat values to rank by (NaN = excluded)
ValueTransform = Callable[[NodeBlock, Metric, Tensor], Tensor]
IndexMap = Callable[[NodeIndex], NodeIndex]


@dataclass(frozen=True)
class TopKResult:
    """Nodes in table order and, per group, one value per node (aligned)."""

    nodes: list[NodeIndex]
    values: dict[Metric, Tensor]


def multi_group_topk(
    store: ScalarStore,
    groups: Sequence[Metric],
    k: int,
    transform: ValueTransform | None = None,
    index_map: IndexMap | None = None,
) -> TopKResult:
    """Rank the store's nodes by several metrics at once.

    >>> result = multi_group_topk(store, [Group.DIRECT_EFFECT, Group.ACT_TIMES_GRAD], k=10)
    >>> result.nodes[0].id, result.values[Group.DIRECT_EFFECT][0]
    """
    if k < 0:
        raise TdbError(f"k must be >= 0, got {k}")
    seen: dict[NodeIndex, None] = {}
    for group in groups:
        for node_type, block in store.blocks.items():
            for node in winners(block, node_type, group, k, transform):
                seen.setdefault(node if index_map is None else index_map(node))
    nodes = list(seen)
    return TopKResult(nodes, {group: store.values_at(group, nodes) for group in groups})


def winners(
    block: NodeBlock,
    node_type: NodeType,
    group: Metric,
    k: int,
    transform: ValueTransform | None,
) -> list[NodeIndex]:
    values = block.values[group]
    if transform is not None:
        if block.pruned_k is not None:
            raise TdbError("a value transform needs a dense store (capture without pruning)")
        values = transform(block, group, values)
    sides = (True, False) if is_signed(group) else (True,)
    out: list[NodeIndex] = []
    for largest in sides:
        check_pruned(block, group, k, largest)
        flat = ranked(values, k, largest)
        out += [NodeIndex.from_coords(node_type, row) for row in block.coords(flat)]
    return out


def keep_token(token: int) -> ValueTransform:
    """A transform that ranks only nodes at `token` (the query token for heads)."""

    def transform(block: NodeBlock, group: Metric, values: Tensor) -> Tensor:
        at_token = block.coords(torch.arange(len(values)))[:, TOKEN] == token
        return values.masked_fill(~at_token, float("nan"))

    return transform


def absolute(block: NodeBlock, group: Metric, values: Tensor) -> Tensor:
    """A transform that ranks by magnitude."""
    return values.abs()
