"""A whole scan: corpus -> shards -> partial results (in-process or on Ray) -> Parquet.

    >>> result = scan(Path("corpus.txt"), Path("out"), ScanSettings(k=20, window=64))
    >>> result.n_tokens, result.out / "examples.parquet"

Shards are checkpointed as they finish (see `out_folder`); the result is always the fold of
all shard checkpoints in shard order, so an in-process run, a Ray run and a run resumed after a
kill write exactly the same records.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from tdb.checkpoint import LoadedModel, load_model
from tdb.device import dtype_name
from tdb.errors import TdbError
from tdb.sae import AttachedSae
from tdb.scan import out_folder
from tdb.scan.corpus import corpus_fingerprint, count_documents, read_corpus
from tdb.scan.output import write_results
from tdb.scan.partial import Bounds, Layout, ScanPartial, array_layout
from tdb.scan.shard import ScanSettings, scan_shard
from tdb.scan.sources import ComponentSource, scan_sources
from tdb.scan.windows import Shard, shards

# Test-only: SIGKILL (or SIGSTOP) this process right after it has checkpointed this many shards.
KILL_AFTER_SHARDS_ENV = "TDB_SCAN_TEST_KILL_AFTER_SHARDS"
STOP_AFTER_SHARDS_ENV = "TDB_SCAN_TEST_STOP_AFTER_SHARDS"

ShardDone = Callable[[Shard, dict[str, np.ndarray]], None]


@runtime_checkable  # so the tests' runtime type checker (beartype) can check isinstance
class Executor(Protocol):
    """Runs shards and hands each finished one's partial (as arrays) to `done`, in any order;
    `bounds()` gives the bounds of the examples merged so far, for the next shard."""

    def run(
        self,
        todo: Iterator[Shard],
        done: ShardDone,
        tokens_read: Callable[[int], None],
        bounds: Callable[[], Bounds | None],
    ) -> None: ...


@dataclass
class InProcess:
    """Shards one after the other in this process."""

    loaded: LoadedModel
    sources: list[ComponentSource]
    settings: ScanSettings
    saes: list[AttachedSae]

    def run(
        self,
        todo: Iterator[Shard],
        done: ShardDone,
        tokens_read: Callable[[int], None],
        bounds: Callable[[], Bounds | None],
    ) -> None:
        for shard in todo:
            model, sources, settings = self.loaded.model, self.sources, self.settings
            partial = scan_shard(model, sources, shard, settings, tokens_read, bounds(), self.saes)
            done(shard, partial.to_arrays())


class ShardMerge:
    """The merged prefix of finished shards plus finished shards waiting for their turn; every
    change is on disk before `add` returns (see `out_folder`)."""

    def __init__(self, out: Path, names: list[str]) -> None:
        self.out, self.names = out, names
        self.state: ScanPartial | None = None
        self.prefix = 0
        self.waiting: dict[int, ScanPartial] = {}

    @staticmethod
    def open(out: Path, names: list[str], layout: Layout) -> ShardMerge:
        """The merge saved in `out`; `layout` (`array_layout`) is what its checkpoints must hold."""
        merge = ShardMerge(out, names)
        saved = out_folder.load_state(out, names, layout)
        if saved is not None:
            merge.state, merge.prefix = saved
        for index in out_folder.shard_files(out):
            if index < merge.prefix:  # merged already; killed before its file was deleted
                out_folder.shard_path(out, index).unlink()
            else:
                merge.waiting[index] = out_folder.load_shard(out, index, names, layout)
        merge.advance()
        return merge

    def has(self, index: int) -> bool:
        return index < self.prefix or index in self.waiting

    def add(self, index: int, arrays: dict[str, np.ndarray]) -> None:
        partial = ScanPartial.from_arrays(arrays, self.names)
        if index != self.prefix:
            out_folder.save_shard(self.out, index, arrays)
        self.waiting[index] = partial
        self.advance()

    def advance(self) -> None:
        """Merge the waiting shards that continue the prefix, in order, and save the state."""
        start = self.prefix
        while self.prefix in self.waiting:
            partial = self.waiting.pop(self.prefix)
            if self.state is None:
                self.state = partial
            else:
                self.state.absorb_(partial)
            self.prefix += 1
        if self.prefix != start and self.state is not None:
            out_folder.save_state(self.out, self.state, self.prefix)


@dataclass(frozen=True)
class ScanResult:
    out: Path
    n_shards: int
    n_docs: int
    n_windows: int
    n_tokens: int
    shards_run: int  # by this call (0: everything was checkpointed already)


@runtime_checkable
class Progress(Protocol):
    def start(self, total_docs: int) -> None: ...
    def docs(self, n: int) -> None: ...
    def tokens(self, n: int) -> None: ...
    def stop(self) -> None: ...


class NoProgress:
    def start(self, total_docs: int) -> None:
        pass

    def docs(self, n: int) -> None:
        pass

    def tokens(self, n: int) -> None:
        pass

    def stop(self) -> None:
        pass


def scan(
    corpus: Path,
    out: Path,
    settings: ScanSettings,
    ray_address: str | None = None,
    progress: Progress | None = None,
) -> ScanResult:
    """Scan `corpus` into `out` (resuming it if it holds this scan, unfinished); with
    `ray_address` ("auto", "local" or a cluster address) shards run as Ray actors. Another scan
    writing to `out` at the same time is a TdbError (`out_folder.locked`)."""
    with out_folder.locked(out):
        return _scan(corpus, out, settings, ray_address, progress or NoProgress())


def _scan(
    corpus: Path, out: Path, settings: ScanSettings, ray_address: str | None, progress: Progress
) -> ScanResult:
    loaded = load_model(settings.model, settings.device, settings.dtype, settings.device_map)
    n_ctx = loaded.model.config.n_ctx
    if settings.window > n_ctx:
        raise TdbError(f"--window {settings.window} is longer than the model's context ({n_ctx})")
    if settings.context < 0:
        raise TdbError(f"--context: must be >= 0, got {settings.context}")
    if settings.window + settings.context > n_ctx:
        raise TdbError(
            f"--window {settings.window} plus --context {settings.context} is longer than the "
            f"model's context ({n_ctx}): lower --context to {n_ctx - settings.window} or less"
        )
    if not loaded.tokenizer.has_text:
        raise TdbError(f"{loaded.path} has no tokenizer, so it cannot read a text corpus")
    settings = dataclasses.replace(settings, model=str(loaded.path.resolve()))
    settings = dataclasses.replace(
        settings, saes=tuple(str(Path(p).resolve()) for p in settings.saes)
    )
    sources, saes = scan_sources(loaded.model, settings.saes)
    names = [s.name for s in sources]
    identity: dict[str, Any] = settings.resolved(loaded.path) | {
        "corpus": str(corpus.resolve()),
        "corpus_fingerprint": corpus_fingerprint(corpus),
        "sources": names,
    }
    if (dtype := loaded.placement.dtype) is not None and dtype_name(dtype) != "float32":
        identity["dtype"] = dtype_name(dtype)  # float32 scans (all before dtypes) omit it
    manifest = out_folder.open_out(out, identity)
    if manifest.get("complete"):
        totals = ("n_shards", "n_docs", "n_windows", "n_tokens")
        if not all(isinstance(manifest.get(name), int) for name in totals):
            raise TdbError(
                f"{out / out_folder.MANIFEST} says complete but lacks its totals: "
                f"delete {out} and scan again"
            )
        n_shards, n_docs, n_windows, n_tokens = (int(manifest[name]) for name in totals)
        return ScanResult(out, n_shards, n_docs, n_windows, n_tokens, shards_run=0)

    merge = ShardMerge.open(out, names, array_layout(sources, settings.k, settings.window))
    n_shards = 0
    ran = 0
    kill_after = int(os.environ.get(KILL_AFTER_SHARDS_ENV, "0"))
    stop_after = int(os.environ.get(STOP_AFTER_SHARDS_ENV, "0"))

    def todo() -> Iterator[Shard]:
        nonlocal n_shards
        tokenized = shards(
            read_corpus(corpus),
            loaded.tokenizer,
            settings.window,
            settings.shard_windows,
            settings.context,
        )
        for shard in tokenized:
            n_shards = shard.index + 1
            if merge.has(shard.index):
                progress.docs(shard.n_docs)
                continue
            yield shard

    def done(shard: Shard, arrays: dict[str, np.ndarray]) -> None:
        nonlocal ran
        merge.add(shard.index, arrays)
        progress.docs(shard.n_docs)
        ran += 1
        if ran == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        if ran == stop_after:  # until SIGCONT: a scan caught mid-run, holding its folder
            os.kill(os.getpid(), signal.SIGSTOP)

    def bounds() -> Bounds | None:
        return None if merge.state is None else merge.state.bounds()

    progress.start(count_documents(corpus))
    try:
        if ray_address is None:
            InProcess(loaded, sources, settings, saes).run(todo(), done, progress.tokens, bounds)
        else:
            from tdb.scan.ray_executor import RayExecutor

            RayExecutor(settings, ray_address).run(todo(), done, progress.tokens, bounds)
    finally:
        progress.stop()

    if merge.prefix != n_shards:
        raise RuntimeError(f"shards {merge.prefix}..{n_shards - 1} were not all scanned")
    total = merge.state or ScanPartial.empty(sources, settings.k, settings.window)
    write_results(out, total, sources, corpus, loaded.tokenizer, settings.window, settings.context)
    manifest |= {
        "complete": True,
        "n_shards": n_shards,
        "n_docs": total.n_docs,
        "n_windows": total.n_windows,
        "n_tokens": total.n_tokens,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out_folder.write_manifest(out, manifest)
    out_folder.drop_state(out)  # the result holds everything now; a re-run stops at `complete`
    return ScanResult(out, n_shards, total.n_docs, total.n_windows, total.n_tokens, ran)
