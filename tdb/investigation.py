"""Investigations as files: every API request of a session on the web page, with its response,
the page's URL at that moment, and the fingerprint of the model that answered
(docs/investigations.md).

>>> investigation = read_investigation(Path("ioi.tdb.json"))
>>> investigation.steps[-1].route, investigation.steps[-1].page
('/api/batch', '/?prompt=When+Mary...&ablate=h2.3%4013%3A1')

The page writes these files (static/investigation.js, "Save"), opens them ("Open") and `tdb
replay FILE` recomputes every step (`tdb.replay`). The format is a published contract: fields are
added, never renamed or dropped; a reader of version 1 ignores fields it does not know.

    {"format": "tdb-investigation", "version": 1,
     "model": {"name": "demo", "fingerprint": "sha256:..."},
     "tdb_version": "0.1.0", "created": "2026-12-02T03:04:05.678Z",
     "server": {"max_prompt_tokens": 512},
     "steps": [{"route": "/api/batch", "request": {...}, "status": 200,
                "response": {...}, "page": "/?prompt=...", "time": "2026-..."}]}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from tdb.errors import TdbError, reason

FORMAT = "tdb-investigation"
VERSION = 1
# The routes whose requests a file may hold: those that compute (POST), which replay reruns.
ROUTES = (
    "/api/nodes",
    "/api/views",
    "/api/tokenize",
    "/api/batch",
    "/api/attribute",
    "/api/circuit",
)
MAX_FILE_BYTES = 256 << 20  # far above a long session's file (a circuit step is ~100 kB)


@dataclass(frozen=True)
class ModelFingerprint:
    name: str  # as the server was started: "demo", a directory, a cached model's name
    fingerprint: str  # tdb.fingerprint.model_fingerprint


@dataclass(frozen=True)
class Step:
    """One API call: what was sent, what came back (with its HTTP status), and the page's URL
    (path and query string) when it was sent."""

    route: str
    request: dict[str, Any]
    status: int
    response: dict[str, Any]
    page: str
    time: str | None = None  # when it was sent (ISO 8601), as the page records it


@dataclass(frozen=True)
class Investigation:
    model: ModelFingerprint
    tdb_version: str
    created: str  # ISO 8601, UTC
    steps: tuple[Step, ...]
    max_prompt_tokens: int | None = None  # the server's limit (its errors depend on it)

    def to_json(self) -> dict[str, Any]:
        """The file's document (what `read_investigation` reads back)."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": {"name": self.model.name, "fingerprint": self.model.fingerprint},
            "tdb_version": self.tdb_version,
            "created": self.created,
            "server": {"max_prompt_tokens": self.max_prompt_tokens},
            "steps": [
                {
                    "route": s.route,
                    "request": s.request,
                    "status": s.status,
                    "response": s.response,
                    "page": s.page,
                }
                | ({} if s.time is None else {"time": s.time})
                for s in self.steps
            ],
        }


def tdb_version() -> str:
    """The installed tdb's version (`0.1.0`), or `unknown` when tdb runs uninstalled."""
    try:
        return version("tdb")
    except PackageNotFoundError:
        return "unknown"


def read_investigation(path: Path) -> Investigation:
    """The investigation in a file, or a TdbError naming the file and what is wrong with it."""
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise TdbError(f"{path}: {size} bytes is over {MAX_FILE_BYTES}: not an investigation")
        text = path.read_text(encoding="utf-8")
    except TdbError:
        raise
    except UnicodeDecodeError as e:
        raise TdbError(f"{path}: not UTF-8 text ({reason(e)}), so not an investigation") from None
    except OSError as e:
        raise TdbError(f"{path}: cannot read it ({e.strerror or reason(e)})") from None
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise TdbError(f"{path}: not JSON ({reason(e)}), so not an investigation") from None
    return parse_investigation(doc, str(path))


def parse_investigation(doc: object, source: str) -> Investigation:
    """A file's parsed JSON checked field by field; `source` names it in errors."""
    if not isinstance(doc, dict):
        raise TdbError(f"{source}: not an investigation (a JSON object is expected)")
    if doc.get("format") != FORMAT:
        raise TdbError(
            f"{source}: not an investigation (its format is {doc.get('format')!r}, "
            f"expected {FORMAT!r}: a file saved by the tdb page's Save button)"
        )
    version = doc.get("version")
    if version != VERSION:
        raise TdbError(
            f"{source}: investigation format version {version!r}; this tdb reads version "
            f"{VERSION} (a newer tdb wrote it?)"
        )
    model = field(doc, "model", dict, source)
    created = field(doc, "created", str, source)
    try:
        datetime.fromisoformat(created.replace("Z", "+00:00"))
    except ValueError:
        raise TdbError(f"{source}: created: {created!r} is not an ISO 8601 time") from None
    server = doc.get("server") or {}
    if not isinstance(server, dict):
        raise TdbError(f"{source}: server: expected an object, got {type_name(server)}")
    limit = server.get("max_prompt_tokens")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise TdbError(f"{source}: server.max_prompt_tokens: expected an integer >= 1")
    raw_steps = field(doc, "steps", list, source)
    return Investigation(
        model=ModelFingerprint(
            name=field(model, "name", str, source, "model."),
            fingerprint=field(model, "fingerprint", str, source, "model."),
        ),
        tdb_version=field(doc, "tdb_version", str, source),
        created=created,
        steps=tuple(parse_step(s, f"steps[{i}]", source) for i, s in enumerate(raw_steps)),
        max_prompt_tokens=limit,
    )


def parse_step(step: object, where: str, source: str) -> Step:
    if not isinstance(step, dict):
        raise TdbError(f"{source}: {where}: expected an object, got {type_name(step)}")
    route = field(step, "route", str, source, f"{where}.")
    if route not in ROUTES:
        raise TdbError(
            f"{source}: {where}.route: {route!r} is not a route tdb replays "
            f"(one of {', '.join(ROUTES)})"
        )
    status = field(step, "status", int, source, f"{where}.")
    if isinstance(status, bool) or not 100 <= status <= 599:
        raise TdbError(f"{source}: {where}.status: {status!r} is not an HTTP status")
    return Step(
        route=route,
        request=field(step, "request", dict, source, f"{where}."),
        status=status,
        response=field(step, "response", dict, source, f"{where}."),
        page=field(step, "page", str, source, f"{where}."),
        time=step["time"] if isinstance(step.get("time"), str) else None,
    )


def field(doc: dict[str, Any], key: str, kind: type, source: str, prefix: str = "") -> Any:
    """`doc[key]`, which must be a `kind`, or a TdbError naming the field."""
    if key not in doc:
        raise TdbError(f"{source}: {prefix}{key} is missing")
    value = doc[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TdbError(
            f"{source}: {prefix}{key}: expected {type_name(kind())}, got {type_name(value)}"
        )
    return value


def type_name(value: object) -> str:
    """JSON's name for a parsed value's type: object, array, string, number, boolean, null."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
