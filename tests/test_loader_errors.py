"""Broken inputs to the loaders reach the user as one line, `tdb: error: ...`, and exit code 2:
never a traceback. One test per kind of broken file (checkpoint weights, config.json, tokenizer,
SAE files) or argument; tests/test_loader_fuzz.py throws generated corruptions at every loader.
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from checkpoints import make_checkpoint
from safetensors.torch import save_file
from typecheck import unchecked

from tdb.checkpoint import load_model
from tdb.cli import main
from tdb.errors import TdbError
from tdb.table import node_table

D_MODEL = 32
IDS = ["--token-ids", "1,2,3", "--target-id", "4", "--distractor-id", "5"]


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small GPT-2 checkpoint with a tokenizer; tests copy it and break the copy."""
    directory = tmp_path_factory.mktemp("good")
    make_checkpoint(directory, n_layer=2, n_embd=D_MODEL, n_head=4, vocab_size=400)
    return directory


def copy(good: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(good, tmp_path / "ckpt"))


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run `tdb ARGV` in-process; it must exit 2 with one line on stderr. Returns that line."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("tdb: error: "), err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    return err


def nodes_error(capsys: pytest.CaptureFixture[str], model: Path, *extra: str) -> str:
    return one_line_error(capsys, ["nodes", *IDS, "--model", str(model), *extra])


def edit_config(directory: Path, **changes: object) -> None:
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(config | changes))


# --- arguments ----------------------------------------------------------------------------------


