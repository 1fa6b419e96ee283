"""Task-level attribution: how much each component matters to a behaviour over a dataset.

    >>> result = attribution(loaded, "ioi.jsonl", methods=["exact", "atp*"])
    >>> result.to_dataframe()  # one row per component, one column per method

The metric m is logit(target) - logit(distractor) at each prompt's last token (or log p(target)
with `logprob=True`). A component's score is the mean over prompts of

    m(clean) - m(clean with the component's output replaced by its reference value)

where the reference is its value on the prompt's corrupted twin (`corrupted`), zero, or its mean
over every token of the dataset's clean prompts (`mean`). Positive: the component supports the
behaviour (the node table's act x grad has the same sign). Methods:

- `exact`: the patch itself, batched: a forward pass per component per batch of prompts, resumed at
  the component's layer (or, for a neuron, after it: its change to the residual stream is exact
  and linear, (a_ref - a) times its row of W_out).
- `atp`: attribution patching, (a - a_ref) . dm/da summed over positions (one forward and one
  backward pass over the clean prompts, one forward over the references).
- `atp*`: AtP with the QK fix of AtP* (Kramár et al. 2024) for head components: the change a head's
  patch makes to each later head's attention logits (through the direct path: residual stream,
  then that head's layer norm, linearised) is put through the exact softmax, and that replaces the
  linear estimate of the same path. Saturated attention hides the key path from the gradient
  alone (an induction head's key comes from a previous-token head); this recovers it. Neurons and
  latents get plain AtP.
- `ig` (the default): integrated gradients as EAP-IG does: the gradient averaged over
  `ig_steps` points (midpoints) of the straight path from the corrupted to the clean embeddings,
  times (a - a_ref). With zero or mean references there is no reference input: the path runs
  through the activations instead, one layer at a time (that layer's components all at
  a_ref + alpha (a - a_ref), the rest computed).

docs/attribution.md measures how well each estimate agrees with `exact`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tdb.attribution.components import ComponentKind, Key, Site, per_component, sites
from tdb.attribution.dataset import Dataset, dataset_from_records, load_dataset
from tdb.checkpoint import LoadedModel
from tdb.errors import TdbError
from tdb.hooks import NO_HOOKS, HookPoint, Hooks
from tdb.latents import DEMO_SAE_DIR, attach, is_demo_model
from tdb.nodes import ComponentIndex
from tdb.sae import AttachedSae, load_saes


class Method(StrEnum):
    EXACT = "exact"
    ATP = "atp"
    ATP_STAR = "atp*"
    IG = "ig"


class Reference(StrEnum):
    """What a component's output is replaced by."""

    CORRUPTED = "corrupted"
    ZERO = "zero"
    MEAN = "mean"


class By(StrEnum):
    COMPONENT = "component"
    POSITION = "position"


DEFAULT_METHOD = Method.IG
DEFAULT_KINDS = (ComponentKind.HEADS, ComponentKind.NEURONS)
FINAL: Key = (HookPoint.RESID_FINAL, -1)
EMBED: Key = (HookPoint.RESID_EMBED, -1)
BATCH_ROWS = 256  # prompt rows per forward pass of `exact` (prompts x components at once)


@dataclass(frozen=True)
class ComponentScore:
    """One row: a component (at one position with `by="position"`) and each method's score
    (None where a method did not score it: `exact` beyond the `verify` top N)."""

    component: ComponentIndex
    position: int | None
    scores: Mapping[str, float | None]

    @property
    def id(self) -> str:
        base = self.component.id
        return base if self.position is None else f"{base}@{self.position}"


@dataclass(frozen=True)
class Attribution:
    """Scores of every component (or the top k), sorted by the first method's |score|."""

    metric_kind: str  # "logit_diff" or "logprob"
    clean: float  # the metric's mean over the clean prompts
    corrupted: float | None  # ... over the corrupted prompts (None without them)
    n_prompts: int
    methods: tuple[str, ...]
    reference: str
    by: str
    rows: tuple[ComponentScore, ...]
    source: str = ""

    def to_json(self) -> dict[str, object]:
        """The document `tdb attribute --json` prints (docs/attribution.md)."""
        return {
            "metric": {"kind": self.metric_kind, "clean": self.clean, "corrupted": self.corrupted},
            "n_prompts": self.n_prompts,
            "methods": list(self.methods),
            "ablation": self.reference,
            "by": self.by,
            "components": [
                {
                    "id": row.id,
                    "node_type": row.component.node_type.value,
                    "layer": row.component.layer,
                    "index": row.component.index,
                    "site": None if row.component.site is None else row.component.site.value,
                    "position": row.position,
                    "scores": dict(row.scores),
                }
                for row in self.rows
            ],
        }

    def to_dataframe(self) -> object:
        """A pandas DataFrame: id, node_type, layer, index, position, one column per method."""
        import pandas as pd

        records = [
            {
                "id": row.id,
                "node_type": row.component.node_type.value,
                "layer": row.component.layer,
                "index": row.component.index,
                "position": row.position,
                **{m: row.scores.get(m) for m in self.methods},
            }
            for row in self.rows
        ]
        columns = ["id", "node_type", "layer", "index", "position", *self.methods]
        return pd.DataFrame.from_records(records, columns=columns)


