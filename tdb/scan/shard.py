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
from jaxtyping import Float, Int
from torch import Tensor

from tdb.capture import padding_mask
from tdb.latents import attach
from tdb.models.base import TransformerModel
from tdb.nodes import NodeType
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
    context: int = 16  # left-context tokens run before each window, never ranked
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
            "context": self.context,
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
            n_run = batch.tokens.shape[1]
            padded = bool((batch.lengths < n_run).any())  # most batches are not (longest first)
            mask = padding_mask(batch.lengths, n_run) if padded else None
            model(batch.tokens, hooks, attention_mask=mask, logit_positions=NO_LOGITS)
            for source in sources:
                absorb_batch_(
                    partial.sources[source.name],
                    source,
                    ranked_positions(acts[source.name], batch.context, window),
                    batch.window_lengths,
                    batch.doc_id,
                    batch.start,
                    seed,
                    None if bounds is None else bounds[source.name],
                    first_ranked(source, batch.context),
                )
            if on_batch is not None:
                on_batch(int(batch.window_lengths.sum()))
    partial.n_windows, partial.n_tokens = len(shard.lengths), shard.n_tokens
    partial.n_docs = shard.n_docs
    return partial


def ranked_positions(
    acts: Float[Tensor, "batch run component"], context: Int[Tensor, " batch"], window: int
) -> Float[Tensor, "batch pos component"]:
    """Each row's window, its left context cut off: row b's positions context[b] onwards, as
    positions 0 onwards (past the run's end: the last value, masked later by the lengths)."""
    if not bool(context.any()):
        return acts
    n_run = acts.shape[1]
    n_pos = min(window, n_run)
    where = (context[:, None] + torch.arange(n_pos)[None, :]).clamp(max=n_run - 1)  # [batch pos]
    rows = torch.arange(len(context), device=acts.device)[:, None]
    return acts[rows, where.to(acts.device)]  # whole rows of components (gather: 1 index each)


def first_ranked(source: ComponentSource, context: Int[Tensor, " batch"]) -> Tensor | None:
    """Per row, whether its window's first position may be ranked. A head's query at the run's
    first token can attend only to itself (its write there is a constant of the token, not
    something the head chose), so it never becomes an example nor counts in the statistics;
    with left context that is only a document's first token."""
    if source.node_type is not NodeType.ATTENTION_HEAD:
        return None
    return context > 0


@dataclass(frozen=True)
class Batch:
    tokens: Int[Tensor, "batch run"]  # run: the longest context + window of the batch
    lengths: Int[Tensor, " batch"]  # tokens of each run (context, then window); padding after
    doc_id: Int[Tensor, " batch"]
    start: Int[Tensor, " batch"]
    context: Int[Tensor, " batch"]  # left-context tokens at the start of each run

    @property
    def window_lengths(self) -> Int[Tensor, " batch"]:
        """Tokens of each window (the ranked ones), after its context."""
        return self.lengths - self.context


def shard_batches(shard: Shard, batch_size: int) -> Iterator[Batch]:
    """The shard's windows in batches, longest first (so batches are padded little); the order
    of windows does not matter to the result, only that it is always the same."""
    run = shard.context + shard.lengths
    order = np.argsort(-run, kind="stable")
    for lo in range(0, len(order), batch_size):
        rows = order[lo : lo + batch_size]
        n_run = int(run[rows].max())
        yield Batch(
            tokens=torch.tensor(shard.tokens[rows, :n_run]),
            lengths=torch.tensor(run[rows]),
            doc_id=torch.tensor(shard.doc_ids[rows]),
            start=torch.tensor(shard.starts[rows]),
            context=torch.tensor(shard.context[rows]),
        )
