"""Benchmark: `tdb attribute` on the demo model against one batched forward + backward pass.

On 64 IOI prompt pairs (`tdb task ioi --n 64`), heads and neurons (24 + 1,536 components), one
batch of 64: the median wall time of each method, and its ratio to the baseline, measured in the
same process: one forward and one backward pass of the same batch (the metric's gradient with
respect to the embeddings). Goals: atp and atp* <= 3x the baseline; exact < 60 s.

    .venv/bin/python benchmarks/attribute.py [--repeats 3] [--n 64]
"""

from __future__ import annotations

import argparse

import torch
from rich.console import Console
from rich.table import Table
from timing import median_time

from tdb.attribution import attribution, task_records
from tdb.attribution.run import Batch, Runner, as_dataset, batches
from tdb.checkpoint import load_model
from tdb.hooks import HookPoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n", type=int, default=64)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    loaded = load_model(None)
    records = task_records("ioi", n=args.n, seed=0, tokenizer=loaded.tokenizer)
    dataset = as_dataset(loaded, records)
    runner = Runner(loaded, [], logprob=False)
    device = next(loaded.model.parameters()).device
    batch: Batch = next(batches(dataset, loaded.model.config.d_vocab, args.n, device, True))

    def forward_backward() -> None:
        key = (HookPoint.RESID_EMBED, -1)
        runner.gradients(batch, batch.tokens, [key])

    baseline = median_time(forward_backward, args.repeats)
    table = Table(title=f"tdb attribute, demo model, {args.n} IOI prompts, heads + neurons")
    for column in ("method", "seconds", "x fwd+bwd", "goal"):
        table.add_column(column, justify="right" if column != "method" else "left")
    table.add_row("fwd+bwd (baseline)", f"{baseline:.3f}", "1.0", "")
    goals = {"atp": "<= 3x", "atp*": "<= 3x", "ig": "", "exact": "< 60 s"}
    for method, goal in goals.items():
        repeats = 1 if method == "exact" else args.repeats

        def run(method: str = method) -> None:
            attribution(loaded, dataset, methods=[method], batch_size=args.n)

        seconds = median_time(run, repeats)
        table.add_row(method, f"{seconds:.3f}", f"{seconds / baseline:.1f}", goal)
    Console().print(table)


if __name__ == "__main__":
    main()
