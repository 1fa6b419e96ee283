"""A deliberately naive Llama-family / GPT-NeoX model on Hugging Face's weights: per-head loops,
explicit write vectors, rotary embeddings as complex multiplication.

It shares no code with tdb. From the Hugging Face model's own config and state dict it computes
the reference value of every metric, as tests/reference.py does for GPT-2: activation × gradient
by autograd (final norm's scale detached), write vectors node by node, and the exact linear
contribution of each write vector through the frozen final norm and the unembedding.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

Tensor = torch.Tensor


@dataclass
class Reference:
    value: float
    resid: Tensor  # [pos d_model] the embedding written into the residual stream
    resid_grad: Tensor
    probs: list[list[Tensor]]  # [layer][head] -> [query key]
    probs_grad: list[list[Tensor]]
    head_writes: list[list[Tensor]]  # [layer][head] -> [query key d_model]
    post: list[Tensor]  # [layer] -> [pos d_mlp]
    post_grad: list[Tensor]
    neuron_writes: list[Tensor]  # [layer] -> [pos d_mlp d_model]
    contribution: Callable[[Tensor], Tensor]  # write vector at the position -> its share of D
    final_bias_effect: float  # what the final norm's bias adds to D (0 for RMSNorm)


ACT: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": lambda x: x / (1 + torch.exp(-x)),
    "gelu": lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))),
    "gelu_pytorch_tanh": lambda x: (
        0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    ),
}


@dataclass
class Layer:
    """One block's weights as plain matrices (x @ W), heads split out."""

    norm1: Callable[[Tensor], Tensor]
    norm2: Callable[[Tensor], Tensor]
    q: list[tuple[Tensor, Tensor]]  # per query head: (W [d_model d_head], b [d_head])
    k: list[tuple[Tensor, Tensor]]  # per query head (the shared key head of its group)
    v: list[tuple[Tensor, Tensor]]
    o: list[Tensor]  # per head [d_head d_model]
    o_bias: Tensor
    mlp: Callable[[Tensor], Tensor]  # normalised input -> hidden activations [pos d_mlp]
    down: Tensor  # [d_mlp d_model]
    down_bias: Tensor
    window: int | None
    parallel: bool


def rms(weight: Tensor, eps: float) -> Callable[[Tensor], Tensor]:
    return lambda x: x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def layer_norm(weight: Tensor, bias: Tensor, eps: float) -> Callable[[Tensor], Tensor]:
    return lambda x: F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def linear(sd: dict[str, Tensor], name: str, rows: int, d_head: int) -> list[tuple[Tensor, Tensor]]:
    """nn.Linear weight [rows*d_head d_model] split into `rows` heads of x @ W + b."""
    w = sd[name + ".weight"]
    b = sd.get(name + ".bias", torch.zeros(w.shape[0]))
    return [
        (w[i * d_head : (i + 1) * d_head].T, b[i * d_head : (i + 1) * d_head]) for i in range(rows)
    ]


