"""Train the demo model's sparse autoencoders: one TopK SAE on the attention output and one on
the MLP output of every layer, on the model's own training mix, on the CPU, seeded.

    python -m tdb.demo.sae.train                       # demo checkpoint -> tdb/demo/sae/
    python -m tdb.demo.sae.train --model DIR --out DIR --tokens 2000000

Every step runs the model on one fresh batch of the training mix (tdb.demo.batches: generated
IOI / name / capital / induction documents and King James Bible prose) and takes one optimiser
step on every SAE, so the activations are never stored. The recipe:

- TopK activation (k latents per token, so no sparsity penalty to tune), unit-norm decoder rows
  (renormalised after every step), encoder initialised to the decoder's transpose, the
  pre-encoder bias to the mean activation of the first batch.
- Inputs divided by one scale per SAE (their RMS distance from the mean, from the first batch)
  while training, folded back into the weights when saving, so the saved SAE reads the raw
  activation.
- An auxiliary TopK loss on latents that have not fired for a while: the dead latents' own top
  k_aux reconstruct what the live ones missed, which pulls them back into use.

Written next to the weights, `sae_stats.json` holds the settings and, per SAE, measured on held-out
batches with the float16 weights as shipped: the fraction of variance explained
(1 - sum |x - x_hat|^2 / sum |x - mean x|^2), the mean L0 (latents above zero per token) and the
share of dead latents (never above zero on the held-out tokens). docs/model-card.md quotes them.
Needs the Bible text: `apt-get install -y bible-kjv-text bible-kjv`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from tdb.checkpoint import LoadedModel, load_model
from tdb.demo.batches import Batch, DocumentMix
from tdb.demo.bible import BibleNotInstalledError, load_bible_chapters
from tdb.hooks import HookPoint, Hooks
from tdb.nodes import LatentSite
from tdb.sae import AttachedSae, SparseAutoencoder, load_saes, save_openai_layout

DEFAULT_OUT = Path(__file__).parent
SITES = {LatentSite.ATTN_OUT: HookPoint.ATTN_OUT, LatentSite.MLP_OUT: HookPoint.MLP_OUT}


@dataclass
class Trainee:
    """One SAE being trained, on inputs (x - mean) / scale."""

    site: LatentSite
    layer: int
    sae: SparseAutoencoder
    scale: float
    optimizer: torch.optim.Adam
    steps_since_fired: Tensor  # [d_sae]

    @property
    def name(self) -> str:
        return f"{self.site.value}.{self.layer}"


def activations(loaded: LoadedModel, batch: Batch) -> dict[tuple[LatentSite, int], Tensor]:
    """[tokens d_model] activation at every site and layer, for every token of the batch."""
    out: dict[tuple[LatentSite, int], Tensor] = {}

    def keep(site: LatentSite) -> Callable[[Tensor, int | None], None]:
        def hook(x: Tensor, layer: int | None) -> None:
            assert layer is not None
            out[(site, layer)] = x.detach().flatten(0, 1)

        return hook

    with torch.no_grad():
        loaded.model(
            batch.tokens,
            Hooks({point: keep(site) for site, point in SITES.items()}),
            position_ids=batch.position_ids,
            attention_mask=batch.attention_mask,
            logit_positions=torch.tensor([0]),
        )
    return out


def new_trainee(
    site: LatentSite, layer: int, x: Tensor, d_sae: int, k: int, lr: float, seed: int
) -> Trainee:
    d_in = x.shape[1]
    generator = torch.Generator().manual_seed(seed)
    mean = x.mean(dim=0)
    scale = float((x - mean).pow(2).sum(dim=1).mean().sqrt()) / math.sqrt(d_in)
    sae = SparseAutoencoder(d_in, d_sae, k)
    with torch.no_grad():
        W_dec = torch.randn(d_sae, d_in, generator=generator)
        sae.W_dec.copy_(W_dec / W_dec.norm(dim=1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec)
        sae.pre_bias.copy_(mean / scale)
        sae.decoder_bias.copy_(mean / scale)
    params = [sae.W_enc, sae.latent_bias, sae.W_dec, sae.pre_bias]
    optimizer = torch.optim.Adam(params, lr=lr)
    return Trainee(site, layer, sae, scale, optimizer, torch.zeros(d_sae, dtype=torch.long))


def train_step(t: Trainee, x: Tensor, k_aux: int, dead_after: int, aux_weight: float) -> float:
    """One optimiser step on a batch of raw activations [tokens d_in]; returns the batch's
    normalised MSE."""
    sae = t.sae
    x = x / t.scale
    pre = sae.pre_activation(x)
    z = sae.activate(pre)
    # One bias for input and output (OpenAI's layout): tie them in the graph.
    x_hat = z @ sae.W_dec + sae.pre_bias
    error = x - x_hat
    variance = (x - x.mean(dim=0)).pow(2).sum()
    loss = error.pow(2).sum() / variance
    fired = (z > 0).any(dim=0)
    t.steps_since_fired = torch.where(fired, 0, t.steps_since_fired + 1)
    dead = t.steps_since_fired > dead_after
    if bool(dead.any()):
        n_aux = min(k_aux, int(dead.sum()))
        dead_pre = pre.masked_fill(~dead, -math.inf)
        top = torch.topk(dead_pre, n_aux, dim=-1)
        z_aux = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        target = error.detach()
        aux = (z_aux @ sae.W_dec - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-8)
        loss = loss + aux_weight * aux
    t.optimizer.zero_grad(set_to_none=True)
    loss.backward()  # type: ignore[no-untyped-call]
    t.optimizer.step()
    with torch.no_grad():
        sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))
    return float(error.detach().pow(2).sum() / variance)


def finished(t: Trainee) -> AttachedSae:
    """The SAE on raw activations: the training scale folded into its weights."""
    src = t.sae
    sae = SparseAutoencoder(src.d_in, src.d_sae, src.k)
    with torch.no_grad():
        sae.pre_bias.copy_(src.pre_bias * t.scale)
        sae.decoder_bias.copy_(src.pre_bias * t.scale)
        sae.W_enc.copy_(src.W_enc / t.scale)
        sae.latent_bias.copy_(src.latent_bias)
        sae.W_dec.copy_(src.W_dec * t.scale)
    sae.requires_grad_(False)
    return AttachedSae(sae, t.site, t.layer, t.name)


@dataclass
class Tally:
    """Running sums for one SAE's held-out numbers."""

    error: float = 0.0
    active: float = 0.0
    tokens: int = 0


