"""The training mix, packed into rows of whole documents with per-document attention.

    >>> mix = DocumentMix(tokenizer, chapters, seed=0)
    >>> batch = mix.batch(batch_size=16, n_ctx=128)
    >>> batch.tokens.shape, batch.attention_mask.shape
    (torch.Size([16, 128]), torch.Size([16, 128, 128]))

A row is a sequence of documents, each followed by `<|endoftext|>`; the last one is cut at the row
end. Attention stays inside a document and positions restart after each end-of-text token, so a
prompt given to the finished model at positions 0.. looks exactly like the start of a training
document. (The feasibility run that found IOI and induction trained this way.) The token after an
end-of-text is not predicted: nothing in the document it follows says what it will be.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Int
from tokenizers import Tokenizer
from torch import Tensor

from tdb.demo.bible import bible_document
from tdb.demo.data import (
    capital_document,
    induction_document,
    ioi_document,
    simple_name_document,
)
from tdb.demo.tokenizer import END_OF_TEXT

# Share of training tokens per document kind (the feasibility run's mix).
MIX: dict[str, float] = {
    "bible": 0.20,
    "ioi": 0.35,
    "names": 0.05,
    "capitals": 0.10,
    "induction": 0.30,
}
# How many times a training induction document repeats its sequence (drawn per document). Two,
# like the evaluation; a GPU sweep with (2, 3) and (3,) formed induction heads *later*.
INDUCTION_COPIES: tuple[int, ...] = (2,)
IGNORE = -100  # target value that cross-entropy skips


@dataclass(frozen=True)
class Batch:
    """Inputs and next-token targets for one optimiser step."""

    tokens: Int[Tensor, "batch pos"]
    targets: Int[Tensor, "batch pos"]  # IGNORE after each end-of-text
    position_ids: Int[Tensor, "batch pos"]
    attention_mask: Bool[Tensor, "batch query_pos key_pos"]  # same document only

    def to(self, device: torch.device) -> Batch:
        """The same batch on `device`."""
        return Batch(
            self.tokens.to(device),
            self.targets.to(device),
            self.position_ids.to(device),
            self.attention_mask.to(device),
        )


def document_layout(
    tokens: Int[Tensor, "batch pos"], eot: int
) -> tuple[Int[Tensor, "batch pos"], Bool[Tensor, "batch query_pos key_pos"]]:
    """Position ids restarting after each `eot`, and the same-document attention mask.

    >>> pos, mask = document_layout(torch.tensor([[5, 6, 0, 7, 8]]), eot=0)
    >>> pos.tolist()
    [[0, 1, 2, 0, 1]]
    """
    is_eot = (tokens == eot).long()
    doc = is_eot.cumsum(dim=1) - is_eot  # [batch pos] the eot belongs to the document it ends
    index = torch.arange(tokens.shape[1]).expand_as(tokens)
    # Index of each document's first token: the running max of "starts here" positions.
    starts_here = torch.ones_like(tokens, dtype=torch.bool)
    starts_here[:, 1:] = doc[:, 1:] != doc[:, :-1]
    start = torch.where(starts_here, index, torch.zeros_like(index)).cummax(dim=1).values
    mask = doc[:, :, None] == doc[:, None, :]  # [batch query_pos key_pos]
    return index - start, mask


class DocumentMix:
    """An endless, seeded stream of training rows drawn from `MIX`.

    Document kinds are drawn with probability proportional to share / mean length, so the
    *token* shares come out near `MIX`; `measured_shares` reports what they really are.
    """

    def __init__(self, tokenizer: Tokenizer, chapters: list[list[str]], seed: int) -> None:
        self.tokenizer = tokenizer
        eot = tokenizer.token_to_id(END_OF_TEXT)
        if eot is None:
            raise ValueError(f"the tokenizer has no {END_OF_TEXT} token")
        self.eot: int = eot
        self.rng = random.Random(seed)
        d_vocab = tokenizer.get_vocab_size()
        exclude = frozenset({self.eot})
        text_kinds: dict[str, Callable[[random.Random], str]] = {
            "bible": lambda rng: bible_document(rng, chapters),
            "ioi": ioi_document,
            "names": simple_name_document,
            "capitals": capital_document,
        }
        self.makers: dict[str, Callable[[random.Random], list[int]]] = {
            kind: self._encoded(make) for kind, make in text_kinds.items()
        }
        self.makers["induction"] = lambda rng: induction_document(
            rng, d_vocab, exclude, copies=rng.choice(INDUCTION_COPIES)
        )
        # Calibrate on a separate stream so the training stream depends on the seed alone.
        # Start from share / mean length, then correct for documents cut at the row end.
        probe = random.Random(f"calibrate-{seed}")
        self.kinds = list(MIX)
        mean_len = [
            sum(len(self.makers[k](probe)) + 1 for _ in range(200)) / 200 for k in self.kinds
        ]
        self.weights = [MIX[k] / n for k, n in zip(self.kinds, mean_len, strict=True)]
        for _ in range(3):
            self.token_counts = dict.fromkeys(self.kinds, 0)
            for _ in range(200):
                self.row(129, probe)
            shares = self.measured_shares()
            self.weights = [
                w * MIX[k] / shares[k] for k, w in zip(self.kinds, self.weights, strict=True)
            ]
        self.token_counts = dict.fromkeys(self.kinds, 0)

    def _encoded(
        self, make: Callable[[random.Random], str]
    ) -> Callable[[random.Random], list[int]]:
        """A document maker that returns token ids instead of text."""

        def make_ids(rng: random.Random) -> list[int]:
            return list(self.tokenizer.encode(make(rng), add_special_tokens=False).ids)

        return make_ids

    def row(self, length: int, rng: random.Random | None = None) -> list[int]:
        """`length` tokens of whole documents, each followed by end-of-text (the last cut)."""
        rng = self.rng if rng is None else rng
        out: list[int] = []
        while len(out) < length:
            kind = rng.choices(self.kinds, self.weights)[0]
            doc = [*self.makers[kind](rng), self.eot]
            self.token_counts[kind] += min(len(doc), length - len(out))
            out += doc
        return out[:length]

    def batch(self, batch_size: int, n_ctx: int) -> Batch:
        """One batch of `batch_size` rows of `n_ctx` inputs (and their shifted targets)."""
        rows = torch.tensor([self.row(n_ctx + 1) for _ in range(batch_size)])
        tokens, targets = rows[:, :-1], rows[:, 1:].clone()
        targets[tokens == self.eot] = IGNORE
        position_ids, mask = document_layout(tokens, self.eot)
        return Batch(tokens, targets, position_ids, mask)

    def measured_shares(self) -> dict[str, float]:
        """Share of the tokens drawn so far per document kind."""
        total = max(1, sum(self.token_counts.values()))
        return {k: n / total for k, n in self.token_counts.items()}
