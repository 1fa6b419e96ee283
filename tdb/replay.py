"""`tdb replay FILE`: recompute every step of a saved investigation (`tdb.investigation`) in
this process, through the same service functions the server's routes call (no HTTP), and say
per step whether the response is the same, within a float tolerance, or what changed.

>>> report = replay(load_model(), read_investigation(Path("ioi.tdb.json")))
>>> [step.same for step in report.steps]
[True, True]

Comparing, field by field (`differences`): numbers are equal when |saved - now| <= atol +
rtol * max(|saved|, |now|); strings that differ only in the numbers inside them (an SVG) are
compared number by number the same way; a list of objects that each have a distinct string `id`
(node table rows, token views' nodes) is compared by id, so a node that moved in the ranking
is not a difference but one that entered or left it is; other lists position by position.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from tdb.checkpoint import LoadedModel
from tdb.errors import TdbError
from tdb.investigation import Investigation, Step
from tdb.server.app import api_names, validation_message
from tdb.server.schemas import (
    AttributionRequest,
    BatchRequest,
    BatchResponse,
    BatchResult,
    CircuitRequest,
    ErrorResponse,
    NodeTableRequest,
    TokenizeItem,
    TokenizeRequest,
    ViewsItem,
    ViewsRequest,
)
from tdb.server.service import (
    attribution_response,
    circuit_response,
    node_table_response,
    select_rows,
    tokenize,
    views_response,
)

RTOL = 1e-4
ATOL = 1e-5
SHOWN = 5  # differences shown per step in the text report


@dataclass(frozen=True)
class Difference:
    path: str  # e.g. responses[0].body.nodes[h2.3@13:1].values.direct_effect
    saved: Any  # ABSENT when the field or list item is new
    now: Any  # ABSENT when it is gone


ABSENT = "(absent)"


@dataclass(frozen=True)
class StepReport:
    index: int
    route: str
    page: str
    differences: tuple[Difference, ...]

    @property
    def same(self) -> bool:
        return not self.differences


@dataclass(frozen=True)
class ReplayReport:
    saved_model: str
    saved_fingerprint: str
    model: str
    fingerprint: str
    steps: tuple[StepReport, ...]

    @property
    def same_model(self) -> bool:
        return self.saved_fingerprint == self.fingerprint

    @property
    def same(self) -> bool:
        return all(s.same for s in self.steps)

    def to_json(self) -> dict[str, Any]:
        """`tdb replay --json`'s document."""
        return {
            "same": self.same,
            "model": {
                "saved": {"name": self.saved_model, "fingerprint": self.saved_fingerprint},
                "now": {"name": self.model, "fingerprint": self.fingerprint},
                "same": self.same_model,
            },
            "steps": [
                {
                    "index": s.index,
                    "route": s.route,
                    "page": s.page,
                    "same": s.same,
                    "n_differences": len(s.differences),
                    "differences": [
                        {"path": d.path, "saved": d.saved, "now": d.now} for d in s.differences[:20]
                    ],
                }
                for s in self.steps
            ],
        }

    def lines(self) -> list[str]:
        """The text report: one line per step, its first differences below it."""
        out = []
        if not self.same_model:
            out.append(
                f"note: the model differs from the one saved ({self.saved_model} "
                f"{short(self.saved_fingerprint)}, now {self.model} {short(self.fingerprint)}): "
                "differences may come from the checkpoint"
            )
        for s in self.steps:
            head = f"step {s.index} {s.route}"
            if s.same:
                out.append(f"{head}: same")
                continue
            out.append(f"{head}: {len(s.differences)} difference(s) (page {s.page})")
            for d in s.differences[:SHOWN]:
                out.append(f"  {d.path}: saved {shown(d.saved)}, now {shown(d.now)}")
            if len(s.differences) > SHOWN:
                out.append(f"  ... and {len(s.differences) - SHOWN} more")
        changed = sum(not s.same for s in self.steps)
        out.append(
            f"{len(self.steps)} step(s): {len(self.steps) - changed} same, {changed} changed"
        )
        return out


