"""One component's activation at every token of a prompt, exactly as the scan defines it, so the
component page's heatmap of the current prompt reads on the same scale as its dataset examples.

    >>> values = component_activations(loaded.model, [], ComponentIndex(NodeType.MLP_NEURON, 1, 7),
    ...                                loaded.tokenizer.encode("When Mary and John"))
    >>> values  # [pos]: neuron 7's post-activation at each token

The value per token comes from the component's `tdb.scan.sources` source: a neuron's
post-activation, a latent's z, and for a head the largest write p · ‖v[key] W_O‖ it makes into the
token over every key (so a head that copies an earlier token lights up the token it writes
into). The prompt runs alone, from position 0, with no left context.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from tdb.errors import TdbError
from tdb.latents import attach
from tdb.models.base import TransformerModel
from tdb.nodes import ComponentIndex, NodeType
from tdb.sae import AttachedSae
from tdb.scan.shard import NO_LOGITS
from tdb.scan.sources import (
    ComponentSource,
    head_source,
    latent_sources,
    neuron_source,
    source_hooks,
)

# What a head's value at a token is, for a person (the page and the API say it).
MEANING = {
    NodeType.MLP_NEURON: "the neuron's post-activation at each token",
    NodeType.ATTENTION_HEAD: "the head's largest write p·‖v W_O‖ into each query token, over its "
    "keys (the scan's definition); the key it writes most from is `top_keys`",
    NodeType.AUTOENCODER_LATENT: "the latent's activation z at each token",
}


def component_source(
    model: TransformerModel, saes: list[AttachedSae], component: ComponentIndex
) -> ComponentSource:
    """The scan's source of the component's layer (a TdbError if the model has no such one)."""
    config = model.config
    kind = component.node_type
    if kind is NodeType.EMBEDDING:
        raise TdbError("embeddings are not components: give a head, neuron or latent id")
    if not 0 <= component.layer < config.n_layer:
        raise TdbError(f"{component.id}: layer must be in 0..{config.n_layer - 1}")
    if kind is NodeType.MLP_NEURON:
        source, size = neuron_source(model, component.layer), config.d_mlp
    elif kind is NodeType.ATTENTION_HEAD:
        source, size = head_source(model, component.layer), config.n_head
    else:
        found = [
            s
            for s in latent_sources(saes)
            if s.layer == component.layer and s.site == component.site
        ]
        if not found:
            raise TdbError(
                f"{component.id}: the scan has no SAE at {component.site} of layer "
                f"{component.layer}"
            )
        source, size = found[0], found[0].n_components
    if not 0 <= component.index < size:
        raise TdbError(f"{component.id}: index must be in 0..{size - 1}")
    return source


def component_activations(
    model: TransformerModel,
    saes: list[AttachedSae],
    component: ComponentIndex,
    tokens: list[int],
) -> Float[Tensor, " pos"]:
    """The component's value at each token of one prompt (see the module docstring)."""
    source = component_source(model, saes, component)
    acts: dict[str, Tensor] = {}
    with torch.inference_mode():
        hooks = attach(saes, source_hooks([source], acts))
        model(torch.tensor([tokens]), hooks=hooks, logit_positions=NO_LOGITS)
    return acts[source.name][0, :, component.index].float()  # [pos]


def head_top_keys(
    model: TransformerModel, component: ComponentIndex, tokens: list[int]
) -> list[int]:
    """Per query token, the key a head writes most from (p · ‖v[key] W_O‖ largest)."""
    from tdb.hooks import HookFn, HookPoint, Hooks
    from tdb.metrics import AttentionInputs, head_write_norm
    from tdb.scan.sources import NO_READ_OUT

    captured: dict[HookPoint, Tensor] = {}

    def keep(point: HookPoint) -> HookFn:
        def hook(x: Tensor, layer: int | None) -> None:
            if layer == component.layer:
                captured[point] = x

        return hook

    with torch.inference_mode():
        hooks = Hooks({p: keep(p) for p in (HookPoint.V, HookPoint.ATTN_PROBS)})
        model(torch.tensor([tokens]), hooks=hooks, logit_positions=NO_LOGITS)
        inputs = AttentionInputs(
            probs=captured[HookPoint.ATTN_PROBS][0],  # [head query_pos key_pos]
            grad_probs=None,
            v=captured[HookPoint.V][0],  # [pos head d_head]
            W_O=model.block(component.layer).attn.W_O,
            read=NO_READ_OUT,
        )
        writes = head_write_norm(inputs)[component.index]  # [query_pos key_pos]
    return [int(k) for k in writes.argmax(dim=-1)]
