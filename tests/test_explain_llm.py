"""`tdb explain --explainer llm` against a small OpenAI-compatible server of the test's own on
loopback. The server answers an explain prompt with 'Fires on "T".', T the first token of the
prompt at the highest activation, and a simulate prompt with 10 for every token equal to T, else
0; so each component's explanation and score are recomputed here from examples.parquet alone, by
hand. It can also be told to answer 429 (with Retry-After), 500, bad JSON or a garbage
completion, to drop the connection, or to hang; it counts requests in flight."""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from test_docs_commands import commands
from test_explain import WINDOW, K, corpus  # noqa: F401  (corpus: a fixture)

from tdb.cli import main
from tdb.errors import TdbError
from tdb.explain import explain
from tdb.explain.llm_client import LlmConfig, api_key, retry_after_seconds
from tdb.explain.llm_prompts import (
    BadAnswerError,
    parse_explanation,
    parse_simulation,
    scaled,
)
from tdb.explain.run import control_partners
from tdb.scan import ScanSettings, scan

KEY = "sk-test-0123456789abcdef"
N_HEADS = 24  # the demo model's
Rule = Callable[[str, int], str | None]  # (prompt kind, its count from 1) -> a misbehaviour


class FakeLlm(ThreadingHTTPServer):
    """/v1/models and /v1/chat/completions on 127.0.0.1; `rule` picks a misbehaviour for a
    request, `key` is the API key it demands (None: any)."""

    daemon_threads = True

    def __init__(self, key: str | None = None, delay_s: float = 0.0) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.key = key
        self.delay_s = delay_s
        self.rule: Rule = lambda kind, n: None
        self.lock = threading.Lock()
        self.log: list[dict[str, Any]] = []  # every request: path, kind, body, time
        self.counts: dict[str, int] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self.release = threading.Event()  # ends a hang

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def chats(self) -> list[dict[str, Any]]:
        return [r for r in self.log if r["path"].endswith("/chat/completions")]


def fake_answer(kind: str, user: str) -> str:
    if kind == "explain":
        lines = [line.rsplit("\t", 1) for line in user.splitlines() if "\t" in line]
        tokens = [(json.loads(t), int(v)) for t, v in lines]
        best = max(v for _, v in tokens)
        return f"Fires on {json.dumps(next(t for t, v in tokens if v == best))}."
    explanation = user.splitlines()[0].removeprefix("Explanation of the component: ")
    target = json.loads(explanation.removeprefix("Fires on ").removesuffix("."))
    windows = re.split(r"\n\nExcerpt \d+ \(\d+ tokens\):\n", user)[1:]
    windows[-1] = windows[-1].split("\n\n")[0]
    values = [[10 if json.loads(t) == target else 0 for t in w.split("\n")] for w in windows]
    return json.dumps({"activations": values})


class Handler(BaseHTTPRequestHandler):
    server: FakeLlm

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def authorised(self) -> bool:
        key = self.server.key
        if key is None or self.headers.get("Authorization") == f"Bearer {key}":
            return True
        self.reply(401, b'{"error": "bad key"}')
        return False

    def do_GET(self) -> None:
        with self.server.lock:
            self.server.log.append({"path": self.path, "time": time.monotonic()})
        if self.authorised():
            self.reply(200, b'{"data": [{"id": "fake"}]}')

    def do_POST(self) -> None:
        s = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        user = body["messages"][1]["content"]
        kind = "simulate" if user.startswith("Explanation of the component:") else "explain"
        with s.lock:
            s.counts[kind] = s.counts.get(kind, 0) + 1
            s.log.append({"path": self.path, "kind": kind, "body": body, "time": time.monotonic()})
            s.in_flight += 1
            s.max_in_flight = max(s.max_in_flight, s.in_flight)
            todo = s.rule(kind, s.counts[kind])
        try:
            time.sleep(s.delay_s)
            if not self.authorised():
                return
            if todo == "429":
                self.reply(429, b'{"error": "slow down"}', {"Retry-After": "1"})
            elif todo == "500":
                self.reply(500, b"internal error")
            elif todo == "401":
                self.reply(401, b'{"error": "key revoked"}')
            elif todo == "echo":
                self.reply(500, f"no: {self.headers['Authorization']}".encode())
            elif todo == "drop":
                self.close_connection = True  # no answer at all
            elif todo == "bad json":
                self.reply(200, b'{"choices": [{"message": ')
            elif todo == "garbage":
                answer = {"choices": [{"message": {"content": "I think it is 7, 3, 2"}}]}
                self.reply(200, json.dumps(answer).encode())
            elif todo == "hang":
                s.release.wait(10)
            else:
                content = fake_answer(kind, user)
                answer = {"choices": [{"message": {"role": "assistant", "content": content}}]}
                self.reply(200, json.dumps(answer).encode())
        finally:
            with s.lock:
                s.in_flight -= 1


