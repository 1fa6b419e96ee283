"""The explanations of a finished scan (`tdb explain --scan DIR` wrote DIR/explanations.parquet),
read once and looked up by component, for every place a component is shown: the node table's
rows (`tdb nodes --scan DIR`, `POST /api/nodes` under `tdb serve --scan DIR`), the component
pages and `GET /api/explanations`.

    >>> explanations = Explanations.read(Path("scan_dir"), loaded)
    >>> explanations.of(parse_node_id("h1.3@7:2"))   # a node: its component's explanation
    Explanation(explanation='attends to the previous token ...', score=0.71, ...)
    >>> table = with_explanations(node_table(loaded, ...), explanations)

A node maps to a component by (node type, layer, index, site): every node of head 3 of layer 1,
whatever its (query, key) pair, shares that head's explanation; embeddings have none.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tdb.checkpoint import LoadedModel
from tdb.errors import TdbError, reason
from tdb.nodes import ComponentIndex, LatentSite, NodeIndex, NodeType
from tdb.scan.out_folder import EXAMPLES, read_manifest
from tdb.table.result import NodeTable

EXPLANATIONS = "explanations.parquet"  # as tdb.explain.output writes it
COLUMNS = ("node_type", "layer", "index", "site", "explanation", "evidence", "score", "explainer")

Key = tuple[str, int, int, str | None]  # node_type, layer, index, site


@dataclass(frozen=True)
class Explanation:
    """One component's explanation: the sentence, its score and the evidence behind it."""

    node_type: NodeType
    layer: int
    index: int
    site: LatentSite | None
    explanation: str
    score: float | None  # correlation of simulated and real activations; None if undefined
    evidence: dict[str, Any]
    explainer: str

    @property
    def id(self) -> str:
        """The component's id as the node table writes it: `h1.3`, `n0.57`, `am1.42`."""
        return ComponentIndex(self.node_type, self.layer, self.index, self.site).id

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "node_type": self.node_type.value,
            "layer": self.layer,
            "index": self.index,
            "site": None if self.site is None else self.site.value,
            "explanation": self.explanation,
            "score": self.score,
            "explainer": self.explainer,
            "evidence": self.evidence,
        }


def _key(node_type: str, layer: int, index: int, site: str | None) -> Key:
    return (node_type, layer, index, site)


def _score(value: object) -> float | None:
    if not isinstance(value, float | int) or value != value or abs(value) == float("inf"):
        return None
    return float(value)


def check_model(folder: Path, manifest: dict[str, Any], loaded: LoadedModel) -> None:
    """A TdbError unless the scan in `folder` was made with `loaded`'s model: the same path, or
    a copy of it (the same config.json and weight file sizes)."""
    identity = manifest.get("identity")
    scanned = identity.get("model") if isinstance(identity, dict) else None
    if not isinstance(scanned, str):
        return  # an older manifest names no model: nothing to check against
    here, there = loaded.path.resolve(), Path(scanned)
    if here == there or _same_checkpoint(here, there):
        return
    raise TdbError(
        f"--scan {folder}: the scan was made with the model at {there}, not with {loaded.name} "
        f"({here}): give --model {there}, or scan this model"
    )


def _same_checkpoint(a: Path, b: Path) -> bool:
    def fingerprint(folder: Path) -> tuple[bytes, list[tuple[str, int]]] | None:
        config = folder / "config.json"
        if not config.is_file():
            return None
        weights = sorted(
            (p.name, p.stat().st_size) for p in folder.iterdir() if p.suffix == ".safetensors"
        )
        return config.read_bytes(), weights

    try:
        fa, fb = fingerprint(a), fingerprint(b)
    except OSError:
        return False
    return fa is not None and fa == fb


