"""Train the demo model: a 3-layer GPT-2 with IOI, induction and capital circuits, on CPU.

    $ python -m tdb.demo.train --out runs/demo   # the shipped recipe: one run, <= 44 minutes

Needs the King James Bible from Debian (`apt-get install bible-kjv-text bible-kjv`); nothing is
downloaded. Writes `config.json` + `model.safetensors` (float16), `tokenizer.json` and
`training_log.json` to `--out`, after every evaluation and at the end. Evaluates on held-out data
every `--eval-every` steps and, once every score clears its threshold with a margin, decays the
learning rate to zero over a short cool-down and stops. IOI and induction both appear as sudden
jumps after a flat stretch (see docs/model-card.md), so the step count matters more than anything.
`--device cuda` runs the same recipe on a GPU, for recipe experiments; the shipped checkpoint is
trained on CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from jaxtyping import Float
from tokenizers import Tokenizer as HFTokenizer
from torch import Tensor

from tdb.checkpoint import load_model, save_checkpoint
from tdb.demo.batches import IGNORE, Batch, DocumentMix, document_layout
from tdb.demo.bible import BibleNotInstalledError, bible_document, load_bible_chapters
from tdb.demo.evaluate import DemoEval, evaluate_model
from tdb.demo.tokenizer import D_VOCAB, END_OF_TEXT, check_tokenizer, train_tokenizer
from tdb.errors import TdbError
from tdb.models.gpt2 import GPT2, GPT2Config
from tdb.tokens import Tokenizer

DEMO_CONFIG = GPT2Config(
    d_vocab=D_VOCAB, n_ctx=128, d_model=256, n_layer=3, n_head=8, d_mlp=512, layer_norm_eps=1e-5
)
EARLY_STOP_MARGIN = 0.05  # accuracies >= threshold + 5 points, logit diff >= threshold + 1


@dataclass
class Schedule:
    """Linear warm-up, then constant, then linear decay to zero from `decay_start` to `end`.

    >>> Schedule(peak=2e-3, warmup=200, decay_start=4800, end=6000).lr(100)
    0.001
    """

    peak: float
    warmup: int
    decay_start: int
    end: int

    def lr(self, step: int) -> float:
        warm = min(1.0, (step + 1) / self.warmup)
        if step < self.decay_start:
            return self.peak * warm
        return self.peak * warm * max(0.0, (self.end - step) / (self.end - self.decay_start))

    def cool_down(self, step: int, length: int) -> None:
        """Start decaying now, reaching zero `length` steps later (never later than planned)."""
        if step < self.decay_start:
            self.decay_start, self.end = step, min(self.end, step + length)


@dataclass
class TrainingLog:
    """What `training_log.json` records."""

    seed: int
    planned_steps: int
    command: str
    steps: int = 0
    tokens_seen: int = 0
    wall_seconds: float = 0.0
    compiled: bool = False
    autocast_bf16: bool = True
    n_parameters: int = 0
    data_mix: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float | int]] = field(default_factory=list)
    final: dict[str, float | int] = field(default_factory=dict)
    finished: bool = False
    init_from: str | None = None  # checkpoint this run continued from, if any


def cpu_has_fast_bf16() -> bool:
    """True when the CPU does bfloat16 natively (AVX512-BF16 or AMX); elsewhere bf16 autocast is
    emulated and, on the AVX2 machine this was tuned on, six times slower than float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass
