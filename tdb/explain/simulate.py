"""The simulator: each token's activation predicted from an explanation's evidence alone, and the
score, the Pearson correlation of predicted and real activations on held-out examples.

A token gets the largest weight of the evidence items that match it (its token, its preceding
token, the (preceding, token) pair, a window's first position, for heads a token seen earlier
in the window) and the evidence's `baseline` where none does. An explanation that predicts the
same value everywhere (nothing matches, or the activations are constant) scores 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tdb.explain.scan_data import Flat


def _codes(texts: list[str], code_of: dict[str, int]) -> np.ndarray:
    return np.array([code_of.get(t, -2) for t in texts], dtype=np.int64)  # -2: never seen


def matched_weights(evidence: dict[str, Any], flat: Flat, code_of: dict[str, int]) -> np.ndarray:
    """Per token, the largest weight of the evidence items that match it; NaN where none does."""
    pred = np.full(len(flat.codes), np.nan)

    def apply(mask: np.ndarray, weight: float) -> None:
        pred[mask] = np.fmax(pred[mask], weight)

    for item in evidence["tokens"]:
        apply(flat.codes == code_of.get(item["token"], -2), item["weight"])
    for item in evidence["contexts"]:
        apply(flat.prev == code_of.get(item["prev"], -2), item["weight"])
    for item in evidence["bigrams"]:
        prev, token = _codes([item["prev"], item["token"]], code_of)
        apply((flat.prev == prev) & (flat.codes == token), item["weight"])
    if evidence.get("first_position") is not None:
        apply(flat.pos == 0, evidence["first_position"])
    if evidence.get("repeat") is not None:
        apply(flat.repeat, evidence["repeat"])
    return pred


def baseline(evidence: dict[str, Any], explain: Flat, code_of: dict[str, int]) -> float:
    """The mean activation on the explaining tokens that no evidence item matches."""
    unmatched = np.isnan(matched_weights(evidence, explain, code_of))
    return float(explain.acts[unmatched].mean()) if unmatched.any() else 0.0


def simulate(evidence: dict[str, Any], flat: Flat, code_of: dict[str, int]) -> np.ndarray:
    """Predicted activations of the tokens of `flat` from the evidence alone.

    >>> simulate(evidence, examples.held_out.flat(), code_of)
    """
    pred = matched_weights(evidence, flat, code_of)
    return np.where(np.isnan(pred), evidence["baseline"], pred)


def correlation(predicted: np.ndarray, real: np.ndarray) -> float:
    """Pearson correlation; 0 when either side is constant (nothing to correlate)."""
    if len(real) < 2 or np.ptp(predicted) == 0 or np.ptp(real) == 0:
        return 0.0
    return float(np.clip(np.corrcoef(predicted, real)[0, 1], -1.0, 1.0))


def score(evidence: dict[str, Any], held_out: Flat, code_of: dict[str, int]) -> float:
    return correlation(simulate(evidence, held_out, code_of), held_out.acts)
