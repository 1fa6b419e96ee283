"""`loaded.run` and `patch`: a right-padded batch equals one-at-a-time runs (every architecture),
logits equal Hugging Face `transformers`', hooks and patches replace what they say, and bad input
gets a TdbError that names the argument."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoints import make_checkpoint
from jaxtyping import TypeCheckError
from test_architectures import SHAPES
from test_architectures import make_checkpoint as make_other_checkpoint
from transformers import GPT2LMHeadModel
from typecheck import unchecked

from tdb.activation_cache import ActivationCache, RunResult
from tdb.checkpoint import LoadedModel, load_model
from tdb.errors import TdbError
from tdb.hooks import HookPoint, patch

PROMPTS = [
    "When Mary and John went to the store, John gave a drink to",
    "Paris, France.",
    "When Tom and Anna went to the park,",
]
IDS = [[5, 17, 99, 150, 3, 17, 42, 8, 77, 5, 120], [7, 8], [1, 2, 3, 4, 5, 6]]


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread (see test_architectures.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[GPT2LMHeadModel, LoadedModel]:
    directory = tmp_path_factory.mktemp("gpt2-random")
    return make_checkpoint(directory), load_model(directory)


def assert_batch_equals_one_at_a_time(
    loaded: LoadedModel, prompts: list[str] | list[list[int]]
) -> None:
    batch = loaded.run(prompts, cache=list(HookPoint))
    assert batch.tokens.shape == (len(prompts), max(batch.lengths))
    for i, prompt in enumerate(prompts):
        alone, from_batch = loaded.run(prompt, cache=list(HookPoint)), batch.prompt(i)
        assert from_batch.lengths == alone.lengths
        torch.testing.assert_close(from_batch.tokens, alone.tokens, rtol=0, atol=0)
        torch.testing.assert_close(from_batch.logits, alone.logits, rtol=1e-5, atol=1e-5)
        assert set(from_batch.cache) == set(alone.cache)
        assert len(alone.cache) > 10 * loaded.model.config.n_layer  # every point the model has
        for key in alone.cache:
            got, want = from_batch.cache[key], alone.cache[key]  # OUTSIDE_LAYERS is right
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=str(key))
        torch.testing.assert_close(batch.last_logits[i], alone.logits[0, -1], rtol=1e-5, atol=1e-5)


def test_a_padded_batch_equals_one_prompt_at_a_time(
    pair: tuple[GPT2LMHeadModel, LoadedModel],
) -> None:
    assert_batch_equals_one_at_a_time(pair[1], PROMPTS)


@pytest.mark.parametrize(
    "shape",
    [SHAPES[i] for i in (0, 3, 4, 6, 8)],
    ids=["llama", "qwen2-window3", "mistral-window4", "gemma", "neox"],
)
def test_every_architecture_pads_without_a_mask(
    tmp_path: Path, shape: tuple[str, dict[str, object]]
) -> None:
    """Rotary positions, sliding windows, parallel blocks: right padding changes nothing."""
    arch, kwargs = shape
    make_other_checkpoint(tmp_path, arch, **kwargs)
    assert_batch_equals_one_at_a_time(load_model(tmp_path), IDS)


def test_logits_equal_transformers(pair: tuple[GPT2LMHeadModel, LoadedModel]) -> None:
    reference, loaded = pair
    result = loaded.run(PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        tokens = torch.tensor([loaded.tokenizer.encode(prompt)])
        with torch.no_grad():
            expected = reference(tokens).logits
        torch.testing.assert_close(result.prompt(i).logits, expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(
            result.logits[i, : tokens.shape[1]], expected[0], rtol=1e-4, atol=1e-4
        )


def test_inputs_text_ids_and_tensors(pair: tuple[GPT2LMHeadModel, LoadedModel]) -> None:
    loaded = pair[1]
    ids = [loaded.tokenizer.encode(p) for p in PROMPTS]
    by_text = loaded.run(PROMPTS).logits
    assert loaded.run(ids).logits.equal(by_text)
    assert loaded.run(PROMPTS[0]).logits.equal(loaded.run(ids[0]).logits)
    assert loaded.run(torch.tensor(ids[0])).logits.equal(loaded.run(ids[0]).logits)
    assert loaded.run([torch.tensor(i) for i in ids]).logits.equal(by_text)
    assert loaded.run([np.array(i) for i in ids]).logits.equal(by_text)  # numpy ids
    result = loaded.run(PROMPTS[1])
    assert result.lengths == (len(ids[1]),) and result.logits.shape[:2] == (1, len(ids[1]))


def test_cache_keys_names_and_layers(pair: tuple[GPT2LMHeadModel, LoadedModel]) -> None:
    loaded = pair[1]
    cache = loaded.run(PROMPTS, cache=["resid_pre", HookPoint.RESID_FINAL, "ATTN_PROBS"]).cache
    n_layer = loaded.model.config.n_layer
    assert set(cache) == {(HookPoint.RESID_PRE, layer) for layer in range(n_layer)} | {
        (HookPoint.RESID_FINAL, None)
    } | {(HookPoint.ATTN_PROBS, layer) for layer in range(n_layer)}
    assert cache["resid_pre", -1].equal(cache[HookPoint.RESID_PRE, n_layer - 1])
    assert cache["resid_final"].shape == (
        3,
        max(len(loaded.tokenizer.encode(p)) for p in PROMPTS),
        32,
    )
    assert cache["attn_probs", 0].shape[:2] == (3, 4)
    assert ("resid_pre", -1) in cache and (HookPoint.RESID_FINAL, None) in cache
    assert "resid_final" in cache and "resid_pre" not in cache and ("mlp_out", 0) not in cache
    assert ("resid_pre", 9) not in cache and ("nope", 0) not in cache and 3 not in cache


def test_hooks_run_before_the_cache_and_in_order(pair: tuple[GPT2LMHeadModel, LoadedModel]) -> None:
    loaded = pair[1]
    calls: list[tuple[str, int | None]] = []

    def zero_head_1(z: torch.Tensor, layer: int | None) -> torch.Tensor | None:
        calls.append(("zero", layer))
        if layer != 1:
            return None
        z = z.clone()
        z[:, :, 1] = 0
        return z

    def look(z: torch.Tensor, layer: int | None) -> None:
        calls.append(("look", layer))

    result = loaded.run(PROMPTS, cache=["attn_z"], hooks={"attn_z": [zero_head_1, look]})
    assert calls == [("zero", 0), ("look", 0), ("zero", 1), ("look", 1)]
    assert result.cache["attn_z", 1][:, :, 1].abs().max() == 0
    assert result.cache["attn_z", 0][:, :, 1].abs().max() > 0
    assert not result.logits.equal(loaded.run(PROMPTS).logits)


def test_patch_replaces_only_the_chosen_layer_positions_and_heads(
    pair: tuple[GPT2LMHeadModel, LoadedModel],
) -> None:
    loaded = pair[1]
    source = loaded.run("When Tom and Anna went to the park,", cache=["attn_z", "attn_probs"])
    target_prompt = "When Mary and John went to the store,"
    assert source.lengths == loaded.run(target_prompt).lengths
    plain = loaded.run(target_prompt, cache=["attn_z"])
    for positions, heads in [(None, None), (3, None), ([1, -1], 2), (None, [0, 3])]:
        hook = patch(source.cache, "attn_z", 1, positions=positions, heads=heads)
        patched = loaded.run(target_prompt, cache=["attn_z"], hooks={"attn_z": hook}).cache
        expected = plain.cache["attn_z", 1].clone()  # [batch pos head d_head]
        pos = slice(None) if positions is None else positions
        head = slice(None) if heads is None else heads
        expected[:, pos, head] = source.cache["attn_z", 1][:, pos, head]
        assert patched["attn_z", 1].equal(expected)
        assert patched["attn_z", 0].equal(plain.cache["attn_z", 0])
    # attention patterns: positions are query positions
    hook = patch(source.cache, "attn_probs", 0, positions=2, heads=1)
    patched = loaded.run(target_prompt, cache=["attn_probs"], hooks={"attn_probs": hook}).cache
    assert patched["attn_probs", 0][0, 1, 2].equal(source.cache["attn_probs", 0][0, 1, 2])
    assert not patched["attn_probs", 0][0, 1, 3].equal(source.cache["attn_probs", 0][0, 1, 3])


def test_a_one_prompt_cache_patches_every_prompt_of_a_batch(
    pair: tuple[GPT2LMHeadModel, LoadedModel],
) -> None:
    loaded = pair[1]
    source = loaded.run([1, 2, 3, 4], cache=["resid_pre"])
    hooks = {"resid_pre": patch(source.cache, "resid_pre", 0, positions=0)}
    result = loaded.run([[5, 2, 3, 4], [6, 2, 3, 4]], hooks=hooks)
    assert torch.allclose(result.logits[0], source.logits[0], atol=1e-5)
    assert torch.allclose(result.logits[1], source.logits[0], atol=1e-5)


def test_bad_input_names_the_argument(pair: tuple[GPT2LMHeadModel, LoadedModel]) -> None:
    loaded = pair[1]
    result = loaded.run(PROMPTS, cache=["resid_pre", "resid_final"])
    cases = [
        (lambda: loaded.run(PROMPTS, cache=["resid"]), "cache: unknown hook point 'resid'"),
        (lambda: loaded.run(PROMPTS, hooks={"resdi_pre": print}), "hooks: unknown hook point"),
        (lambda: loaded.run(PROMPTS, hooks={"resid_pre": 3}), "hooks['resid_pre']: expected fn"),
        (lambda: loaded.run(["a", ""]), "prompts[1]: '' has no tokens"),
        (lambda: loaded.run([]), "prompts: expected text"),
        (lambda: loaded.run(5), "prompts: expected text"),
        (lambda: loaded.run(torch.zeros(3)), "prompts: an array of token ids must be"),
        (lambda: loaded.run(torch.ones(3, dtype=torch.bool)), "prompts: an array of token ids"),
        (lambda: loaded.run([[1, 2], np.ones(2)]), "prompts[1]: an array of token ids must be"),
        (
            lambda: loaded.run(" John" * 65),
            "prompts[0]: 65 tokens, more than the model's context of 64",
        ),
        (
            lambda: loaded.run([[1, 2], [3, 400]]),
            "prompts[1]: token id 400 is outside the vocabulary",
        ),
        (lambda: loaded.run([1, [2]]), "prompts[0]: expected text or a list of token ids"),
        (
            lambda: result.cache["resid_pre", 2],
            "cache['resid_pre', 2]: layer 2 is out of range: 2 layers",
        ),
        (lambda: result.cache["resid_pre", -3], "layer -3 is out of range"),
        (lambda: result.cache["resid_pre"], "cache['resid_pre']: resid_pre is per layer"),
        (lambda: result.cache["resid_final", 0], "resid_final is outside the layers"),
        (
            lambda: result.cache["mlp_out", 0],
            "cache['mlp_out', 0]: not cached (this run cached resid_final, resid_pre)",
        ),
        (lambda: result.cache["nope", 0], "cache['nope', 0]: unknown hook point 'nope'"),
        (lambda: result.prompt(3), "prompt(3): out of range for 3 prompts"),
        (
            lambda: patch(result.cache, "resid_pre", 1, heads=0),
            "patch('resid_pre', 1): heads= needs",
        ),
        (lambda: patch(result.cache, "resid_pre", 1, positions=99), "positions=99 must be indices"),
        (
            lambda: patch(result.cache, "resid_pre", 7),
            "cache['resid_pre', 7]: layer 7 is out of range",
        ),
        (
            lambda: loaded.run(PROMPTS, hooks={"resid_mid": patch(result.cache, "resid_pre", 1)}),
            "hooks['resid_mid']: patch('resid_pre', 1) patches resid_pre, not resid_mid",
        ),
    ]
    for call, message in cases:
        # Arguments of the wrong type are refused first by the tests' runtime type checker
        # (jaxtyping + beartype, pyproject.toml); without it, as users run, by the message.
        with pytest.raises((TdbError, TypeCheckError)) as error:
            call()
        if isinstance(error.value, TdbError):
            assert message in str(error.value), (message, str(error.value))
        else:
            with pytest.raises(TdbError, match=re.escape(message)):
                unchecked(call)
    mismatch = {"resid_pre": patch(result.cache, "resid_pre", 1)}
    with pytest.raises(TdbError, match=r"patch\('resid_pre', 1\): the cache holds \[3, 14, 32\]"):
        loaded.run("Paris", hooks=mismatch)


def test_types_are_plain_data(pair: tuple[GPT2LMHeadModel, LoadedModel]) -> None:
    result = pair[1].run(PROMPTS[1], cache=["logits"])
    assert isinstance(result, RunResult) and isinstance(result.cache, ActivationCache)
    assert result.cache["logits"].equal(result.logits)
    assert (HookPoint.LOGITS, None) in result.cache and len(result.cache) == 1
