"""Held-out evaluation of the demo model: IOI, induction and capital -> country.

    $ python -m tdb.demo.evaluate                      # the shipped checkpoint
    $ python -m tdb.demo.evaluate --model runs/demo    # any checkpoint trained by tdb.demo.train

    >>> loaded = load_model(None)
    >>> result = evaluate_model(loaded.model, loaded.tokenizer)
    >>> result.passes()
    True

All prompts are held out from training (see `tdb.demo.data`). IOI compares the two names only
(right minus wrong logit), not the argmax over the vocabulary: a miss there is usually a third,
unmentioned name, which is not what the IOI circuit is about.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from tdb.checkpoint import load_model
from tdb.demo.data import (
    heldout_capital_prompts,
    heldout_induction_sequences,
    heldout_ioi_prompts,
)
from tdb.demo.tokenizer import END_OF_TEXT
from tdb.models.base import TransformerModel
from tdb.tokens import Tokenizer

IOI_MIN_LOGIT_DIFF = 2.0
IOI_MIN_ACCURACY = 0.90
INDUCTION_MIN_ACCURACY = 0.90
CAPITAL_MIN_ACCURACY = 0.90


@dataclass(frozen=True)
class DemoEval:
    """Held-out scores of a demo checkpoint. `evaluate_model(model, tokenizer).passes()`."""

    ioi_logit_diff: float  # mean of logit(right name) - logit(wrong name)
    ioi_accuracy: float  # share of prompts where the right name beats the wrong one
    induction_accuracy: float  # top-1 on the second copy of a repeated random sequence
    capital_accuracy: float  # top-1 over the vocabulary on "Paris, France. Ottawa," -> " Canada"
    n_ioi: int
    n_induction: int
    n_capital: int

    def passes(self, margin: float = 0.0) -> bool:
        """True when every score clears its threshold: accuracies by `margin` (capped at 100 %),
        the logit difference by 20·margin.

        >>> DemoEval(11.0, 0.99, 0.99, 1.0, 400, 200, 108).passes(margin=0.05)
        True
        """
        return (
            self.ioi_logit_diff >= IOI_MIN_LOGIT_DIFF + 20 * margin
            and self.ioi_accuracy >= min(1.0, IOI_MIN_ACCURACY + margin)
            and self.induction_accuracy >= min(1.0, INDUCTION_MIN_ACCURACY + margin)
            and self.capital_accuracy >= min(1.0, CAPITAL_MIN_ACCURACY + margin)
        )

    def summary(self) -> str:
        """One line per score with its threshold."""
        return "\n".join(
            [
                f"IOI logit diff      {self.ioi_logit_diff:7.2f}   (>= {IOI_MIN_LOGIT_DIFF}, "
                f"{self.n_ioi} prompts)",
                f"IOI accuracy        {self.ioi_accuracy:7.1%}   (>= {IOI_MIN_ACCURACY:.0%})",
                f"induction accuracy  {self.induction_accuracy:7.1%}   "
                f"(>= {INDUCTION_MIN_ACCURACY:.0%}, {self.n_induction} sequences)",
                f"capital accuracy    {self.capital_accuracy:7.1%}   "
                f"(>= {CAPITAL_MIN_ACCURACY:.0%}, {self.n_capital} prompts)",
            ]
        )


@torch.no_grad()
def last_token_logits(
    model: TransformerModel, prompts: list[list[int]], batch_size: int = 128
) -> Float[Tensor, "prompt d_vocab"]:
    """The next-token logits after each prompt (prompts of any length, right-padded).

    Right padding is safe without a mask: attention is causal, so padding after the last real
    token cannot change it.

    >>> last_token_logits(model, [[5, 6], [7, 8, 9]]).shape
    torch.Size([2, 4096])
    """
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        width = max(len(p) for p in chunk)
        tokens = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, p in enumerate(chunk):
            tokens[row, : len(p)] = torch.tensor(p)
        logits = model(tokens.to(model.unembed.device)).cpu()  # [batch pos d_vocab]
        last = torch.tensor([len(p) - 1 for p in chunk])
        out.append(logits[torch.arange(len(chunk)), last].float())
    return torch.cat(out)


def ioi_scores(model: TransformerModel, tokenizer: Tokenizer, n: int) -> tuple[float, float]:
    """(mean right-minus-wrong logit difference, accuracy) on `n` held-out IOI prompts.

    >>> diff, accuracy = ioi_scores(model, tokenizer, n=400)
    """
    prompts = heldout_ioi_prompts(n)
    logits = last_token_logits(model, [tokenizer.encode(p.text) for p in prompts])
    right = torch.tensor([tokenizer.single_token(f" {p.io}", "name") for p in prompts])
    wrong = torch.tensor([tokenizer.single_token(f" {p.s}", "name") for p in prompts])
    rows = torch.arange(len(prompts))
    diff = logits[rows, right] - logits[rows, wrong]
    return diff.mean().item(), (diff > 0).float().mean().item()


@torch.no_grad()
def induction_accuracy(model: TransformerModel, tokenizer: Tokenizer, n: int) -> float:
    """Top-1 accuracy on the second copy of `n` repeated random sequences.

    The first token of the second copy is not counted: nothing says where the repeat begins.

    >>> induction_accuracy(model, tokenizer, n=200)
    """
    eot = tokenizer.single_token(END_OF_TEXT, "end of text")
    seqs = heldout_induction_sequences(n, tokenizer.d_vocab, frozenset({eot}))
    correct = total = 0
    for seq in seqs:  # short sequences: one forward each is fast enough and needs no padding
        half = len(seq) // 2
        device = model.unembed.device
        predicted = model(torch.tensor([seq], device=device))[0].argmax(dim=-1).cpu()  # [pos]
        targets = torch.tensor(seq)
        # Position p predicts token p + 1; count predictions of tokens half+1 .. end.
        hits = predicted[half : len(seq) - 1] == targets[half + 1 :]
        correct += int(hits.sum())
        total += hits.numel()
    return correct / total


def capital_accuracy(model: TransformerModel, tokenizer: Tokenizer) -> tuple[float, int]:
    """(top-1 accuracy, number of prompts) on the held-out capital -> country prompts.

    >>> capital_accuracy(model, tokenizer)
    """
    prompts = heldout_capital_prompts()
    logits = last_token_logits(model, [tokenizer.encode(p.text) for p in prompts])
    answers = torch.tensor([tokenizer.single_token(f" {p.country}", "country") for p in prompts])
    return (logits.argmax(dim=-1) == answers).float().mean().item(), len(prompts)


def evaluate_model(
    model: TransformerModel, tokenizer: Tokenizer, n_ioi: int = 400, n_induction: int = 200
) -> DemoEval:
    """All held-out scores of `model` (put in eval mode; float32 on CPU is fine).

    >>> loaded = load_model("tdb/demo/checkpoint")
    >>> print(evaluate_model(loaded.model, loaded.tokenizer).summary())
    """
    was_training = model.training
    model.eval()
    try:
        ioi_diff, ioi_acc = ioi_scores(model, tokenizer, n_ioi)
        induction = induction_accuracy(model, tokenizer, n_induction)
        capitals, n_capital = capital_accuracy(model, tokenizer)
    finally:
        model.train(was_training)
    return DemoEval(ioi_diff, ioi_acc, induction, capitals, n_ioi, n_induction, n_capital)


def main(argv: list[str] | None = None) -> int:
    """Command line: print the scores; exit status 1 when a threshold is missed."""
    parser = argparse.ArgumentParser(prog="python -m tdb.demo.evaluate", description=__doc__)
    parser.add_argument("--model", type=Path, default=None, help="checkpoint (default: demo)")
    parser.add_argument("--json", action="store_true", help="print the scores as JSON")
    args = parser.parse_args(argv)
    loaded = load_model(args.model)
    result = evaluate_model(loaded.model, loaded.tokenizer)
    if args.json:
        import json

        print(json.dumps(asdict(result), indent=2))
    else:
        print(f"model: {loaded.path}")
        print(result.summary())
        print("PASS" if result.passes() else "FAIL")
    return 0 if result.passes() else 1


if __name__ == "__main__":
    raise SystemExit(main())
