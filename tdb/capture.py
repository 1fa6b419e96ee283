"""One forward and one backward pass, turned into a store of derived scalars.

The forward pass saves, per layer, only what the metrics read (attention probabilities and
values, MLP post-activations, the embedding). If a requested metric needs gradients, one backward
pass from the direction follows, with the final layer norm's scale held fixed and no parameter
gradients; a gradient hook on each layer's probabilities and post-activations computes that
layer's metrics as soon as its gradient exists and drops the saved tensors. With `prune_k`, each
layer keeps only its own top k (and bottom k for signed metrics) per metric, so memory stays
bounded however long the prompt: the global top k is always among the layers' top k.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tdb.direction import Direction
from tdb.hooks import HookPoint, Hooks
from tdb.metrics import (
    METRICS,
    NEEDS_GRADIENT,
    SIGNED_GROUPS,
    AttentionInputs,
    EmbeddingInputs,
    Group,
    MlpInputs,
    node_mask,
)
from tdb.model import GPT2
from tdb.nodes import NodeType
from tdb.store import GridBlock, ListBlock, NodeBlock, ScalarStore, grid_coords, ranked

NODE_TYPES = (NodeType.EMBEDDING, NodeType.ATTENTION_HEAD, NodeType.MLP_NEURON)


@dataclass(frozen=True)
class Capture:
    """What one forward (+ backward) pass left: the store, and the direction's value."""

    store: ScalarStore
    direction_value: float
    logits: Float[Tensor, " d_vocab"]  # at the direction's position


@dataclass
class LayeredBlockBuilder:
    """Collects one node type's metric grids layer by layer; keeps them whole or prunes each."""

    node_type: NodeType
    groups: Sequence[Group]
    prune_k: int | None
    layers: dict[int, dict[Group, Tensor]] = field(default_factory=dict)
    kept: dict[int, Tensor] = field(default_factory=dict)  # per layer, when pruning
    layer_shape: tuple[int, ...] = ()
    nodes: Tensor | None = None  # [layer grid, flat] True where an entry is a node (None: all)

    def add(self, layer: int, grids: dict[Group, Tensor]) -> None:
        if not self.layer_shape:
            self.layer_shape = tuple(grids[self.groups[0]].shape)
            mask = node_mask(self.node_type, self.layer_shape)
            self.nodes = None if mask is None else mask.flatten()
        flat = {g: v.flatten() for g, v in grids.items()}
        if self.prune_k is None:  # keep the whole grid; entries that are not nodes become NaN
            if self.nodes is not None:
                flat = {g: v.masked_fill(~self.nodes, math.nan) for g, v in flat.items()}
            self.layers[layer] = flat
            return
        keep = [ranked(flat[g], self.prune_k, valid=self.nodes) for g in self.groups]
        keep += [
            ranked(flat[g], self.prune_k, largest=False, valid=self.nodes)
            for g in self.signed_groups
        ]
        kept = torch.unique(torch.cat(keep))  # ascending, so grid order within the layer
        self.kept[layer] = kept
        self.layers[layer] = {g: v[kept] for g, v in flat.items()}

    @property
    def signed_groups(self) -> list[Group]:
        return [g for g in self.groups if g in SIGNED_GROUPS]

    def build(self) -> NodeBlock:
        layers = sorted(self.layers)
        values = {g: torch.cat([self.layers[layer][g] for layer in layers]) for g in self.groups}
        shape = (len(layers), *self.layer_shape)
        if self.prune_k is None:
            return GridBlock(self.node_type, shape, values)
        layer_size = math.prod(self.layer_shape)
        flat = torch.cat([self.kept[layer] + layer * layer_size for layer in layers])
        coords = grid_coords(self.node_type, shape, flat)
        return ListBlock(self.node_type, coords, values, pruned_k=self.prune_k)


def final_gradient(
    model: GPT2, direction: Direction, resid_final: Float[Tensor, " d_model"]
) -> Float[Tensor, " d_model"]:
    """g: d(direction)/d(final residual) at the direction's position, final LN scale fixed."""
    frozen = Hooks({HookPoint.LN_FINAL_SCALE: lambda scale, _: scale.detach()})
    x = resid_final.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        value = direction.value(model.ln_f(x[None, None], frozen)[0, 0] @ model.unembed)
        (g,) = torch.autograd.grad(value, x)
    return g


