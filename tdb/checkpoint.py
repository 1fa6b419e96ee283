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
import pickle
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from tdb.activation_cache import CachePoints, HooksArg, Prompts, RunResult, run_with_cache
from tdb.device import (
    CPU_FLOAT32,
    DTYPES,
    FIRST,
    Placement,
    dtype_name,
    resolve_placement,
)
from tdb.errors import TdbError, reason
from tdb.fingerprint import model_fingerprint
from tdb.models import gpt2, llama, neox
from tdb.models.base import ModelConfig, TransformerModel
from tdb.models.hf import HFConfig
from tdb.tokens import Tokenizer

DEMO_MODEL_DIR = Path(__file__).parent / "demo" / "checkpoint"
# A tensor of one layer: GPT-2's `h.3.`, the Llama family's and GPT-NeoX's `layers.3.`.
LAYER_KEY = re.compile(r"(?:^|\.)(?:h|layers)\.(\d+)\.")


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
    placement: Placement = CPU_FLOAT32  # where the weights are and in which dtype

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

    @cached_property
    def fingerprint(self) -> str:
        """A hash of the model's config and weights (`tdb.fingerprint`), computed once."""
        return model_fingerprint(self.model)


def hf_cache_dirs() -> list[Path]:
    """The folders a Hugging Face cache may live in, most specific first."""
    dirs: list[Path] = []
    if hub_cache := os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(hub_cache))
    if hf_home := os.environ.get("HF_HOME"):
        dirs += [Path(hf_home) / "hub", Path(hf_home)]
    default = Path.home() / ".cache" / "huggingface"
    return [*dirs, default / "hub", default]


def looks_like_a_path(name: str) -> bool:
    """Whether `--model NAME` is meant as a path: absolute, relative to `.`, `..` or `~`, or with
    more than one `/` (a Hugging Face name is `model` or `org/model`)."""
    return (
        Path(name).is_absolute()
        or name.startswith((".", "~"))
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
    )


def resolve_checkpoint(name_or_path: str | Path | None) -> Path:
    """The checkpoint directory for a path, a cached model name, or None (the demo model)."""
    if name_or_path is None:
        if not (DEMO_MODEL_DIR / "config.json").is_file():
            raise TdbError("the built-in demo model is not installed: give --model PATH_OR_NAME")
        return DEMO_MODEL_DIR
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise TdbError(f"--model: {path} is a file; give the checkpoint's directory")
    if looks_like_a_path(str(name_or_path)):
        raise TdbError(
            f"--model: directory {path} does not exist, so it is neither a checkpoint directory "
            "nor a model in the local Hugging Face cache"
        )
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


# What reading does to each tensor as it comes off the file: (its name, the tensor) -> kept.
Convert = Callable[[str, Tensor], Tensor]


def as_read(name: str, tensor: Tensor) -> Tensor:
    return tensor


def read_safetensors(path: Path, convert: Convert = as_read) -> dict[str, Tensor]:
    """Every tensor of one safetensors file, each passed through `convert` as soon as it is
    read (so only one tensor at a time is held in the file's dtype), or a TdbError."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: convert(name, f.get_tensor(name)) for name in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as e:
        raise TdbError(f"{path}: not a readable safetensors file ({reason(e)})") from None


def load_tensors_only(path: Path) -> object:
    """`torch.load(path, weights_only=True)`: tensors and plain containers. A pickle that holds
    anything else (code to run, other objects) is refused, never executed: a TdbError."""
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 200": the error says it
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch explains at length, and suggests weights_only=False; tdb never does that.
        detail = unpickler_complaint(str(e)) or reason(e)
        if "Unsupported global" in detail:
            raise TdbError(
                f"{path}: refused, it holds more than tensors ({detail}); tdb reads pickled "
                "weights with torch.load(weights_only=True) and runs no code from them"
            ) from None
        raise TdbError(f"{path}: not a readable torch file ({detail})") from None
    # A broken file fails in many ways: RuntimeError (a broken zip), EOFError, KeyError, ...
    except Exception as e:
        raise TdbError(f"{path}: not a readable torch file ({reason(e)})") from None


def unpickler_complaint(message: str) -> str:
    """The one sentence of torch's weights-only refusal that names the problem, or ''."""
    marker = "WeightsUnpickler error:"
    after = message[message.find(marker) + len(marker) :] if marker in message else ""
    first = next((line.strip() for line in after.splitlines() if line.strip()), "")
    return reason(ValueError(first.split(". ")[0])) if first else ""


def read_pickled_weights(path: Path) -> dict[str, Tensor]:
    """The tensors of a `pytorch_model.bin`, read with `weights_only=True`: anything else in the
    pickle (code to run, objects) is refused, not executed."""
    weights = load_tensors_only(path)
    if not isinstance(weights, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in weights.items()
    ):
        raise TdbError(f"{path}: must hold a dict of named tensors, got {type(weights).__name__}")
    return weights


