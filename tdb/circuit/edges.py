"""Edges between the components of a circuit: how much of the metric flows from one component's
output directly into one input of another.

    >>> edges = edge_scores(loaded, dataset, [head("h0.4"), head("h2.1")],
    ...                     reference=Reference.CORRUPTED, verify=10)
    >>> edges[0].source, edges[0].target, edges[0].input, edges[0].score, edges[0].exact

The metric m and the references are `tdb.attribution`'s. An edge u -> v:

- u (a **source**) is a circuit component's write into the residual stream (a head's
  z @ W_O[head], a neuron's post * W_out[n]) or, with corrupted references, "embed" (the
  embeddings, whose reference is the corrupted prompt's).
- v's input (a **reader**) is a head's "q", "k" or "v", a neuron's "mlp" (its pre-activation;
  gated MLPs: gate and up together) or "logits". It reads the residual stream at one point: a head
  of layer l `RESID_PRE[l]`, a neuron of layer l `model.block(l).mlp_input` (`RESID_MID[l]`, or
  `RESID_PRE[l]` in parallel blocks), the logits `RESID_FINAL`. u must write before that point.

`score` is edge attribution patching: sum over positions of (write_u - write_u_ref) . G, averaged
over prompts, with G = dm/d(the residual stream as that input alone reads it): the gradient at
the input's hook point pulled back through its projection (and rotation) and through the layer
norm's Jacobian at the residual stream it reads. One forward and backward pass (plus one over the
references) serves every edge. `method="ig"` averages G over the `ig_steps` midpoints of the
path from the corrupted to the clean embeddings (what `tdb.attribution`'s ig does); with zero or
mean references there is no such path and "ig" is plain "atp".

`exact` is path patching: m(clean) - m(clean with v's input computed from x + dW instead of x),
dW = write_u_ref - write_u, x the clean residual stream it reads, everything else clean. A head's
q becomes q + query_change(ln_1(x + dW) - ln_1(x)) (k, v likewise), a neuron's pre-activation
gets ln_2(x + dW) - ln_2(x) times its input weights, the logits read RESID_FINAL + dW. Several
edges share a forward pass (the prompts repeated), resumed at the reader's layer.

Summed over every reader, a source's edges give its node AtP (`tdb.attribution`'s "atp") when
the circuit holds every component: the gradient at its write is the sum of what each later
reader draws from it. tests/test_circuit_edges.py checks that.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

import torch
from jaxtyping import Float
from torch import Tensor

from tdb.attribution.components import Key
from tdb.attribution.dataset import Dataset
from tdb.attribution.run import (
    BATCH_ROWS,
    EMBED,
    FINAL,
    Batch,
    By,
    Reference,
    Runner,
    _check_dataset,
    batches,
    by_key,
    mean_activations,
    reference_activations,
)
from tdb.checkpoint import LoadedModel
from tdb.circuit.result import Edge
from tdb.errors import TdbError
from tdb.hooks import NO_HOOKS, HookPoint
from tdb.models.base import MlpWeights, TransformerModel
from tdb.models.layers import MLP, GatedMLP
from tdb.nodes import ComponentIndex, NodeType
from tdb.sae import AttachedSae

EMBED_ID = "embed"
LOGITS_ID = "logits"
METHODS = ("atp", "ig")


class Input(StrEnum):
    """Which input of a target an edge enters."""

    Q = "q"
    K = "k"
    V = "v"
    MLP = "mlp"
    LOGITS = "logits"


HEAD_INPUTS = {Input.Q: HookPoint.Q, Input.K: HookPoint.K, Input.V: HookPoint.V}


@dataclass(frozen=True)
class Source:
    """What writes into the residual stream: a component, or (None) the embeddings."""

    component: ComponentIndex | None

    @property
    def id(self) -> str:
        return EMBED_ID if self.component is None else self.component.id

    @property
    def slot(self) -> int:
        """When it writes: -1 the embeddings, 2l a head of layer l, 2l + 1 a neuron of layer l."""
        c = self.component
        if c is None:
            return -1
        return 2 * c.layer + (c.node_type is NodeType.MLP_NEURON)

    @property
    def key(self) -> Key:
        c = self.component
        if c is None:
            return EMBED
        point = HookPoint.ATTN_Z if c.node_type is NodeType.ATTENTION_HEAD else HookPoint.MLP_POST
        return point, c.layer


@dataclass(frozen=True)
class Reader:
    """One input of a target, and the residual stream it reads: `point` at `layer` (the logits:
    RESID_FINAL, layer n_layer)."""

    component: ComponentIndex | None  # None: the logits
    input: Input
    point: HookPoint
    layer: int

    @property
    def id(self) -> str:
        return LOGITS_ID if self.component is None else self.component.id

    @property
    def resid_key(self) -> Key:
        return FINAL if self.component is None else (self.point, self.layer)

    @property
    def cutoff(self) -> int:
        """It reads the writes of the sources whose `slot` is below this: RESID_PRE[l] 2l,
        RESID_MID[l] 2l + 1 (layer l's heads too), RESID_FINAL everything."""
        if self.component is None:
            return 2 * self.layer
        return 2 * self.layer + (self.point is HookPoint.RESID_MID)


def edge_scores(
    loaded: LoadedModel,
    dataset: Dataset,
    components: Sequence[ComponentIndex],
    *,
    reference: Reference,
    method: str = "ig",
    logprob: bool = False,
    ig_steps: int = 10,
    saes: Sequence[AttachedSae] = (),
    batch_size: int = 32,
    verify: int = 0,
    max_edges: int | None = None,
) -> list[Edge]:
    """Every edge between `components` (and from "embed", into "logits"), sorted by |score|.

    >>> edges = edge_scores(loaded, dataset, circuit, reference=Reference.CORRUPTED, verify=10)

    `method`: "ig" (default) or "atp" (see the module docstring). `verify=N`: `exact` (path
    patching) for the top N by |score|. `max_edges`: keep the top ones only.
    """
    reference = Reference(reference)
    _check_settings(method, ig_steps, batch_size, verify, max_edges)
    model = loaded.model
    chosen = _check_components(model, components)
    _check_dataset(dataset, reference, logprob, By.COMPONENT)
    corrupted = reference is Reference.CORRUPTED
    sources = ([Source(None)] if corrupted else []) + [Source(c) for c in chosen]
    readers = _readers(model, chosen)
    runner = Runner(loaded, saes, logprob)
    device = next(model.parameters()).device
    plan = _Plan(
        runner,
        list(batches(dataset, model.config.d_vocab, batch_size, device, corrupted)),
        sources,
        readers,
        reference,
        list(dict.fromkeys(s.key for s in sources)),
        _context_keys(readers),
    )
    if reference is Reference.MEAN:
        plan.means = mean_activations(runner, plan.batches, plan.source_keys, lambda n: None)
    integrated = method == "ig" and corrupted
    total = plan.estimate(ig_steps if integrated else None)
    n = len(dataset)
    slots = torch.tensor([s.slot for s in sources], device=device)
    cutoffs = torch.tensor([r.cutoff for r in readers], device=device)
    upstream = (slots[:, None] < cutoffs[None]).nonzero()  # [edge 2]: (source, reader)
    order = total[upstream[:, 0], upstream[:, 1]].abs().argsort(descending=True, stable=True)
    ranked: list[tuple[int, int]] = [(i, j) for i, j in upstream[order[:max_edges]].tolist()]
    score = total.tolist()
    top = ranked[:verify]
    exact = dict(zip(top, (e / n for e in plan.verify(top).tolist()), strict=True))
    source_ids, reader_ids = [s.id for s in sources], [r.id for r in readers]
    return [
        Edge(
            source=source_ids[i],
            target=reader_ids[j],
            input=readers[j].input.value,
            score=score[i][j] / n,
            exact=exact.get((i, j)),
        )
        for i, j in ranked
    ]


@dataclass
class _Plan:
    """The passes over the dataset: the estimate's and path patching's."""

    runner: Runner
    batches: list[Batch]
    sources: list[Source]
    readers: list[Reader]
    reference: Reference
    source_keys: list[Key]
    context: list[Key]  # the residual streams the readers read, and where patching resumes
    means: dict[Key, Tensor] | None = None

    def clean_and_references(
        self, batch: Batch
    ) -> tuple[Tensor, dict[Key, Tensor], dict[Key, Tensor]]:
        """m, the activations at the sources and the context, and the sources' references."""
        m, values = self.runner.record(batch, batch.tokens, self.source_keys + self.context)
        refs, _ = reference_activations(
            self.runner, batch, values, self.source_keys, self.reference, self.means
        )
        return m, values, refs

    def estimate(self, ig_steps: int | None) -> Float[Tensor, "source reader"]:
        """Each edge's estimate summed over prompts: atp, or (ig_steps given) ig."""
        model = self.runner.model
        gradient_keys = _gradient_keys(model, self.readers)
        total = torch.zeros(len(self.sources), len(self.readers))
        for batch in self.batches:
            if ig_steps is not None:
                _, values, refs = self.clean_and_references(batch)
                keys = self.context + gradient_keys
                G = _integrated_gradients(self.runner, batch, self.readers, keys, refs, ig_steps)
            else:
                keys = self.source_keys + self.context + gradient_keys
                _, values, grads = self.runner.gradients(batch, batch.tokens, keys)
                refs, _ = reference_activations(
                    self.runner, batch, values, self.source_keys, self.reference, self.means
                )
                G = reader_gradients(model, self.readers, values, grads)
            dW = writes(model, self.sources, values) - writes(model, self.sources, refs)
            dW = dW * batch.valid[None, :, :, None].to(dW.dtype)
            total = total.to(dW.device)
            total += torch.einsum("sbpd,rbpd->sr", dW.float(), G.float())  # [source reader]
        return total

    def verify(self, chosen: Sequence[tuple[int, int]]) -> Float[Tensor, " edge"]:
        """Path patching summed over prompts for each (source, reader) in `chosen`."""
        edges = [(self.sources[i], self.readers[j]) for i, j in chosen]
        sums = torch.zeros(len(edges))
        if not edges:
            return sums
        for batch in self.batches:
            m, values, refs = self.clean_and_references(batch)
            sums = sums.to(m.device) + path_patching(self.runner, batch, m, edges, values, refs)
        return sums


# --- checks and the plan ----------------------------------------------------------------------


def _check_settings(
    method: str, ig_steps: int, batch_size: int, verify: int, max_edges: int | None
) -> None:
    if method not in METHODS:
        raise TdbError(f"edges: method must be one of {', '.join(METHODS)}, got {method!r}")
    for name, value, low in (("ig_steps", ig_steps, 1), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise TdbError(f"edges: {name} must be an integer >= {low}, got {value!r}")
    if isinstance(verify, bool) or not isinstance(verify, int) or verify < 0:
        raise TdbError(f"edges: verify must be an integer >= 0, got {verify!r}")
    if max_edges is not None and (
        isinstance(max_edges, bool) or not isinstance(max_edges, int) or max_edges < 1
    ):
        raise TdbError(f"edges: max_edges must be an integer >= 1, got {max_edges!r}")


def _check_components(
    model: TransformerModel, components: Sequence[ComponentIndex]
) -> list[ComponentIndex]:
    """The components, duplicates dropped, in forward-pass order; heads and neurons only."""
    latents = [c.id for c in components if c.node_type is NodeType.AUTOENCODER_LATENT]
    if latents:
        raise TdbError(
            f"edges: SAE latents are not supported as circuit components ({', '.join(latents)}); "
            "use heads and neurons"
        )
    config = model.config
    for c in components:
        size = config.n_head if c.node_type is NodeType.ATTENTION_HEAD else config.d_mlp
        if c.node_type not in (NodeType.ATTENTION_HEAD, NodeType.MLP_NEURON):
            raise TdbError(f"edges: {c.id} is not a head or a neuron")
        if not (0 <= c.layer < config.n_layer and 0 <= c.index < size):
            raise TdbError(
                f"edges: no component {c.id} in this model ({config.n_layer} layers, "
                f"{config.n_head} heads, {config.d_mlp} neurons a layer)"
            )
    unique = list(dict.fromkeys(components))
    # Heads before neurons within a layer: the order the forward pass computes them.
    return sorted(unique, key=lambda c: (c.layer, c.node_type is NodeType.MLP_NEURON))


def _readers(model: TransformerModel, components: Sequence[ComponentIndex]) -> list[Reader]:
    out: list[Reader] = []
    for c in components:
        if c.node_type is NodeType.ATTENTION_HEAD:
            out += [Reader(c, i, HookPoint.RESID_PRE, c.layer) for i in HEAD_INPUTS]
        else:
            out.append(Reader(c, Input.MLP, model.block(c.layer).mlp_input, c.layer))
    n_layer = model.config.n_layer
    return [*out, Reader(None, Input.LOGITS, HookPoint.RESID_FINAL, n_layer)]


def _context_keys(readers: Sequence[Reader]) -> list[Key]:
    """The residual streams the readers read, and each reader layer's input (where path
    patching resumes)."""
    keys: list[Key] = []
    for r in readers:
        keys += (
            [r.resid_key] if r.component is None else [r.resid_key, (HookPoint.RESID_PRE, r.layer)]
        )
    return list(dict.fromkeys(keys))


def _gradient_keys(model: TransformerModel, readers: Sequence[Reader]) -> list[Key]:
    """The hook points whose gradients the readers' G are pulled back from."""
    keys: list[Key] = []
    for r in readers:
        if r.input in HEAD_INPUTS:
            keys.append((HEAD_INPUTS[r.input], r.layer))
        elif r.input is Input.MLP:
            keys += [(point, r.layer) for point, _ in mlp_inputs(model.block(r.layer).mlp)]
        else:
            keys.append(FINAL)
    return list(dict.fromkeys(keys))


def mlp_inputs(mlp: MlpWeights) -> list[tuple[HookPoint, Float[Tensor, "d_model d_mlp"]]]:
    """Where a neuron's pre-activations are hooked and the weights that read them from the
    normalised residual stream: `MLP_PRE` (W_in), or for gated MLPs the gate's and the up's."""
    if isinstance(mlp, GatedMLP):
        return [(HookPoint.MLP_PRE, mlp.W_gate.detach()), (HookPoint.MLP_UP, mlp.W_up.detach())]
    if isinstance(mlp, MLP):
        return [(HookPoint.MLP_PRE, mlp.W_in.detach())]
    raise TdbError(f"edges: unsupported MLP {type(mlp).__name__}")


# --- the estimate -----------------------------------------------------------------------------


def writes(
    model: TransformerModel, sources: Sequence[Source], values: Mapping[Key, Tensor]
) -> Float[Tensor, "source batch pos d_model"]:
    """Each source's write into the residual stream, from its activations in `values`."""
    out = []
    for s in sources:
        c, x = s.component, values[s.key]
        if c is None:
            out.append(x)
        elif c.node_type is NodeType.ATTENTION_HEAD:
            W_O = model.block(c.layer).attn.W_O.detach()  # [head d_head d_model]
            out.append(x[:, :, c.index] @ W_O[c.index].to(x.dtype))  # [batch pos d_model]
        else:
            W_out = model.block(c.layer).mlp.W_out.detach()  # [d_mlp d_model]
            out.append(x[:, :, c.index, None] * W_out[c.index].to(x.dtype))
    return torch.stack(out)


def reader_gradients(
    model: TransformerModel,
    readers: Sequence[Reader],
    values: Mapping[Key, Tensor],
    grads: Mapping[Key, Tensor],
) -> Float[Tensor, "reader batch pos d_model"]:
    """G for each reader: dm/d(the residual stream as that input alone reads it), the gradient
    at its hook point pulled back through its weights and the norm's Jacobian at `values`.
    One vector-Jacobian product per (layer, input) for all its readers (the residual stream
    repeated once per reader)."""
    out: list[Tensor | None] = [None] * len(readers)
    groups: dict[tuple[int, Input], list[int]] = {}
    for i, r in enumerate(readers):
        if r.component is None:
            out[i] = grads[FINAL]  # already through the final norm
        else:
            groups.setdefault((r.layer, r.input), []).append(i)
    for (layer, kind), members in groups.items():
        index = torch.tensor([_index(readers[i]) for i in members], device=grads[FINAL].device)
        x = values[readers[members[0]].resid_key]  # [batch pos d_model]
        if kind is Input.MLP:
            read = _mlp_read(model, layer, index, grads)
        else:
            read = _head_read(model, layer, kind, index, grads)
        G = _pull_back(model, layer, kind, x, len(members), read)
        for slot, i in enumerate(members):
            out[i] = G[slot]
    return torch.stack([g for g in out if g is not None])


Read = Callable[[Tensor], Tensor]  # normalised residual [reader batch pos d_model] -> m's part


def _head_read(
    model: TransformerModel, layer: int, kind: Input, heads: Tensor, grads: Mapping[Key, Tensor]
) -> Read:
    attn = model.block(layer).attn
    change = {Input.Q: attn.query_change, Input.K: attn.key_change, Input.V: attn.value_change}
    g = grads[HEAD_INPUTS[kind], layer]  # [batch pos head d_head]

    def read(normed: Tensor) -> Tensor:
        r, b, p, d = normed.shape
        positions = torch.arange(p, device=normed.device).expand(r * b, p)
        out = change[kind](normed.reshape(r * b, p, d), positions)  # [r*batch pos head d_head]
        out = out.reshape(r, b, p, *out.shape[2:])
        mine = out[torch.arange(r), :, :, heads.to(out.device)]  # [r batch pos d_head]
        return (mine * g[:, :, heads].permute(2, 0, 1, 3).to(mine.dtype)).sum()

    return read


def _mlp_read(
    model: TransformerModel, layer: int, neurons: Tensor, grads: Mapping[Key, Tensor]
) -> Read:
    inputs = mlp_inputs(model.block(layer).mlp)

    def read(normed: Tensor) -> Tensor:
        total = normed.new_zeros(())
        for point, W in inputs:
            pre = torch.einsum("rbpd,dr->rbp", normed, W[:, neurons].to(normed.dtype))
            g = grads[point, layer][:, :, neurons].permute(2, 0, 1)  # [r batch pos]
            total = total + (pre * g.to(pre.dtype)).sum()
        return total

    return read


def _pull_back(
    model: TransformerModel, layer: int, kind: Input, x: Tensor, n: int, read: Read
) -> Float[Tensor, "reader batch pos d_model"]:
    block = model.block(layer)
    norm = block.ln_2 if kind is Input.MLP else block.ln_1
    with torch.enable_grad():
        leaf = x.detach()[None].expand(n, *x.shape).clone().requires_grad_()
        normed = norm(leaf.reshape(-1, *x.shape[1:]), NO_HOOKS).reshape(leaf.shape)
        (G,) = torch.autograd.grad(read(normed), [leaf])
    return G


def _integrated_gradients(
    runner: Runner,
    batch: Batch,
    readers: Sequence[Reader],
    keys: Sequence[Key],
    refs: Mapping[Key, Tensor],
    steps: int,
) -> Float[Tensor, "reader batch pos d_model"]:
    """G averaged over the midpoints of the path from the corrupted to the clean embeddings
    (each step's G at that step's residual streams)."""
    total: Tensor | None = None
    start = refs[EMBED]
    for step in range(steps):
        alpha = (step + 0.5) / steps

        def interpolate(x: Tensor, alpha: float = alpha) -> Tensor:
            return start + alpha * (x - start)

        _, values, grads = runner.gradients(batch, batch.tokens, keys, {EMBED: interpolate})
        G = reader_gradients(runner.model, readers, values, grads) / steps
        total = G if total is None else total + G
    assert total is not None
    return total


# --- path patching ----------------------------------------------------------------------------


def path_patching(
    runner: Runner,
    batch: Batch,
    m_clean: Float[Tensor, " batch"],
    edges: Sequence[tuple[Source, Reader]],
    values: Mapping[Key, Tensor],
    refs: Mapping[Key, Tensor],
) -> Float[Tensor, " edge"]:
    """sum over the batch of m(clean) - m(the edge's source patched as its reader alone sees
    it), for each edge; the edges into one layer share forward passes (the batch repeated)."""
    model, n_layer = runner.model, runner.config.n_layer
    out = torch.zeros(len(edges), device=m_clean.device)
    by_layer: dict[int, list[int]] = {}
    for e, (_, reader) in enumerate(edges):
        by_layer.setdefault(reader.layer, []).append(e)
    for layer, members in sorted(by_layer.items()):
        share = max(1, n_layer - layer) / n_layer  # the part of the model each pass recomputes
        copies = max(1, int(BATCH_ROWS / (batch.size * max(share, 0.25))))
        for first in range(0, len(members), copies):
            chunk = members[first : first + copies]
            change = torch.stack(  # [edge batch pos d_model]: write_ref - write
                [
                    (writes(model, [s], refs) - writes(model, [s], values))[0]
                    for s, _ in (edges[e] for e in chunk)
                ]
            )
            with torch.no_grad():
                m = _patched_metric(runner, batch, [edges[e][1] for e in chunk], change, values)
            found = (m_clean[None] - m.reshape(len(chunk), batch.size)).sum(dim=1)
            out[torch.tensor(chunk, device=out.device)] = found
    return out


def _patched_metric(
    runner: Runner,
    batch: Batch,
    readers: Sequence[Reader],
    change: Float[Tensor, "edge batch pos d_model"],
    values: Mapping[Key, Tensor],
) -> Float[Tensor, " rows"]:
    """m with copy j of the batch seeing `change[j]` through `readers[j]` (all of one layer)."""
    model, n_layer = runner.model, runner.config.n_layer
    c, b = change.shape[0], batch.size
    tokens = batch.tokens.repeat(c, 1)
    layer = readers[0].layer
    if layer == n_layer:  # the logits: the final residual stream changes, nothing else
        final = (values[FINAL][None] + change.to(values[FINAL].dtype)).reshape(
            c * b, -1, change.shape[-1]
        )
        return runner.metric(batch, tokens, resume=(n_layer, final))
    block = model.block(layer)
    n_pos = change.shape[2]
    positions = torch.arange(n_pos, device=change.device).expand(b, n_pos)
    deltas: dict[Key, Tensor] = {}
    for j, reader in enumerate(readers):
        assert reader.component is not None
        x = values[reader.resid_key]
        index, rows = reader.component.index, slice(j * b, (j + 1) * b)
        dx = change[j].to(x.dtype)
        if reader.input is Input.MLP:
            dn = block.ln_2(x + dx, NO_HOOKS) - block.ln_2(x, NO_HOOKS)  # [batch pos d_model]
            for point, W in mlp_inputs(block.mlp):
                delta = deltas.setdefault((point, layer), _zeros(c * b, n_pos, W.shape[1], like=x))
                delta[rows, :, index] += dn @ W[:, index].to(dn.dtype)
        else:
            attn = block.attn
            change_of = {
                Input.Q: attn.query_change,
                Input.K: attn.key_change,
                Input.V: attn.value_change,
            }[reader.input]
            dn = block.ln_1(x + dx, NO_HOOKS) - block.ln_1(x, NO_HOOKS)
            moved = change_of(dn, positions)[:, :, index]  # [batch pos d_head]
            key = (HEAD_INPUTS[reader.input], layer)
            shape = (c * b, n_pos, runner.config.n_head, moved.shape[-1])
            delta = deltas.setdefault(key, _zeros(*shape, like=x))
            delta[rows, :, index] += moved

    def add(x: Tensor, key: Key) -> Tensor | None:
        return x + deltas[key].to(x.dtype) if key in deltas else None

    resid = values[HookPoint.RESID_PRE, layer].repeat(c, 1, 1)
    return runner.metric(batch, tokens, by_key(list(deltas), add), resume=(layer, resid))


def _index(reader: Reader) -> int:
    assert reader.component is not None
    return reader.component.index


def _zeros(*shape: int, like: Tensor) -> Tensor:
    return torch.zeros(shape, dtype=like.dtype, device=like.device)
