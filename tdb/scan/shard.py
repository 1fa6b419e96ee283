"""Scanning one shard: batches of windows through the model, summarised per component source.

    >>> partial = scan_shard(model, model_sources(model), shard, ScanSettings(k=20, window=64))

The same function runs in-process and inside a Ray worker; the batches of a shard do not depend
on where it runs, so neither do the numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from tdb.capture import padding_mask
from tdb.latents import attach
from tdb.models.base import TransformerModel
from tdb.sae import AttachedSae
from tdb.scan.partial import Bounds, ScanPartial, absorb_batch_
from tdb.scan.sources import ComponentSource, source_hooks
from tdb.scan.windows import Shard


@dataclass(frozen=True)
class ScanSettings:
    """Everything that decides a scan's result (a resumed scan must use the same)."""

    model: str | None = None  # checkpoint directory or cached name; None: the demo model
    k: int = 20  # top examples (and random-sample examples) per component
    window: int = 64  # tokens per window
    batch_size: int = 32  # windows per forward pass
    shard_windows: int = 512  # windows per shard (a shard closes at a document boundary)
    seed: int = 0  # of the random sample
    saes: tuple[str, ...] = ()  # SAE files or folders whose latents are scanned too
    # Where the model runs (tdb.device); the dtype decides the numbers: scan/run.py records it.
    device: str = "cpu"
    dtype: str = "auto"
    device_map: str | None = None

    def resolved(self, model_path: Path) -> dict[str, object]:
        """The settings as JSON, with the model as a resolved path."""
        return {
            "model": str(model_path.resolve()),
            "k": self.k,
            "window": self.window,
            "batch_size": self.batch_size,
            "shard_windows": self.shard_windows,
            "seed": self.seed,
            "saes": [str(Path(p).resolve()) for p in self.saes],
        }


# Logits at no position: the scan reads no logits, so the unembedding is skipped.
NO_LOGITS = torch.zeros(0, dtype=torch.long)


def scan_shard(
    model: TransformerModel,
    sources: list[ComponentSource],
    shard: Shard,
    settings: ScanSettings,
    on_batch: Callable[[int], None] | None = None,
    bounds: Bounds | None = None,
    saes: list[AttachedSae] | None = None,
) -> ScanPartial:
    """The shard's partial result; `on_batch(n_tokens)` after every batch (for progress).

    With `bounds` (from the examples of the shards merged so far) windows that cannot enter
    them are skipped: the partial then only holds what the merge with those shards needs,
    which saves most of the work of keeping top-k lists once they have filled."""
    k, window, seed = settings.k, settings.window, settings.seed
    partial = ScanPartial.empty(sources, k, window)
    with torch.inference_mode():
        for batch in shard_batches(shard, settings.batch_size):
            acts: dict[str, Tensor] = {}
            hooks = attach(saes or [], source_hooks(sources, acts))  # SAEs run inside
            # Windows are right-padded; the mask (the batched capture's) keeps padding out of
            # every real token's attention, as the causal mask alone already does.
            mask = padding_mask(batch.lengths, batch.tokens.shape[1])
            model(batch.tokens, hooks, attention_mask=mask, logit_positions=NO_LOGITS)
            for source in sources:
                absorb_batch_(
                    partial.sources[source.name],
                    source,
                    acts[source.name],
                    batch.lengths,
                    batch.doc_id,
                    batch.start,
                    seed,
                    None if bounds is None else bounds[source.name],
                )
            if on_batch is not None:
                on_batch(int(batch.lengths.sum()))
    partial.n_windows, partial.n_tokens = len(shard.lengths), shard.n_tokens
    partial.n_docs = shard.n_docs
    return partial


@dataclass(frozen=True)
class Batch:
    tokens: Int[Tensor, "batch pos"]  # pos: the longest window of the batch
    lengths: Int[Tensor, " batch"]
    doc_id: Int[Tensor, " batch"]
    start: Int[Tensor, " batch"]


def shard_batches(shard: Shard, batch_size: int) -> Iterator[Batch]:
    """The shard's windows in batches, longest first (so batches are padded little); the order
    of windows does not matter to the result, only that it is always the same."""
    order = np.argsort(-shard.lengths, kind="stable")
    for lo in range(0, len(order), batch_size):
        rows = order[lo : lo + batch_size]
        n_pos = int(shard.lengths[rows].max())
        yield Batch(
            tokens=torch.tensor(shard.tokens[rows, :n_pos]),
            lengths=torch.tensor(shard.lengths[rows]),
            doc_id=torch.tensor(shard.doc_ids[rows]),
            start=torch.tensor(shard.starts[rows]),
        )
