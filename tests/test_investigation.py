"""Investigation files and `tdb replay` (docs/investigations.md): a file recorded from the real
server's answers replays as "same"; one edited number is reported with its step and path; a
different checkpoint is named by its fingerprint; a bad file is one line and exit 2. The
comparison itself is checked against a brute-force walk, the fingerprint against real changes
of the weights."""

from __future__ import annotations

import copy
import json
import re
import shlex
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from tdb.checkpoint import LoadedModel, load_model, save_checkpoint
from tdb.cli import main
from tdb.fingerprint import model_fingerprint
from tdb.investigation import FORMAT, VERSION, parse_investigation, read_investigation
from tdb.replay import ABSENT, differences
from tdb.server.app import create_app

ROOT = Path(__file__).parent.parent
LOCAL = "http://localhost"
PROMPT = "When Mary and John went to the store, John gave a drink to"
IOI = {"prompt": PROMPT, "target": " Mary", "distractor": " John"}
PAGE = "/?prompt=When+Mary+and+John+went+to+the+store%2C+John+gave+a+drink+to&k=10"


def page_requests(ablate: list[str]) -> dict[str, Any]:
    """The batch the node table page sends (static/app.js `requests`)."""
    base = {**IOI, "ablate": ablate}
    return {
        "requests": [
            {
                "route": "nodes",
                "request": {
                    **base,
                    "k": 10,
                    "node_types": [
                        "embedding",
                        "attention_head",
                        "mlp_neuron",
                        "autoencoder_latent",
                    ],
                },
            },
            {"route": "views", "request": {**base, "view_nodes": []}},
            {"route": "tokenize", "request": {"text": " Mary"}},
            {"route": "tokenize", "request": {"text": " John"}},
        ]
    }


STEPS: list[tuple[str, dict[str, Any]]] = [
    ("/api/batch", page_requests(["h2.3@13:1"])),
    ("/api/nodes", {**IOI, "k": 5, "trace": "h2.3@13:1:q", "sort": "direct_effect"}),
    ("/api/views", {**IOI, "view_nodes": ["n1.5@13"]}),
    ("/api/tokenize", {"text": " Maryanne"}),
    ("/api/nodes", {**IOI, "ablate": ["h9.9@13:1"]}),  # a 400: saved and replayed as one
    ("/api/nodes", {**IOI, "k": 100000}),  # a 422
    ("/api/attribute", {"task": {"name": "ioi", "n": 2}, "methods": ["atp"], "k": 5}),
    ("/api/circuit", {"task": {"name": "ioi", "n": 2}, "max_components": 4, "max_edges": 5}),
]


def record(client: TestClient, steps: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """An investigation file as the page writes it, from the server's own answers."""
    info = client.get("/api/model").json()
    recorded = []
    for route, request in steps:
        response = client.post(route, json=request)
        recorded.append(
            {
                "route": route,
                "request": request,
                "status": response.status_code,
                "response": response.json(),
                "page": PAGE,
                "time": "2026-12-02T03:00:00.000Z",
            }
        )
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": {"name": info["name"], "fingerprint": info["fingerprint"]},
        "tdb_version": info["tdb_version"],
        "created": "2026-12-02T03:00:01.000Z",
        "server": {"max_prompt_tokens": info["max_prompt_tokens"]},
        "steps": recorded,
    }


