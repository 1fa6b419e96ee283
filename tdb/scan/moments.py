"""Per-component statistics over every token of a scan: count, mean, variance, max.

    >>> total = Moments.empty(1024).merge(Moments.of(acts, valid))

Batches are summarised in float32 and combined in float64 with the parallel formula of Chan,
Golub and LeVeque, so the merge is associative up to rounding; the scan always folds shards in
shard order, so a distributed or resumed scan gives bit-identical statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor


@dataclass(frozen=True)
class Moments:
    count: Int[Tensor, " component"]
    mean: Float[Tensor, " component"]  # float64
    m2: Float[Tensor, " component"]  # float64: sum of squared deviations from the mean
    max: Float[Tensor, " component"]

    @staticmethod
    def empty(n_components: int) -> Moments:
        return Moments(
            count=torch.zeros(n_components, dtype=torch.int64),
            mean=torch.zeros(n_components, dtype=torch.float64),
            m2=torch.zeros(n_components, dtype=torch.float64),
            max=torch.full((n_components,), float("-inf")),
        )

    @staticmethod
    def of(
        acts: Float[Tensor, "batch pos component"],
        valid: Bool[Tensor, "batch pos"],
        top: Float[Tensor, " component"] | None = None,
    ) -> Moments:
        """The moments of the valid tokens; `top`: their maximum, where the caller has it."""
        # [token component]; a batch without padding (most are) needs no copy
        x = acts.reshape(-1, acts.shape[-1]) if bool(valid.all()) else acts[valid]
        n = x.shape[0]
        if n == 0:
            return Moments.empty(acts.shape[-1])
        mean = x.mean(dim=0)  # (torch.var_mean over dim 0 is ten times slower on the CPU)
        return Moments(
            count=torch.full((x.shape[1],), n, dtype=torch.int64),
            mean=mean.double(),
            m2=(x - mean).square_().sum(dim=0).double(),
            max=x.amax(dim=0) if top is None else top,
        )

    @property
    def variance(self) -> Float[Tensor, " component"]:
        """Population variance (m2 / count); NaN where nothing was counted."""
        return self.m2 / self.count.double()

    def merge(self, other: Moments) -> Moments:
        count = self.count + other.count
        total = count.double().clamp(min=1)
        delta = other.mean - self.mean
        return Moments(
            count=count,
            mean=self.mean + delta * other.count.double() / total,
            m2=self.m2
            + other.m2
            + delta.pow(2) * self.count.double() * other.count.double() / total,
            max=torch.maximum(self.max, other.max),
        )

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}{f.name}": getattr(self, f.name).numpy() for f in fields(self)}

    @staticmethod
    def from_arrays(arrays: dict[str, np.ndarray], prefix: str) -> Moments:
        return Moments(
            **{
                f.name: torch.from_numpy(arrays[f"{prefix}{f.name}"].copy())
                for f in fields(Moments)
            }
        )
