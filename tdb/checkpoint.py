"""Load Hugging Face checkpoints (GPT-2, Llama, Qwen2, Mistral, Gemma, GPT-NeoX), offline, and
save GPT-2 ones.

A checkpoint is a directory with `config.json` and `model.safetensors` (or the shards listed in
`model.safetensors.index.json`, or `pytorch_model.bin`, read with `torch.load(weights_only=True)`),
plus `tokenizer.json` when there is one. A bare name such as `gpt2` is looked up in the local
Hugging Face cache; nothing is ever downloaded. `ARCHITECTURES` maps config.json's `model_type`
to how its config is read, how its weights are converted to our layout, and which model runs it;
those conversions live with each model, at the bottom of its file in `tdb/models/`.
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
from tdb.models import gpt2, llama, neox
from tdb.models.base import TransformerModel
from tdb.models.hf import HFConfig
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


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, by its name there, as float32."""
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
    return {k: v.float() for k, v in weights.items()}


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
    "gpt2": Architecture(gpt2.config_from_gpt2, gpt2.state_dict_from_hf, gpt2.GPT2),
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


def save_checkpoint(model: gpt2.GPT2, directory: Path, dtype: torch.dtype = torch.float32) -> None:
    """Write `config.json` + `model.safetensors` in the Hugging Face GPT-2 layout.

    >>> save_checkpoint(model, Path("out"), dtype=torch.float16)
    """
    directory.mkdir(parents=True, exist_ok=True)
    hf_config = gpt2.config_to_hf(model.config)
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    weights = gpt2.state_dict_to_hf(model)
    tensors = {k: v.to("cpu", dtype).contiguous() for k, v in weights.items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
