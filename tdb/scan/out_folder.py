"""The output folder of a scan: its files, its manifest, and the saved state that makes a scan
resumable.

    DIR/scan.json                settings, corpus fingerprint, and (once finished) totals
    DIR/state.npz                the merged partial result of shards 0..n-1 (a prefix)
    DIR/shards/shard-000007.npz  a finished shard not yet in the prefix (Ray finishes out of order)
    DIR/examples.parquet         the result (written last), and DIR/stats.parquet

Once the result and the `complete` manifest are written, state.npz is deleted (it is as large
as the examples, and a finished scan is never merged again).

Shards are merged into the state strictly in shard order (later ones wait as shard files), so
the statistics, whose float64 merge is associative only up to rounding, come out bit-identical
however the shards were run; and the folder holds one state plus at most a few shard files,
not one checkpoint per shard.

Every file is written to a temporary name and renamed into place, so a killed scan leaves either
a whole checkpoint or none (a stray `*.tmp` is deleted on restart). A restarted scan skips every
shard in the state or in a shard file; a finished scan (`complete` in scan.json) is left
untouched.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from tdb.errors import TdbError
from tdb.scan.partial import ScanPartial

MANIFEST = "scan.json"
EXAMPLES = "examples.parquet"
STATS = "stats.parquet"
SHARDS = "shards"
STATE = "state.npz"
FORMAT_VERSION = 1


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """`write(file)` into path.tmp, flushed to disk, then renamed onto `path`."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def shard_path(out: Path, index: int) -> Path:
    return out / SHARDS / f"shard-{index:06d}.npz"


def read_manifest(out: Path) -> dict[str, Any] | None:
    path = out / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TdbError(
            f"{path}: not valid JSON ({e}); is --out another program's folder?"
        ) from None
    if not isinstance(manifest, dict):
        raise TdbError(f"{path}: not a scan manifest")
    return manifest


def write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    text = (json.dumps(manifest, indent=2) + "\n").encode()
    atomic_write(out / MANIFEST, lambda f: f.write(text))


def open_out(out: Path, identity: dict[str, Any]) -> dict[str, Any]:
    """Create or reopen the folder of a scan with this identity (settings + corpus); refuses a
    folder that holds a different scan. Returns the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(out)
    if manifest is None:
        if any(out.iterdir()):
            raise TdbError(f"--out {out} is not empty and holds no scan: choose a new folder")
        manifest = {"format_version": FORMAT_VERSION, "identity": identity, "complete": False}
        write_manifest(out, manifest)
    elif manifest.get("identity") != identity:
        old = manifest.get("identity", {})
        differ = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
        raise TdbError(
            f"--out {out} holds a scan with other settings ({', '.join(differ)} differ): "
            "resume with the same ones, or choose a new folder"
        )
    (out / SHARDS).mkdir(exist_ok=True)
    for stray in (out / SHARDS).glob("*.tmp"):
        stray.unlink()  # a checkpoint a killed scan did not finish writing
    return manifest


def _save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    def write(f: BinaryIO) -> None:
        np.savez(f, **arrays)  # type: ignore[arg-type]  # numpy's stub misreads **kwargs

    atomic_write(path, write)


def _load_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return dict(f.items())


def save_shard(out: Path, index: int, arrays: dict[str, np.ndarray]) -> None:
    _save_arrays(shard_path(out, index), arrays)


def load_shard(out: Path, index: int, names: list[str]) -> ScanPartial:
    return ScanPartial.from_arrays(_load_arrays(shard_path(out, index)), names)


def shard_files(out: Path) -> list[int]:
    return sorted(int(p.stem.removeprefix("shard-")) for p in (out / SHARDS).glob("shard-*.npz"))


def save_state(out: Path, state: ScanPartial, n_shards: int) -> None:
    """The merge of shards 0..n_shards-1; then their shard files are no longer needed."""
    arrays = state.to_arrays() | {"prefix_shards": np.array(n_shards, dtype=np.int64)}
    _save_arrays(out / STATE, arrays)
    for index in shard_files(out):
        if index < n_shards:
            shard_path(out, index).unlink()


def drop_state(out: Path) -> None:
    (out / STATE).unlink(missing_ok=True)


def load_state(out: Path, names: list[str]) -> tuple[ScanPartial, int] | None:
    """The saved prefix state and how many shards it holds, or None."""
    if not (out / STATE).is_file():
        return None
    arrays = _load_arrays(out / STATE)
    return ScanPartial.from_arrays(arrays, names), int(arrays["prefix_shards"])
