"""Peak host memory while `load_model` reads a bfloat16 checkpoint, against the file's size.

    python benchmarks/load_memory.py [--mb 400] [--dtype bfloat16] [--dir DIR]

Writes a random Llama-shaped checkpoint of about `--mb` MB in bfloat16 (safetensors, as
transformers saves it), then loads it in a fresh process and reports that process's peak
resident memory (VmHWM, what `resource.getrusage(...).ru_maxrss` reports, reset once the
imports are done; tracemalloc does not see torch's memory) beyond what it held before loading.
The goal is <= 1.1x the file: each tensor is read and converted on its own, with no float32
copy of the whole model on the way.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

CHILD = """
import sys
import torch
from tdb.checkpoint import load_model
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024  # kB
load_model(None)  # the demo model: every module loading needs is imported (tens of MB)
# Importing torch peaks higher than it settles: reset the peak (Linux: clear_refs 5) so the
# peak measured is the loading's, over what the process holds before it.
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS")
loaded = load_model(sys.argv[1], device="cpu", dtype=sys.argv[2])
# Touch every weight: a tensor still backed by the file's pages counts once it is resident.
for p in loaded.model.parameters():
    p.detach().max()
after = status("VmHWM")  # the peak resident set size, as getrusage's ru_maxrss
params = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
print(before, after, params)
"""


def write_checkpoint(directory: Path, megabytes: int) -> int:
    """A random bfloat16 Llama of about `megabytes` MB; returns the file's size in bytes."""
    d_model, n_head, n_kv, d_mlp, vocab = 1024, 8, 2, 2816, 32000
    d_head = d_model // n_head
    per_layer = 2 * (d_model * d_model + 2 * d_model * n_kv * d_head + 3 * d_model * d_mlp)
    n_layer = max(1, (megabytes * 2**20 - 2 * 2 * vocab * d_model) // per_layer)
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": vocab,
        "hidden_size": d_model,
        "intermediate_size": d_mlp,
        "num_hidden_layers": int(n_layer),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "torch_dtype": "bfloat16",
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    generator = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * 0.02).to(torch.bfloat16)

    tensors = {
        "model.embed_tokens.weight": randn(vocab, d_model),
        "model.norm.weight": torch.ones(d_model, dtype=torch.bfloat16),
        "lm_head.weight": randn(vocab, d_model),
    }
    for layer in range(int(n_layer)):
        p = f"model.layers.{layer}."
        tensors |= {
            p + "input_layernorm.weight": torch.ones(d_model, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(d_model, dtype=torch.bfloat16),
            p + "self_attn.q_proj.weight": randn(d_model, d_model),
            p + "self_attn.k_proj.weight": randn(n_kv * d_head, d_model),
            p + "self_attn.v_proj.weight": randn(n_kv * d_head, d_model),
            p + "self_attn.o_proj.weight": randn(d_model, d_model),
            p + "mlp.gate_proj.weight": randn(d_mlp, d_model),
            p + "mlp.up_proj.weight": randn(d_mlp, d_model),
            p + "mlp.down_proj.weight": randn(d_model, d_mlp),
        }
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return (directory / "model.safetensors").stat().st_size


def measure(directory: Path, dtype: str) -> dict[str, float]:
    """Load in a fresh process: its peak RSS growth while loading, and the file's size."""
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(directory), dtype],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    before, after, params = (int(x) for x in out)
    size = (directory / "model.safetensors").stat().st_size
    return {
        "file_mb": size / 2**20,
        "params_mb": params / 2**20,
        "peak_growth_mb": (after - before) / 2**20,
        "ratio": (after - before) / size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=400, help="checkpoint size (default 400 MB)")
    parser.add_argument("--dtype", default="bfloat16", help="the dtype to load in")
    parser.add_argument("--dir", help="where to write the checkpoint (default: a temp folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(args.dir or tmp) / "llama-bf16"
        write_checkpoint(directory, args.mb)
        result = measure(directory, args.dtype)
    print(
        f"file {result['file_mb']:.0f} MB, weights {result['params_mb']:.0f} MB in "
        f"{args.dtype}, peak host memory while loading +{result['peak_growth_mb']:.0f} MB = "
        f"{result['ratio']:.2f}x the file"
    )


if __name__ == "__main__":
    main()
