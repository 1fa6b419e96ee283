"""Benchmark: the whole `tdb nodes --json` process against the floor (benchmarks/floor.py).

On a random checkpoint built here into a temporary folder: `--arch gpt2` (the default) is
GPT-2-small-shaped (12 layers, d_model 768, 12 heads, vocab 50257), `--arch llama` is
Llama-shaped (4 layers, d_model 2048, 16 heads, 4 key/value heads, d_mlp 5632, vocab 32000;
its floor is benchmarks/floor_llama.py). Median wall time and peak memory of each whole
process, runs alternating, and the ratios tdb / floor. Peak memory is the process's maximum
resident set size (`os.wait4`'s ru_maxrss): one fresh process per run, so every run's peak is its
own. Goals: GPT-2 at 512 and 1,024 tokens time <= 1.2x; Llama at 4,096 tokens time <= 1.3x and
memory <= 1.5x.

    .venv/bin/python benchmarks/node_table.py [--repeats 5] [--lengths 64,512]
    .venv/bin/python benchmarks/node_table.py --arch llama --lengths 1024,4096 --dtype float32
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import save_file

import tdb
from tdb.checkpoint import save_checkpoint
from tdb.models.gpt2 import GPT2, GPT2Config

HERE = Path(__file__).parent
TDB = Path(sys.executable).parent / "tdb"


def build_checkpoint(directory: Path) -> None:
    config = GPT2Config(d_vocab=50257, n_ctx=1024, d_model=768, n_layer=12, n_head=12, d_mlp=3072)
    torch.manual_seed(0)
    save_checkpoint(GPT2(config), directory)


LLAMA = {
    "model_type": "llama",
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "hidden_size": 2048,
    "num_hidden_layers": 4,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "intermediate_size": 5632,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
}


def build_llama_checkpoint(directory: Path) -> None:
    """Random weights in the Hugging Face Llama layout (nn.Linear: [out in])."""
    c = LLAMA
    d, d_kv = (
        c["hidden_size"],
        c["hidden_size"] // c["num_attention_heads"] * c["num_key_value_heads"],
    )
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], d), "model.norm.weight": (d,)}
    shapes["lm_head.weight"] = (c["vocab_size"], d)
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes |= {
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (d, d),
            p + "self_attn.k_proj.weight": (d_kv, d),
            p + "self_attn.v_proj.weight": (d_kv, d),
            p + "self_attn.o_proj.weight": (d, d),
            p + "mlp.gate_proj.weight": (c["intermediate_size"], d),
            p + "mlp.up_proj.weight": (c["intermediate_size"], d),
            p + "mlp.down_proj.weight": (d, c["intermediate_size"]),
        }
    gen = torch.Generator().manual_seed(0)
    tensors = {
        name: torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen) * 0.02
        for name, shape in shapes.items()
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(c, indent=2) + "\n")
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


def measure(command: list[str]) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds (user + system; steadier on a shared machine) and peak RSS
    (MiB) of one whole process."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - start
    if status != 0:
        raise SystemExit(
            f"{command[0]} failed: {process.stderr.read().decode() if process.stderr else ''}"
        )
    return elapsed, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lengths", default="64,512")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--arch", choices=("gpt2", "llama"), default="gpt2")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args()
    # tdb's modules compiled to bytecode once, as `pip install` does: an editable install under
    # PYTHONDONTWRITEBYTECODE would otherwise compile them in every process.
    compileall.compile_dir(Path(tdb.__file__).parent, quiet=1)
    dtype_args = [] if args.dtype == "float32" else ["--dtype", args.dtype]
    floor = HERE / ("floor_llama.py" if args.arch == "llama" else "floor.py")
    vocab = LLAMA["vocab_size"] if args.arch == "llama" else 50257
    table = Table(
        title=f"tdb nodes vs floor, {args.arch} {args.dtype} (median of runs, whole processes; "
        f"load average before: {os.getloadavg()[0]:.1f})"
    )
    for column in (
        "tokens",
        "floor s",
        "tdb s",
        "time ratio",
        "floor CPU s",
        "tdb CPU s",
        "CPU ratio",
        "floor MiB",
        "tdb MiB",
        "memory ratio",
    ):
        table.add_column(column, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp)
        (build_llama_checkpoint if args.arch == "llama" else build_checkpoint)(checkpoint)
        for n in (int(x) for x in args.lengths.split(",")):
            tokens = ",".join(
                str(t)
                for t in torch.randint(
                    0, vocab, (n,), generator=torch.Generator().manual_seed(n)
                ).tolist()
            )
            floor_cmd = [
                sys.executable,
                str(floor),
                str(checkpoint),
                tokens,
                "11",
                "12",
                *([args.dtype] if args.arch == "llama" else []),
            ]
            tdb_cmd = [
                str(TDB),
                "nodes",
                "--token-ids",
                tokens,
                "--target-id",
                "11",
                "--distractor-id",
                "12",
                "--model",
                str(checkpoint),
                "--json",
                "-k",
                str(args.k),
                *dtype_args,
            ]
            floor_runs, tdb_runs = [], []
            for _ in range(args.repeats):  # alternating, so drift hits both alike
                floor_runs.append(measure(floor_cmd))
                tdb_runs.append(measure(tdb_cmd))
            ft = statistics.median(r[0] for r in floor_runs)
            tt = statistics.median(r[0] for r in tdb_runs)
            fc = statistics.median(r[1] for r in floor_runs)
            tc = statistics.median(r[1] for r in tdb_runs)
            fm = statistics.median(r[2] for r in floor_runs)
            tm = statistics.median(r[2] for r in tdb_runs)
            table.add_row(
                str(n),
                f"{ft:.2f}",
                f"{tt:.2f}",
                f"{tt / ft:.2f}x",
                f"{fc:.2f}",
                f"{tc:.2f}",
                f"{tc / fc:.2f}x",
                f"{fm:.0f}",
                f"{tm:.0f}",
                f"{tm / fm:.2f}x",
            )
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
