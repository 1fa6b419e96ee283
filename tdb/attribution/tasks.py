"""Built-in datasets of prompt pairs (`tdb task ioi|induction|capitals --n 64 --seed 0`), from the
demo model's held-out evaluation data (`tdb.demo.data`), so no prompt was seen in training.

- **ioi**: held-out templates and name pairs; corrupted = the "ABC" corruption (the subject's
  second mention replaced by a third name), target = the indirect object, distractor = the subject.
- **induction**: token ids. Clean = a fresh random sequence A of 12 tokens followed by its first 8
  (the model should continue with A[8]); corrupted = A followed by the first 8 tokens of another
  fresh sequence B (nothing to copy); target A[8], distractor B[8]. Every prompt has 20 tokens.
- **capitals**: "Paris, France. Ottawa," -> " Canada" over held-out adjacent pairs; corrupted
  swaps the second capital for another of the same token count, whose country is the distractor.

    >>> records = task_records("ioi", n=4, seed=0, tokenizer=loaded.tokenizer)
    >>> records[0]["target"], records[0]["distractor"]
"""

from __future__ import annotations

import random
from enum import StrEnum

from tdb.demo.data import (
    CAPITALS,
    IOI_HELDOUT_TEMPLATES,
    NAMES,
    OBJECTS,
    PLACES,
    VERBS,
    heldout_capital_adjacencies,
    heldout_name_pairs,
)
from tdb.errors import TdbError
from tdb.tokens import Tokenizer

INDUCTION_LENGTH = 12  # tokens of the random sequence
INDUCTION_REPEAT = 8  # tokens of it repeated before the prediction


class Task(StrEnum):
    IOI = "ioi"
    INDUCTION = "induction"
    CAPITALS = "capitals"


def task_records(
    task: Task | str, n: int, seed: int, tokenizer: Tokenizer
) -> list[dict[str, object]]:
    """`n` prompt pairs of `task` (dataset lines, as dicts), the same for the same seed."""
    from tdb.table.request import member

    task = member(Task, task, "task") if not isinstance(task, Task) else task
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise TdbError(f"--n: the number of prompt pairs must be >= 1, got {n!r}")
    rng = random.Random(f"tdb-task-{task.value}-{seed}")
    if task is Task.IOI:
        return [_ioi(rng, k, tokenizer) for k in range(n)]
    if task is Task.INDUCTION:
        return _induction(rng, n, tokenizer)
    return _capitals(rng, n, tokenizer)


def _ioi(rng: random.Random, k: int, tokenizer: Tokenizer) -> dict[str, object]:
    pairs = sorted(tuple(sorted(p)) for p in heldout_name_pairs())
    a, b = rng.choice(pairs)
    io, s = (a, b) if rng.random() < 0.5 else (b, a)
    c = rng.choice([name for name in NAMES if name not in (io, s)])
    for name in (io, s, c):
        tokenizer.single_token(f" {name}", "name")
    template = IOI_HELDOUT_TEMPLATES[k % len(IOI_HELDOUT_TEMPLATES)]
    x, y = (io, s) if rng.random() < 0.5 else (s, io)
    fill = {"X": x, "Y": y, "place": rng.choice(PLACES), "verb": rng.choice(VERBS)}
    fill["obj"] = rng.choice(OBJECTS)
    prompt = template.format(S=s, **fill)
    corrupted = template.format(S=c, **fill)
    if len(tokenizer.encode(prompt)) != len(tokenizer.encode(corrupted)):
        raise TdbError(f"ioi: {prompt!r} and {corrupted!r} differ in token count on this tokenizer")
    meta = {"template": k % len(IOI_HELDOUT_TEMPLATES), "io": io, "s": s, "c": c}
    return {
        "prompt": prompt,
        "target": f" {io}",
        "distractor": f" {s}",
        "corrupted": corrupted,
        "meta": meta,
    }


def _induction(rng: random.Random, n: int, tokenizer: Tokenizer) -> list[dict[str, object]]:
    special = {tokenizer.encode(t)[0] for t in ("<|endoftext|>",) if tokenizer.has_text}
    special |= {0}
    out: list[dict[str, object]] = []
    for _ in range(n):
        fresh: list[int] = []
        while len(fresh) < 2 * INDUCTION_LENGTH:
            t = rng.randrange(tokenizer.d_vocab)
            if t not in special and t not in fresh:
                fresh.append(t)
        a, b = fresh[:INDUCTION_LENGTH], fresh[INDUCTION_LENGTH:]
        repeat = a[:INDUCTION_REPEAT]
        out.append(
            {
                "prompt_ids": a + repeat,
                "target_ids": [a[INDUCTION_REPEAT]],
                "distractor_ids": [b[INDUCTION_REPEAT]],
                "corrupted_ids": a + b[:INDUCTION_REPEAT],
            }
        )
    return out


def _capitals(rng: random.Random, n: int, tokenizer: Tokenizer) -> list[dict[str, object]]:
    def tokens(text: str) -> int:
        return len(tokenizer.encode(text))

    held = sorted(heldout_capital_adjacencies())
    order = [held[i % len(held)] for i in range(n)]
    rng.shuffle(order)
    out: list[dict[str, object]] = []
    for prev, nxt in order:
        (cap_a, country_a), (cap_b, country_b) = CAPITALS[prev], CAPITALS[nxt]
        others = [
            (cap, country)
            for cap, country in CAPITALS
            if country not in (country_a, country_b) and tokens(f" {cap}") == tokens(f" {cap_b}")
        ]
        cap_c, country_c = rng.choice(others)
        tokenizer.single_token(f" {country_b}", "country")
        tokenizer.single_token(f" {country_c}", "country")
        out.append(
            {
                "prompt": f"{cap_a}, {country_a}. {cap_b},",
                "target": f" {country_b}",
                "distractor": f" {country_c}",
                "corrupted": f"{cap_a}, {country_a}. {cap_c},",
            }
        )
    return out
