"""The jaxtyping annotations are checked while the tests run, not just written.

pyproject.toml's `--jaxtyping-packages=tdb,beartype.beartype` installs jaxtyping's import hook
before conftest.py imports tdb: every function and dataclass in tdb is then checked against its
annotations on each call. Without the hook, every call below would run (torch broadcasts the
wrong shapes) and these tests would fail.
"""

from __future__ import annotations

import pytest
import torch
from jaxtyping import TypeCheckError

from tdb.hooks import NO_HOOKS, HookPoint
from tdb.metrics import MlpInputs, ReadOut, neuron_write_norm
from tdb.models.layers import LayerNorm, causal_mask


def test_a_tensor_of_the_wrong_rank_fails_a_model_layer() -> None:
    norm = LayerNorm(8, eps=1e-5, scale_point=HookPoint.LN1_SCALE)
    assert norm(torch.randn(2, 3, 8), NO_HOOKS).shape == (2, 3, 8)
    with pytest.raises(TypeCheckError, match="batch pos d_model"):
        norm(torch.randn(3, 8), NO_HOOKS)  # [pos d_model]: no batch axis


def test_inconsistent_sizes_of_one_dimension_fail_a_metrics_input() -> None:
    read = ReadOut(positions=(3,), g=torch.randn(1, 8))
    ok = MlpInputs(post=torch.randn(4, 16), grad_post=None, W_out=torch.randn(16, 8), read=read)
    assert neuron_write_norm(ok).shape == (4, 16)
    with pytest.raises(TypeCheckError, match="d_mlp"):  # 16 hidden units, 12 write vectors
        MlpInputs(post=torch.randn(4, 16), grad_post=None, W_out=torch.randn(12, 8), read=read)


def test_a_return_value_of_the_wrong_shape_fails() -> None:
    # A mask with one query row broadcasts against the causal mask: [1 1 4] & [1 4 4] gives
    # [1 4 4], which is not the [batch query_pos key_pos] = [1 1 4] the annotation promises.
    with pytest.raises(TypeCheckError, match="return"):
        causal_mask(4, None, torch.ones(1, 1, 4, dtype=torch.bool), torch.device("cpu"))
