"""The partial result of a scan over some windows: per component source its top-k examples, its
random sample and its statistics. Partials of disjoint shards merge; the merge is associative.

    >>> part = ScanPartial.empty(sources, k=20, window=64)
    >>> part.absorb_(other_part)  # in place
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


@dataclass
class SourcePartial:
    """One source's partial; `absorb_*` update it in place (it belongs to one loop)."""

    top: Examples  # key: -activation
    sample: Examples  # key: sample_keys(...)
    moments: Moments

    def absorb_(self, other: SourcePartial) -> None:
        self.top.absorb_(other.top)
        self.sample.absorb_(other.sample)
        self.moments = self.moments.merge(other.moments)


Bounds = dict[str, tuple[Tensor, Tensor]]

# Per array of `ScanPartial.to_arrays()`: its shape and dtype (a saved partial is checked on load).
Layout = dict[str, tuple[tuple[int, ...], np.dtype]]


def array_layout(sources: list[ComponentSource], k: int, window: int) -> Layout:
    """The shape and dtype of every array of a partial of these sources, without allocating it
    (the state of a large model is gigabytes); `ScanPartial.empty(...).to_arrays()` has these."""
    f32, f64, i64 = np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.int64)
    layout: Layout = {"counts": ((3,), i64)}
    for s in sources:
        c = s.n_components
        for part, key in (("top", f32), ("sample", i64)):
            layout |= {
                f"{s.name}/{part}/key": ((c, k), key),
                f"{s.name}/{part}/activation": ((c, k), f32),
                f"{s.name}/{part}/token_position": ((c, k), i64),
                f"{s.name}/{part}/doc_id": ((c, k), i64),
                f"{s.name}/{part}/start": ((c, k), i64),
                f"{s.name}/{part}/values": ((c, k, window), f32),
            }
        for name, dtype in (("count", i64), ("mean", f64), ("m2", f64), ("max", f32)):
            layout[f"{s.name}/moments/{name}"] = ((c,), dtype)
    return layout


def component_base(source_name: str) -> int:
    """Where this source's component ids start in the random-sample hash."""
    return zlib.crc32(source_name.encode()) << 32


def absorb_batch_(
    part: SourcePartial,
    source: ComponentSource,
    acts: Float[Tensor, "batch pos component"],
    lengths: Int[Tensor, " batch"],
    doc_id: Int[Tensor, " batch"],
    start: Int[Tensor, " batch"],
    seed: int,
    bounds: tuple[Tensor, Tensor] | None = None,
    first_ranked: Tensor | None = None,  # [batch] bool; None: every first position is ranked
) -> None:
    """Update `part` with one batch of windows of one source. A window's first position is not
    ranked (no example, no statistic) where `first_ranked` is False; a window with no ranked
    position enters neither the top-k nor the sample."""
    n_pos = acts.shape[1]
    acts = acts.float().cpu()  # the partial's lists live on the CPU, whatever the model's device
    valid = torch.arange(n_pos)[None, :] < lengths[:, None]  # [batch pos]
    if first_ranked is not None:
        valid[:, 0] &= first_ranked
    eligible = valid.any(dim=1)  # [batch]
    padded = acts if bool(valid.all()) else acts.masked_fill(~valid[..., None], float("-inf"))
    window_max, argmax = padded.max(dim=1)  # [batch component]
    activation, position = window_max.T.contiguous(), argmax.T.contiguous()  # [component batch]
    keys = sample_keys(
        seed, component_base(source.name), acts.shape[-1], doc_id.numpy(), start.numpy()
    )
    top_bound, sample_bound = (None, None) if bounds is None else bounds
    windows = (doc_id, start, lengths, acts)
    part.top.absorb_windows_(-activation, activation, position, *windows, top_bound, eligible)
    part.sample.absorb_windows_(keys, activation, position, *windows, sample_bound, eligible)
    batch_max = window_max.amax(dim=0)  # the valid tokens' maximum (padding is -inf)
    part.moments = part.moments.merge(Moments.of(acts, valid, batch_max))


@dataclass
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

    def absorb_(self, other: ScanPartial) -> None:
        """Merge `other` (a partial of other windows) into this one, in place."""
        if self.sources.keys() != other.sources.keys():
            raise ValueError("partials of different component sources cannot be merged")
        for name, part in self.sources.items():
            part.absorb_(other.sources[name])
        self.n_windows += other.n_windows
        self.n_tokens += other.n_tokens
        self.n_docs += other.n_docs

    def bounds(self) -> Bounds:
        """Per source the (top-k, sample) key a window must not exceed to enter (see
        `Examples.absorb_windows_`): a shard scanned with these as bounds merges into this
        partial exactly as the shard's own complete partial would."""
        return {name: (p.top.bound(), p.sample.bound()) for name, p in self.sources.items()}

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
