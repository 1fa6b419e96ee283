"""Benchmark: `POST /api/batch` of IOI node tables, batched (one capture) vs one at a time.

On the demo model (or --model), in one process, through the HTTP app: N IOI prompts (different
lengths) sent as one `/api/batch` call, whose node tables share one batched capture, against
the same N sent as N `/api/nodes` calls (one capture each). Each round uses fresh apps, so
nothing is cached; the best of --repeats rounds counts for each. Also the same comparison
without HTTP (`run_requests` vs `run_request`).

    .venv/bin/python benchmarks/batch.py [--model DIR] [-n 8] [-k 10] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from fastapi.testclient import TestClient
from rich.console import Console
from rich.table import Table

from tdb.attribution import task_records
from tdb.checkpoint import LoadedModel, load_model
from tdb.server.app import create_app
from tdb.table import NodeRequest, run_request
from tdb.table.batch import run_requests


def best_of(repeats: int, run: Callable[[], object]) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="checkpoint directory (default: the demo model)")
    parser.add_argument("-n", type=int, default=8, help="IOI prompts (default 8, at most 16)")
    parser.add_argument("-k", type=int, default=10, help="nodes per metric and node type")
    parser.add_argument("--repeats", type=int, default=5, help="rounds; the best counts")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: steadier when shared)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    loaded: LoadedModel = load_model(args.model)
    records = task_records("ioi", args.n, 0, loaded.tokenizer)
    items = [
        {"prompt": r["prompt"], "target": r["target"], "distractor": r["distractor"], "k": args.k}
        for r in records
    ]
    lengths = sorted(len(loaded.tokenizer.encode(str(r["prompt"]))) for r in records)

    def http_batched() -> None:
        with TestClient(create_app(loaded), base_url="http://localhost") as client:
            batch = [{"route": "nodes", "request": item} for item in items]
            out = client.post("/api/batch", json={"requests": batch}).json()["responses"]
            assert all(r["status"] == 200 for r in out)

    def http_sequential() -> None:
        with TestClient(create_app(loaded), base_url="http://localhost") as client:
            for item in items:
                assert client.post("/api/nodes", json=item).status_code == 200

    requests = [NodeRequest(**item) for item in items]  # type: ignore[arg-type]

    def python_batched() -> None:
        run_requests(loaded, requests)

    def python_sequential() -> None:
        for request in requests:
            run_request(loaded, request)

    python_batched()  # warm-up (first calls allocate)
    python_sequential()
    table = Table(title=f"{args.n} IOI node tables ({lengths[0]}-{lengths[-1]} tokens), k={args.k}")
    for name in ("path", "batched s", "sequential s", "sequential / batched"):
        table.add_column(name, justify="right" if name != "path" else "left")
    for name, batched, sequential in [
        ("POST /api/batch vs N x /api/nodes", http_batched, http_sequential),
        ("run_requests vs N x run_request", python_batched, python_sequential),
    ]:
        b, s = best_of(args.repeats, batched), best_of(args.repeats, sequential)
        table.add_row(name, f"{b:.3f}", f"{s:.3f}", f"{s / b:.2f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
