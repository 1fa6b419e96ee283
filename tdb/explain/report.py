"""The score distributions of a scan's explanations against the control, per kind, as the
Markdown table of docs/explanations.md.

    python -m tdb.explain.report --scan DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from tdb.explain.output import EXPLANATIONS


def kind_label(node_type: str, site: object) -> str:
    names = {"attention_head": "heads", "mlp_neuron": "neurons"}
    return names.get(node_type, f"latents ({site})")


def score_table(folder: Path) -> str:
    """One row per kind and column (explained, control): n, mean, quartiles."""
    frame = pd.read_parquet(folder / EXPLANATIONS)
    frame["kind"] = [
        kind_label(t, s) for t, s in zip(frame["node_type"], frame["site"], strict=True)
    ]
    lines = [
        "| kind | scores | n | mean | 25 % | median | 75 % |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, rows in sorted(frame.groupby("kind"), key=lambda kv: str(kv[0])):
        for column, label in (("score", "explained"), ("control_score", "control")):
            q = rows[column].quantile([0.25, 0.5, 0.75])
            lines.append(
                f"| {kind} | {label} | {len(rows)} | {rows[column].mean():.3f} | "
                f"{q[0.25]:.3f} | {q[0.5]:.3f} | {q[0.75]:.3f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scan", required=True, metavar="DIR")
    print(score_table(Path(parser.parse_args().scan)))


if __name__ == "__main__":
    main()
