"""One forward and one backward pass, turned into a store of derived scalars.

The forward pass saves, per layer, only what the metrics read (attention probabilities and
values, MLP post-activations, the embedding), and only for layers upstream of where the direction
reads the residual stream. If a requested metric needs gradients, one backward pass from the
direction follows, with the reading layer norm's scale held fixed and no parameter gradients; a
gradient hook on each layer's probabilities and post-activations computes that layer's metrics
as soon as its gradient exists and drops the saved tensors. With `prune_k`, each layer keeps only
its own top k (and bottom k for signed metrics) per metric, so memory stays bounded however long
the prompt: the global top k is always among the layers' top k.

Nodes that cannot affect the direction (layers after its read point, tokens after the last
position it reads) are not in the store.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tdb.attention_chunks import chunk_rows, head_layer_dense, head_layer_pruned
from tdb.direction import Direction
from tdb.errors import TdbError
from tdb.hooks import NO_HOOKS, HookPoint, Hooks, compose
from tdb.latents import LATENT_POINTS, SITE_OF_LATENT_POINT, attach, check_saes, write_directions
from tdb.metrics import (
    AttentionInputs,
    EmbeddingInputs,
    LatentInputs,
    Metric,
    MlpInputs,
    ReadOut,
    metric_function,
    needs_gradient,
    needs_values,
    node_mask,
)
from tdb.models.base import TransformerModel
from tdb.nodes import INDEX, LAYER, NO_COORD, SITE, SITES, TOKEN, LatentSite, NodeType
from tdb.sae import AttachedSae
from tdb.store import GridBlock, ListBlock, NodeBlock, ScalarStore, grid_coords, top_and_bottom


@dataclass(frozen=True)
class Capture:
    """What one forward (+ backward) pass left: the store, the direction's value, and the
    logits at the direction's position (for token views)."""

    store: ScalarStore
    direction_value: float
    logits: Float[Tensor, " d_vocab"]


@dataclass
class LayeredBlockBuilder:
    """Collects one node type's metric grids layer by layer; keeps them whole or prunes each."""

    node_type: NodeType
    groups: Sequence[Metric]
    prune_k: int | None
    last_token: int
    layers: dict[int, dict[Metric, Tensor]] = field(default_factory=dict)
    kept: dict[int, Tensor] = field(default_factory=dict)  # per layer, when pruning
    layer_shape: tuple[int, ...] = ()
    nodes: Tensor | None = None  # [layer grid, flat] True where an entry is a node

    def add(self, layer: int, grids: dict[Metric, Tensor]) -> None:
        if not self.layer_shape:
            self.layer_shape = tuple(grids[self.groups[0]].shape)
            self.nodes = node_mask(self.node_type, self.layer_shape, self.last_token).flatten()
        assert self.nodes is not None
        # Ranked in float32 on the layer's device; the store holds what is kept, on the CPU.
        flat = {g: v.flatten().float() for g, v in grids.items()}
        nodes = self.nodes.to(flat[self.groups[0]].device)
        if self.prune_k is None:  # keep the whole grid; entries that are not nodes become NaN
            self.layers[layer] = {g: v.masked_fill(~nodes, math.nan).cpu() for g, v in flat.items()}
            return
        kept = top_and_bottom(flat, self.prune_k, nodes)  # ascending: grid order
        self.kept[layer] = kept.cpu()
        self.layers[layer] = {g: v[kept].cpu() for g, v in flat.items()}

    def add_heads(self, layer: int, x: AttentionInputs, rows: int | None) -> None:
        """One layer of attention heads, its metrics computed `rows` queries at a time
        (tdb.attention_chunks; None: as many as its memory budget allows)."""
        n_head, n_pos, _ = x.probs.shape
        self.layer_shape = (n_head, n_pos, n_pos)
        rows = chunk_rows(n_head, n_pos) if rows is None else rows
        if self.prune_k is None:
            self.layers[layer] = head_layer_dense(x, self.groups, self.last_token, rows)
        else:
            self.kept[layer], self.layers[layer] = head_layer_pruned(
                x, self.groups, self.last_token, rows, self.prune_k
            )

    def build(self) -> NodeBlock:
        layers = sorted(self.layers)
        assert layers == list(range(len(layers)))  # upstream layers are always a prefix
        values = {g: torch.cat([self.layers[layer][g] for layer in layers]) for g in self.groups}
        shape = (len(layers), *self.layer_shape)
        if self.prune_k is None:
            return GridBlock(self.node_type, shape, values)
        layer_size = math.prod(self.layer_shape)
        flat = torch.cat([self.kept[layer] + layer * layer_size for layer in layers])
        coords = grid_coords(self.node_type, shape, flat)
        return ListBlock(self.node_type, coords, values, pruned_k=self.prune_k)


