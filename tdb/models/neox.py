"""GPT-NeoX (Pythia) in plain PyTorch: layer norms, partial rotary attention, and (by default)
attention and MLP side by side in each block.

    x = embed(tokens)
    for each block:  x = x + attn(ln_1(x)) + mlp(ln_2(x))        (parallel residual)
               or:   x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))
    logits = ln_f(x) @ W_U

Only the first `rotary_dim` dims of each head turn (Pythia: a quarter). `config_from_neox` and
`state_dict_from_hf` read Hugging Face checkpoints for `tdb.checkpoint.load_model`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from tdb.hooks import NO_HOOKS, HookPoint, Hooks
from tdb.models.hf import HFConfig, rope_from_hf
from tdb.models.layers import (
    ACTIVATIONS,
    MLP,
    Attention,
    LayerNorm,
    RopeConfig,
    Rotary,
    causal_mask,
    device_of,
    normal,
)


@dataclass(frozen=True)
class NeoXConfig:
    """Shape of a GPT-NeoX model.

    >>> NeoXConfig(d_vocab=50304, n_ctx=2048, d_model=512, n_layer=6, n_head=8, d_mlp=2048,
    ...            rope=RopeConfig(theta=10000.0, rotary_dim=16))  # Pythia-70m
    """

    d_vocab: int
    n_ctx: int
    d_model: int
    n_layer: int
    n_head: int
    d_mlp: int
    rope: RopeConfig
    layer_norm_eps: float = 1e-5
    activation: str = "gelu"
    tie_unembed: bool = False
    parallel_residual: bool = True
    attention_bias: bool = True  # whether the checkpoint holds q/k/v and output biases

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_head


class Block(nn.Module):
    def __init__(self, config: NeoXConfig) -> None:
        super().__init__()
        c = config
        self.ln_1 = LayerNorm(c.d_model, c.layer_norm_eps, HookPoint.LN1_SCALE)
        self.attn = Attention(c.d_model, c.n_head, c.n_head, c.d_head, c.rope)
        self.ln_2 = LayerNorm(c.d_model, c.layer_norm_eps, HookPoint.LN2_SCALE)
        self.mlp = MLP(c.d_model, c.d_mlp, ACTIVATIONS[c.activation])
        self.parallel = c.parallel_residual
        self.mlp_input = HookPoint.RESID_PRE if self.parallel else HookPoint.RESID_MID

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        rotary: Rotary,
        mask: Bool[Tensor, "#batch query_pos key_pos"],
        hooks: Hooks,
    ) -> Float[Tensor, "batch pos d_model"]:
        x = hooks(HookPoint.RESID_PRE, x)
        attn_out = hooks(HookPoint.ATTN_OUT, self.attn(self.ln_1(x, hooks), mask, hooks, rotary))
        if self.parallel:  # x = x + attn(ln_1(x)) + mlp(ln_2(x)): both read the block's input
            mlp_out = hooks(HookPoint.MLP_OUT, self.mlp(self.ln_2(x, hooks), hooks))
            # RESID_MID is what the stream would hold between the two; nothing here reads it.
            x = hooks(HookPoint.RESID_MID, x + attn_out)
            return hooks(HookPoint.RESID_POST, x + mlp_out)
        x = hooks(HookPoint.RESID_MID, x + attn_out)
        x = x + hooks(HookPoint.MLP_OUT, self.mlp(self.ln_2(x, hooks), hooks))
        return hooks(HookPoint.RESID_POST, x)


class NeoX(nn.Module):
    """GPT-NeoX / Pythia with hook points. Load a checkpoint with `tdb.checkpoint.load_model`.

    >>> model = NeoX(NeoXConfig(d_vocab=100, n_ctx=64, d_model=32, n_layer=2, n_head=4,
    ...                         d_mlp=128, rope=RopeConfig(theta=1e4, rotary_dim=2)))
    >>> logits = model(torch.tensor([[1, 2, 3]]))  # [batch pos d_vocab]
    """

    def __init__(self, config: NeoXConfig) -> None:
        super().__init__()
        self.config = config
        self.W_E = normal(config.d_vocab, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = LayerNorm(config.d_model, config.layer_norm_eps, HookPoint.LN_FINAL_SCALE)
        self.W_U = None if config.tie_unembed else normal(config.d_model, config.d_vocab)

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
        resume: tuple[int, Float[Tensor, "batch pos d_model"]] | None = None,
    ) -> Float[Tensor, "batch logit_pos d_vocab"]:
        """Logits at `logit_positions` (default every position); see `GPT2.forward`."""
        batch, n_pos = tokens.shape
        tokens = tokens.to(self.W_E.device)  # callers may pass CPU tensors
        if position_ids is None:
            position_ids = torch.arange(n_pos, device=tokens.device).expand(batch, n_pos)
        position_ids = position_ids.to(tokens.device)
        mask_in = None if attention_mask is None else attention_mask.to(tokens.device)
        rotary = Rotary.at(position_ids, self.config.rope)
        mask = causal_mask(n_pos, None, mask_in, tokens.device)

        top = hooks.at_layer(None)  # the hooks outside any layer
        if resume is None:
            token_embed = top(HookPoint.TOKEN_EMBED, self.W_E[tokens])
            x = top(HookPoint.RESID_EMBED, token_embed)
            start = 0
        else:
            start, x = resume
        for layer, block in enumerate(self.blocks):
            if layer < start:
                continue
            device = device_of(block)  # a device map's layer boundary: move the stream along
            x = block(x.to(device), rotary.to(device), mask.to(device), hooks.at_layer(layer))
        x = top(HookPoint.RESID_FINAL, x.to(self.ln_f.w.device))
        if logit_positions is not None:
            x = x[:, logit_positions]  # [batch logit_pos d_model]
        normed = self.ln_f(x, top).to(self.unembed.device)
        logits = top(HookPoint.LOGITS, normed @ self.unembed)
        return logits.to(self.W_E.device)  # a device map's logits come back to the first device


# --- Hugging Face checkpoints ------------------------------------------------------------------


def config_from_neox(hf: HFConfig) -> NeoXConfig:
    d_model, n_head = hf.size("hidden_size"), hf.size("num_attention_heads")
    if d_model % n_head:
        raise hf.error(f"hidden_size {d_model} is not divisible by num_attention_heads {n_head}")
    activation = hf.text("hidden_act", "gelu")
    if activation not in ACTIVATIONS:
        raise hf.error(f"unsupported activation {activation!r} ({', '.join(ACTIVATIONS)})")
    # transformers 5 keeps the rotary settings in rope_parameters; older checkpoints (Pythia's
    # among them) say rotary_emb_base and rotary_pct.
    rope = rope_from_hf(hf, d_model // n_head, "rotary_emb_base", "rotary_pct", 0.25)
    return NeoXConfig(
        d_vocab=hf.size("vocab_size"),
        n_ctx=hf.size("max_position_embeddings"),
        d_model=d_model,
        n_layer=hf.layers("num_hidden_layers"),
        n_head=n_head,
        d_mlp=hf.size("intermediate_size"),
        rope=rope,
        layer_norm_eps=hf.epsilon("layer_norm_eps", 1e-5),
        activation=activation,
        tie_unembed=hf.flag("tie_word_embeddings", False),
        parallel_residual=hf.flag("use_parallel_residual", True),
        attention_bias=hf.flag("attention_bias", True),
    )


def state_dict_from_hf(hf: dict[str, Tensor], config: NeoXConfig) -> dict[str, Tensor]:
    """Hugging Face GPT-NeoX weights -> our per-head layout. The fused query_key_value
    projection is laid out per head: [head, (q k v), d_head] along its output."""
    c = config
    h, d, dh = c.n_head, c.d_model, c.d_head

    def bias(key: str, *shape: int) -> Tensor:
        return hf[key].reshape(shape) if c.attention_bias else torch.zeros(shape)

    out = {"W_E": hf["gpt_neox.embed_in.weight"]}
    out |= {"ln_f.w": hf["gpt_neox.final_layer_norm.weight"]}
    out |= {"ln_f.b": hf["gpt_neox.final_layer_norm.bias"]}
    if not c.tie_unembed:  # transformers 5 still saves the unembedding as embed_out
        out["W_U"] = hf["embed_out.weight" if "embed_out.weight" in hf else "lm_head.weight"].T
    for layer in range(c.n_layer):
        src, dst = f"gpt_neox.layers.{layer}.", f"blocks.{layer}."
        for ours, theirs in (("ln_1", "input_layernorm"), ("ln_2", "post_attention_layernorm")):
            out[f"{dst}{ours}.w"] = hf[f"{src}{theirs}.weight"]
            out[f"{dst}{ours}.b"] = hf[f"{src}{theirs}.bias"]
        w_qkv = hf[src + "attention.query_key_value.weight"]  # [head*qkv*d_head d_model]
        w_qkv = w_qkv.reshape(h, 3, dh, d)  # [head qkv d_head d_model]
        b_qkv = bias(src + "attention.query_key_value.bias", h, 3, dh)  # [head qkv d_head]
        for i, name in enumerate("QKV"):
            out[f"{dst}attn.W_{name}"] = w_qkv[:, i].transpose(1, 2)  # [head d_model d_head]
            out[f"{dst}attn.b_{name}"] = b_qkv[:, i]  # [head d_head]
        w_o = hf[src + "attention.dense.weight"]  # [d_model head*d_head]
        out[dst + "attn.W_O"] = w_o.T.reshape(h, dh, d)  # [head d_head d_model]
        out[dst + "attn.b_O"] = bias(src + "attention.dense.bias", d)
        out[dst + "mlp.W_in"] = hf[src + "mlp.dense_h_to_4h.weight"].T  # [d_model d_mlp]
        out[dst + "mlp.b_in"] = hf[src + "mlp.dense_h_to_4h.bias"]
        out[dst + "mlp.W_out"] = hf[src + "mlp.dense_4h_to_h.weight"].T  # [d_mlp d_model]
        out[dst + "mlp.b_out"] = hf[src + "mlp.dense_4h_to_h.bias"]
    return out
