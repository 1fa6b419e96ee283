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
    head h, every query (`h2.3`)       ATTN_Z[:, h]; a neuron (`n1.5`) MLP_POST[:, n]; a latent
                                       (`am1.42`) its latents[:, j]: the component everywhere
    a layer's MLP / attention (`m1`,   MLP_OUT[:] / ATTN_OUT[:]: everything the layer's MLP or
    `a1`)                              attention writes (output bias included)

Where a node type's activation lives is its spec's (`tdb.nodes.NODE_SPECS`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

import torch
from torch import Tensor

from tdb.errors import TdbError
from tdb.hooks import HookPoint, Hooks
from tdb.latents import attach, latent_sizes
from tdb.models.base import TransformerModel
from tdb.nodes import NodeIndex, Target, check_target, parse_target, target_entry, target_location
from tdb.sae import AttachedSae


class AblationKind(StrEnum):
    ZERO = "zero"
    MEAN = "mean"
    RESAMPLE = "resample"


@dataclass(frozen=True)
class Ablation:
    """`Ablation(parse_node_id("n1.5@3"), AblationKind.MEAN)`; `parse_ablation("h2.1:mean")`.

    `node` is one node, a component at every position (`ComponentIndex`: `h2.1`) or a layer's
    output (`LayerOutput`: `m1`, `a1`)."""

    node: Target
    kind: AblationKind = AblationKind.ZERO

    @property
    def location(self) -> tuple[HookPoint, int | None]:
        """The hook point (and layer) whose tensor holds what is ablated."""
        return target_location(self.node)

    def index(self) -> tuple[int | slice, ...]:
        """What is ablated, as an index into its location's tensor (batch dimension first)."""
        return target_entry(self.node)


def parse_ablation(text: str) -> Ablation:
    """`parse_ablation("h1.2@9:3:mean")`: a node, component (`h1.2`) or layer output (`m1`)
    id, optionally followed by `:zero`, `:mean` or `:resample`."""
    target_text, _, kind = text.rpartition(":")
    if kind in {k.value for k in AblationKind}:
        return Ablation(parse_target(target_text), AblationKind(kind))
    return Ablation(parse_target(text))


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
    """The mean of what is ablated over every position of the recorded prompts (for a head at
    one (query, key) pair: over every pair of the head with key <= query)."""
    node = ablation.node
    if isinstance(node, NodeIndex) and node.key_token is not None:
        pairs = [
            probs[node.index][torch.ones_like(probs[0], dtype=torch.bool).tril()]
            for probs in recorded
        ]  # [head query_pos key_pos] -> every (query, key) pair with key <= query
        return torch.cat(pairs).mean()
    per_position = (slice(None), *ablation.index()[2:])  # its entry, at every position
    return torch.cat([x[per_position] for x in recorded]).mean(dim=0)


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
        check_target(ablation.node, model.config, len(tokens), "--ablate", sizes)
    kinds = {a.kind for a in ablations}
    if AblationKind.RESAMPLE in kinds:
        if second_prompt is None:
            raise TdbError("resample ablation needs a second prompt (--second-prompt)")
        if len(second_prompt) != len(tokens):
            raise TdbError(
                f"resample ablation needs a second prompt of the same length: it has "
                f"{len(second_prompt)} tokens, the prompt {len(tokens)}"
            )
    sites = {a.location for a in ablations if a.kind is not AblationKind.ZERO}
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
            value = mean_value(ablation, means[ablation.location])
        else:
            value = resampled[ablation.location][0][index[1:]]
        replacements.setdefault(ablation.location, []).append((index, value))

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
