"""Ablations: replace nodes' activations and run again.

    zero      the activation becomes 0
    mean      the mean over the prompt's positions (or over reference prompts' positions)
    resample  the node's activation on a second prompt of the same length

Where each node is replaced:

    MLP neuron n at t                  MLP_POST[t, n]
    head h at (q, k)                   ATTN_PROBS[h, q, k] only: the rest of the row untouched,
                                       not renormalised; mean = the head's mean over (q, k) pairs
    head h at q, all keys (`h2.3@7`)   ATTN_Z[q, h] (the head's output at q, before W_O)
    embedding at t                     RESID_EMBED[t] (token + position embedding)
    SAE latent j at t                  *_LATENTS[t, j], the latents of the SAE attached at its
                                       site (tdb.latents): the site then holds the SAE's
                                       reconstruction of the edited latents plus the original
                                       reconstruction error. Pass the SAEs (`saes=`) and run
                                       the model with `attach(saes, hooks)`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

import torch
from torch import Tensor

from tdb.errors import TdbError
from tdb.hooks import HookPoint, Hooks
from tdb.latents import LATENT_POINTS, attach, latent_sizes
from tdb.models.base import TransformerModel
from tdb.nodes import NodeIndex, NodeType, check_node, parse_node_id
from tdb.sae import AttachedSae


class AblationKind(StrEnum):
    ZERO = "zero"
    MEAN = "mean"
    RESAMPLE = "resample"


@dataclass(frozen=True)
class Ablation:
    """`Ablation(parse_node_id("n1.5@3"), AblationKind.MEAN)`."""

    node: NodeIndex
    kind: AblationKind = AblationKind.ZERO

    @property
    def site(self) -> tuple[HookPoint, int | None]:
        """The hook point (and layer) whose tensor holds this node's activation."""
        node = self.node
        if node.node_type is NodeType.MLP_NEURON:
            return HookPoint.MLP_POST, node.layer
        if node.node_type is NodeType.ATTENTION_HEAD:
            point = HookPoint.ATTN_Z if node.key_token is None else HookPoint.ATTN_PROBS
            return point, node.layer
        if node.node_type is NodeType.EMBEDDING:
            return HookPoint.RESID_EMBED, None
        if node.node_type is NodeType.AUTOENCODER_LATENT and node.site is not None:
            return LATENT_POINTS[node.site], node.layer
        raise TdbError(f"cannot ablate {node.id}: {node.node_type.value} nodes are not supported")

    def index(self) -> tuple[int | slice, ...]:
        """This node's entry in its site's tensor (batch dimension first)."""
        n = self.node
        if n.node_type in (NodeType.MLP_NEURON, NodeType.AUTOENCODER_LATENT):
            return (0, n.token, n.index)  # [batch pos d_mlp] or [batch pos d_sae]
        if n.node_type is NodeType.ATTENTION_HEAD and n.key_token is None:
            return (0, n.token, n.index)  # ATTN_Z [batch pos head d_head]
        if n.node_type is NodeType.ATTENTION_HEAD:
            assert n.key_token is not None
            return (0, n.index, n.token, n.key_token)  # ATTN_PROBS [batch head query key]
        return (0, n.token)  # RESID_EMBED [batch pos d_model]


def parse_ablation(text: str) -> Ablation:
    """`parse_ablation("h1.2@9:3:mean")`: a node id, optionally `:zero`, `:mean` or `:resample`."""
    node_text, _, kind = text.rpartition(":")
    if kind in {k.value for k in AblationKind}:
        return Ablation(parse_node_id(node_text), AblationKind(kind))
    return Ablation(parse_node_id(text))


