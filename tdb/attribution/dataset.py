"""Datasets of prompt pairs for task-level attribution: one JSON object a line (JSONL).

    {"prompt": "When Mary and John went to the store, John gave a drink to",
     "target": " Mary", "distractor": " John",
     "corrupted": "When Mary and John went to the store, David gave a drink to"}

Each text field has a token-id twin (`prompt_ids`, `target_ids`, `distractor_ids`,
`corrupted_ids`); give one of the two. `target` and `distractor` are one token each, or a list of
one-token alternatives (the metric averages their logits). `distractor` is optional (the metric
is then log p(target), `--logprob`); `corrupted` is optional and has exactly as many tokens as
`prompt`. `meta` may hold anything (the generators of `tdb task` record the template there).
Every mistake is a TdbError naming the line.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tdb.errors import TdbError
from tdb.tokens import Tokenizer

FIELDS = ("prompt", "target", "distractor", "corrupted")
KEYS = frozenset({*FIELDS, *(f"{f}_ids" for f in FIELDS), "meta"})


@dataclass(frozen=True)
class PromptPair:
    """One line of a dataset, tokenized: the clean prompt, its corrupted twin (or None), and the
    one-token target and distractor alternatives at the last token."""

    tokens: tuple[int, ...]
    target: tuple[int, ...]
    distractor: tuple[int, ...]  # empty: no distractor (the metric is then log p(target))
    corrupted: tuple[int, ...] | None
    line: int  # 1-based, for error messages


@dataclass(frozen=True)
class Dataset:
    """The prompt pairs of one dataset, checked against one model's tokenizer and context."""

    pairs: tuple[PromptPair, ...]
    source: str

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def has_corrupted(self) -> bool:
        return any(p.corrupted is not None for p in self.pairs)

    @property
    def has_distractor(self) -> bool:
        return all(p.distractor for p in self.pairs)

    @property
    def same_length(self) -> bool:
        return len({len(p.tokens) for p in self.pairs}) == 1


def load_dataset(path: str | Path, tokenizer: Tokenizer, n_ctx: int) -> Dataset:
    """The JSONL file at `path`, parsed and checked (`-` reads standard input)."""
    if str(path) == "-":
        import sys

        return parse_lines(sys.stdin.read().splitlines(), tokenizer, n_ctx, "<stdin>")
    file = Path(path)
    if not file.is_file():
        raise TdbError(f"dataset {str(path)!r}: no such file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise TdbError(f"dataset {str(path)!r}: not UTF-8 text") from None
    return parse_lines(text.splitlines(), tokenizer, n_ctx, str(path))


def parse_lines(lines: Iterable[str], tokenizer: Tokenizer, n_ctx: int, source: str) -> Dataset:
    """JSONL lines (blank ones skipped) as a checked dataset."""
    records: list[tuple[int, object]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as e:
            raise TdbError(f"{source} line {number}: not JSON ({e.msg})") from None
    return dataset_from_records(records, tokenizer, n_ctx, source)


def dataset_from_records(
    records: Sequence[object], tokenizer: Tokenizer, n_ctx: int, source: str = "dataset"
) -> Dataset:
    """Records (dicts, or (line number, dict) pairs) as a checked dataset."""
    numbered: list[tuple[int, object]] = [
        (r[0], r[1]) if isinstance(r, tuple) and len(r) == 2 and isinstance(r[0], int) else (i, r)
        for i, r in enumerate(records, start=1)
    ]
    if not numbered:
        raise TdbError(f"{source}: the dataset is empty (one JSON object a line, see docs)")
    pairs = tuple(_pair(record, number, tokenizer, n_ctx, source) for number, record in numbered)
    return Dataset(pairs, source)


def _pair(record: object, line: int, tokenizer: Tokenizer, n_ctx: int, source: str) -> PromptPair:
    where = f"{source} line {line}"
    if not isinstance(record, Mapping):
        raise TdbError(f"{where}: expected a JSON object, got {type(record).__name__}")
    unknown = sorted(set(map(str, record)) - KEYS)
    if unknown:
        raise TdbError(
            f"{where}: unknown field {unknown[0]!r} (allowed: {', '.join(sorted(KEYS))})"
        )
    tokens = _tokens(record, "prompt", where, tokenizer, required=True)
    assert tokens is not None
    if len(tokens) > n_ctx:
        raise TdbError(
            f"{where}: the prompt has {len(tokens)} tokens, more than the context {n_ctx}"
        )
    corrupted = _tokens(record, "corrupted", where, tokenizer, required=False)
    if corrupted is not None and len(corrupted) != len(tokens):
        raise TdbError(
            f"{where}: corrupted has {len(corrupted)} tokens, prompt has {len(tokens)}: "
            "a corrupted prompt must have the same token count"
        )
    target = _answers(record, "target", where, tokenizer, required=True)
    distractor = _answers(record, "distractor", where, tokenizer, required=False)
    return PromptPair(tokens, target, distractor, corrupted, line)


def _field(
    record: Mapping[str, object], name: str, where: str, required: bool
) -> tuple[str, object] | None:
    """The value of `name` or `name_ids` (not both); None when absent and not required."""
    text, ids = record.get(name), record.get(f"{name}_ids")
    if text is not None and ids is not None:
        raise TdbError(f"{where}: give {name} or {name}_ids, not both")
    if text is None and ids is None:
        if required:
            raise TdbError(f"{where}: missing {name!r} (or {name}_ids)")
        return None
    return ("text", text) if text is not None else ("ids", ids)


def _tokens(
    record: Mapping[str, object], name: str, where: str, tokenizer: Tokenizer, required: bool
) -> tuple[int, ...] | None:
    found = _field(record, name, where, required)
    if found is None:
        return None
    kind, value = found
    if kind == "text":
        if not isinstance(value, str):
            raise TdbError(f"{where}: {name} must be text, got {value!r}")
        # A text prompt starts with the BOS when the tokenizer adds one, as `tdb nodes`'s does
        # (Llama, Gemma; not GPT-2 or the demo model); ids are taken as given.
        ids = tokenizer.encode(value)
        if ids:
            ids = [*tokenizer.bos, *ids]
    else:
        ids = _id_list(value, f"{where}: {name}_ids", tokenizer)
    if not ids:
        raise TdbError(f"{where}: {name} has no tokens")
    return tuple(ids)


def _answers(
    record: Mapping[str, object], name: str, where: str, tokenizer: Tokenizer, required: bool
) -> tuple[int, ...]:
    found = _field(record, name, where, required)
    if found is None:
        return ()
    kind, value = found
    if kind == "ids":
        ids = _id_list(
            [value] if isinstance(value, int) else value, f"{where}: {name}_ids", tokenizer
        )
        if not ids:
            raise TdbError(f"{where}: {name}_ids is empty")
        return tuple(ids)
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise TdbError(f"{where}: {name} must be text or a non-empty list of texts, got {value!r}")
    out = []
    for text in texts:
        ids = tokenizer.encode(text)
        if len(ids) != 1:
            raise TdbError(
                f"{where}: {name} {text!r} is {len(ids)} tokens; each must be exactly one token "
                f"(mind the leading space, e.g. ' Mary'), or give {name}_ids"
            )
        out.append(ids[0])
    return tuple(out)


def _id_list(value: object, what: str, tokenizer: Tokenizer) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    ):
        raise TdbError(f"{what}: expected a list of token ids, got {value!r}")
    return [tokenizer.check_id(t, what) for t in value]
