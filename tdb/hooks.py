"""Named hook points of the model, and the hooks a caller passes to one forward pass.

Hooks are an argument of `forward`, not state stored on the model: a hook cannot outlive the call
that installed it, so a long-lived server can never leak one request's hooks into the next, and
two threads may run the same model with different hooks. Nothing has to be removed afterwards.

A hook is `fn(tensor, layer) -> tensor | None`: it may keep a reference (capture), register a
gradient hook on the tensor, or return a replacement (ablation, freezing a layer-norm scale).
`patch(cache, point, layer, ...)` is the hook that replaces an activation with the one another run
cached (docs/python.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from tdb.errors import TdbError

if TYPE_CHECKING:
    from tdb.activation_cache import ActivationCache


class HookPoint(StrEnum):
    """Every location of the forward pass a researcher can read or change.

    Shapes (batch first; `layer` is passed to the hook, not part of the tensor):
    """

    TOKEN_EMBED = "token_embed"  # [batch pos d_model]  W_E[token]
    POS_EMBED = "pos_embed"  # [batch pos d_model]  W_pos[position] (not in rotary models)
    RESID_EMBED = "resid_embed"  # [batch pos d_model]  all the embedding writes (layer None)
    RESID_PRE = "resid_pre"  # [batch pos d_model]  before attention of `layer`
    LN1_SCALE = "ln1_scale"  # [batch pos 1]  1/sqrt(var + eps) of the attention input
    # (RMSNorm: 1/sqrt(mean(x^2) + eps)); the same for LN2_SCALE and LN_FINAL_SCALE
    Q = "q"  # [batch pos head d_head]  rotary models: after the rotation
    K = "k"  # [batch pos head d_head]  per query head (grouped-query: key heads repeated), rotated
    V = "v"  # [batch pos head d_head]  value bias included; per query head like K
    ATTN_LOGITS = "attn_logits"  # [batch head query_pos key_pos]  scaled, before the causal mask
    ATTN_PROBS = "attn_probs"  # [batch head query_pos key_pos]
    ATTN_Z = "attn_z"  # [batch pos head d_head]  per-head output before W_O
    ATTN_OUT = "attn_out"  # [batch pos d_model]  what attention writes (output bias included)
    RESID_MID = "resid_mid"  # [batch pos d_model]  after attention, before the MLP (parallel
    # blocks: block input + attention's write; the MLP there reads the block input instead)
    LN2_SCALE = "ln2_scale"  # [batch pos 1]
    MLP_PRE = "mlp_pre"  # [batch pos d_mlp]  (gated MLPs: the gate, before its activation)
    MLP_UP = "mlp_up"  # [batch pos d_mlp]  gated MLPs only: the linear branch act(gate) multiplies
    MLP_POST = "mlp_post"  # [batch pos d_mlp]  (gated MLPs: act(gate) * up)
    MLP_OUT = "mlp_out"  # [batch pos d_model]
    RESID_POST = "resid_post"  # [batch pos d_model]  after the MLP of `layer`
    RESID_FINAL = "resid_final"  # [batch pos d_model]  after the last block (layer None)
    LN_FINAL_SCALE = "ln_final_scale"  # [batch pos 1]  (layer None)
    LOGITS = "logits"  # [batch logit_pos d_vocab]  (layer None)
    # Latents of a sparse autoencoder attached at ATTN_OUT / MLP_POST / MLP_OUT of `layer`. The
    # model never calls these: `tdb.latents.attach` does, inside the hook of the point it reads.
    ATTN_OUT_LATENTS = "attn_out_latents"  # [batch pos d_sae]
    MLP_POST_LATENTS = "mlp_post_latents"  # [batch pos d_sae]
    MLP_OUT_LATENTS = "mlp_out_latents"  # [batch pos d_sae]


# The points called once per forward pass, outside the layers (their hooks get layer None).
OUTSIDE_LAYERS = frozenset(
    {
        HookPoint.TOKEN_EMBED,
        HookPoint.POS_EMBED,
        HookPoint.RESID_EMBED,
        HookPoint.RESID_FINAL,
        HookPoint.LN_FINAL_SCALE,
        HookPoint.LOGITS,
    }
)


def position_axes(point: HookPoint) -> tuple[int, ...]:
    """The token-position axes of `point`'s tensor: (query_pos, key_pos) for attention logits and
    probabilities, (pos,) for everything else (`LOGITS` too: `run` computes every position)."""
    if point in (HookPoint.ATTN_LOGITS, HookPoint.ATTN_PROBS):
        return (2, 3)
    return (1,)


def head_axis(point: HookPoint) -> int | None:
    """The head axis of `point`'s tensor, or None where it has none."""
    if point in (HookPoint.ATTN_LOGITS, HookPoint.ATTN_PROBS):
        return 1
    if point in (HookPoint.Q, HookPoint.K, HookPoint.V, HookPoint.ATTN_Z):
        return 2
    return None


