"""Sparse autoencoders attached inside the forward pass, so their latents are nodes.

    >>> saes = load_saes("tdb/demo/sae")                 # AttachedSae per (site, layer)
    >>> hooks = attach(saes, Hooks({HookPoint.MLP_OUT_LATENTS: fn}))
    >>> logits = model(tokens, hooks)                   # fn sees each MLP SAE's latents z

At a site (attention output, MLP post-activation or MLP output of one layer) with an SAE, the
site's activation x becomes

    x + decode(z') - decode(z_ref)         with z = encode(x), z' = the latent hooks' result on z,
                                           z_ref = encode(x) computed a second time

that is, the SAE's reconstruction of (possibly edited) latents plus the reconstruction error
x - decode(z_ref) added back. Until a hook edits the latents the two decodes are the same
numbers, so the model's output is unchanged to the bit. The gradient reaches z (d/dz = the
decoder, which is what activation x gradient of a latent needs), while the paths from x through
z and through z_ref cancel, so every other node's gradient is the model's own, not the SAE's
approximation. Editing z (ablating a latent) changes the site by exactly decode(z') - decode(z).

`resolve_saes` decides which SAEs a node table attaches and which node types it shows (the demo
model's own SAEs when latents are asked for and none are given).

A latent's write vector into the residual stream: z_j * W_dec[j] for SAEs on the attention or
MLP output; z_j * (W_dec[j] @ W_out) for SAEs on the MLP post-activation, whose decoder rows
live in the MLP's hidden space.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from jaxtyping import Float
from torch import Tensor

from tdb.checkpoint import DEMO_MODEL_DIR, LoadedModel
from tdb.errors import TdbError
from tdb.hooks import HookFn, Hooks
from tdb.models.base import ModelConfig, TransformerModel
from tdb.nodes import LatentSite, NodeType
from tdb.sae import AttachedSae, load_saes

SITE_POINTS = {site: site.point for site in LatentSite}
LATENT_POINTS = {site: site.latent_point for site in LatentSite}
SITE_OF_LATENT_POINT = {point: site for site, point in LATENT_POINTS.items()}


def place_saes(saes: Sequence[AttachedSae], model: TransformerModel) -> None:
    """Move each SAE (in place) to its layer's device and the model's dtype, so it runs on
    the activations where the forward pass has them."""
    for attached in saes:
        W_O = model.block(attached.layer).attn.W_O
        attached.sae.to(device=W_O.device, dtype=model.unembed.dtype)


def check_saes(
    saes: Sequence[AttachedSae], config: ModelConfig
) -> dict[tuple[LatentSite, int], AttachedSae]:
    """The SAEs by (site, layer), after checking each fits the model; at most one per site."""
    out: dict[tuple[LatentSite, int], AttachedSae] = {}
    for attached in saes:
        where = f"SAE {attached.name} ({attached.site.value}, layer {attached.layer})"
        if not 0 <= attached.layer < config.n_layer:
            raise TdbError(f"{where}: layer outside the model's 0..{config.n_layer - 1}")
        d_in = config.d_mlp if attached.site is LatentSite.MLP_POST else config.d_model
        if attached.sae.d_in != d_in:
            raise TdbError(f"{where}: reads {attached.sae.d_in} numbers, the site has {d_in}")
        if attached.key in out:
            raise TdbError(f"{where}: two SAEs on one site; attach one per site and layer")
        out[attached.key] = attached
    return out


def latent_sizes(saes: Sequence[AttachedSae]) -> dict[tuple[LatentSite, int], int]:
    return {a.key: a.sae.d_sae for a in saes}


def ordered(saes: Sequence[AttachedSae]) -> list[AttachedSae]:
    """Forward-pass order: by layer, then attention output, MLP post-activation, MLP output."""
    sites = list(LatentSite)
    return sorted(saes, key=lambda a: (a.layer, sites.index(a.site)))


def attach(saes: Sequence[AttachedSae], hooks: Hooks) -> Hooks:
    """`hooks`, plus the SAEs run at their sites; hooks at the latent points (`*_LATENTS`) see
    and may replace each SAE's latents [batch pos d_sae]. See the module docstring.

    >>> model(tokens, attach(saes, compose(ablation_hooks, capture_hooks)))
    """
    if not saes:
        return hooks
    fns = dict(hooks.fns)
    for site in LatentSite:
        per_layer = {a.layer: a for a in saes if a.site is site}
        if per_layer:
            fns[SITE_POINTS[site]] = site_hook(site, per_layer, hooks)
    return Hooks(fns, hooks.layer)


def site_hook(site: LatentSite, per_layer: Mapping[int, AttachedSae], hooks: Hooks) -> HookFn:
    point, latent_point = SITE_POINTS[site], LATENT_POINTS[site]

    def hook(x: Tensor, layer: int | None) -> Tensor:
        bound = hooks.at_layer(layer)
        x = bound(point, x)  # the site's own hooks first (e.g. neuron ablations at MLP_POST)
        attached = None if layer is None else per_layer.get(layer)
        if attached is None or latent_point not in hooks.fns:
            return x  # nobody reads or edits these latents: the SAE need not run
        sae = attached.sae
        z = bound(latent_point, sae.encode(x))
        return x + (sae.decode(z) - sae.decode(sae.encode(x)))

    return hook


def write_directions(
    model: TransformerModel, attached: AttachedSae
) -> Float[Tensor, "d_sae d_model"]:
    """Per latent, what one unit of it writes into the residual stream."""
    W_dec = attached.sae.W_dec
    if attached.site is LatentSite.MLP_POST:
        return W_dec @ model.block(attached.layer).mlp.W_out.detach()
    return W_dec


MLP_NODE_CHOICES = ("neurons", "latents", "both")
ATTN_NODE_CHOICES = ("heads", "latents", "both")
DEMO_SAE_DIR = DEMO_MODEL_DIR.parent / "sae"


def is_demo_model(path: Path) -> bool:
    """Whether the checkpoint at `path` is the built-in demo model (whose SAEs ship with it)."""
    return path.resolve() == DEMO_MODEL_DIR.resolve()


def resolve_saes(
    loaded: LoadedModel,
    saes: Sequence[AttachedSae | str | Path],
    mlp_nodes: str = "neurons",
    attn_nodes: str = "heads",
) -> tuple[list[AttachedSae], set[NodeType]]:
    """The SAEs to attach and the node types to show.

    Latents of every SAE given are nodes (next to neurons and heads). `mlp_nodes="latents"`
    shows MLP latents instead of neurons, `"both"` both; `attn_nodes` likewise for heads. Asking
    for latents of a kind no given SAE provides attaches the demo model's own SAEs (demo model
    only; other models need `saes`).
    """
    if mlp_nodes not in MLP_NODE_CHOICES:
        raise TdbError(f"--mlp-nodes must be one of {', '.join(MLP_NODE_CHOICES)}")
    if attn_nodes not in ATTN_NODE_CHOICES:
        raise TdbError(f"--attn-nodes must be one of {', '.join(ATTN_NODE_CHOICES)}")
    attached: list[AttachedSae] = []
    for sae in saes:
        attached += [sae] if isinstance(sae, AttachedSae) else load_saes(sae)
    wanted = {"MLP": mlp_nodes != "neurons", "attention": attn_nodes != "heads"}
    for kind, wants in wanted.items():

        def reads(a: AttachedSae, kind: str = kind) -> bool:
            return a.site.reads_mlp == (kind == "MLP")

        if not wants or any(reads(a) for a in attached):
            continue
        if not is_demo_model(loaded.path) or not DEMO_SAE_DIR.is_dir():
            raise TdbError(
                f"{kind} latents need an SAE on this model's {kind} (--sae DIR_OR_FILE); "
                "only the demo model has SAEs built in"
            )
        attached += [a for a in load_saes(DEMO_SAE_DIR) if reads(a)]
    check_saes(attached, loaded.model.config)
    place_saes(attached, loaded.model)
    shown = {NodeType.EMBEDDING}
    if mlp_nodes != "latents":
        shown.add(NodeType.MLP_NEURON)
    if attn_nodes != "latents":
        shown.add(NodeType.ATTENTION_HEAD)
    if attached:
        shown.add(NodeType.AUTOENCODER_LATENT)
    return ordered(attached), shown
