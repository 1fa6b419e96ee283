"""DIR/explanations.parquet: one row per component, rewritten whole (a temporary file renamed,
`tdb.scan.out_folder.atomic_write`) after each layer's components, so a killed run leaves the
rows it finished and no half row. The schema is documented in docs/explanations.md."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from tdb.errors import TdbError, reason
from tdb.explain.scan_data import ComponentKey
from tdb.scan.out_folder import atomic_write

EXPLANATIONS = "explanations.parquet"

SCHEMA = pa.schema(
    [
        ("node_type", pa.string()),
        ("layer", pa.int32()),
        ("index", pa.int32()),
        ("site", pa.string()),  # latents: what their SAE reads; else null
        ("explanation", pa.string()),  # one short sentence
        ("evidence", pa.string()),  # JSON: what the sentence and the simulator are built from
        ("score", pa.float64()),  # simulated vs real activations on held-out examples
        ("control_score", pa.float64()),  # another component's evidence, simulated the same way
        ("scored_on", pa.list_(pa.string())),  # the held-out examples: top:RANK, sample:DOC:START
        ("explainer", pa.string()),
        ("version", pa.string()),
        ("examples_fingerprint", pa.string()),  # of the scan's examples it was explained from
    ]
)

Row = dict[str, Any]


def row_key(row: Row) -> ComponentKey:
    site = row["site"]
    return (
        str(row["node_type"]),
        int(row["layer"]),
        int(row["index"]),
        None if site is None else str(site),
    )


def read_rows(folder: Path) -> dict[ComponentKey, Row]:
    path = folder / EXPLANATIONS
    if not path.is_file():
        return {}
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        raise TdbError(f"{path} is corrupt ({reason(e)}): delete it and run again") from None
    if not set(SCHEMA.names) <= set(table.column_names):
        raise TdbError(f"{path} is not an explanations file of this version: delete it")
    return {row_key(row): row for row in table.select(SCHEMA.names).to_pylist()}


def write_rows(folder: Path, rows: dict[ComponentKey, Row]) -> None:
    ordered = [rows[key] for key in sorted(rows, key=lambda k: (k[0], k[3] or "", k[1], k[2]))]
    table = pa.Table.from_pylist(ordered, schema=SCHEMA)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)

    def write(f: BinaryIO) -> None:
        f.write(buffer.getvalue())

    atomic_write(folder / EXPLANATIONS, write)
