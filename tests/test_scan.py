"""The corpus scan against independent computations: a naive per-window, per-head reference model
for top-k, random sample and statistics; sharding, Ray and kill-and-resume give the same records."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from checkpoints import CORPUS
from reference import naive_run
from transformers import GPT2LMHeadModel

from tdb.checkpoint import LoadedModel
from tdb.errors import TdbError
from tdb.scan import ScanSettings, scan
from tdb.scan.corpus import count_documents, read_corpus
from tdb.scan.examples import EMPTY_DOC, Examples
from tdb.scan.partial import ScanPartial
from tdb.scan.run import KILL_AFTER_SHARDS_ENV, STOP_AFTER_SHARDS_ENV

K, WINDOW, CONTEXT = 3, 8, 3
MASK64 = (1 << 64) - 1


def make_documents(n: int = 14, seed: int = 0) -> list[str]:
    """Documents of 0 to ~30 tokens from the tiny tokenizer's own training text."""
    rng = random.Random(seed)
    words = " ".join(CORPUS[:4]).split()
    # Each document opens with a word of its own: two documents that open alike tie exactly at
    # their first tokens, and which ranks first would then depend on float rounding, which
    # differs between batch shapes (the sharding and Ray tests compare records exactly).
    firsts = rng.sample(sorted(set(words)), n)
    docs = [" ".join([first, *rng.choices(words, k=rng.randint(0, 13))]) for first in firsts]
    docs[3] = ""  # an empty document keeps its id and has no windows
    return docs


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    path.write_text("".join(d + "\n" for d in make_documents()))
    return path


def settings(checkpoint_dir: Path, **kw: int) -> ScanSettings:
    base = {
        "k": K,
        "window": WINDOW,
        "batch_size": 4,
        "shard_windows": 5,
        "seed": 3,
        "context": CONTEXT,
    }
    return ScanSettings(model=str(checkpoint_dir), **(base | kw))


@pytest.fixture(scope="module")
def scanned(
    tmp_path_factory: pytest.TempPathFactory, corpus_file: Path, checkpoint_dir: Path
) -> Path:
    out = tmp_path_factory.mktemp("scan") / "out"
    result = scan(corpus_file, out, settings(checkpoint_dir))
    assert result.n_shards >= 3 and result.shards_run == result.n_shards
    return out


def read(out: Path, name: str = "examples.parquet") -> pa.Table:
    return pq.read_table(out / name)


# --- an independent reference: every window through the naive model, alone --------------------


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def naive_sample_key(seed: int, source: str, component: int, doc_id: int, start: int) -> int:
    import zlib

    window = splitmix64(splitmix64(doc_id ^ seed) ^ start)
    key = splitmix64(splitmix64((zlib.crc32(source.encode()) << 32) + component) ^ window)
    return key - (1 << 64) if key >= 1 << 63 else key  # as int64


def reference_windows(loaded: LoadedModel, checkpoint_dir: Path) -> list[dict[str, object]]:
    """Per window: doc_id, start, tokens, its left context, per-token values per (node_type,
    layer) on the window's tokens, and which of them may be ranked (a head's query at the run's
    first token attends only to itself: never ranked)."""
    hf = GPT2LMHeadModel.from_pretrained(checkpoint_dir).eval()
    out = []
    for doc_id, text in enumerate(make_documents()):
        ids = loaded.tokenizer.encode(text) if text else []
        for start in range(0, len(ids), WINDOW):
            tokens = ids[start : start + WINDOW]
            context = ids[max(0, start - CONTEXT) : start]
            run = context + tokens  # the window runs after its left context
            ref = naive_run(hf, run, position=len(run) - 1, target=0, distractor=1)
            values: dict[tuple[str, int], np.ndarray] = {}
            for layer, post in enumerate(ref.post):
                values["mlp_neuron", layer] = post.numpy()[len(context) :]  # [pos d_mlp]
                heads = [w.norm(dim=-1).amax(dim=1) for w in ref.head_writes[layer]]  # [query]
                values["attention_head", layer] = torch.stack(heads, dim=1).numpy()[
                    len(context) :
                ]  # [pos head]
            ranked = {
                "mlp_neuron": np.ones(len(tokens), dtype=bool),
                "attention_head": np.arange(len(tokens)) + len(context) > 0,
            }
            out.append(
                {
                    "doc_id": doc_id,
                    "start": start,
                    "tokens": tokens,
                    "context": context,
                    "values": values,
                    "ranked": ranked,
                }
            )
    return out


