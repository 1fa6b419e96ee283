"""Benchmark: `tdb circuit`'s parts on the demo model against one batched forward pass.

On 64 IOI prompt pairs (`tdb task ioi --n 64`), one batch: the faithfulness of one circuit (every
component outside it patched: one batched forward pass), of 8 circuits side by side, the edge
scores among the top 30 components (every edge between them, one clean forward + backward and a
reference forward), and the whole search. Ratios against one plain forward pass of the same batch
measured in the same process.

    .venv/bin/python benchmarks/circuit.py [--repeats 3] [--n 64]
"""

from __future__ import annotations

import argparse
import importlib

import torch
from rich.console import Console
from rich.table import Table
from timing import median_time

from tdb.attribution import attribution, task_records
from tdb.attribution.components import ComponentKind, sites
from tdb.attribution.run import Reference, Runner, as_dataset, batches
from tdb.checkpoint import load_model
from tdb.circuit import find_circuit
from tdb.circuit.search import Evaluator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n", type=int, default=64)
    args = parser.parse_args()
    loaded = load_model(None)
    data = as_dataset(loaded, task_records("ioi", n=args.n, seed=0, tokenizer=loaded.tokenizer))
    runner = Runner(loaded, [], logprob=False)
    device = next(loaded.model.parameters()).device
    batch = next(batches(data, loaded.model.config.d_vocab, args.n, device, True))
    kinds = [ComponentKind.HEADS, ComponentKind.NEURONS]
    site_list = sites(loaded.model.config, kinds, [])
    evaluator = Evaluator(runner, data, site_list, Reference.CORRUPTED, args.n, device)
    ranked = attribution(loaded, data, methods=["ig"], batch_size=args.n).rows
    top = [row.component for row in ranked[:30]]
    members = frozenset((site.key, i) for site in site_list[:2] for i in range(4))

    def forward() -> None:
        with torch.no_grad():
            runner.metric(batch, batch.tokens)

    baseline = median_time(forward, args.repeats)
    rows: list[tuple[str, float]] = [
        (
            "one circuit's faithfulness",
            median_time(lambda: evaluator.metric([members]), args.repeats),
        ),
        (
            "8 circuits side by side",
            median_time(lambda: evaluator.metric([members] * 8), args.repeats),
        ),
    ]
    try:
        edge_scores = importlib.import_module("tdb.circuit.edges").edge_scores

        def edges() -> None:
            edge_scores(loaded, data, top, reference=Reference.CORRUPTED, method="atp",
                        batch_size=args.n)  # fmt: skip

        def edges_ig() -> None:
            edge_scores(loaded, data, top, reference=Reference.CORRUPTED, method="ig",
                        batch_size=args.n)  # fmt: skip

        heads = [
            row.component for row in ranked if row.component.node_type.value == "attention_head"
        ]

        def head_edges() -> None:
            edge_scores(loaded, data, heads, reference=Reference.CORRUPTED, method="atp",
                        batch_size=args.n)  # fmt: skip

        rows += [
            (f"edges among all {len(heads)} heads (atp)", median_time(head_edges, args.repeats)),
            ("edges among the top 30 (atp)", median_time(edges, args.repeats)),
            ("edges among the top 30 (ig)", median_time(edges_ig, 1)),
        ]
    except ImportError:
        pass

    def search() -> None:
        find_circuit(loaded, data, max_components=100, batch_size=args.n, max_edges=0)

    rows.append(("the whole search (IOI, <= 100)", median_time(search, 1)))
    table = Table(title=f"tdb circuit, demo model, {args.n} IOI prompts")
    for column in ("what", "seconds", "x one forward"):
        table.add_column(column, justify="left" if column == "what" else "right")
    table.add_row("one forward (baseline)", f"{baseline:.3f}", "1.0")
    for name, seconds in rows:
        table.add_row(name, f"{seconds:.3f}", f"{seconds / baseline:.1f}")
    Console().print(table)


if __name__ == "__main__":
    main()
