"""Load Hugging Face checkpoints (GPT-2, Llama, Qwen2, Mistral, Gemma, GPT-NeoX), offline, and
save GPT-2 ones.

A checkpoint is a directory with `config.json` and `model.safetensors` (or the shards listed in
`model.safetensors.index.json`, or `pytorch_model.bin`, read with `torch.load(weights_only=True)`),
plus `tokenizer.json` when there is one. A bare name such as `gpt2` is looked up in the local
Hugging Face cache; nothing is ever downloaded. `ARCHITECTURES` maps config.json's `model_type`
to how its config is read, how its weights are converted to our layout, and which model runs it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from tdb.activation_cache import CachePoints, HooksArg, Prompts, RunResult, run_with_cache
from tdb.errors import TdbError
from tdb.models import llama, neox
from tdb.models.base import TransformerModel
from tdb.models.gpt2 import GPT2, GPT2Config
from tdb.models.hf import HFConfig
from tdb.models.layers import ACTIVATIONS
from tdb.tokens import Tokenizer

DEMO_MODEL_DIR = Path(__file__).parent / "demo" / "checkpoint"


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for inference (no parameter gradients), its tokenizer and where it came from.

    >>> loaded = load_model("path/to/checkpoint")
    >>> loaded.model, loaded.tokenizer.encode(" Mary")
    """

    model: TransformerModel
    tokenizer: Tokenizer
    name: str
    path: Path

    def run(
        self,
        prompts: Prompts,
        cache: CachePoints = (),
        hooks: HooksArg | None = None,
    ) -> RunResult:
        """Logits and the `cache` points' activations of a batch of prompts (docs/python.md).

        >>> result = loaded.run(["When Mary and John went", "Hi"], cache=["resid_pre"])
        >>> result.cache["resid_pre", 1]  # [batch pos d_model], right-padded
        """
        return run_with_cache(self.model, self.tokenizer, prompts, cache=cache, hooks=hooks)


def hf_cache_dirs() -> list[Path]:
    """The folders a Hugging Face cache may live in, most specific first."""
    dirs: list[Path] = []
    if hub_cache := os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(hub_cache))
    if hf_home := os.environ.get("HF_HOME"):
        dirs += [Path(hf_home) / "hub", Path(hf_home)]
    default = Path.home() / ".cache" / "huggingface"
    return [*dirs, default / "hub", default]


def resolve_checkpoint(name_or_path: str | Path | None) -> Path:
    """The checkpoint directory for a path, a cached model name, or None (the demo model)."""
    if name_or_path is None:
        if not (DEMO_MODEL_DIR / "config.json").is_file():
            raise TdbError("the built-in demo model is not installed: give --model PATH_OR_NAME")
        return DEMO_MODEL_DIR
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    repo_dir = "models--" + str(name_or_path).replace("/", "--")
    for cache in hf_cache_dirs():
        snapshots = cache / repo_dir / "snapshots"
        if not snapshots.is_dir():
            continue
        ref = cache / repo_dir / "refs" / "main"
        if ref.is_file() and (snapshots / ref.read_text().strip()).is_dir():
            return snapshots / ref.read_text().strip()
        candidates = sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
        if candidates:
            return candidates[0]
    looked = ", ".join(str(d) for d in hf_cache_dirs())
    raise TdbError(
        f"--model: {str(name_or_path)!r} is neither a checkpoint directory nor a model in the "
        f"local Hugging Face cache (looked for {repo_dir} in {looked}); nothing is downloaded"
    )


def config_from_gpt2(hf: HFConfig) -> GPT2Config:
    activation = hf.text("activation_function", "gelu_new")
    if activation not in ACTIVATIONS:
        raise hf.error(f"unsupported activation {activation!r} ({', '.join(ACTIVATIONS)})")
    if not hf.flag("scale_attn_weights", True):
        raise hf.error("scale_attn_weights=false is not supported")
    d_model = hf.integer("n_embd")
    return GPT2Config(
        d_vocab=hf.integer("vocab_size"),
        n_ctx=hf.integer("n_positions"),
        d_model=d_model,
        n_layer=hf.integer("n_layer"),
        n_head=hf.integer("n_head"),
        d_mlp=hf.integer("n_inner", 4 * d_model),
        layer_norm_eps=hf.number("layer_norm_epsilon", 1e-5),
        tie_unembed=hf.flag("tie_word_embeddings", True),
        activation=activation,
        scale_attn_by_inverse_layer_idx=hf.flag("scale_attn_by_inverse_layer_idx", False),
    )


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint as float32, GPT-2's `transformer.` prefix dropped."""
    index = directory / "model.safetensors.index.json"
    if (directory / "model.safetensors").is_file():
        weights = load_file(str(directory / "model.safetensors"))
    elif index.is_file():  # sharded: the index maps each tensor to its file
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise TdbError(f"{index}: not a safetensors index ({e!r})") from None
        weights = {}
        for shard in shards:
            if not (directory / shard).is_file():
                raise TdbError(f"{index}: names shard {shard}, which is not in {directory}")
            weights |= load_file(str(directory / shard))
    elif (directory / "pytorch_model.bin").is_file():
        weights = torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise TdbError(
            f"{directory}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin"
        )
    return {k.removeprefix("transformer."): v.float() for k, v in weights.items()}


