"""Every hook point fires once per layer (or once outside the layers) with its documented shape;
shared by the GPT-2 and the other-architecture tests."""

from __future__ import annotations

import torch

from tdb.hooks import HookPoint, Hooks
from tdb.models.base import TransformerModel
from tdb.models.gpt2 import GPT2
from tdb.models.llama import Llama


def assert_documented_hook_shapes(model: TransformerModel, batch: int = 2, n_pos: int = 5) -> None:
    c = model.config
    seen: dict[tuple[HookPoint, int | None], tuple[int, ...]] = {}

    def record(point: HookPoint):  # type: ignore[no-untyped-def]
        def hook(x: torch.Tensor, layer: int | None) -> None:
            seen[(point, layer)] = tuple(x.shape)

        return hook

    model(torch.randint(0, c.d_vocab, (batch, n_pos)), Hooks({p: record(p) for p in HookPoint}))
    b, p, d, h, dh, m = batch, n_pos, c.d_model, c.n_head, c.d_head, c.d_mlp
    per_layer = {
        HookPoint.RESID_PRE: (b, p, d),
        HookPoint.LN1_SCALE: (b, p, 1),
        HookPoint.Q: (b, p, h, dh),
        HookPoint.K: (b, p, h, dh),
        HookPoint.V: (b, p, h, dh),
        HookPoint.ATTN_LOGITS: (b, h, p, p),
        HookPoint.ATTN_PROBS: (b, h, p, p),
        HookPoint.ATTN_Z: (b, p, h, dh),
        HookPoint.ATTN_OUT: (b, p, d),
        HookPoint.RESID_MID: (b, p, d),
        HookPoint.LN2_SCALE: (b, p, 1),
        HookPoint.MLP_PRE: (b, p, m),
        HookPoint.MLP_POST: (b, p, m),
        HookPoint.MLP_OUT: (b, p, d),
        HookPoint.RESID_POST: (b, p, d),
    }
    if isinstance(model, Llama):
        per_layer[HookPoint.MLP_UP] = (b, p, m)  # gated MLP
    top = {
        HookPoint.TOKEN_EMBED: (b, p, d),
        HookPoint.RESID_EMBED: (b, p, d),
        HookPoint.RESID_FINAL: (b, p, d),
        HookPoint.LN_FINAL_SCALE: (b, p, 1),
        HookPoint.LOGITS: (b, p, c.d_vocab),
    }
    if isinstance(model, GPT2):
        top[HookPoint.POS_EMBED] = (b, p, d)  # learned positions
    expected = {(pt, layer): s for pt, s in per_layer.items() for layer in range(c.n_layer)}
    expected |= {(pt, None): s for pt, s in top.items()}
    assert seen == expected