def evaluate(
    loaded: LoadedModel, saes: list[AttachedSae], mix: DocumentMix, batches: int, rows: int
) -> dict[str, dict[str, float]]:
    """Fraction of variance explained, mean L0 and dead share per SAE on fresh batches."""
    tallies = {a.key: Tally() for a in saes}
    fired = {a.key: torch.zeros(a.sae.d_sae, dtype=torch.bool) for a in saes}
    xs: dict[tuple[LatentSite, int], list[Tensor]] = {a.key: [] for a in saes}
    with torch.no_grad():
        for _ in range(batches):
            acts = activations(loaded, mix.batch(rows, loaded.model.config.n_ctx))
            for a in saes:
                x, tally = acts[a.key], tallies[a.key]
                z = a.sae.encode(x)
                tally.error += float((x - a.sae.decode(z)).pow(2).sum())
                tally.active += float((z > 0).sum())
                tally.tokens += x.shape[0]
                fired[a.key] |= (z > 0).any(dim=0)
                xs[a.key].append(x)
    out = {}
    for a in saes:
        x, tally = torch.cat(xs[a.key]), tallies[a.key]
        variance = float((x - x.mean(dim=0)).pow(2).sum())
        out[f"{a.site.value}.{a.layer}"] = {
            "fraction_of_variance_explained": round(1.0 - tally.error / variance, 4),
            "mean_l0": round(tally.active / tally.tokens, 2),
            "dead_share": round(float((~fired[a.key]).float().mean()), 4),
            "eval_tokens": tally.tokens,
        }
    return out


