"""The components task-level attribution scores, and where their activations live.

A component is an attention head (its output `ATTN_Z[:, :, head]` at every position), an MLP
neuron (`MLP_POST[:, :, neuron]`) or an SAE latent (its SAE's latents at every position). A
`Site` is one hook point of one layer whose component axis (axis 2) indexes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from jaxtyping import Float
from torch import Tensor

from tdb.hooks import HookPoint
from tdb.models.base import ModelConfig
from tdb.nodes import ComponentIndex, LatentSite, NodeType
from tdb.sae import AttachedSae


class ComponentKind(StrEnum):
    HEADS = "heads"
    NEURONS = "neurons"
    LATENTS = "latents"


NODE_TYPES = {
    ComponentKind.HEADS: NodeType.ATTENTION_HEAD,
    ComponentKind.NEURONS: NodeType.MLP_NEURON,
    ComponentKind.LATENTS: NodeType.AUTOENCODER_LATENT,
}

Key = tuple[HookPoint, int]


@dataclass(frozen=True)
class Site:
    """The components of one kind at one hook point of one layer."""

    kind: ComponentKind
    point: HookPoint
    layer: int
    size: int
    latent: LatentSite | None = None

    @property
    def key(self) -> Key:
        return self.point, self.layer

    def component(self, index: int) -> ComponentIndex:
        return ComponentIndex(NODE_TYPES[self.kind], self.layer, index, self.latent)


def sites(
    config: ModelConfig, kinds: Sequence[ComponentKind], saes: Sequence[AttachedSae]
) -> list[Site]:
    """Every site of the requested kinds, in forward-pass order within each kind."""
    out: list[Site] = []
    for kind in kinds:
        if kind is ComponentKind.HEADS:
            out += [Site(kind, HookPoint.ATTN_Z, i, config.n_head) for i in range(config.n_layer)]
        elif kind is ComponentKind.NEURONS:
            out += [Site(kind, HookPoint.MLP_POST, i, config.d_mlp) for i in range(config.n_layer)]
        else:
            for a in saes:
                out.append(Site(kind, a.site.latent_point, a.layer, a.sae.d_sae, a.site))
    return out


def per_component(x: Float[Tensor, "batch pos comp *rest"]) -> Float[Tensor, "batch pos comp"]:
    """A site's tensor reduced to one number per (prompt, position, component): heads' d_head
    axis summed (for products such as (a - a_ref) * gradient)."""
    return x.sum(dim=-1) if x.ndim == 4 else x
