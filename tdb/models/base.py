"""The interface every model offers the rest of tdb (capture, metrics, directions, the table).

    >>> def head_count(model: TransformerModel) -> int:
    ...     return model.config.n_head

A model is our own straight-line code for one architecture, with the same named hook points at
the same meaning everywhere, its weights in the shapes the math uses, and these few members.
GPT-2 (`tdb.models.gpt2.GPT2`), the Llama family (`tdb.models.llama.Llama`) and GPT-NeoX
(`tdb.models.neox.NeoX`) all satisfy it; nothing inherits from it (it is a `Protocol`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Protocol, runtime_checkable

from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from tdb.hooks import HookPoint, Hooks


@runtime_checkable  # so the tests' runtime type checker (beartype) can check isinstance
class ModelConfig(Protocol):
    """The shape of a model, in the one dimension vocabulary."""

    @property
    def d_vocab(self) -> int: ...

    @property
    def n_ctx(self) -> int: ...

    @property
    def d_model(self) -> int: ...

    @property
    def n_layer(self) -> int: ...

    @property
    def n_head(self) -> int:
        """Query heads (the heads of the node table, also under grouped-query attention)."""
        ...

    @property
    def d_head(self) -> int: ...

    @property
    def d_mlp(self) -> int:
        """Hidden units of the MLP (gated MLPs: units of act(gate) * up)."""
        ...


@runtime_checkable
class Norm(Protocol):
    """A layer norm or RMSNorm: `norm(x, hooks)`, its scale a hook point (so it can be frozen)."""

    @property
    def w(self) -> Float[Tensor, " d_model"]:
        """The gain (Gemma's 1 + w already folded in)."""
        ...

    def __call__(
        self, x: Float[Tensor, "batch pos d_model"], hooks: Hooks
    ) -> Float[Tensor, "batch pos d_model"]: ...


@runtime_checkable
class AttentionWeights(Protocol):
    @property
    def W_O(self) -> Float[Tensor, "head d_head d_model"]: ...

    @property
    def b_O(self) -> Float[Tensor, " d_model"]:
        """The output bias (zeros where the checkpoint has none)."""
        ...

    def head_logit(
        self,
        x_query: Float[Tensor, " d_model"],
        x_key: Float[Tensor, " d_model"],
        head: int,
        query_pos: int,
        key_pos: int,
    ) -> Float[Tensor, ""]:
        """One head's attention logit from the normalised residual streams at the query and key
        (positions matter for rotary embeddings)."""
        ...

    def head_value(self, x_key: Float[Tensor, " d_model"], head: int) -> Float[Tensor, " d_head"]:
        """One (query) head's value vector from the normalised residual stream at the key."""
        ...

    @property
    def score_scale(self) -> float: ...

    def query_change(
        self, dx: Float[Tensor, "batch pos d_model"], position_ids: Int[Tensor, "batch pos"]
    ) -> Float[Tensor, "batch pos head d_head"]:
        """How the queries (as hooked at `Q`) change when the normalised input changes by `dx`:
        they are linear in it (the bias drops out)."""
        ...

    def key_change(
        self, dx: Float[Tensor, "batch pos d_model"], position_ids: Int[Tensor, "batch pos"]
    ) -> Float[Tensor, "batch pos head d_head"]:
        """How the keys change, per query head (as hooked at `K`)."""
        ...

    def value_change(
        self, dx: Float[Tensor, "batch pos d_model"], position_ids: Int[Tensor, "batch pos"]
    ) -> Float[Tensor, "batch pos head d_head"]:
        """How the values change, per query head (as hooked at `V`; no rotation, so the
        positions do not matter)."""
        ...


@runtime_checkable
class MlpWeights(Protocol):
    @property
    def W_out(self) -> Float[Tensor, "d_mlp d_model"]:
        """The down projection: hidden unit n writes activation * W_out[n]."""
        ...

    def pre_activation(self, x: Float[Tensor, " d_model"], neuron: int) -> Float[Tensor, ""]:
        """Unit `neuron`'s pre-activation (`MLP_PRE`; for gated MLPs the gate's) from the
        normalised residual stream."""
        ...

    def __call__(
        self, x: Float[Tensor, "batch pos d_model"], hooks: Hooks
    ) -> Float[Tensor, "batch pos d_model"]:
        """The MLP's output (`MLP_OUT`), its hidden activations at `MLP_POST`."""
        ...


@runtime_checkable
class BlockParts(Protocol):
    @property
    def ln_1(self) -> Norm: ...

    @property
    def attn(self) -> AttentionWeights: ...

    @property
    def ln_2(self) -> Norm: ...

    @property
    def mlp(self) -> MlpWeights: ...

    @property
    def mlp_input(self) -> HookPoint:
        """Which residual stream the MLP reads: RESID_MID, or RESID_PRE for parallel blocks."""
        ...


@runtime_checkable
class TransformerModel(Protocol):
    """A decoder-only language model with tdb's hook points. See the module docstring."""

    @property
    def config(self) -> ModelConfig: ...

    @property
    def ln_f(self) -> Norm:
        """The final norm, its scale at `HookPoint.LN_FINAL_SCALE`."""
        ...

    @property
    def unembed(self) -> Float[Tensor, "d_model d_vocab"]: ...

    def block(self, layer: int) -> BlockParts: ...

    def __call__(
        self,
        tokens: Int[Tensor, "batch pos"],
        hooks: Hooks = ...,
        position_ids: Int[Tensor, "batch pos"] | None = None,
        attention_mask: Bool[Tensor, "batch query_pos key_pos"] | None = None,
        logit_positions: Int[Tensor, " logit_pos"] | None = None,
        resume: tuple[int, Float[Tensor, "batch pos d_model"]] | None = None,
    ) -> Float[Tensor, "batch logit_pos d_vocab"]: ...

    # What loading (and the demo's evaluation) needs of the nn.Module underneath.
    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...

    def load_state_dict(
        self, state_dict: Mapping[str, Tensor], strict: bool = True, assign: bool = False
    ) -> object: ...

    training: bool

    def requires_grad_(self, requires_grad: bool = True) -> nn.Module: ...

    def eval(self) -> nn.Module: ...

    def train(self, mode: bool = True) -> nn.Module: ...
