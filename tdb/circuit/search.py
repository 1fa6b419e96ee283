"""Find a circuit: the smallest set of components whose measured faithfulness reaches a target.

    >>> circuit = find_circuit(loaded, "ioi.jsonl", target_faithfulness=0.8, max_components=64)
    >>> circuit.components, circuit.faithfulness

m(S) is the metric with every component *outside* S patched from its reference (the corrupted
prompt's value, zero or the dataset mean, as `tdb attribute`); m(full) = m(every component) is the
clean run and m(empty) has every component patched. Faithfulness = (m(S) - m(empty)) / (m(full) -
m(empty)); it is always measured by patching, never estimated.

The search: rank the components by an estimator's |score| (`tdb attribute`'s methods; `ig` by
default), measure the faithfulness of the top-n prefixes on a grid of sizes up to
`max_components`, take the smallest prefix that reaches the target (binary search between grid
points), then prune it by backward elimination: drop the component whose removal costs least, as
long as the circuit stays at the target. Every candidate set is measured, several per batched
forward pass. The curve reports the prefixes and, at each size, the mean over `random_draws`
uniformly random circuits, so a reader sees what a faithfulness is worth.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from tdb.attribution.components import Key, Site, sites
from tdb.attribution.dataset import Dataset
from tdb.attribution.run import (
    BATCH_ROWS,
    Batch,
    DatasetArg,
    Progress,
    Reference,
    Runner,
    _check_dataset,
    as_dataset,
    attached_saes,
    batches,
    by_key,
    check_options,
    mean_activations,
    reference_activations,
    run_attribution,
)
from tdb.checkpoint import LoadedModel
from tdb.circuit.result import Circuit, CurvePoint, Edge, faithfulness
from tdb.errors import TdbError
from tdb.nodes import ComponentIndex
from tdb.sae import AttachedSae

Member = tuple[Key, int]  # a component: its site and its index there
GRID = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


class Evaluator:
    """m(S) for many sets S at once: each set a copy of the batch, every component outside it
    patched from its reference at every position."""

    def __init__(
        self,
        runner: Runner,
        data: Dataset,
        site_list: Sequence[Site],
        reference: Reference,
        batch_size: int,
        device: torch.device,
    ) -> None:
        self.runner, self.sites = runner, list(site_list)
        keys = [s.key for s in self.sites]
        corrupted = reference is Reference.CORRUPTED
        self.batches = list(batches(data, runner.config.d_vocab, batch_size, device, corrupted))
        means = None
        if reference is Reference.MEAN:
            means = mean_activations(runner, self.batches, keys, lambda n: None)
        self.refs: list[dict[Key, Tensor]] = []
        self.clean = self.corrupted = 0.0
        self.n = len(data)
        for batch in self.batches:
            m, values = runner.record(batch, batch.tokens, keys)
            refs, m_ref = reference_activations(runner, batch, values, keys, reference, means)
            self.refs.append(refs)
            self.clean += float(m.sum())
            self.corrupted += 0.0 if m_ref is None else float(m_ref.sum())
        self.clean /= self.n
        self.corrupted /= self.n

    def metric(self, circuits: Sequence[frozenset[Member]]) -> list[float]:
        """The mean metric with each circuit kept and every other component patched."""
        totals = torch.zeros(len(circuits))
        for batch, refs in zip(self.batches, self.refs, strict=True):
            copies = max(1, BATCH_ROWS // batch.size)
            for first in range(0, len(circuits), copies):
                chunk = circuits[first : first + copies]
                m = self._patched(batch, refs, chunk)
                totals[first : first + len(chunk)] += m.reshape(len(chunk), batch.size).sum(1).cpu()
        return (totals / self.n).tolist()

    def _patched(
        self, batch: Batch, refs: Mapping[Key, Tensor], chunk: Sequence[frozenset[Member]]
    ) -> Tensor:
        c = len(chunk)
        keep: dict[Key, Tensor] = {}
        for site in self.sites:
            mask = torch.zeros(c, site.size, dtype=torch.bool, device=batch.tokens.device)
            for j, circuit in enumerate(chunk):
                inside = [i for key, i in circuit if key == site.key]
                if inside:
                    mask[j, inside] = True
            keep[site.key] = mask

        def patch(x: Tensor, key: Key) -> Tensor | None:
            if key not in keep:
                return None
            mask = keep[key].reshape(c, 1, 1, -1, *([1] * (x.ndim - 3)))
            shaped = x.reshape(c, -1, *x.shape[1:])
            return torch.where(mask, shaped, refs[key][None].to(x.dtype)).reshape(x.shape)

        with torch.no_grad():
            return self.runner.metric(batch, batch.tokens.repeat(c, 1), by_key(list(keep), patch))


@dataclass
class _Search:
    evaluator: Evaluator
    ranked: list[Member]
    target: float
    m_empty: float
    progress: Progress

    def faithfulness_of(self, circuits: Sequence[frozenset[Member]]) -> list[float]:
        values = self.evaluator.metric(circuits)
        self.progress.advance(len(circuits))
        return [faithfulness(m, self.evaluator.clean, self.m_empty) for m in values]

    def prefix(self, n: int) -> frozenset[Member]:
        return frozenset(self.ranked[:n])

    def smallest_prefix(self, sizes: Sequence[int], measured: Mapping[int, float]) -> int:
        """The smallest n whose prefix reaches the target (binary search between the grid
        points around it), or the best measured size when none does."""
        reached = [n for n in sizes if measured[n] >= self.target]
        if not reached:
            return max(sizes, key=lambda n: measured[n])
        high = reached[0]
        below = [n for n in sizes if n < high]
        low = below[-1] if below else 0  # the prefix of `low` does not reach the target
        while high - low > 1:
            middle = (low + high) // 2
            if self.faithfulness_of([self.prefix(middle)])[0] >= self.target:
                high = middle
            else:
                low = middle
        return high

    def prune(self, circuit: frozenset[Member], passes: int = 2) -> frozenset[Member]:
        """Backward elimination: measure the circuit without each of its components, then drop
        as many of the cheapest as keep it at the target (binary search); again on what is
        left, `passes` times in all. n + log n measured circuits a pass."""
        for _ in range(passes):
            members = sorted(circuit, key=self.ranked.index)
            without = self.faithfulness_of([circuit - {m} for m in members])
            cheapest = [
                m for _, m in sorted(zip(without, members, strict=True), key=lambda p: -p[0])
            ]
            low, high = 0, len(cheapest) - 1  # dropping `low` is known to keep the target
            while low < high:
                middle = (low + high + 1) // 2
                if self.faithfulness_of([circuit - set(cheapest[:middle])])[0] >= self.target:
                    low = middle
                else:
                    high = middle - 1
            if low == 0:
                break
            circuit = circuit - set(cheapest[:low])
        return circuit


def find_circuit(
    loaded: LoadedModel,
    dataset: DatasetArg,
    method: str = "ig",
    ablation: str | None = None,
    components: Sequence[str] | str = ("heads", "neurons"),
    max_components: int = 100,
    target_faithfulness: float = 0.8,
    max_edges: int = 50,
    verify: int = 0,
    logprob: bool = False,
    ig_steps: int = 10,
    saes: Sequence[AttachedSae | str | Path] = (),
    batch_size: int = 32,
    random_draws: int = 5,
    seed: int = 0,
    prune: bool = True,
    progress: Progress | None = None,
) -> Circuit:
    """The smallest circuit reaching `target_faithfulness` (see the module docstring), its
    curve against random circuits, and the edges among its components (the top `max_edges`,
    `verify` of them path-patched)."""
    if isinstance(verify, bool) or not isinstance(verify, int) or verify < 0:
        raise TdbError(f"--verify: must be an integer >= 0, got {verify!r}")
    if (
        isinstance(max_components, bool)
        or not isinstance(max_components, int)
        or max_components < 1
    ):
        raise TdbError(f"--max-components: must be an integer >= 1, got {max_components!r}")
    if not isinstance(target_faithfulness, int | float) or not 0 < target_faithfulness <= 1:
        raise TdbError(f"--target-faithfulness: must be in (0, 1], got {target_faithfulness!r}")
    for name, value, low in (("--max-edges", max_edges, 0), ("random_draws", random_draws, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise TdbError(f"{name}: must be an integer >= {low}, got {value!r}")
    options = check_options(
        methods=[method],
        ablation=ablation,
        components=components,
        logprob=logprob,
        ig_steps=ig_steps,
        batch_size=batch_size,
        saes=saes,
    )
    data = as_dataset(loaded, dataset)
    reference = options.reference or (Reference.CORRUPTED if data.has_corrupted else Reference.MEAN)
    _check_dataset(data, reference, options.logprob, options.by)
    progress = progress or Progress()
    scores = run_attribution(loaded, data, options, None)
    attached = attached_saes(loaded, options.kinds, options.saes)
    site_list = sites(loaded.model.config, options.kinds, attached)
    site_of = {s.component(0).id.rsplit(".", 1)[0]: s for s in site_list}
    ranked: list[Member] = []
    by_member: dict[Member, ComponentIndex] = {}
    for row in scores.rows:
        site = site_of[row.component.id.rsplit(".", 1)[0]]
        member = (site.key, row.component.index)
        ranked.append(member)
        by_member[member] = row.component
    runner = Runner(loaded, attached, options.logprob)
    device = next(loaded.model.parameters()).device
    evaluator = Evaluator(runner, data, site_list, reference, batch_size, device)
    m_empty = evaluator.metric([frozenset()])[0]
    search = _Search(evaluator, ranked, float(target_faithfulness), m_empty, progress)
    limit = min(max_components, len(ranked))
    sizes = sorted({n for n in GRID if n <= limit} | {limit})
    progress.start(len(sizes) * (1 + random_draws) + 4 * limit)
    try:
        prefixes = search.faithfulness_of([search.prefix(n) for n in sizes])
        measured = dict(zip(sizes, prefixes, strict=True))
        rng = random.Random(seed)
        randoms = [frozenset(rng.sample(ranked, n)) for n in sizes for _ in range(random_draws)]
        random_scores = search.faithfulness_of(randoms) if randoms else []
        n = search.smallest_prefix(sizes, measured)
        circuit = search.prefix(n)
        if prune and measured.get(n, search.target) >= search.target:
            circuit = search.prune(circuit)
        m_circuit = evaluator.metric([circuit])[0]
    finally:
        progress.stop()
    curve = tuple(
        CurvePoint(
            size,
            measured[size],
            sum(random_scores[i * random_draws : (i + 1) * random_draws]) / random_draws
            if random_draws
            else float("nan"),
        )
        for i, size in enumerate(sizes)
    )
    members = sorted(circuit, key=ranked.index)
    chosen = [by_member[m] for m in members]
    edges = _edges(loaded, data, chosen, reference, method, options, attached, max_edges, verify)
    return Circuit(
        metric_kind="logprob" if options.logprob else "logit_diff",
        clean=evaluator.clean,
        corrupted=evaluator.corrupted if reference is Reference.CORRUPTED else None,
        m_empty=m_empty,
        m_circuit=m_circuit,
        n_prompts=len(data),
        ablation=reference.value,
        method=options.methods[0].value,
        target_faithfulness=float(target_faithfulness),
        components=tuple(c.id for c in chosen),
        candidates=len(ranked),
        curve=curve,
        edges=tuple(edges),
        source=data.source,
    )


EdgeFinder = Callable[..., list[Edge]]


def _edges(
    loaded: LoadedModel,
    data: Dataset,
    chosen: Sequence[ComponentIndex],
    reference: Reference,
    method: str,
    options: object,
    attached: Sequence[AttachedSae],
    max_edges: int,
    verify: int,
) -> list[Edge]:
    """The edges among the circuit's components (tdb.circuit.edges), the top `max_edges`."""
    if max_edges == 0:
        return []
    import importlib

    try:  # tdb.circuit.edges lands separately
        edge_scores: EdgeFinder = importlib.import_module("tdb.circuit.edges").edge_scores
    except ImportError:
        return []
    edge_method = method if method in ("atp", "ig") else "ig"
    return edge_scores(
        loaded,
        data,
        chosen,
        reference=reference,
        method=edge_method,
        logprob=getattr(options, "logprob", False),
        ig_steps=getattr(options, "ig_steps", 10),
        saes=attached,
        batch_size=getattr(options, "batch_size", 32),
        verify=verify,
        max_edges=max_edges,
    )
