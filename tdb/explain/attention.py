"""What a head attends to, from where: on its explaining top windows, the share of its attention
that goes to each pattern's keys, recomputed with the model (the scan keeps no attention).

At query q >= 1 (at q = 0 there is only one key), a pattern is a set of keys:

| pattern | keys k of query q |
|---|---|
| previous | k = q - 1 |
| first | k = 0 |
| self | k = q |
| same_token | k < q with the same token as q |
| induction | 0 < k < q whose preceding token is q's token (after an earlier copy of it) |

Its share is the mean over query positions of the attention on those keys, weighted by the
head's activation at q (its write magnitude, from the scan), so the positions where the head
writes hardest count most. Patterns may overlap (at q = 1 previous and first are one key).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from tdb.checkpoint import LoadedModel
from tdb.hooks import HookPoint

PATTERNS = ("previous", "first", "self", "same_token", "induction")


def pattern_masks(tokens: Sequence[int]) -> dict[str, np.ndarray]:
    """Per pattern, a [query_pos key_pos] boolean mask of its keys (query 0 has none)."""
    t = np.asarray(tokens)
    n = len(t)
    q, k = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")  # [query_pos key_pos]
    before = (k < q) & (q >= 1)
    same = t[:, None] == t[None, :]
    prev_of_key = np.concatenate([[-1], t[:-1]])  # [key_pos] the token before key k
    return {
        "previous": (k == q - 1) & (q >= 1),
        "first": (k == 0) & (q >= 1),
        "self": (k == q) & (q >= 1),
        "same_token": before & same,
        "induction": before & (k >= 1) & (prev_of_key[None, :] == t[:, None]),
    }


def pattern_shares(
    probs: np.ndarray, tokens: Sequence[int], weights: np.ndarray
) -> tuple[dict[str, float], float]:
    """One window's weighted attention on each pattern (`probs`: [query_pos key_pos] of one
    head, `weights`: [query_pos]) and the total weight, for averaging over windows."""
    w = np.where(np.arange(len(tokens)) >= 1, np.maximum(weights, 0), 0.0)
    shares = {
        name: float((w * (probs * mask).sum(axis=1)).sum())
        for name, mask in pattern_masks(tokens).items()
    }
    return shares, float(w.sum())


def head_attention(
    loaded: LoadedModel,
    layer: int,
    head: int,
    windows: Sequence[Sequence[int]],
    weights: Sequence[np.ndarray],
    batch_size: int = 16,
) -> dict[str, float]:
    """The share of each pattern in one head's attention on these windows (token ids), weighted
    by the head's activation at each query.

    >>> head_attention(loaded, 1, 3, [ids], [activations])
    {'previous': 0.82, 'first': 0.05, ...}
    """
    totals = dict.fromkeys(PATTERNS, 0.0)
    weight_sum = 0.0
    for start in range(0, len(windows), batch_size):
        batch = [list(w) for w in windows[start : start + batch_size]]
        result = loaded.run(batch, cache=[HookPoint.ATTN_PROBS])
        probs = result.cache[HookPoint.ATTN_PROBS, layer].to(torch.float32).cpu().numpy()
        for i, ids in enumerate(batch):
            n = len(ids)
            p = probs[i, head, :n, :n]  # [query_pos key_pos]
            shares, w = pattern_shares(p, ids, weights[start + i][:n])
            weight_sum += w
            for name in PATTERNS:
                totals[name] += shares[name]
    return {name: totals[name] / weight_sum if weight_sum > 0 else 0.0 for name in PATTERNS}
