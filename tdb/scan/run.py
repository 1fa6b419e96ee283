"""A whole scan: corpus -> shards -> partial results (in-process or on Ray) -> Parquet.

    >>> result = scan(Path("corpus.txt"), Path("out"), ScanSettings(k=20, window=64))
    >>> result.n_tokens, result.out / "examples.parquet"

Shards are checkpointed as they finish (see `checkpoints`); the result is always the fold of
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
from typing import Any, Protocol

import numpy as np

from tdb.checkpoint import LoadedModel, load_model
from tdb.errors import TdbError
from tdb.scan import checkpoints
from tdb.scan.corpus import corpus_fingerprint, count_documents, read_corpus
from tdb.scan.output import write_results
from tdb.scan.partial import ScanPartial
from tdb.scan.shard import ScanSettings, scan_shard
from tdb.scan.sources import ComponentSource, model_sources
from tdb.scan.windows import Shard, shards

# Test-only: SIGKILL this process right after it has checkpointed this many shards.
KILL_AFTER_SHARDS_ENV = "TDB_SCAN_TEST_KILL_AFTER_SHARDS"

ShardDone = Callable[[Shard, dict[str, np.ndarray]], None]


class Executor(Protocol):
    """Runs shards and hands each finished one's partial (as arrays) to `done`, in any order."""

    def run(
        self, todo: Iterator[Shard], done: ShardDone, tokens_read: Callable[[int], None]
    ) -> None: ...


@dataclass
class InProcess:
    """Shards one after the other in this process."""

    loaded: LoadedModel
    sources: list[ComponentSource]
    settings: ScanSettings

    def run(
        self, todo: Iterator[Shard], done: ShardDone, tokens_read: Callable[[int], None]
    ) -> None:
        for shard in todo:
            partial = scan_shard(self.loaded.model, self.sources, shard, self.settings, tokens_read)
            done(shard, partial.to_arrays())


@dataclass(frozen=True)
class ScanResult:
    out: Path
    n_shards: int
    n_docs: int
    n_windows: int
    n_tokens: int
    shards_run: int  # by this call (0: everything was checkpointed already)


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
    `ray_address` ("auto", "local" or a cluster address) shards run as Ray actors."""
    progress = progress or NoProgress()
    loaded = load_model(settings.model)
    n_ctx = loaded.model.config.n_ctx
    if settings.window > n_ctx:
        raise TdbError(f"--window {settings.window} is longer than the model's context ({n_ctx})")
    if not loaded.tokenizer.has_text:
        raise TdbError(f"{loaded.path} has no tokenizer, so it cannot read a text corpus")
    settings = dataclasses.replace(settings, model=str(loaded.path.resolve()))
    sources = model_sources(loaded.model)
    names = [s.name for s in sources]
    identity: dict[str, Any] = settings.resolved(loaded.path) | {
        "corpus": str(corpus.resolve()),
        "corpus_fingerprint": corpus_fingerprint(corpus),
        "sources": names,
    }
    manifest = checkpoints.open_out(out, identity)
    if manifest.get("complete"):
        return ScanResult(
            out,
            n_shards=int(manifest["n_shards"]),
            n_docs=int(manifest["n_docs"]),
            n_windows=int(manifest["n_windows"]),
            n_tokens=int(manifest["n_tokens"]),
            shards_run=0,
        )

    finished = checkpoints.finished_shards(out)
    n_shards = 0
    ran = 0
    kill_after = int(os.environ.get(KILL_AFTER_SHARDS_ENV, "0"))

    def todo() -> Iterator[Shard]:
        nonlocal n_shards
        for shard in shards(
            read_corpus(corpus), loaded.tokenizer, settings.window, settings.shard_windows
        ):
            n_shards = shard.index + 1
            if shard.index in finished:
                progress.docs(shard.n_docs)
                continue
            yield shard

    def done(shard: Shard, arrays: dict[str, np.ndarray]) -> None:
        nonlocal ran
        checkpoints.save_shard(out, shard.index, arrays)
        progress.docs(shard.n_docs)
        ran += 1
        if ran == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    progress.start(count_documents(corpus))
    try:
        if ray_address is None:
            InProcess(loaded, sources, settings).run(todo(), done, progress.tokens)
        else:
            from tdb.scan.ray_executor import RayExecutor

            RayExecutor(settings, ray_address).run(todo(), done, progress.tokens)
    finally:
        progress.stop()

    total = ScanPartial.empty(sources, settings.k, settings.window)
    for index in range(n_shards):
        total = total.merge(checkpoints.load_shard(out, index, names), settings.k)
    write_results(out, total, sources, corpus, loaded.tokenizer, settings.window)
    manifest |= {
        "complete": True,
        "n_shards": n_shards,
        "n_docs": total.n_docs,
        "n_windows": total.n_windows,
        "n_tokens": total.n_tokens,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    checkpoints.write_manifest(out, manifest)
    return ScanResult(out, n_shards, total.n_docs, total.n_windows, total.n_tokens, ran)