HookFn = Callable[[Tensor, int | None], Tensor | None]


@dataclass(frozen=True)
class Hooks:
    """The hooks of one forward pass, bound to the layer being computed.

    >>> hooks = Hooks({HookPoint.MLP_POST: lambda x, layer: x * 0})  # zero every MLP
    >>> logits = model(tokens, hooks=hooks)
    """

    fns: Mapping[HookPoint, HookFn] = field(default_factory=dict)
    layer: int | None = None

    def at_layer(self, layer: int | None) -> Hooks:
        return Hooks(self.fns, layer)

    def __call__(self, point: HookPoint, x: Tensor) -> Tensor:
        fn = self.fns.get(point)
        if fn is None:
            return x
        out = fn(x, self.layer)
        return x if out is None else out


NO_HOOKS = Hooks()


def compose(first: Hooks, then: Hooks) -> Hooks:
    """Hooks that run `first`'s hook at each point, then `then`'s on its result.

    >>> compose(ablation_hooks, capture_hooks)
    """
    fns = dict(first.fns)
    for point, fn in then.fns.items():
        earlier = fns.get(point)
        fns[point] = fn if earlier is None else _chain(earlier, fn)
    return Hooks(fns)


def _chain(a: HookFn, b: HookFn) -> HookFn:
    def both(x: Tensor, layer: int | None) -> Tensor | None:
        out = a(x, layer)
        x = x if out is None else out
        out = b(x, layer)
        return x if out is None else out

    return both


@dataclass(frozen=True)
class Patch:
    """The hook `patch` returns: at `point` of `layer`, `source` where `where` is True. It knows
    its point, so `loaded.run` can refuse it under another point's key."""

    point: HookPoint
    layer: int | None
    source: Tensor  # [batch ...] the cached activation (batch 1 or the run's batch)
    where: Tensor  # bool, broadcastable to `source`

    def __call__(self, x: Tensor, layer: int | None) -> Tensor | None:
        if layer != self.layer:
            return None
        if self.source.shape[1:] != x.shape[1:] or self.source.shape[0] not in (1, x.shape[0]):
            raise TdbError(
                f"{self.name}: the cache holds {list(self.source.shape)} but this run has "
                f"{list(x.shape)}: patch between prompts of the same token count"
            )
        source = self.source.to(x.device, x.dtype)
        return torch.where(self.where.to(x.device), source, x)

    @property
    def name(self) -> str:
        return f"patch({self.point.value!r}, {self.layer})"


def patch(
    cache: ActivationCache,
    point: HookPoint | str,
    layer: int | None,
    positions: int | Sequence[int] | None = None,
    heads: int | Sequence[int] | None = None,
) -> Patch:
    """A hook that replaces `point` at `layer` with the value `cache` holds for it: at every
    position and head, or only at `positions` (attention patterns: query positions) and `heads`.

    >>> clean = loaded.run(clean_prompt, cache=[HookPoint.RESID_PRE])
    >>> loaded.run(corrupted_prompt, hooks={"resid_pre": patch(clean.cache, "resid_pre", 1, [9])})

    The cached run and the patched one must have the same token count; a cache of one prompt
    patches every prompt of a batch.
    """
    point, layer = cache.key(point, layer)
    source = cache[point, layer]
    what = f"patch({point.value!r}, {layer})"
    return Patch(point, layer, source, _selection(source.shape, point, positions, heads, what))


def _selection(
    shape: torch.Size,
    point: HookPoint,
    positions: int | Sequence[int] | None,
    heads: int | Sequence[int] | None,
    what: str,
) -> Tensor:
    """True where `patch` replaces: a bool tensor broadcastable to `shape`."""
    where = torch.ones([1] * len(shape), dtype=torch.bool)
    axes = [(position_axes(point)[0], positions, "positions"), (head_axis(point), heads, "heads")]
    for axis, chosen, name in axes:
        if chosen is None:
            continue
        if axis is None:
            raise TdbError(
                f"{what}: heads= needs a point with a head axis (q, k, v, attn_z, "
                f"attn_logits, attn_probs), not {point.value}"
            )
        size = shape[axis]
        indices = [chosen] if isinstance(chosen, int) else list(chosen)
        if not indices or any(not -size <= i < size for i in indices):
            raise TdbError(f"{what}: {name}={chosen!r} must be indices in 0..{size - 1}")
        line = torch.zeros(size, dtype=torch.bool)
        line[torch.tensor(indices)] = True
        view = [1] * len(shape)
        view[axis] = size
        where = where & line.view(view)
    return where