def capture(
    model: GPT2,
    tokens: Int[Tensor, " pos"],
    direction: Direction,
    groups: Sequence[Group],
    prune_k: int | None = None,
) -> Capture:
    """Run the model once (forward, and backward if needed) and derive every metric in `groups`.

    >>> cap = capture(model, torch.tensor([5, 9, 2]), LogitDiff((7,), (8,), 2), ALL_GROUPS)
    >>> cap.store.topk(Group.DIRECT_EFFECT, NodeType.MLP_NEURON, 5)
    """
    groups = list(dict.fromkeys(groups))
    needs_grad = any(g in NEEDS_GRADIENT for g in groups)
    n_pos, position = len(tokens), direction.position
    n_layers = model.config.n_layer
    builders = {
        t: LayeredBlockBuilder(t, groups, prune_k)
        for t in (NodeType.ATTENTION_HEAD, NodeType.MLP_NEURON)
    }
    saved: dict[tuple[HookPoint, int | None], Tensor] = {}
    g_holder: list[Tensor] = []  # g is known only once the forward pass has ended

    def derive(node_type: NodeType, inputs: object, layer: int) -> None:
        with torch.no_grad():
            grids = {group: METRICS[(node_type, group)](inputs) for group in groups}
        builders[node_type].add(layer, grids)

    def finish_attention(layer: int, grad_probs: Tensor | None) -> None:
        probs = saved.pop((HookPoint.ATTN_PROBS, layer))[0].detach()
        v = saved.pop((HookPoint.V, layer))[0].detach()
        W_O = model.block(layer).attn.W_O.detach()
        grad = None if grad_probs is None else grad_probs[0]
        inputs = AttentionInputs(probs, grad, v, W_O, g_holder[0], position)
        derive(NodeType.ATTENTION_HEAD, inputs, layer)

    def finish_mlp(layer: int, grad_post: Tensor | None) -> None:
        post = saved.pop((HookPoint.MLP_POST, layer))[0].detach()
        W_out = model.block(layer).mlp.W_out.detach()
        grad = None if grad_post is None else grad_post[0]
        derive(NodeType.MLP_NEURON, MlpInputs(post, grad, W_out, g_holder[0], position), layer)

    finishers: dict[HookPoint, Callable[[int, Tensor | None], None]] = {
        HookPoint.ATTN_PROBS: finish_attention,
        HookPoint.MLP_POST: finish_mlp,
    }

    def save(point: HookPoint) -> Callable[[Tensor, int | None], None]:
        def hook(x: Tensor, layer: int | None) -> None:
            saved[(point, layer)] = x
            if needs_grad and point in finishers and layer is not None:
                finish = finishers[point]
                # Called once, in the backward pass, with d(direction)/dx; the tensor and this
                # hook die with the graph, so nothing outlives the call. (torch leaves it untyped.)
                x.register_hook(lambda grad: finish(layer, grad))  # type: ignore[no-untyped-call]

        return hook

    def embed_leaf(x: Tensor, layer: int | None) -> Tensor:
        # The backward pass starts here: parameters stay out of it, so none get gradients.
        leaf = x.detach().requires_grad_(needs_grad)
        saved[(HookPoint.RESID_EMBED, None)] = leaf
        return leaf

    hooks = Hooks(
        {
            HookPoint.RESID_EMBED: embed_leaf,
            HookPoint.V: save(HookPoint.V),
            HookPoint.ATTN_PROBS: save(HookPoint.ATTN_PROBS),
            HookPoint.MLP_POST: save(HookPoint.MLP_POST),
            HookPoint.RESID_FINAL: save(HookPoint.RESID_FINAL),
            HookPoint.LN_FINAL_SCALE: lambda scale, _: scale.detach(),
        }
    )
    with torch.set_grad_enabled(needs_grad):
        logits = model(tokens[None], hooks, logit_positions=torch.tensor([position]))[0, 0]
        value = direction.value(logits)
    resid_final = saved.pop((HookPoint.RESID_FINAL, None))[0, position]
    g_holder.append(final_gradient(model, direction, resid_final))
    resid = saved.pop((HookPoint.RESID_EMBED, None))
    grad_resid = torch.autograd.grad(value, resid)[0][0] if needs_grad else None
    # Layers the direction does not depend on fired no gradient hook: their gradient is zero.
    for point, layer in [key for key in saved if key[0] in finishers]:
        assert layer is not None
        grad = torch.zeros_like(saved[(point, layer)]) if needs_grad else None
        finishers[point](layer, grad)
    embedding = EmbeddingInputs(resid[0].detach(), grad_resid, g_holder[0], position)
    with torch.no_grad():
        embedding_values = {
            g: METRICS[(NodeType.EMBEDDING, g)](embedding).flatten() for g in groups
        }
    blocks: dict[NodeType, NodeBlock] = {
        NodeType.EMBEDDING: GridBlock(NodeType.EMBEDDING, (n_pos,), embedding_values),
        NodeType.ATTENTION_HEAD: builders[NodeType.ATTENTION_HEAD].build(),
        NodeType.MLP_NEURON: builders[NodeType.MLP_NEURON].build(),
    }
    assert all(len(b.layers) == n_layers for b in builders.values())
    return Capture(ScalarStore(blocks), float(value.detach()), logits.detach())
