"""Attention-head metrics in query chunks, so long prompts fit in bounded memory.

A layer's head metrics form [head query_pos key_pos] grids: at 4,096 tokens and 16 heads, 1 GiB
per metric in float32. The capture computes them a few query rows at a time instead: each chunk
is [head rows key_pos], with the keys cut at the chunk's last query (later keys are not nodes),
so the extra memory is O(rows × pos × head) per layer, whatever the prompt's length.

- pruned store (`prune_k`): each chunk keeps its own top k (and bottom k of signed metrics) per
  metric; the layer's top k is always among its chunks' top k (the same order, value then grid
  index, ranks both), so ranking the survivors once more gives exactly the unchunked result.
- dense store: the chunks fill the layer's full grids (which a dense store holds anyway).

Values are identical to the unchunked path bit for bit: the metrics are elementwise in (query,
key) once the per-key factors (`metrics.KeyTerms`) are computed, and those are computed once per
layer. Chunks are computed in float32 whatever the model's dtype.

The chunk size comes from a memory budget: `chunk_rows` fits `LIVE_GRIDS` float32 chunk grids
(the metrics' values, the probabilities and gradients cast to float32, the node mask and the
ranking's temporaries) in `ATTENTION_CHUNK_BYTES`. `capture(..., query_chunk=n)` overrides it.

    >>> for start, stop in query_ranges(last_token=9, rows=4): ...  # (0, 4), (4, 8), (8, 10)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from tdb.metrics import AttentionInputs, Metric, key_terms, metric_function
from tdb.nodes import NodeType
from tdb.store import top_and_bottom

ATTENTION_CHUNK_BYTES = 256 * 2**20
LIVE_GRIDS = 8


def chunk_rows(n_head: int, n_pos: int, budget: int = ATTENTION_CHUNK_BYTES) -> int:
    """How many query rows of one layer's head grids to compute at once.

    >>> chunk_rows(16, 4096)  # 128 rows: 8 float32 grids of [16 128 4096] are 256 MiB
    """
    return max(1, budget // (LIVE_GRIDS * 4 * n_head * max(n_pos, 1)))


def query_ranges(last_token: int, rows: int) -> list[tuple[int, int]]:
    """[start, stop) query ranges of `rows` rows covering queries 0..last_token."""
    return [(start, min(start + rows, last_token + 1)) for start in range(0, last_token + 1, rows)]


def with_key_terms(x: AttentionInputs) -> AttentionInputs:
    """`x` with its per-key factors computed (once per layer), if a metric can read them."""
    if x.keys is not None or x.v is None:
        return x
    return AttentionInputs(
        x.probs, x.grad_probs, x.v, x.W_O, x.read, x.first_query, key_terms(x.v, x.W_O, x.read)
    )


def query_chunk(x: AttentionInputs, start: int, stop: int) -> AttentionInputs:
    """Queries start..stop-1 of a whole layer `x`, keys 0..stop-1, in float32."""
    grad = None if x.grad_probs is None else x.grad_probs[:, start:stop, :stop].float()
    return AttentionInputs(
        x.probs[:, start:stop, :stop].float(), grad, x.v, x.W_O, x.read, start, x.keys
    )


def causal_rows(start: int, stop: int, device: torch.device | None = None) -> Tensor:
    """[rows key_pos] True where key <= query, for queries start..stop-1 and keys 0..stop-1."""
    query = torch.arange(start, stop, device=device)[:, None]
    return torch.arange(stop, device=device)[None, :] <= query


def chunk_values(
    x: AttentionInputs, groups: Sequence[Metric], start: int, stop: int
) -> dict[Metric, Tensor]:
    chunk = query_chunk(x, start, stop)
    return {g: metric_function(NodeType.ATTENTION_HEAD, g)(chunk) for g in groups}


def head_layer_dense(
    x: AttentionInputs, groups: Sequence[Metric], last_token: int, rows: int
) -> dict[Metric, Tensor]:
    """Every metric's flattened [head query_pos key_pos] grid of one layer, NaN where not a
    node (key after query, or query after `last_token`)."""
    n_head, n_pos, _ = x.probs.shape
    x = with_key_terms(x)
    device = x.probs.device  # the layer's; the grids go to the store on the CPU
    out = {g: torch.full((n_head, n_pos, n_pos), math.nan, device=device) for g in groups}
    for start, stop in query_ranges(last_token, rows):
        not_node = ~causal_rows(start, stop, device)
        for g, values in chunk_values(x, groups, start, stop).items():
            out[g][:, start:stop, :stop] = values.masked_fill(not_node, math.nan)
    return {g: v.flatten().cpu() for g, v in out.items()}


def head_layer_pruned(
    x: AttentionInputs, groups: Sequence[Metric], last_token: int, rows: int, k: int
) -> tuple[Tensor, dict[Metric, Tensor]]:
    """One layer's kept nodes when pruning to `k`: their flat indices into the layer's
    [head query_pos key_pos] grid, ascending, and every metric's value at them."""
    n_head, n_pos, _ = x.probs.shape
    x = with_key_terms(x)
    indices, parts = [], []
    for start, stop in query_ranges(last_token, rows):
        nodes = causal_rows(start, stop, x.probs.device).expand(n_head, -1, -1).flatten()
        flat = {g: v.flatten() for g, v in chunk_values(x, groups, start, stop).items()}
        kept = top_and_bottom(flat, k, nodes)
        head, rest = kept // ((stop - start) * stop), kept % ((stop - start) * stop)
        query, key = start + rest // stop, rest % stop
        indices.append((head * n_pos + query) * n_pos + key)
        parts.append({g: v[kept] for g, v in flat.items()})
    index = torch.cat(indices)
    order = torch.argsort(index)  # grid order, so that ties rank as in one whole grid
    values = {g: torch.cat([p[g] for p in parts])[order] for g in groups}
    kept = top_and_bottom(values, k)
    # The store holds what is kept on the CPU.
    return index[order][kept].cpu(), {g: v[kept].cpu() for g, v in values.items()}
