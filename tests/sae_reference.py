"""Random SAEs for the tests, and what their latents should be, from the naive model alone.

The reference encodes with its own code (TopK by sorting, not `torch.topk`), reads the site's
activation and gradient off the naive run (tests/reference.py), and builds each latent's write
vector explicitly: z_j * W_dec[j], through the MLP's output weights for an SAE on the MLP
post-activation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from reference import Reference
from transformers import GPT2LMHeadModel

from tdb.metrics import Group
from tdb.nodes import LatentSite, NodeIndex
from tdb.sae import AttachedSae, SparseAutoencoder


def random_sae(d_in: int, d_sae: int, k: int | None, seed: int) -> SparseAutoencoder:
    """An SAE with random weights on the scale of the test models' activations."""
    generator = torch.Generator().manual_seed(seed)
    sae = SparseAutoencoder(d_in, d_sae, k)
    with torch.no_grad():
        sae.pre_bias.normal_(0.0, 0.1, generator=generator)
        sae.W_enc.normal_(0.0, 1.0 / d_in**0.5, generator=generator)
        sae.latent_bias.normal_(0.0, 0.1, generator=generator)
        sae.W_dec.normal_(0.0, 1.0 / d_sae**0.5, generator=generator)
        sae.decoder_bias.normal_(0.0, 0.1, generator=generator)
    sae.requires_grad_(False)
    return sae


def saes_for_tests(d_model: int, d_mlp: int, layers: Sequence[int]) -> list[AttachedSae]:
    """One SAE per site on each of `layers`: TopK on the attention output and MLP output,
    ReLU on the MLP post-activation."""
    out = []
    for layer in layers:
        for i, (site, d_in, k) in enumerate(
            [
                (LatentSite.ATTN_OUT, d_model, 5),
                (LatentSite.MLP_POST, d_mlp, None),
                (LatentSite.MLP_OUT, d_model, 7),
            ]
        ):
            sae = random_sae(d_in, 24 + 4 * i, k, seed=10 * layer + i)
            out.append(AttachedSae(sae, site, layer, f"{site.value}.{layer}"))
    return out


def naive_encode(sae: SparseAutoencoder, x: torch.Tensor) -> torch.Tensor:
    """[pos d_sae] latents, computed without tdb's encoder."""
    pre = torch.einsum("si,pi->ps", sae.W_enc, x - sae.pre_bias) + sae.latent_bias
    if sae.k is None:
        return pre.clamp(min=0)
    kth = pre.sort(dim=-1, descending=True).values[:, sae.k - 1 : sae.k]
    return torch.where(pre >= kth, pre.clamp(min=0), torch.zeros_like(pre))


def site_tensors(ref: Reference, site: LatentSite, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The activation an SAE at `site` reads, and d(direction)/d(it), from the naive run."""
    if site is LatentSite.ATTN_OUT:
        return ref.attn_out[layer], ref.attn_out_grad[layer]
    if site is LatentSite.MLP_POST:
        return ref.post[layer], ref.post_grad[layer]
    return ref.mlp_out[layer], ref.mlp_out_grad[layer]


def write_direction(hf: GPT2LMHeadModel, attached: AttachedSae, latent: int) -> torch.Tensor:
    """What one unit of the latent writes into the residual stream, from HF's weights."""
    row = attached.sae.W_dec[latent]
    if attached.site is LatentSite.MLP_POST:
        return row @ hf.state_dict()[f"transformer.h.{attached.layer}.mlp.c_proj.weight"]
    return row


def latent_reference(
    ref: Reference,
    hf: GPT2LMHeadModel,
    saes: Sequence[AttachedSae],
    node: NodeIndex,
    position: int,
) -> dict[Group, float]:
    """The four metrics of one latent node."""
    attached = next(a for a in saes if (a.site, a.layer) == (node.site, node.layer))
    x, grad = site_tensors(ref, attached.site, attached.layer)
    z = naive_encode(attached.sae, x)[node.token, node.index]
    write = z * write_direction(hf, attached, node.index)
    grad_z = attached.sae.W_dec[node.index] @ grad[node.token]  # chain rule by hand
    return {
        Group.ACTIVATION: float(z),
        Group.WRITE_NORM: float(write.norm()),
        Group.DIRECT_EFFECT: float(ref.contribution(write)) if node.token == position else 0.0,
        Group.ACT_TIMES_GRAD: float(z * grad_z),
    }
