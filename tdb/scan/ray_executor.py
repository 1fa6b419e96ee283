"""Shards of a scan as tasks on a Ray cluster (the optional `ray` extra: `pip install tdb[ray]`).

    >>> RayExecutor(settings, "auto").run(todo, done, tokens_read)

One actor per CPU of the cluster (each with `num_cpus=1`) loads the model once and scans the
shards it is handed; the driver reads the corpus, hands out one shard per idle actor, and writes
each returned partial as that shard's checkpoint. Workers must be able to read the model at the
path the driver resolved (the demo model ships inside the package; for other models, a shared
file system or the same path on every node).

The records of a shard depend only on the shard and the settings; the float values in them
agree with the in-process scan's to float32 rounding, not always to the last bit: a matmul's
summation order depends on the thread count and, under MKL's dynamic threading, on the machine's
load. The actors start with the driver's OMP_NUM_THREADS (torch's thread count when it is unset;
Ray would set 1, which selects MKL's sequential kernels) and run torch on one thread, which keeps
the values closest to the in-process run's. The test that compares Ray with the in-process scan
checks every non-float column exactly and the floats to float32 rounding.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from tdb.errors import TdbError
from tdb.scan.partial import Bounds
from tdb.scan.shard import ScanSettings, scan_shard
from tdb.scan.windows import Shard


class ShardWorker:
    """A Ray actor: the model, loaded once, and the scan of one shard at a time."""

    def __init__(self, settings: ScanSettings) -> None:
        import torch

        from tdb.checkpoint import load_model
        from tdb.scan.sources import scan_sources

        torch.set_num_threads(1)  # one actor per CPU
        self.settings = settings
        # Ray shows each GPU actor only its own GPU(s): the driver's cuda:N is this one's cuda.
        device = "cuda" if settings.device.startswith("cuda") else settings.device
        loaded = load_model(settings.model, device, settings.dtype, settings.device_map)
        self.model = loaded.model
        self.sources, self.saes = scan_sources(self.model, settings.saes)

    def scan(self, shard: Shard, bounds: Bounds | None) -> dict[str, np.ndarray]:
        partial = scan_shard(
            self.model, self.sources, shard, self.settings, None, bounds, self.saes
        )
        return partial.to_arrays()


def wants_gpu(settings: ScanSettings) -> bool:
    """Whether the actors run the model on a CUDA GPU (`--device cuda`, `cuda:N`, or `auto` on a
    driver that has one; a device map spreads one model over several GPUs)."""
    if settings.device_map is not None:
        return True
    if settings.device == "auto":
        import torch

        return torch.cuda.is_available()
    return settings.device.startswith("cuda")


def actor_options(settings: ScanSettings, env: dict[str, Any]) -> dict[str, Any]:
    """`ray.remote` options of a shard actor: one CPU, and on `--device cuda` one GPU (Ray then
    sets CUDA_VISIBLE_DEVICES, so each actor's `cuda` / `cuda:0` is its own GPU); with a
    device map, as many GPUs as the map names."""
    options: dict[str, Any] = {"num_cpus": 1, "runtime_env": env}
    if wants_gpu(settings):
        options["num_gpus"] = gpus_named(settings.device_map) if settings.device_map else 1
    return options


def gpus_named(device_map: str) -> int:
    """How many GPUs an inline `LAYER:DEVICE,...` map names (`auto` or a file: every GPU the
    actor is given, taken as 1 unless the map says more)."""
    devices = {item.partition(":")[2] for item in device_map.split(",") if ":" in item}
    return max(1, len({d for d in devices if d.startswith("cuda")}))


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
        bounds: Callable[[], Bounds | None],
    ) -> None:
        try:
            import ray
        except ImportError:
            raise TdbError("--ray needs Ray: pip install 'tdb[ray]'") from None
        if not ray.is_initialized():
            ray.init(address=None if self.address == "local" else self.address)
        # CPUs free now, not in all: an actor that never gets a CPU would hold its shard forever.
        resources: dict[str, float] = ray.available_resources()  # type: ignore[no-untyped-call]
        n_workers = self.workers or max(1, int(resources.get("CPU", 1)))
        if wants_gpu(self.settings):  # one actor per free GPU, each holding its own model
            n_workers = self.workers or max(1, int(resources.get("GPU", 0)))
        import torch

        threads = os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads()))
        env = {"env_vars": {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}}
        worker_class: Any = ray.remote(**actor_options(self.settings, env))(ShardWorker)
        actors = [worker_class.remote(self.settings) for _ in range(n_workers)]
        idle = list(actors)
        running: dict[Any, tuple[Shard, Any]] = {}  # result ref -> (shard, actor)
        try:
            for shard in todo:
                if not idle:
                    self._collect(ray, running, idle, done, tokens_read)
                actor = idle.pop()
                running[actor.scan.remote(shard, bounds())] = (shard, actor)
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