@pytest.fixture
def server() -> Iterator[FakeLlm]:
    fake = FakeLlm(key=KEY, delay_s=0.05)
    thread = threading.Thread(target=fake.serve_forever, daemon=True)
    thread.start()
    yield fake
    fake.release.set()
    fake.shutdown()
    fake.server_close()
    thread.join()


@pytest.fixture(autouse=True)
def key_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for proxy in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)  # urllib would send loopback requests there
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("TDB_LLM_API_KEY", KEY)


@pytest.fixture(scope="module")
def scanned(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("llm-scan") / "s"
    scan(corpus, out, ScanSettings(k=K, window=WINDOW, batch_size=16))
    return out


@pytest.fixture
def folder(scanned: Path, tmp_path: Path) -> Path:
    out = tmp_path / "scan"
    shutil.copytree(scanned, out)
    return out


def llm_args(folder: Path, server: FakeLlm, *more: str) -> list[str]:
    return [
        "explain",
        "--scan",
        str(folder),
        "--components",
        "heads",
        "--explainer",
        "llm",
        "--llm-url",
        server.url,
        "--llm-model",
        "fake",
        *more,
    ]


def rows(folder: Path) -> pd.DataFrame:
    frame = pd.read_parquet(folder / "explanations.parquet")
    return frame.set_index(["node_type", "layer", "index"]).sort_index()


def pearson(xs: list[float], ys: list[float]) -> float:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    return 0.0 if sxx == 0 or syy == 0 else sxy / math.sqrt(sxx * syy)


def head_examples(folder: Path, layer: int, head: int) -> pd.DataFrame:
    examples = pd.read_parquet(folder / "examples.parquet")
    return examples[
        (examples["node_type"] == "attention_head")
        & (examples["layer"] == layer)
        & (examples["index"] == head)
    ]


def by_hand(folder: Path, layer: int, head: int) -> tuple[list[str], str]:
    """The explain prompt's excerpts and the token the fake server's explanation must name,
    from examples.parquet with plain loops."""
    mine = head_examples(folder, layer, head)
    top = mine[mine["rank"].notna()].sort_values("rank")
    explaining = top[top["rank"] % 2 == 0]
    peak = max(float(a) for acts in explaining["activations"] for a in acts)
    blocks, best, target = [], -1, ""
    for i, (tokens, acts) in enumerate(
        zip(explaining["tokens"], explaining["activations"], strict=True)
    ):
        lines = [f"Excerpt {i + 1}:"]
        for t, a in zip(tokens, acts, strict=True):
            v = min(10, max(0, round(10 * float(a) / peak)))
            lines.append(f"{json.dumps(t, ensure_ascii=False)}\t{v}")
            if v > best:
                best, target = v, t
        blocks.append("\n".join(lines))
    return blocks, target


def score_by_hand(folder: Path, layer: int, head: int, target: str, scored_on: list[str]) -> float:
    """The correlation of 'fires on `target`' (10 on it, else 0) with the head's activations on
    the windows `scored_on`."""
    mine = head_examples(folder, layer, head)
    windows = {f"top:{int(r.rank)}": r for r in mine.itertuples() if r.rank == r.rank}
    windows |= {
        f"sample:{r.doc_id}:{r.window_start}": r for r in mine.itertuples() if r.rank != r.rank
    }
    predicted, real = [], []
    for label in scored_on:
        w = windows[label]
        predicted += [10.0 if t == target else 0.0 for t in w.tokens]
        real += [float(a) for a in w.activations]
    return pearson(predicted, real)


def test_end_to_end_against_a_hand_computation(
    folder: Path, server: FakeLlm, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(llm_args(folder, server, "--llm-concurrency", "3")) == 0, capsys.readouterr()
    out, err = capsys.readouterr()
    assert f"{N_HEADS} components explained" in out and err == ""
    got = rows(folder)
    assert len(got) == N_HEADS
    assert (got["explainer"] == "llm:fake").all() and (got["version"] == "llm-1").all()
    assert got["control_score"].isna().all()
    prompts = {
        c["body"]["messages"][1]["content"] for c in server.chats() if c["kind"] == "explain"
    }
    assert len(server.chats()) == 2 * N_HEADS  # one explain, one simulate each
    scores = []
    for _, layer, head in got.index:
        blocks, target = by_hand(folder, layer, head)
        assert any(all(b in p for b in blocks) for p in prompts)  # scaled 0-10, by hand
        row = got.loc[("attention_head", layer, head)]
        assert row["explanation"] == f"Fires on {json.dumps(target)}."
        score = score_by_hand(folder, layer, head, target, list(row["scored_on"]))
        assert row["score"] == pytest.approx(score, abs=1e-9)
        tops = sorted(int(s[4:]) for s in row["scored_on"] if s.startswith("top:"))
        assert tops == [r for r in range(K) if r % 2 == 1]  # held out: the odd ranks
        scores.append(score)
    assert len(set(scores)) > 1 and max(scores) > 0.2  # scores that say something
    assert server.max_in_flight == 3  # --llm-concurrency, reached and never passed


def test_the_control_by_hand(folder: Path, server: FakeLlm) -> None:
    assert main(llm_args(folder, server, "--llm-control")) == 0
    got = rows(folder)
    partners = control_partners([("attention_head", la, h, None) for _, la, h in got.index])
    # A partner with the same explanation asks the same question: answered from the cache.
    same = sum(
        got.loc[key[:3], "explanation"] == got.loc[partner[:3], "explanation"]
        for key, partner in partners.items()
    )
    assert server.counts == {"explain": N_HEADS, "simulate": 2 * N_HEADS - same}
    for (_, layer, head), row in got.iterrows():
        partner = partners[("attention_head", layer, head, None)]
        _, target = by_hand(folder, partner[1], partner[2])
        control = score_by_hand(folder, layer, head, target, list(row["scored_on"]))
        assert row["control_score"] == pytest.approx(control, abs=1e-9)
    assert got["score"].mean() > got["control_score"].mean()
    before = len(server.log)
    assert main(llm_args(folder, server, "--llm-control")) == 0
    assert len(server.log) == before  # nothing asked twice


def test_a_second_run_pays_for_nothing(folder: Path, server: FakeLlm) -> None:
    config = LlmConfig(server.url, "fake")
    first = explain(folder, ["heads"], "llm", llm=config)
    assert (first.explained, first.failed) == (N_HEADS, [])
    before, n = rows(folder), len(server.log)
    path = folder / "explanations.parquet"
    mtime = path.stat().st_mtime_ns
    again = explain(folder, ["heads"], "llm", llm=config)
    assert (again.explained, len(server.log), path.stat().st_mtime_ns) == (0, n, mtime)
    path.unlink()  # the rows gone, the cache kept: every answer comes from the cache
    again = explain(folder, ["heads"], "llm", llm=config)
    assert (again.explained, len(server.log)) == (N_HEADS, n)
    pd.testing.assert_frame_equal(rows(folder), before)
    other = explain(folder, ["heads"], "llm", llm=LlmConfig(server.url, "other"))
    assert other.explained == N_HEADS and len(server.chats()) == 4 * N_HEADS  # another model


def test_retries_honour_retry_after_and_give_up(folder: Path, server: FakeLlm) -> None:
    plan = {("explain", 1): "429", ("explain", 2): "500", ("explain", 3): "drop"}
    plan |= {("simulate", n): "500" for n in range(1, 5)}  # the first component's: all 4 attempts
    server.rule = lambda kind, n: plan.get((kind, n))
    config = LlmConfig(server.url, "fake", concurrency=1, attempts=4, backoff_s=0.01)
    result = explain(folder, ["heads"], "llm", llm=config)
    chats = server.chats()
    first = [c for c in chats if c["body"] == chats[0]["body"]]
    assert len(first) == 4  # 429, 500, dropped, answered
    assert first[1]["time"] - first[0]["time"] >= 1.0  # Retry-After: 1
    assert first[2]["time"] - first[1]["time"] < 0.5  # the backoff, not Retry-After
    assert result.explained == N_HEADS - 1
    [(key, why)] = result.failed
    assert "no answer after 4 attempts" in why and "HTTP 500" in why
    assert len(rows(folder)) == N_HEADS - 1 and key[:3] not in rows(folder).index


def test_one_failure_leaves_the_others(
    folder: Path, server: FakeLlm, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = {("simulate", 3): "garbage", ("explain", 5): "bad json", ("explain", 7): "hang"}
    server.rule = lambda kind, n: plan.get((kind, n))
    args = llm_args(folder, server, "--llm-timeout", "0.5")
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert f"{N_HEADS - 2} components explained" in out
    assert err.startswith("tdb: error: 2 components not explained (") and err.count("\n") == 1
    assert "run again to retry them" in err
    assert len(rows(folder)) == N_HEADS - 2
    assert server.counts["explain"] == N_HEADS + 1  # the hung request timed out and was retried
    server.rule = lambda kind, n: None
    before = len(server.log)
    assert main(args) == 0
    # Asked again: the garbage one's simulate (its explanation is cached), the other's both.
    assert len(server.log) - before == 1 + 1 + 2  # and the endpoint check
    assert len(rows(folder)) == N_HEADS


def test_a_refused_key_mid_run_stops_it_and_keeps_what_is_done(
    folder: Path, server: FakeLlm
) -> None:
    server.rule = lambda kind, n: "401" if kind == "explain" and n > 10 else None
    config = LlmConfig(server.url, "fake", concurrency=1)
    with pytest.raises(TdbError, match=r"refused the request \(HTTP 401\): set the API key in"):
        explain(folder, ["heads"], "llm", llm=config)
    assert server.counts == {"explain": 11, "simulate": 10}  # no request after the refusal
    assert len(rows(folder)) == 10


@pytest.mark.slow  # the built-in explainer loads the model: about 20 s on a busy machine
def test_builtin_after_llm_replaces_the_rows_and_their_controls(
    folder: Path, server: FakeLlm
) -> None:
    explain(folder, ["heads"], "llm", llm=LlmConfig(server.url, "fake"))
    assert rows(folder)["control_score"].isna().all()
    builtin = explain(folder, ["heads"])
    assert (builtin.explained, builtin.controlled) == (N_HEADS, N_HEADS)
    got = rows(folder)
    assert (got["explainer"] == "builtin").all() and got["control_score"].notna().all()


def test_the_key_never_shows(
    folder: Path, server: FakeLlm, capsys: pytest.CaptureFixture[str]
) -> None:
    # The server echoes the request's Authorization header in an error: struck out.
    server.rule = lambda kind, n: "echo" if kind == "explain" and n <= 2 else None
    config = LlmConfig(server.url, "fake", concurrency=1, attempts=2, backoff_s=0.01)
    result = explain(folder, ["heads"], "llm", llm=config)
    [(_, why)] = result.failed
    assert "HTTP 500" in why and "[API key]" in why and KEY not in why
    for path in folder.rglob("*"):
        assert not path.is_file() or KEY.encode() not in path.read_bytes(), path
    # A key the server refuses: one line naming the variable, not the key.
    server.rule = lambda kind, n: None
    server.key = "another"
    shutil.rmtree(folder / "llm_cache")
    (folder / "explanations.parquet").unlink()
    assert main(llm_args(folder, server)) == 2
    out, err = capsys.readouterr()
    assert "refused the request (HTTP 401)" in err and "TDB_LLM_API_KEY" in err
    assert err.count("\n") == 1 and KEY not in out + err


def test_bad_input_is_one_line_exit_2(
    folder: Path, server: FakeLlm, capsys: pytest.CaptureFixture[str]
) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    base = ["explain", "--scan", str(folder), "--components", "heads"]
    cases = {
        "--llm-url URL and --llm-model NAME": [*base, "--explainer", "llm"],
        "needs --llm-url": [*base, "--explainer", "llm", "--llm-url", server.url],
        "is not available (choose builtin or llm)": [*base, "--explainer", "gpt"],
        "only with --explainer llm": [*base, "--llm-url", server.url],
        "is not an http:// or https:// URL": [
            *llm_args(folder, server)[:-3],
            "ftp://x",
            "--llm-model",
            "m",
        ],
        "--llm-concurrency: must be >= 1": llm_args(folder, server, "--llm-concurrency", "0"),
        "--llm-timeout: must be > 0": llm_args(folder, server, "--llm-timeout", "-1"),
        f"127.0.0.1:{port}/v1: cannot connect": [
            *base,
            "--explainer",
            "llm",
            "--llm-url",
            f"http://127.0.0.1:{port}/v1",
            "--llm-model",
            "m",
        ],
    }
    for message, argv in cases.items():
        started = time.monotonic()
        assert main(argv) == 2, argv
        _out, err = capsys.readouterr()
        assert message in err and err.count("\n") == 1, (argv, err)
        assert time.monotonic() - started < 5
    assert not (folder / "explanations.parquet").exists()
    assert [r["path"] for r in server.log] == []  # no bad run asked anything


def test_a_held_lock_names_the_explain_run_that_holds_it(folder: Path, corpus: Path) -> None:  # noqa: F811
    hold = (
        "import sys; from pathlib import Path; from tdb.scan.out_folder import locked\n"
        "with locked(Path(sys.argv[1]), 'tdb explain', '--scan'):\n"
        "    print('held', flush=True); sys.stdin.read()\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(folder)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        expected = rf"is in use by another `tdb explain` \(pid {holder.pid}, started 20"
        with pytest.raises(TdbError, match=rf"^--scan {re.escape(str(folder))} {expected}"):
            explain(folder, ["heads"])
        with pytest.raises(TdbError, match=rf"^--out {re.escape(str(folder))} {expected}"):
            scan(corpus, folder, ScanSettings(k=K, window=WINDOW, batch_size=16))
    finally:
        holder.communicate("")
    assert holder.returncode == 0 and not (folder / "scan.lock").exists()


def test_docs_llm_commands_run(folder: Path, server: FakeLlm) -> None:
    doc = (Path(__file__).parent.parent / "docs" / "explanations.md").read_text()
    llm = [c for c in commands(doc) if "--explainer llm" in c]
    assert llm, "docs/explanations.md lost its LLM command"
    for command in llm:
        argv = command.replace("http://127.0.0.1:8000/v1", server.url).split()[1:]
        argv = [str(folder) if a == "DIR" else a for a in argv]
        assert main(argv) == 0, command
    assert len(rows(folder)) >= N_HEADS


def test_scaling_and_strict_parsing() -> None:
    import numpy as np

    assert scaled([np.array([0.5, 2.0, -1.0]), np.array([1.0])]) == [[2, 10, 0], [5]]
    assert scaled([np.array([-1.0, 0.0])]) == [[0, 0]]
    assert parse_explanation("  Fires on commas.\n") == "Fires on commas."
    for bad in ["", "one\ntwo", "x" * 301]:
        with pytest.raises(BadAnswerError):
            parse_explanation(bad)
    good = '{"activations": [[0, 10], [3]]}'
    assert parse_simulation(good, [2, 1]) == [[0, 10], [3]]
    assert parse_simulation(f"```json\n{good}\n```", [2, 1]) == [[0, 10], [3]]
    for bad in [
        "[[0, 10], [3]]",
        '{"activations": [[0, 10]]}',
        '{"activations": [[0], [3]]}',
        '{"activations": [[0, 11], [3]]}',
        '{"activations": [[0, 2.5], [3]]}',
        '{"activations": [[0, true], [3]]}',
        "0 10 3",
        f"Sure! {good}",
    ]:
        with pytest.raises(BadAnswerError):
            parse_simulation(bad, [2, 1])
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:05 GMT", now=1445412480.0) == 5.0
    assert retry_after_seconds("soon") is None


def test_the_key_comes_from_the_environment_only(monkeypatch: pytest.MonkeyPatch) -> None:
    assert api_key() == KEY
    monkeypatch.delenv("TDB_LLM_API_KEY")
    assert api_key() is None  # a local server wants none
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
    assert api_key() == "sk-openai"
    monkeypatch.setenv("TDB_LLM_API_KEY", KEY)
    assert api_key() == KEY  # tdb's own first
    with pytest.raises(SystemExit):  # no flag takes a key
        main(["explain", "--scan", "x", "--llm-api-key", KEY])