@dataclass
class LatentBlockBuilder:
    """Collects every attached SAE's latent metrics; keeps them whole (tokens up to the last
    the direction reads) or each SAE's top k / bottom k per metric. Always a list of nodes:
    SAEs differ in size and need not cover every layer."""

    groups: Sequence[Metric]
    prune_k: int | None
    last_token: int
    parts: dict[tuple[int, int], tuple[Tensor, dict[Metric, Tensor]]] = field(default_factory=dict)

    def add(self, attached: AttachedSae, grids: dict[Metric, Tensor]) -> None:
        d_sae = attached.sae.d_sae
        flat = {g: v[: self.last_token + 1].flatten().float().cpu() for g, v in grids.items()}
        if self.prune_k is None:
            kept = torch.arange(len(flat[self.groups[0]]))
        else:
            kept = top_and_bottom(flat, self.prune_k)  # ascending: token, then latent
        coords = torch.full((len(kept), 5), NO_COORD, dtype=torch.long)
        coords[:, LAYER] = attached.layer
        coords[:, TOKEN] = kept // d_sae
        coords[:, INDEX] = kept % d_sae
        coords[:, SITE] = SITES.index(attached.site)
        order = (attached.layer, list(LatentSite).index(attached.site))
        self.parts[order] = (coords, {g: v[kept] for g, v in flat.items()})

    def build(self) -> ListBlock:
        parts = [self.parts[key] for key in sorted(self.parts)]  # forward-pass order
        coords = torch.cat([c for c, _ in parts])
        values = {g: torch.cat([v[g] for _, v in parts]) for g in self.groups}
        return ListBlock(NodeType.AUTOENCODER_LATENT, coords, values, pruned_k=self.prune_k)


def read_on(read: ReadOut, like: Tensor) -> ReadOut:
    """The read-out on `like`'s device and in its dtype (a device map puts layers elsewhere)."""
    if read.g.device == like.device and read.g.dtype == like.dtype:
        return read
    return ReadOut(read.positions, read.g.to(like.device, like.dtype))


def read_out(
    model: TransformerModel, direction: Direction, resid: Float[Tensor, "pos d_model"]
) -> ReadOut:
    """g: d(direction)/d(residual stream at its read point), at the positions it reads."""
    x = resid.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(direction.read(model, x), x)
    positions = direction.read_positions
    return ReadOut(positions, grad[list(positions)])


def capture(
    model: TransformerModel,
    tokens: Int[Tensor, " pos"],
    direction: Direction,
    groups: Sequence[Metric],
    prune_k: int | None = None,
    hooks: Hooks = NO_HOOKS,
    saes: Sequence[AttachedSae] = (),
    query_chunk: int | None = None,
) -> Capture:
    """Run the model once (forward, and backward if needed) and derive every metric in `groups`.

    `hooks` (e.g. ablations) run before the capture's own, so the metrics see their effect.
    `saes` are attached inside the forward pass (tdb.latents); their latents become nodes.
    `query_chunk`: attention metrics are computed that many queries at a time (default: from
    a memory budget, see tdb.attention_chunks).

    >>> cap = capture(model, torch.tensor([5, 9, 2]), LogitDiff((7,), (8,), 2), ALL_GROUPS)
    >>> cap.store.topk(Group.DIRECT_EFFECT, NodeType.MLP_NEURON, 5)
    """
    return capture_batch(model, [tokens], [direction], groups, prune_k, hooks, saes, query_chunk)[0]


