"""A GPT-2 decoder in plain PyTorch, written to read like the math, with named hook points.

    x = embed(tokens) + pos_embed(positions)
    for each block:  x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))
    logits = ln_f(x) @ W_U

Weights are stored in the shapes the math uses (per head `W_Q[head, d_model, d_head]`, MLP
`W_out[d_mlp, d_model]`), so derived scalars index them directly. `tdb.checkpoint` converts from
and to the Hugging Face layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from tdb.hooks import NO_HOOKS, HookPoint, Hooks
from tdb.models.layers import ACTIVATIONS, MLP, LayerNorm, final_logits, sequential_block


@dataclass(frozen=True)
class GPT2Config:
    """Shape of a GPT-2 model. `GPT2Config(d_vocab=4096, n_ctx=128, d_model=256, n_layer=3,
    n_head=8, d_mlp=1024)`."""

    d_vocab: int
    n_ctx: int
    d_model: int
    n_layer: int
    n_head: int
    d_mlp: int
    layer_norm_eps: float = 1e-5
    tie_unembed: bool = True
    activation: str = "gelu_new"
    scale_attn_by_inverse_layer_idx: bool = False

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_head


class Attention(nn.Module):
    def __init__(self, config: GPT2Config, layer: int) -> None:
        super().__init__()
        h, d, dh = config.n_head, config.d_model, config.d_head
        self.W_Q = nn.Parameter(torch.empty(h, d, dh))
        self.W_K = nn.Parameter(torch.empty(h, d, dh))
        self.W_V = nn.Parameter(torch.empty(h, d, dh))
        self.b_Q = nn.Parameter(torch.zeros(h, dh))
        self.b_K = nn.Parameter(torch.zeros(h, dh))
        self.b_V = nn.Parameter(torch.zeros(h, dh))
        self.W_O = nn.Parameter(torch.empty(h, dh, d))
        self.b_O = nn.Parameter(torch.zeros(d))
        self.score_scale = 1.0 / math.sqrt(dh)
        if config.scale_attn_by_inverse_layer_idx:
            self.score_scale /= layer + 1

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        mask: Bool[Tensor, "#batch query_pos key_pos"],
        hooks: Hooks,
    ) -> Float[Tensor, "batch pos d_model"]:
        q = hooks(HookPoint.Q, torch.einsum("bpd,hde->bphe", x, self.W_Q) + self.b_Q)
        k = hooks(HookPoint.K, torch.einsum("bpd,hde->bphe", x, self.W_K) + self.b_K)
        v = hooks(HookPoint.V, torch.einsum("bpd,hde->bphe", x, self.W_V) + self.b_V)
        logits = torch.einsum("bqhe,bkhe->bhqk", q, k) * self.score_scale
        logits = hooks(HookPoint.ATTN_LOGITS, logits)  # [batch head query_pos key_pos]
        logits = logits.masked_fill(~mask[:, None], float("-inf"))
        probs = hooks(HookPoint.ATTN_PROBS, logits.softmax(dim=-1))
        z = hooks(HookPoint.ATTN_Z, torch.einsum("bhqk,bkhe->bqhe", probs, v))
        return torch.einsum("bqhe,hed->bqd", z, self.W_O) + self.b_O

    def head_logit(
        self,
        x_query: Float[Tensor, " d_model"],
        x_key: Float[Tensor, " d_model"],
        head: int,
        query_pos: int,
        key_pos: int,
    ) -> Float[Tensor, ""]:
        """One head's attention logit from the (normalised) query and key residual streams
        (GPT-2's positions are in the residual stream already: the positions are unused)."""
        q = x_query @ self.W_Q[head] + self.b_Q[head]
        k = x_key @ self.W_K[head] + self.b_K[head]
        return (q @ k) * self.score_scale

    def head_value(self, x_key: Float[Tensor, " d_model"], head: int) -> Float[Tensor, " d_head"]:
        return x_key @ self.W_V[head] + self.b_V[head]


class Block(nn.Module):
    def __init__(self, config: GPT2Config, layer: int) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(config.d_model, config.layer_norm_eps, HookPoint.LN1_SCALE)
        self.attn = Attention(config, layer)
        self.ln_2 = LayerNorm(config.d_model, config.layer_norm_eps, HookPoint.LN2_SCALE)
        self.mlp = MLP(config.d_model, config.d_mlp, ACTIVATIONS[config.activation])
        self.mlp_input = HookPoint.RESID_MID

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        mask: Bool[Tensor, "#batch query_pos key_pos"],
        hooks: Hooks,
    ) -> Float[Tensor, "batch pos d_model"]:
        attend = partial(self.attn, mask=mask, hooks=hooks)
        return sequential_block(x, attend, self.ln_1, self.ln_2, self.mlp, hooks)


