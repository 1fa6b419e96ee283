"""Our GPT-2 against Hugging Face `transformers`, and the hook points."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from checkpoints import make_checkpoint
from hook_shapes import assert_documented_hook_shapes
from transformers import GPT2LMHeadModel

from tdb.checkpoint import load_model, save_checkpoint
from tdb.errors import TdbError
from tdb.hooks import HookPoint, Hooks

SHAPES = [
    {"n_layer": 1, "n_embd": 16, "n_head": 1},
    {"n_layer": 2, "n_embd": 32, "n_head": 4},
    {"n_layer": 3, "n_embd": 48, "n_head": 6, "n_inner": 80, "tie_word_embeddings": False},
    {"n_layer": 2, "n_embd": 64, "n_head": 8, "activation_function": "gelu"},
    {"n_layer": 2, "n_embd": 24, "n_head": 2, "activation_function": "relu", "safetensors": False},
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_logits_match_transformers(tmp_path: Path, shape: dict[str, object]) -> None:
    reference = make_checkpoint(tmp_path, with_tokenizer=False, **shape)  # type: ignore[arg-type]
    ours = load_model(tmp_path).model
    tokens = torch.randint(0, 400, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(tokens).logits
    assert (ours(tokens) - expected).abs().max().item() < 1e-4


def test_logits_at_some_positions_only(loaded_random: tuple[GPT2LMHeadModel, Path]) -> None:
    _, directory = loaded_random
    model = load_model(directory).model
    tokens = torch.randint(0, 400, (1, 20))
    full = model(tokens)
    some = model(tokens, logit_positions=torch.tensor([3, 19]))
    torch.testing.assert_close(some, full[:, [3, 19]])


def test_save_checkpoint_round_trips_through_transformers(
    tmp_path: Path, loaded_random: tuple[GPT2LMHeadModel, Path]
) -> None:
    reference, directory = loaded_random
    save_checkpoint(load_model(directory).model, tmp_path)
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    tokens = torch.randint(0, 400, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, reference(tokens).logits)


def test_model_name_resolves_from_local_hf_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    snapshot = tmp_path / "hub" / "models--gpt2" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    make_checkpoint(snapshot, n_layer=1)
    (tmp_path / "hub" / "models--gpt2" / "refs").mkdir()
    (tmp_path / "hub" / "models--gpt2" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    loaded = load_model("gpt2")
    assert loaded.path == snapshot
    assert loaded.tokenizer.has_text


def test_missing_model_and_unsupported_architecture(tmp_path: Path) -> None:
    with pytest.raises(TdbError, match="neither a checkpoint directory nor a model"):
        load_model(str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(TdbError, match="unsupported architecture 'bert'"):
        load_model(tmp_path)


def test_no_parameter_requires_grad_after_loading(
    loaded_random: tuple[GPT2LMHeadModel, Path],
) -> None:
    model = load_model(loaded_random[1]).model
    assert not any(p.requires_grad for p in model.parameters())


def test_every_hook_point_fires_with_the_documented_shape(
    loaded_random: tuple[GPT2LMHeadModel, Path],
) -> None:
    assert_documented_hook_shapes(load_model(loaded_random[1]).model)


def test_a_hook_that_raises_leaves_nothing_behind(
    loaded_random: tuple[GPT2LMHeadModel, Path],
) -> None:
    model = load_model(loaded_random[1]).model
    tokens = torch.randint(0, 400, (1, 6))
    before = model(tokens)

    def boom(x: torch.Tensor, layer: int | None) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        model(tokens, Hooks({HookPoint.MLP_POST: boom}))
    torch.testing.assert_close(model(tokens), before)


def test_a_replacing_hook_changes_the_output(loaded_random: tuple[GPT2LMHeadModel, Path]) -> None:
    model = load_model(loaded_random[1]).model
    tokens = torch.randint(0, 400, (1, 6))
    zeroed = model(tokens, Hooks({HookPoint.MLP_POST: lambda x, layer: x * 0}))
    assert not torch.allclose(zeroed, model(tokens))


@pytest.fixture(scope="module")
def loaded_random(tmp_path_factory: pytest.TempPathFactory) -> tuple[GPT2LMHeadModel, Path]:
    directory = tmp_path_factory.mktemp("random")
    return make_checkpoint(directory, n_layer=2, n_embd=32, n_head=4), directory
