"""A deliberately naive GPT-2 on Hugging Face's weights: per-head loops, explicit write vectors.

It shares no code with tdb. It computes the reference values of every metric: activation × gradient
by autograd (final layer norm's scale detached), write vectors node by node, and the exact linear
contribution of each write vector through the frozen final layer norm and the unembedding.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel


@dataclass
class Reference:
    value: float
    resid: torch.Tensor  # [pos d_model] embedding
    resid_grad: torch.Tensor
    probs: list[list[torch.Tensor]]  # [layer][head] -> [query key]
    probs_grad: list[list[torch.Tensor]]
    head_writes: list[list[torch.Tensor]]  # [layer][head] -> [query key d_model]
    post: list[torch.Tensor]  # [layer] -> [pos d_mlp]
    post_grad: list[torch.Tensor]
    neuron_writes: list[torch.Tensor]  # [layer] -> [pos d_mlp d_model]
    resid_mid_grad: list[torch.Tensor]  # [layer] -> [pos d_model]: after attention
    attn_out: list[torch.Tensor]  # [layer] -> [pos d_model]: what attention writes (bias incl.)
    attn_out_grad: list[torch.Tensor]
    mlp_out: list[torch.Tensor]  # [layer] -> [pos d_model]: what the MLP writes (bias incl.)
    mlp_out_grad: list[torch.Tensor]
    scale: torch.Tensor  # the final layer norm's scale at the direction's position (frozen)
    gamma: torch.Tensor
    unembed_diff: torch.Tensor  # W_U[target] - W_U[distractor]

    def contribution(self, write: torch.Tensor) -> torch.Tensor:
        """What a write vector at the direction's position adds to the direction, exactly."""
        centred = write - write.mean(dim=-1, keepdim=True)
        return (centred * self.scale * self.gamma) @ self.unembed_diff


ACT = {
    "gelu_new": lambda x: (
        0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    ),
    "gelu": lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))),
    "relu": torch.relu,
}


Edit = Callable[[str, int | None, int | None, torch.Tensor], torch.Tensor]
Read = Callable[[dict[str, object]], torch.Tensor]


def frozen_layer_norm(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float
) -> torch.Tensor:
    """Layer norm with its scale 1/sqrt(var + eps) treated as a constant."""
    centred = x - x.mean(dim=-1, keepdim=True)
    scale = 1.0 / torch.sqrt(centred.pow(2).mean(dim=-1, keepdim=True) + eps)
    return centred * scale.detach() * w + b


def grad_of(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x) if x.grad is None else x.grad.detach()


def no_edit(name: str, layer: int | None, head: int | None, x: torch.Tensor) -> torch.Tensor:
    return x


