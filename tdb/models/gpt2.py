"""A GPT-2 decoder in plain PyTorch, written to read like the math, with named hook points.

    x = embed(tokens) + pos_embed(positions)
    for each block:  x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))
    logits = ln_f(x) @ W_U

Weights are stored in the shapes the math uses (per head `W_Q[head, d_model, d_head]`, MLP
`W_out[d_mlp, d_model]`), so derived scalars index them directly. `config_from_gpt2` and
`state_dict_from_hf` (at the bottom) read Hugging Face checkpoints for `tdb.checkpoint.load_model`;
`config_to_hf` and `state_dict_to_hf` write them for `tdb.checkpoint.save_checkpoint`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from tdb.hooks import NO_HOOKS, HookPoint, Hooks
from tdb.models.hf import HFConfig
from tdb.models.layers import ACTIVATIONS, MLP, Attention, LayerNorm, causal_mask, device_of


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


class Block(nn.Module):
    def __init__(self, config: GPT2Config, layer: int) -> None:
        super().__init__()
        c = config
        self.ln_1 = LayerNorm(c.d_model, c.layer_norm_eps, HookPoint.LN1_SCALE)
        score_scale = 1.0 / math.sqrt(c.d_head)
        if c.scale_attn_by_inverse_layer_idx:  # some GPT-2s shrink deeper layers' scores
            score_scale /= layer + 1
        # No rotary embedding: GPT-2's positions are in the residual stream (W_pos).
        self.attn = Attention(
            c.d_model, c.n_head, c.n_head, c.d_head, rope=None, score_scale=score_scale
        )
        self.ln_2 = LayerNorm(c.d_model, c.layer_norm_eps, HookPoint.LN2_SCALE)
        self.mlp = MLP(c.d_model, c.d_mlp, ACTIVATIONS[c.activation])
        self.mlp_input = HookPoint.RESID_MID

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        mask: Bool[Tensor, "#batch query_pos key_pos"],
        hooks: Hooks,
    ) -> Float[Tensor, "batch pos d_model"]:
        x = hooks(HookPoint.RESID_PRE, x)
        x = x + hooks(HookPoint.ATTN_OUT, self.attn(self.ln_1(x, hooks), mask, hooks))
        x = hooks(HookPoint.RESID_MID, x)
        x = x + hooks(HookPoint.MLP_OUT, self.mlp(self.ln_2(x, hooks), hooks))
        return hooks(HookPoint.RESID_POST, x)


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
        resume: tuple[int, Float[Tensor, "batch pos d_model"]] | None = None,
    ) -> Float[Tensor, "batch logit_pos d_vocab"]:
        """Logits at `logit_positions` (default every position).

        `attention_mask` (True = may attend) is combined with the causal mask; with
        `position_ids` it packs several documents into one row. `resume=(layer, resid_pre)`
        starts at block `layer` from that residual stream (`layer = n_layer`: the final norm),
        skipping the embedding and the blocks before: patching one layer needs no earlier one.
        """
        batch, n_pos = tokens.shape
        tokens = tokens.to(self.W_E.device)  # callers may pass CPU tensors
        if position_ids is None:
            position_ids = torch.arange(n_pos, device=tokens.device).expand(batch, n_pos)
        position_ids = position_ids.to(tokens.device)
        mask_in = None if attention_mask is None else attention_mask.to(tokens.device)
        mask = causal_mask(n_pos, None, mask_in, tokens.device)

        top = hooks.at_layer(None)  # the hooks outside any layer
        if resume is None:
            token_embed = top(HookPoint.TOKEN_EMBED, self.W_E[tokens])
            pos_embed = top(HookPoint.POS_EMBED, self.W_pos[position_ids])
            x = top(HookPoint.RESID_EMBED, token_embed + pos_embed)
            start = 0
        else:
            start, x = resume
        for layer, block in enumerate(self.blocks):
            if layer < start:
                continue
            device = device_of(block)  # a device map's layer boundary: move the stream along
            x = block(x.to(device), mask.to(device), hooks.at_layer(layer))
        x = top(HookPoint.RESID_FINAL, x.to(self.ln_f.w.device))
        if logit_positions is not None:
            x = x[:, logit_positions]  # [batch logit_pos d_model]
        normed = self.ln_f(x, top).to(self.unembed.device)
        logits = top(HookPoint.LOGITS, normed @ self.unembed)
        return logits.to(self.W_E.device)  # a device map's logits come back to the first device


# --- Hugging Face checkpoints ------------------------------------------------------------------


def config_from_gpt2(hf: HFConfig) -> GPT2Config:
    activation = hf.text("activation_function", "gelu_new")
    if activation not in ACTIVATIONS:
        raise hf.error(f"unsupported activation {activation!r} ({', '.join(ACTIVATIONS)})")
    if not hf.flag("scale_attn_weights", True):
        raise hf.error("scale_attn_weights=false is not supported")
    d_model, n_head = hf.size("n_embd"), hf.size("n_head")
    if d_model % n_head:
        raise hf.error(f"n_embd {d_model} is not divisible by n_head {n_head}")
    return GPT2Config(
        d_vocab=hf.size("vocab_size"),
        n_ctx=hf.size("n_positions"),
        d_model=d_model,
        n_layer=hf.layers("n_layer"),
        n_head=n_head,
        d_mlp=hf.size("n_inner", 4 * d_model),
        layer_norm_eps=hf.epsilon("layer_norm_epsilon", 1e-5),
        tie_unembed=hf.flag("tie_word_embeddings", True),
        activation=activation,
        scale_attn_by_inverse_layer_idx=hf.flag("scale_attn_by_inverse_layer_idx", False),
    )


def config_to_hf(config: GPT2Config) -> dict[str, object]:
    """The `config.json` of a Hugging Face GPT-2 checkpoint (the inverse of `config_from_gpt2`)."""
    c = config
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": c.d_vocab,
        "n_positions": c.n_ctx,
        "n_embd": c.d_model,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_inner": c.d_mlp,
        "layer_norm_epsilon": c.layer_norm_eps,
        "activation_function": c.activation,
        "tie_word_embeddings": c.tie_unembed,
        "scale_attn_by_inverse_layer_idx": c.scale_attn_by_inverse_layer_idx,
        "bos_token_id": 0,
        "eos_token_id": 0,
    }


def state_dict_from_hf(hf: dict[str, Tensor], config: GPT2Config) -> dict[str, Tensor]:
    """Hugging Face GPT-2 weights (Conv1D: y = x @ W + b) -> our per-head layout."""
    # transformers saves the body under `transformer.`; the original GPT-2 files do not.
    hf = {k.removeprefix("transformer."): v for k, v in hf.items()}
    h, d, dh = config.n_head, config.d_model, config.d_head
    out = {"W_E": hf["wte.weight"], "W_pos": hf["wpe.weight"]}
    out |= {"ln_f.w": hf["ln_f.weight"], "ln_f.b": hf["ln_f.bias"]}
    if not config.tie_unembed:
        out["W_U"] = hf["lm_head.weight"].T
    for layer in range(config.n_layer):
        src, dst = f"h.{layer}.", f"blocks.{layer}."
        for ln in ("ln_1", "ln_2"):
            out[dst + ln + ".w"] = hf[src + ln + ".weight"]
            out[dst + ln + ".b"] = hf[src + ln + ".bias"]
        w_qkv = hf[src + "attn.c_attn.weight"].reshape(d, 3, h, dh)  # [d_model qkv head d_head]
        b_qkv = hf[src + "attn.c_attn.bias"].reshape(3, h, dh)  # [qkv head d_head]
        for i, name in enumerate("QKV"):
            out[f"{dst}attn.W_{name}"] = w_qkv[:, i].permute(1, 0, 2)  # [head d_model d_head]
            out[f"{dst}attn.b_{name}"] = b_qkv[i]
        w_o = hf[src + "attn.c_proj.weight"]  # [head*d_head d_model]
        out[dst + "attn.W_O"] = w_o.reshape(h, dh, d)  # [head d_head d_model]
        out[dst + "attn.b_O"] = hf[src + "attn.c_proj.bias"]
        out[dst + "mlp.W_in"] = hf[src + "mlp.c_fc.weight"]  # [d_model d_mlp]
        out[dst + "mlp.b_in"] = hf[src + "mlp.c_fc.bias"]
        out[dst + "mlp.W_out"] = hf[src + "mlp.c_proj.weight"]  # [d_mlp d_model]
        out[dst + "mlp.b_out"] = hf[src + "mlp.c_proj.bias"]
    return out


def state_dict_to_hf(model: GPT2) -> dict[str, Tensor]:
    """Our layout -> Hugging Face GPT-2 weights (the inverse of `state_dict_from_hf`)."""
    c = model.config
    ours = {k: v.detach() for k, v in model.state_dict().items()}
    out = {"transformer.wte.weight": ours["W_E"], "transformer.wpe.weight": ours["W_pos"]}
    out |= {"transformer.ln_f.weight": ours["ln_f.w"], "transformer.ln_f.bias": ours["ln_f.b"]}
    if not c.tie_unembed:
        out["lm_head.weight"] = ours["W_U"].T
    for layer in range(c.n_layer):
        src, dst = f"blocks.{layer}.", f"transformer.h.{layer}."
        for ln in ("ln_1", "ln_2"):
            out[dst + ln + ".weight"] = ours[src + ln + ".w"]
            out[dst + ln + ".bias"] = ours[src + ln + ".b"]
        # [d_model qkv head d_head], flattened to [d_model 3*d_model]
        w_qkv = torch.stack([ours[f"{src}attn.W_{n}"].permute(1, 0, 2) for n in "QKV"], dim=1)
        out[dst + "attn.c_attn.weight"] = w_qkv.reshape(c.d_model, 3 * c.d_model)
        b_qkv = torch.stack([ours[f"{src}attn.b_{n}"] for n in "QKV"])  # [qkv head d_head]
        out[dst + "attn.c_attn.bias"] = b_qkv.reshape(3 * c.d_model)
        # [head d_head d_model] -> [head*d_head d_model]
        out[dst + "attn.c_proj.weight"] = ours[src + "attn.W_O"].reshape(c.d_model, c.d_model)
        out[dst + "attn.c_proj.bias"] = ours[src + "attn.b_O"]
        out[dst + "mlp.c_fc.weight"] = ours[src + "mlp.W_in"]
        out[dst + "mlp.c_fc.bias"] = ours[src + "mlp.b_in"]
        out[dst + "mlp.c_proj.weight"] = ours[src + "mlp.W_out"]
        out[dst + "mlp.c_proj.bias"] = ours[src + "mlp.b_out"]
    return out
