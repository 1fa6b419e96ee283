"""A node table: ranked nodes with every metric's value, and its one JSON document.

`NodeTable.to_json()` is what `tdb nodes --json` prints and what `POST /api/nodes` answers (the
server validates it against `tdb.server.schemas.NodeTableResponse`); docs/node-table.md is its
contract. Fields are only ever added to it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from tdb.direction import Direction
from tdb.direction.parse import trace_ids
from tdb.metrics import Metric, is_signed
from tdb.nodes import NodeIndex, NodeType, component_link, node_label
from tdb.verify import Verified

if TYPE_CHECKING:
    import pandas as pd

Json = object


def finite(value: Json) -> Json:
    """`value` with every NaN or infinite float replaced by None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


@dataclass(frozen=True)
class Verification:
    """The top nodes by |act_times_grad|, each zero-ablated alone: estimate versus actual."""

    rows: list[Verified]
    correlation_estimated_actual: float
    correlation_direct_actual: float

    @property
    def sign_disagreements(self) -> list[str]:
        return [v.node.id for v in self.rows if v.sign_disagrees]

    def summary(self) -> dict[str, Json]:
        return {
            "correlation_estimated_actual": self.correlation_estimated_actual,
            "correlation_direct_actual": self.correlation_direct_actual,
            "sign_disagreements": self.sign_disagreements,
        }


@dataclass(frozen=True)
class TokenViews:
    """Next-token logits (target and distractor pinned), per-token sums of act × grad, and the
    requested nodes' promoted / suppressed tokens (shapes: tdb.token_views)."""

    logits: dict[str, Json]
    effect_by_token: dict[str, list[float]]
    nodes: list[dict[str, Json]]

    def to_json(self) -> dict[str, Json]:
        return {"logits": self.logits, "effect_by_token": self.effect_by_token, "nodes": self.nodes}