def replay(
    loaded: LoadedModel,
    investigation: Investigation,
    *,
    rtol: float = RTOL,
    atol: float = ATOL,
    max_prompt_tokens: int | None = None,
) -> ReplayReport:
    """Recompute every step and compare it with the saved response. `max_prompt_tokens`: the
    server's limit (default: the one saved in the file, else the model's context)."""
    limit = max_prompt_tokens or investigation.max_prompt_tokens or loaded.model.config.n_ctx
    steps = []
    for i, step in enumerate(investigation.steps):
        status, response = recompute(loaded, step, limit)
        found = differences(
            {"status": step.status, "response": comparable(step.status, step.response)},
            {"status": status, "response": comparable(status, response)},
            rtol,
            atol,
        )
        steps.append(StepReport(i, step.route, step.page, tuple(found)))
    return ReplayReport(
        investigation.model.name,
        investigation.model.fingerprint,
        loaded.name,
        loaded.fingerprint,
        tuple(steps),
    )


def comparable(status: int, response: dict[str, Any]) -> dict[str, Any]:
    """An error response's message only (the 422 `detail` lists pydantic internals)."""
    return response if status == 200 else {"error": response.get("error")}


# ---- recomputing a step -----------------------------------------------------------------------


def recompute(
    loaded: LoadedModel, step: Step, max_prompt_tokens: int
) -> tuple[int, dict[str, Any]]:
    """The status and JSON body the server's route would answer `step.request` with now."""
    try:
        body = ROUTE_FUNCTIONS[step.route](loaded, step.request, max_prompt_tokens)
    except ValidationError as e:
        return 422, {"error": validation_message(e.errors())}  # type: ignore[arg-type]
    except TdbError as e:
        return 400, {"error": api_names(str(e))}
    # FastAPI sends a response model by alias (a circuit's edges have `from` and `to`).
    return 200, body.model_dump(mode="json", by_alias=True)


def nodes_body(loaded: LoadedModel, raw: dict[str, Any], limit: int) -> BaseModel:
    request = NodeTableRequest.model_validate(raw)
    table = node_table_response(loaded, request, limit)
    return select_rows(table, request.node_types, request.sort)


def views_body(loaded: LoadedModel, raw: dict[str, Any], limit: int) -> BaseModel:
    return views_response(loaded, ViewsRequest.model_validate(raw), limit)


def tokenize_body(loaded: LoadedModel, raw: dict[str, Any], _: int) -> BaseModel:
    return tokenize(loaded, TokenizeRequest.model_validate(raw).text)


def batch_body(loaded: LoadedModel, raw: dict[str, Any], limit: int) -> BaseModel:
    """As `POST /api/batch`: each item answered in order with its own status."""
    results = []
    for item in BatchRequest.model_validate(raw).requests:
        try:
            body: BaseModel
            if isinstance(item, TokenizeItem):
                body = tokenize(loaded, item.request.text)
            elif isinstance(item, ViewsItem):
                body = views_response(loaded, item.request, limit)
            else:
                table = node_table_response(loaded, item.request, limit)
                body = select_rows(table, item.request.node_types, item.request.sort)
            results.append(BatchResult(status=200, body=body))
        except TdbError as e:
            results.append(BatchResult(status=400, error=ErrorResponse(error=str(e))))
    return BatchResponse(responses=results)


def attribute_body(loaded: LoadedModel, raw: dict[str, Any], limit: int) -> BaseModel:
    return attribution_response(loaded, AttributionRequest.model_validate(raw), limit)


def circuit_body(loaded: LoadedModel, raw: dict[str, Any], limit: int) -> BaseModel:
    return circuit_response(loaded, CircuitRequest.model_validate(raw), limit)


