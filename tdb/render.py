"""The node table for a person: a rich table in the terminal."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from tdb.table import NodeTable


def print_node_table(table: NodeTable, model_name: str, console: Console | None = None) -> None:
    """Print the table. `print_node_table(node_table(...), "demo")`."""
    console = console or Console(width=max(Console().width, 120))
    d = table.direction
    tokens = " ".join(f"[dim]{i}[/dim]{t!r}" for i, t in enumerate(table.token_texts))
    target = ", ".join(repr(t) for t in table.target_texts)
    distractor = ", ".join(repr(t) for t in table.distractor_texts)
    console.print(f"[bold]model[/bold] {model_name}   [bold]prompt[/bold] {tokens}")
    console.print(
        f"[bold]direction[/bold] logit({target}) - logit({distractor}) at token {d.position}"
        f" = [bold]{table.direction_value:.4f}[/bold]"
    )
    grid = Table(show_lines=False, header_style="bold")
    grid.add_column("id", style="cyan", no_wrap=True)
    grid.add_column("node", no_wrap=True)
    for group in table.groups:
        grid.add_column(group.value, justify="right")
    for i, node in enumerate(table.nodes):
        cells = [f"{table.values[g][i]:.4f}" for g in table.groups]
        grid.add_row(node.id, table.node_name(node), *cells)
    console.print(grid)
    console.print(
        f"[dim]{len(table.nodes)} nodes: per metric and node type the top {table.k} "
        "(and bottom for direct_effect, act_times_grad); union in first-seen order[/dim]"
    )
