"""The one-sentence explanation, built from the evidence alone (so the page can show both)."""

from __future__ import annotations

from typing import Any

PATTERN_WORDS = {
    "previous": "the previous token",
    "first": "the first token",
    "self": "itself",
    "same_token": "earlier copies of the current token",
    "induction": "the token after an earlier copy of the current token (induction)",
}
DOMINANT_SHARE = 0.3


def quoted(tokens: list[str], n: int = 3) -> str:
    return ", ".join(repr(t) for t in tokens[:n])


def _firing(evidence: dict[str, Any]) -> str:
    tokens = [item["token"] for item in evidence["tokens"]]
    if not tokens:
        return f"never fires clearly (max {evidence['max']:.2f})"
    text = f"fires on {quoted(tokens)}"
    if evidence["contexts"]:
        text += f" after {quoted([c['prev'] for c in evidence['contexts']], 2)}"
    elif evidence["bigrams"]:
        b = evidence["bigrams"][0]
        text += f" (most after {b['prev']!r} in {b['prev'] + b['token']!r})"
    if evidence.get("first_position") is not None:
        text += " and at the first token"
    return text


def _attention(shares: dict[str, float]) -> str:
    ranked = sorted(shares.items(), key=lambda kv: -kv[1])
    dominant = [(name, s) for name, s in ranked if s >= DOMINANT_SHARE][:2]
    if dominant:
        return "attends to " + " and ".join(
            f"{PATTERN_WORDS[name]} ({100 * s:.0f} %)" for name, s in dominant
        )
    shown = ", ".join(f"{PATTERN_WORDS[name]} {100 * s:.0f} %" for name, s in ranked[:2])
    return f"attends diffusely ({shown})"


def sentence(evidence: dict[str, Any]) -> str:
    """E.g. "Fires on ' Mary', ' John' after ' and'; promotes ' Mary', ' to'." or "Attends to
    the previous token (82 %); writes most at ' and', ' the'."

    >>> sentence(evidence)
    """
    if "attention" in evidence:
        text = _attention(evidence["attention"])
        tokens = [item["token"] for item in evidence["tokens"]]
        if tokens:
            text += f"; writes most at {quoted(tokens)}"
    else:
        text = _firing(evidence)
        if evidence.get("promotes"):
            text += f"; promotes {quoted(evidence['promotes'])}"
    return text[0].upper() + text[1:] + "."
