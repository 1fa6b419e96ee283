"""Where a model runs and in which number format: `--device`, `--dtype` and `--device-map`.

    >>> placement = Placement.parse("auto", "bfloat16", None)
    >>> placement.device, placement.dtype_for(checkpoint_dtype=torch.float32)

`auto` picks CUDA when there is one (then Apple's MPS), else the CPU; the dtype `auto` is the
checkpoint's own on an accelerator and float32 on the CPU. A device map puts each layer on its
own device: `auto` asks accelerate's planner to balance the layers over the visible GPUs; a
JSON file (or an inline `layer:device,...` list, for tests) names a device per layer, and the
embedding and the final norm and unembedding follow the first and last layer. The model moves
the residual stream to each layer's device at the layer boundary (tdb/models/*), so hooks see
tensors on their layer's device; the capture gathers the direction and the metrics on one.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from tdb.errors import TdbError, reason

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DTYPE_CHOICES = ("auto", *DTYPES)
DEVICE_FORMS = "auto, cpu, cuda, cuda:N or mps"
# Our model's top-level weights that sit with the first layer (the rest, the final norm and
# the unembedding, sit with the last).
FIRST = ("W_E", "W_pos")


def cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def mps_available() -> bool:
    return bool(torch.backends.mps.is_available())


def parse_device(text: str, flag: str = "--device") -> torch.device:
    """A device a model can run on here, or a TdbError naming `flag`.

    >>> parse_device("cpu")  # device(type='cpu')
    """
    if text == "auto":
        if cuda_count():
            return torch.device("cuda", 0)
        return torch.device("mps") if mps_available() else torch.device("cpu")
    match = re.fullmatch(r"(cpu|mps|cuda)(?::(\d+))?", text)
    if match is None:
        raise TdbError(f"{flag}: {text!r} is not a device (use {DEVICE_FORMS})")
    kind, index = match.group(1), match.group(2)
    if kind == "cpu":
        if index is not None and index != "0":
            raise TdbError(f"{flag}: {text!r}: there is one CPU device, cpu")
        return torch.device("cpu")
    if kind == "mps":
        if not mps_available():
            raise TdbError(f"{flag}: {text!r}: this machine has no Apple MPS device")
        return torch.device("mps")
    count = cuda_count()
    if count == 0:
        raise TdbError(f"{flag}: {text!r}: CUDA is not available here (torch {torch.__version__})")
    number = int(index or 0)
    if number >= count:
        raise TdbError(
            f"{flag}: {text!r}: there are {count} CUDA devices, cuda:0..cuda:{count - 1}"
        )
    return torch.device("cuda", number)


def computes_in(dtype: torch.dtype, device: torch.device) -> str | None:
    """Why `device` cannot run a model in `dtype` (None: it can): a matmul, a softmax and an
    inverse square root in that dtype, tried on the device."""
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        return f"{torch.cuda.get_device_name(device)} has no bfloat16"
    try:
        x = torch.ones(2, 2, dtype=dtype, device=device)
        (x @ x).softmax(dim=-1).rsqrt()
    except (RuntimeError, TypeError, NotImplementedError) as e:
        return reason(e)
    return None


def check_dtype_on(dtype: torch.dtype, device: torch.device, flag: str = "--dtype") -> None:
    """Refuse a dtype the device cannot compute in, naming `flag`."""
    if (why := computes_in(dtype, device)) is not None:
        raise TdbError(f"{flag}: {dtype_name(dtype)} is not supported on {device} ({why})")


CPU = torch.device("cpu")


@dataclass(frozen=True)
class Placement:
    """Where the weights go and in which dtype (None: decide from the checkpoint, `auto`).

    `layer_devices` (a device map) gives each layer's device; without one every weight is on
    `device`."""

    device: torch.device = CPU
    dtype: torch.dtype | None = torch.float32
    layer_devices: tuple[torch.device, ...] | None = None
    map_text: str | None = field(default=None, compare=False)  # what --device-map said

    @staticmethod
    def parse(device: str = "cpu", dtype: str = "auto", device_map: str | None = None) -> Placement:
        """The placement the options name, checked against this machine (TdbError if not)."""
        if dtype not in DTYPE_CHOICES:
            raise TdbError(f"--dtype: {dtype!r} is not a dtype (use {', '.join(DTYPE_CHOICES)})")
        where = parse_device(device)
        chosen = None if dtype == "auto" else DTYPES[dtype]
        if chosen is not None:
            check_dtype_on(chosen, where)
        return Placement(where, chosen, None, device_map)

    def dtype_for(self, checkpoint_dtype: torch.dtype) -> torch.dtype:
        """The dtype to load in: the one asked for; on `auto` the checkpoint's on an accelerator
        (float32 if it is not a floating format tdb computes in), float32 on the CPU."""
        if self.dtype is not None:
            return self.dtype
        if self.device.type == "cpu" or checkpoint_dtype not in DTYPES.values():
            return torch.float32
        return checkpoint_dtype

    def device_of(self, layer: int | None, n_layer: int, last: bool = False) -> torch.device:
        """The device of one layer's weights; `layer=None`: the embedding (or, `last`, the
        final norm and unembedding), which sit with the first (last) layer."""
        if self.layer_devices is None:
            return self.device
        if layer is None:
            layer = n_layer - 1 if last else 0
        return self.layer_devices[layer]


CPU_FLOAT32 = Placement()


def parse_layer_list(text: str) -> dict[int, str]:
    """`0:cuda:0,1:cuda:0,2:cuda:1` (or `0-1:cpu,2:cpu`): a device per layer."""
    out: dict[int, str] = {}
    for item in text.split(","):
        layers, sep, device = item.strip().partition(":")
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", layers.strip())
        if not sep or match is None or not device:
            raise TdbError(
                f"--device-map: {item.strip()!r} is not LAYER:DEVICE or FIRST-LAST:DEVICE "
                "(e.g. 0-15:cuda:0,16-31:cuda:1)"
            )
        first = int(match.group(1))
        for layer in range(first, int(match.group(2) or first) + 1):
            out[layer] = device
    return out


def read_map_file(path: Path) -> dict[int, str]:
    """A JSON object `{"0": "cuda:0", ...}` (layer -> device), or accelerate's module names
    (`{"blocks.0": 0, ...}`) as `infer_auto_device_map` writes them."""
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TdbError(f"--device-map: {path} is not a readable JSON file ({reason(e)})") from None
    if not isinstance(values, dict):
        raise TdbError(f"--device-map: {path} must hold a JSON object of layer -> device")
    out: dict[int, str] = {}
    for key, device in values.items():
        match = re.fullmatch(r"(?:blocks\.)?(\d+)", str(key))
        if match is None:
            continue  # the embedding and the unembedding follow the layers
        out[int(match.group(1))] = f"cuda:{device}" if isinstance(device, int) else str(device)
    return out


def layer_devices_from(text: str, n_layer: int) -> tuple[torch.device, ...]:
    """Each layer's device from a map file or inline list, every layer named, every device
    present here."""
    path = Path(text).expanduser()
    named = read_map_file(path) if path.suffix == ".json" or path.is_file() else None
    if named is None:
        named = parse_layer_list(text)
    if missing := [layer for layer in range(n_layer) if layer not in named]:
        raise TdbError(
            f"--device-map: names no device for layer {missing[0]} "
            f"(the model has layers 0..{n_layer - 1})"
        )
    if extra := sorted(layer for layer in named if layer >= n_layer):
        raise TdbError(f"--device-map: names layer {extra[0]}; the model has 0..{n_layer - 1}")
    return tuple(parse_device(named[layer], "--device-map") for layer in range(n_layer))


def plan_auto(meta_model: nn.Module, n_layer: int, dtype: torch.dtype) -> tuple[torch.device, ...]:
    """accelerate's balanced placement of the layers over the visible GPUs (whole layers: a
    `Block` is never split), from the model built on the meta device (no memory)."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    if cuda_count() == 0:
        raise TdbError("--device-map auto: needs CUDA GPUs, and CUDA is not available here")
    no_split = ["Block"]
    memory = get_balanced_memory(meta_model, dtype=dtype, no_split_module_classes=no_split)
    memory = {k: v for k, v in memory.items() if k != "cpu"}  # GPUs only: never offload
    plan = infer_auto_device_map(
        meta_model, max_memory=memory, no_split_module_classes=no_split, dtype=dtype
    )
    return devices_from_plan(plan, n_layer)


