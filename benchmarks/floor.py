"""The floor of the node-table benchmark: the least a whole process must do, in plain torch.

Import torch, load the safetensors, run one forward and one backward pass of the same logit
difference (logits only at the last position, no parameter gradients). A textbook GPT-2: explicit
softmax attention, as any tool that reports attention probabilities needs.

    python benchmarks/floor.py CHECKPOINT_DIR TOKEN_IDS TARGET_ID DISTRACTOR_ID
"""

import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file


def main() -> None:
    directory, token_text, target, distractor = sys.argv[1:5]
    config = json.loads(Path(directory, "config.json").read_text())
    w = {
        k.removeprefix("transformer."): v
        for k, v in load_file(f"{directory}/model.safetensors").items()
    }
    tokens = torch.tensor([int(t) for t in token_text.split(",")])
    n, d, n_head = len(tokens), config["n_embd"], config["n_head"]
    dh, eps = d // n_head, config["layer_norm_epsilon"]
    x = (w["wte.weight"][tokens] + w["wpe.weight"][:n]).requires_grad_(True)
    resid = x
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    for layer in range(config["n_layer"]):
        p = f"h.{layer}."
        h = F.layer_norm(resid, (d,), w[p + "ln_1.weight"], w[p + "ln_1.bias"], eps)
        q, k, v = (h @ w[p + "attn.c_attn.weight"] + w[p + "attn.c_attn.bias"]).split(d, dim=-1)
        q, k, v = (t.view(n, n_head, dh).transpose(0, 1) for t in (q, k, v))  # [head pos d_head]
        scores = (q @ k.transpose(1, 2) / math.sqrt(dh)).masked_fill(~mask, float("-inf"))
        z = (scores.softmax(dim=-1) @ v).transpose(0, 1).reshape(n, d)
        resid = resid + z @ w[p + "attn.c_proj.weight"] + w[p + "attn.c_proj.bias"]
        h = F.layer_norm(resid, (d,), w[p + "ln_2.weight"], w[p + "ln_2.bias"], eps)
        post = F.gelu(h @ w[p + "mlp.c_fc.weight"] + w[p + "mlp.c_fc.bias"], approximate="tanh")
        resid = resid + post @ w[p + "mlp.c_proj.weight"] + w[p + "mlp.c_proj.bias"]
    last = F.layer_norm(resid[-1], (d,), w["ln_f.weight"], w["ln_f.bias"], eps)
    logits = last @ w.get("lm_head.weight", w["wte.weight"]).T
    value = logits[int(target)] - logits[int(distractor)]
    value.backward()
    print(float(value.detach()))


if __name__ == "__main__":
    main()