def state_dict_from_gpt2(
    hf: dict[str, torch.Tensor], config: GPT2Config
) -> dict[str, torch.Tensor]:
    """Hugging Face GPT-2 weights (Conv1D: y = x @ W + b) -> our per-head layout."""
    h, d, dh = config.n_head, config.d_model, config.d_head
    out = {"W_E": hf["wte.weight"], "W_pos": hf["wpe.weight"]}
    out |= {"ln_f.w": hf["ln_f.weight"], "ln_f.b": hf["ln_f.bias"]}
    if not config.tie_unembed:
        out["W_U"] = hf["lm_head.weight"].T
    for layer in range(config.n_layer):
        src, dst = f"h.{layer}.", f"blocks.{layer}."
        for ln in ("ln_1", "ln_2"):
            out[dst + ln + ".w"] = hf[src + ln + ".weight"]
            out[dst + ln + ".b"] = hf[src + ln + ".bias"]
        w_qkv = hf[src + "attn.c_attn.weight"].reshape(d, 3, h, dh)  # [d_model qkv head d_head]
        b_qkv = hf[src + "attn.c_attn.bias"].reshape(3, h, dh)
        for i, name in enumerate("QKV"):
            out[f"{dst}attn.W_{name}"] = w_qkv[:, i].permute(1, 0, 2)  # [head d_model d_head]
            out[f"{dst}attn.b_{name}"] = b_qkv[i]
        out[dst + "attn.W_O"] = hf[src + "attn.c_proj.weight"].reshape(h, dh, d)
        out[dst + "attn.b_O"] = hf[src + "attn.c_proj.bias"]
        out[dst + "mlp.W_in"] = hf[src + "mlp.c_fc.weight"]
        out[dst + "mlp.b_in"] = hf[src + "mlp.c_fc.bias"]
        out[dst + "mlp.W_out"] = hf[src + "mlp.c_proj.weight"]
        out[dst + "mlp.b_out"] = hf[src + "mlp.c_proj.bias"]
    return out


def state_dict_to_hf(model: GPT2) -> dict[str, torch.Tensor]:
    """Our layout -> Hugging Face GPT-2 weights (the inverse of `state_dict_from_gpt2`)."""
    c = model.config
    ours = {k: v.detach() for k, v in model.state_dict().items()}
    out = {"transformer.wte.weight": ours["W_E"], "transformer.wpe.weight": ours["W_pos"]}
    out |= {"transformer.ln_f.weight": ours["ln_f.w"], "transformer.ln_f.bias": ours["ln_f.b"]}
    if not c.tie_unembed:
        out["lm_head.weight"] = ours["W_U"].T
    for layer in range(c.n_layer):
        src, dst = f"blocks.{layer}.", f"transformer.h.{layer}."
        for ln in ("ln_1", "ln_2"):
            out[dst + ln + ".weight"] = ours[src + ln + ".w"]
            out[dst + ln + ".bias"] = ours[src + ln + ".b"]
        w_qkv = torch.stack([ours[f"{src}attn.W_{n}"].permute(1, 0, 2) for n in "QKV"], dim=1)
        out[dst + "attn.c_attn.weight"] = w_qkv.reshape(c.d_model, 3 * c.d_model)
        b_qkv = torch.stack([ours[f"{src}attn.b_{n}"] for n in "QKV"])  # [qkv head d_head]
        out[dst + "attn.c_attn.bias"] = b_qkv.reshape(3 * c.d_model)
        out[dst + "attn.c_proj.weight"] = ours[src + "attn.W_O"].reshape(c.d_model, c.d_model)
        out[dst + "attn.c_proj.bias"] = ours[src + "attn.b_O"]
        out[dst + "mlp.c_fc.weight"] = ours[src + "mlp.W_in"]
        out[dst + "mlp.c_fc.bias"] = ours[src + "mlp.b_in"]
        out[dst + "mlp.c_proj.weight"] = ours[src + "mlp.W_out"]
        out[dst + "mlp.c_proj.bias"] = ours[src + "mlp.b_out"]
    return out