def naive_run(
    model: GPT2LMHeadModel,
    tokens: list[int],
    position: int,
    target: int,
    distractor: int,
    edit: Edit = no_edit,
    read: Read | None = None,
) -> Reference:
    """`edit(name, layer, head, tensor)` may replace "resid" (the embedding), "probs" (one head's
    [query key]), "head_out" (one head's write per query [query d_model]), "post" [pos d_mlp],
    "attn_out" or "mlp_out" (a layer's whole write, [pos d_model]).
    `read(state)` gives the direction from the state (default: logit(target) - logit(distractor)
    at `position`, final layer norm's scale frozen)."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cfg = model.config
    d, n_head = cfg.n_embd, cfg.n_head
    dh = d // n_head
    eps = cfg.layer_norm_epsilon
    n = len(tokens)
    act = ACT[cfg.activation_function]
    resid = sd["transformer.wte.weight"][tokens] + sd["transformer.wpe.weight"][:n]
    resid = edit("resid", None, None, resid).detach().clone().requires_grad_(True)
    x = resid
    state: dict[str, object] = {"sd": sd, "eps": eps, "resid_pre": [], "resid_mid": []}
    all_probs, all_writes, all_post, all_neuron_writes = [], [], [], []
    all_attn_out, all_mlp_out = [], []
    for layer in range(cfg.n_layer):
        p = f"transformer.h.{layer}."
        state["resid_pre"].append(x)  # type: ignore[attr-defined]
        h = F.layer_norm(x, (d,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"], eps)
        qkv = h @ sd[p + "attn.c_attn.weight"] + sd[p + "attn.c_attn.bias"]
        w_proj = sd[p + "attn.c_proj.weight"]
        attn_out = torch.zeros(n, d) + sd[p + "attn.c_proj.bias"]
        layer_probs, layer_writes = [], []
        for head in range(n_head):
            cols = slice(head * dh, (head + 1) * dh)
            q, k, v = qkv[:, cols], qkv[:, d:][:, cols], qkv[:, 2 * d :][:, cols]
            scores = q @ k.T / math.sqrt(dh)
            scores = scores.masked_fill(torch.ones(n, n).triu(1).bool(), float("-inf"))
            probs = edit("probs", layer, head, scores.softmax(-1))
            probs.retain_grad()
            value_writes = v @ w_proj[cols]  # [key d_model]
            writes = torch.stack(
                [
                    torch.stack([probs[qi, ki] * value_writes[ki] for ki in range(n)])
                    for qi in range(n)
                ]
            )  # [query key d_model]
            attn_out = attn_out + edit("head_out", layer, head, writes.sum(dim=1))
            layer_probs.append(probs)
            layer_writes.append(writes.detach())
        attn_out = edit("attn_out", layer, None, attn_out)
        attn_out.retain_grad()
        all_attn_out.append(attn_out)
        x = x + attn_out
        x.retain_grad()
        state["resid_mid"].append(x)  # type: ignore[attr-defined]
        h2 = F.layer_norm(x, (d,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"], eps)
        post = edit(
            "post", layer, None, act(h2 @ sd[p + "mlp.c_fc.weight"] + sd[p + "mlp.c_fc.bias"])
        )
        post.retain_grad()
        w_out = sd[p + "mlp.c_proj.weight"]
        mlp_out = edit("mlp_out", layer, None, post @ w_out + sd[p + "mlp.c_proj.bias"])
        mlp_out.retain_grad()
        all_mlp_out.append(mlp_out)
        x = x + mlp_out
        all_probs.append(layer_probs)
        all_writes.append(layer_writes)
        all_post.append(post)
        all_neuron_writes.append((post[:, :, None] * w_out[None]).detach())
    xf = x[position]
    centred = xf - xf.mean()
    scale = 1.0 / torch.sqrt(centred.pow(2).mean() + eps)
    gamma, beta = sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"]
    unembed = sd.get("lm_head.weight", sd["transformer.wte.weight"])
    logits = (centred * scale.detach() * gamma + beta) @ unembed.T
    state["final"] = x
    state["logits"] = logits
    value = logits[target] - logits[distractor] if read is None else read(state)
    value.backward()
    return Reference(
        value=float(value.detach()),
        resid=resid.detach(),
        resid_grad=grad_of(resid),
        probs=[[p.detach() for p in lp] for lp in all_probs],
        probs_grad=[[grad_of(p) for p in lp] for lp in all_probs],
        head_writes=all_writes,
        post=[p.detach() for p in all_post],
        post_grad=[grad_of(p) for p in all_post],
        neuron_writes=all_neuron_writes,
        resid_mid_grad=[grad_of(x) for x in state["resid_mid"]],  # type: ignore[attr-defined]
        attn_out=[a.detach() for a in all_attn_out],
        attn_out_grad=[grad_of(a) for a in all_attn_out],
        mlp_out=[m.detach() for m in all_mlp_out],
        mlp_out_grad=[grad_of(m) for m in all_mlp_out],
        scale=scale.detach(),
        gamma=gamma,
        unembed_diff=unembed[target] - unembed[distractor],
    )