def weight_files(directory: Path) -> list[Path]:
    """The checkpoint's weight files: one safetensors file, the shards of an index, or a
    `pytorch_model.bin`."""
    index = directory / "model.safetensors.index.json"
    if (directory / "model.safetensors").is_file():
        return [directory / "model.safetensors"]
    if index.is_file():  # sharded: the index maps each tensor to its file
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise TdbError(f"{index}: not a safetensors index ({reason(e)})") from None
        for shard in shards:
            if not isinstance(shard, str) or not (directory / shard).is_file():
                raise TdbError(f"{index}: names shard {shard!r}, which is not in {directory}")
        return [directory / shard for shard in shards]
    if (directory / "pytorch_model.bin").is_file():
        return [directory / "pytorch_model.bin"]
    raise TdbError(
        f"{directory}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin"
    )


def read_weights(directory: Path, convert: Convert | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, by its name there, each passed through `convert` as it
    is read (default: to float32 on the CPU)."""

    def checked(name: str, tensor: Tensor) -> Tensor:
        if tensor.is_complex():  # a cast would drop the imaginary part
            raise TdbError(f"{directory}: tensor {name} holds complex numbers ({tensor.dtype})")
        return tensor.float() if convert is None else convert(name, tensor)

    weights: dict[str, Tensor] = {}
    for path in weight_files(directory):
        if path.suffix == ".bin":
            weights |= {k: checked(k, v) for k, v in read_pickled_weights(path).items()}
        else:
            weights |= read_safetensors(path, checked)
    return weights


SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def stored_dtype(directory: Path, hf: HFConfig) -> torch.dtype:
    """The checkpoint's dtype: config.json's `torch_dtype` (transformers 5: `dtype`), else the
    first floating tensor's in the (first) safetensors file; float32 if neither says."""
    for key in ("dtype", "torch_dtype"):
        value = hf.get(key)
        if isinstance(value, str) and value in DTYPES:
            return DTYPES[value]
    path = weight_files(directory)[0]
    if path.suffix == ".bin":
        return torch.float32
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118
                kind = f.get_slice(name).get_dtype()
                if kind in SAFETENSORS_DTYPES:
                    return SAFETENSORS_DTYPES[kind]
    except (SafetensorError, OSError) as e:
        raise TdbError(f"{path}: not a readable safetensors file ({reason(e)})") from None
    return torch.float32


# Checkpoint tensors outside the layers that belong with the embedding (the rest of them, the
# final norm and the unembedding, go with the last layer).
EMBEDDING_KEY = re.compile(r"(?:^|\.)(?:embed_tokens|embed_in|wte|wpe)\.")


def is_norm(name: str) -> bool:
    """Our norms' gains and biases (`ln_1`, `ln_2`, `ln_f`): kept in float32 in every dtype,
    where they are applied (tdb.models.layers) and where Gemma's 1 + w is formed."""
    return name.startswith("ln_") or ".ln_" in name


def check_layers(weights: dict[str, Tensor], n_layer: int, where: Path) -> None:
    """Refuse weights with more layers than config.json says: loading them would silently
    drop the extra layers (fewer layers already fail, as a missing tensor)."""
    extra = sorted(
        name
        for name in weights
        if (m := LAYER_KEY.search(name)) is not None and int(m.group(1)) >= n_layer
    )
    if extra:
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        raise TdbError(
            f"{where}: the weights have more layers than config.json's {n_layer} "
            f"(n_layer / num_hidden_layers): unexpected tensors {', '.join(extra[:3])}{more}"
        )


def shape_mismatches(model: nn.Module, state_dict: dict[str, Tensor]) -> list[str]:
    """Where the converted weights' shapes differ from the model config.json describes."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return [
        f"{k} is {list(v.shape)}, config.json implies {list(expected[k])}"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != expected[k]
    ]


ConfigT = TypeVar("ConfigT", bound=ModelConfig)


@dataclass(frozen=True)
class Architecture(Generic[ConfigT]):
    """How one Hugging Face `model_type` is loaded: its config.json read into our config, its
    weights converted to our layout (missing tensors raise KeyError), the model that runs it."""

    config_from_hf: Callable[[HFConfig], ConfigT]
    state_dict_from_hf: Callable[[dict[str, Tensor], ConfigT], dict[str, Tensor]]
    model: Callable[[ConfigT], TransformerModel]

    def load(
        self, hf: HFConfig, directory: Path, placement: Placement = CPU_FLOAT32
    ) -> tuple[TransformerModel, Placement]:
        """The model with the checkpoint's weights, each tensor read straight to its device in
        its dtype (no float32 copy of the whole model on the way), and where it went."""
        config = self.config_from_hf(hf)
        with torch.device("meta"):  # no memory and no random init for weights about to be replaced
            model = self.model(config)
        assert isinstance(model, nn.Module)
        dtype = placement.dtype_for(stored_dtype(directory, hf))
        placed = resolve_placement(placement, model, config.n_layer, dtype)
        n_layer = config.n_layer

        def device_of_checkpoint_tensor(name: str) -> torch.device:
            match = LAYER_KEY.search(name)
            if match is not None and int(match.group(1)) < n_layer:
                return placed.device_of(int(match.group(1)), n_layer)
            return placed.device_of(None, n_layer, last=EMBEDDING_KEY.search(name) is None)

        def convert(name: str, tensor: Tensor) -> Tensor:
            # Vectors (biases, norm gains) in float32 until converted to our layout: Gemma's
            # gain 1 + w is formed in float32, as transformers does. They are small.
            kept = torch.float32 if tensor.ndim <= 1 else dtype
            return tensor.to(device_of_checkpoint_tensor(name), kept)

        weights = read_weights(directory, convert)
        # The weights are checked against config.json before the model is built from it.
        check_layers(weights, config.n_layer, directory)
        try:
            state_dict = self.state_dict_from_hf(weights, config)
        except KeyError as e:
            raise TdbError(f"{directory}: weights are missing tensor {e}") from None
        # A tensor of the wrong shape or rank for config.json, while reshaping it to ours.
        except (RuntimeError, IndexError) as e:
            raise TdbError(f"{directory}: weights do not match config.json: {reason(e)}") from None
        del weights
        state_dict = {
            k: v.to(our_device(placed, k, n_layer), torch.float32 if is_norm(k) else dtype)
            for k, v in state_dict.items()
        }
        if mismatches := shape_mismatches(model, state_dict):
            more = f" (and {len(mismatches) - 1} more)" if len(mismatches) > 1 else ""
            raise TdbError(f"{directory}: weights do not match config.json: {mismatches[0]}{more}")
        try:
            model.load_state_dict(state_dict, assign=True)
        except RuntimeError as e:
            raise TdbError(f"{directory}: weights do not match config.json: {reason(e)}") from None
        model.requires_grad_(False).eval()
        return model, placed


def our_device(placed: Placement, name: str, n_layer: int) -> torch.device:
    """The device of one of our model's weights: its layer's, or the embedding's (first) or
    the final norm's and unembedding's (last)."""
    match = re.match(r"blocks\.(\d+)\.", name)
    if match is not None:
        return placed.device_of(int(match.group(1)), n_layer)
    return placed.device_of(None, n_layer, last=name not in FIRST)


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


def read_json_object(path: Path) -> dict[str, object]:
    """A JSON file holding one object (config.json), or a TdbError saying what is wrong."""
    try:
        values = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, nested too deep
        raise TdbError(f"{path}: not valid JSON ({reason(e)})") from None
    except OSError as e:
        raise TdbError(f"{path}: cannot be read ({reason(e)})") from None
    if not isinstance(values, dict):
        raise TdbError(f"{path}: not a JSON object")
    return values


def load_model(
    name_or_path: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "auto",
    device_map: str | None = None,
) -> LoadedModel:
    """Load a checkpoint directory, a cached model name, or (None) the demo model, onto
    `device` (`auto`, `cpu`, `cuda`, `cuda:N`, `mps`) in `dtype` (`auto`: the checkpoint's on
    an accelerator, float32 on the CPU; `float32`, `bfloat16`, `float16`). `device_map`
    (`auto`, a JSON file or `LAYER:DEVICE,...`) spreads the layers over devices
    (docs/performance.md).

    >>> loaded = load_model("gpt2")  # from ~/.cache/huggingface, never the network
    >>> logits = loaded.model(torch.tensor([loaded.tokenizer.encode("Hello")]))
    >>> big = load_model("path/to/llama", device="cuda", dtype="bfloat16")
    """
    placement = Placement.parse(
        str(device),
        dtype if isinstance(dtype, str) else dtype_name(dtype),
        device_map,
    )
    directory = resolve_checkpoint(name_or_path)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise TdbError(f"--model: {directory} has no config.json, so it is not a checkpoint")
    values = read_json_object(config_file)
    model_type = values.get("model_type")
    if not isinstance(model_type, str) or model_type not in ARCHITECTURES:
        raise TdbError(
            f"{directory}: unsupported architecture {model_type!r} "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    architecture = ARCHITECTURES[model_type]
    model, placed = architecture.load(HFConfig(values, config_file), directory, placement)
    name = str(name_or_path) if name_or_path is not None else "demo"
    tokenizer = Tokenizer.from_dir(directory, model.config.d_vocab)
    return LoadedModel(model, tokenizer, name, directory, placed)


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