class ThreadTuner:
    """Picks the faster of 1 and `max_threads` torch threads while training runs.

    On a 2-core machine shared with other work, two threads that wait for each other can be
    half as fast as one (measured: 2.9 s vs 1.2 s per step). So every `period` steps the next
    `trial` steps run with the other count, and the faster count is kept.

    >>> tuner = ThreadTuner(max_threads=2); tuner.before_step(step=0)
    """

    max_threads: int
    period: int = 400
    trial: int = 10
    current: int = 0
    _times: dict[int, list[float]] = field(default_factory=dict)

    def before_step(self, step: int) -> None:
        if self.max_threads < 2:
            return
        if self.current == 0:
            self.current = self.max_threads
        # Trial windows start at step 20 (so a bad choice costs little) and every `period`.
        start = 20 if step < self.period else step - step % self.period
        offset = step - start
        other = 1 if self.current == self.max_threads else self.max_threads
        if offset == 0:
            self._times = {}
        if offset == 2 * self.trial and len(self._times) == 2:
            mean = {n: sum(t) / len(t) for n, t in self._times.items()}
            if mean[other] < 0.9 * mean[self.current]:
                print(f"threads: {self.current} -> {other} (s/step {mean})", flush=True)
                self.current, other = other, self.current
        torch.set_num_threads(other if self.trial <= offset < 2 * self.trial else self.current)

    def after_step(self, seconds: float) -> None:
        self._times.setdefault(torch.get_num_threads(), []).append(seconds)


def sinusoid_positions(n_ctx: int, d_model: int, std: float) -> Float[Tensor, "pos d_model"]:
    """Sine/cosine position table rescaled to standard deviation `std`.

    The feasibility run started the position table this way (next to everything else that
    changed), so we keep it: a smooth table gives a previous-token head something to use early.

    >>> sinusoid_positions(128, 256, std=0.02).std().item()  # about 0.02
    """
    pos = torch.arange(n_ctx, dtype=torch.float32)[:, None]  # [pos 1]
    freq = torch.exp(-math.log(10_000.0) * torch.arange(0, d_model, 2) / d_model)  # [d_model/2]
    table = torch.zeros(n_ctx, d_model)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)
    return table * (std / table.std())