def devices_from_plan(
    plan: dict[str, int | str | torch.device], n_layer: int
) -> tuple[torch.device, ...]:
    """Each layer's device from accelerate's module -> device plan; a plan that puts any weight
    on the CPU or the disk does not fit the GPUs: a TdbError."""
    off = sorted(name or "the model" for name, d in plan.items() if str(d) in {"cpu", "disk"})
    if off:
        raise TdbError(
            f"--device-map auto: the model does not fit the GPUs' memory ({off[0]} would go to "
            f"{plan[off[0] if off[0] != 'the model' else '']}); use fewer layers or a smaller dtype"
        )

    def device(name: str) -> torch.device:
        # The most specific entry covering `name` (a whole block, or the whole model).
        for key in sorted(plan, key=len, reverse=True):
            if name == key or name.startswith(key + ".") or key == "":
                d = plan[key]
                return torch.device("cuda", d) if isinstance(d, int) else torch.device(d)
        raise TdbError(f"--device-map auto: accelerate placed no device for {name}")

    return tuple(device(f"blocks.{layer}") for layer in range(n_layer))


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> "bfloat16" (a TdbError for a dtype tdb does not compute in)."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise TdbError(f"--dtype: {dtype} is not supported (use {', '.join(DTYPE_CHOICES)})")