def padded(
    prompts: Sequence[Int[Tensor, " _pos"]],  # each its own length
) -> tuple[Int[Tensor, "batch pos"], Bool[Tensor, "batch query_pos key_pos"] | None]:
    """Prompts of different lengths as one batch, right-padded (with token 0), and the mask of
    the keys a query may attend to (real tokens only); None when no prompt is padded.

    Right padding keeps every real token at its own position (0, 1, ...), so learned and rotary
    positions are exact for every architecture, and under the causal mask a real token never
    sees a padding token anyway: the mask says so explicitly."""
    lengths = [len(p) for p in prompts]
    n_pos = max(lengths)
    tokens = torch.zeros(len(prompts), n_pos, dtype=torch.long, device=prompts[0].device)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = prompt
    if min(lengths) == n_pos:
        return tokens, None
    return tokens, padding_mask(torch.tensor(lengths, device=tokens.device), n_pos)


def padding_mask(
    lengths: Int[Tensor, " batch"], n_pos: int
) -> Bool[Tensor, "batch query_pos key_pos"]:
    """The attention mask of a right-padded batch whose rows hold `lengths` real tokens.

    A real query attends to real keys only; a padding query to whatever the causal (and
    sliding-window) mask allows, so that no row is all masked (a NaN there would reach the real
    rows' gradients through 0 * NaN)."""
    real = torch.arange(n_pos, device=lengths.device) < lengths[:, None]  # [batch pos]
    return real[:, None, :] | ~real[:, :, None]  # [batch query_pos key_pos]


