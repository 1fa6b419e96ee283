"""Documents -> token windows -> shards, the unit of work (and of checkpointing) of a scan.

    >>> for shard in shards(read_corpus(path), tokenizer, window=64, shard_windows=512, context=16):
    ...     shard.tokens  # [window_count context+window]: left context, then the window, then 0s

A document's tokens are cut into consecutive windows of `window` tokens (the last one shorter).
Each window runs with up to `context` tokens of its document before it as **left context**: they
are run, so the window's first tokens see what precedes them, but never ranked (no example, no
statistic comes from them). The first window of a document has no left context. Without it, a
window's first token can attend only to itself, and heads' top examples piled up there.

A shard is a run of whole documents: it closes at the first document boundary after it holds
`shard_windows` windows. Shard boundaries depend only on the corpus, the tokenizer and the
two sizes, so a resumed or distributed scan cuts exactly the same shards.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
from jaxtyping import Int

from tdb.scan.corpus import Document
from tdb.tokens import Tokenizer


@dataclass(frozen=True)
class Shard:
    """Windows of consecutive documents, in (doc_id, start) order."""

    index: int
    tokens: Int[np.ndarray, "window_count run"]  # context[i] tokens, lengths[i] tokens, 0s
    lengths: Int[np.ndarray, " window_count"]  # tokens of each window (ranked), not context
    doc_ids: Int[np.ndarray, " window_count"]
    starts: Int[np.ndarray, " window_count"]  # token offset of the window in its document
    n_docs: int
    context: Int[np.ndarray, " window_count"]  # left-context tokens before each window

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())


def document_windows(token_ids: list[int], window: int) -> Iterator[tuple[int, list[int]]]:
    """(start, tokens) of each window of one document."""
    for start in range(0, len(token_ids), window):
        yield start, token_ids[start : start + window]


def left_context(token_ids: list[int], start: int, context: int) -> list[int]:
    """The (up to) `context` tokens before the window that starts at `start`."""
    return token_ids[max(0, start - context) : start]


def shards(
    documents: Iterable[Document],
    tokenizer: Tokenizer,
    window: int,
    shard_windows: int,
    context: int = 0,
) -> Iterator[Shard]:
    """The corpus cut into shards of whole documents (see the module docstring)."""
    index = 0
    rows: list[tuple[int, int, list[int], list[int]]] = []  # (doc_id, start, context, tokens)
    n_docs = 0
    for doc in documents:
        n_docs += 1
        if doc.text:
            ids = tokenizer.encode(doc.text)
            rows += [
                (doc.doc_id, start, left_context(ids, start, context), w)
                for start, w in document_windows(ids, window)
            ]
        if len(rows) >= shard_windows:
            yield _make_shard(index, rows, window + context, n_docs)
            index, rows, n_docs = index + 1, [], 0
    if rows or n_docs:
        yield _make_shard(index, rows, window + context, n_docs)


def _make_shard(
    index: int, rows: list[tuple[int, int, list[int], list[int]]], run: int, n_docs: int
) -> Shard:
    tokens = np.zeros((len(rows), run), dtype=np.int64)
    for i, (_, _, ctx, ids) in enumerate(rows):
        tokens[i, : len(ctx) + len(ids)] = ctx + ids
    return Shard(
        index=index,
        tokens=tokens,
        lengths=np.array([len(ids) for _, _, _, ids in rows], dtype=np.int64),
        doc_ids=np.array([r[0] for r in rows], dtype=np.int64),
        starts=np.array([r[1] for r in rows], dtype=np.int64),
        n_docs=n_docs,
        context=np.array([len(r[2]) for r in rows], dtype=np.int64),
    )