def weight_bytes(meta_model: nn.Module, placed: Placement, n_layer: int) -> dict[torch.device, int]:
    """How many bytes of weights each device gets."""
    assert placed.dtype is not None
    size = torch.tensor([], dtype=placed.dtype).element_size()
    out: dict[torch.device, int] = {}
    for name, p in meta_model.named_parameters():
        match = re.match(r"blocks\.(\d+)\.", name)
        layer = int(match.group(1)) if match else None
        device = placed.device_of(layer, n_layer, last=name.split(".")[0] not in FIRST)
        out[device] = out.get(device, 0) + p.numel() * size
    return out


def check_fits(meta_model: nn.Module, placed: Placement, n_layer: int) -> None:
    """Refuse a placement whose weights alone exceed a GPU's free memory (loading would fail
    half-way with an out-of-memory error)."""
    flag = "--device-map" if placed.layer_devices is not None else "--device"
    for device, needed in weight_bytes(meta_model, placed, n_layer).items():
        if device.type != "cuda":
            continue
        free, _ = torch.cuda.mem_get_info(device)
        if needed > free:
            raise TdbError(
                f"{flag}: the weights placed on {device} need {needed / 2**30:.1f} GiB and it has "
                f"{free / 2**30:.1f} GiB free (use --device-map auto, more GPUs or a smaller dtype)"
            )


def resolve_placement(
    placement: Placement, meta_model: nn.Module, n_layer: int, dtype: torch.dtype
) -> Placement:
    """The placement with its dtype decided and its device map (if any) turned into each
    layer's device, checked against the devices here."""
    if placement.map_text is None:
        layers = None
    elif placement.map_text == "auto":
        layers = plan_auto(meta_model, n_layer, dtype)
    else:
        layers = layer_devices_from(placement.map_text, n_layer)
    devices = set(layers) if layers is not None else {placement.device}
    for device in devices:
        check_dtype_on(dtype, device)
    first = layers[0] if layers is not None else placement.device
    placed = Placement(first, dtype, layers, placement.map_text)
    check_fits(meta_model, placed, n_layer)
    return placed
