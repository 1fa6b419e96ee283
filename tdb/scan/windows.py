"""Documents -> token windows -> shards, the unit of work (and of checkpointing) of a scan.

    >>> for shard in shards(read_corpus(path), tokenizer, window=64, shard_windows=512):
    ...     shard.tokens  # [window_count window], padded with 0 past each window's length

A document's tokens are cut into consecutive windows of `window` tokens (the last one shorter);
each window is run from position 0, so tokens late in a long document see only their window as
context. A shard is a run of whole documents: it closes at the first document boundary after it
holds `shard_windows` windows. Shard boundaries depend only on the corpus, the tokenizer and the
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
    tokens: Int[np.ndarray, "window_count window"]  # padded with 0 past `lengths`
    lengths: Int[np.ndarray, " window_count"]
    doc_ids: Int[np.ndarray, " window_count"]
    starts: Int[np.ndarray, " window_count"]  # token offset of the window in its document
    n_docs: int

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())


def document_windows(token_ids: list[int], window: int) -> Iterator[tuple[int, list[int]]]:
    """(start, tokens) of each window of one document."""
    for start in range(0, len(token_ids), window):
        yield start, token_ids[start : start + window]


def shards(
    documents: Iterable[Document], tokenizer: Tokenizer, window: int, shard_windows: int
) -> Iterator[Shard]:
    """The corpus cut into shards of whole documents (see the module docstring)."""
    index = 0
    rows: list[tuple[int, int, list[int]]] = []  # (doc_id, start, tokens)
    n_docs = 0
    for doc in documents:
        n_docs += 1
        if doc.text:
            ids = tokenizer.encode(doc.text)
            rows += [(doc.doc_id, start, w) for start, w in document_windows(ids, window)]
        if len(rows) >= shard_windows:
            yield _make_shard(index, rows, window, n_docs)
            index, rows, n_docs = index + 1, [], 0
    if rows or n_docs:
        yield _make_shard(index, rows, window, n_docs)


def _make_shard(
    index: int, rows: list[tuple[int, int, list[int]]], window: int, n_docs: int
) -> Shard:
    tokens = np.zeros((len(rows), window), dtype=np.int64)
    for i, (_, _, ids) in enumerate(rows):
        tokens[i, : len(ids)] = ids
    return Shard(
        index=index,
        tokens=tokens,
        lengths=np.array([len(ids) for _, _, ids in rows], dtype=np.int64),
        doc_ids=np.array([d for d, _, _ in rows], dtype=np.int64),
        starts=np.array([s for _, s, _ in rows], dtype=np.int64),
        n_docs=n_docs,
    )