class Explanations:
    """Every explanation of one scan, by component."""

    def __init__(self, folder: Path, rows: dict[Key, Explanation]) -> None:
        self.folder = folder
        self.rows = rows

    @staticmethod
    def read(folder: Path, loaded: LoadedModel | None = None) -> Explanations:
        """The explanations in the finished scan `folder`; with `loaded`, also checks that the
        scan is of that model. A TdbError (one line: what to run) when there are none."""
        folder = Path(folder)
        manifest = read_manifest(folder) if folder.is_dir() else None
        if manifest is None or not manifest.get("complete") or not (folder / EXAMPLES).is_file():
            raise TdbError(
                f"--scan {folder}: holds no finished scan (run `tdb scan --out {folder}` first)"
                if manifest is None
                else f"--scan {folder}: the scan is not finished (run `tdb scan --out {folder}` "
                "with its settings again to finish it)"
            )
        if loaded is not None:
            check_model(folder, manifest, loaded)
        path = folder / EXPLANATIONS
        if not path.is_file():
            raise TdbError(
                f"--scan {folder}: has no explanations yet (run `tdb explain --scan {folder}`)"
            )
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowException) as e:
            raise TdbError(
                f"--scan {folder}: {EXPLANATIONS} is corrupt ({reason(e)}): delete it and run "
                f"`tdb explain --scan {folder}` again"
            ) from None
        missing = [c for c in COLUMNS if c not in table.column_names]
        if missing:
            raise TdbError(
                f"--scan {folder}: {EXPLANATIONS} lacks {', '.join(missing)}: delete it and run "
                f"`tdb explain --scan {folder}` again"
            )
        rows: dict[Key, Explanation] = {}
        for r in table.select(list(COLUMNS)).to_pylist():
            site = None if r["site"] is None else LatentSite(r["site"])
            row = Explanation(
                node_type=NodeType(r["node_type"]),
                layer=int(r["layer"]),
                index=int(r["index"]),
                site=site,
                explanation=str(r["explanation"]),
                score=_score(r["score"]),
                evidence=json.loads(r["evidence"]) if r["evidence"] else {},
                explainer=str(r["explainer"]),
            )
            rows[_key(row.node_type.value, row.layer, row.index, r["site"])] = row
        return Explanations(folder, rows)

    def get(
        self, node_type: NodeType, layer: int, index: int, site: LatentSite | None = None
    ) -> Explanation | None:
        """A component's explanation, or None."""
        return self.rows.get(_key(node_type.value, layer, index, None if site is None else site))

    def of(self, node: NodeIndex) -> Explanation | None:
        """The explanation of the node's component (None for embeddings and the unexplained)."""
        if node.layer is None or node.node_type is NodeType.EMBEDDING:
            return None
        return self.get(node.node_type, node.layer, node.index, node.site)

    def select(
        self, node_type: NodeType | None = None, layer: int | None = None
    ) -> list[Explanation]:
        """The explanations of one node type and / or layer (all: None), in file order."""
        return [
            e
            for e in self.rows.values()
            if (node_type is None or e.node_type is node_type)
            and (layer is None or e.layer == layer)
        ]


class ExplanationsFile:
    """A scan's explanations for a long-lived server: read again whenever explanations.parquet
    changes (`tdb explain` may run while `tdb serve --scan DIR` is up), never when it did not."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._stamp: tuple[int, int] | None = None
        self._read: Explanations | None = None

    def current(self) -> Explanations:
        """The explanations now in the folder; a TdbError naming `tdb explain` when there are
        none."""
        try:
            st = (self.folder / EXPLANATIONS).stat()
        except OSError:
            st = None
        stamp = None if st is None else (st.st_mtime_ns, st.st_size)
        if stamp is None or stamp != self._stamp or self._read is None:
            self._read = Explanations.read(self.folder)
            self._stamp = stamp
        return self._read

    def current_or_none(self) -> Explanations | None:
        try:
            return self.current()
        except TdbError:
            return None


def with_explanations(table: NodeTable, explanations: Explanations) -> NodeTable:
    """The table with each row's explanation: `tdb nodes --scan DIR` prints it as a column and
    `--json` adds `explanation` and `explanation_score` to every node.

    >>> table = with_explanations(node_table(loaded, prompt, ...), Explanations.read(dir, loaded))
    >>> table.to_json()["nodes"][0]["explanation"]
    """
    found = [explanations.of(node) for node in table.nodes]
    return replace(
        table,
        explanations=[None if e is None else e.explanation for e in found],
        explanation_scores=[None if e is None else e.score for e in found],
    )
