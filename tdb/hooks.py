"""Named hook points of the model, and the hooks a caller passes to one forward pass.

Hooks are an argument of `forward`, not state stored on the model: a hook cannot outlive the call
that installed it, so a long-lived server can never leak one request's hooks into the next, and
two threads may run the same model with different hooks. Nothing has to be removed afterwards.

A hook is `fn(tensor, layer) -> tensor | None`: it may keep a reference (capture), register a
gradient hook on the tensor, or return a replacement (ablation, freezing a layer-norm scale).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from torch import Tensor


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
