"""Benchmark: the whole `tdb nodes --json` process against the floor (benchmarks/floor.py).

On a random GPT-2-small-shaped checkpoint (12 layers, d_model 768, 12 heads, vocab 50257) built
here, at 64 and 512 tokens: median wall time and peak memory (max RSS) of each whole process,
runs alternating, and the ratios tdb / floor. Goal at 512 tokens: time <= 1.3x, memory <= 1.5x.

    .venv/bin/python benchmarks/node_table.py [--repeats 5] [--lengths 64,512]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from tdb.checkpoint import save_checkpoint
from tdb.models.gpt2 import GPT2, GPT2Config

HERE = Path(__file__).parent
TDB = Path(sys.executable).parent / "tdb"


def build_checkpoint(directory: Path) -> None:
    config = GPT2Config(d_vocab=50257, n_ctx=1024, d_model=768, n_layer=12, n_head=12, d_mlp=3072)
    torch.manual_seed(0)
    save_checkpoint(GPT2(config), directory)


def measure(command: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one whole process."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - start
    if status != 0:
        raise SystemExit(
            f"{command[0]} failed: {process.stderr.read().decode() if process.stderr else ''}"
        )
    return elapsed, usage.ru_maxrss / 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lengths", default="64,512")
    parser.add_argument("-k", type=int, default=10)
    args = parser.parse_args()
    table = Table(title="tdb nodes vs floor (median of runs, whole processes)")
    for column in (
        "tokens",
        "floor s",
        "tdb s",
        "time ratio",
        "floor MiB",
        "tdb MiB",
        "memory ratio",
    ):
        table.add_column(column, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp)
        build_checkpoint(checkpoint)
        for n in (int(x) for x in args.lengths.split(",")):
            tokens = ",".join(
                str(t)
                for t in torch.randint(
                    0, 50257, (n,), generator=torch.Generator().manual_seed(n)
                ).tolist()
            )
            floor_cmd = [
                sys.executable,
                str(HERE / "floor.py"),
                str(checkpoint),
                tokens,
                "11",
                "12",
            ]
            tdb_cmd = [
                str(TDB),
                "nodes",
                "--token-ids",
                tokens,
                "--target-id",
                "11",
                "--distractor-id",
                "12",
                "--model",
                str(checkpoint),
                "--json",
                "-k",
                str(args.k),
            ]
            floor_runs, tdb_runs = [], []
            for _ in range(args.repeats):  # alternating, so drift hits both alike
                floor_runs.append(measure(floor_cmd))
                tdb_runs.append(measure(tdb_cmd))
            ft = statistics.median(r[0] for r in floor_runs)
            tt = statistics.median(r[0] for r in tdb_runs)
            fm = statistics.median(r[1] for r in floor_runs)
            tm = statistics.median(r[1] for r in tdb_runs)
            table.add_row(
                str(n),
                f"{ft:.2f}",
                f"{tt:.2f}",
                f"{tt / ft:.2f}x",
                f"{fm:.0f}",
                f"{tm:.0f}",
                f"{tm / fm:.2f}x",
            )
    Console().print(table)


if __name__ == "__main__":
    main()
