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

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from tdb.errors import TdbError, reason
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


def read_sae_file(path: Path, where: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """A safetensors file's tensors and metadata, or a TdbError saying why it cannot be read."""
    if not path.is_file():
        raise TdbError(f"{where}: {path.name} is missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata
    except (SafetensorError, OSError) as e:
        what = "" if where.endswith(str(path)) else f" {path.name}"
        raise TdbError(f"{where}:{what} not a readable safetensors file ({reason(e)})") from None


def integer(value: object, name: str, where: str) -> int:
    """An integer from metadata (text) or cfg.json (a number, or text)."""
    if isinstance(value, int | str) and not isinstance(value, bool):
        try:
            return int(value)
        except ValueError:
            pass
    raise TdbError(f"{where}: {name} must be an integer, got {value!r}")


def checked_tensors(
    tensors: dict[str, Tensor], ranks: dict[str, int], where: str
) -> dict[str, Tensor]:
    """The named tensors, each present, of floating-point numbers and of the given rank (a
    vector 1, a matrix 2) with no empty dimension; as float32."""
    missing = set(ranks) - set(tensors)
    if missing:
        raise TdbError(f"{where}: missing tensors {', '.join(sorted(missing))}")
    for name, rank in ranks.items():
        t = tensors[name]
        if not t.is_floating_point():
            raise TdbError(f"{where}: {name} holds {t.dtype}, not floating-point numbers")
        if t.ndim != rank or 0 in t.shape:
            kind = "a vector" if rank == 1 else "a matrix"
            raise TdbError(f"{where}: {name} must be {kind}, got shape {list(t.shape)}")
    return {name: tensors[name].float() for name in ranks}


def with_weights(
    sae: SparseAutoencoder, weights: dict[str, tuple[str, Tensor]], where: str
) -> None:
    """Copy weights (already in our shapes; by our name: the file's name, the tensor) into
    `sae`, checking every shape."""
    for name, (file_name, value) in weights.items():
        param = getattr(sae, name)
        if tuple(value.shape) != tuple(param.shape):
            raise TdbError(
                f"{where}: {file_name} does not fit the encoder's shape: {name} would be "
                f"{list(value.shape)}, expected {list(param.shape)}"
            )
        param.data = value.detach().float().clone()
    sae.requires_grad_(False)


def new_sae(d_in: int, d_sae: int, k: int | None, where: str) -> SparseAutoencoder:
    try:
        return SparseAutoencoder(d_in, d_sae, k)
    except TdbError as e:  # k outside 1..d_sae
        raise TdbError(f"{where}: {e}") from None


OPENAI_TENSORS = {"pre_bias": 1, "encoder.weight": 2, "latent_bias": 1, "decoder.weight": 2}
SAELENS_TENSORS = {"W_enc": 2, "W_dec": 2, "b_enc": 1, "b_dec": 1}


def load_openai_layout(path: Path) -> AttachedSae:
    """One SAE from a safetensors file in OpenAI's layout (see the module docstring)."""
    where = f"SAE {path}"
    tensors, metadata = read_sae_file(path, where)
    tensors = checked_tensors(tensors, OPENAI_TENSORS, where)
    activation = metadata.get("activation", "ReLU")
    if activation.lower() == "topk":
        if "k" not in metadata:
            raise TdbError(f"{where}: a TopK activation needs `k` in the file's metadata")
        k: int | None = integer(metadata["k"], "k", where)
    elif activation.lower() == "relu":
        k = None
    else:
        raise TdbError(f"{where}: activation {activation!r} is not ReLU or TopK")
    if metadata.get("normalize", "false").lower() == "true":
        raise TdbError(f"{where}: SAEs on layer-normalised inputs are not supported")
    if "site" not in metadata or "layer" not in metadata:
        raise TdbError(
            f"{where}: the file's metadata must say where the SAE reads: `site` "
            f"({', '.join(s.value for s in LatentSite)}) and `layer`"
        )
    site = parse_site(metadata["site"], where)
    layer = integer(metadata["layer"], "layer", where)
    d_sae, d_in = tensors["encoder.weight"].shape
    sae = new_sae(d_in, d_sae, k, where)
    with_weights(
        sae,
        {
            "pre_bias": ("pre_bias", tensors["pre_bias"]),
            "W_enc": ("encoder.weight", tensors["encoder.weight"]),
            "latent_bias": ("latent_bias", tensors["latent_bias"]),
            "W_dec": ("decoder.weight", tensors["decoder.weight"].T),
            "decoder_bias": ("pre_bias", tensors["pre_bias"]),
        },
        where,
    )
    return AttachedSae(sae, site, layer, path.stem)


def saelens_hook(cfg: dict[str, object], where: str) -> tuple[LatentSite, int]:
    meta = cfg.get("metadata")
    hook = cfg.get("hook_name") or (meta.get("hook_name") if isinstance(meta, dict) else None)
    match = re.fullmatch(r"blocks\.([0-9]+)\.(.+)", str(hook))
    if match is None or match.group(2) not in SAELENS_HOOKS:
        raise TdbError(
            f"{where}: hook_name {hook!r} is not one of blocks.<layer>.("
            + "|".join(SAELENS_HOOKS)
            + ")"
        )
    return SAELENS_HOOKS[match.group(2)], int(match.group(1))


def load_saelens_layout(directory: Path) -> AttachedSae:
    """One SAE from a SAELens directory (`cfg.json` + `sae_weights.safetensors`)."""
    from tdb.checkpoint import read_json_object

    where = f"SAE {directory}"
    cfg = read_json_object(directory / "cfg.json")
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
        k = integer(k_value, "k", where)
    subtract_b_dec = cfg.get("apply_b_dec_to_input", True)
    if not isinstance(subtract_b_dec, bool):
        raise TdbError(
            f"{where}: apply_b_dec_to_input must be true or false, got {subtract_b_dec!r}"
        )
    site, layer = saelens_hook(cfg, where)
    tensors, _ = read_sae_file(directory / SAELENS_WEIGHTS, where)
    tensors = checked_tensors(tensors, SAELENS_TENSORS, where)
    d_in, d_sae = tensors["W_enc"].shape
    sae = new_sae(d_in, d_sae, k, where)
    b_dec = tensors["b_dec"]
    with_weights(
        sae,
        {
            "pre_bias": ("b_dec", b_dec if subtract_b_dec else torch.zeros_like(b_dec)),
            "W_enc": ("W_enc", tensors["W_enc"].T),
            "latent_bias": ("b_enc", tensors["b_enc"]),
            "W_dec": ("W_dec", tensors["W_dec"]),
            "decoder_bias": ("b_dec", b_dec),
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
