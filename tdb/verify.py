"""Estimate versus truth: ablate nodes one at a time and compare the real change of the direction
with the estimate (activation × gradient) and the direct effect."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tdb.ablation import Ablation, ablation_hooks
from tdb.capture import direction_value
from tdb.direction import Direction
from tdb.hooks import NO_HOOKS, Hooks, compose
from tdb.models.base import TransformerModel
from tdb.nodes import NodeIndex
from tdb.sae import AttachedSae


@dataclass(frozen=True)
class Verified:
    """One node: `actual` is the direction's value before minus after zero-ablating it."""

    node: NodeIndex
    estimated: float
    direct: float
    actual: float

    @property
    def sign_disagrees(self) -> bool:
        return self.estimated * self.actual < 0

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.node.id,
            "estimated": self.estimated,
            "direct": self.direct,
            "actual": self.actual,
            "sign_disagrees": self.sign_disagrees,
        }


def verify_nodes(
    model: TransformerModel,
    tokens: Sequence[int],
    direction: Direction,
    nodes: Sequence[NodeIndex],
    estimated: Sequence[float],
    direct: Sequence[float],
    base_hooks: Hooks = NO_HOOKS,
    saes: Sequence[AttachedSae] = (),
) -> list[Verified]:
    """Zero-ablate each node alone (on top of `base_hooks`) and measure the real effect.

    >>> verify_nodes(model, tokens, direction, table.nodes[:5], estimates, directs)
    """
    token_tensor = torch.tensor(list(tokens))
    baseline = direction_value(model, token_tensor, direction, base_hooks, saes)
    out = []
    for node, est, dir_ in zip(nodes, estimated, direct, strict=True):
        hooks = compose(base_hooks, ablation_hooks(model, tokens, [Ablation(node)], saes=saes))
        actual = baseline - direction_value(model, token_tensor, direction, hooks, saes)
        out.append(Verified(node, est, dir_, actual))
    return out


def correlation(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Pearson correlation (NaN with fewer than two points or no spread)."""
    if len(xs) < 2:
        return math.nan
    x, y = torch.tensor(xs, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64)
    x, y = x - x.mean(), y - y.mean()
    denominator = float(x.norm() * y.norm())
    return float(x @ y) / denominator if denominator > 0 else math.nan
