"""Benchmark on a CUDA GPU: the node table and the scan of an 8B-shaped Llama in bfloat16.

    python benchmarks/gpu.py [--tokens 2048] [--repeats 3] [--layers 32] [--scan-windows 256]
    python benchmarks/gpu.py --dry-run      # a tiny model on the CPU: checks the script runs

Random weights made on the GPU (no checkpoint: 16 GB would take longer to write than to run).
Reports, for the node table (`tdb.capture.capture` with every metric, pruned to the top k per
layer, then the table's top k), the median latency and the peak GPU memory
(`torch.cuda.max_memory_allocated`) against its floor: one forward and one backward pass of the
same model from the embedding to the same logit difference, no hooks and no metrics. For the
scan (`tdb.scan.shard.scan_shard` over random windows), tokens per second against the plain
forward pass over the same batches. Without CUDA it stops at once with a message (exit 2).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from tdb.capture import capture
from tdb.direction import LogitDiff
from tdb.hooks import NO_HOOKS, HookPoint, Hooks
from tdb.metrics import ALL_GROUPS
from tdb.models.layers import RopeConfig
from tdb.models.llama import Llama, LlamaConfig
from tdb.scan.shard import NO_LOGITS, ScanSettings, scan_shard
from tdb.scan.sources import model_sources
from tdb.scan.windows import Shard
from tdb.topk import multi_group_topk

# Llama 3 8B's shape.
EIGHT_B = {"d_vocab": 128256, "d_model": 4096, "n_head": 32, "n_kv_head": 8, "d_mlp": 14336}
TINY = {"d_vocab": 512, "d_model": 64, "n_head": 4, "n_kv_head": 2, "d_mlp": 128}


@dataclass(frozen=True)
class Timing:
    median_s: float
    peak_gib: float


def random_llama(n_layer: int, n_ctx: int, shape: dict[str, int], device: torch.device,
                 dtype: torch.dtype) -> Llama:  # fmt: skip
    """A Llama of `shape` with random weights made on `device` in `dtype`."""
    d_head = shape["d_model"] // shape["n_head"]
    config = LlamaConfig(n_ctx=n_ctx, n_layer=n_layer, d_head=d_head,
                         rope=RopeConfig(theta=5e5, rotary_dim=d_head), **shape)  # fmt: skip
    with torch.device("meta"):
        model = Llama(config)
    generator = torch.Generator(device).manual_seed(0)
    state = {}
    for name, p in model.named_parameters():
        kept = torch.float32 if ".ln_" in name or name.startswith("ln_") else dtype
        if p.ndim == 1:
            state[name] = torch.ones(p.shape, device=device, dtype=kept)
        else:
            w = torch.empty(p.shape, device=device, dtype=kept)
            state[name] = w.normal_(0.0, 1.0 / math.sqrt(p.shape[-2]), generator=generator)
    model.load_state_dict(state, assign=True)
    model.requires_grad_(False).eval()
    return model


def timed(run: Callable[[], object], repeats: int, device: torch.device) -> Timing:
    """Median wall time of `run` (after one warm-up) and its peak memory on the device."""
    run()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else math.nan
    return Timing(statistics.median(times), peak)


def floor(model: Llama, tokens: torch.Tensor, direction: LogitDiff) -> float:
    """Forward + backward from the embedding to the logit difference: no hooks, no metrics."""
    leaf: list[torch.Tensor] = []

    def embed_leaf(x: torch.Tensor, layer: int | None) -> torch.Tensor:
        leaf.append(x.detach().requires_grad_(True))
        return leaf[0]

    with torch.enable_grad():
        logits = model(tokens[None], Hooks({HookPoint.RESID_EMBED: embed_leaf}),
                       logit_positions=torch.tensor([direction.position]))[0, 0]  # fmt: skip
        value = (
            logits[list(direction.target_ids)].float().mean()
            - logits[list(direction.distractor_ids)].float().mean()
        )
        (grad,) = torch.autograd.grad(value, leaf[0])
    return float(grad.float().norm())


def node_table(model: Llama, tokens: torch.Tensor, direction: LogitDiff, k: int) -> int:
    cap = capture(model, tokens, direction, ALL_GROUPS, prune_k=k)
    return len(multi_group_topk(cap.store, ALL_GROUPS, k).nodes)


def random_shard(n_windows: int, window: int, d_vocab: int) -> Shard:
    rng = np.random.default_rng(0)
    return Shard(
        index=0,
        tokens=rng.integers(0, d_vocab, (n_windows, window)),
        lengths=np.full(n_windows, window),
        doc_ids=np.arange(n_windows),
        starts=np.zeros(n_windows, dtype=np.int64),
        n_docs=n_windows,
        context=np.zeros(n_windows, dtype=np.int64),  # each window a document of its own
    )


def scan_rates(model: Llama, shard: Shard, batch_size: int, window: int) -> tuple[float, float]:
    """Tokens per second of the scan and of the plain forward pass over the same batches."""
    settings = ScanSettings(k=20, window=window, batch_size=batch_size)
    sources = model_sources(model)
    device = model.W_E.device

    def scan() -> None:
        scan_shard(model, sources, shard, settings)

    def forward() -> None:
        with torch.inference_mode():
            for lo in range(0, len(shard.lengths), batch_size):
                tokens = torch.from_numpy(shard.tokens[lo : lo + batch_size])
                model(tokens, NO_HOOKS, logit_positions=NO_LOGITS)

    n = shard.n_tokens
    return n / timed(scan, 1, device).median_s, n / timed(forward, 1, device).median_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048, help="prompt length (default 2048)")
    parser.add_argument("--layers", type=int, default=32, help="layers (8B: 32)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (median)")
    parser.add_argument("-k", type=int, default=10, help="top k per metric (default 10)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--scan-windows", type=int, default=256, help="windows scanned")
    parser.add_argument("--window", type=int, default=64, help="tokens per scan window")
    parser.add_argument("--batch-size", type=int, default=32, help="windows per scan batch")
    parser.add_argument("--dry-run", action="store_true", help="a tiny model on the CPU")
    args = parser.parse_args(argv)
    if args.dry_run:
        device, shape = torch.device("cpu"), TINY
        args.layers, args.tokens, args.repeats, args.scan_windows = 2, 32, 1, 8
    elif not torch.cuda.is_available():
        print(
            "benchmarks/gpu.py: needs a CUDA GPU, and CUDA is not available here "
            f"(torch {torch.__version__}); --dry-run runs a tiny model on the CPU",
            file=sys.stderr,
        )
        return 2
    else:
        device, shape = torch.device("cuda", 0), EIGHT_B
    dtype = getattr(torch, args.dtype)
    model = random_llama(args.layers, max(args.tokens, args.window), shape, device, dtype)
    tokens = torch.randint(0, shape["d_vocab"], (args.tokens,), generator=torch.Generator())
    direction = LogitDiff((1,), (2,), args.tokens - 1)
    table = timed(lambda: node_table(model, tokens, direction, args.k), args.repeats, device)
    base = timed(lambda: floor(model, tokens, direction), args.repeats, device)
    shard = random_shard(args.scan_windows, args.window, shape["d_vocab"])
    scan_rate, forward_rate = scan_rates(model, shard, args.batch_size, args.window)
    name = "tiny (dry run)" if args.dry_run else f"8B-shaped Llama, {args.layers} layers"
    print(f"{name}, {args.dtype}, {args.tokens} tokens, on {device}")
    print(f"  node table  {table.median_s:8.3f} s  peak {table.peak_gib:6.2f} GiB")
    print(f"  floor       {base.median_s:8.3f} s  peak {base.peak_gib:6.2f} GiB")
    print(
        f"  ratio       {table.median_s / base.median_s:8.2f}x time, "
        f"{table.peak_gib / base.peak_gib:.2f}x memory"
    )
    print(
        f"  scan {scan_rate:,.0f} tokens/s, plain forward {forward_rate:,.0f} tokens/s: "
        f"{scan_rate / forward_rate:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