def test_top_k_sample_and_stats_match_a_naive_reference(
    scanned: Path, loaded: LoadedModel, checkpoint_dir: Path
) -> None:
    windows = reference_windows(loaded, checkpoint_dir)
    table = read(scanned).to_pylist()
    stats = {
        (r["node_type"], r["layer"], r["index"]): r
        for r in read(scanned, "stats.parquet").to_pylist()
    }
    rows: dict[tuple[str, int, int], list[dict[str, object]]] = {}
    for row in table:
        rows.setdefault((row["node_type"], row["layer"], row["index"]), []).append(row)
    config = loaded.model.config
    components = [
        ("mlp_neuron", layer, i) for layer in range(config.n_layer) for i in range(config.d_mlp)
    ]
    components += [
        ("attention_head", layer, h)
        for layer in range(config.n_layer)
        for h in range(config.n_head)
    ]
    assert set(rows) == set(components) == set(stats)
    for node_type, layer, index in components:
        per_window = [w["values"][node_type, layer][:, index] for w in windows]
        ranked = [w["ranked"][node_type] for w in windows]
        eligible = [i for i in range(len(windows)) if ranked[i].any()]
        maxima = [
            float(v[r].max()) if r.any() else -np.inf
            for v, r in zip(per_window, ranked, strict=True)
        ]
        # Top-k by brute force: sort every window by (-max, doc_id, start).
        order = sorted(
            eligible,
            key=lambda i: (-maxima[i], windows[i]["doc_id"], windows[i]["start"]),
        )
        got = rows[node_type, layer, index]
        top = sorted((r for r in got if r["rank"] is not None), key=lambda r: r["rank"])
        assert [r["rank"] for r in top] == list(range(K))
        where = {(w["doc_id"], w["start"]): i for i, w in enumerate(windows)}
        for r, expected_i in zip(top, order[:K], strict=True):
            # Windows whose maxima tie up to float rounding (the same leading tokens in two
            # documents) may come in either order: the window at each rank must have the
            # expected maximum; its records are then checked against that window's reference.
            i = where[r["doc_id"], r["window_start"]]
            w = windows[i]
            assert maxima[i] == pytest.approx(maxima[expected_i], abs=1e-5)
            assert r["activation"] == pytest.approx(maxima[i], abs=1e-4)
            masked = np.where(ranked[i], per_window[i], -np.inf)
            assert r["token_position"] == int(masked.argmax())
            assert r["activations"] == pytest.approx(per_window[i].tolist(), abs=1e-4)
            assert r["tokens"] == [loaded.tokenizer.token_text(t) for t in w["tokens"]]
            assert r["context_tokens"] == [loaded.tokenizer.token_text(t) for t in w["context"]]
        # The random sample: the K windows with the smallest hash keys.
        source = f"{node_type}.{layer}"
        keys = [naive_sample_key(3, source, index, w["doc_id"], w["start"]) for w in windows]
        expected = sorted(eligible, key=lambda i: keys[i])[:K]
        sample = [r for r in got if r["rank"] is None]
        assert [(r["doc_id"], r["window_start"]) for r in sample] == [
            (windows[i]["doc_id"], windows[i]["start"]) for i in expected
        ]
        # Statistics over every ranked token.
        every = np.concatenate([v[r] for v, r in zip(per_window, ranked, strict=True)])
        s = stats[node_type, layer, index]
        assert s["count"] == len(every)
        assert s["mean"] == pytest.approx(float(every.mean()), abs=1e-5)
        assert s["variance"] == pytest.approx(float(every.var()), abs=1e-4, rel=1e-4)
        assert s["max"] == pytest.approx(float(every.max()), abs=1e-5)


# --- merging ------------------------------------------------------------------------------


def random_examples(rng: torch.Generator, doc_offset: int, n: int = 5, k: int = 4) -> Examples:
    ex = Examples.empty(n, k, 3, torch.float32)
    n_windows = 6
    key = torch.randint(0, 4, (n, n_windows), generator=rng).float()  # many ties
    ex.absorb_windows_(
        key,
        -key,
        torch.zeros(n, n_windows, dtype=torch.int64),
        torch.arange(n_windows) // 2 + doc_offset,
        torch.arange(n_windows) % 2,
        torch.full((n_windows,), 3),
        torch.randn(n_windows, 3, n, generator=rng),
    )
    return ex


