"""Component sources: what a scan ranks, as per-token activations [batch pos component].

    >>> sources = model_sources(model)  # MLP neurons and attention heads of every layer
    >>> acts: dict[str, Tensor] = {}
    >>> model(tokens, hooks=source_hooks(sources, acts))
    >>> acts["mlp_neuron.0"].shape  # [batch pos d_mlp]

A source names the hook points of one layer it reads and turns them into one value per token and
component. Two come with every model:

- **MLP neuron**: its post-activation (`metrics.neuron_activation`).
- **Attention head**: its write magnitude p · ‖v[key, head] W_O[head]‖ for each (query, key) pair
  (`metrics.head_write_norm`, the node table's definition), then the maximum over keys, attributed
  to the query token: the value at token t is the largest write the head made *into* t. A head
  that copies one earlier token strongly into t therefore lights up t, not the earlier token.

- **SAE latent** (`latent_sources`, when the scan attaches SAEs): its activation z, read at the
  latent hook point of its SAE's site (the SAE runs inside the forward pass, `tdb.latents.attach`).
  A latent source also names its site (`attn_out`, `mlp_post`, `mlp_out`), since one layer can
  have an SAE at each.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from tdb.hooks import HookFn, HookPoint, Hooks
from tdb.latents import LATENT_POINTS
from tdb.metrics import MlpInputs, ReadOut, key_terms, neuron_activation
from tdb.models.base import TransformerModel
from tdb.nodes import LatentSite, NodeType
from tdb.sae import AttachedSae

# The scan reads no direction, so the metrics' read-out is empty.
NO_READ_OUT = ReadOut(positions=(), g=torch.zeros(0, 0))

Compute = Callable[[Mapping[HookPoint, Tensor]], Float[Tensor, "batch pos component"]]


@dataclass(frozen=True)
class ComponentSource:
    """One layer's worth of components of one node type, read from `points` of that layer."""

    node_type: NodeType
    layer: int
    n_components: int
    points: tuple[HookPoint, ...]
    compute: Compute
    site: LatentSite | None = None  # SAE latents: the activation their SAE reads

    @property
    def name(self) -> str:
        if self.site is None:
            return f"{self.node_type}.{self.layer}"
        return f"{self.node_type}.{self.site}.{self.layer}"


def neuron_source(model: TransformerModel, layer: int) -> ComponentSource:
    W_out = model.block(layer).mlp.W_out

    def compute(captured: Mapping[HookPoint, Tensor]) -> Tensor:
        post = captured[HookPoint.MLP_POST]  # [batch pos d_mlp]
        batch, n_pos, _ = post.shape
        # The metric reads one prompt's [pos d_mlp]: the batch's positions laid end to end.
        flat = post.reshape(batch * n_pos, -1)  # [batch*pos d_mlp]
        inputs = MlpInputs(post=flat, grad_post=None, W_out=W_out, read=NO_READ_OUT)
        return neuron_activation(inputs).reshape(batch, n_pos, -1)  # [batch pos d_mlp]

    return ComponentSource(
        NodeType.MLP_NEURON, layer, model.config.d_mlp, (HookPoint.MLP_POST,), compute
    )


def head_source(model: TransformerModel, layer: int) -> ComponentSource:
    W_O = model.block(layer).attn.W_O

    def compute(captured: Mapping[HookPoint, Tensor]) -> Tensor:
        probs = captured[HookPoint.ATTN_PROBS]  # [batch head query_pos key_pos]
        v = captured[HookPoint.V]  # [batch pos head d_head]
        batch, n_head, n_pos, _ = probs.shape
        # `head_write_norm` for the whole batch: p times the key's factor ‖v[key, head] W_O[head]‖
        # (`key_terms`, computed once for the batch's keys laid end to end), laid out per row.
        norms = key_terms(v.reshape(batch * n_pos, n_head, -1), W_O, NO_READ_OUT).write_norm
        # Contiguous: a product broadcasting a permuted view is 5x slower on the CPU.
        per_key = norms.reshape(batch, n_pos, n_head).permute(0, 2, 1).contiguous()[:, :, None]
        writes = probs.float() * per_key  # [batch head query_pos key_pos]
        return writes.amax(dim=-1).permute(0, 2, 1)  # [batch query_pos head]: max over keys

    return ComponentSource(
        NodeType.ATTENTION_HEAD,
        layer,
        model.config.n_head,
        (HookPoint.V, HookPoint.ATTN_PROBS),
        compute,
    )


def scan_sources(
    model: TransformerModel, sae_paths: tuple[str, ...]
) -> tuple[list[ComponentSource], list[AttachedSae]]:
    """The model's neurons and heads plus the latents of the SAEs at `sae_paths`, and those SAEs
    (to attach in the forward pass)."""
    from tdb.latents import check_saes, place_saes
    from tdb.sae import load_saes

    saes = [a for path in sae_paths for a in load_saes(path)]
    check_saes(saes, model.config)
    place_saes(saes, model)
    return model_sources(model) + latent_sources(saes), saes


def model_sources(model: TransformerModel) -> list[ComponentSource]:
    """The MLP neurons and attention heads of every layer, layer by layer."""
    out = []
    for layer in range(model.config.n_layer):
        out += [head_source(model, layer), neuron_source(model, layer)]
    return out


def latent_sources(saes: list[AttachedSae]) -> list[ComponentSource]:
    """One source per attached SAE: its latents' activations z."""
    out = []
    for attached in saes:
        point = LATENT_POINTS[attached.site]

        def compute(captured: Mapping[HookPoint, Tensor], point: HookPoint = point) -> Tensor:
            return captured[point]  # [batch pos d_sae]

        out.append(
            ComponentSource(
                NodeType.AUTOENCODER_LATENT,
                attached.layer,
                attached.sae.d_sae,
                (point,),
                compute,
                attached.site,
            )
        )
    return out


def source_hooks(sources: list[ComponentSource], out: dict[str, Tensor]) -> Hooks:
    """Hooks that fill `out[source.name]` with each source's activations during one forward pass.

    A layer's captured tensors are dropped as soon as every source of that layer has computed,
    so at most one layer's attention probabilities are alive at a time.
    """
    pending: dict[int | None, dict[HookPoint, Tensor]] = {}
    by_layer: dict[int, list[ComponentSource]] = {}
    for source in sources:
        by_layer.setdefault(source.layer, []).append(source)

    def capture(point: HookPoint) -> HookFn:
        def hook(x: Tensor, layer: int | None) -> None:
            if layer is None or layer not in by_layer:
                return
            captured = pending.setdefault(layer, {})
            captured[point] = x
            waiting = [s for s in by_layer[layer] if s.name not in out]
            for source in waiting:
                if all(p in captured for p in source.points):
                    out[source.name] = source.compute(captured)
            if all(s.name in out for s in by_layer[layer]):
                pending.pop(layer, None)

        return hook

    points = {p for s in sources for p in s.points}
    return Hooks({p: capture(p) for p in points})