def test_non_utf8_prompt_argument(good: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # `tdb nodes $'\xff\xfe'`: Python decodes argv with surrogate escapes.
    argv = ["nodes", "\udcff\udcfe", "--target", " a", "--distractor", " b"]
    err = one_line_error(capsys, [*argv, "--model", str(good)])
    assert "not valid UTF-8" in err


@pytest.mark.slow  # runs `tdb` in a subprocess
def test_non_utf8_bytes_through_the_command(good: Path) -> None:
    tdb = [sys.executable, "-m", "tdb.cli"]
    args = [b"nodes", b"\xff\xfe", b"--target", b" a", b"--distractor", b" b"]
    proc = subprocess.run(
        [*(a.encode() for a in tdb), *args, b"--model", str(good).encode()],
        capture_output=True,
        check=False,
    )
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2, err
    assert err.startswith("tdb: error: ") and len(err.strip().splitlines()) == 1, err


def test_model_path_that_does_not_exist(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = nodes_error(capsys, tmp_path / "nope")
    assert "does not exist" in err
    assert "models--" not in err


def test_a_list_of_text_prompts_is_refused_by_name(good: Path) -> None:
    loaded = load_model(good)
    with pytest.raises(TdbError, match="text or a list of token ids"):
        unchecked(lambda: node_table(loaded, ["When Mary", "and John"], " a", " b"))  # type: ignore[arg-type]
    with pytest.raises(TdbError, match="text or a list of token ids, got int"):
        unchecked(lambda: node_table(loaded, 5, " a", " b"))  # type: ignore[arg-type]


# --- weights ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "corrupt",
    [
        pytest.param(lambda b: b[: len(b) // 2], id="truncated"),
        pytest.param(lambda b: b"", id="empty"),
        pytest.param(lambda b: (2**40).to_bytes(8, "little") + b[8:], id="huge-header"),
        pytest.param(lambda b: b[:8] + b"[" + b[9:], id="bad-header-json"),
    ],
)
def test_broken_safetensors_weights(
    good: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    corrupt: Callable[[bytes], bytes],
) -> None:
    directory = copy(good, tmp_path)
    weights = directory / "model.safetensors"
    weights.write_bytes(corrupt(weights.read_bytes()))
    err = nodes_error(capsys, directory)
    assert "model.safetensors" in err


class Evil:
    def __reduce__(self) -> tuple[object, ...]:
        return (print, ("this must never run",))


@pytest.mark.parametrize("kind", ["blocked-pickle", "truncated", "not-a-dict"])
def test_broken_pytorch_model_bin(
    good: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    directory = copy(good, tmp_path)
    (directory / "model.safetensors").unlink()
    weights = directory / "pytorch_model.bin"
    if kind == "blocked-pickle":
        torch.save({"wte.weight": Evil()}, weights)
    elif kind == "truncated":
        torch.save({"wte.weight": torch.zeros(400, D_MODEL)}, weights)
        weights.write_bytes(weights.read_bytes()[:300])
    else:
        torch.save([torch.zeros(3)], weights)
    err = nodes_error(capsys, directory)
    assert "pytorch_model.bin" in err
    assert "this must never run" not in capsys.readouterr().out


def test_config_with_fewer_layers_than_the_weights(
    good: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = copy(good, tmp_path)
    edit_config(directory, n_layer=1)
    err = nodes_error(capsys, directory)
    assert "h.1." in err and "n_layer" in err


# --- config.json --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"n_head": 0}, "n_head must be"),
        ({"n_head": 5}, "divisible"),
        ({"vocab_size": -5}, "vocab_size must be"),
        ({"n_layer": 0}, "n_layer must be"),
        ({"n_embd": -32}, "n_embd must be"),
        ({"n_positions": 0}, "n_positions must be"),
        ({"n_inner": 0}, "n_inner must be"),
        ({"vocab_size": 10**30}, "vocab_size must be"),
        ({"layer_norm_epsilon": -1.0}, "layer_norm_epsilon must be"),
        ({"n_embd": "32"}, "n_embd must be an integer"),
    ],
)
def test_bad_config_values(
    good: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    changes: dict[str, object],
    message: str,
) -> None:
    directory = copy(good, tmp_path)
    edit_config(directory, **changes)
    assert message in nodes_error(capsys, directory)


# --- tokenizer ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text", ["{not json", '{"model": {"type": "Nope"}}', "[]", '{"version": "1.0"}']
)
def test_garbage_tokenizer_json(
    good: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str
) -> None:
    directory = copy(good, tmp_path)
    (directory / "tokenizer.json").write_text(text)
    assert "tokenizer.json" in nodes_error(capsys, directory)


def test_tokenizer_ids_beyond_the_models_vocabulary(
    good: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = copy(good, tmp_path)
    edit_config(directory, vocab_size=300)  # the tokenizer has 400 tokens
    shrink = {"wte.weight": torch.zeros(300, D_MODEL)}
    from safetensors.torch import load_file

    weights = load_file(str(directory / "model.safetensors"))
    save_file(weights | shrink, str(directory / "model.safetensors"))
    err = nodes_error(capsys, directory)
    assert "tokenizer" in err and "300" in err


# --- serve --------------------------------------------------------------------------------------


def test_serve_on_a_broken_checkpoint_stops_before_binding(
    good: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = copy(good, tmp_path)
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    one_line_error(capsys, ["serve", "--model", str(directory), "--port", "0"])


# --- SAE files ----------------------------------------------------------------------------------


def openai_sae(
    path: Path, metadata: dict[str, str], tensors: dict[str, torch.Tensor] | None = None
) -> Path:
    g = torch.Generator().manual_seed(0)
    d_sae = 16
    base = {
        "pre_bias": torch.randn(D_MODEL, generator=g),
        "encoder.weight": torch.randn(d_sae, D_MODEL, generator=g),
        "latent_bias": torch.randn(d_sae, generator=g),
        "decoder.weight": torch.randn(D_MODEL, d_sae, generator=g),
    }
    save_file(base | (tensors or {}), str(path), metadata=metadata)
    return path


RELU_MLP_OUT = {"activation": "ReLU", "site": "mlp_out", "layer": "0"}


@pytest.mark.parametrize(
    ("metadata", "tensors", "message"),
    [
        ({"activation": "TopK", "k": "abc", "site": "mlp_out", "layer": "0"}, {}, "k"),
        ({**RELU_MLP_OUT, "layer": "one"}, {}, "layer"),
        (
            {"activation": "TopK", "k": "0", "site": "mlp_out", "layer": "0"},
            {},
            "sae.safetensors: ",
        ),
        (RELU_MLP_OUT, {"encoder.weight": torch.zeros(16 * D_MODEL)}, "encoder.weight"),
        (RELU_MLP_OUT, {"decoder.weight": torch.zeros(D_MODEL, 17)}, "decoder.weight"),
        (RELU_MLP_OUT, {"latent_bias": torch.zeros(16, dtype=torch.complex64)}, "latent_bias"),
        (RELU_MLP_OUT, {"encoder.weight": torch.zeros(0, D_MODEL)}, "encoder.weight"),
    ],
)
def test_malformed_openai_sae(
    good: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    metadata: dict[str, str],
    tensors: dict[str, torch.Tensor],
    message: str,
) -> None:
    try:
        sae = openai_sae(tmp_path / "sae.safetensors", metadata, tensors)
    except Exception:  # safetensors cannot write this dtype: nothing to test
        pytest.skip("safetensors cannot store this tensor")
    assert message in nodes_error(capsys, good, "--sae", str(sae))


@pytest.mark.parametrize(
    "corrupt", [lambda b: b[: len(b) // 2], lambda b: b"", lambda b: b"\xff" * 8 + b[8:]]
)
def test_broken_sae_safetensors(
    good: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    corrupt: Callable[[bytes], bytes],
) -> None:
    sae = openai_sae(tmp_path / "sae.safetensors", RELU_MLP_OUT)
    sae.write_bytes(corrupt(sae.read_bytes()))
    assert "sae.safetensors" in nodes_error(capsys, good, "--sae", str(sae))


SAELENS_CFG = {
    "hook_name": "blocks.0.hook_mlp_out",
    "activation_fn_str": "relu",
    "apply_b_dec_to_input": True,
}


def saelens_sae(
    directory: Path, cfg: object, tensors: dict[str, torch.Tensor] | None = None
) -> Path:
    directory.mkdir()
    g = torch.Generator().manual_seed(0)
    base = {
        "W_enc": torch.randn(D_MODEL, 16, generator=g),
        "W_dec": torch.randn(16, D_MODEL, generator=g),
        "b_enc": torch.randn(16, generator=g),
        "b_dec": torch.randn(D_MODEL, generator=g),
    }
    save_file(base | (tensors or {}), str(directory / "sae_weights.safetensors"))
    text = cfg if isinstance(cfg, str) else json.dumps(cfg)
    (directory / "cfg.json").write_text(text)
    return directory


@pytest.mark.parametrize(
    ("cfg", "tensors", "message"),
    [
        ("{not json", {}, "cfg.json"),
        ("[1, 2]", {}, "cfg.json"),
        ({**SAELENS_CFG, "activation_fn_str": "topk", "k": "abc"}, {}, "k"),
        ({**SAELENS_CFG, "activation_fn_str": "topk", "k": 2.5}, {}, "k"),
        ({**SAELENS_CFG, "apply_b_dec_to_input": "no"}, {}, "apply_b_dec_to_input"),
        (SAELENS_CFG, {"W_enc": torch.zeros(D_MODEL)}, "W_enc"),
        (SAELENS_CFG, {"b_dec": torch.zeros(D_MODEL + 1)}, "b_dec"),
        (SAELENS_CFG, {"W_enc": torch.zeros(D_MODEL, 16, dtype=torch.bool)}, "W_enc"),
    ],
)
def test_malformed_saelens_sae(
    good: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    cfg: object,
    tensors: dict[str, torch.Tensor],
    message: str,
) -> None:
    sae = saelens_sae(tmp_path / "blocks.0.hook_mlp_out", cfg, tensors)
    assert message in nodes_error(capsys, good, "--sae", str(sae))


def test_saelens_directory_without_weights(
    good: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "saes").mkdir()
    sae = saelens_sae(tmp_path / "saes" / "one", SAELENS_CFG)
    (sae / "sae_weights.safetensors").unlink()
    assert "sae_weights.safetensors" in nodes_error(capsys, good, "--sae", str(tmp_path / "saes"))


# --- --vector files -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["blocked-pickle", "strings-npy", "nan-txt", "truncated-npy"])
def test_broken_vector_files(
    good: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    import numpy as np

    if kind == "blocked-pickle":
        path = tmp_path / "v.pt"
        with path.open("wb") as f:
            pickle.dump(Evil(), f)
    elif kind == "strings-npy":
        path = tmp_path / "v.npy"
        np.save(path, np.array(["a"] * D_MODEL))
    elif kind == "truncated-npy":
        path = tmp_path / "v.npy"
        np.save(path, np.zeros(D_MODEL, dtype=np.float32))
        path.write_bytes(path.read_bytes()[:60])
    else:
        path = tmp_path / "v.txt"
        path.write_text(" ".join(["nan"] * D_MODEL))
    argv = ["nodes", "--token-ids", "1,2,3", "--vector", str(path), "--model", str(good)]
    assert "--vector" in one_line_error(capsys, argv)
