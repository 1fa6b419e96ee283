"""Shards of a scan as tasks on a Ray cluster (the optional `ray` extra: `pip install tdb[ray]`).

    >>> RayExecutor(settings, "auto").run(todo, done, tokens_read)

One actor per CPU of the cluster (each with `num_cpus=1`) loads the model once and scans the
shards it is handed; the driver reads the corpus, hands out one shard per idle actor, and writes
each returned partial as that shard's checkpoint. Workers must be able to read the model at the
path the driver resolved (the demo model ships inside the package; for other models, a shared
file system or the same path on every node).

Every actor runs torch with one thread and so does nothing differently from the in-process scan:
the partial of a shard depends only on the shard and the settings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from tdb.errors import TdbError
from tdb.scan.shard import ScanSettings, scan_shard
from tdb.scan.windows import Shard


class ShardWorker:
    """A Ray actor: the model, loaded once, and the scan of one shard at a time."""

    def __init__(self, settings: ScanSettings) -> None:
        from tdb.checkpoint import load_model
        from tdb.scan.sources import model_sources

        self.settings = settings
        self.model = load_model(settings.model).model
        self.sources = model_sources(self.model)

    def scan(self, shard: Shard) -> dict[str, np.ndarray]:
        return scan_shard(self.model, self.sources, shard, self.settings).to_arrays()


class RayExecutor:
    """Runs shards on the Ray cluster at `address` ("local": start one on this machine; a Ray
    session already started in this process (`ray.init(...)`) is used as it is)."""

    def __init__(self, settings: ScanSettings, address: str, workers: int | None = None) -> None:
        self.settings = settings
        self.address = address
        self.workers = workers

    def run(
        self,
        todo: Iterator[Shard],
        done: Callable[[Shard, dict[str, np.ndarray]], None],
        tokens_read: Callable[[int], None],
    ) -> None:
        try:
            import ray
        except ImportError:
            raise TdbError("--ray needs Ray: pip install 'tdb[ray]'") from None
        if not ray.is_initialized():
            ray.init(address=None if self.address == "local" else self.address)
        resources: dict[str, float] = ray.cluster_resources()  # type: ignore[no-untyped-call]
        n_workers = self.workers or max(1, int(resources.get("CPU", 1)))
        worker_class: Any = ray.remote(num_cpus=1)(ShardWorker)
        actors = [worker_class.remote(self.settings) for _ in range(n_workers)]
        idle = list(actors)
        running: dict[Any, tuple[Shard, Any]] = {}  # result ref -> (shard, actor)
        try:
            for shard in todo:
                if not idle:
                    self._collect(ray, running, idle, done, tokens_read)
                actor = idle.pop()
                running[actor.scan.remote(shard)] = (shard, actor)
            while running:
                self._collect(ray, running, idle, done, tokens_read)
        finally:
            for actor in actors:
                ray.kill(actor)

    @staticmethod
    def _collect(
        ray: Any,
        running: dict[Any, tuple[Shard, Any]],
        idle: list[Any],
        done: Callable[[Shard, dict[str, np.ndarray]], None],
        tokens_read: Callable[[int], None],
    ) -> None:
        """Wait for one shard, checkpoint it, and give its actor back."""
        ready, _ = ray.wait(list(running), num_returns=1)
        shard, actor = running.pop(ready[0])
        done(shard, ray.get(ready[0]))
        tokens_read(shard.n_tokens)
        idle.append(actor)
