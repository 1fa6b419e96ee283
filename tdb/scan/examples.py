"""Per component, the k windows that sort first under a key: the streaming top-k and the random
sample of a scan, with one associative merge.

    >>> best = Examples.empty(n_components=1024, k=20, window=64, key_dtype=torch.float32)
    >>> best = best.merge(Examples.from_windows(-window_max, ...), k=20)  # top-k: key = -max

Windows are ordered by (key, doc_id, start): a total order (a window is one (doc_id, start)), so
keeping the first k of the union of two selections is associative and commutative, and a scan
gives exactly the same examples however its documents are sharded and in whatever order the
shards finish.

- top-k: key = -(the window's maximum activation), so rank 0 is the highest; equal maxima go to
  the earlier document, then the earlier window.
- random sample: key = a hash of (seed, doc_id, start, component) (`sample_keys`), so each
  component keeps a uniform sample of k windows, chosen by the window's identity alone.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

EMPTY_DOC = torch.iinfo(torch.int64).max  # doc_id of an unfilled slot: sorts after every window


@dataclass(frozen=True)
class Examples:
    """Per component up to k windows, sorted; unfilled slots have doc_id == EMPTY_DOC."""

    key: Tensor  # [component k]  float32 (top-k) or int64 (sample)
    activation: Float[Tensor, "component k"]  # the window's maximum
    token_position: Int[Tensor, "component k"]  # where the maximum is, in the window
    doc_id: Int[Tensor, "component k"]
    start: Int[Tensor, "component k"]
    values: Float[Tensor, "component k window"]  # per-token activations, NaN past the window

    @staticmethod
    def empty(n_components: int, k: int, window: int, key_dtype: torch.dtype) -> Examples:
        big = (
            torch.finfo(key_dtype).max
            if key_dtype.is_floating_point
            else torch.iinfo(key_dtype).max
        )
        return Examples(
            key=torch.full((n_components, k), big, dtype=key_dtype),
            activation=torch.full((n_components, k), float("nan")),
            token_position=torch.zeros((n_components, k), dtype=torch.int64),
            doc_id=torch.full((n_components, k), EMPTY_DOC, dtype=torch.int64),
            start=torch.zeros((n_components, k), dtype=torch.int64),
            values=torch.full((n_components, k, window), float("nan")),
        )

    @staticmethod
    def from_windows(
        key: Tensor,  # [component window_count]
        activation: Float[Tensor, "component window_count"],
        token_position: Int[Tensor, "component window_count"],
        doc_id: Int[Tensor, " window_count"],
        start: Int[Tensor, " window_count"],
        acts: Float[Tensor, "window_count pos component"],  # NaN at padding
        k: int,
        window: int,
    ) -> Examples:
        """The first k of a batch of windows (which must be in (doc_id, start) order), per
        component; only the chosen windows' per-token values are copied."""
        n_components, n_windows = key.shape
        take = min(k, n_windows)
        chosen = torch.argsort(key, dim=1, stable=True)[:, :take]  # [component take]
        rows = torch.arange(n_components)[:, None]
        values = acts.permute(2, 0, 1)[rows, chosen]  # [component take pos]
        if values.shape[-1] < window:
            values = torch.nn.functional.pad(
                values, (0, window - values.shape[-1]), value=float("nan")
            )
        picked = Examples(
            key=key.gather(1, chosen),
            activation=activation.gather(1, chosen),
            token_position=token_position.gather(1, chosen),
            doc_id=doc_id[chosen],
            start=start[chosen],
            values=values,
        )
        if take == k:
            return picked
        return Examples.empty(n_components, k - take, window, key.dtype).concat(picked).sorted(k)

    def concat(self, other: Examples) -> Examples:
        return Examples(
            **{
                f.name: torch.cat([getattr(self, f.name), getattr(other, f.name)], dim=1)
                for f in fields(self)
            }
        )

    def sorted(self, k: int) -> Examples:
        """The first k slots by (key, doc_id, start), by three stable sorts (last key first)."""
        order = torch.argsort(self.start, dim=1, stable=True)
        order = order.gather(1, torch.argsort(self.doc_id.gather(1, order), dim=1, stable=True))
        order = order.gather(1, torch.argsort(self.key.gather(1, order), dim=1, stable=True))
        order = order[:, :k]
        rows = torch.arange(order.shape[0])[:, None]
        return Examples(
            key=self.key.gather(1, order),
            activation=self.activation.gather(1, order),
            token_position=self.token_position.gather(1, order),
            doc_id=self.doc_id.gather(1, order),
            start=self.start.gather(1, order),
            values=self.values[rows, order],
        )

    def merge(self, other: Examples, k: int) -> Examples:
        """The first k of the union: associative and commutative."""
        return self.concat(other).sorted(k)

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}{f.name}": getattr(self, f.name).numpy() for f in fields(self)}

    @staticmethod
    def from_arrays(arrays: dict[str, np.ndarray], prefix: str) -> Examples:
        return Examples(
            **{f.name: torch.from_numpy(arrays[f"{prefix}{f.name}"]) for f in fields(Examples)}
        )


_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 (wrapping arithmetic): a well-mixed hash of x."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _MIX_1
    x = (x ^ (x >> np.uint64(27))) * _MIX_2
    out: np.ndarray = x ^ (x >> np.uint64(31))
    return out


def sample_keys(
    seed: int, component_base: int, n_components: int, doc_id: np.ndarray, start: np.ndarray
) -> Int[Tensor, "component window_count"]:
    """The random-sample key of every (component, window): a hash of the window's identity, the
    component and the seed, so the sample does not depend on sharding or order."""
    with np.errstate(over="ignore"):
        window_hash = splitmix64(
            splitmix64(doc_id.astype(np.uint64) ^ np.uint64(seed)) ^ start.astype(np.uint64)
        )
        component_hash = splitmix64(
            np.arange(n_components, dtype=np.uint64) + np.uint64(component_base)
        )
        keys = splitmix64(component_hash[:, None] ^ window_hash[None, :])
    return torch.from_numpy(keys.view(np.int64))
