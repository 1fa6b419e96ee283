"""The scan's result as Parquet: `examples.parquet` (one row per example) and `stats.parquet`
(one row per component). The schema is documented in docs/scan.md.

    >>> write_results(out, partial, sources, corpus, tokenizer, window=64)
    $ duckdb -c "SELECT * FROM 'out/examples.parquet' WHERE node_type = 'mlp_neuron' AND layer = 1
                 AND \"index\" = 7 ORDER BY rank"

One row group per component source (node type and layer), rows ordered by component, then
rank (the random sample, rank null, after the top examples), so a reader filtering on node type
and layer reads one row group.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tdb.scan.corpus import read_corpus
from tdb.scan.examples import EMPTY_DOC, Examples
from tdb.scan.partial import ScanPartial
from tdb.scan.sources import ComponentSource
from tdb.scan.windows import document_windows, left_context
from tdb.tokens import Tokenizer

EXAMPLES_SCHEMA = pa.schema(
    [
        ("node_type", pa.string()),
        ("layer", pa.int32()),
        ("index", pa.int32()),
        ("rank", pa.int32()),  # 0 = highest; null for the random sample
        ("activation", pa.float32()),  # the maximum over the window
        ("doc_id", pa.int64()),
        ("window_start", pa.int64()),  # token offset of the window in its document
        ("token_position", pa.int32()),  # where the maximum is, as an index into `tokens`
        ("tokens", pa.list_(pa.string())),
        ("activations", pa.list_(pa.float32())),
        ("site", pa.string()),  # SAE latents: the activation their SAE reads; else null
        ("context_tokens", pa.list_(pa.string())),  # left context run before `tokens`, unranked
    ]
)

STATS_SCHEMA = pa.schema(
    [
        ("node_type", pa.string()),
        ("layer", pa.int32()),
        ("index", pa.int32()),
        ("count", pa.int64()),  # tokens
        ("mean", pa.float64()),
        ("variance", pa.float64()),  # population variance
        ("max", pa.float32()),
        ("site", pa.string()),  # SAE latents: the activation their SAE reads; else null
    ]
)


def _window_key(doc_id: np.ndarray, start: np.ndarray) -> np.ndarray:
    out: np.ndarray = (doc_id << np.int64(32)) | start
    return out


class WindowTokens:
    """The token ids of the windows that examples point at, read back from the corpus (the
    partials keep only (doc_id, start); tokenizing again costs little next to the forward)."""

    def __init__(
        self,
        corpus: Path,
        tokenizer: Tokenizer,
        window: int,
        keys: np.ndarray,
        context: int = 0,
    ) -> None:
        self.keys = np.unique(keys)  # sorted
        self.tokens = np.zeros((len(self.keys), window), dtype=np.int64)  # [window_row window]
        self.lengths = np.zeros(len(self.keys), dtype=np.int64)
        # The left context run before each window (`tdb.scan.windows.left_context`).
        self.context = np.zeros((len(self.keys), context), dtype=np.int64)  # [window_row context]
        self.context_lengths = np.zeros(len(self.keys), dtype=np.int64)
        wanted = set(self.keys.tolist())
        docs = {key >> 32 for key in wanted}
        found = 0
        for doc in read_corpus(corpus):
            if doc.doc_id not in docs:
                continue
            doc_ids = tokenizer.encode(doc.text)
            for start, ids in document_windows(doc_ids, window):
                key = (doc.doc_id << 32) | start
                if key in wanted:
                    row = int(np.searchsorted(self.keys, key))
                    self.tokens[row, : len(ids)] = ids
                    self.lengths[row] = len(ids)
                    ctx = left_context(doc_ids, start, context)
                    self.context[row, : len(ctx)] = ctx
                    self.context_lengths[row] = len(ctx)
                    found += 1
        if found != len(self.keys):
            missing = len(self.keys) - found
            raise RuntimeError(f"{missing} example windows are no longer in {corpus}")

    def rows(self, keys: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.keys, keys)


def _flat_rows(examples: list[Examples]) -> dict[str, np.ndarray]:
    """Top and sample side by side per component, then flattened: [component, 2k] -> rows."""
    cat = {
        name: np.concatenate([getattr(e, name).numpy() for e in examples], axis=1)
        for name in ("activation", "token_position", "doc_id", "start")
    }
    values = np.concatenate([e.values.numpy() for e in examples], axis=1)  # [comp 2k window]
    n_components, width = cat["doc_id"].shape
    k = examples[0].doc_id.shape[1]
    rank = np.tile(np.arange(width, dtype=np.int32), (n_components, 1))
    index = np.repeat(np.arange(n_components, dtype=np.int32)[:, None], width, axis=1)
    filled = cat["doc_id"] != EMPTY_DOC
    rows = {name: v[filled] for name, v in cat.items()}
    rows |= {"rank": rank[filled], "index": index[filled], "is_top": (rank < k)[filled]}
    rows["values"] = values[filled]  # [row window]
    return rows


def _list_array(flat: pa.Array, lengths: np.ndarray) -> pa.Array:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), flat)


def _site(source: ComponentSource, n: int) -> pa.Array:
    return pa.array([None if source.site is None else str(source.site)] * n, pa.string())


def examples_table(
    source: ComponentSource, partial: ScanPartial, windows: WindowTokens, vocab: pa.Array
) -> pa.Table:
    part = partial.sources[source.name]
    rows = _flat_rows([part.top.ordered(), part.sample.ordered()])
    keys = _window_key(rows["doc_id"], rows["start"])
    window_rows = windows.rows(keys)
    lengths = windows.lengths[window_rows]
    valid = np.arange(rows["values"].shape[1])[None, :] < lengths[:, None]  # [row window]
    flat_ids = windows.tokens[window_rows][valid]
    context_lengths = windows.context_lengths[window_rows]
    in_context = np.arange(windows.context.shape[1])[None, :] < context_lengths[:, None]
    flat_context = windows.context[window_rows][in_context]
    n = len(keys)
    return pa.table(
        {
            "node_type": pa.array([str(source.node_type)] * n, pa.string()),
            "layer": pa.array(np.full(n, source.layer, dtype=np.int32)),
            "index": pa.array(rows["index"]),
            "rank": pa.array(rows["rank"], mask=~rows["is_top"]),
            "activation": pa.array(rows["activation"].astype(np.float32)),
            "doc_id": pa.array(rows["doc_id"]),
            "window_start": pa.array(rows["start"]),
            "token_position": pa.array(rows["token_position"].astype(np.int32)),
            "tokens": _list_array(vocab.take(pa.array(flat_ids)), lengths),
            "activations": _list_array(pa.array(rows["values"][valid].astype(np.float32)), lengths),
            "site": _site(source, n),
            "context_tokens": _list_array(vocab.take(pa.array(flat_context)), context_lengths),
        },
        schema=EXAMPLES_SCHEMA,
    )


def stats_table(source: ComponentSource, partial: ScanPartial) -> pa.Table:
    moments = partial.sources[source.name].moments
    n = source.n_components
    return pa.table(
        {
            "node_type": pa.array([str(source.node_type)] * n, pa.string()),
            "layer": pa.array(np.full(n, source.layer, dtype=np.int32)),
            "index": pa.array(np.arange(n, dtype=np.int32)),
            "count": pa.array(moments.count.numpy()),
            "mean": pa.array(moments.mean.numpy()),
            "variance": pa.array(moments.variance.numpy()),
            "max": pa.array(moments.max.numpy().astype(np.float32)),
            "site": _site(source, n),
        },
        schema=STATS_SCHEMA,
    )


def vocabulary(tokenizer: Tokenizer, used: np.ndarray) -> pa.Array:
    """The text of every token id in `used` (others ""), as an Arrow array to `take` from;
    decoding one id at a time is slow, so only those that occur."""
    texts = [""] * tokenizer.d_vocab
    ids = np.unique(used).tolist()
    if tokenizer.inner is None:
        decoded = [tokenizer.token_text(i) for i in ids]
    else:  # one call instead of one per id; the same as token_text
        decoded = tokenizer.inner.decode_batch([[i] for i in ids], skip_special_tokens=False)
    for token_id, text in zip(ids, decoded, strict=True):
        texts[token_id] = text
    return pa.array(texts, pa.string())


def write_results(
    out: Path,
    partial: ScanPartial,
    sources: list[ComponentSource],
    corpus: Path,
    tokenizer: Tokenizer,
    window: int,
    context: int = 0,
) -> None:
    """Write examples.parquet and stats.parquet into `out`, each by rename from a temporary."""
    from tdb.scan.out_folder import EXAMPLES, STATS

    keys = [
        _window_key(e.doc_id.numpy(), e.start.numpy())[e.doc_id.numpy() != EMPTY_DOC]
        for part in partial.sources.values()
        for e in (part.top, part.sample)
    ]
    windows = WindowTokens(
        corpus, tokenizer, window, np.concatenate([np.zeros(0, np.int64), *keys]), context
    )
    in_windows = np.arange(window)[None, :] < windows.lengths[:, None]
    in_context = np.arange(context)[None, :] < windows.context_lengths[:, None]
    used = np.concatenate([windows.tokens[in_windows], windows.context[in_context]])
    vocab = vocabulary(tokenizer, used)
    _write(
        out / EXAMPLES,
        EXAMPLES_SCHEMA,
        (examples_table(s, partial, windows, vocab) for s in sources),
    )
    _write(out / STATS, STATS_SCHEMA, (stats_table(s, partial) for s in sources))


def _write(path: Path, schema: pa.Schema, tables: Iterable[pa.Table]) -> None:
    from tdb.scan.out_folder import atomic_write

    # Column statistics (min / max, for readers' filters) on the scalar columns only: on the
    # token lists they cost a third of the write and no reader filters on them.
    scalar = [f.name for f in schema if not pa.types.is_list(f.type)]

    def write(f: BinaryIO) -> None:
        with pq.ParquetWriter(f, schema, write_statistics=scalar) as writer:
            for table in tables:
                writer.write_table(table)

    atomic_write(path, write)