def record(
    model: TransformerModel,
    prompts: Sequence[Sequence[int]],
    sites: set[tuple[HookPoint, int | None]],
    saes: Sequence[AttachedSae] = (),
) -> dict[tuple[HookPoint, int | None], list[Tensor]]:
    """The tensors at `sites` on each prompt (forward passes without gradients; `saes`
    attached, so latent points can be recorded)."""
    out: dict[tuple[HookPoint, int | None], list[Tensor]] = {site: [] for site in sites}
    points = {point for point, _ in sites}

    def keep(point: HookPoint) -> Callable[[Tensor, int | None], None]:
        def hook(x: Tensor, layer: int | None) -> None:
            if (point, layer) in out:
                out[(point, layer)].append(x.detach()[0])

        return hook

    with torch.no_grad():
        for tokens in prompts:
            model(
                torch.tensor([list(tokens)]),
                attach(saes, Hooks({p: keep(p) for p in points})),
                logit_positions=torch.tensor([len(tokens) - 1]),
            )
    return out


def mean_value(ablation: Ablation, recorded: list[Tensor]) -> Tensor:
    """The mean of the node's activation over every position of the recorded prompts."""
    node = ablation.node
    if node.node_type in (NodeType.MLP_NEURON, NodeType.AUTOENCODER_LATENT):
        return torch.cat([post[:, node.index] for post in recorded]).mean()
    if node.node_type is NodeType.ATTENTION_HEAD and node.key_token is None:
        return torch.cat([z[:, node.index] for z in recorded]).mean(dim=0)  # [d_head]
    if node.node_type is NodeType.ATTENTION_HEAD:
        pairs = [
            probs[node.index][torch.ones_like(probs[0], dtype=torch.bool).tril()]
            for probs in recorded
        ]  # every (query, key) pair with key <= query
        return torch.cat(pairs).mean()
    return torch.cat(recorded).mean(dim=0)  # [d_model]


def ablation_hooks(
    model: TransformerModel,
    tokens: Sequence[int],
    ablations: Sequence[Ablation],
    second_prompt: Sequence[int] | None = None,
    mean_prompts: Sequence[Sequence[int]] = (),
    saes: Sequence[AttachedSae] = (),
) -> Hooks:
    """Hooks that apply every ablation at once (latents: of the SAEs in `saes`, which the
    forward pass must attach).

    >>> hooks = ablation_hooks(model, tokens, [parse_ablation("h1.2@9:3")])
    >>> model(torch.tensor([tokens]), hooks)
    """
    sizes = latent_sizes(saes)
    for ablation in ablations:
        check_node(ablation.node, model.config, len(tokens), "--ablate", sizes)
        ablation.site  # noqa: B018  (raises for node types that cannot be ablated)
    kinds = {a.kind for a in ablations}
    if AblationKind.RESAMPLE in kinds:
        if second_prompt is None:
            raise TdbError("resample ablation needs a second prompt (--second-prompt)")
        if len(second_prompt) != len(tokens):
            raise TdbError(
                f"resample ablation needs a second prompt of the same length: it has "
                f"{len(second_prompt)} tokens, the prompt {len(tokens)}"
            )
    sites = {a.site for a in ablations if a.kind is not AblationKind.ZERO}
    means = (
        record(model, mean_prompts or [tokens], sites, saes) if AblationKind.MEAN in kinds else {}
    )
    resampled = (
        record(model, [second_prompt or []], sites, saes) if AblationKind.RESAMPLE in kinds else {}
    )

    replacements: dict[
        tuple[HookPoint, int | None], list[tuple[tuple[int | slice, ...], Tensor]]
    ] = {}
    for ablation in ablations:
        index = ablation.index()
        if ablation.kind is AblationKind.ZERO:
            value = torch.zeros(())
        elif ablation.kind is AblationKind.MEAN:
            value = mean_value(ablation, means[ablation.site])
        else:
            value = resampled[ablation.site][0][index[1:]]
        replacements.setdefault(ablation.site, []).append((index, value))

    def replace(point: HookPoint) -> Callable[[Tensor, int | None], Tensor | None]:
        def hook(x: Tensor, layer: int | None) -> Tensor | None:
            todo = replacements.get((point, layer))
            if not todo:
                return None
            x = x.clone()  # out of place, so autograd still sees every other entry
            for index, value in todo:
                x[index] = value
            return x

        return hook

    return Hooks({point: replace(point) for point, _ in replacements})
