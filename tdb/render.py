"""The node table for a person: rich tables in the terminal."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tdb.attribution.run import Attribution, Progress
from tdb.circuit.result import Circuit
from tdb.metrics import is_signed
from tdb.table import NodeTable, Verification


def describe_direction(table: NodeTable) -> str:
    d = table.direction.to_json()
    at = f"at token {table.direction.position}"
    targets = ", ".join(repr(t) for t in table.target_texts)
    distractors = ", ".join(repr(t) for t in table.distractor_texts)
    kind = d["kind"]
    if kind == "logit_diff":
        return f"logit({targets}) - logit({distractors}) {at}"
    if kind == "logprob":
        return f"log p({targets}) {at}"
    if kind == "residual_direction":
        return f"final residual stream . {d['vector']} {at}"
    through = f" through {d['through']}" if "through" in d else ""
    downstream = f" (downstream: {d['downstream']})" if "downstream" in d else ""
    return f"{kind} of {d['node']}{through}{downstream}"


def print_node_table(table: NodeTable, model_name: str, console: Console | None = None) -> None:
    """Print the table. `print_node_table(node_table(...), "demo")`."""
    n_numbers = len(table.groups) + len(table.columns)
    explained = 0 if table.explanations is None else EXPLANATION_WIDTH + 3
    console = console or Console(width=max(Console().width, 60 + 12 * n_numbers + explained))
    tokens = " ".join(f"[dim]{i}[/dim]{t!r}" for i, t in enumerate(table.token_texts))
    console.print(f"[bold]model[/bold] {model_name}   [bold]prompt[/bold] {tokens}")
    value = f"[bold]{table.direction_value:.4f}[/bold]"
    for name, other in [
        ("baseline_value", table.baseline_value),
        ("right_value", table.right_value),
    ]:
        if other is not None:
            value += f"   {name} {other:.4f}"
    console.print(f"[bold]direction[/bold] {describe_direction(table)} = {value}")
    grid = Table(header_style="bold")
    grid.add_column("id", style="cyan", no_wrap=True)
    grid.add_column("node", no_wrap=True)
    order: list[tuple[str, list[float]]] = []
    for group in table.groups:
        order.append((group.value, table.values[group]))
        order += [(n, c) for n, c in table.columns.items() if n.startswith(group.value + "_")]
    for name, _ in order:  # an extra column shows only its suffix: "baseline", "diff", "right"
        grid.add_column(name.rsplit("_", 1)[-1] if name in table.columns else name, justify="right")
    if table.explanations is not None:
        grid.add_column(
            "explanation", max_width=EXPLANATION_WIDTH, no_wrap=True, overflow="ellipsis"
        )
    for i, node in enumerate(table.nodes):
        cells = [node.id, table.node_name(node), *[f"{c[i]:.4f}" for _, c in order]]
        if table.explanations is not None:
            cells.append(explanation_cell(table, i))
        grid.add_row(*cells)
    console.print(grid)
    signed = ", ".join(g.value for g in table.groups if is_signed(g)) or "none"
    console.print(
        f"[dim]{len(table.nodes)} nodes: per metric and node type the top {table.k} "
        f"(and bottom for {signed}); union in first-seen order[/dim]"
    )
    if table.verification is not None:
        print_verification(table.verification, console)
    if table.token_views is not None:
        print_token_views(table.token_views.to_json(), table.token_texts, console)


EXPLANATION_WIDTH = 48  # characters; the sentence is cut with an ellipsis (--json has it whole)


def explanation_cell(table: NodeTable, i: int) -> str:
    """Row i's explanation, prefixed by its score: `0.71 attends to the previous token`."""
    assert table.explanations is not None
    text = table.explanations[i]
    if text is None:
        return ""
    score = None if table.explanation_scores is None else table.explanation_scores[i]
    return ("" if score is None else f"{score:.2f} ") + escape(text)


def print_verification(verification: Verification, console: Console) -> None:
    grid = Table(title="estimate vs truth (zero-ablating each node alone)", header_style="bold")
    for column in ("id", "estimated (act x grad)", "direct", "actual", ""):
        grid.add_column(column, justify="right")
    for row in verification.rows:
        flag = "[red]sign differs[/red]" if row.sign_disagrees else ""
        grid.add_row(
            row.node.id, f"{row.estimated:.4f}", f"{row.direct:.4f}", f"{row.actual:.4f}", flag
        )
    console.print(grid)
    console.print(
        f"correlation with actual: estimated {verification.correlation_estimated_actual:.3f}, "
        f"direct {verification.correlation_direct_actual:.3f}"
    )