def weights_digest(directory: Path) -> str:
    """SHA-256 of the checkpoint's weights file(s): which model these SAEs were trained on."""
    digest = hashlib.sha256()
    for path in sorted(directory.glob("*.safetensors")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def train(args: argparse.Namespace) -> dict[str, object]:
    torch.manual_seed(args.seed)
    start = time.monotonic()
    loaded = load_model(args.model)
    assert loaded.tokenizer.inner is not None, "the model needs a tokenizer"
    chapters = load_bible_chapters()
    mix = DocumentMix(loaded.tokenizer.inner, chapters, seed=args.seed)
    n_ctx = loaded.model.config.n_ctx
    tokens_per_step = args.rows * n_ctx
    steps = max(1, args.tokens // tokens_per_step)
    first = activations(loaded, mix.batch(args.rows, n_ctx))
    trainees = [
        new_trainee(site, layer, x, args.d_sae, args.k, args.lr, args.seed + i)
        for i, ((site, layer), x) in enumerate(sorted(first.items()))
    ]
    schedules = [
        torch.optim.lr_scheduler.LambdaLR(
            t.optimizer, lambda step: min(1.0, (steps - step) / (0.2 * steps))
        )
        for t in trainees
    ]
    for step in range(steps):
        acts = activations(loaded, mix.batch(args.rows, n_ctx))
        losses = [
            train_step(t, acts[(t.site, t.layer)], args.k_aux, args.dead_after, args.aux_weight)
            for t in trainees
        ]
        for schedule in schedules:
            schedule.step()
        if step % 50 == 0 or step == steps - 1:
            shown = " ".join(f"{t.name}={1 - v:.3f}" for t, v in zip(trainees, losses, strict=True))
            print(f"step {step}/{steps} {time.monotonic() - start:.0f}s FVE {shown}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    for t in trainees:
        save_openai_layout(finished(t), args.out / f"{t.name}.safetensors", dtype=torch.float16)
    shipped = [a for a in load_saes(args.out) if a.key in first]
    eval_mix = DocumentMix(loaded.tokenizer.inner, chapters, seed=args.seed + 1000)
    stats = evaluate(loaded, shipped, eval_mix, args.eval_batches, args.rows)
    report: dict[str, object] = {
        "model": str(loaded.path.name if args.model is None else args.model),
        "model_sha256": weights_digest(loaded.path),
        "settings": {
            "d_sae": args.d_sae,
            "k": args.k,
            "k_aux": args.k_aux,
            "dead_after_steps": args.dead_after,
            "aux_weight": args.aux_weight,
            "lr": args.lr,
            "tokens_per_step": tokens_per_step,
            "steps": steps,
            "train_tokens_per_sae": steps * tokens_per_step,
            "seed": args.seed,
            "dtype_saved": "float16",
        },
        "minutes": round((time.monotonic() - start) / 60, 2),
        "saes": stats,
    }
    (args.out / "sae_stats.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report


def card_table(report: dict[str, object]) -> str:
    """The model card's table (docs/model-card.md) from a `sae_stats.json` report."""
    saes = report["saes"]
    assert isinstance(saes, dict)
    lines = [
        "| SAE | fraction of variance explained | mean L0 | dead latents |",
        "|---|---|---|---|",
    ]
    for name, stats in saes.items():
        site, layer = name.rsplit(".", 1)
        lines.append(
            f"| layer {layer} {site.replace('_', ' ')} | "
            f"{stats['fraction_of_variance_explained']:.3f} | {stats['mean_l0']:.1f} | "
            f"{100 * stats['dead_share']:.1f} % |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tdb.demo.sae.train", description=__doc__)
    parser.add_argument("--model", default=None, help="checkpoint directory (default: demo)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the SAEs")
    parser.add_argument("--tokens", type=int, default=500_000, help="training tokens per SAE")
    parser.add_argument("--rows", type=int, default=16, help="rows of n_ctx tokens per step")
    parser.add_argument("--d-sae", type=int, default=1024)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--k-aux", type=int, default=128)
    parser.add_argument("--dead-after", type=int, default=100, help="steps without firing")
    parser.add_argument("--aux-weight", type=float, default=1 / 32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-batches", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--card", action="store_true", help="only print the model card table of --out's stats"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.card:
        print(card_table(json.loads((args.out / "sae_stats.json").read_text())))
        return 0
    try:
        train(args)
    except BibleNotInstalledError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
