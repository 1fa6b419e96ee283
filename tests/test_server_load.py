"""Concurrency on loopback: 8 clients x 50 requests against a real uvicorn server get no errors
and the same bodies as the same requests sent one at a time, and afterwards the process holds no
more tensors than before and about the same memory (no leaked hooks, tensors or results).

The cache is off here (cache_size=0), so every request is computed, except that identical
requests arriving together share one computation.
"""

from __future__ import annotations

import gc
import os
import threading
import time

import httpx
import pytest
import torch
from live_server import live_server

from tdb.checkpoint import LoadedModel
from tdb.server.app import create_app

pytestmark = pytest.mark.slow  # 8 clients x 50 requests to a live server

CLIENTS = 8
REQUESTS_PER_CLIENT = 50
PROMPT = "When Mary and John went to the store, John gave a drink to"
SECOND = "When Tom and Anna went to the park, Anna gave a ball to"
IOI = {"prompt": PROMPT, "target": " Mary", "distractor": " John"}

POOL: list[tuple[str, dict[str, object]]] = [
    ("/api/nodes", IOI | {"k": 3}),
    ("/api/nodes", IOI | {"k": 5, "node_types": ["attention_head"]}),
    ("/api/nodes", IOI | {"k": 3, "ablate": ["e@3", "n0.5@13:mean"]}),
    ("/api/nodes", IOI | {"k": 3, "ablate": ["h1.0@13:1"]}),
    ("/api/nodes", IOI | {"k": 3, "trace": "h1.2@13:1:q"}),
    ("/api/nodes", IOI | {"k": 3, "trace": "n1.7@13"}),
    ("/api/nodes", IOI | {"k": 3, "second_prompt": SECOND}),
    ("/api/views", IOI | {"view_nodes": ["n1.7@13", "h1.2@13:1"]}),
    ("/api/tokenize", {"text": PROMPT}),
    ("/api/model", {}),
]


def send(client: httpx.Client, path: str, body: dict[str, object]) -> httpx.Response:
    if path == "/api/model":
        return client.get(path)
    return client.post(path, json=body)


def live_tensors() -> int:
    gc.collect()
    # type(o), not isinstance: isinstance reads __class__, which some torch module proxies warn on
    return sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects())


def rss_mib() -> float:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_concurrent_clients_get_the_serial_results_and_nothing_leaks(
    loaded: LoadedModel,
) -> None:
    app = create_app(loaded, cache_size=0, queue_size=CLIENTS)
    with live_server(app) as url, httpx.Client(base_url=url, timeout=120) as serial:
        expected = []
        for path, body in POOL:  # also warms up every code path before the baseline
            response = send(serial, path, body)
            assert response.status_code == 200, response.text
            expected.append(response.json())
        tensors_before, rss_before = live_tensors(), rss_mib()

        failures: list[str] = []
        mismatches: list[str] = []

        def client_loop(c: int) -> None:
            with httpx.Client(base_url=url, timeout=120) as client:
                for i in range(REQUESTS_PER_CLIENT):
                    n = (c * 3 + i) % len(POOL)
                    path, body = POOL[n]
                    response = send(client, path, body)
                    if response.status_code != 200:
                        failures.append(f"{path}: {response.status_code} {response.text[:200]}")
                    elif response.json() != expected[n]:
                        mismatches.append(f"{path} {body}")

        start = time.perf_counter()
        threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        elapsed = time.perf_counter() - start
        assert not any(t.is_alive() for t in threads), "clients did not finish in 10 minutes"
        assert failures == []
        assert mismatches == []
        tensors_after, rss_after = live_tensors(), rss_mib()
        print(
            f"\n{CLIENTS} clients x {REQUESTS_PER_CLIENT} requests in {elapsed:.1f} s; "
            f"tensors {tensors_before} -> {tensors_after}; "
            f"RSS {rss_before:.0f} -> {rss_after:.0f} MiB"
        )
        assert tensors_after <= tensors_before
        assert rss_after - rss_before < 50
