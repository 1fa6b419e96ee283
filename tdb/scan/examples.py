"""Per component, the k windows that sort first under a key: the streaming top-k and the random
sample of a scan, with one associative merge.

    >>> best = Examples.empty(n_components=1024, k=20, window=64, key_dtype=torch.float32)
    >>> best.absorb_windows_(-window_max, window_max, argmax, doc_id, start, lengths, acts)
    >>> best.absorb_(other_shard_best)  # merge
    >>> best.ordered()  # rank 0 first

Windows are ordered by (key, doc_id, start): a total order (a window is one (doc_id, start)), so
keeping the first k of the union of two selections is associative and commutative, and a scan
gives exactly the same examples however its documents are sharded and in whatever order the
shards finish.

- top-k: key = -(the window's maximum activation), so rank 0 is the highest; equal maxima go to
  the earlier document, then the earlier window.
- random sample: key = a hash of (seed, doc_id, start, component) (`sample_keys`), so each
  component keeps a uniform sample of k windows, chosen by the window's identity alone.

The k examples of a component sit in k slots in no particular order (`ordered()` sorts them).
Absorbing new candidates sorts keys only and copies per-token values only for the candidates
that enter, into the slots of the examples they evict: the values, k x window floats per
component, are the bulk of the state and are never shuffled. Absorbing mutates in place (the
trailing underscore); the state belongs to the one loop that fills it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, fields

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

EMPTY_DOC = torch.iinfo(torch.int64).max  # doc_id of an unfilled slot: sorts after every window

# (component, candidate) index pairs -> those candidates' per-token values [pair window]
FetchValues = Callable[[Tensor, Tensor], Tensor]


def lexsort(key: Tensor, doc_id: Tensor, start: Tensor) -> Tensor:
    """Per row, the column order by (key, doc_id, start): two stable sorts, the window's
    identity (doc_id, start) packed into one int64 (doc ids < 2^31, starts < 2^32)."""
    window = (doc_id << 32) | start  # EMPTY_DOC wraps negative: mask it back to the top
    window = torch.where(doc_id == EMPTY_DOC, torch.iinfo(torch.int64).max, window)
    order = torch.argsort(window, dim=1, stable=True)
    return order.gather(1, torch.argsort(key.gather(1, order), dim=1, stable=True))


def _largest(dtype: torch.dtype) -> float | int:
    return torch.finfo(dtype).max if dtype.is_floating_point else torch.iinfo(dtype).max


@dataclass(frozen=True)
class Examples:
    """Per component k slots; an unfilled slot has doc_id == EMPTY_DOC and the largest key."""

    key: Tensor  # [component k]  float32 (top-k) or int64 (sample)
    activation: Float[Tensor, "component k"]  # the window's maximum
    token_position: Int[Tensor, "component k"]  # where the maximum is, in the window
    doc_id: Int[Tensor, "component k"]
    start: Int[Tensor, "component k"]
    values: Float[Tensor, "component k window"]  # per-token activations, NaN past the window

    @staticmethod
    def empty(n_components: int, k: int, window: int, key_dtype: torch.dtype) -> Examples:
        return Examples(
            key=torch.full((n_components, k), _largest(key_dtype), dtype=key_dtype),
            activation=torch.full((n_components, k), float("nan")),
            token_position=torch.zeros((n_components, k), dtype=torch.int64),
            doc_id=torch.full((n_components, k), EMPTY_DOC, dtype=torch.int64),
            start=torch.zeros((n_components, k), dtype=torch.int64),
            values=torch.full((n_components, k, window), float("nan")),
        )

    def _absorb_(
        self,
        key: Tensor,  # [component candidate]
        activation: Tensor,
        token_position: Tensor,
        doc_id: Tensor,
        start: Tensor,
        fetch: FetchValues,
    ) -> None:
        k = self.key.shape[1]
        # Only rows where some candidate sorts at or before the current last can change.
        rows = (key <= self.bound()[:, None]).any(dim=1).nonzero().squeeze(1)
        if rows.numel() == 0:
            return
        all_key = torch.cat([self.key[rows], key[rows]], dim=1)  # [row k+candidate]
        keep = torch.zeros_like(all_key, dtype=torch.bool)
        keep.scatter_(1, self._first_k(all_key, doc_id, start, rows, k), True)
        # Row by row, the i-th evicted slot takes the i-th entering candidate: both lists come
        # out of nonzero() in row-major order, with as many of each in every row.
        evicted = (~keep[:, :k]).nonzero()  # [pair 2]: (row, slot)
        entering = keep[:, k:].nonzero()  # [pair 2]: (row, candidate)
        if evicted.shape[0] == 0:
            return
        component, slot, candidate = rows[evicted[:, 0]], evicted[:, 1], entering[:, 1]
        self.key[component, slot] = key[component, candidate]
        self.activation[component, slot] = activation[component, candidate]
        self.token_position[component, slot] = token_position[component, candidate]
        self.doc_id[component, slot] = doc_id[component, candidate]
        self.start[component, slot] = start[component, candidate]
        self.values[component, slot] = fetch(component, candidate)

    def _first_k(
        self, all_key: Tensor, doc_id: Tensor, start: Tensor, rows: Tensor, k: int
    ) -> Tensor:
        """Per row the columns of the first k of [current slots, candidates] by (key, doc_id,
        start). Sorting by key alone decides the set except where the k-th and (k+1)-th keys
        are equal; only those rows pay for the sort by window identity."""
        if all_key.shape[1] <= k:
            return torch.argsort(all_key, dim=1, stable=True)
        # The k + 1 smallest keys only (a partial sort): the first k of them are the set unless
        # the k-th and (k+1)-th keys tie.
        smallest = torch.topk(all_key, k + 1, dim=1, largest=False, sorted=True)
        first = smallest.indices[:, :k]
        tied = (smallest.values[:, k - 1] == smallest.values[:, k]).nonzero().squeeze(1)
        if tied.numel():
            tied_rows = rows[tied]
            all_doc = torch.cat([self.doc_id[tied_rows], doc_id[tied_rows]], dim=1)
            all_start = torch.cat([self.start[tied_rows], start[tied_rows]], dim=1)
            first[tied] = lexsort(all_key[tied], all_doc, all_start)[:, :k]
        return first

    def absorb_windows_(
        self,
        key: Tensor,  # [component window_count]
        activation: Float[Tensor, "component window_count"],
        token_position: Int[Tensor, "component window_count"],
        doc_id: Int[Tensor, " window_count"],
        start: Int[Tensor, " window_count"],
        lengths: Int[Tensor, " window_count"],
        acts: Float[Tensor, "window_count pos component"],  # past each length: padding
        bound: Tensor | None = None,  # [component]
        eligible: Tensor | None = None,  # [window_count] bool; None: all
    ) -> None:
        """Keep the first k of these and the current examples, per component. Windows whose key
        sorts after `bound` (the k-th key of examples merged elsewhere) cannot be in the final
        result and are skipped, and so are windows that are not `eligible`."""
        n_components, n_windows = key.shape
        window = self.values.shape[2]
        doc_id, start = (
            doc_id.expand(n_components, n_windows),
            start.expand(n_components, n_windows),
        )
        out = None if bound is None else key > bound[:, None]
        if eligible is not None and not bool(eligible.all()):
            skip = (~eligible)[None, :].expand(n_components, n_windows)
            out = skip if out is None else out | skip
        if out is not None:
            # A skipped window looks like an unfilled slot that sorts after every other one.
            key = key.masked_fill(out, _largest(key.dtype))
            doc_id = doc_id.masked_fill(out, EMPTY_DOC)
            start = start.masked_fill(out, torch.iinfo(torch.int64).max)

        def fetch(component: Tensor, candidate: Tensor) -> Tensor:
            values = acts[candidate, :, component]  # [pair pos]
            pad = torch.arange(values.shape[1])[None, :] >= lengths[candidate][:, None]
            values = values.masked_fill(pad, np.nan)
            return torch.nn.functional.pad(values, (0, window - values.shape[1]), value=np.nan)

        self._absorb_(key, activation, token_position, doc_id, start, fetch)

    def absorb_(self, other: Examples) -> None:
        """Keep the first k of the union (the merge: associative and commutative)."""

        def fetch(component: Tensor, candidate: Tensor) -> Tensor:
            return other.values[component, candidate]

        self._absorb_(
            other.key, other.activation, other.token_position, other.doc_id, other.start, fetch
        )

    def bound(self) -> Tensor:
        """Per component the largest key kept: a window with a larger one cannot enter."""
        return self.key.amax(dim=1)

    def ordered(self) -> Examples:
        """A copy with each component's examples sorted, first (rank 0) first."""
        order = lexsort(self.key, self.doc_id, self.start)
        rows = torch.arange(order.shape[0])[:, None]
        return Examples(**{f.name: getattr(self, f.name)[rows, order] for f in fields(self)})

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}{f.name}": getattr(self, f.name).numpy() for f in fields(self)}

    @staticmethod
    def from_arrays(arrays: dict[str, np.ndarray], prefix: str) -> Examples:
        return Examples(
            **{
                f.name: torch.from_numpy(arrays[f"{prefix}{f.name}"].copy())
                for f in fields(Examples)
            }
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
        keys = splitmix64(_component_hashes(component_base, n_components)[:, None] ^ window_hash)
    return torch.from_numpy(keys.view(np.int64))


@functools.lru_cache(maxsize=256)
def _component_hashes(component_base: int, n_components: int) -> np.ndarray:
    with np.errstate(over="ignore"):
        components = np.arange(n_components, dtype=np.uint64) + np.uint64(component_base)
        hashes = splitmix64(components)
    hashes.flags.writeable = False  # shared by every batch
    return hashes
