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

Every file is written to a temporary name of its own (`state.npz.PID.RANDOM.tmp`) and renamed
into place, so a killed scan leaves either a whole checkpoint or none (a stray `*.tmp` is deleted
on restart). A restarted scan skips every shard in the state or in a shard file; a finished scan
(`complete` in scan.json) is left untouched.

One writer at a time: `locked(out)` holds an advisory lock (`flock`) on DIR/scan.lock, which
names its holder (pid, start time, command: `tdb scan` or `tdb explain`) for the run that is
refused. The kernel drops the lock when its process dies, so a killed scan's lock file blocks
nothing; a scan that ends deletes it.

A checkpoint that does not load (a torn or overwritten zip, a CRC error, missing arrays, wrong
shapes or types) is a `TdbError` saying which file to delete: the shards it held are scanned
again, and the other checkpoints stay valid (a shard file is a shard's own partial; the state
is a prefix, so deleting it only means rescanning that prefix).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from tdb.errors import TdbError
from tdb.scan.partial import Layout, ScanPartial

MANIFEST = "scan.json"
EXAMPLES = "examples.parquet"
STATS = "stats.parquet"
SHARDS = "shards"
STATE = "state.npz"
LOCK = "scan.lock"
FORMAT_VERSION = 1


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """`write(file)` into a temporary file of this process's own next to `path`, flushed to disk,
    then renamed onto `path`: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with tmp.open("xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _make_folder(out: Path, flag: str = "--out") -> bool:
    """Create `out` if needed; whether it was created."""
    try:
        out.mkdir(parents=True)
        return True
    except FileExistsError:
        if not out.is_dir():
            raise TdbError(f"{flag} {out} is a file, not a folder") from None
        return False
    except OSError as e:
        raise TdbError(f"{flag} {out}: cannot create the folder ({e.strerror or e})") from None


def _lock_holder(fd: int) -> str:
    """Who holds the lock, from its file: "`tdb explain` (pid 7, started ...)". A lock file
    without a command is a scan's (written before lock files named their command)."""
    holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
    if not holder:
        return "process (it is starting)"
    details, tick, command = holder.partition(", `")
    if not tick:
        return f"scan ({holder})"
    return f"`{command.rstrip('`')}` ({details})"


@contextlib.contextmanager
def locked(out: Path, command: str = "tdb scan", flag: str = "--out") -> Iterator[None]:
    """Hold the scan lock of folder `out` (created if needed) while the block runs, as
    `command`; a TdbError naming the holder if another process holds it (`flag` names the
    folder's option in messages).

    >>> with locked(Path("out")):
    ...     ...  # the only scan writing to out/
    """
    created = _make_folder(out, flag)
    path = out / LOCK
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise TdbError(
                f"{flag} {out}: cannot write its lock file ({e.strerror or e})"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise TdbError(
                f"{flag} {out} is in use by another {holder}: wait for it to finish, "
                "or choose another folder"
            ) from None
        except OSError as e:  # a file system without flock
            os.close(fd)
            raise TdbError(f"{flag} {out}: cannot lock {path} ({e.strerror or e})") from None
        # The holder deletes the file before it lets go: if that happened between our open and
        # our flock, we hold the lock of a deleted file, and must lock the new one.
        try:
            here = os.stat(path)
        except FileNotFoundError:
            here = None
        mine = os.fstat(fd)
        if here is not None and (here.st_ino, here.st_dev) == (mine.st_ino, mine.st_dev):
            break
        os.close(fd)
    try:
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, started {started}, `{command}`\n".encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)
        with contextlib.suppress(OSError):  # a scan that failed before writing anything
            if created and not any(out.iterdir()):
                out.rmdir()  # leaves no folder behind


def shard_path(out: Path, index: int) -> Path:
    return out / SHARDS / f"shard-{index:06d}.npz"


def read_manifest(out: Path) -> dict[str, Any] | None:
    path = out / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_bytes())
    except ValueError as e:  # not JSON, or not UTF-8
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
    _make_folder(out)
    manifest = read_manifest(out)
    if manifest is None:
        if any(p.name != LOCK for p in out.iterdir()):
            raise TdbError(f"--out {out} is not empty and holds no scan: choose a new folder")
        manifest = {"format_version": FORMAT_VERSION, "identity": identity, "complete": False}
        write_manifest(out, manifest)
    elif manifest.get("identity") != identity:
        old = manifest.get("identity")
        old = old if isinstance(old, dict) else {}
        differ = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
        raise TdbError(
            f"--out {out} holds a scan with other settings ({', '.join(differ)} differ): "
            "resume with the same ones, or choose a new folder"
        )
    (out / SHARDS).mkdir(exist_ok=True)
    for stray in [*out.glob("*.tmp"), *(out / SHARDS).glob("*.tmp")]:
        stray.unlink()  # a file a killed scan did not finish writing (we hold the lock)
    return manifest


