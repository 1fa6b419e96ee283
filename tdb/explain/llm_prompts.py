"""The LLM explainer's two prompts and the strict parsing of their answers.

Explain: the component's explaining top examples, one token a line as a JSON string with its
activation as an integer 0-10 (10 = the component's largest activation in them; negative
values are 0), as in OpenAI's automated-interpretability work; the answer is one short
sentence. Simulate: the held-out examples' tokens and that sentence; the answer is JSON, one
list of integers 0-10 per example, one per token. Anything else is a `BadAnswerError` for that
component, never guessed at.

Changing either prompt's wording or format means a new `VERSION`: rows and cache entries of
another version are stale.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from tdb.errors import TdbError, reason

VERSION = "llm-1"
MAX_SENTENCE = 300  # characters: a longer answer is not "one short sentence"

Messages = list[dict[str, str]]

EXPLAIN_SYSTEM = (
    "You are studying one component (a neuron, an attention head or a sparse-autoencoder latent) "
    "of a transformer language model. You are shown text excerpts, one token per line: the token "
    "as a JSON string, a tab, and how strongly the component activates on it, an integer from 0 "
    "(not at all) to 10 (its strongest activation in these excerpts). Say what the component "
    "responds to in one short sentence (at most 25 words). Answer with the sentence only."
)
SIMULATE_SYSTEM = (
    "You predict how strongly one component of a transformer language model activates on each "
    "token of some text excerpts, from an explanation of what the component does. Each excerpt "
    "is given one token per line, the token as a JSON string. For every token, predict an "
    "integer from 0 (not at all) to 10 (as strongly as it ever does). Answer with JSON only, "
    'in the form {"activations": [[0, 3, 10], [0, 0]]}: one list per excerpt, in order, with '
    "exactly one integer per token of that excerpt."
)


class BadAnswerError(TdbError):
    """An answer that does not have the form its prompt asks for."""


def scaled(acts: list[np.ndarray]) -> list[list[int]]:
    """Activations as integers 0-10, relative to the largest one; all 0 when none is positive.

    >>> scaled([np.array([0.5, 2.0, -1.0])])
    [[2, 10, 0]]
    """
    peak = max((float(a.max()) for a in acts if len(a)), default=0.0)
    if peak <= 0:
        return [[0] * len(a) for a in acts]
    return [np.clip(np.round(10 * a / peak), 0, 10).astype(int).tolist() for a in acts]


def _token(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def explain_messages(tokens: list[list[str]], acts: list[np.ndarray]) -> Messages:
    """The explain prompt for these windows (token texts and raw activations)."""
    parts = []
    for i, (window, values) in enumerate(zip(tokens, scaled(acts), strict=True)):
        lines = "\n".join(f"{_token(t)}\t{v}" for t, v in zip(window, values, strict=True))
        parts.append(f"Excerpt {i + 1}:\n{lines}")
    user = "\n\n".join(parts) + "\n\nWhat does the component respond to? One short sentence."
    return [{"role": "system", "content": EXPLAIN_SYSTEM}, {"role": "user", "content": user}]


def simulate_messages(explanation: str, tokens: list[list[str]]) -> Messages:
    """The simulate prompt: the explanation and these windows' tokens."""
    parts = [f"Explanation of the component: {explanation}"]
    for i, window in enumerate(tokens):
        lines = "\n".join(_token(t) for t in window)
        parts.append(f"Excerpt {i + 1} ({len(window)} tokens):\n{lines}")
    counts = ", ".join(str(len(w)) for w in tokens)
    parts.append(
        f"Answer with the JSON object only: {len(tokens)} lists, of {counts} integers (0-10)."
    )
    user = "\n\n".join(parts)
    return [{"role": "system", "content": SIMULATE_SYSTEM}, {"role": "user", "content": user}]


def parse_explanation(answer: str) -> str:
    """The one sentence of an explain answer (surrounding blanks dropped)."""
    sentence = answer.strip()
    if not sentence:
        raise BadAnswerError("the explanation is empty")
    if "\n" in sentence:
        raise BadAnswerError("the explanation is more than one line")
    if len(sentence) > MAX_SENTENCE:
        raise BadAnswerError(f"the explanation is {len(sentence)} characters (> {MAX_SENTENCE})")
    return sentence


def _unfenced(answer: str) -> str:
    """The answer without one enclosing Markdown code fence (```json ... ```), which chat models
    add to JSON often enough that refusing it would waste the request."""
    text = answer.strip()
    if text.startswith("```") and text.endswith("```") and text.count("```") == 2:
        body = text[3:-3]
        first, _, rest = body.partition("\n")
        return rest if first.strip() in ("", "json") else body
    return text


def parse_simulation(answer: str, lengths: list[int]) -> list[list[int]]:
    """The predicted activations of a simulate answer: one list per window of exactly its
    length, each value an integer 0-10."""
    try:
        parsed: Any = json.loads(_unfenced(answer))
    except ValueError as e:
        raise BadAnswerError(f"the simulation is not JSON ({reason(e)})") from None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("activations"), list):
        raise BadAnswerError('the simulation is not an object {"activations": [...]}')
    lists = parsed["activations"]
    if len(lists) != len(lengths):
        raise BadAnswerError(f"the simulation has {len(lists)} lists for {len(lengths)} excerpts")
    for i, (values, n) in enumerate(zip(lists, lengths, strict=True)):
        if not isinstance(values, list) or len(values) != n:
            got = len(values) if isinstance(values, list) else type(values).__name__
            raise BadAnswerError(f"the simulation of excerpt {i + 1} has {got} values, not {n}")
        for v in values:
            if type(v) is not int or not 0 <= v <= 10:
                raise BadAnswerError(
                    f"the simulation of excerpt {i + 1} holds {v!r}, not an integer 0-10"
                )
    return [list(values) for values in lists]
