"""Benchmark: `tdb scan` tokens per second next to the model's plain forward on the same batches.

On the demo model and its bundled corpus (or --model / --corpus), in one process: the plain
forward `model(tokens)` (all logits, no hooks) over exactly the batches the scan runs, and the
whole in-process scan into a fresh folder (tokenizing, hooks, head write magnitudes, top-k and
random sample, statistics, checkpoints and the Parquet output), alternating, `--repeats` times
(3); the best wall time and the best CPU time of each count. Throughput is reported against
wall time and against this process's CPU time (steadier on a shared machine). Goal: scan >=
0.8x the plain forward over the same batches (each window with its left context, `--context`);
tokens/s count the windows' tokens only. The plain forward of the windows without their context
is shown too.

    .venv/bin/python benchmarks/scan.py [--model DIR] [--corpus PATH] [-k 20] [--window 64]
        [--batch-size 32] [--corpus-copies N] [--repeats 3]

`--corpus-copies N` scans N copies of the corpus one after the other (as N times as many
documents): the fixed costs (loading the model, writing k examples per component) then weigh
less, as they do on a real corpus.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from tdb.checkpoint import load_model
from tdb.malloc import keep_freed_memory
from tdb.scan import ScanSettings, scan
from tdb.scan.corpus import DEMO_CORPUS, read_corpus
from tdb.scan.shard import NO_LOGITS, shard_batches
from tdb.scan.windows import Shard, shards


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall and CPU seconds of fn()."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def plain_forward(model: torch.nn.Module, batches: list[torch.Tensor], logits: bool) -> None:
    with torch.inference_mode():
        for tokens in batches:
            model(tokens) if logits else model(tokens, logit_positions=NO_LOGITS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--corpus", default=str(DEMO_CORPUS))
    parser.add_argument("-k", type=int, default=20)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shard-windows", type=int, default=512)
    parser.add_argument("--corpus-copies", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    keep_freed_memory()  # as the `tdb` command does (tdb/malloc.py)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(args.corpus)
        if args.corpus_copies > 1:
            text = corpus.read_text(encoding="utf-8")
            corpus = Path(tmp) / "corpus.txt"
            corpus.write_text(text * args.corpus_copies, encoding="utf-8")
        run(args, corpus)


def run(args: argparse.Namespace, corpus: Path) -> None:
    settings = ScanSettings(
        model=args.model,
        k=args.k,
        window=args.window,
        batch_size=args.batch_size,
        shard_windows=args.shard_windows,
    )
    loaded = load_model(args.model)
    model = loaded.model

    def cut(context: int) -> list[Shard]:
        documents = read_corpus(corpus)
        return list(shards(documents, loaded.tokenizer, args.window, args.shard_windows, context))

    def batches_of(cut_shards: list[Shard]) -> list[torch.Tensor]:
        return [b.tokens for shard in cut_shards for b in shard_batches(shard, args.batch_size)]

    scan_shards = cut(settings.context)
    batches = batches_of(scan_shards)  # exactly the scan's: left context, then window
    bare = batches_of(cut(0))  # the same windows without their left context
    n_tokens = sum(s.n_tokens for s in scan_shards)  # ranked tokens: windows, not context

    plain_forward(model, batches[:2], logits=True)  # warm-up
    rows: dict[str, list[tuple[float, float]]] = {
        "plain": [],
        "plain_no_logits": [],
        "plain_bare": [],
        "scan": [],
    }
    for _ in range(args.repeats):  # alternating, the best of each
        rows["plain"].append(timed(lambda: plain_forward(model, batches, logits=True)))
        rows["plain_no_logits"].append(timed(lambda: plain_forward(model, batches, logits=False)))
        rows["plain_bare"].append(timed(lambda: plain_forward(model, bare, logits=True)))
        with tempfile.TemporaryDirectory() as tmp:
            rows["scan"].append(timed(lambda: scan(corpus, Path(tmp) / "out", settings)))

    # The best wall time and the best CPU time of each, independently.
    best = {name: (min(r[0] for r in runs), min(r[1] for r in runs)) for name, runs in rows.items()}
    title = (
        f"tdb scan vs plain forward: {loaded.name}, {n_tokens:,} tokens, batch {args.batch_size}"
    )
    table = Table(title=title)
    columns = ("run", "wall s", "tokens/s (wall)", "CPU s", "tokens/s (CPU)", "ratio (CPU)")
    for column in columns:
        table.add_column(column, justify="right" if column != "run" else "left")
    labels = {
        "plain": "plain forward (all logits)",
        "plain_no_logits": "plain forward (no logits)",
        "plain_bare": "plain forward, windows without context (all logits)",
        "scan": "tdb scan (whole)",
    }
    for name, (wall, cpu) in best.items():
        table.add_row(
            labels[name],
            f"{wall:.1f}",
            f"{n_tokens / wall:,.0f}",
            f"{cpu:.1f}",
            f"{n_tokens / cpu:,.0f}",
            f"{best['plain'][1] / cpu:.2f}",
        )
    Console().print(table)
    ratio_wall = best["plain"][0] / best["scan"][0]
    ratio_cpu = best["plain"][1] / best["scan"][1]
    print(
        f"scan / plain forward throughput: {ratio_wall:.2f}x (wall), {ratio_cpu:.2f}x (CPU time)"
        f"; goal >= 0.80x"
    )
    bare_wall = best["plain_bare"][0] / best["scan"][0]
    bare_cpu = best["plain_bare"][1] / best["scan"][1]
    print(
        f"scan / plain forward of the windows without their left context: {bare_wall:.2f}x "
        f"(wall), {bare_cpu:.2f}x (CPU time)"
    )


if __name__ == "__main__":
    main()