def capture_batch(
    model: TransformerModel,
    prompts: Sequence[Int[Tensor, " _pos"]],  # each its own length
    directions: Sequence[Direction],
    groups: Sequence[Metric],
    prune_k: int | None = None,
    hooks: Hooks = NO_HOOKS,
    saes: Sequence[AttachedSae] = (),
    query_chunk: int | None = None,
) -> list[Capture]:
    """`capture` of several prompts (of any lengths) in one forward and one backward pass: one
    `Capture` per prompt, equal to running it alone (up to float rounding; tests/test_batch.py).

    The prompts are right-padded (`padded`); padding positions are never nodes. The backward
    pass starts from the sum of the prompts' directions: prompts do not see each other, so each
    prompt's gradients are its own direction's. The directions must read the residual stream
    at the same point (the final one, for logit directions). `hooks` see the padded batch.

    >>> left, right = capture_batch(model, [torch.tensor([5, 9, 2]), torch.tensor([5, 9])],
    ...                             [LogitDiff((7,), (8,), 2), LogitDiff((7,), (8,), 1)], groups)
    """
    if len(prompts) != len(directions) or not prompts:
        raise ValueError(f"{len(prompts)} prompts need as many directions, not {len(directions)}")
    groups = list(dict.fromkeys(groups))
    needs_grad = needs_gradient(groups)
    reads_values = needs_values(groups)
    read_point = directions[0].read_point
    if any(d.read_point != read_point for d in directions):
        raise TdbError("a batched capture needs directions that read the same point")
    lengths = [len(p) for p in prompts]
    rows = range(len(prompts))
    last_tokens = [max(d.read_positions) for d in directions]
    n_layer = model.config.n_layer
    upstream = {
        HookPoint.ATTN_PROBS: read_point.upstream_layers(n_layer, node_is_attention=True),
        HookPoint.V: read_point.upstream_layers(n_layer, node_is_attention=True),
        HookPoint.MLP_POST: read_point.upstream_layers(n_layer, node_is_attention=False),
    }
    by_key = check_saes(saes, model.config)
    for site, point in LATENT_POINTS.items():
        upstream[point] = read_point.upstream_layers(n_layer, site is LatentSite.ATTN_OUT)
    latent_builders = [LatentBlockBuilder(groups, prune_k, last) for last in last_tokens]
    builders = [
        {
            t: LayeredBlockBuilder(t, groups, prune_k, last)
            for t in (NodeType.ATTENTION_HEAD, NodeType.MLP_NEURON)
        }
        for last in last_tokens
    ]
    saved: dict[tuple[HookPoint, int | None], Tensor] = {}
    read: list[ReadOut] = []  # one per prompt, known only once the forward pass has ended

    def derive(row: int, node_type: NodeType, inputs: object, layer: int) -> None:
        with torch.no_grad():
            grids = {group: metric_function(node_type, group)(inputs) for group in groups}
        builders[row][node_type].add(layer, grids)

    def rows_of(x: Tensor | None, row: int) -> Tensor | None:
        """One prompt's part of a batch tensor [batch pos ...] (padding cut off)."""
        return None if x is None else x[row, : lengths[row]]

    def finish_attention(layer: int, grad_probs: Tensor | None) -> None:
        probs = saved.pop((HookPoint.ATTN_PROBS, layer)).detach()  # [batch head query key]
        v = saved.pop((HookPoint.V, layer)).detach() if reads_values else None
        W_O = model.block(layer).attn.W_O.detach()
        for row, n in zip(rows, lengths, strict=True):
            grad = None if grad_probs is None else grad_probs[row, :, :n, :n]
            inputs = AttentionInputs(
                probs[row, :, :n, :n], grad, rows_of(v, row), W_O, read_on(read[row], W_O)
            )
            with torch.no_grad():
                builders[row][NodeType.ATTENTION_HEAD].add_heads(layer, inputs, query_chunk)

    def finish_mlp(layer: int, grad_post: Tensor | None) -> None:
        post = saved.pop((HookPoint.MLP_POST, layer)).detach()
        W_out = model.block(layer).mlp.W_out.detach()
        for row in rows:
            inputs = MlpInputs(
                post[row, : lengths[row]], rows_of(grad_post, row), W_out, read_on(read[row], W_out)
            )
            derive(row, NodeType.MLP_NEURON, inputs, layer)

    def finish_latents(point: HookPoint) -> Callable[[int, Tensor | None], None]:
        def finish(layer: int, grad_z: Tensor | None) -> None:
            z = saved.pop((point, layer)).detach()
            attached = by_key[(SITE_OF_LATENT_POINT[point], layer)]
            write_dirs = write_directions(model, attached).detach()
            for row in rows:
                z_row = z[row, : lengths[row]]
                read_row = read_on(read[row], write_dirs)
                inputs = LatentInputs(z_row, rows_of(grad_z, row), write_dirs, read_row)
                with torch.no_grad():
                    grids = {
                        g: metric_function(NodeType.AUTOENCODER_LATENT, g)(inputs) for g in groups
                    }
                latent_builders[row].add(attached, grids)

        return finish

    finishers: dict[HookPoint, Callable[[int, Tensor | None], None]] = {
        HookPoint.ATTN_PROBS: finish_attention,
        HookPoint.MLP_POST: finish_mlp,
        **{point: finish_latents(point) for point in LATENT_POINTS.values()},
    }

    def save_upstream(point: HookPoint) -> Callable[[Tensor, int | None], None]:
        def hook(x: Tensor, layer: int | None) -> None:
            assert layer is not None
            if layer >= upstream[point]:
                return
            saved[(point, layer)] = x
            if needs_grad and point in finishers:
                finish = finishers[point]
                # Called once, in the backward pass, with d(direction)/dx; the tensor and this
                # hook die with the graph, so nothing outlives the call. (torch leaves it untyped.)
                x.register_hook(lambda grad: finish(layer, grad))  # type: ignore[no-untyped-call]

        return hook

    def save_read_point(x: Tensor, layer: int | None) -> None:
        if layer == read_point.layer:
            saved[(read_point.hook, None)] = x

    def embed_leaf(x: Tensor, layer: int | None) -> Tensor:
        # The backward pass starts here: parameters stay out of it, so none get gradients.
        leaf = x.detach().requires_grad_(needs_grad)
        saved[(HookPoint.RESID_EMBED, None)] = leaf
        return leaf

    own = Hooks(
        {
            HookPoint.RESID_EMBED: embed_leaf,
            **({HookPoint.V: save_upstream(HookPoint.V)} if reads_values else {}),
            HookPoint.ATTN_PROBS: save_upstream(HookPoint.ATTN_PROBS),
            HookPoint.MLP_POST: save_upstream(HookPoint.MLP_POST),
            **{
                LATENT_POINTS[site]: save_upstream(LATENT_POINTS[site])
                for site in {a.site for a in saes}
            },
            read_point.hook: save_read_point,
        }
    )
    tokens, attention_mask = padded(prompts)
    positions = sorted({d.position for d in directions})
    logit_positions = torch.tensor(positions)
    with torch.set_grad_enabled(needs_grad):
        all_hooks = attach(saes, compose(hooks, own))
        logits = model(
            tokens, all_hooks, attention_mask=attention_mask, logit_positions=logit_positions
        )  # [batch logit_pos d_vocab]
        resid_read = saved.pop((read_point.hook, None))
        values = [
            d.read(model, resid_read[row, : lengths[row]])
            for row, d in zip(rows, directions, strict=True)
        ]
    read.extend(
        read_out(model, d, resid_read[row, : lengths[row]])
        for row, d in zip(rows, directions, strict=True)
    )
    resid = saved.pop((HookPoint.RESID_EMBED, None))
    # Each prompt's direction depends on its own row only, so the gradient of the sum is, row
    # by row, the gradient of each prompt's own direction.
    grad_resid = torch.autograd.grad(torch.stack(values).sum(), resid)[0] if needs_grad else None
    # Layers the direction does not depend on fired no gradient hook: their gradient is zero.
    for point, layer in [key for key in saved if key[0] in finishers]:
        assert layer is not None
        grad = torch.zeros_like(saved[(point, layer)]) if needs_grad else None
        finishers[point](layer, grad)
    captures = []
    for row, n_pos, last_token in zip(rows, lengths, last_tokens, strict=True):
        embedding = EmbeddingInputs(
            resid[row, :n_pos].detach(), rows_of(grad_resid, row), read_on(read[row], resid)
        )
        embedding_nodes = node_mask(NodeType.EMBEDDING, (n_pos,), last_token)
        with torch.no_grad():
            embedding_values = {
                g: metric_function(NodeType.EMBEDDING, g)(embedding)
                .float()
                .cpu()
                .masked_fill(~embedding_nodes, math.nan)
                for g in groups
            }
        blocks: dict[NodeType, NodeBlock] = {
            NodeType.EMBEDDING: GridBlock(NodeType.EMBEDDING, (n_pos,), embedding_values)
        }
        for node_type, builder in builders[row].items():
            if builder.layers:
                blocks[node_type] = builder.build()
        if latent_builders[row].parts:
            blocks[NodeType.AUTOENCODER_LATENT] = latent_builders[row].build()
        # The logits join the store on the CPU, in float32 (token views rank them there).
        row_logits = logits[row, positions.index(directions[row].position)].detach().float().cpu()
        captures.append(Capture(ScalarStore(blocks), float(values[row].detach()), row_logits))
    return captures


def direction_value(
    model: TransformerModel,
    tokens: Int[Tensor, " pos"],
    direction: Direction,
    hooks: Hooks = NO_HOOKS,
    saes: Sequence[AttachedSae] = (),
) -> float:
    """The direction's value after one forward pass (no gradients), e.g. under an ablation
    (`saes`: attached as in `capture`, so latent ablations apply).

    >>> direction_value(model, tokens, direction, ablation_hooks(model, tokens, ablations))
    """
    read_point = direction.read_point
    saved: list[Tensor] = []

    def keep(x: Tensor, layer: int | None) -> None:
        if layer == read_point.layer:
            saved.append(x)

    with torch.no_grad():
        model(
            tokens[None],
            attach(saes, compose(hooks, Hooks({read_point.hook: keep}))),
            logit_positions=torch.tensor([direction.position]),
        )
        return float(direction.read(model, saved[0][0]))
