"""A finished scan read back for explaining: per component its examples as token codes and
activations, split deterministically into the half that explains and the half that scores.

Token texts are turned into integer codes once for the whole scan (`vocab[code]` is the text),
so the evidence and the simulator work on numpy arrays, not strings.

The split: top examples of even rank explain, odd rank are held out; the random sample in file
order alternates the same way, and a held-out sample window that is also an explaining top
window is dropped (it was seen).
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from tdb.errors import TdbError
from tdb.scan import out_folder

ComponentKey = tuple[str, int, int, str | None]  # node_type, layer, index, site


@dataclass(frozen=True)
class Windows:
    """Some example windows of one component: each window's token codes and activations."""

    codes: list[np.ndarray]  # per window [pos] int64
    acts: list[np.ndarray]  # per window [pos] float64
    labels: list[str]  # "top:3" or "sample:DOC:START"
    doc_start: list[tuple[int, int]]

    def flat(self) -> Flat:
        """Every token of the windows, concatenated."""
        if not self.codes:
            empty = np.zeros(0, dtype=np.int64)
            return Flat(empty, empty, np.zeros(0), empty, np.zeros(0, dtype=bool))
        prev = [np.concatenate([[-1], c[:-1]]) for c in self.codes]
        return Flat(
            np.concatenate(self.codes),
            np.concatenate(prev).astype(np.int64),
            np.concatenate(self.acts),
            np.concatenate([np.arange(len(c)) for c in self.codes]),
            np.concatenate([_seen_before(c) for c in self.codes]),
        )


def _seen_before(codes: np.ndarray) -> np.ndarray:
    """Per token, whether the same token occurs earlier in its window."""
    _, first = np.unique(codes, return_index=True)
    seen = np.ones(len(codes), dtype=bool)
    seen[first] = False
    return seen


@dataclass(frozen=True)
class Flat:
    """Tokens of several windows side by side: what the evidence and the simulator read."""

    codes: np.ndarray  # [token] int64
    prev: np.ndarray  # [token] the previous token's code, -1 at a window's first token
    acts: np.ndarray  # [token] the component's activation
    pos: np.ndarray  # [token] position in the window
    repeat: np.ndarray  # [token] bool: the same token occurs earlier in the window


@dataclass(frozen=True)
class ComponentExamples:
    key: ComponentKey
    explain_top: Windows  # the top examples that explain (even ranks)
    explain: Windows  # explain_top and the explaining half of the random sample
    held_out: Windows  # what the score is measured on
    fingerprint: str  # changes when the component's examples change


@dataclass(frozen=True)
class ScanData:
    folder: Path
    identity: dict[str, Any]
    vocab: list[str]  # code -> token text
    corpus_counts: np.ndarray  # [code] token counts over the distinct random-sample windows
    components: list[ComponentExamples]


def check_scan(folder: Path) -> dict[str, Any]:
    """The manifest of the finished scan in `folder`, or a one-line TdbError naming it."""
    if not folder.is_dir():
        raise TdbError(f"--scan {folder}: no such folder (make one with `tdb scan --out DIR`)")
    manifest = out_folder.read_manifest(folder)
    if manifest is None:
        raise TdbError(f"--scan {folder}: holds no scan (no {out_folder.MANIFEST})")
    missing = [n for n in (out_folder.EXAMPLES, out_folder.STATS) if not (folder / n).is_file()]
    if not manifest.get("complete") or missing:
        raise TdbError(
            f"--scan {folder}: the scan is not finished "
            f"(run `tdb scan --out {folder}` with its settings again to finish it)"
        )
    identity = manifest.get("identity")
    if not isinstance(identity, dict):
        raise TdbError(f"--scan {folder}: {out_folder.MANIFEST} has no identity")
    return manifest


