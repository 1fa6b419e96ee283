"""The `tdb nodes` command: the JSON schema, the readable table, and every bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from checkpoints import make_checkpoint

from tdb.checkpoint import LoadedModel
from tdb.cli import main
from tdb.table import node_table

PROMPT = "When Mary and John went to the store, John gave a drink to"
TDB = [sys.executable, "-m", "tdb.cli"]


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, object]:
    assert main(["nodes", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


def test_json_schema(
    checkpoint_dir: Path, loaded: LoadedModel, capsys: pytest.CaptureFixture[str]
) -> None:
    out = run_json(
        capsys,
        PROMPT,
        "--target",
        " Mary",
        "--distractor",
        " John",
        "-k",
        "3",
        "--model",
        str(checkpoint_dir),
    )
    tokenizer = loaded.tokenizer
    tokens = out["tokens"]
    assert isinstance(tokens, list)
    assert [t["id"] for t in tokens] == tokenizer.encode(PROMPT)
    assert "".join(t["text"] for t in tokens) == PROMPT
    direction = out["direction"]
    assert isinstance(direction, dict)
    assert direction["kind"] == "logit_diff"
    assert direction["target_ids"] == tokenizer.encode(" Mary")
    assert direction["distractor_ids"] == tokenizer.encode(" John")
    assert direction["position"] == len(tokens) - 1
    assert isinstance(direction["value"], float)
    assert out["k"] == 3
    assert out["groups"] == ["activation", "write_norm", "direct_effect", "act_times_grad"]
    nodes = out["nodes"]
    assert isinstance(nodes, list) and nodes
    types = set()
    for node in nodes:
        types.add(node["node_type"])
        assert set(node) >= {"id", "node_type", "layer", "token", "index", *out["groups"]}  # type: ignore[misc]
        # Every field of every row, always (key_token and site are null where they don't apply;
        # until the one-request change, tdb nodes --json left them out there).
        assert set(node) >= {"key_token", "site", "name", "component", "values"}
        assert (node["key_token"] is not None) == (node["node_type"] == "attention_head")
        assert node["site"] is None  # no SAE latents in this table
        assert node["values"] == {g: node[g] for g in out["groups"]}
        if node["node_type"] == "attention_head":
            assert node["key_token"] <= node["token"]
        if node["node_type"] == "embedding":
            assert node["layer"] is None and node["index"] == 0
    assert types == {"embedding", "attention_head", "mlp_neuron"}
    assert len({n["id"] for n in nodes}) == len(nodes)


def test_json_equals_the_python_api(
    checkpoint_dir: Path, loaded: LoadedModel, capsys: pytest.CaptureFixture[str]
) -> None:
    out = run_json(
        capsys,
        PROMPT,
        "--target",
        " Mary",
        "--distractor",
        " John",
        "-k",
        "2",
        "--model",
        str(checkpoint_dir),
    )
    table = node_table(loaded, PROMPT, " Mary", " John", k=2)
    assert out == json.loads(json.dumps(table.to_json()))
    frame = table.to_dataframe()
    assert list(frame["id"]) == [n["id"] for n in out["nodes"]]  # type: ignore[union-attr, index]
    assert {"activation", "write_norm", "direct_effect", "act_times_grad", "name"} <= set(
        frame.columns
    )


def test_token_ids_on_a_checkpoint_without_tokenizer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_checkpoint(tmp_path, with_tokenizer=False)
    out = run_json(
        capsys,
        "--token-ids",
        "5,6,7,8",
        "--target-id",
        "9",
        "--distractor-id",
        "10",
        "--model",
        str(tmp_path),
    )
    assert out["tokens"] == [{"id": i, "text": f"<{i}>"} for i in (5, 6, 7, 8)]
    assert (
        main(
            ["nodes", "hello", "--target-id", "1", "--distractor-id", "2", "--model", str(tmp_path)]
        )
        == 2
    )
    assert "no tokenizer" in capsys.readouterr().err


def test_readable_table(checkpoint_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "nodes",
                PROMPT,
                "--target",
                " Mary",
                "--distractor",
                " John",
                "-k",
                "2",
                "--model",
                str(checkpoint_dir),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "direct_effect" in out and "act_times_grad" in out
    assert "head" in out and "neuron" in out and "' Mary'@1" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["", "--target", " Mary", "--distractor", " John"], "prompt is empty"),
        (["x " * 80, "--target", " Mary", "--distractor", " John"], "longer than the model's 64"),
        (
            ["--token-ids", "1,2,999", "--target-id", "1", "--distractor-id", "2"],
            "token id 999 is outside the vocabulary (0..399)",
        ),
        (
            ["--token-ids", "1,two", "--target-id", "1", "--distractor-id", "2"],
            "'1,two' is not a comma-separated list of integers",
        ),
        (["--token-ids", "1,2", "--target-id", "x", "--distractor-id", "2"], "--target-id"),
        (
            ["--token-ids", "1,2", "--target-id", "1", "--distractor-id", "-4"],
            "distractor -4 is outside the vocabulary",
        ),
        ([PROMPT, "--target", " Mary", "--distractor", " John", "-k", "-1"], "-k: must be >= 0"),
        ([PROMPT, "--target", " Mary", "--distractor", " John", "-k", "ten"], "not an integer"),
        (
            [PROMPT, "--target", " Maryanne", "--distractor", " John"],
            "target ' Maryanne' must be a single token, but it splits into ' Mary', 'an', 'n', 'e'",
        ),
        ([PROMPT, "--distractor", " John"], "exactly one of --target TEXT or --target-id N"),
        ([PROMPT, "--token-ids", "1", "--target", " Mary", "--distractor", " John"], "exactly one"),
    ],
)
def test_bad_input_is_a_short_error_with_exit_code_2(
    checkpoint_dir: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main(["nodes", *args, "--model", str(checkpoint_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tdb: error: ")
    assert message in err
    assert "Traceback" not in err


@pytest.mark.slow  # runs `tdb` in subprocesses
def test_missing_model_and_unsupported_architecture(tmp_path: Path) -> None:
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    for model, message in [
        (str(tmp_path / "missing"), "neither a checkpoint directory nor a model"),
        ("no-such-model-name", "local Hugging Face cache"),
        (str(tmp_path / "bert"), "unsupported architecture 'bert' (supported: gpt2, llama"),
    ]:
        proc = subprocess.run(
            [*TDB, "nodes", "hi", "--target", " a", "--distractor", " b", "--model", model],
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr
        assert "Traceback" not in proc.stderr
