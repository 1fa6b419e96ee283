"""The store of derived scalars: per node type, a block holding every metric's value per node.

Two kinds of block, with one interface (flat values per metric; coordinates of flat indices;
flat index of given coordinates):

- `GridBlock`: every node of the type, values as the grid of `metrics.GRID_AXES` flattened.
- `ListBlock`: an explicit list of nodes. The capture builds one when it ranks layer by layer and
  keeps only each layer's top k / bottom k per metric (the "pruned" store): then the whole model's
  T x T x head attention values never exist at once. A pruned block answers `topk` exactly for any
  k up to the k it was pruned with, and knows every metric's value at every node it holds.

NaN marks "not a node" (an attention pair with key after query); such entries never rank.
Ties rank the node that comes first in grid order (layer, then the node type's grid axes of
`metrics.GRID_AXES`) first, in both kinds of block.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from tdb.errors import TdbError
from tdb.metrics import GRID_AXES, Metric, is_signed
from tdb.nodes import NODE_TEMPLATE, NodeIndex, NodeType, coords_tensor

ROW = 512


def chunked_topk(values: Tensor, k: int, largest: bool) -> tuple[Tensor, Tensor]:
    """`torch.topk` of a long 1-d tensor, 10-30x faster on CPU: cut it into rows of `ROW`
    entries, find each row's largest (smallest) entry in one vectorised pass, and take the top
    k of the k rows whose extremes are best: every entry of the top k lies in one of them (were
    an entry's row not among them, k other rows would each hold a better or equal entry).

    Ties come in any order. A NaN ranks first in both directions, level with +inf for the
    largest and -inf for the smallest: where `values` holds a NaN and no k entries are
    infinite the right way, the result holds one (`ranked` relies on it to see NaN).
    """
    n_rows = len(values) // ROW
    if n_rows <= k:
        return best_of(values, torch.arange(len(values), device=values.device), k, largest)
    n_full = n_rows * ROW
    rows = values[:n_full].view(n_rows, ROW)
    # A row holding NaN has NaN as its extreme, and ranks first.
    extremes = rows.amax(dim=1) if largest else rows.amin(dim=1)
    best_rows = best_of(extremes, torch.arange(n_rows, device=values.device), k, largest)[1]
    positions = torch.arange(ROW, device=values.device)
    return best_of(
        torch.cat([rows[best_rows].flatten(), values[n_full:]]),
        torch.cat(
            [
                (best_rows[:, None] * ROW + positions).flatten(),
                torch.arange(n_full, len(values), device=values.device),
            ]
        ),
        k,
        largest,
    )


def best_of(values: Tensor, indices: Tensor, k: int, largest: bool) -> tuple[Tensor, Tensor]:
    """The k best of a short tensor and their `indices`, NaN first (as `chunked_topk`)."""
    keys = (
        values if largest else values.nan_to_num(nan=-math.inf, posinf=math.inf, neginf=-math.inf)
    )
    top = torch.topk(keys, k, largest=largest)
    return values[top.indices], indices[top.indices]


def ranked(values: Tensor, k: int, largest: bool = True, valid: Tensor | None = None) -> Tensor:
    """Flat indices of the k largest (or smallest) values; ties: smaller index first.

    Entries that are NaN, or False in `valid`, are not nodes and never rank.

    >>> ranked(torch.tensor([1.0, 3.0, 3.0, float("nan")]), 2)  # tensor([1, 2])
    """
    if k <= 0:
        return torch.zeros(0, dtype=torch.long, device=values.device)
    # Fast path: torch.topk orders ties arbitrarily and ranks NaN above everything. The values
    # strictly better than the k-th value are all among the top k + 1, and sorting those few by
    # (value, index) orders them exactly; the ones tied with the k-th value come after, smallest
    # index first (if the (k+1)-th ties too, more may lie outside the top: a search finds them).
    if k < len(values):
        top_values, top_indices = chunked_topk(values, k + 1, largest)
        if not bool(torch.isnan(top_values).any()):
            kth = top_values[k - 1]
            beats = top_values > kth if largest else top_values < kth
            better, better_values = top_indices[beats], top_values[beats]
            if valid is None or bool(valid[better].all()):
                if bool(top_values[k] == kth):
                    ties = values == kth
                    tied = first_true(ties if valid is None else ties & valid, k - len(better))
                else:
                    tied = top_indices[top_values == kth].sort().values
                    tied = tied if valid is None else tied[valid[tied]]
                if len(better) + len(tied) >= k:
                    by_index = torch.argsort(better)
                    better, better_values = better[by_index], better_values[by_index]
                    order = torch.sort(better_values, descending=largest, stable=True).indices
                    return torch.cat([better[order], tied])[:k]
    signed = values if largest else -values
    valid = ~torch.isnan(signed) if valid is None else valid & ~torch.isnan(signed)
    k = min(k, int(valid.sum()))
    if k <= 0:
        return torch.zeros(0, dtype=torch.long, device=values.device)
    signed = signed.masked_fill(~valid, -math.inf)
    kth = chunked_topk(signed, k, largest=True)[0][-1]
    better = ((signed > kth) & valid).nonzero().squeeze(1)  # fewer than k, ascending index
    order = torch.sort(signed[better], descending=True, stable=True).indices
    # Ties with the k-th value can be most of the tensor (a metric that is zero almost
    # everywhere): find only as many as are needed, smallest index first.
    tied = first_true((signed == kth) & valid, k - len(better))
    return torch.cat([better[order], tied])


def first_true(mask: Tensor, n: int, block: int = 1 << 20) -> Tensor:
    """The indices of the first `n` True entries of a 1-d mask, ascending."""
    found, count = [], 0
    for start in range(0, len(mask), block):
        found.append(mask[start : start + block].nonzero().squeeze(1) + start)
        count += len(found[-1])
        if count >= n:
            break
    return torch.cat(found)[:n] if found else torch.zeros(0, dtype=torch.long, device=mask.device)


def top_and_bottom(values: Mapping[Metric, Tensor], k: int, valid: Tensor | None = None) -> Tensor:
    """What a pruned store keeps of flat `values`: ascending indices of every metric's k largest
    values and every signed metric's k smallest (entries False in `valid` never kept)."""
    keep = []
    for g, v in values.items():
        if not is_signed(g):
            keep.append(ranked(v, k, valid=valid))
            continue
        low, high = torch.aminmax(v) if len(v) else (torch.tensor(1.0), torch.tensor(1.0))
        if bool(low == 0) and bool(high == 0):  # e.g. a direct effect away from where it reads
            everywhere = torch.arange(min(k, len(v)), device=v.device)
            keep.append(everywhere if valid is None else first_true(valid, k))
            continue
        keep += [ranked(v, k, valid=valid), ranked(v, k, largest=False, valid=valid)]
    kept: Tensor = torch.unique(torch.cat(keep))
    return kept


@dataclass
class GridBlock:
    """All nodes of one type; `values[group]` is the flattened grid (see `metrics.GRID_AXES`)."""

    node_type: NodeType
    shape: tuple[int, ...]
    values: dict[Metric, Tensor]
    pruned_k: int | None = None  # a grid is complete

    def coords(self, flat: Tensor) -> Tensor:
        return grid_coords(self.node_type, self.shape, flat)

    def find(self, coords: Tensor) -> Tensor:
        axes = GRID_AXES[self.node_type]
        inside = torch.ones(len(coords), dtype=torch.bool)
        for column, fixed in enumerate(NODE_TEMPLATE):
            if column not in axes:
                inside &= coords[:, column] == fixed
        flat = torch.zeros(len(coords), dtype=torch.long)
        for column, size in zip(axes, self.shape, strict=True):
            inside &= (coords[:, column] >= 0) & (coords[:, column] < size)
            flat = flat * size + coords[:, column].clamp(0, size - 1)
        return torch.where(inside, flat, -1)


def grid_coords(node_type: NodeType, shape: tuple[int, ...], flat: Tensor) -> Tensor:
    """[n 4] node coordinates of flat indices into a grid of `node_type`."""
    out = torch.tensor(NODE_TEMPLATE, dtype=torch.long).repeat(len(flat), 1)
    rest = flat
    # Last axis first: coordinate = rest mod size (torch.unravel_index is ~100x slower here).
    for column, size in zip(reversed(GRID_AXES[node_type]), reversed(shape), strict=True):
        out[:, column] = rest % size
        rest = rest // size
    return out


@dataclass
class ListBlock:
    """Some nodes of one type, in grid order; `values[group]` is [n]."""

    node_type: NodeType
    node_coords: Tensor  # [n 4]
    values: dict[Metric, Tensor]
    pruned_k: int | None = None
    _lookup: dict[tuple[int, ...], int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._lookup = {tuple(row): i for i, row in enumerate(self.node_coords.tolist())}

    def coords(self, flat: Tensor) -> Tensor:
        return self.node_coords[flat]

    def find(self, coords: Tensor) -> Tensor:
        found = [self._lookup.get(tuple(row), -1) for row in coords.tolist()]
        return torch.tensor(found, dtype=torch.long)


NodeBlock = GridBlock | ListBlock


@dataclass
class ScalarStore:
    """Derived scalars of one prompt, by node type. `store.topk(Group.DIRECT_EFFECT,
    NodeType.MLP_NEURON, 5)`; `store.values_at(Group.ACTIVATION, [node])`."""

    blocks: dict[NodeType, NodeBlock]

    @property
    def groups(self) -> list[Metric]:
        first = next(iter(self.blocks.values()), None)
        return [] if first is None else list(first.values)

    def block(self, node_type: NodeType) -> NodeBlock:
        if node_type not in self.blocks:
            raise TdbError(f"node type {node_type.value} is not in this store")
        return self.blocks[node_type]

    def topk(
        self, group: Metric, node_type: NodeType, k: int, largest: bool = True
    ) -> tuple[list[NodeIndex], Tensor]:
        """The k nodes of `node_type` with the largest (smallest) values of `group`."""
        block = self.block(node_type)
        check_pruned(block, group, k, largest)
        flat = ranked(block.values[group], k, largest)
        nodes = [NodeIndex.from_coords(node_type, row) for row in block.coords(flat)]
        return nodes, block.values[group][flat]

    def values_at(self, group: Metric, nodes: list[NodeIndex]) -> Tensor:
        """The value of `group` at each node (NaN where the store does not hold the node)."""
        out = torch.full((len(nodes),), math.nan)
        for node_type, block in self.blocks.items():
            positions = [i for i, n in enumerate(nodes) if n.node_type is node_type]
            if not positions:
                continue
            flat = block.find(coords_tensor([nodes[i] for i in positions]))
            held = flat >= 0
            rows = torch.tensor(positions, dtype=torch.long)
            out[rows[held]] = block.values[group][flat[held]].float()
        return out


def check_pruned(block: NodeBlock, group: Metric, k: int, largest: bool) -> None:
    """A pruned block holds each layer's top k of every group and bottom k of signed groups."""
    if block.pruned_k is None:
        return
    if not largest and not is_signed(group):
        raise TdbError(
            f"the bottom k of {group.value} was not kept when {block.node_type.value} nodes "
            "were pruned layer by layer: capture a dense store"
        )
    if k > block.pruned_k:
        raise TdbError(
            f"k={k} is larger than the k={block.pruned_k} this store was captured with "
            f"({block.node_type.value} nodes were pruned layer by layer): capture again"
        )
