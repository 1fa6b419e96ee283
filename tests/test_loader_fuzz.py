"""Every loader, fed generated corruptions of valid files, either loads or raises TdbError.

The loaders: a checkpoint's weights (model.safetensors, pytorch_model.bin), its config.json
(GPT-2, Qwen2 with sliding windows, GPT-NeoX), its tokenizer.json, SAEs in both layouts, and
`--vector` files (.pt, .npy, text). Corruptions: bytes flipped (mostly near the start, where
headers are), the file cut short, and JSON values replaced with the wrong type, a negative,
zero or a huge number, or removed. Any other exception is a traceback the user would see. The
last test runs `tdb nodes` itself on a sample of the broken inputs: exit 0 or 2, and on 2 one
line, `tdb: error: ...`.

Hypothesis draws the same examples on every run (derandomize), so CI never fails by the draw.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from checkpoints import make_checkpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from test_architectures import make_checkpoint as make_arch_checkpoint

from tdb.checkpoint import load_model
from tdb.cli import main
from tdb.direction.parse import load_vector
from tdb.errors import TdbError
from tdb.sae import load_saes

pytestmark = pytest.mark.slow
D_MODEL = 32

FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# --- corruptions --------------------------------------------------------------------------------


@st.composite
def corrupt_bytes(draw: st.DrawFn, data: bytes) -> bytes:
    """`data` with a few bytes changed (mostly in its first 512, where a header is), cut
    short, or both."""
    out = bytearray(data)
    for _ in range(draw(st.integers(0, 6))):
        near_start = st.integers(0, min(len(out), 512) - 1)
        position = draw(st.one_of(near_start, st.integers(0, len(out) - 1)))
        out[position] ^= draw(st.integers(1, 255))
    if draw(st.booleans()) or out == data:
        out = out[: draw(st.integers(0, len(out) - 1))]
    return bytes(out)


BAD_VALUES = st.one_of(
    st.sampled_from([None, True, False, 0, -1, -5, 1, 2**31, 2**63, 10**30, -(10**30)]),
    st.sampled_from([0.5, -0.5, 1e308, math.nan, math.inf, -math.inf, "", "abc", "32"]),
    st.sampled_from([[], [1, 2], {}, {"a": 1}]),
    st.integers(-(2**70), 2**70),
    st.text(max_size=10),
)


def json_paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path in a JSON value (dict keys, list indices)."""
    paths = [prefix] if prefix else []
    if isinstance(value, dict):
        for k, v in value.items():
            paths += json_paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value[:50]):  # long lists (a tokenizer's merges): the first 50
            paths += json_paths(v, (*prefix, i))
    return paths


@st.composite
def corrupt_json(draw: st.DrawFn, value: Any) -> bytes:
    """`value` as JSON with one to three values replaced or removed, or its text corrupted."""
    if draw(st.integers(0, 4)) == 0:
        return draw(corrupt_bytes(json.dumps(value).encode()))
    value = json.loads(json.dumps(value))  # a deep copy
    for _ in range(draw(st.integers(1, 3))):
        paths = json_paths(value)
        if not paths:
            break
        *parents, last = draw(st.sampled_from(paths))
        parent = value
        for key in parents:
            parent = parent[key]
        if isinstance(parent, dict) and draw(st.integers(0, 4)) == 0:
            del parent[last]
        else:
            parent[last] = copy.deepcopy(draw(BAD_VALUES))  # never one list in two places
    return json.dumps(value).encode()