ConfigT = TypeVar("ConfigT")


@dataclass(frozen=True)
class Architecture(Generic[ConfigT]):
    """How one Hugging Face `model_type` is loaded: its config.json read into our config, its
    weights converted to our layout (missing tensors raise KeyError), the model that runs it."""

    config_from_hf: Callable[[HFConfig], ConfigT]
    state_dict_from_hf: Callable[[dict[str, Tensor], ConfigT], dict[str, Tensor]]
    model: Callable[[ConfigT], TransformerModel]

    def load(self, hf: HFConfig, directory: Path) -> tuple[TransformerModel, int]:
        """The model with the checkpoint's weights, and its vocabulary size."""
        config = self.config_from_hf(hf)
        with torch.device("meta"):  # no memory and no random init for weights about to be replaced
            model = self.model(config)
        try:
            state_dict = self.state_dict_from_hf(read_weights(directory), config)
            model.load_state_dict(state_dict, assign=True)
        except KeyError as e:
            raise TdbError(f"{directory}: weights are missing tensor {e}") from None
        except RuntimeError as e:  # a tensor of the wrong shape for config.json
            raise TdbError(f"{directory}: weights do not match config.json: {e}") from None
        model.requires_grad_(False).eval()
        return model, model.config.d_vocab


# config.json's model_type -> architecture. Adding one: docs/architectures.md.
ARCHITECTURES: dict[str, Architecture[Any]] = {
    "gpt2": Architecture(config_from_gpt2, state_dict_from_gpt2, GPT2),
    "llama": Architecture(llama.config_from_llama, llama.state_dict_from_hf, llama.Llama),
    "qwen2": Architecture(llama.config_from_qwen2, llama.state_dict_from_hf, llama.Llama),
    "mistral": Architecture(llama.config_from_mistral, llama.state_dict_from_hf, llama.Llama),
    "gemma": Architecture(llama.config_from_gemma, llama.state_dict_from_hf, llama.Llama),
    "gpt_neox": Architecture(neox.config_from_neox, neox.state_dict_from_hf, neox.NeoX),
}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)


def load_model(name_or_path: str | Path | None = None) -> LoadedModel:
    """Load a checkpoint directory, a cached model name, or (None) the demo model.

    >>> loaded = load_model("gpt2")  # from ~/.cache/huggingface, never the network
    >>> logits = loaded.model(torch.tensor([loaded.tokenizer.encode("Hello")]))
    """
    directory = resolve_checkpoint(name_or_path)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise TdbError(f"--model: {directory} has no config.json, so it is not a checkpoint")
    try:
        values = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise TdbError(f"{config_file}: not valid JSON ({e})") from None
    if not isinstance(values, dict):
        raise TdbError(f"{config_file}: not a JSON object")
    model_type = values.get("model_type")
    if model_type not in ARCHITECTURES:
        raise TdbError(
            f"{directory}: unsupported architecture {model_type!r} "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    model, d_vocab = ARCHITECTURES[model_type].load(HFConfig(values, config_file), directory)
    name = str(name_or_path) if name_or_path is not None else "demo"
    return LoadedModel(model, Tokenizer.from_dir(directory, d_vocab), name, directory)


def save_checkpoint(model: GPT2, directory: Path, dtype: torch.dtype = torch.float32) -> None:
    """Write `config.json` + `model.safetensors` in the Hugging Face GPT-2 layout.

    >>> save_checkpoint(model, Path("out"), dtype=torch.float16)
    """
    c = model.config
    directory.mkdir(parents=True, exist_ok=True)
    hf_config = {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": c.d_vocab,
        "n_positions": c.n_ctx,
        "n_embd": c.d_model,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_inner": c.d_mlp,
        "layer_norm_epsilon": c.layer_norm_eps,
        "activation_function": c.activation,
        "tie_word_embeddings": c.tie_unembed,
        "scale_attn_by_inverse_layer_idx": c.scale_attn_by_inverse_layer_idx,
        "bos_token_id": 0,
        "eos_token_id": 0,
    }
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    tensors = {k: v.to("cpu", dtype).contiguous() for k, v in state_dict_to_hf(model).items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