def snapshot(ex: Examples) -> list[list[tuple[float, int, int]]]:
    o = ex.ordered()
    return [
        [
            (float(a), int(d), int(s))
            for a, d, s in zip(o.key[c], o.doc_id[c], o.start[c], strict=True)
            if d != EMPTY_DOC
        ]
        for c in range(o.key.shape[0])
    ]


def test_merge_is_associative_and_commutative() -> None:
    rng = torch.Generator().manual_seed(0)
    parts = [random_examples(rng, doc_offset=10 * i) for i in range(4)]

    def fold(order: list[int]) -> Examples:
        acc = Examples.from_arrays(parts[order[0]].to_arrays(""), "")
        for i in order[1:]:
            acc.absorb_(parts[i])
        return acc

    a, b = fold([0, 1, 2, 3]), fold([3, 1, 0, 2])
    left = fold([0, 1])
    right = fold([2, 3])
    left.absorb_(right)
    assert snapshot(a) == snapshot(b) == snapshot(left)
    # Brute force: all windows of all parts, sorted.
    for c in range(5):
        every = sorted(t for p in parts for t in snapshot(p)[c])
        assert snapshot(a)[c] == every[:4]


def test_sharding_and_batching_do_not_change_the_records(
    scanned: Path, corpus_file: Path, checkpoint_dir: Path, tmp_path: Path
) -> None:
    other = scan(
        corpus_file, tmp_path / "one", settings(checkpoint_dir, shard_windows=1000, batch_size=7)
    )
    assert other.n_shards == 1
    for name in ("examples.parquet", "stats.parquet"):
        assert_same_records(read(scanned, name), read(tmp_path / "one", name), rtol=0, atol=1e-5)


# --- Ray, resume, re-run ----------------------------------------------------------------------


@pytest.mark.slow  # starts a local Ray cluster
def test_local_ray_cluster_gives_the_in_process_records(
    scanned: Path, corpus_file: Path, checkpoint_dir: Path, tmp_path: Path
) -> None:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = scan(corpus_file, tmp_path / "ray", settings(checkpoint_dir), ray_address="local")
    finally:
        ray.shutdown()
    assert result.shards_run == result.n_shards >= 3
    for name in ("examples.parquet", "stats.parquet"):
        assert_same_records(read(scanned, name), read(tmp_path / "ray", name))