# --- the valid files ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Files:
    gpt2: Path  # a GPT-2 checkpoint with a tokenizer
    bin: Path  # a GPT-2 checkpoint as pytorch_model.bin
    qwen2: Path  # Qwen2 with sliding windows (the most config keys of the Llama family)
    neox: Path
    openai_sae: Path
    saelens_sae: Path
    vectors: Path  # v.pt, v.npy, v.txt


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    root = tmp_path_factory.mktemp("fuzz")
    gpt2 = root / "gpt2"
    make_checkpoint(gpt2, n_layer=2, n_embd=D_MODEL, n_head=4, n_positions=32, vocab_size=300)
    binary = root / "bin"
    make_checkpoint(binary, n_layer=1, n_embd=D_MODEL, n_head=4, vocab_size=300)
    weights = load_file(str(binary / "model.safetensors"))  # transformers 5 writes only these
    torch.save(weights, binary / "pytorch_model.bin")
    (binary / "model.safetensors").unlink()
    qwen2, neox = root / "qwen2", root / "neox"
    make_arch_checkpoint(
        qwen2,
        "qwen2",
        hidden_size=D_MODEL,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=3,
        max_window_layers=1,
    )
    make_arch_checkpoint(neox, "gpt_neox", hidden_size=D_MODEL, num_attention_heads=4)
    g = torch.Generator().manual_seed(0)
    openai = root / "sae.safetensors"
    save_file(
        {
            "pre_bias": torch.randn(D_MODEL, generator=g),
            "encoder.weight": torch.randn(8, D_MODEL, generator=g),
            "latent_bias": torch.randn(8, generator=g),
            "decoder.weight": torch.randn(D_MODEL, 8, generator=g),
        },
        str(openai),
        metadata={"activation": "TopK", "k": "3", "site": "mlp_out", "layer": "1"},
    )
    saelens = root / "blocks.0.hook_attn_out"
    saelens.mkdir()
    save_file(
        {
            "W_enc": torch.randn(D_MODEL, 8, generator=g),
            "W_dec": torch.randn(8, D_MODEL, generator=g),
            "b_enc": torch.randn(8, generator=g),
            "b_dec": torch.randn(D_MODEL, generator=g),
        },
        str(saelens / "sae_weights.safetensors"),
    )
    cfg = {
        "d_in": D_MODEL,
        "d_sae": 8,
        "hook_name": "blocks.0.hook_attn_out",
        "apply_b_dec_to_input": True,
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": 2},
        "normalize_activations": "none",
    }
    (saelens / "cfg.json").write_text(json.dumps(cfg))
    vectors = root / "vectors"
    vectors.mkdir()
    vector = torch.randn(D_MODEL, generator=g)
    torch.save(vector, vectors / "v.pt")
    np.save(vectors / "v.npy", vector.numpy())
    (vectors / "v.txt").write_text(" ".join(f"{x:.4f}" for x in vector.tolist()))
    for directory in (gpt2, binary, qwen2, neox):  # each loads as it is
        load_model(directory)
    return Files(gpt2, binary, qwen2, neox, openai, saelens, vectors)


def broken_copy(source: Path, scratch: Path, name: str, content: bytes) -> Path:
    """A fresh copy of the directory `source` with its file `name` replaced by `content`."""
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.copytree(source, scratch)
    (scratch / name).write_bytes(content)
    return scratch


def loads_or_refuses(load: Callable[[], object]) -> bool:
    """True if it loaded, False if it raised TdbError (with a one-line message); anything else
    fails the test."""
    try:
        load()
    except TdbError as e:
        assert str(e) and "\n" not in str(e), repr(str(e))
        return False
    return True


def load_and_encode(directory: Path) -> None:
    loaded = load_model(directory)
    if loaded.tokenizer.has_text:
        ids = loaded.tokenizer.encode("When Mary and John went to the store")
        [loaded.tokenizer.token_text(i) for i in ids]


# --- one test per loader ------------------------------------------------------------------------


@FUZZ
@given(data=st.data())
def test_safetensors_weights(files: Files, tmp_path: Path, data: st.DataObject) -> None:
    original = (files.gpt2 / "model.safetensors").read_bytes()
    broken = data.draw(corrupt_bytes(original))
    directory = broken_copy(files.gpt2, tmp_path / "c", "model.safetensors", broken)
    loads_or_refuses(lambda: load_model(directory))


@FUZZ
@given(data=st.data())
def test_pytorch_model_bin(files: Files, tmp_path: Path, data: st.DataObject) -> None:
    broken = data.draw(corrupt_bytes((files.bin / "pytorch_model.bin").read_bytes()))
    directory = broken_copy(files.bin, tmp_path / "c", "pytorch_model.bin", broken)
    loads_or_refuses(lambda: load_model(directory))


@pytest.mark.parametrize("model", ["gpt2", "qwen2", "neox"])
@FUZZ
@given(data=st.data())
def test_config_json(files: Files, tmp_path: Path, data: st.DataObject, model: str) -> None:
    source: Path = getattr(files, model)
    broken = data.draw(corrupt_json(json.loads((source / "config.json").read_text())))
    directory = broken_copy(source, tmp_path / "c", "config.json", broken)
    loads_or_refuses(lambda: load_and_encode(directory))