@pytest.fixture(scope="module")
def saved(demo: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    with TestClient(create_app(demo, max_prompt_tokens=64), base_url=LOCAL) as client:
        doc = record(client, STEPS)
    assert [s["status"] for s in doc["steps"]] == [200, 200, 200, 200, 400, 422, 200, 200]
    assert "from" in doc["steps"][-1]["response"]["edges"][0]  # sent by alias
    path = tmp_path_factory.mktemp("investigation") / "ioi.tdb.json"
    path.write_text(json.dumps(doc))
    return path


def replay_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["replay", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow  # replays the recorded steps (a node table each) several times
def test_a_recorded_file_replays_as_the_same(
    saved: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = replay_cli(capsys, str(saved))
    assert code == 0, out + err
    lines = out.splitlines()
    assert lines[: len(STEPS)] == [f"step {i} {r}: same" for i, (r, _) in enumerate(STEPS)]
    assert lines[-1] == f"{len(STEPS)} step(s): {len(STEPS)} same, 0 changed"
    assert "note:" not in out

    code, out, _ = replay_cli(capsys, str(saved), "--json")
    report = json.loads(out)
    assert code == 0 and report["same"] and report["model"]["same"]
    assert [s["same"] for s in report["steps"]] == [True] * len(STEPS)


@pytest.mark.slow  # replays the recorded steps (a node table each) several times
def test_one_edited_number_names_its_step_and_path(
    saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = json.loads(saved.read_text())
    doc["steps"] = doc["steps"][:3]  # the batch, the trace, the views (each replay ~2 s)
    node = doc["steps"][0]["response"]["responses"][0]["body"]["nodes"][3]
    node["values"]["direct_effect"] += 0.01
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(doc))
    code, out, _ = replay_cli(capsys, str(edited))
    assert code == 1
    path = f"response.responses[0].body.nodes[{node['id']}].values.direct_effect"
    assert "step 0 /api/batch: 1 difference(s)" in out
    assert f"  {path}: saved " in out
    assert "step 1 /api/nodes: same" in out and "step 2 /api/views: same" in out

    # A looser --atol accepts the edit.
    code, _, _ = replay_cli(capsys, str(edited), "--atol", "0.02")
    assert code == 0
    # A node that left the table is named by its id.
    del doc["steps"][0]["response"]["responses"][0]["body"]["nodes"][3]
    edited.write_text(json.dumps(doc))
    code, out, _ = replay_cli(capsys, str(edited), "--json")
    step = json.loads(out)["steps"][0]
    assert code == 1 and step["differences"] == [
        {"path": path.removesuffix(".values.direct_effect"), "saved": ABSENT, "now": "present"}
    ]


def test_a_different_checkpoint_is_named_by_its_fingerprint(
    loaded: LoadedModel, checkpoint_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    steps = [("/api/nodes", {"prompt": PROMPT, "target": " Mary", "distractor": " John", "k": 5})]
    with TestClient(create_app(loaded), base_url=LOCAL) as client:
        doc = record(client, steps)
    assert doc["model"]["name"] == str(checkpoint_dir)
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(doc))
    # The file's own model (its name is the checkpoint's directory) is found and the same.
    code, out, _ = replay_cli(capsys, str(path))
    assert code == 0 and "note:" not in out

    # The same weights elsewhere: the same fingerprint. One weight changed: another.
    copy_dir, changed_dir = tmp_path / "copy", tmp_path / "changed"
    save_checkpoint(loaded.model, copy_dir)  # type: ignore[arg-type]
    changed = copy.deepcopy(loaded.model)
    with torch.no_grad():
        next(iter(changed.parameters())).view(-1)[0] += 0.5
    save_checkpoint(changed, changed_dir)  # type: ignore[arg-type]
    for d in (copy_dir, changed_dir):
        (d / "tokenizer.json").write_bytes((checkpoint_dir / "tokenizer.json").read_bytes())
    code, out, _ = replay_cli(capsys, str(path), "--model", str(copy_dir))
    assert code == 0 and "note:" not in out
    code, out, _ = replay_cli(capsys, str(path), "--model", str(changed_dir))
    assert out.startswith(f"note: the model differs from the one saved ({checkpoint_dir} ")
    assert f"now {changed_dir} " in out
    report = json.loads(replay_cli(capsys, str(path), "--model", str(changed_dir), "--json")[1])
    assert not report["model"]["same"]
    assert report["model"]["now"]["fingerprint"] == model_fingerprint(changed)
    assert code == (0 if report["same"] else 1)


def test_the_fingerprint_follows_the_weights_and_is_cheap(demo: LoadedModel) -> None:
    start = time.perf_counter()
    fingerprint = model_fingerprint(demo.model)
    elapsed = time.perf_counter() - start
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", fingerprint)
    assert demo.fingerprint == fingerprint == load_model().fingerprint  # stable across loads
    # Measured 56 ms on 2 shared cores; the bound only catches a pathological slowdown.
    assert elapsed < 5.0, f"fingerprinting the demo model took {elapsed:.3f} s"
    changed = copy.deepcopy(demo.model)
    with torch.no_grad():
        dict(changed.named_parameters())[next(iter(dict(changed.named_parameters())))].view(-1)[
            -1
        ] *= 1.0001
    assert model_fingerprint(changed) != fingerprint


BAD_FILES: list[tuple[str, str]] = [
    ("not json {", "not JSON"),
    ("[1, 2]", "a JSON object is expected"),
    ('{"format": "something-else", "version": 1}', "its format is 'something-else'"),
    ('{"format": "tdb-investigation", "version": 2}', "format version 2; this tdb reads version 1"),
    ('{"format": "tdb-investigation", "version": 1}', "model is missing"),
]


def valid_doc() -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": {"name": "demo", "fingerprint": "sha256:0"},
        "tdb_version": "0.1.0",
        "created": "2026-12-02T03:00:01.000Z",
        "steps": [
            {
                "route": "/api/tokenize",
                "request": {"text": " Mary"},
                "status": 200,
                "response": {"tokens": [], "single_token": False},
                "page": "/",
            }
        ],
    }


def edited(change: dict[str, Any], step: dict[str, Any] | None = None) -> str:
    doc = valid_doc() | change
    if step is not None:
        doc["steps"] = [doc["steps"][0] | step]
    return json.dumps(doc)


BAD_FILES += [
    (edited({"created": "yesterday"}), "created: 'yesterday' is not an ISO 8601 time"),
    (edited({"steps": {}}), "steps: expected an array, got an object"),
    (edited({}, {"route": "/api/model"}), "steps[0].route: '/api/model' is not a route"),
    (edited({}, {"status": "200"}), "steps[0].status: expected a number, got a string"),
    (edited({}, {"status": 42}), "steps[0].status: 42 is not an HTTP status"),
    (edited({}, {"page": None}), "steps[0].page: expected a string, got null"),
    (edited({"model": {"name": "demo"}}), "model.fingerprint is missing"),
    (edited({"server": {"max_prompt_tokens": 0}}), "server.max_prompt_tokens"),
]


@pytest.mark.parametrize(("text", "message"), BAD_FILES)
def test_a_bad_file_is_one_line_and_exit_2(
    text: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    code, out, err = replay_cli(capsys, str(path))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"tdb: error: {path}: "), err
    assert message in err


def test_unreadable_files_and_bad_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00")
    (tmp_path / "ok.json").write_text(edited({}))
    cases = [
        ([str(tmp_path / "missing.json")], "cannot read it"),
        ([str(tmp_path)], "cannot read it"),
        ([str(tmp_path / "bin.json")], "not UTF-8"),
        ([str(tmp_path / "ok.json"), "--rtol", "x"], "--rtol: 'x' is not a number"),
        ([str(tmp_path / "ok.json"), "--atol", "-1"], "--atol: must be a finite number >= 0"),
        ([str(tmp_path / "ok.json"), "--model", str(tmp_path)], "has no config.json"),
    ]
    for argv, message in cases:
        code, _, err = replay_cli(capsys, *argv)
        assert code == 2 and err.count("\n") == 1 and message in err, (argv, err)
    # A file whose model cannot be found says so, and how to give another.
    gone = tmp_path / "gone.json"
    gone.write_text(edited({"model": {"name": str(tmp_path / "nowhere"), "fingerprint": "x"}}))
    code, _, err = replay_cli(capsys, str(gone))
    assert code == 2 and "(the file's model; give another with --model)" in err


def test_a_tokenize_step_that_changed_is_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A hand-made file: the saved answer is wrong, the replay says how."""
    path = tmp_path / "tok.json"
    path.write_text(
        edited({}, {"response": {"tokens": [{"id": 7, "text": "x"}], "single_token": False}})
    )
    code, out, _ = replay_cli(capsys, str(path))
    assert code == 1
    assert "  response.tokens[0].text: saved 'x', now ' Mary'" in out
    assert "  response.single_token: saved False, now True" in out
    assert out.startswith("note: the model differs from the one saved (demo 0, now demo ")


# ---- the comparison, against a brute-force walk --------------------------------------------


def leaves(value: Any, path: str = "") -> dict[str, Any]:
    """Every leaf of a JSON value by its path (lists of objects with ids keyed by id)."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out |= leaves(v, f"{path}.{k}" if path else k)
        return out
    if isinstance(value, list):
        keyed = value and all(isinstance(x, dict) and isinstance(x.get("id"), str) for x in value)
        keys = [x["id"] for x in value] if keyed else list(range(len(value)))
        out = {f"{path}.length": len(value)} if not keyed else {}
        for key, item in zip(keys, value, strict=True):
            out |= leaves(item, f"{path}[{key}]")
        return out
    return {path: value}


def test_differences_agree_with_a_brute_force_walk() -> None:
    torch.manual_seed(0)
    base = {
        "nodes": [
            {"id": f"h{i}.0@3:1", "values": {"a": float(v)}} for i, v in enumerate(torch.randn(6))
        ],
        "tokens": [{"id": 5, "text": " Mary"}, {"id": 5, "text": " Mary"}],
        "label": "value 1.25 of 3",
        "flag": True,
    }
    now = copy.deepcopy(base)
    now["nodes"].reverse()  # order is not a difference
    assert differences(base, now, 1e-4, 1e-5) == []
    now["nodes"][0]["values"]["a"] += 1e-7  # within tolerance
    now["label"] = "value 1.2500001 of 3"
    assert differences(base, now, 1e-4, 1e-5) == []
    now["nodes"][1]["values"]["a"] += 0.5
    now["tokens"][1]["text"] = " John"
    now["flag"] = 1  # a boolean is not a number
    now["label"] = "value 1.5 of 3"
    found = {d.path: (d.saved, d.now) for d in differences(base, now, 1e-4, 1e-5)}
    a, b = leaves(base), leaves(now)
    brute = {
        p: (a[p], b[p])
        for p in a
        if not (isinstance(a[p], float) and isinstance(b[p], float) and abs(a[p] - b[p]) < 1e-4)
        and not (a[p] == b[p] and type(a[p]) is type(b[p]))
    }
    assert found == brute
    assert set(found) == {
        f"nodes[{now['nodes'][1]['id']}].values.a",
        "tokens[1].text",
        "flag",
        "label",
    }


# ---- docs -----------------------------------------------------------------------------------


@pytest.mark.slow  # replays the recorded steps (a node table each) several times
def test_docs_replay_commands_run(saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """docs/investigations.md's `tdb replay` commands, on a recorded file."""
    from test_docs_commands import commands

    text = (ROOT / "docs" / "investigations.md").read_text()
    runnable = [c for c in commands(text) if c.startswith("tdb replay ioi.tdb.json")]
    assert len(runnable) >= 2
    for command in runnable:
        argv = [str(saved) if a == "ioi.tdb.json" else a for a in shlex.split(command)[1:]]
        assert main(argv) == 0, (command, capsys.readouterr())
        capsys.readouterr()


def test_read_investigation_round_trips(saved: Path) -> None:
    investigation = read_investigation(saved)
    assert investigation.to_json() == json.loads(saved.read_text())
    assert parse_investigation(investigation.to_json(), "x") == investigation


def test_docs_need_no_network(demo: LoadedModel) -> None:
    """/docs names no http(s) URL (its assets are this server's); they are served."""
    with TestClient(create_app(demo), base_url=LOCAL) as client:
        html = client.get("/docs")
        assert html.status_code == 200 and "SwaggerUIBundle" in html.text
        assert re.findall(r"(?:https?:)?//[^\s'\"]+", html.text) == []
        assets = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", html.text)
        assert {"/docs-assets/swagger-ui-bundle.js", "/docs-assets/swagger-ui.css"} <= set(assets)
        for asset in assets:
            if asset.startswith("/"):
                assert client.get(asset).status_code == 200, asset
        assert client.get("/redoc").status_code == 404  # off: it would load from a CDN
        assert "/docs" not in client.get("/openapi.json").json()["paths"]