def _windows(rows: pd.DataFrame, codes: list[np.ndarray], acts: list[np.ndarray]) -> Windows:
    labels = [
        f"top:{int(r)}" if r == r else f"sample:{int(d)}:{int(s)}"  # r != r: NaN, the sample
        for r, d, s in zip(rows["rank"], rows["doc_id"], rows["window_start"], strict=True)
    ]
    return Windows(
        [codes[i] for i in rows.index],
        [acts[i] for i in rows.index],
        labels,
        list(zip(rows["doc_id"].tolist(), rows["window_start"].tolist(), strict=True)),
    )


def _split(
    rows: pd.DataFrame, codes: list[np.ndarray], acts: list[np.ndarray]
) -> tuple[Windows, Windows, Windows]:
    top = rows[rows["rank"].notna()].sort_values("rank")
    sample = rows[rows["rank"].isna()]
    top_explain, top_held = top[top["rank"] % 2 == 0], top[top["rank"] % 2 == 1]
    sample_explain, sample_held = sample.iloc[0::2], sample.iloc[1::2]
    seen = set(zip(top_explain["doc_id"], top_explain["window_start"], strict=True))
    keep = [
        (d, s) not in seen
        for d, s in zip(sample_held["doc_id"], sample_held["window_start"], strict=True)
    ]
    sample_held = sample_held[keep]
    return (
        _windows(top_explain, codes, acts),
        _windows(pd.concat([top_explain, sample_explain]), codes, acts),
        _windows(pd.concat([top_held, sample_held]), codes, acts),
    )


def _fingerprint(rows: pd.DataFrame, acts: list[np.ndarray]) -> str:
    h = hashlib.blake2b(digest_size=8)
    for column in ("rank", "doc_id", "window_start"):
        h.update(rows[column].to_numpy(dtype=np.float64, na_value=-1).tobytes())
    for i in rows.index:
        h.update(acts[i].astype(np.float32).tobytes())
    return h.hexdigest()


def component_keys(frame: pd.DataFrame) -> Iterator[tuple[ComponentKey, pd.DataFrame]]:
    site = frame["site"].astype(object).where(frame["site"].notna(), None)
    groups = frame.assign(site_key=site.fillna("")).groupby(
        ["node_type", "layer", "index", "site_key"], sort=True
    )
    for group, rows in groups:
        node_type, layer, index, site_key = cast(tuple[str, int, int, str], group)
        yield (str(node_type), int(layer), int(index), str(site_key) or None), rows


def read_scan(folder: Path, node_types: set[str]) -> ScanData:
    """The examples of every component of these node types in the finished scan at `folder`.

    >>> data = read_scan(Path("scan_dir"), {"mlp_neuron"})
    """
    manifest = check_scan(folder)
    table = pq.read_table(folder / out_folder.EXAMPLES)
    frame = table.select(["node_type", "layer", "index", "rank", "doc_id", "window_start", "site"])
    frame_pd = frame.to_pandas()
    tokens = table.column("tokens").combine_chunks()
    flat_codes, vocab = pd.factorize(tokens.flatten().to_numpy(zero_copy_only=False))
    offsets = tokens.offsets.to_numpy()
    flat_acts = table.column("activations").combine_chunks().flatten().to_numpy()
    codes = [flat_codes[a:b].astype(np.int64) for a, b in itertools.pairwise(offsets)]
    acts = [flat_acts[a:b].astype(np.float64) for a, b in itertools.pairwise(offsets)]
    # Token frequencies of the corpus, estimated on the distinct windows of the random samples.
    counts = np.zeros(len(vocab), dtype=np.int64)
    sample = frame_pd[frame_pd["rank"].isna()].drop_duplicates(["doc_id", "window_start"])
    for i in sample.index:
        counts += np.bincount(codes[i], minlength=len(vocab))
    components = []
    for key, rows in component_keys(frame_pd[frame_pd["node_type"].isin(node_types)]):
        explain_top, explain, held_out = _split(rows, codes, acts)
        components.append(
            ComponentExamples(key, explain_top, explain, held_out, _fingerprint(rows, acts))
        )
    return ScanData(folder, manifest["identity"], list(vocab), counts, components)