@FUZZ
@given(data=st.data())
def test_tokenizer_json(files: Files, tmp_path: Path, data: st.DataObject) -> None:
    broken = data.draw(corrupt_json(json.loads((files.gpt2 / "tokenizer.json").read_text())))
    directory = broken_copy(files.gpt2, tmp_path / "c", "tokenizer.json", broken)
    loads_or_refuses(lambda: load_and_encode(directory))


@FUZZ
@given(data=st.data())
def test_openai_sae_file(files: Files, tmp_path: Path, data: st.DataObject) -> None:
    path = tmp_path / "sae.safetensors"
    if data.draw(st.booleans()):
        path.write_bytes(data.draw(corrupt_bytes(files.openai_sae.read_bytes())))
    else:  # valid tensors, broken metadata
        metadata = {"activation": "TopK", "k": "3", "site": "mlp_out", "layer": "1"}
        key = data.draw(st.sampled_from(sorted(metadata)))
        metadata[key] = str(data.draw(BAD_VALUES))
        save_file(load_file(str(files.openai_sae)), str(path), metadata=metadata)
    loads_or_refuses(lambda: load_saes(path))


@FUZZ
@given(data=st.data())
def test_saelens_sae(files: Files, tmp_path: Path, data: st.DataObject) -> None:
    if data.draw(st.booleans()):
        name = "sae_weights.safetensors"
        broken = data.draw(corrupt_bytes((files.saelens_sae / name).read_bytes()))
    else:
        name = "cfg.json"
        broken = data.draw(corrupt_json(json.loads((files.saelens_sae / name).read_text())))
    directory = broken_copy(files.saelens_sae, tmp_path / "blocks.0.hook_attn_out", name, broken)
    loads_or_refuses(lambda: load_saes(directory))


@pytest.mark.parametrize("name", ["v.pt", "v.npy", "v.txt"])
@FUZZ
@given(data=st.data())
def test_vector_files(files: Files, tmp_path: Path, data: st.DataObject, name: str) -> None:
    original = (files.vectors / name).read_bytes()
    if name == "v.txt" and data.draw(st.booleans()):
        broken = data.draw(st.text(max_size=400)).encode("utf-8", "surrogatepass")
    else:
        broken = data.draw(corrupt_bytes(original))
    path = tmp_path / name
    path.write_bytes(broken)
    loads_or_refuses(lambda: load_vector(path, D_MODEL))


# --- the command on a sample of broken inputs ---------------------------------------------------


BREAKS = ["model.safetensors", "config.json", "tokenizer.json", "sae", "saelens", "vector"]


@settings(FUZZ, max_examples=30)
@given(data=st.data())
def test_the_command_prints_one_line_never_a_traceback(
    files: Files, tmp_path: Path, data: st.DataObject, capsys: pytest.CaptureFixture[str]
) -> None:
    """`tdb nodes` on a broken input exits 2 with one line (or, if the input still loads,
    runs: exit 0). An exception escaping `main` here is a traceback the user would see."""
    what = data.draw(st.sampled_from(BREAKS))
    directory = files.gpt2
    ids = ["--token-ids", "1,2,3,4", "--target-id", "5", "--distractor-id", "6"]
    extra: list[str] = []
    if what in {"model.safetensors", "tokenizer.json", "config.json"}:
        original = (files.gpt2 / what).read_bytes()
        if what == "model.safetensors":
            broken = data.draw(corrupt_bytes(original))
        else:
            broken = data.draw(corrupt_json(json.loads(original)))
        directory = broken_copy(files.gpt2, tmp_path / "c", what, broken)
    elif what == "sae":
        path = tmp_path / "sae.safetensors"
        path.write_bytes(data.draw(corrupt_bytes(files.openai_sae.read_bytes())))
        extra = ["--sae", str(path)]
    elif what == "saelens":
        broken = data.draw(corrupt_json(json.loads((files.saelens_sae / "cfg.json").read_text())))
        sae = broken_copy(
            files.saelens_sae, tmp_path / "blocks.0.hook_attn_out", "cfg.json", broken
        )
        extra = ["--sae", str(sae)]
    else:
        path = tmp_path / "v.npy"
        path.write_bytes(data.draw(corrupt_bytes((files.vectors / "v.npy").read_bytes())))
        ids = ["--token-ids", "1,2,3,4", "--vector", str(path)]
    code = main(["nodes", *ids, "--model", str(directory), *extra, "--json"])
    err = capsys.readouterr().err
    assert code in (0, 2), err
    if code == 2:
        assert err.startswith("tdb: error: ") and len(err.strip().splitlines()) == 1, err
