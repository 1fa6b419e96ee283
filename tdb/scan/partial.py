"""The partial result of a scan over some windows: per component source its top-k examples, its
random sample and its statistics. Partials of disjoint shards merge; the merge is associative.

    >>> part = ScanPartial.empty(sources, k=20, window=64)
    >>> part = part.merge(scan_batch(...))
    >>> np.savez(f, **part.to_arrays())
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tdb.scan.examples import Examples, sample_keys
from tdb.scan.moments import Moments
from tdb.scan.sources import ComponentSource


@dataclass(frozen=True)
class SourcePartial:
    top: Examples  # rank 0 first
    sample: Examples
    moments: Moments

    def merge(self, other: SourcePartial, k: int) -> SourcePartial:
        return SourcePartial(
            self.top.merge(other.top, k),
            self.sample.merge(other.sample, k),
            self.moments.merge(other.moments),
        )


def component_base(source_name: str) -> int:
    """Where this source's component ids start in the random-sample hash."""
    return zlib.crc32(source_name.encode()) << 32


def summarise_batch(
    source: ComponentSource,
    acts: Float[Tensor, "batch pos component"],
    lengths: Int[Tensor, " batch"],
    doc_id: Int[Tensor, " batch"],
    start: Int[Tensor, " batch"],
    k: int,
    window: int,
    seed: int,
) -> SourcePartial:
    """One batch of windows (in (doc_id, start) order) summarised for one source."""
    n_pos = acts.shape[1]
    valid = torch.arange(n_pos)[None, :] < lengths[:, None]  # [batch pos]
    acts = acts.float().masked_fill(~valid[..., None], float("nan"))
    window_max, argmax = acts.nan_to_num(float("-inf")).max(dim=1)  # [batch component]
    activation, position = window_max.T.contiguous(), argmax.T.contiguous()  # [component batch]
    keys = sample_keys(
        seed, component_base(source.name), acts.shape[-1], doc_id.numpy(), start.numpy()
    )

    def pick(key: Tensor) -> Examples:
        return Examples.from_windows(key, activation, position, doc_id, start, acts, k, window)

    return SourcePartial(pick(-activation), pick(keys), Moments.of(acts.nan_to_num(0.0), valid))


@dataclass(frozen=True)
class ScanPartial:
    """Per source name, its partial; plus what was read."""

    sources: dict[str, SourcePartial]
    n_windows: int
    n_tokens: int
    n_docs: int

    @staticmethod
    def empty(sources: list[ComponentSource], k: int, window: int) -> ScanPartial:
        return ScanPartial(
            {
                s.name: SourcePartial(
                    Examples.empty(s.n_components, k, window, torch.float32),
                    Examples.empty(s.n_components, k, window, torch.int64),
                    Moments.empty(s.n_components),
                )
                for s in sources
            },
            0,
            0,
            0,
        )

    def merge(self, other: ScanPartial, k: int) -> ScanPartial:
        if self.sources.keys() != other.sources.keys():
            raise ValueError("partials of different component sources cannot be merged")
        return ScanPartial(
            {name: part.merge(other.sources[name], k) for name, part in self.sources.items()},
            self.n_windows + other.n_windows,
            self.n_tokens + other.n_tokens,
            self.n_docs + other.n_docs,
        )

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays = {"counts": np.array([self.n_windows, self.n_tokens, self.n_docs], dtype=np.int64)}
        for name, part in self.sources.items():
            arrays |= part.top.to_arrays(f"{name}/top/")
            arrays |= part.sample.to_arrays(f"{name}/sample/")
            arrays |= part.moments.to_arrays(f"{name}/moments/")
        return arrays

    @staticmethod
    def from_arrays(arrays: dict[str, np.ndarray], names: list[str]) -> ScanPartial:
        n_windows, n_tokens, n_docs = (int(v) for v in arrays["counts"])
        return ScanPartial(
            {
                name: SourcePartial(
                    Examples.from_arrays(arrays, f"{name}/top/"),
                    Examples.from_arrays(arrays, f"{name}/sample/"),
                    Moments.from_arrays(arrays, f"{name}/moments/"),
                )
                for name in names
            },
            n_windows,
            n_tokens,
            n_docs,
        )