ProgressFn = Callable[[int], None]  # called with units of work done


# --- one batch of prompts ---------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    """Prompts right-padded into one tensor (causal models: no mask needed), their corrupted
    twins, and the metric's weights: m = (logits at the last token) . weights."""

    tokens: Int[Tensor, "batch pos"]
    corrupted: Int[Tensor, "batch pos"] | None
    lengths: Int[Tensor, " batch"]
    weights: Float[Tensor, "batch vocab"]

    @property
    def size(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def valid(self) -> Bool[Tensor, "batch pos"]:
        positions = torch.arange(self.tokens.shape[1], device=self.tokens.device)
        return positions[None] < self.lengths[:, None]


def batches(
    dataset: Dataset, d_vocab: int, size: int, device: torch.device, corrupted: bool
) -> Iterator[Batch]:
    pairs = dataset.pairs
    for start in range(0, len(pairs), size):
        chunk = pairs[start : start + size]
        n_pos = max(len(p.tokens) for p in chunk)
        tokens = torch.zeros(len(chunk), n_pos, dtype=torch.long)
        other = torch.zeros(len(chunk), n_pos, dtype=torch.long) if corrupted else None
        weights = torch.zeros(len(chunk), d_vocab)
        for i, pair in enumerate(chunk):
            tokens[i, : len(pair.tokens)] = torch.tensor(pair.tokens)
            if other is not None:
                assert pair.corrupted is not None
                other[i, : len(pair.corrupted)] = torch.tensor(pair.corrupted)
            for t in pair.target:
                weights[i, t] += 1.0 / len(pair.target)
            for t in pair.distractor:
                weights[i, t] -= 1.0 / len(pair.distractor)
        lengths = torch.tensor([len(p.tokens) for p in chunk])
        yield Batch(
            tokens.to(device),
            None if other is None else other.to(device),
            lengths.to(device),
            weights.to(device),
        )


class Runner:
    """Forward (and backward) passes of one model over batches, with the metric at the end."""

    def __init__(self, loaded: LoadedModel, saes: Sequence[AttachedSae], logprob: bool) -> None:
        self.model = loaded.model
        self.config = loaded.model.config
        self.saes = list(saes)
        self.logprob = logprob

    def metric(
        self,
        batch: Batch,
        tokens: Int[Tensor, "rows pos"],
        hooks: Hooks = NO_HOOKS,
        resume: tuple[int, Tensor] | None = None,
    ) -> Float[Tensor, " rows"]:
        """m for each row of `tokens` (rows = copies x batch: copy c of prompt i is row
        c * batch + i)."""
        copies = tokens.shape[0] // batch.size
        last = (batch.lengths - 1).repeat(copies)
        positions = torch.unique(last)
        logits = self.model(
            tokens, hooks=attach(self.saes, hooks), logit_positions=positions, resume=resume
        )
        final = logits[
            torch.arange(len(last), device=last.device), torch.searchsorted(positions, last)
        ]
        final = final.float()
        if self.logprob:
            final = final.log_softmax(dim=-1)
        return (final * batch.weights.repeat(copies, 1)).sum(dim=-1)

    def record(
        self, batch: Batch, tokens: Int[Tensor, "batch pos"], keys: Sequence[Key]
    ) -> tuple[Float[Tensor, " batch"], dict[Key, Tensor]]:
        """m and the activations at `keys`, without gradients."""
        values: dict[Key, Tensor] = {}
        wanted = set(keys)

        def keep(x: Tensor, key: Key) -> None:
            if key in wanted:
                values[key] = x.detach()

        with torch.no_grad():
            m = self.metric(batch, tokens, by_key(keys, keep))
        return m, values

    def gradients(
        self,
        batch: Batch,
        tokens: Int[Tensor, "batch pos"],
        keys: Sequence[Key],
        transform: Mapping[Key, Callable[[Tensor], Tensor]] | None = None,
    ) -> tuple[Float[Tensor, " batch"], dict[Key, Tensor], dict[Key, Tensor]]:
        """m, the activations at `keys` and the gradient of sum(m) with respect to each (a zero
        tensor added at each key carries it). `transform` first changes the activation at a key
        (the interpolation of integrated gradients)."""
        deltas: dict[Key, Tensor] = {}
        values: dict[Key, Tensor] = {}
        transform = transform or {}
        wanted = set(keys) | set(transform)

        def add_delta(x: Tensor, key: Key) -> Tensor | None:
            if key not in wanted:
                return None
            if key in transform:
                x = transform[key](x)
            if key not in keys:
                return x
            delta = torch.zeros_like(x, requires_grad=True)
            deltas[key], values[key] = delta, x.detach()
            return x + delta

        with torch.enable_grad():
            m = self.metric(batch, tokens, by_key(wanted, add_delta))
            found = list(deltas)
            grads = torch.autograd.grad(m.sum(), [deltas[k] for k in found], allow_unused=True)
        out = {
            k: torch.zeros_like(deltas[k]) if g is None else g
            for k, g in zip(found, grads, strict=True)
        }
        return m.detach(), values, out


def by_key(keys: Sequence[Key] | set[Key], fn: Callable[[Tensor, Key], Tensor | None]) -> Hooks:
    """Hooks calling fn(x, (point, layer)) at every point named in `keys` (layer -1: the points
    outside the layers, `FINAL` and `EMBED`)."""
    points = {point for point, _ in keys}

    def make(point: HookPoint) -> Callable[[Tensor, int | None], Tensor | None]:
        def hook(x: Tensor, layer: int | None) -> Tensor | None:
            return fn(x, (point, -1 if layer is None else layer))

        return hook

    return Hooks({p: make(p) for p in points})


# --- reference activations -------------------------------------------------------------------


def mean_activations(
    runner: Runner, batch_list: Iterable[Batch], keys: Sequence[Key], advance: ProgressFn
) -> dict[Key, Tensor]:
    """Each key's mean activation over every real token of the clean prompts."""
    sums: dict[Key, Tensor] = {}
    count = 0
    for batch in batch_list:
        _, values = runner.record(batch, batch.tokens, keys)
        valid = batch.valid
        for key, x in values.items():
            mask = valid.reshape(*valid.shape, *([1] * (x.ndim - 2))).to(x.dtype)
            total = (x.float() * mask).sum(dim=(0, 1))
            sums[key] = sums[key] + total if key in sums else total
        count += int(valid.sum())
        advance(batch.size)
    return {key: total / count for key, total in sums.items()}


def reference_activations(
    runner: Runner,
    batch: Batch,
    values: Mapping[Key, Tensor],
    keys: Sequence[Key],
    reference: Reference,
    means: Mapping[Key, Tensor] | None,
) -> tuple[dict[Key, Tensor], Tensor | None]:
    """The reference activation at each key for this batch (the corrupted run's, zero, or
    `means` from `mean_activations`), and m on the corrupted prompts (None for zero / mean)."""
    if reference is Reference.CORRUPTED:
        assert batch.corrupted is not None
        m, refs = runner.record(batch, batch.corrupted, keys)
        return refs, m
    if reference is Reference.ZERO:
        return {key: torch.zeros_like(values[key]) for key in keys}, None
    assert means is not None
    return {key: means[key].to(values[key].dtype).expand_as(values[key]) for key in keys}, None


# --- the estimators ---------------------------------------------------------------------------


def atp_terms(
    site_list: Sequence[Site],
    values: Mapping[Key, Tensor],
    refs: Mapping[Key, Tensor],
    grads: Mapping[Key, Tensor],
    valid: Bool[Tensor, "batch pos"],
) -> dict[Key, Float[Tensor, "pos comp"]]:
    """(a - a_ref) . dm/da per (position, component), summed over the batch's prompts."""
    out = {}
    for site in site_list:
        diff = (values[site.key] - refs[site.key]).float()
        term = per_component(diff * grads[site.key].float()) * valid[..., None]
        out[site.key] = term.sum(dim=0)
    return out


def qk_fix_terms(
    runner: Runner,
    head_sites: Sequence[Site],
    values: Mapping[Key, Tensor],
    refs: Mapping[Key, Tensor],
    grads: Mapping[Key, Tensor],
    n_pos: int,
    by_position: bool,
) -> dict[Key, Float[Tensor, "pos comp"]]:
    """AtP*'s correction per (position of the patch, head): for each later head, the effect of
    the exact softmax of the changed attention logits minus AtP's linear estimate of it."""
    model, config = runner.model, runner.config
    device = next(iter(values.values())).device
    position_ids = torch.arange(n_pos, device=device)
    writes = {}
    for site in head_sites:
        W_O = model.block(site.layer).attn.W_O.detach()  # [head d_head d_model]
        change = (refs[site.key] - values[site.key]).to(W_O.dtype)  # [batch pos head d_head]
        writes[site.key] = torch.einsum("bphe,hed->hbpd", change, W_O)  # [head batch pos d]
    out = {site.key: torch.zeros(n_pos, site.size, device=device) for site in head_sites}
    patch_positions: list[int | None] = list(range(n_pos)) if by_position else [None]
    for later in range(1, config.n_layer):
        upstream = [site for site in head_sites if site.layer < later]
        if not upstream:
            continue
        write = torch.cat([writes[site.key] for site in upstream])  # [heads batch pos d]
        for p in patch_positions:
            dx = write if p is None else _only_position(write, p)
            terms = _softmax_fix(runner, later, dx, values, grads, position_ids)  # [heads]
            sizes = [s.size for s in upstream]
            for site, term in zip(upstream, torch.split(terms, sizes), strict=True):
                out[site.key][0 if p is None else p] += term
    return out


def _only_position(x: Float[Tensor, "h batch pos d"], p: int) -> Float[Tensor, "h batch pos d"]:
    keep = torch.zeros(x.shape[2], device=x.device, dtype=x.dtype)
    keep[p] = 1
    return x * keep[None, None, :, None]


def _softmax_fix(
    runner: Runner,
    layer: int,
    dx: Float[Tensor, "up batch pos d_model"],
    values: Mapping[Key, Tensor],
    grads: Mapping[Key, Tensor],
    position_ids: Int[Tensor, " pos"],
) -> Float[Tensor, " up"]:
    """For each upstream change dx of `layer`'s residual input (an upstream head's patch, its
    direct path): summed over prompts, heads and (query, key), the exact change of the attention
    pattern times dm/dp, minus the first-order change of the logits times dm/ds (what AtP's
    gradient already counted). The exact change runs the layer norm on the changed residual
    stream, not its linearisation: a patch that removes much of a token's residual stream
    moves its scale a lot."""
    attn, ln_1 = runner.model.block(layer).attn, runner.model.block(layer).ln_1
    up, batch, n_pos, d_model = dx.shape
    x = values[HookPoint.RESID_PRE, layer]  # [batch pos d_model]
    q, k = values[HookPoint.Q, layer], values[HookPoint.K, layer]  # [batch pos head d_head]
    positions = position_ids.expand(batch, n_pos)
    g_logits = grads[HookPoint.ATTN_LOGITS, layer]  # [batch head q k]
    # The first-order term is linear in dx: sum(dx . G) with G = dm/dx through this layer's
    # attention logits alone (the layer norm's and projections' transposes).
    with torch.enable_grad():
        x_leaf = x.detach().requires_grad_()
        normed = ln_1(x_leaf, NO_HOOKS)
        through_q = torch.einsum("bhqk,bkhe->bqhe", g_logits.to(k.dtype), k)
        through_k = torch.einsum("bhqk,bqhe->bkhe", g_logits.to(q.dtype), q)
        paired = (attn.query_change(normed, positions) * through_q).sum() + (
            attn.key_change(normed, positions) * through_k
        ).sum()
        (G,) = torch.autograd.grad(paired * attn.score_scale, [x_leaf])
    # Only the positions the patch changes (a corrupted prompt differs in a few tokens) need the
    # exact term's layer norm and keys; only queries whose pattern reaches m count (in the last
    # layer: each prompt's last token).
    changed = (dx != 0).any(dim=3).any(dim=1).any(dim=0).nonzero().squeeze(1)  # [changed]
    dx = dx[:, :, changed]
    linear = torch.einsum("ubpd,bpd->u", dx.float(), G[:, changed].float())
    g_probs = grads[HookPoint.ATTN_PROBS, layer]
    rows = (g_probs != 0).any(dim=3).any(dim=1).any(dim=0).nonzero().squeeze(1)  # [query]
    x_c = x[:, changed]
    x_new = (x_c[None] + dx.to(x.dtype)).reshape(up * batch, len(changed), d_model)
    dx_norm = ln_1(x_new, NO_HOOKS).reshape(up, batch, len(changed), d_model) - ln_1(x_c, NO_HOOKS)
    dx_norm = dx_norm.reshape(up * batch, len(changed), d_model)
    where = positions[:, changed].repeat(up, 1)
    heads, d_head = q.shape[2], q.shape[3]
    dk = attn.key_change(dx_norm, where).reshape(up, batch, len(changed), heads, d_head)
    dq_changed = attn.query_change(dx_norm, where).reshape(up, batch, len(changed), heads, d_head)
    dq = dq_changed.new_zeros(up, batch, n_pos, heads, d_head)
    dq[:, :, changed] = dq_changed
    dq = dq[:, :, rows].transpose(2, 3)  # [up batch head q e]
    q_new = q[:, rows].transpose(1, 2)[None] + dq
    # (q + dq)(k + dk) - qk = dq k + (q + dq) dk, the second only at the changed keys
    ds = dq @ k.permute(0, 2, 3, 1)[None]  # [up batch head q k]
    ds[..., changed] += q_new @ dk.permute(0, 1, 3, 4, 2)
    logits = values[HookPoint.ATTN_LOGITS, layer][:, :, rows].float()
    allowed = _allowed(runner, layer, n_pos, logits.device)[rows]
    logits = logits.masked_fill(~allowed, float("-inf"))
    probs = logits.softmax(dim=-1)
    new = (logits[None] + (ds * attn.score_scale).float()).softmax(dim=-1)
    exact = ((new - probs[None]) * g_probs[:, :, rows].float()[None]).sum(dim=(1, 2, 3, 4))
    # m(clean) - m(patched): the fix replaces the linear term of the same path.
    return -(exact - linear)


def _allowed(runner: Runner, layer: int, n_pos: int, device: torch.device) -> Bool[Tensor, "q k"]:
    query = torch.arange(n_pos, device=device)[:, None]
    key = torch.arange(n_pos, device=device)[None, :]
    allowed = key <= query
    window_of = getattr(runner.config, "window", None)
    window = window_of(layer) if callable(window_of) else None
    if isinstance(window, int):
        allowed = allowed & (key > query - window)
    return allowed


def exact_terms(
    runner: Runner,
    batch: Batch,
    site: Site,
    m_clean: Float[Tensor, " batch"],
    values: Mapping[Key, Tensor],
    refs: Mapping[Key, Tensor],
    candidates: Sequence[tuple[int, int | None]],
    progress: ProgressFn | None = None,
) -> Float[Tensor, " candidate"]:
    """sum over the batch of m(clean) - m(patched) for each (component, position or None =
    every position) of `site`: several candidates per forward pass (the batch repeated)."""
    n_layer = runner.config.n_layer
    is_neuron = site.kind is ComponentKind.NEURONS
    start = site.layer + 1 if is_neuron else site.layer
    share = max(1, n_layer - start) / n_layer  # the part of the model each pass recomputes
    copies = max(1, int(BATCH_ROWS / (batch.size * max(share, 0.25))))
    n_pos = batch.tokens.shape[1]
    value, ref = values[site.key], refs[site.key]
    out = torch.zeros(len(candidates), device=m_clean.device)
    for first in range(0, len(candidates), copies):
        chunk = candidates[first : first + copies]
        c = len(chunk)
        where = torch.zeros(c, 1, n_pos, site.size, dtype=torch.bool, device=value.device)
        for j, (index, position) in enumerate(chunk):
            if position is None:
                where[j, 0, :, index] = True
            else:
                where[j, 0, position, index] = True
        tokens = batch.tokens.repeat(c, 1)
        with torch.no_grad():
            if is_neuron:
                # The patch changes the residual stream by (a_ref - a) times the row of W_out.
                W_out = runner.model.block(site.layer).mlp.W_out.detach()  # [d_mlp d_model]
                chosen = torch.tensor([i for i, _ in chunk], device=value.device)
                diff = (ref - value)[..., chosen].permute(2, 0, 1)  # [c batch pos]
                diff = diff * where.any(dim=-1).to(diff.dtype)  # the chosen positions only
                write = torch.einsum("cbp,cd->cbpd", diff.to(W_out.dtype), W_out[chosen])
                resid = _resid_after(values, site.layer, n_layer)
                patched = (resid[None] + write).reshape(c * batch.size, n_pos, -1)
                m = runner.metric(batch, tokens, resume=(start, patched))
            else:
                mask = where if value.ndim == 3 else where[..., None]
                resid = values[HookPoint.RESID_PRE, site.layer]
                resume = (start, resid.repeat(c, 1, 1))

                def swap(x: Tensor, key: Key, mask: Tensor = mask) -> Tensor | None:
                    if key != site.key:
                        return None
                    shaped = x.reshape(mask.shape[0], -1, *x.shape[1:])
                    return torch.where(mask, ref[None].to(x.dtype), shaped).reshape(x.shape)

                m = runner.metric(batch, tokens, by_key([site.key], swap), resume=resume)
        out[first : first + c] = (m_clean[None] - m.reshape(c, batch.size)).sum(dim=1)
        if progress is not None:
            progress(c * batch.size)
    return out


def _resid_after(values: Mapping[Key, Tensor], layer: int, n_layer: int) -> Tensor:
    """The residual stream after block `layer` (the next block's input, or the final one)."""
    if layer + 1 < n_layer:
        return values[HookPoint.RESID_PRE, layer + 1]
    return values[FINAL]


# --- the whole dataset ------------------------------------------------------------------------


class Progress:
    """What `attribution` reports as it goes (the CLI shows a bar): units are prompt passes."""

    def start(self, total: int) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def stop(self) -> None:
        pass


DatasetArg = Dataset | str | Path | Sequence[Mapping[str, object]]


def as_dataset(loaded: LoadedModel, dataset: DatasetArg) -> Dataset:
    """A dataset given as a `Dataset`, a JSONL path, or a list of records (dicts)."""
    n_ctx = loaded.model.config.n_ctx
    if isinstance(dataset, Dataset):
        return dataset
    if isinstance(dataset, str | Path):
        return load_dataset(dataset, loaded.tokenizer, n_ctx)
    if isinstance(dataset, Sequence):  # records: each checked there, errors naming the line
        return dataset_from_records(list(dataset), loaded.tokenizer, n_ctx)
    raise TdbError(
        "dataset: expected a JSONL path, a list of records or a Dataset, "
        f"got {type(dataset).__name__}"
    )


def _choices(values: Sequence[str] | str, enum: type[StrEnum], flag: str) -> list[StrEnum]:
    from tdb.table.request import member

    given = [values] if isinstance(values, str) else list(values)
    parts = [p.strip() for v in given for p in str(v).split(",") if p.strip()]
    if not parts:
        raise TdbError(f"{flag}: give at least one of {', '.join(e.value for e in enum)}")
    out: list[StrEnum] = []
    for part in parts:
        choice = member(enum, part, flag)
        if choice not in out:
            out.append(choice)
    return out


def attached_saes(
    loaded: LoadedModel, kinds: Sequence[ComponentKind], saes: Sequence[AttachedSae | str | Path]
) -> list[AttachedSae]:
    """The SAEs whose latents are components: those given, or the demo model's own."""
    if ComponentKind.LATENTS not in kinds:
        return []
    attached: list[AttachedSae] = []
    for sae in saes:
        attached += [sae] if isinstance(sae, AttachedSae) else load_saes(sae)
    if not attached and is_demo_model(loaded.path) and DEMO_SAE_DIR.is_dir():
        attached = load_saes(DEMO_SAE_DIR)
    if not attached:
        raise TdbError("--components latents: needs sparse autoencoders (--sae DIR_OR_FILE)")
    from tdb.latents import check_saes, place_saes

    check_saes(attached, loaded.model.config)
    place_saes(attached, loaded.model)
    return attached


@dataclass(frozen=True)
class Options:
    """`attribution`'s settings, checked (`check_options`)."""

    methods: tuple[Method, ...]
    reference: Reference | None  # None: corrupted when the dataset has corrupted prompts, else mean
    kinds: tuple[ComponentKind, ...]
    by: By
    verify: int
    k: int | None
    logprob: bool
    ig_steps: int
    batch_size: int
    saes: tuple[AttachedSae | str | Path, ...]


def check_options(
    methods: Sequence[str] | str = (DEFAULT_METHOD,),
    ablation: str | None = None,
    components: Sequence[str] | str = DEFAULT_KINDS,
    by: str = By.COMPONENT,
    verify: int = 0,
    k: int | None = None,
    logprob: bool = False,
    ig_steps: int = 10,
    batch_size: int = 32,
    saes: Sequence[AttachedSae | str | Path] = (),
) -> Options:
    """The settings checked, each mistake a TdbError naming its flag."""
    from tdb.table.request import member

    for name, value, low in (
        ("--verify", verify, 0),
        ("--ig-steps", ig_steps, 1),
        ("--batch-size", batch_size, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise TdbError(f"{name}: must be an integer >= {low}, got {value!r}")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise TdbError(f"-k: must be an integer >= 1, got {k!r}")
    return Options(
        methods=tuple(Method(m) for m in _choices(methods, Method, "--method")),
        reference=None
        if ablation is None
        else Reference(member(Reference, ablation, "--ablation")),
        kinds=tuple(ComponentKind(c) for c in _choices(components, ComponentKind, "--components")),
        by=By(member(By, by, "--by")),
        verify=verify,
        k=k,
        logprob=bool(logprob),
        ig_steps=ig_steps,
        batch_size=batch_size,
        saes=tuple(saes),
    )


def attribution(
    loaded: LoadedModel,
    dataset: DatasetArg,
    methods: Sequence[str] | str = (DEFAULT_METHOD,),
    ablation: str | None = None,
    components: Sequence[str] | str = DEFAULT_KINDS,
    by: str = By.COMPONENT,
    verify: int = 0,
    k: int | None = None,
    logprob: bool = False,
    ig_steps: int = 10,
    saes: Sequence[AttachedSae | str | Path] = (),
    batch_size: int = 32,
    progress: Progress | None = None,
) -> Attribution:
    """Score every component of the requested kinds by each method (see the module docstring).

    `dataset`: a JSONL path, a list of records (dicts, as the JSONL lines) or a `Dataset`.
    `methods`: "ig" (default), "atp*", "atp", "exact"; rows sort by the first one's |score|.
    `ablation`: "corrupted" (default when the dataset has corrupted prompts), "zero", "mean".
    `components`: "heads", "neurons", "latents" (the demo model's own SAEs, or `saes`).
    `by="position"`: a score per (component, position) (prompts of one token count).
    `verify=N`: `exact` for the top N of the first method too. `k`: keep the top k rows.
    """
    options = check_options(
        methods, ablation, components, by, verify, k, logprob, ig_steps, batch_size, saes
    )
    return run_attribution(loaded, dataset, options, progress)


def run_attribution(
    loaded: LoadedModel, dataset: DatasetArg, options: Options, progress: Progress | None = None
) -> Attribution:
    """`attribution` with its settings already checked (what the CLI and the server call)."""
    data = as_dataset(loaded, dataset)
    reference = options.reference or (Reference.CORRUPTED if data.has_corrupted else Reference.MEAN)
    _check_dataset(data, reference, options.logprob, options.by)
    attached = attached_saes(loaded, options.kinds, options.saes)
    site_list = sites(loaded.model.config, options.kinds, attached)
    runner = Runner(loaded, attached, options.logprob)
    device = next(loaded.model.parameters()).device
    progress = progress or Progress()
    methods = list(options.methods)
    plan = _Plan(
        runner,
        data,
        site_list,
        methods,
        reference,
        options.by,
        options.ig_steps,
        options.batch_size,
        device,
    )
    progress.start(plan.total_work(options.verify))
    try:
        scores = plan.estimate(progress)
        verified: dict[tuple[Key, int, int | None], float] = {}
        if options.verify and Method.EXACT not in methods:
            verified = plan.verify(scores[methods[0]], options.verify, progress)
    finally:
        progress.stop()
    return plan.result(scores, verified, options.verify, options.k, options.logprob)


def _check_dataset(data: Dataset, reference: Reference, logprob: bool, by: By) -> None:
    if reference is Reference.CORRUPTED:
        for pair in data.pairs:
            if pair.corrupted is None:
                raise TdbError(
                    f"{data.source} line {pair.line}: no 'corrupted' prompt, which "
                    "--ablation corrupted needs (or use --ablation zero|mean)"
                )
    if not logprob:
        for pair in data.pairs:
            if not pair.distractor:
                raise TdbError(
                    f"{data.source} line {pair.line}: no distractor: the metric "
                    "logit(target) - logit(distractor) needs one (or use --logprob)"
                )
    if by is By.POSITION and not data.same_length:
        lengths = sorted({len(p.tokens) for p in data.pairs})
        raise TdbError(
            f"--by position: the prompts must have one token count, these have {lengths[:5]}"
        )


@dataclass
class _Plan:
    """One attribution run: the passes over the dataset and the sums they add up."""

    runner: Runner
    data: Dataset
    sites: list[Site]
    methods: list[Method]
    reference: Reference
    by: By
    ig_steps: int
    batch_size: int
    device: torch.device
    means: dict[Key, Tensor] | None = None
    clean_sum: float = 0.0
    corrupted_sum: float | None = None
    n_pos: int = field(init=False)

    def __post_init__(self) -> None:
        self.n_pos = len(self.data.pairs[0].tokens) if self.by is By.POSITION else 1

    @property
    def n_layer(self) -> int:
        return self.runner.config.n_layer

    def batches(self) -> Iterator[Batch]:
        return batches(
            self.data,
            self.runner.config.d_vocab,
            self.batch_size,
            self.device,
            self.reference is Reference.CORRUPTED,
        )

    def candidates(self, site: Site) -> list[tuple[int, int | None]]:
        if self.by is By.POSITION:
            return [(i, p) for i in range(site.size) for p in range(self.n_pos)]
        return [(i, None) for i in range(site.size)]

    def total_work(self, verify: int) -> int:
        n = len(self.data)
        per_prompt = 2 + (1 if self.reference is Reference.MEAN else 0)
        if Method.IG in self.methods:
            per_prompt += self.ig_steps
        if Method.EXACT in self.methods:
            per_prompt += sum(len(self.candidates(s)) for s in self.sites)
        elif verify:
            per_prompt += 2 + verify
        return n * per_prompt

    def context_keys(self) -> list[Key]:
        """What `exact` and `atp*` read besides the components: every layer's input (and the
        final residual stream); for atp*, queries, keys and attention logits and patterns."""
        keys: list[Key] = [(HookPoint.RESID_PRE, layer) for layer in range(self.n_layer)]
        keys.append(FINAL)
        if Method.ATP_STAR in self.methods and any(
            s.kind is ComponentKind.HEADS for s in self.sites
        ):
            for layer in range(self.n_layer):
                keys += [
                    (HookPoint.Q, layer),
                    (HookPoint.K, layer),
                    (HookPoint.ATTN_LOGITS, layer),
                    (HookPoint.ATTN_PROBS, layer),
                ]
        return keys

    def compute_means(self, progress: Progress) -> dict[Key, Tensor]:
        """Each site's mean activation over every real token of the clean prompts."""
        keys = [s.key for s in self.sites]
        return mean_activations(self.runner, self.batches(), keys, progress.advance)

    def references(
        self, batch: Batch, values: Mapping[Key, Tensor], keys: Sequence[Key]
    ) -> tuple[dict[Key, Tensor], Tensor | None]:
        """Each site's reference activation for this batch, and m on the corrupted prompts."""
        if self.reference is not Reference.CORRUPTED:
            keys = [s.key for s in self.sites]
        return reference_activations(self.runner, batch, values, keys, self.reference, self.means)

    def estimate(self, progress: Progress) -> dict[Method, dict[Key, Tensor]]:
        """Each method's summed score per site, [n_pos (1 by component) comp]."""
        if self.reference is Reference.MEAN:
            self.means = self.compute_means(progress)
        sums: dict[Method, dict[Key, Tensor]] = {m: {} for m in self.methods}
        site_keys = [s.key for s in self.sites]
        keys = site_keys + self.context_keys()
        gradient_methods = {Method.ATP, Method.ATP_STAR} & set(self.methods)
        for batch in self.batches():
            if gradient_methods:
                m, values, grads = self.runner.gradients(batch, batch.tokens, keys)
            else:
                (m, values), grads = self.runner.record(batch, batch.tokens, keys), {}
            self.clean_sum += float(m.sum())
            ref_keys = site_keys + ([EMBED] if Method.IG in self.methods else [])
            refs, m_corrupted = self.references(batch, values, ref_keys)
            if m_corrupted is not None:
                self.corrupted_sum = (self.corrupted_sum or 0.0) + float(m_corrupted.sum())
            progress.advance(2 * batch.size)
            terms: dict[Method, dict[Key, Tensor]] = {}
            if gradient_methods:
                atp = atp_terms(self.sites, values, refs, grads, batch.valid)
                terms[Method.ATP] = atp
                if Method.ATP_STAR in self.methods:
                    heads = [s for s in self.sites if s.kind is ComponentKind.HEADS]
                    n_pos = batch.tokens.shape[1]
                    fix = qk_fix_terms(
                        self.runner, heads, values, refs, grads, n_pos, self.by is By.POSITION
                    )
                    terms[Method.ATP_STAR] = {
                        key: atp[key] + fix[key] if key in fix else atp[key] for key in atp
                    }
            if Method.IG in self.methods:
                terms[Method.IG] = self.integrated_gradients(batch, values, refs, progress)
            if Method.EXACT in self.methods:
                terms[Method.EXACT] = {}
                for site in self.sites:
                    found = exact_terms(
                        self.runner,
                        batch,
                        site,
                        m,
                        values,
                        refs,
                        self.candidates(site),
                        progress.advance,
                    )
                    terms[Method.EXACT][site.key] = found.reshape(site.size, self.n_pos).T
            for method in self.methods:
                for key, term in terms[method].items():
                    if self.by is By.COMPONENT and method is not Method.EXACT:
                        term = term.sum(dim=0, keepdim=True)
                    sums[method][key] = sums[method][key] + term if key in sums[method] else term
        return sums

    def integrated_gradients(
        self,
        batch: Batch,
        values: Mapping[Key, Tensor],
        refs: Mapping[Key, Tensor],
        progress: Progress,
    ) -> dict[Key, Tensor]:
        """(a - a_ref) . the gradient averaged over the path's midpoints. With corrupted
        references the path interpolates the embeddings (EAP-IG's inputs path: one pass a step);
        with zero or mean ones, each layer's components together (a pass a step and layer)."""
        total: dict[Key, Tensor] = {}
        if self.reference is Reference.CORRUPTED:
            paths = [([s.key for s in self.sites], [EMBED])]
        else:
            layers = sorted({s.layer for s in self.sites})
            paths = [([s.key for s in self.sites if s.layer == layer],) * 2 for layer in layers]

        def interpolate(start: Tensor, alpha: float) -> Callable[[Tensor], Tensor]:
            return lambda x: start + alpha * (x - start)

        for keys, moved in paths:
            for step in range(self.ig_steps):
                alpha = (step + 0.5) / self.ig_steps
                transform = {key: interpolate(refs[key], alpha) for key in moved}
                _, _, grads = self.runner.gradients(batch, batch.tokens, keys, transform)
                for key in keys:
                    g = grads[key] / self.ig_steps
                    total[key] = total[key] + g if key in total else g
                progress.advance(batch.size)
        return atp_terms(self.sites, values, refs, total, batch.valid)

    def verify(
        self, first: Mapping[Key, Tensor], n: int, progress: Progress
    ) -> dict[tuple[Key, int, int | None], float]:
        """`exact` for the top `n` (component, position) by |first method's score|."""
        ranked = sorted(
            (
                (abs(float(t[p, i])), site, i, p if self.by is By.POSITION else None)
                for site in self.sites
                for t in [first[site.key]]
                for p in range(t.shape[0])
                for i in range(t.shape[1])
            ),
            key=lambda r: -r[0],
        )[:n]
        chosen: dict[Site, list[tuple[int, int | None]]] = {}
        for _, site, i, p in ranked:
            chosen.setdefault(site, []).append((i, p))
        out: dict[tuple[Key, int, int | None], float] = {}
        keys = [s.key for s in self.sites] + self.context_keys()
        for batch in self.batches():
            m, values = self.runner.record(batch, batch.tokens, keys)
            refs, _ = self.references(batch, values, [s.key for s in self.sites])
            progress.advance(2 * batch.size)
            for site, cands in chosen.items():
                found = exact_terms(
                    self.runner, batch, site, m, values, refs, cands, progress.advance
                )
                for (i, p), value in zip(cands, found.tolist(), strict=True):
                    out[site.key, i, p] = out.get((site.key, i, p), 0.0) + value
        return out

    def result(
        self,
        sums: Mapping[Method, Mapping[Key, Tensor]],
        verified: Mapping[tuple[Key, int, int | None], float],
        verify: int,
        k: int | None,
        logprob: bool,
    ) -> Attribution:
        n = len(self.data)
        names = [m.value for m in self.methods]
        if verify and Method.EXACT not in self.methods:
            names.append(Method.EXACT.value)
        rows: list[ComponentScore] = []
        for site in self.sites:
            per_method = {m: (sums[m][site.key] / n).tolist() for m in self.methods}
            for p in range(self.n_pos):
                position = p if self.by is By.POSITION else None
                for i in range(site.size):
                    scores: dict[str, float | None] = {
                        m.value: per_method[m][p][i] for m in self.methods
                    }
                    if verify and Method.EXACT not in self.methods:
                        found = verified.get((site.key, i, position))
                        scores[Method.EXACT.value] = None if found is None else found / n
                    rows.append(ComponentScore(site.component(i), position, scores))
        first = names[0]
        rows.sort(key=lambda r: -abs(r.scores[first] or 0.0))
        if k is not None:
            rows = rows[:k]
        return Attribution(
            metric_kind="logprob" if logprob else "logit_diff",
            clean=self.clean_sum / n,
            corrupted=None if self.corrupted_sum is None else self.corrupted_sum / n,
            n_prompts=n,
            methods=tuple(names),
            reference=self.reference.value,
            by=self.by.value,
            rows=tuple(rows),
            source=self.data.source,
        )


def attribute(loaded: LoadedModel, dataset: DatasetArg, **options: object) -> object:
    """`attribution(...)` as a pandas DataFrame: one row per component, a column per method.

    >>> tdb.attribute(loaded, "ioi.jsonl", methods=["exact", "ig"]).head()
    """
    return attribution(loaded, dataset, **options).to_dataframe()  # type: ignore[arg-type]