def _save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    def write(f: BinaryIO) -> None:
        np.savez(f, **arrays)  # type: ignore[arg-type]  # numpy's stub misreads **kwargs

    atomic_write(path, write)


class _CorruptError(Exception):
    """A checkpoint that does not load; turned into a TdbError with the way to recover."""


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    try:
        # Our own file object: np.load leaks its own when the zip does not open.
        with path.open("rb") as file, np.load(file, allow_pickle=False) as f:
            if not isinstance(f, np.lib.npyio.NpzFile):
                raise _CorruptError("not an .npz archive")
            return dict(f.items())
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        raise _CorruptError(str(e).strip() or type(e).__name__) from None


def _load_arrays(path: Path, layout: Layout, recovery: str) -> dict[str, np.ndarray]:
    """The arrays of a checkpoint, checked against `layout`; a TdbError saying how to recover
    if it does not load or does not match."""
    try:
        arrays = _read_arrays(path)
        missing = sorted(layout.keys() - arrays.keys())
        if missing:
            raise _CorruptError(f"{len(missing)} arrays missing, {missing[0]} first")
        for name, (shape, dtype) in layout.items():
            got = arrays[name]
            if (got.shape, got.dtype) != (shape, dtype):
                raise _CorruptError(
                    f"{name} is {got.dtype}{list(got.shape)}, not {dtype}{list(shape)}"
                )
    except _CorruptError as e:
        raise _corrupt_error(path, str(e), recovery) from None
    return arrays


def _corrupt_error(path: Path, why: str, recovery: str) -> TdbError:
    folder = path.parent if path.name == STATE else path.parent.parent
    return TdbError(
        f"{path} is corrupt ({why}): delete {path} and run the scan again ({recovery}), "
        f"or delete {folder} to start over"
    )


def save_shard(out: Path, index: int, arrays: dict[str, np.ndarray]) -> None:
    _save_arrays(shard_path(out, index), arrays)


def load_shard(out: Path, index: int, names: list[str], layout: Layout) -> ScanPartial:
    arrays = _load_arrays(shard_path(out, index), layout, f"it rescans shard {index}")
    return ScanPartial.from_arrays(arrays, names)


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


def load_state(out: Path, names: list[str], layout: Layout) -> tuple[ScanPartial, int] | None:
    """The saved prefix state and how many shards it holds, or None."""
    if not (out / STATE).is_file():
        return None
    prefix_layout = layout | {"prefix_shards": ((), np.dtype(np.int64))}
    recovery = "it rescans the shards the state held and keeps the shard files"
    arrays = _load_arrays(out / STATE, prefix_layout, recovery)
    prefix = int(arrays["prefix_shards"])
    if prefix < 1:
        raise _corrupt_error(out / STATE, f"it says it holds {prefix} shards", recovery)
    return ScanPartial.from_arrays(arrays, names), prefix