def assert_same_records(a: pa.Table, b: pa.Table, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Same rows, same order, every non-float column equal; float columns equal to float32
    rounding: a matmul's summation order, so its last bit, depends on the thread count (a Ray
    actor runs torch on one thread) and on how busy the machine is (MKL's dynamic threading)."""
    assert a.schema == b.schema and a.num_rows == b.num_rows
    for name in a.column_names:
        x, y = a[name].to_pylist(), b[name].to_pylist()
        kind = a.schema.field(name).type
        floats = pa.types.is_floating(kind) or (
            pa.types.is_list(kind) and pa.types.is_floating(kind.value_type)
        )
        if not floats:
            assert x == y, name
            continue
        for u, v in zip(x, y, strict=True):
            assert (u is None) == (v is None), name
            np.testing.assert_allclose(
                np.asarray(u, np.float64),
                np.asarray(v, np.float64),
                rtol=rtol,
                atol=atol,
                err_msg=name,
            )


def cli_args(out: Path, corpus: Path, checkpoint_dir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "tdb.cli",
        "scan",
        "--corpus",
        str(corpus),
        "--out",
        str(out),
        "--model",
        str(checkpoint_dir),
        "--quiet",
        *("-k", str(K), "--window", str(WINDOW), "--batch-size", "4"),
        *("--shard-windows", "5", "--seed", "3", "--context", str(CONTEXT)),
    ]


def cli_scan(
    out: Path, corpus: Path, checkpoint_dir: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli_args(out, corpus, checkpoint_dir),
        capture_output=True,
        text=True,
        env=os.environ | (env or {}),
        timeout=300,
    )


@pytest.mark.slow  # runs, kills and resumes scans in subprocesses
def test_killed_scan_resumes_to_the_same_records_and_a_finished_one_is_left_alone(
    scanned: Path, corpus_file: Path, checkpoint_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "killed"
    killed = cli_scan(out, corpus_file, checkpoint_dir, {KILL_AFTER_SHARDS_ENV: "2"})
    assert killed.returncode == -9, killed.stderr  # SIGKILL, right after its 2nd checkpoint
    assert (out / "state.npz").is_file() and not (out / "examples.parquet").exists()
    assert (out / "scan.lock").is_file()  # a stale lock: flock died with the process
    (out / "shards" / "shard-000009.npz.tmp").write_bytes(b"half a file")  # a torn write
    resumed = cli_scan(out, corpus_file, checkpoint_dir)
    assert resumed.returncode == 0, resumed.stderr
    manifest = json.loads((out / "scan.json").read_text())
    assert manifest["complete"] and f"{manifest['n_shards'] - 2} shards scanned" in resumed.stdout
    assert not list((out / "shards").iterdir())
    for name in ("examples.parquet", "stats.parquet"):
        assert_same_records(read(scanned, name), read(out, name))
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    again = cli_scan(out, corpus_file, checkpoint_dir)
    assert again.returncode == 0 and "already complete" in again.stdout
    assert before == {
        p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()
    }


@pytest.mark.slow  # two scans in subprocesses
def test_a_second_scan_into_a_running_scans_folder_is_refused_and_the_first_finishes(
    scanned: Path, corpus_file: Path, checkpoint_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "shared"
    first = subprocess.Popen(
        cli_args(out, corpus_file, checkpoint_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ | {STOP_AFTER_SHARDS_ENV: "2"},
    )
    try:
        _, status = os.waitpid(first.pid, os.WUNTRACED)  # it stops itself mid-scan
        assert os.WIFSTOPPED(status), status
        second = cli_scan(out, corpus_file, checkpoint_dir)
        assert second.returncode == 2, second.stderr
        message = second.stderr.strip()
        assert "\n" not in message and message.startswith(f"tdb: error: --out {out} is in use")
        assert f"pid {first.pid}, started 20" in message, message
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "examples.parquet",
        "scan.json",
        "shards",
        "stats.parquet",
    ]
    for name in ("examples.parquet", "stats.parquet"):
        assert_same_records(read(scanned, name), read(out, name))
    again = cli_scan(out, corpus_file, checkpoint_dir)
    assert again.returncode == 0 and "already complete" in again.stdout, again.stderr


def test_a_held_lock_refuses_a_scan_and_a_released_one_leaves_nothing(
    corpus_file: Path, checkpoint_dir: Path, tmp_path: Path
) -> None:
    from tdb.scan.out_folder import locked

    out = tmp_path / "held"
    with locked(out):  # another open file, so another lock, though in this process
        holder = (out / "scan.lock").read_text().strip()
        assert holder.startswith(f"pid {os.getpid()}, started 20")
        details = holder.removesuffix(", `tdb scan`")
        with pytest.raises(
            TdbError, match=rf"--out {out} is in use by another `tdb scan` \({details}\)"
        ):
            scan(corpus_file, out, settings(checkpoint_dir))
    assert not out.exists()  # created for the lock, empty: removed
    failed = tmp_path / "failed"
    with pytest.raises(TdbError, match="longer than the model's context"):
        scan(corpus_file, failed, settings(checkpoint_dir, window=100_000))
    assert not failed.exists()


class StopAfter:
    """A progress bar that interrupts the scan after `n` checkpointed shards (in-process)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def start(self, total_docs: int) -> None:
        pass

    def docs(self, n: int) -> None:
        self.n -= 1
        if self.n == 0:
            raise KeyboardInterrupt

    def tokens(self, n: int) -> None:
        pass

    def stop(self) -> None:
        pass


@pytest.mark.slow  # interrupts a scan, then resumes one
def test_a_corrupt_checkpoint_says_how_to_recover(
    scanned: Path, corpus_file: Path, checkpoint_dir: Path, tmp_path: Path
) -> None:
    interrupted = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        scan(corpus_file, interrupted, settings(checkpoint_dir), progress=StopAfter(2))
    state = np.load(interrupted / "state.npz")
    arrays = dict(state.items())
    state.close()
    name = next(n for n in arrays if n.endswith("/top/values"))

    def flip_bytes(data: bytes) -> bytes:
        middle = len(data) // 2
        return (
            data[:middle]
            + bytes(b ^ 0xFF for b in data[middle : middle + 64])
            + data[middle + 64 :]
        )

    def save(change: dict[str, np.ndarray | None]) -> bytes:
        import io

        buffer = io.BytesIO()
        kept = {n: a for n, a in (arrays | change).items() if a is not None}
        np.savez(buffer, **kept)  # type: ignore[arg-type]
        return buffer.getvalue()

    good = (interrupted / "state.npz").read_bytes()
    corruptions = {
        "CRC": flip_bytes(good),
        "truncated": good[: len(good) // 3],
        "empty": b"",
        "a key missing": save({name: None}),
        "a wrong shape": save({name: arrays[name][:, :1]}),
        "a wrong type": save({name: arrays[name].astype(np.float64)}),
    }
    for i, (what, data) in enumerate(corruptions.items()):
        out = tmp_path / f"corrupt-{i}"
        shutil.copytree(interrupted, out)
        (out / "state.npz").write_bytes(data)
        with pytest.raises(TdbError) as error:
            scan(corpus_file, out, settings(checkpoint_dir))
        message = str(error.value)
        assert "\n" not in message, what
        assert message.startswith(f"{out / 'state.npz'} is corrupt ("), (what, message)
        assert f"delete {out / 'state.npz'} and run the scan again" in message, (what, message)
        if i == 0:  # do as the message says: the scan finishes with the right records
            (out / "state.npz").unlink()
            scan(corpus_file, out, settings(checkpoint_dir))
            for table in ("examples.parquet", "stats.parquet"):
                assert_same_records(read(scanned, table), read(out, table))
    out = tmp_path / "corrupt-shard"  # a shard file waiting for its predecessors (Ray)
    shutil.copytree(interrupted, out)
    (out / "shards" / "shard-000004.npz").write_bytes(flip_bytes(good))
    with pytest.raises(TdbError, match=r"shard-000004.npz is corrupt \(.*\): delete "):
        scan(corpus_file, out, settings(checkpoint_dir))


def test_a_damaged_manifest_is_an_error_not_a_traceback(
    scanned: Path, corpus_file: Path, checkpoint_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "copy"
    shutil.copytree(scanned, out)
    manifest = json.loads((out / "scan.json").read_text())
    (out / "scan.json").write_text(json.dumps(manifest | {"n_shards": None}))
    with pytest.raises(TdbError, match=r"scan.json says complete but lacks its totals"):
        scan(corpus_file, out, settings(checkpoint_dir))
    (out / "scan.json").write_bytes(b"\xff\xfe not text")
    with pytest.raises(TdbError, match=r"scan.json: not valid JSON"):
        scan(corpus_file, out, settings(checkpoint_dir))
    (out / "scan.json").write_text(json.dumps(manifest | {"identity": ["not", "a", "dict"]}))
    with pytest.raises(TdbError, match=r"holds a scan with other settings"):
        scan(corpus_file, out, settings(checkpoint_dir))


def test_bad_input_on_the_command_line_is_one_line_and_exit_2(
    corpus_file: Path, checkpoint_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tdb.cli import main

    def run(corpus: Path, out: Path) -> str:
        args = ["scan", "--corpus", str(corpus), "--out", str(out), "--model", str(checkpoint_dir)]
        assert main([*args, "--quiet", "-k", "2", "--window", "8"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("tdb: error: ") and err.count("\n") == 1, err
        return err

    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    assert f"--out {a_file} is a file, not a folder" in run(corpus_file, a_file)
    assert "cannot create" in run(corpus_file, a_file / "below")
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"PAR1 and then nothing of the sort")
    assert "garbage.parquet: not a readable Parquet file" in run(garbage, tmp_path / "o1")
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"text": "caf\xe9"}\n')
    assert "latin1.jsonl:1: not UTF-8" in run(latin1, tmp_path / "o2")
    ints = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), ints)
    assert "column 'text' holds int64, not strings" in run(ints, tmp_path / "o3")


def test_a_folder_with_another_scan_is_refused(
    scanned: Path, corpus_file: Path, checkpoint_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(TdbError, match="k differ"):
        scan(corpus_file, scanned, settings(checkpoint_dir, k=K + 1))
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(TdbError, match="not empty"):
        scan(corpus_file, tmp_path, settings(checkpoint_dir))


# --- output and input formats -------------------------------------------------------------------


@pytest.mark.slow  # over 2 s (most of it importing duckdb)
def test_duckdb_reads_the_documented_schema(scanned: Path, loaded: LoadedModel) -> None:
    examples = str(scanned / "examples.parquet")
    columns = duckdb.sql(f"DESCRIBE SELECT * FROM '{examples}'").fetchall()
    assert [(c[0], c[1]) for c in columns] == [
        ("node_type", "VARCHAR"),
        ("layer", "INTEGER"),
        ("index", "INTEGER"),
        ("rank", "INTEGER"),
        ("activation", "FLOAT"),
        ("doc_id", "BIGINT"),
        ("window_start", "BIGINT"),
        ("token_position", "INTEGER"),
        ("tokens", "VARCHAR[]"),
        ("activations", "FLOAT[]"),
        ("site", "VARCHAR"),
        ("context_tokens", "VARCHAR[]"),
    ]
    top = duckdb.sql(
        f"""SELECT rank, activation, activations[token_position + 1] AS at_max,
                   list_max(activations) AS list_max, len(tokens) = len(activations) AS same
            FROM '{examples}' WHERE node_type = 'mlp_neuron' AND layer = 1 AND "index" = 7
            AND rank IS NOT NULL ORDER BY rank"""
    ).fetchall()
    assert [r[0] for r in top] == list(range(K))
    assert all(r[1] == r[2] == r[3] and r[4] for r in top)
    assert [r[1] for r in top] == sorted((r[1] for r in top), reverse=True)
    per_component = duckdb.sql(
        f"""SELECT count(*) FILTER (rank IS NOT NULL), count(*) FILTER (rank IS NULL)
            FROM '{examples}' GROUP BY node_type, layer, "index" """
    ).fetchall()
    config = loaded.model.config
    assert len(per_component) == config.n_layer * (config.d_mlp + config.n_head)
    assert set(per_component) == {(K, K)}
    stats = duckdb.sql(f"SELECT count(*), min(count) FROM '{scanned / 'stats.parquet'}'").fetchall()
    assert stats[0][0] == len(per_component) and stats[0][1] > 0


def test_every_corpus_format_reads_the_same_documents(tmp_path: Path) -> None:
    docs = make_documents()
    text = tmp_path / "docs.txt"
    text.write_text("".join(d + "\n" for d in docs))
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    parquet = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": docs}), parquet, row_group_size=4)
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    for i, d in enumerate(docs):
        (folder / ("sub" if i > 9 else "") / f"{i:03d}.txt").write_text(d)
    (folder / "notes.md").write_text("not a .txt file")
    expected = list(enumerate(docs))
    for path in (text, jsonl, parquet, folder):
        assert [(d.doc_id, d.text) for d in read_corpus(path)] == expected, path
        assert count_documents(path) == len(docs)
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(TdbError, match=r"bad.jsonl:2: no string field 'text'"):
        list(read_corpus(tmp_path / "bad.jsonl"))


# --- component pages ----------------------------------------------------------------------------


def test_component_routes_serve_json_and_a_page(scanned: Path, tmp_path: Path) -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from tdb.scan.routes import scan_router

    app = FastAPI()
    app.include_router(scan_router(scanned))
    client = TestClient(app)
    got = client.get("/api/component/mlp_neuron/1/7")
    assert got.status_code == 200
    body = got.json()
    rows = read(scanned).filter(pa.compute.field("layer") == 1).to_pylist()
    expected = [r for r in rows if r["node_type"] == "mlp_neuron" and r["index"] == 7]
    assert [e["rank"] for e in body["top"]] == list(range(K))
    assert [(e["doc_id"], e["window_start"], e["activation"]) for e in body["top"]] == [
        (r["doc_id"], r["window_start"], r["activation"]) for r in expected if r["rank"] is not None
    ]
    assert len(body["random_sample"]) == K
    assert body["stats"]["count"] > 0 and body["stats"]["max"] == pytest.approx(
        body["top"][0]["activation"]
    )

    page = client.get("/component/attention_head/0/2")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "attention_head L0 #2" in page.text and "http" not in page.text.split("<body>")[1]
    assert client.get("/component/mlp_neuron/0/100000").status_code == 404
    assert (
        "no mlp_neuron 100000" in client.get("/api/component/mlp_neuron/0/100000").json()["detail"]
    )
    assert client.get("/api/component/neuron/0/1").status_code == 422
    with pytest.raises(TdbError, match="no finished scan"):
        scan_router(tmp_path)


@pytest.mark.slow  # headless Chromium
def test_the_component_page_renders_its_heatmaps_in_a_browser(
    scanned: Path, tmp_path: Path
) -> None:
    import shutil

    from tdb.nodes import NodeType
    from tdb.scan.routes import ScanReader, page_html

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium to render the page with")
    component = ScanReader(scanned).component(NodeType.MLP_NEURON, 0, 3)
    page = tmp_path / "page.html"
    page.write_text(page_html(component))
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    examples = component.top + component.random_sample
    n_tokens = dom.count('class="tok"') + dom.count('class="tok max"')
    assert n_tokens == sum(len(e.tokens) for e in examples)
    assert dom.count('class="tok max"') == len(examples)  # the maximum, outlined
    assert "mlp_neuron — layer 0, index 3" in dom


def test_shards_finishing_out_of_order_wait_on_disk_and_survive_a_restart(
    scanned: Path, corpus_file: Path, checkpoint_dir: Path, loaded: LoadedModel, tmp_path: Path
) -> None:
    from tdb.scan.out_folder import open_out, shard_files
    from tdb.scan.partial import array_layout
    from tdb.scan.run import ShardMerge
    from tdb.scan.shard import scan_shard
    from tdb.scan.sources import model_sources
    from tdb.scan.windows import shards

    s = settings(checkpoint_dir)
    sources = model_sources(loaded.model)
    names = [x.name for x in sources]
    cut = list(shards(read_corpus(corpus_file), loaded.tokenizer, WINDOW, s.shard_windows))
    parts = [scan_shard(loaded.model, sources, shard, s).to_arrays() for shard in cut[:3]]
    open_out(tmp_path, {"test": True})
    first = ShardMerge.open(tmp_path, names, array_layout(sources, K, WINDOW))
    first.add(2, parts[2])  # finished early: waits as a file
    first.add(0, parts[0])  # continues the prefix: merged into the state
    assert (first.prefix, shard_files(tmp_path)) == (1, [2])
    again = ShardMerge.open(tmp_path, names, array_layout(sources, K, WINDOW))  # after a kill
    assert [again.has(i) for i in range(3)] == [True, False, True]
    again.add(1, parts[1])
    assert (again.prefix, shard_files(tmp_path)) == (3, [])
    assert again.state is not None
    state = ScanPartial.from_arrays(parts[0], names)  # the same shards merged in order
    for i in (1, 2):
        state.absorb_(ScanPartial.from_arrays(parts[i], names))
    for name in names:
        a, b = again.state.sources[name], state.sources[name]
        assert torch.equal(a.top.ordered().doc_id, b.top.ordered().doc_id)
        assert torch.equal(a.sample.ordered().start, b.sample.ordered().start)
        assert torch.equal(a.moments.m2, b.moments.m2)


def test_node_table_rows_link_to_the_scans_component_pages(
    scanned: Path, loaded: LoadedModel
) -> None:
    """`tdb serve --scan DIR`: every neuron and head row of a node table links to a page that
    exists, and that page's JSON is the scan's record of that component."""
    from fastapi.testclient import TestClient

    from tdb.scan.routes import scan_router
    from tdb.server.app import create_app

    app = create_app(loaded, extra_routers=[scan_router(scanned)])
    client = TestClient(app, base_url="http://localhost")  # a Host the server answers
    got = client.post("/api/nodes", json={"prompt": [5, 9, 2, 7], "target": 3, "distractor": 4})
    assert got.status_code == 200, got.text
    rows = [r for r in got.json()["nodes"] if r["component"] is not None]
    assert {r["node_type"] for r in rows} == {"mlp_neuron", "attention_head"}
    for row in rows:
        assert client.get(row["component"]).status_code == 200
        component = client.get("/api" + row["component"]).json()
        assert (component["node_type"], component["layer"], component["index"]) == (
            row["node_type"],
            row["layer"],
            row["index"],
        )


def test_sae_latents_are_scanned_next_to_neurons_and_heads(
    tmp_path: Path, corpus_file: Path, checkpoint_dir: Path, loaded: LoadedModel, scanned: Path
) -> None:
    """Two SAEs on layer 1 (attention output, ReLU; MLP output, TopK): their latents' records
    match the naive model's site activations through a naive encoder, and the neurons' and
    heads' records stay what they are without SAEs (the reconstruction error is added back)."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from sae_reference import naive_encode, random_sae, site_tensors

    from tdb.nodes import LatentSite
    from tdb.sae import AttachedSae, save_openai_layout
    from tdb.scan.routes import scan_router

    d_model = loaded.model.config.d_model
    saes = {}
    for site, k, seed in ((LatentSite.ATTN_OUT, None, 1), (LatentSite.MLP_OUT, 4, 2)):
        sae = random_sae(d_model, 16, k, seed)
        with torch.no_grad():
            sae.decoder_bias.copy_(sae.pre_bias)  # OpenAI's layout has one bias
        path = tmp_path / f"{site}.safetensors"
        save_openai_layout(AttachedSae(sae, site, 1, str(site)), path)
        saes[site] = sae
    out = tmp_path / "out"
    paths = tuple(str(tmp_path / f"{site}.safetensors") for site in saes)
    scan(corpus_file, out, dataclasses.replace(settings(checkpoint_dir), saes=paths))
    rows = read(out).to_pylist()

    def key(r: dict[str, object]) -> tuple[object, ...]:
        return tuple(
            r[c] for c in ("node_type", "layer", "index", "rank", "doc_id", "window_start")
        )

    plain = [r for r in rows if r["node_type"] != "autoencoder_latent"]
    before = read(scanned).to_pylist()
    assert [key(r) for r in plain] == [key(r) for r in before]
    for r, b in zip(plain, before, strict=True):
        assert r["site"] is None and r["activation"] == pytest.approx(b["activation"], abs=1e-5)

    hf = GPT2LMHeadModel.from_pretrained(checkpoint_dir).eval()
    windows = []
    for doc_id, text in enumerate(make_documents()):
        ids = loaded.tokenizer.encode(text) if text else []
        for start in range(0, len(ids), WINDOW):
            context = ids[max(0, start - CONTEXT) : start]  # run, not ranked
            ref = naive_run(hf, context + ids[start : start + WINDOW], 0, target=0, distractor=1)
            z = {
                s: naive_encode(sae, site_tensors(ref, s, 1)[0])[len(context) :]
                for s, sae in saes.items()
            }
            windows.append((doc_id, start, z))
    for site in saes:
        latent_rows = [r for r in rows if r["site"] == str(site)]
        assert {r["node_type"] for r in latent_rows} == {"autoencoder_latent"}
        for index in range(16):
            maxima = [float(z[site][:, index].max()) for _, _, z in windows]
            order = sorted(range(len(windows)), key=lambda i: (-maxima[i], *windows[i][:2]))
            got = [r for r in latent_rows if r["index"] == index]
            top = sorted((r for r in got if r["rank"] is not None), key=lambda r: r["rank"])
            for r, i in zip(top, order[:K], strict=True):
                assert (r["doc_id"], r["window_start"]) == windows[i][:2]
                assert r["activation"] == pytest.approx(maxima[i], abs=1e-4)
            name = f"autoencoder_latent.{site}.1"
            sample_keys = [naive_sample_key(3, name, index, d, s) for d, s, _ in windows]
            expected = sorted(range(len(windows)), key=lambda i: sample_keys[i])[:K]
            assert [(r["doc_id"], r["window_start"]) for r in got if r["rank"] is None] == [
                windows[i][:2] for i in expected
            ]

    client = TestClient(FastAPI())
    client.app.include_router(scan_router(out))  # type: ignore[attr-defined]
    one = client.get("/api/component/autoencoder_latent/1/3?site=mlp_out")
    assert one.status_code == 200 and one.json()["site"] == "mlp_out"
    both = client.get("/api/component/autoencoder_latent/1/3")
    assert both.status_code == 404 and "?site=" in both.json()["detail"]


def test_latents_flag_takes_the_demo_model_by_default_or_by_path(tmp_path: Path) -> None:
    from tdb.checkpoint import DEMO_MODEL_DIR
    from tdb.cli import demo_sae_dir
    from tdb.latents import DEMO_SAE_DIR

    assert demo_sae_dir(None) == demo_sae_dir(str(DEMO_MODEL_DIR)) == (str(DEMO_SAE_DIR),)
    with pytest.raises(TdbError, match="--sae DIR_OR_FILE"):
        demo_sae_dir(str(tmp_path))
