"""The Llama family in plain PyTorch: Llama, Qwen2, Mistral and Gemma are one model with a few
config switches.

    x = embed(tokens) · embed_scale                     (Gemma: sqrt(d_model); others 1)
    for each block:  x = x + attn(rmsnorm_1(x));  x = x + gated_mlp(rmsnorm_2(x))
    logits = rmsnorm_f(x) @ W_U

Attention is rotary and grouped-query; Qwen2 adds q/k/v biases, Mistral (and Qwen2 with
`use_sliding_window`) a sliding window, Gemma a GeLU-tanh gate and RMSNorm gains stored as
`w - 1` (folded back into `w` on loading). `config_from_*` and `state_dict_from_hf` read the
Hugging Face checkpoints; `tdb.checkpoint.load_model` picks them by `model_type`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from tdb.hooks import NO_HOOKS, HookPoint, Hooks
from tdb.models.hf import HFConfig, rope_from_hf
from tdb.models.layers import (
    ACTIVATIONS,
    Attention,
    GatedMLP,
    RMSNorm,
    RopeConfig,
    Rotary,
    causal_mask,
    device_of,
    normal,
)


@dataclass(frozen=True)
class LlamaConfig:
    """Shape of a Llama-family model.

    >>> LlamaConfig(d_vocab=32000, n_ctx=4096, d_model=4096, n_layer=32, n_head=32, n_kv_head=8,
    ...             d_head=128, d_mlp=14336, rope=RopeConfig(theta=5e5, rotary_dim=128))
    """

    d_vocab: int
    n_ctx: int
    d_model: int
    n_layer: int
    n_head: int
    n_kv_head: int
    d_head: int
    d_mlp: int
    rope: RopeConfig
    norm_eps: float = 1e-6
    activation: str = "silu"
    tie_unembed: bool = False
    embed_scale: float = 1.0  # Gemma: sqrt(d_model)
    windows: tuple[int | None, ...] = ()  # per layer: sliding window, None = all keys; () = none
    # Which optional tensors the checkpoint holds, and how it stores RMSNorm gains.
    qkv_bias: bool = False  # Qwen2; Llama's attention_bias
    out_bias: bool = False  # Llama's attention_bias
    mlp_bias: bool = False  # Llama's mlp_bias
    norm_gain_offset: float = 0.0  # Gemma: the gain is 1 + w

    def window(self, layer: int) -> int | None:
        return self.windows[layer] if self.windows else None


class Block(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        c = config
        self.ln_1 = RMSNorm(c.d_model, c.norm_eps, HookPoint.LN1_SCALE)
        self.attn = Attention(c.d_model, c.n_head, c.n_kv_head, c.d_head, c.rope)
        self.ln_2 = RMSNorm(c.d_model, c.norm_eps, HookPoint.LN2_SCALE)
        self.mlp = GatedMLP(c.d_model, c.d_mlp, ACTIVATIONS[c.activation])
        self.mlp_input = HookPoint.RESID_MID

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        rotary: Rotary,
        mask: Bool[Tensor, "#batch query_pos key_pos"],
        hooks: Hooks,
    ) -> Float[Tensor, "batch pos d_model"]:
        x = hooks(HookPoint.RESID_PRE, x)
        x = x + hooks(HookPoint.ATTN_OUT, self.attn(self.ln_1(x, hooks), mask, hooks, rotary))
        x = hooks(HookPoint.RESID_MID, x)
        x = x + hooks(HookPoint.MLP_OUT, self.mlp(self.ln_2(x, hooks), hooks))
        return hooks(HookPoint.RESID_POST, x)


class Llama(nn.Module):
    """Llama / Qwen2 / Mistral / Gemma with hook points. Load one with `tdb.checkpoint.load_model`.

    >>> model = Llama(LlamaConfig(d_vocab=100, n_ctx=64, d_model=32, n_layer=2, n_head=4,
    ...                           n_kv_head=2, d_head=8, d_mlp=64, rope=RopeConfig(1e4, 8)))
    >>> logits = model(torch.tensor([[1, 2, 3]]))  # [batch pos d_vocab]
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.W_E = normal(config.d_vocab, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = RMSNorm(config.d_model, config.norm_eps, HookPoint.LN_FINAL_SCALE)
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
        windows = {self.config.window(layer) for layer in range(self.config.n_layer)}
        masks = {w: causal_mask(n_pos, w, mask_in, tokens.device) for w in windows}

        top = hooks.at_layer(None)  # the hooks outside any layer
        if resume is None:
            token_embed = top(HookPoint.TOKEN_EMBED, self.W_E[tokens])
            # The scale in the model's dtype, as transformers multiplies by it.
            scale = torch.tensor(self.config.embed_scale, dtype=token_embed.dtype)
            x = top(HookPoint.RESID_EMBED, token_embed * scale.to(token_embed.device))
            start = 0
        else:
            start, x = resume
        for layer, block in enumerate(self.blocks):
            if layer < start:
                continue
            device = device_of(block)  # a device map's layer boundary: move the stream along
            mask = masks[self.config.window(layer)].to(device)
            x = block(x.to(device), rotary.to(device), mask, hooks.at_layer(layer))
        x = top(HookPoint.RESID_FINAL, x.to(self.ln_f.w.device))
        if logit_positions is not None:
            x = x[:, logit_positions]  # [batch logit_pos d_model]
        normed = self.ln_f(x, top).to(self.unembed.device)
        logits = top(HookPoint.LOGITS, normed @ self.unembed)
        return logits.to(self.W_E.device)  # a device map's logits come back to the first device


# --- Hugging Face checkpoints ------------------------------------------------------------------


def shared_config(hf: HFConfig, tie_default: bool) -> LlamaConfig:
    """What every Llama-family config.json says the same way (variants `replace` the rest)."""
    d_model, n_head = hf.size("hidden_size"), hf.size("num_attention_heads")
    if not hf.has("head_dim") and d_model % n_head:
        raise hf.error(
            f"hidden_size {d_model} is not divisible by num_attention_heads {n_head} "
            "(and there is no head_dim)"
        )
    d_head = hf.size("head_dim", d_model // n_head)
    activation = hf.text("hidden_act", "silu")
    if activation not in ACTIVATIONS:
        raise hf.error(f"unsupported activation {activation!r} ({', '.join(ACTIVATIONS)})")
    config = LlamaConfig(
        d_vocab=hf.size("vocab_size"),
        n_ctx=hf.size("max_position_embeddings"),
        d_model=d_model,
        n_layer=hf.layers("num_hidden_layers"),
        n_head=n_head,
        n_kv_head=hf.size("num_key_value_heads", n_head),
        d_head=d_head,
        d_mlp=hf.size("intermediate_size"),
        rope=rope_from_hf(hf, d_head),
        norm_eps=hf.epsilon("rms_norm_eps", 1e-6),
        activation=activation,
        tie_unembed=hf.flag("tie_word_embeddings", tie_default),
    )
    if n_head % config.n_kv_head:
        raise hf.error(f"{n_head} attention heads cannot share {config.n_kv_head} key/value heads")
    return config


def config_from_llama(hf: HFConfig) -> LlamaConfig:
    bias, mlp_bias = hf.flag("attention_bias", False), hf.flag("mlp_bias", False)
    return replace(shared_config(hf, False), qkv_bias=bias, out_bias=bias, mlp_bias=mlp_bias)


def config_from_qwen2(hf: HFConfig) -> LlamaConfig:
    n_layer = hf.layers("num_hidden_layers")
    window = hf.optional_size("sliding_window") if hf.flag("use_sliding_window", False) else None
    # transformers 5 writes layer_types; before, layers from max_window_layers on slid.
    first_sliding = hf.integer("max_window_layers", n_layer)
    layer_types = hf.strings("layer_types") or [
        "sliding_attention" if i >= first_sliding else "full_attention" for i in range(n_layer)
    ]
    if len(layer_types) != n_layer or set(layer_types) - {"full_attention", "sliding_attention"}:
        raise hf.error("layer_types must hold full_attention or sliding_attention per layer")
    windows = tuple(window if t == "sliding_attention" else None for t in layer_types)
    return replace(shared_config(hf, False), qkv_bias=True, windows=windows)


def config_from_mistral(hf: HFConfig) -> LlamaConfig:
    window = hf.optional_size("sliding_window")
    windows = (window,) * hf.layers("num_hidden_layers")
    return replace(shared_config(hf, False), windows=windows)


def config_from_gemma(hf: HFConfig) -> LlamaConfig:
    if hf.flag("use_bidirectional_attention", False):
        raise hf.error("use_bidirectional_attention is not supported (tdb models are causal)")
    # Gemma's first releases wrote hidden_act "gelu" but meant GeLU's tanh approximation (as
    # transformers reads them); `hidden_activation`, where present, is the newer key for it.
    activation = hf.text("hidden_activation", hf.text("hidden_act", "gelu_pytorch_tanh"))
    activation = "gelu_pytorch_tanh" if activation == "gelu" else activation
    if activation not in ACTIVATIONS:
        raise hf.error(f"unsupported activation {activation!r} ({', '.join(ACTIVATIONS)})")
    bias = hf.flag("attention_bias", False)
    return replace(
        shared_config(replace(hf, values={**hf.values, "hidden_act": activation}), True),
        embed_scale=math.sqrt(hf.size("hidden_size")),
        qkv_bias=bias,
        out_bias=bias,
        norm_gain_offset=1.0,
    )


def state_dict_from_hf(hf: dict[str, Tensor], config: LlamaConfig) -> dict[str, Tensor]:
    """Hugging Face Llama-family weights (nn.Linear: y = x @ W.T + b) -> our per-head layout."""
    c = config
    h, g, d, dh = c.n_head, c.n_kv_head, c.d_model, c.d_head

    def gain(key: str) -> Tensor:
        return hf[key] + c.norm_gain_offset

    def bias(key: str, present: bool, *shape: int) -> Tensor:
        return hf[key].reshape(shape) if present else torch.zeros(shape)

    out = {"W_E": hf["model.embed_tokens.weight"], "ln_f.w": gain("model.norm.weight")}
    if not c.tie_unembed:
        out["W_U"] = hf["lm_head.weight"].T
    for layer in range(c.n_layer):
        src, dst = f"model.layers.{layer}.", f"blocks.{layer}."
        out[dst + "ln_1.w"] = gain(src + "input_layernorm.weight")
        out[dst + "ln_2.w"] = gain(src + "post_attention_layernorm.weight")
        for name, proj, n in (("Q", "q_proj", h), ("K", "k_proj", g), ("V", "v_proj", g)):
            w = hf[f"{src}self_attn.{proj}.weight"].reshape(n, dh, d)  # [head d_head d_model]
            out[f"{dst}attn.W_{name}"] = w.transpose(1, 2)  # [head d_model d_head]
            out[f"{dst}attn.b_{name}"] = bias(f"{src}self_attn.{proj}.bias", c.qkv_bias, n, dh)
        w_o = hf[src + "self_attn.o_proj.weight"]  # [d_model head*d_head]
        out[dst + "attn.W_O"] = w_o.T.reshape(h, dh, d)  # [head d_head d_model]
        out[dst + "attn.b_O"] = bias(src + "self_attn.o_proj.bias", c.out_bias, d)
        for name, proj, n in (("gate", "gate_proj", c.d_mlp), ("up", "up_proj", c.d_mlp)):
            out[f"{dst}mlp.W_{name}"] = hf[f"{src}mlp.{proj}.weight"].T  # [d_model d_mlp]
            out[f"{dst}mlp.b_{name}"] = bias(f"{src}mlp.{proj}.bias", c.mlp_bias, n)
        out[dst + "mlp.W_out"] = hf[src + "mlp.down_proj.weight"].T  # [d_mlp d_model]
        out[dst + "mlp.b_out"] = bias(src + "mlp.down_proj.bias", c.mlp_bias, d)
    return out
