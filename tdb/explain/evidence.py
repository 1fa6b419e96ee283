"""The token evidence of an explanation: where a component fires, measured on its explaining
examples against the corpus.

- **tokens**: the tokens at which it fires (activation >= half its maximum on the explaining
  examples), strongest first, each with its mean activation wherever it occurs (`weight`),
  how often it fires on it, and its **lift**: its share of the firing positions over its
  frequency in the corpus (estimated on the scan's random samples).
- **contexts**: preceding tokens that take at least a third of the firing positions.
- **bigrams**: (preceding, token) pairs on which it fires clearly more than on the token
  alone (mean activation >= 1.5x), when the preceding token is what matters.
- **first_position**: its mean activation at a window's first token, when that is firing level.
- **repeat** (heads): its mean activation at tokens seen earlier in the window.

`baseline` is its mean activation wherever none of these applies; the simulator predicts it there.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tdb.explain.scan_data import Flat

N_TOKENS = 8
N_BIGRAMS = 5
N_CONTEXTS = 3
CONTEXT_SHARE = 1 / 3
BIGRAM_GAIN = 1.5


def _mean_by(codes: np.ndarray, acts: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    count = np.bincount(codes, minlength=size)
    total = np.bincount(codes, weights=acts, minlength=size)
    return total / np.maximum(count, 1), count


def token_evidence(
    flat: Flat, vocab: list[str], corpus_counts: np.ndarray, repeat: bool
) -> dict[str, Any]:
    """The token evidence of one component from its explaining examples (`flat`).

    >>> token_evidence(examples.explain.flat(), data.vocab, data.corpus_counts, repeat=False)
    {'tokens': [{'token': ' Mary', 'weight': 3.1, 'firing': 6, 'lift': 41.0, ...}], ...}
    """
    size = len(vocab)
    acts = flat.acts
    peak = float(acts.max()) if len(acts) else 0.0
    threshold = 0.5 * peak if peak > 0 else float("inf")
    firing = acts >= threshold
    n_firing = int(firing.sum())
    mean, count = _mean_by(flat.codes, acts, size)
    fire_count = np.bincount(flat.codes[firing], minlength=size)
    freq = (corpus_counts + 1) / (corpus_counts.sum() + size)
    peak_by = np.full(size, -np.inf)
    np.maximum.at(peak_by, flat.codes[firing], acts[firing])
    order = sorted(np.flatnonzero(fire_count), key=lambda c: (-peak_by[c], -fire_count[c], c))
    tokens = [
        {
            "token": vocab[c],
            "weight": float(mean[c]),
            "peak": float(peak_by[c]),
            "firing": int(fire_count[c]),
            "count": int(count[c]),
            "lift": float(fire_count[c] / n_firing / freq[c]),
        }
        for c in order[:N_TOKENS]
    ]

    has_prev = flat.prev >= 0
    prev_mean, _ = _mean_by(flat.prev[has_prev], acts[has_prev], size)
    prev_fire = np.bincount(flat.prev[firing & has_prev], minlength=size)
    contexts = [
        {
            "prev": vocab[c],
            "weight": float(prev_mean[c]),
            "firing": int(prev_fire[c]),
            "share": float(prev_fire[c] / n_firing),
        }
        for c in sorted(np.flatnonzero(prev_fire), key=lambda c: (-prev_fire[c], c))
        if prev_fire[c] >= 2 and prev_fire[c] >= CONTEXT_SHARE * n_firing
    ][:N_CONTEXTS]

    pairs = flat.prev[has_prev] * size + flat.codes[has_prev]
    pair_keys, pair_index = np.unique(pairs, return_inverse=True)
    pair_mean, _ = _mean_by(pair_index, acts[has_prev], len(pair_keys))
    pair_fire = np.bincount(pair_index[firing[has_prev]], minlength=len(pair_keys))
    bigram_rows = [
        j
        for j in np.flatnonzero(pair_fire >= 2)
        if pair_mean[j] >= BIGRAM_GAIN * mean[pair_keys[j] % size] and pair_mean[j] > 0
    ]
    bigrams = [
        {
            "prev": vocab[pair_keys[j] // size],
            "token": vocab[pair_keys[j] % size],
            "weight": float(pair_mean[j]),
            "firing": int(pair_fire[j]),
        }
        for j in sorted(bigram_rows, key=lambda j: (-pair_fire[j], -pair_mean[j]))[:N_BIGRAMS]
    ]

    first = flat.pos == 0
    first_mean = float(acts[first].mean()) if first.any() else 0.0
    evidence: dict[str, Any] = {
        "threshold": threshold if n_firing else None,
        "max": peak,
        "tokens": tokens,
        "contexts": contexts,
        "bigrams": bigrams,
        "first_position": first_mean if n_firing and first_mean >= threshold else None,
        "repeat": float(acts[flat.repeat].mean()) if repeat and flat.repeat.any() else None,
    }
    return evidence
