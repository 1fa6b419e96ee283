"""The floor of the Llama node-table benchmark: benchmarks/floor.py for a Llama checkpoint.

Import torch, load the safetensors, run one forward and one backward pass of a logit difference
(logits only at the last position, no parameter gradients) through a textbook Llama: RMSNorm,
rotary grouped-query attention with an explicit softmax (as any tool that reports attention
probabilities needs), SwiGLU MLP. Weights in DTYPE (default float32).

    python benchmarks/floor_llama.py CHECKPOINT_DIR TOKEN_IDS TARGET_ID DISTRACTOR_ID [DTYPE]
"""

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * (x.float().pow(2).mean(dim=-1, keepdim=True) + eps).rsqrt().to(x.dtype) * w


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def main() -> None:
    directory, token_text, target, distractor = sys.argv[1:5]
    dtype = getattr(torch, sys.argv[5] if len(sys.argv) > 5 else "float32")
    config = json.loads(Path(directory, "config.json").read_text())
    w = {k: v.to(dtype) for k, v in load_file(f"{directory}/model.safetensors").items()}
    tokens = torch.tensor([int(t) for t in token_text.split(",")])
    n, d, n_head = len(tokens), config["hidden_size"], config["num_attention_heads"]
    n_kv, eps = config["num_key_value_heads"], config["rms_norm_eps"]
    dh = d // n_head
    inv_freq = 1.0 / config["rope_theta"] ** (torch.arange(0, dh, 2).float() / dh)
    angles = torch.arange(n).float()[:, None] * inv_freq  # [pos d_head/2]
    cos, sin = angles.cos()[None], angles.sin()[None]  # [1 pos d_head/2]
    x = w["model.embed_tokens.weight"][tokens].requires_grad_(True)
    resid = x
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        h = rms_norm(resid, w[p + "input_layernorm.weight"], eps)
        q = (h @ w[p + "self_attn.q_proj.weight"].T).view(n, n_head, dh).transpose(0, 1)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).view(n, n_kv, dh).transpose(0, 1)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).view(n, n_kv, dh).transpose(0, 1)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)  # [head pos d_head]
        k = k.repeat_interleave(n_head // n_kv, dim=0)
        v = v.repeat_interleave(n_head // n_kv, dim=0)
        scores = (q @ k.transpose(1, 2) / dh**0.5).masked_fill(~mask, float("-inf"))
        z = (scores.float().softmax(dim=-1).to(dtype) @ v).transpose(0, 1).reshape(n, d)
        resid = resid + z @ w[p + "self_attn.o_proj.weight"].T
        h = rms_norm(resid, w[p + "post_attention_layernorm.weight"], eps)
        gate = F.silu(h @ w[p + "mlp.gate_proj.weight"].T)
        resid = (
            resid + (gate * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
        )
    last = rms_norm(resid[-1], w["model.norm.weight"], eps)
    logits = last.float() @ w["lm_head.weight"].float().T
    value = logits[int(target)] - logits[int(distractor)]
    value.backward()
    print(float(value.detach()))


if __name__ == "__main__":
    main()
