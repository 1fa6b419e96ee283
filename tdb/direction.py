"""Directions of interest: the scalar whose causes the node table explains."""

from __future__ import annotations

from dataclasses import dataclass

from jaxtyping import Float
from torch import Tensor


@dataclass(frozen=True)
class LogitDiff:
    """Mean logit of the targets minus mean logit of the distractors at one token position.

    >>> LogitDiff(target_ids=(44,), distractor_ids=(51,), position=11).value(logits_at_11)
    """

    target_ids: tuple[int, ...]
    distractor_ids: tuple[int, ...]
    position: int
    kind: str = "logit_diff"

    def value(self, logits: Float[Tensor, " d_vocab"]) -> Float[Tensor, ""]:
        targets = logits[list(self.target_ids)].mean()
        if not self.distractor_ids:
            return targets
        return targets - logits[list(self.distractor_ids)].mean()

    def to_json(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "target_ids": list(self.target_ids),
            "distractor_ids": list(self.distractor_ids),
            "position": self.position,
        }


Direction = LogitDiff  # more kinds (log-probability, residual direction, traced node) will join
