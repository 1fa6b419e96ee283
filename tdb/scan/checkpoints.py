"""The output folder of a scan, and its shard checkpoints: what makes a scan resumable.

    DIR/scan.json              settings, corpus fingerprint, and (once finished) totals
    DIR/shards/shard-000007.npz  the partial result of shard 7, written when the shard is done
    DIR/examples.parquet       the result (written last), and DIR/stats.parquet

Every file is written to a temporary name and renamed into place, so a killed scan leaves either
a whole checkpoint or none (a stray `*.tmp` is deleted on restart). A restarted scan skips the
shards that have a checkpoint; a finished scan (`complete` in scan.json) is left untouched.
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


def save_shard(out: Path, index: int, arrays: dict[str, np.ndarray]) -> None:
    def write(f: BinaryIO) -> None:
        np.savez(f, **arrays)  # type: ignore[arg-type]  # numpy's stub misreads **kwargs

    atomic_write(shard_path(out, index), write)


def load_shard(out: Path, index: int, names: list[str]) -> ScanPartial:
    with np.load(shard_path(out, index), allow_pickle=False) as f:
        return ScanPartial.from_arrays(dict(f.items()), names)


def finished_shards(out: Path) -> set[int]:
    return {int(p.stem.removeprefix("shard-")) for p in (out / SHARDS).glob("shard-*.npz")}
