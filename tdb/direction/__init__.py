"""Directions of interest: what they are (`kinds`) and how a request names one (`parse`).

>>> LogitDiff(target_ids=(44,), distractor_ids=(51,), position=11)
>>> make_direction(loaded, tokens, " Mary", " John")      # the same, from a request's fields
"""

from tdb.direction.kinds import (
    FINAL,
    FROZEN_SCALES,
    AttentionLogit,
    Direction,
    HeadValueWrite,
    LatentPreActivation,
    LogitDiff,
    LogProb,
    NeuronPreActivation,
    ReadPoint,
    ResidualDirection,
    final_logits,
)

__all__ = [
    "FINAL",
    "FROZEN_SCALES",
    "AttentionLogit",
    "Direction",
    "HeadValueWrite",
    "LatentPreActivation",
    "LogProb",
    "LogitDiff",
    "NeuronPreActivation",
    "ReadPoint",
    "ResidualDirection",
    "final_logits",
]