def llama_layers(sd: dict[str, Tensor], cfg: object, gemma: bool) -> list[Layer]:
    d = cfg.hidden_size  # type: ignore[attr-defined]
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads  # type: ignore[attr-defined]
    dh = getattr(cfg, "head_dim", None) or d // n_head
    eps = cfg.rms_norm_eps  # type: ignore[attr-defined]
    act = ACT[cfg.hidden_act]  # type: ignore[attr-defined]
    types = getattr(cfg, "layer_types", None)
    layers = []
    for i in range(cfg.num_hidden_layers):  # type: ignore[attr-defined]
        p = f"model.layers.{i}."
        gain = 1.0 if gemma else 0.0
        q = linear(sd, p + "self_attn.q_proj", n_head, dh)
        k = linear(sd, p + "self_attn.k_proj", n_kv, dh)
        v = linear(sd, p + "self_attn.v_proj", n_kv, dh)
        group = n_head // n_kv
        w_o = sd[p + "self_attn.o_proj.weight"].T  # [head*d_head d_model]
        gate, up = sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]
        gate_b = sd.get(p + "mlp.gate_proj.bias", torch.zeros(gate.shape[0]))
        up_b = sd.get(p + "mlp.up_proj.bias", torch.zeros(up.shape[0]))

        def mlp(h: Tensor, gate=gate, up=up, gate_b=gate_b, up_b=up_b) -> Tensor:  # type: ignore[no-untyped-def]
            return act(h @ gate.T + gate_b) * (h @ up.T + up_b)

        window = getattr(cfg, "sliding_window", None)
        if types is not None and types[i] != "sliding_attention":
            window = None
        layers.append(
            Layer(
                norm1=rms(sd[p + "input_layernorm.weight"] + gain, eps),
                norm2=rms(sd[p + "post_attention_layernorm.weight"] + gain, eps),
                q=q,
                k=[k[h // group] for h in range(n_head)],
                v=[v[h // group] for h in range(n_head)],
                o=[w_o[h * dh : (h + 1) * dh] for h in range(n_head)],
                o_bias=sd.get(p + "self_attn.o_proj.bias", torch.zeros(d)),
                mlp=mlp,
                down=sd[p + "mlp.down_proj.weight"].T,
                down_bias=sd.get(p + "mlp.down_proj.bias", torch.zeros(d)),
                window=window,
                parallel=False,
            )
        )
    return layers


def neox_layers(sd: dict[str, Tensor], cfg: object) -> list[Layer]:
    d, n_head = cfg.hidden_size, cfg.num_attention_heads  # type: ignore[attr-defined]
    dh = d // n_head
    eps = cfg.layer_norm_eps  # type: ignore[attr-defined]
    act = ACT[cfg.hidden_act]  # type: ignore[attr-defined]
    layers = []
    for i in range(cfg.num_hidden_layers):  # type: ignore[attr-defined]
        p = f"gpt_neox.layers.{i}."
        # query_key_value's output is [head, (q, k, v), d_head]: split it head by head.
        qkv = linear(sd, p + "attention.query_key_value", 3 * n_head, dh)
        w_o = sd[p + "attention.dense.weight"].T
        w_in, b_in = sd[p + "mlp.dense_h_to_4h.weight"], sd[p + "mlp.dense_h_to_4h.bias"]

        def mlp(h: Tensor, w_in=w_in, b_in=b_in) -> Tensor:  # type: ignore[no-untyped-def]
            return act(h @ w_in.T + b_in)

        layers.append(
            Layer(
                norm1=layer_norm(
                    sd[p + "input_layernorm.weight"], sd[p + "input_layernorm.bias"], eps
                ),
                norm2=layer_norm(
                    sd[p + "post_attention_layernorm.weight"],
                    sd[p + "post_attention_layernorm.bias"],
                    eps,
                ),
                q=[qkv[3 * h] for h in range(n_head)],
                k=[qkv[3 * h + 1] for h in range(n_head)],
                v=[qkv[3 * h + 2] for h in range(n_head)],
                o=[w_o[h * dh : (h + 1) * dh] for h in range(n_head)],
                o_bias=sd[p + "attention.dense.bias"],
                mlp=mlp,
                down=sd[p + "mlp.dense_4h_to_h.weight"].T,
                down_bias=sd[p + "mlp.dense_4h_to_h.bias"],
                window=None,
                parallel=cfg.use_parallel_residual,  # type: ignore[attr-defined]
            )
        )
    return layers


def rotate(x: Tensor, positions: Tensor, rotary_dim: int, theta: float) -> Tensor:
    """x [pos d_head]: pairs (i, i + rotary_dim/2) as complex numbers times e^(i·pos·freq_i)."""
    half = rotary_dim // 2
    freq = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / rotary_dim)
    turn = torch.polar(
        torch.ones(len(positions), half, dtype=torch.float64), positions[:, None] * freq
    )
    z = torch.complex(x[:, :half].double(), x[:, half:rotary_dim].double()) * turn
    return torch.cat([z.real.float(), z.imag.float(), x[:, rotary_dim:]], dim=-1)


def naive_run(
    model: PreTrainedModel, tokens: list[int], position: int, target: int, distractor: int
) -> Reference:
    cfg = model.config
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    n = len(tokens)
    rope = cfg.rope_parameters
    if cfg.model_type == "gpt_neox":
        layers = neox_layers(sd, cfg)
        embed = sd["gpt_neox.embed_in.weight"][tokens]
        unembed = sd["embed_out.weight"] if "embed_out.weight" in sd else sd["lm_head.weight"]
        d_head = cfg.hidden_size // cfg.num_attention_heads
        w_f, b_f = sd["gpt_neox.final_layer_norm.weight"], sd["gpt_neox.final_layer_norm.bias"]
        eps_f, centre = cfg.layer_norm_eps, True
    else:
        gemma = cfg.model_type == "gemma"
        layers = llama_layers(sd, cfg, gemma)
        embed = sd["model.embed_tokens.weight"][tokens]
        if gemma:
            embed = embed * torch.tensor(math.sqrt(cfg.hidden_size), dtype=torch.float32)
        unembed = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
        d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        w_f = sd["model.norm.weight"] + (1.0 if gemma else 0.0)
        b_f, eps_f, centre = torch.zeros_like(w_f), cfg.rms_norm_eps, False
    rotary_dim = int(d_head * rope.get("partial_rotary_factor", 1.0))
    positions = torch.arange(n, dtype=torch.float64)

    resid = embed.clone().requires_grad_(True)
    x = resid
    all_probs, all_writes, all_post, all_neuron_writes = [], [], [], []
    for layer in layers:
        h = layer.norm1(x)
        attn_out = torch.zeros_like(x) + layer.o_bias
        layer_probs, layer_writes = [], []
        for head in range(len(layer.q)):
            (wq, bq), (wk, bk), (wv, bv) = layer.q[head], layer.k[head], layer.v[head]
            q = rotate(h @ wq + bq, positions, rotary_dim, rope["rope_theta"])
            k = rotate(h @ wk + bk, positions, rotary_dim, rope["rope_theta"])
            hidden = torch.tensor(
                [
                    [
                        ki > qi or (layer.window is not None and qi - ki >= layer.window)
                        for ki in range(n)
                    ]
                    for qi in range(n)
                ]
            )
            probs = (q @ k.T / math.sqrt(d_head)).masked_fill(hidden, float("-inf")).softmax(-1)
            probs.retain_grad()
            value_writes = (h @ wv + bv) @ layer.o[head]  # [key d_model]
            writes = torch.stack(
                [
                    torch.stack([probs[qi, ki] * value_writes[ki] for ki in range(n)])
                    for qi in range(n)
                ]
            )  # [query key d_model]
            attn_out = attn_out + writes.sum(dim=1)
            layer_probs.append(probs)
            layer_writes.append(writes.detach())
        mlp_in = x if layer.parallel else x + attn_out
        post = layer.mlp(layer.norm2(mlp_in))
        post.retain_grad()
        x = x + attn_out + post @ layer.down + layer.down_bias
        all_probs.append(layer_probs)
        all_writes.append(layer_writes)
        all_post.append(post)
        all_neuron_writes.append((post[:, :, None] * layer.down[None]).detach())

    xf = x[position]
    xf_centred = xf - xf.mean() if centre else xf
    scale = (1.0 / torch.sqrt(xf_centred.pow(2).mean() + eps_f)).detach()
    logits = (xf_centred * scale * w_f + b_f) @ unembed.T
    value = logits[target] - logits[distractor]
    value.backward()
    unembed_diff = unembed[target] - unembed[distractor]

    def contribution(write: Tensor) -> Tensor:
        write = write - write.mean(dim=-1, keepdim=True) if centre else write
        return (write * scale * w_f) @ unembed_diff

    return Reference(
        value=float(value.detach()),
        resid=resid.detach(),
        resid_grad=resid.grad.detach(),  # type: ignore[union-attr]
        probs=[[p.detach() for p in lp] for lp in all_probs],
        probs_grad=[[p.grad.detach() for p in lp] for lp in all_probs],  # type: ignore[union-attr]
        head_writes=all_writes,
        post=[p.detach() for p in all_post],
        post_grad=[p.grad.detach() for p in all_post],  # type: ignore[union-attr]
        neuron_writes=all_neuron_writes,
        contribution=contribution,
        final_bias_effect=float(b_f @ unembed_diff),
    )