ROUTE_FUNCTIONS: dict[str, Callable[[LoadedModel, dict[str, Any], int], BaseModel]] = {
    "/api/nodes": nodes_body,
    "/api/views": views_body,
    "/api/tokenize": tokenize_body,
    "/api/batch": batch_body,
    "/api/attribute": attribute_body,
    "/api/circuit": circuit_body,
}


# ---- comparing ----------------------------------------------------------------------------------

NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def differences(saved: Any, now: Any, rtol: float, atol: float, path: str = "") -> list[Difference]:
    """Where two JSON values differ beyond the tolerance, as paths (see the module's doc)."""
    if is_number(saved) and is_number(now):
        return [] if close(saved, now, rtol, atol) else [Difference(path, saved, now)]
    if isinstance(saved, str) and isinstance(now, str):
        return [] if same_text(saved, now, rtol, atol) else [Difference(path, saved, now)]
    if isinstance(saved, dict) and isinstance(now, dict):
        found = []
        for key in [*saved, *(k for k in now if k not in saved)]:
            where = f"{path}.{key}" if path else str(key)
            if key not in now:
                found.append(Difference(where, saved[key], ABSENT))
            elif key not in saved:
                found.append(Difference(where, ABSENT, now[key]))
            else:
                found += differences(saved[key], now[key], rtol, atol, where)
        return found
    if isinstance(saved, list) and isinstance(now, list):
        saved_ids, now_ids = ids(saved), ids(now)
        if saved_ids is not None and now_ids is not None:
            return by_id(saved, now, saved_ids, now_ids, rtol, atol, path)
        found = []
        for i, (a, b) in enumerate(zip(saved, now, strict=False)):
            found += differences(a, b, rtol, atol, f"{path}[{i}]")
        if len(saved) != len(now):
            found.append(Difference(f"{path}.length", len(saved), len(now)))
        return found
    same = saved == now and type(saved) is type(now)  # JSON's true is not 1
    return [] if same else [Difference(path, saved, now)]


def by_id(
    saved: list[Any],
    now: list[Any],
    saved_ids: list[str],
    now_ids: list[str],
    rtol: float,
    atol: float,
    path: str,
) -> list[Difference]:
    now_by_id = dict(zip(now_ids, now, strict=True))
    found = []
    for key, item in zip(saved_ids, saved, strict=True):
        if key in now_by_id:
            found += differences(item, now_by_id[key], rtol, atol, f"{path}[{key}]")
        else:
            found.append(Difference(f"{path}[{key}]", "present", ABSENT))
    kept = set(saved_ids)
    found += [Difference(f"{path}[{k}]", ABSENT, "present") for k in now_ids if k not in kept]
    return found


def ids(items: list[Any]) -> list[str] | None:
    """The items' distinct string ids, or None when the list is not one of objects with ids."""
    if not items or not all(isinstance(x, dict) and isinstance(x.get("id"), str) for x in items):
        return None
    keys = [x["id"] for x in items]
    return keys if len(set(keys)) == len(keys) else None


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def close(a: float | int, b: float | int, rtol: float, atol: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b or abs(a - b) <= atol + rtol * max(abs(a), abs(b))


def same_text(a: str, b: str, rtol: float, atol: float) -> bool:
    """Equal, or equal but for the numbers in them, which are within the tolerance."""
    if a == b:
        return True
    if NUMBER.split(a) != NUMBER.split(b):
        return False
    pairs = zip(NUMBER.findall(a), NUMBER.findall(b), strict=True)
    return all(close(float(x), float(y), rtol, atol) for x, y in pairs)


def shown(value: Any) -> str:
    text = repr(value) if isinstance(value, str) and value != ABSENT else str(value)
    if isinstance(value, dict | list):
        text = f"{type(value).__name__} of {len(value)}"
    return text if len(text) <= 80 else text[:77] + "..."


def short(fingerprint: str) -> str:
    return fingerprint.removeprefix("sha256:")[:12]
