"""Sparse autoencoders (SAEs) and the files they come in.

    >>> saes = load_saes("path/to/sae_dir_or_file")   # [AttachedSae(sae, site, layer, name)]
    >>> z = saes[0].sae.encode(x)                      # [pos d_sae] latents
    >>> x_hat = saes[0].sae.decode(z)                  # [pos d_in] reconstruction

One autoencoder, whatever the file:

    pre  = (x - pre_bias) @ W_enc.T + latent_bias    # [pos d_sae] a latent's pre-activation
    z    = ReLU(pre), or TopK: ReLU of the k largest entries of pre, the rest 0
    x_hat = z @ W_dec + decoder_bias                 # latent j writes z_j * W_dec[j]

Two layouts are read:

- OpenAI's `sparse_autoencoder` (one safetensors file): `pre_bias` [d_in], `encoder.weight`
  [d_sae d_in], `latent_bias` [d_sae], `decoder.weight` [d_in d_sae]; the decoder adds
  `pre_bias` back. The activation and where the SAE reads are in the file's metadata:
  `activation` ("ReLU" or "TopK"), `k` (TopK), `site` (`attn_out`, `mlp_post`, `mlp_out`, or
  OpenAI's location names `resid_delta_attn`, `mlp_post_act`, `resid_delta_mlp`) and `layer`.
  `save_openai_layout` writes this layout (the demo model's SAEs are stored so).
- SAELens' (a directory): `cfg.json` and `sae_weights.safetensors` with `W_enc` [d_in d_sae],
  `W_dec` [d_sae d_in], `b_enc` [d_sae], `b_dec` [d_in]. The input has `b_dec` subtracted only if
  `apply_b_dec_to_input`; the hook it reads is `hook_name` (`blocks.L.hook_attn_out`,
  `blocks.L.mlp.hook_post`, `blocks.L.hook_mlp_out`); activation `relu` or `topk` with k.
  JumpReLU and gated SAEs and normalised inputs are refused with a clear error.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from tdb.errors import TdbError
from tdb.nodes import LatentSite


class SparseAutoencoder(nn.Module):
    """`SparseAutoencoder(d_in=256, d_sae=1024, k=32)` (k=None: ReLU). Weights start at zero:
    load them, or initialise them yourself (the demo's training script does)."""

    def __init__(self, d_in: int, d_sae: int, k: int | None = None) -> None:
        super().__init__()
        self.pre_bias = nn.Parameter(torch.zeros(d_in))
        self.W_enc = nn.Parameter(torch.zeros(d_sae, d_in))
        self.latent_bias = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_in))
        self.decoder_bias = nn.Parameter(torch.zeros(d_in))
        if k is not None and not 0 < k <= d_sae:
            raise TdbError(f"TopK SAE: k must be in 1..{d_sae}, got {k}")
        self.k = k

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[1])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def activation_name(self) -> str:
        return "relu" if self.k is None else f"topk(k={self.k})"

    def pre_activation(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        return (x - self.pre_bias) @ self.W_enc.T + self.latent_bias

    def activate(self, pre: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_sae"]:
        if self.k is None:
            return torch.relu(pre)
        top = torch.topk(pre, self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        return self.activate(self.pre_activation(x))

    def decode(self, z: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_in"]:
        return z @ self.W_dec + self.decoder_bias

    def forward(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_in"]:
        return self.decode(self.encode(x))


@dataclass(frozen=True)
class AttachedSae:
    """An autoencoder and the activation it reads: `site` of block `layer`."""

    sae: SparseAutoencoder
    site: LatentSite
    layer: int
    name: str

    @property
    def key(self) -> tuple[LatentSite, int]:
        return self.site, self.layer


OPENAI_LOCATIONS = {
    "resid_delta_attn": LatentSite.ATTN_OUT,
    "mlp_post_act": LatentSite.MLP_POST,
    "resid_delta_mlp": LatentSite.MLP_OUT,
}
SAELENS_HOOKS = {
    "hook_attn_out": LatentSite.ATTN_OUT,
    "mlp.hook_post": LatentSite.MLP_POST,
    "hook_mlp_out": LatentSite.MLP_OUT,
}
SAELENS_WEIGHTS = "sae_weights.safetensors"


def parse_site(text: str, where: str) -> LatentSite:
    if text in OPENAI_LOCATIONS:
        return OPENAI_LOCATIONS[text]
    try:
        return LatentSite(text)
    except ValueError:
        names = [s.value for s in LatentSite] + list(OPENAI_LOCATIONS)
        raise TdbError(f"{where}: site {text!r} is not one of {', '.join(names)}") from None


def with_weights(sae: SparseAutoencoder, weights: dict[str, Tensor], where: str) -> None:
    """Copy weights (already in our names and shapes) into `sae`, checking every shape."""
    for name, value in weights.items():
        param = getattr(sae, name)
        if tuple(value.shape) != tuple(param.shape):
            raise TdbError(
                f"{where}: {name} has shape {tuple(value.shape)}, expected {tuple(param.shape)}"
            )
        param.data = value.detach().float().clone()
    sae.requires_grad_(False)


def load_openai_layout(path: Path) -> AttachedSae:
    """One SAE from a safetensors file in OpenAI's layout (see the module docstring)."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    tensors = load_file(str(path))
    missing = {"pre_bias", "encoder.weight", "latent_bias", "decoder.weight"} - set(tensors)
    if missing:
        raise TdbError(f"SAE {path}: missing tensors {', '.join(sorted(missing))}")
    activation = metadata.get("activation", "ReLU")
    if activation.lower() == "topk":
        if "k" not in metadata:
            raise TdbError(f"SAE {path}: a TopK activation needs `k` in the file's metadata")
        k: int | None = int(metadata["k"])
    elif activation.lower() == "relu":
        k = None
    else:
        raise TdbError(f"SAE {path}: activation {activation!r} is not ReLU or TopK")
    if metadata.get("normalize", "false").lower() == "true":
        raise TdbError(f"SAE {path}: SAEs on layer-normalised inputs are not supported")
    if "site" not in metadata or "layer" not in metadata:
        raise TdbError(
            f"SAE {path}: the file's metadata must say where the SAE reads: `site` "
            f"({', '.join(s.value for s in LatentSite)}) and `layer`"
        )
    d_sae, d_in = tensors["encoder.weight"].shape
    sae = SparseAutoencoder(d_in, d_sae, k)
    with_weights(
        sae,
        {
            "pre_bias": tensors["pre_bias"],
            "W_enc": tensors["encoder.weight"],
            "latent_bias": tensors["latent_bias"],
            "W_dec": tensors["decoder.weight"].T,
            "decoder_bias": tensors["pre_bias"],
        },
        f"SAE {path}",
    )
    site = parse_site(metadata["site"], f"SAE {path}")
    return AttachedSae(sae, site, int(metadata["layer"]), path.stem)


def saelens_hook(cfg: dict[str, object], where: str) -> tuple[LatentSite, int]:
    meta = cfg.get("metadata")
    hook = cfg.get("hook_name") or (meta.get("hook_name") if isinstance(meta, dict) else None)
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", str(hook))
    if match is None or match.group(2) not in SAELENS_HOOKS:
        raise TdbError(
            f"{where}: hook_name {hook!r} is not one of blocks.<layer>.("
            + "|".join(SAELENS_HOOKS)
            + ")"
        )
    return SAELENS_HOOKS[match.group(2)], int(match.group(1))


def load_saelens_layout(directory: Path) -> AttachedSae:
    """One SAE from a SAELens directory (`cfg.json` + `sae_weights.safetensors`)."""
    where = f"SAE {directory}"
    cfg = json.loads((directory / "cfg.json").read_text())
    architecture = str(cfg.get("architecture", "standard"))
    activation = str(cfg.get("activation_fn_str", "topk" if architecture == "topk" else "relu"))
    if architecture not in {"standard", "topk"} or activation not in {"relu", "topk"}:
        raise TdbError(
            f"{where}: architecture {architecture!r} / activation {activation!r} is not "
            "supported (standard ReLU or TopK SAEs only)"
        )
    if str(cfg.get("normalize_activations", "none")) not in {"none", "None"}:
        raise TdbError(f"{where}: SAEs on normalised activations are not supported")
    k = None
    if activation == "topk":
        kwargs = cfg.get("activation_fn_kwargs")
        k_value = cfg.get("k", kwargs.get("k") if isinstance(kwargs, dict) else None)
        if k_value is None:
            raise TdbError(f"{where}: a TopK SAE needs k in cfg.json")
        k = int(str(k_value))
    site, layer = saelens_hook(cfg, where)
    tensors = load_file(str(directory / SAELENS_WEIGHTS))
    missing = {"W_enc", "W_dec", "b_enc", "b_dec"} - set(tensors)
    if missing:
        raise TdbError(f"{where}: missing tensors {', '.join(sorted(missing))}")
    d_in, d_sae = tensors["W_enc"].shape
    sae = SparseAutoencoder(d_in, d_sae, k)
    subtract_b_dec = bool(cfg.get("apply_b_dec_to_input", True))
    b_dec = tensors["b_dec"]
    with_weights(
        sae,
        {
            "pre_bias": b_dec if subtract_b_dec else torch.zeros_like(b_dec),
            "W_enc": tensors["W_enc"].T,
            "latent_bias": tensors["b_enc"],
            "W_dec": tensors["W_dec"],
            "decoder_bias": b_dec,
        },
        where,
    )
    return AttachedSae(sae, site, layer, directory.name)


def load_saes(path: str | Path) -> list[AttachedSae]:
    """The SAEs at `path`: an OpenAI-layout .safetensors file, a SAELens directory, or a
    directory holding any number of those (sorted by name)."""
    path = Path(path).expanduser()
    if path.is_file():
        return [load_openai_layout(path)]
    if not path.is_dir():
        raise TdbError(f"--sae: {path} is neither a file nor a directory")
    if (path / "cfg.json").is_file() and (path / SAELENS_WEIGHTS).is_file():
        return [load_saelens_layout(path)]
    found: list[AttachedSae] = []
    for child in sorted(path.iterdir()):
        if child.is_file() and child.suffix == ".safetensors":
            found.append(load_openai_layout(child))
        elif child.is_dir() and (child / "cfg.json").is_file():
            found.append(load_saelens_layout(child))
    if not found:
        raise TdbError(
            f"--sae: {path} holds no SAE (an OpenAI-layout .safetensors file, or a SAELens "
            "directory with cfg.json and sae_weights.safetensors)"
        )
    return found


def save_openai_layout(
    attached: AttachedSae, path: Path, dtype: torch.dtype = torch.float32
) -> None:
    """Write one SAE in OpenAI's layout, with its activation and site in the metadata. Its
    decoder bias must equal its pre-encoder bias (that layout has only one)."""
    sae = attached.sae
    if not torch.equal(sae.pre_bias, sae.decoder_bias):
        raise ValueError("OpenAI's layout has one bias for the input and the reconstruction")
    tensors = {
        "pre_bias": sae.pre_bias,
        "encoder.weight": sae.W_enc,
        "latent_bias": sae.latent_bias,
        "decoder.weight": sae.W_dec.T,
    }
    metadata = {
        "activation": "ReLU" if sae.k is None else "TopK",
        "site": attached.site.value,
        "layer": str(attached.layer),
    }
    if sae.k is not None:
        metadata["k"] = str(sae.k)
    save_file(
        {name: t.detach().to(dtype).contiguous() for name, t in tensors.items()},
        str(path),
        metadata=metadata,
    )