class GPT2(nn.Module):
    """GPT-2 with hook points. Load a checkpoint with `tdb.checkpoint.load_model`.

    >>> config = GPT2Config(d_vocab=4096, n_ctx=128, d_model=256, n_layer=3, n_head=8, d_mlp=1024)
    >>> model = GPT2(config)
    >>> logits = model(torch.tensor([[1, 2, 3]]))  # [batch pos d_vocab]
    """

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        self.W_E = nn.Parameter(torch.empty(config.d_vocab, config.d_model))
        self.W_pos = nn.Parameter(torch.empty(config.n_ctx, config.d_model))
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.n_layer))
        self.ln_f = LayerNorm(config.d_model, config.layer_norm_eps, HookPoint.LN_FINAL_SCALE)
        self.W_U = (
            None
            if config.tie_unembed
            else nn.Parameter(torch.empty(config.d_model, config.d_vocab))
        )
        if not self.W_E.is_meta:  # loading builds on the meta device and replaces every weight
            self.init_weights()

    def init_weights(self, std: float = 0.02, seed: int | None = None) -> None:
        """GPT-2's initialisation: normal(0, std), residual writes scaled by 1/sqrt(2·n_layer)."""
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        out_std = std / math.sqrt(2 * self.config.n_layer)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith(("W_O", "W_out")):
                    p.normal_(0.0, out_std, generator=generator)
                elif name.split(".")[-1].startswith("W_"):
                    p.normal_(0.0, std, generator=generator)

    def block(self, layer: int) -> Block:
        block = self.blocks[layer]
        assert isinstance(block, Block)
        return block

    @property
    def unembed(self) -> Float[Tensor, "d_model d_vocab"]:
        return self.W_E.T if self.W_U is None else self.W_U

    def forward(
        self,
        tokens: Int[Tensor, "batch pos"],
        hooks: Hooks = NO_HOOKS,
        position_ids: Int[Tensor, "batch pos"] | None = None,
        attention_mask: Bool[Tensor, "batch query_pos key_pos"] | None = None,
        logit_positions: Int[Tensor, " logit_pos"] | None = None,
    ) -> Float[Tensor, "batch logit_pos d_vocab"]:
        """Logits at `logit_positions` (default every position).

        `attention_mask` (True = may attend) is combined with the causal mask; with
        `position_ids` it packs several documents into one row.
        """
        batch, n_pos = tokens.shape
        if position_ids is None:
            position_ids = torch.arange(n_pos, device=tokens.device).expand(batch, n_pos)
        causal = torch.ones(n_pos, n_pos, dtype=torch.bool, device=tokens.device).tril()[None]
        mask = causal if attention_mask is None else causal & attention_mask

        top = hooks.at_layer(None)
        token_embed = top(HookPoint.TOKEN_EMBED, self.W_E[tokens])
        pos_embed = top(HookPoint.POS_EMBED, self.W_pos[position_ids])
        x = top(HookPoint.RESID_EMBED, token_embed + pos_embed)
        for layer, block in enumerate(self.blocks):
            x = block(x, mask, hooks.at_layer(layer))
        return final_logits(x, self.ln_f, self.unembed, logit_positions, top)