def print_token_views(views: dict[str, Any], token_texts: list[str], console: Console) -> None:
    logits = views["logits"]
    top = ", ".join(f"{t['text']!r} {t['value']:.2f}" for t in logits["top"][:10])
    bottom = ", ".join(f"{t['text']!r} {t['value']:.2f}" for t in logits["bottom"][:10])
    console.print(f"[bold]top logits[/bold] {top}")
    console.print(f"[bold]bottom logits[/bold] {bottom}")
    for p in logits["pinned"]:
        console.print(f"  {p['text']!r}: logit {p['value']:.3f}, rank {p['rank']}")
    sums = views["effect_by_token"]
    grid = Table(title="act x grad summed per token", header_style="bold")
    for column in ("token", "embedding", "mlp", "attention from", "attention to"):
        grid.add_column(column, justify="right")
    for i, text in enumerate(token_texts):
        cells = [sums[key][i] for key in ("embedding", "mlp", "attention_from", "attention_to")]
        grid.add_row(f"{text!r}@{i}", *[f"{c:.4f}" for c in cells])
    console.print(grid)
    for node in views["nodes"]:
        promotes = ", ".join(repr(t["text"]) for t in node["promotes"])
        suppresses = ", ".join(repr(t["text"]) for t in node["suppresses"])
        console.print(f"[bold]{node['id']}[/bold] promotes {promotes}; suppresses {suppresses}")
        if node.get("exciting_tokens") is not None:
            excites = ", ".join(
                f"{t['text']!r}@{t['token']} {t['value']:.2f}" for t in node["exciting_tokens"]
            )
            console.print(f"  most active at {excites}")


class AttributionProgressBar(Progress):
    """`tdb attribute`'s progress bar on stderr, shown once the work has taken 2 s."""

    def __init__(self, quiet: bool = False, label: str = "working") -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        self.quiet = quiet
        self.bar = Progress(
            label,
            BarColumn(),
            MofNCompleteColumn(),
            "steps, ETA",
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self.total = 0
        self.done = 0
        self.started = 0.0
        self.shown = False

    def __enter__(self) -> AttributionProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, total: int) -> None:
        self.total, self.done, self.started = total, 0, time.perf_counter()

    def advance(self, n: int) -> None:
        self.done += n
        if self.quiet:
            return
        if not self.shown and time.perf_counter() - self.started > 2.0:
            self.shown = True
            self.bar.start()
            self.task = self.bar.add_task("work", total=self.total, completed=self.done)
        elif self.shown:
            self.bar.update(self.task, completed=min(self.done, self.total))

    def stop(self) -> None:
        if self.shown:
            self.bar.stop()
            self.shown = False


def print_attribution(result: Attribution, model_name: str, console: Console | None = None) -> None:
    """The attribution table: one row per component, a column per method (exact beside the
    estimates when verified)."""
    console = console or Console(width=max(Console().width, 50 + 12 * len(result.methods)))
    corrupted = "" if result.corrupted is None else f"   corrupted {result.corrupted:.4f}"
    kind = (
        "logit(target) - logit(distractor)"
        if result.metric_kind == "logit_diff"
        else ("log p(target)")
    )
    console.print(
        f"[bold]model[/bold] {model_name}   [bold]dataset[/bold] {result.source} "
        f"({result.n_prompts} prompt pairs)   [bold]ablation[/bold] {result.reference}"
    )
    console.print(f"[bold]metric[/bold] {kind}: clean [bold]{result.clean:.4f}[/bold]{corrupted}")
    grid = Table(header_style="bold")
    grid.add_column("component", style="cyan", no_wrap=True)
    grid.add_column("type", no_wrap=True)
    for method in result.methods:
        grid.add_column(method, justify="right")
    for row in result.rows:
        cells = [
            "" if (value := row.scores.get(m)) is None else f"{value:.4f}" for m in result.methods
        ]
        grid.add_row(row.id, row.component.node_type.value, *cells)
    console.print(grid)
    console.print(
        f"[dim]{len(result.rows)} rows, by |{result.methods[0]}|; score = mean over prompts of "
        "m(clean) - m(component replaced): positive supports the behaviour[/dim]"
    )


def print_circuit(circuit: Circuit, model_name: str, console: Console | None = None) -> None:
    """The circuit: its measured faithfulness, components, the curve and the top edges."""
    console = console or Console(width=max(Console().width, 80))
    console.print(
        f"[bold]model[/bold] {model_name}   [bold]dataset[/bold] {circuit.source} "
        f"({circuit.n_prompts} prompt pairs)   [bold]ablation[/bold] {circuit.ablation}   "
        f"[bold]ranked by[/bold] {circuit.method}"
    )
    console.print(
        f"[bold]circuit[/bold] {len(circuit.components)} of {circuit.candidates} components, "
        f"faithfulness [bold]{circuit.faithfulness:.3f}[/bold] (measured; target "
        f"{circuit.target_faithfulness:g})   m(full) {circuit.clean:.4f}   m(circuit) "
        f"{circuit.m_circuit:.4f}   m(empty) {circuit.m_empty:.4f}"
    )
    console.print(" ".join(circuit.components))
    curve = Table(
        title="faithfulness of the top-n components vs random circuits", header_style="bold"
    )
    for column in ("n", "top n", "random (mean)"):
        curve.add_column(column, justify="right")
    for point in circuit.curve:
        curve.add_row(str(point.n), f"{point.faithfulness:.3f}", f"{point.random:.3f}")
    console.print(curve)
    if circuit.edges:
        edges = Table(title="edges (direct paths into each input)", header_style="bold")
        for column in ("from", "to", "input", "score", "exact"):
            edges.add_column(column, justify="right" if column in ("score", "exact") else "left")
        for edge in circuit.edges:
            exact = "" if edge.exact is None else f"{edge.exact:.4f}"
            edges.add_row(edge.source, edge.target, edge.input, f"{edge.score:.4f}", exact)
        console.print(edges)