def make_optimizer(model: GPT2, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only (not biases or layer norms)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def batch_loss(model: torch.nn.Module, batch: Batch, bf16: bool) -> Tensor:
    """Mean next-token cross-entropy over the batch's predicted positions."""
    with torch.autocast(batch.tokens.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(
            batch.tokens, position_ids=batch.position_ids, attention_mask=batch.attention_mask
        )
    return F.cross_entropy(
        logits.float().flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE
    )


def prose_batch(chapters: list[list[str]], tokenizer: Tokenizer, n_ctx: int, eot: int) -> Batch:
    """A fixed batch of held-out Bible chapters, for a prose loss that training never sees."""
    rng = random.Random("prose-eval")
    rows = []
    for _ in range(16):
        row: list[int] = []
        while len(row) < n_ctx + 1:
            row += [*tokenizer.encode(bible_document(rng, chapters)), eot]
        rows.append(row[: n_ctx + 1])
    data = torch.tensor(rows)
    tokens, targets = data[:, :-1], data[:, 1:].clone()
    targets[tokens == eot] = IGNORE
    position_ids, mask = document_layout(tokens, eot)
    return Batch(tokens, targets, position_ids, mask)


def save_all(model: GPT2, tokenizer: Tokenizer, log: TrainingLog, out: Path) -> None:
    """Write the checkpoint (float16), tokenizer and log to `out`."""
    save_checkpoint(model, out, dtype=torch.float16)
    assert tokenizer.inner is not None
    tokenizer.inner.save(str(out / "tokenizer.json"))
    (out / "training_log.json").write_text(json.dumps(asdict(log), indent=2) + "\n")


def train(args: argparse.Namespace) -> TrainingLog:
    """Run one training as `args` says; returns the log that is also written to `args.out`."""
    start = time.time()
    torch.manual_seed(args.seed)
    log = TrainingLog(seed=args.seed, planned_steps=args.steps, command=" ".join(sys.argv))

    chapters = load_bible_chapters()
    held_out = set(range(0, len(chapters), 50))  # every 50th chapter: prose loss only
    train_chapters = [c for i, c in enumerate(chapters) if i not in held_out]
    prose_chapters = [chapters[i] for i in sorted(held_out)]

    if args.init_from is None:
        hf_tokenizer = train_tokenizer(train_chapters, seed=args.seed)
    else:  # continue training: keep the first run's tokenizer, or its weights mean nothing
        hf_tokenizer = HFTokenizer.from_file(str(args.init_from / "tokenizer.json"))
    check_tokenizer(hf_tokenizer)
    tokenizer = Tokenizer(hf_tokenizer, D_VOCAB)
    eot = tokenizer.single_token(END_OF_TEXT, "end of text")
    mix = DocumentMix(hf_tokenizer, train_chapters, seed=args.seed)
    prose = prose_batch(prose_chapters, tokenizer, DEMO_CONFIG.n_ctx, eot)

    device = torch.device(args.device)
    config = replace(DEMO_CONFIG, d_mlp=args.d_mlp)
    model = GPT2(config)
    model.init_weights(seed=args.seed)
    with torch.no_grad():
        model.W_pos.copy_(sinusoid_positions(DEMO_CONFIG.n_ctx, DEMO_CONFIG.d_model, std=0.02))
    if args.init_from is not None:
        start_from = load_model(args.init_from).model
        if not isinstance(start_from, GPT2):
            raise TdbError(f"--init-from {args.init_from}: not a GPT-2 checkpoint")
        if start_from.config.d_mlp != config.d_mlp:
            raise TdbError(
                f"--init-from {args.init_from} has d_mlp {start_from.config.d_mlp}; "
                f"pass --d-mlp {start_from.config.d_mlp}"
            )
        model.load_state_dict(start_from.state_dict())
        log.init_from = str(args.init_from)
    model.to(device)
    prose = prose.to(device)
    log.n_parameters = sum(p.numel() for p in model.parameters())
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    schedule = Schedule(args.lr, args.warmup, int(args.steps * 0.8), args.steps)
    bf16 = args.dtype == "bf16" or (
        args.dtype == "auto" and device.type == "cpu" and cpu_has_fast_bf16()
    )
    log.autocast_bf16 = bf16
    step_model: torch.nn.Module = model
    if args.compile:
        step_model = torch.compile(model)  # type: ignore[assignment]
    print(
        f"tdb demo: {log.n_parameters:,} parameters, {args.steps} steps of "
        f"{args.batch_size}x{DEMO_CONFIG.n_ctx} tokens, seed {args.seed}, "
        f"setup {time.time() - start:.0f}s",
        flush=True,
    )

    max_seconds = args.max_minutes * 60
    step, loss_sum, loss_n, t_log = 0, 0.0, 0, time.time()
    sec_per_step = 0.0
    tuner = ThreadTuner(max_threads=torch.get_num_threads() if args.tune_threads else 1)
    while step < schedule.end:
        tuner.before_step(step)
        batch = mix.batch(args.batch_size, DEMO_CONFIG.n_ctx).to(device)
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr(step)
        t_step = time.time()
        try:
            loss = batch_loss(step_model, batch, bf16)
            torch.autograd.backward(loss)
        except Exception as err:  # any compile failure: fall back to eager
            if step_model is model or step > 0:
                raise
            print(f"torch.compile failed ({type(err).__name__}: {err}); running eagerly")
            optimizer.zero_grad(set_to_none=True)
            step_model = model
            loss = batch_loss(step_model, batch, bf16)
            torch.autograd.backward(loss)
        log.compiled = step_model is not model
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dt = time.time() - t_step
        if step >= 5:  # skip compilation and warm-up when timing
            tuner.after_step(dt)
            sec_per_step = dt if sec_per_step == 0.0 else 0.95 * sec_per_step + 0.05 * dt
        step += 1
        log.steps, log.tokens_seen = step, step * args.batch_size * DEMO_CONFIG.n_ctx
        loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1

        if step % args.log_every == 0:
            tok_s = loss_n * args.batch_size * DEMO_CONFIG.n_ctx / (time.time() - t_log)
            print(
                f"step {step:5d}  loss {loss_sum / loss_n:.3f}  lr {schedule.lr(step - 1):.2e}  "
                f"{tok_s:,.0f} tok/s  {(time.time() - start) / 60:.1f} min",
                flush=True,
            )
            loss_sum, loss_n, t_log = 0.0, 0, time.time()

        cool_length = max(100, int(step * args.cooldown_fraction))
        elapsed = time.time() - start
        if elapsed + (cool_length + 20) * sec_per_step > max_seconds and step > 20:
            if step < schedule.decay_start:
                print(f"time budget: cooling down over {cool_length} steps", flush=True)
            schedule.cool_down(step, cool_length)

        if step % args.eval_every == 0 or step == schedule.end:
            result = evaluate_model(model, tokenizer, n_ioi=200, n_induction=100)
            with torch.no_grad():
                prose_loss = batch_loss(model, prose, bf16=False).item()
            log.history.append({"step": step, "prose_loss": prose_loss, **_scores(result)})
            print(
                f"eval {step:5d}  IOI diff {result.ioi_logit_diff:6.2f} "
                f"acc {result.ioi_accuracy:6.1%}  induction {result.induction_accuracy:6.1%}  "
                f"capitals {result.capital_accuracy:6.1%}  prose loss {prose_loss:.3f}",
                flush=True,
            )
            if result.passes(EARLY_STOP_MARGIN) and step < schedule.decay_start:
                print(f"evaluation passes with margin: cooling down over {cool_length} steps")
                schedule.cool_down(step, cool_length)
            log.data_mix = mix.measured_shares()
            log.wall_seconds = time.time() - start
            save_all(model, tokenizer, log, args.out)

    # Final numbers come from the saved float16 checkpoint, loaded the way users load it.
    loaded = load_model(args.out)
    final = evaluate_model(loaded.model, loaded.tokenizer)
    log.final = _scores(final)
    log.wall_seconds = time.time() - start
    log.data_mix = mix.measured_shares()
    log.finished = True
    (args.out / "training_log.json").write_text(json.dumps(asdict(log), indent=2) + "\n")
    print(f"done in {log.wall_seconds / 60:.1f} min, {step} steps\n{final.summary()}")
    return log


def _scores(result: DemoEval) -> dict[str, float | int]:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(result).items()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tdb.demo.train", description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    parser.add_argument(
        "--steps",
        type=int,
        default=20000,
        help="planned optimiser steps (the time budget or an early pass usually ends it first)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="continue from this checkpoint's weights and tokenizer (fresh optimiser and schedule)",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--d-mlp",
        type=int,
        default=DEMO_CONFIG.d_mlp,
        help="MLP width (the rest of the shape is fixed)",
    )
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--max-minutes", type=float, default=44.0, help="wall-clock budget")
    parser.add_argument(
        "--cooldown-fraction",
        type=float,
        default=0.1,
        help="length of the learning-rate cool-down that the time budget or an early pass starts, "
        "as a fraction of the steps run so far (at least 100 steps)",
    )
    parser.add_argument(
        "--dtype",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="bf16 autocast or float32 (auto: bf16 only where the CPU has native bf16)",
    )
    parser.add_argument(
        "--no-tune-threads",
        dest="tune_threads",
        action="store_false",
        help="keep torch's thread count instead of trying 1 vs all",
    )
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument(
        "--device",
        default="cpu",
        help="torch device; the shipped checkpoint is trained on cpu (others: recipe experiments)",
    )
    args = parser.parse_args(argv)
    if args.d_mlp < 1:
        parser.error(f"--d-mlp must be a positive whole number, got {args.d_mlp}")
    if not 0.0 < args.cooldown_fraction <= 1.0:
        parser.error(f"--cooldown-fraction must be in (0, 1], got {args.cooldown_fraction}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        train(args)
    except (BibleNotInstalledError, TdbError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
