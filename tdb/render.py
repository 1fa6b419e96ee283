"""The node table for a person: rich tables in the terminal."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

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
    console = console or Console(width=max(Console().width, 60 + 12 * n_numbers))
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
    for i, node in enumerate(table.nodes):
        grid.add_row(node.id, table.node_name(node), *[f"{c[i]:.4f}" for _, c in order])
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