@dataclass(frozen=True)
class NodeTable:
    """Ranked nodes with every metric's value; one row per node, one column per group.

    `columns` holds the extra columns of an ablation (`<metric>_baseline`, `<metric>_diff`) or
    a comparison (`<metric>_right`, `<metric>_diff`), aligned with `nodes`.
    """

    tokens: list[int]
    token_texts: list[str]
    direction: Direction
    direction_value: float
    target_texts: list[str]
    distractor_texts: list[str]
    k: int
    groups: list[Metric]
    nodes: list[NodeIndex]
    values: dict[Metric, list[float]]
    columns: dict[str, list[float]] = field(default_factory=dict)
    baseline_value: float | None = None  # the direction without the ablations
    right_value: float | None = None  # the direction on the comparison prompt
    right_tokens: list[int] | None = None
    right_token_texts: list[str] | None = None
    # The compared prompt's own target / distractor (`compare_target`): None when it shares them.
    right_target_texts: list[str] | None = None
    right_distractor_texts: list[str] | None = None
    verification: Verification | None = None
    token_views: TokenViews | None = None
    # What the table is silently unhelpful about, for a person to read (e.g. a zero direction).
    warnings: list[str] = field(default_factory=list)
    # Per row, its component's explanation and score (`tdb.scan.explanations.with_explanations`);
    # None: the table was made without a scan, and its rows have no such fields.
    explanations: list[str | None] | None = None
    explanation_scores: list[float | None] | None = None

    def node_name(self, node: NodeIndex) -> str:
        """A name a person reads: `L2 head 3 ' to'@7 <- ' Mary'@4`."""
        return node_label(node, self.token_texts)

    def select(self, node_types: Sequence[NodeType] | None, sort: Metric | None) -> NodeTable:
        """Only the rows of `node_types` (all: None), ordered by `sort` (None: top-k order)."""
        order = row_order(
            [n.node_type for n in self.nodes],
            None if sort is None else self.values[sort],
            node_types,
            sort is not None and is_signed(sort),
        )
        return replace(
            self,
            nodes=[self.nodes[i] for i in order],
            values={g: [v[i] for i in order] for g, v in self.values.items()},
            columns={name: [v[i] for i in order] for name, v in self.columns.items()},
            explanations=None
            if self.explanations is None
            else [self.explanations[i] for i in order],
            explanation_scores=None
            if self.explanation_scores is None
            else [self.explanation_scores[i] for i in order],
        )

    def column_values(self) -> dict[str, list[float]]:
        """Every column by name: the metrics, then the extra columns."""
        return {g.value: self.values[g] for g in self.groups} | self.columns

    def rows(self) -> list[dict[str, Json]]:
        """One dict per node: identity, name, component page, and every column's value, both
        under `values` and (as `tdb nodes --json` always had them) at the top level."""
        columns = self.column_values()
        rows: list[dict[str, Json]] = []
        for i, node in enumerate(self.nodes):
            values = {name: finite(column[i]) for name, column in columns.items()}
            rows.append(
                self.identity(node)
                | {
                    "component": component_link(node),
                    "traces": trace_ids(node),
                    "values": values,
                }
                | values
                | self.explanation_fields(i)
            )
        return rows

    def explanation_fields(self, i: int) -> dict[str, Json]:
        """Row i's `explanation` and `explanation_score`, when the table has explanations."""
        if self.explanations is None:
            return {}
        scores = self.explanation_scores or [None] * len(self.nodes)
        return {"explanation": self.explanations[i], "explanation_score": finite(scores[i])}

    def direction_json(self) -> dict[str, Json]:
        out = self.direction.to_json() | {
            "value": self.direction_value,
            "target_texts": self.target_texts,
            "distractor_texts": self.distractor_texts,
        }
        if self.baseline_value is not None:
            out["baseline_value"] = self.baseline_value
        if self.right_value is not None:
            out["right_value"] = self.right_value
        if self.right_target_texts is not None:
            out["right_target_texts"] = self.right_target_texts
            out["right_distractor_texts"] = self.right_distractor_texts
        return out

    def to_json(self) -> dict[str, Json]:
        """The document `tdb nodes --json` prints and `POST /api/nodes` answers (NaN: null)."""
        right = None
        if self.right_tokens is not None and self.right_token_texts is not None:
            right = tokens_json(self.right_tokens, self.right_token_texts)
        doc: dict[str, Json] = {
            "tokens": tokens_json(self.tokens, self.token_texts),
            "right_tokens": right,
            "direction": self.direction_json(),
            "k": self.k,
            "groups": [g.value for g in self.groups],
            "columns": list(self.column_values()),
            "nodes": self.rows(),
            "verification": None,
            "verification_summary": None,
            "token_views": None if self.token_views is None else self.token_views.to_json(),
            "warnings": list(self.warnings),
        }
        if self.verification is not None:
            doc["verification"] = [v.to_json() for v in self.verification.rows]
            doc["verification_summary"] = self.verification.summary()
        out = finite(doc)
        assert isinstance(out, dict)
        return out

    def to_dataframe(self) -> pd.DataFrame:
        """One row per node: id, node_type, layer, token, key_token, index, name, metrics."""
        import pandas as pd  # imported here: the CLI's JSON path never pays for pandas

        columns = ["id", "node_type", "layer", "token", "key_token", "index", "name"]
        if any(node.site is not None for node in self.nodes):
            columns.insert(5, "site")
        columns += list(self.column_values())
        if self.explanations is not None:
            columns += ["explanation", "explanation_score"]
        rows = [self._frame_row(i, node) for i, node in enumerate(self.nodes)]
        return pd.DataFrame(rows, columns=columns)

    def _frame_row(self, i: int, node: NodeIndex) -> dict[str, object]:
        values = {name: column[i] for name, column in self.column_values().items()}
        return self.identity(node) | values | self.explanation_fields(i)

    def identity(self, node: NodeIndex) -> dict[str, Json]:
        """Which node a row is: id, node type, coordinates, and the name a person reads."""
        return {
            "id": node.id,
            "node_type": node.node_type.value,
            "layer": node.layer,
            "token": node.token,
            "key_token": node.key_token,
            "site": None if node.site is None else node.site.value,
            "index": node.index,
            "name": self.node_name(node),
        }


def tokens_json(ids: Sequence[int], texts: Sequence[str]) -> list[dict[str, Json]]:
    return [{"id": t, "text": text} for t, text in zip(ids, texts, strict=True)]


def row_order(
    node_types: Sequence[NodeType],
    sort_values: Sequence[float | None] | None,
    keep: Sequence[NodeType] | None,
    by_magnitude: bool,
) -> list[int]:
    """Row indices: the rows whose node type is in `keep` (all: None), ordered by `sort_values`
    descending (by magnitude when `by_magnitude`; undefined values last), else kept in order.
    Shared by `NodeTable.select` and the server, which filters a cached table."""
    rows = [i for i, t in enumerate(node_types) if keep is None or t in keep]
    if sort_values is None:
        return rows

    def key(i: int) -> float:
        value = sort_values[i]
        if value is None or math.isnan(value):
            return math.inf
        return -abs(value) if by_magnitude else -value

    return sorted(rows, key=key)  # stable: ties keep the top-k order
