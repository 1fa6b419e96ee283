"""Reading a Hugging Face `config.json`: typed values, and errors that name the file and the key.

    >>> hf = HFConfig(json.loads(path.read_text()), path)
    >>> hf.integer("hidden_size"), hf.number("rms_norm_eps", 1e-6)

Also the rotary position embedding's settings (`rope_from_hf`), which every rotary architecture
reads the same way: the `rope_parameters` of transformers 5, or the `rope_theta` /
`rope_scaling` keys of older checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tdb.errors import TdbError
from tdb.models.layers import ROPE_SCALINGS, RopeConfig

# The largest size (of a dimension, a context, a vocabulary) a config.json may give: far above
# any real model's, and small enough that products of sizes fit torch's 64-bit shapes.
MAX_SIZE = 2**31 - 1
# The most layers: far above any real model's, and few enough that per-layer settings fit.
MAX_LAYERS = 100_000


@dataclass(frozen=True)
class HFConfig:
    """The values of one `config.json`; `where` is its path, for error messages."""

    values: Mapping[str, object]
    where: Path

    def error(self, message: str) -> TdbError:
        return TdbError(f"{self.where}: {message}")

    def has(self, key: str) -> bool:
        return self.values.get(key) is not None

    def get(self, key: str, default: object = None) -> object:
        value = self.values.get(key)
        return default if value is None else value

    def required(self, key: str, default: object, kind: str) -> object:
        value = self.get(key, default)
        if value is None:
            raise self.error(f"{key} is missing ({kind} expected)")
        return value

    def integer(self, key: str, default: int | None = None) -> int:
        value = self.required(key, default, "an integer")
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.error(f"{key} must be an integer, got {value!r}")
        return value

    def size(self, key: str, default: int | None = None, maximum: int = MAX_SIZE) -> int:
        """A count or dimension: an integer in 1..maximum."""
        value = self.integer(key, default)
        if not 1 <= value <= maximum:
            raise self.error(f"{key} must be an integer in 1..{maximum}, got {value}")
        return value

    def layers(self, key: str) -> int:
        return self.size(key, maximum=MAX_LAYERS)

    def optional_size(self, key: str) -> int | None:
        return self.size(key) if self.has(key) else None

    def number(self, key: str, default: float | None = None) -> float:
        value = self.required(key, default, "a number")
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise self.error(f"{key} must be a number, got {value!r}")
        if not math.isfinite(value):  # json.loads reads NaN and Infinity
            raise self.error(f"{key} must be a finite number, got {value!r}")
        return float(value)

    def positive(self, key: str, default: float | None = None) -> float:
        value = self.number(key, default)
        if value <= 0:
            raise self.error(f"{key} must be a number > 0, got {value!r}")
        return value

    def epsilon(self, key: str, default: float) -> float:
        """A normalisation's epsilon: a number >= 0 (below 0 the square root turns NaN)."""
        value = self.number(key, default)
        if value < 0:
            raise self.error(f"{key} must be a number >= 0, got {value!r}")
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self.required(key, default, "true or false")
        if not isinstance(value, bool):
            raise self.error(f"{key} must be true or false, got {value!r}")
        return value

    def text(self, key: str, default: str | None = None) -> str:
        value = self.required(key, default, "a string")
        if not isinstance(value, str):
            raise self.error(f"{key} must be a string, got {value!r}")
        return value

    def strings(self, key: str) -> list[str] | None:
        value = self.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(f"{key} must be a list of strings, got {value!r}")
        return [str(v) for v in value]

    def mapping(self, key: str) -> Mapping[str, object] | None:
        value = self.get(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self.error(f"{key} must be an object, got {value!r}")
        return value


def rope_from_hf(
    hf: HFConfig,
    d_head: int,
    theta_key: str = "rope_theta",
    partial_key: str = "partial_rotary_factor",
    default_partial: float = 1.0,
) -> RopeConfig:
    """The rotary embedding of a checkpoint. `theta_key` / `partial_key` name the pre-transformers-5
    top-level keys (GPT-NeoX: `rotary_emb_base`, `rotary_pct`).

    >>> rope_from_hf(hf, d_head=64)  # RopeConfig(theta=10000.0, rotary_dim=64, ...)
    """
    params = hf.mapping("rope_parameters") or hf.mapping("rope_scaling") or {}
    if any(isinstance(v, dict) for v in params.values()):
        raise hf.error("rotary parameters that differ between layers are not supported")
    rope = HFConfig(params, hf.where)
    scaling = rope.text("rope_type", rope.text("type", "default"))
    if scaling not in ROPE_SCALINGS:
        raise hf.error(
            f"unsupported rotary scaling {scaling!r} (supported: {', '.join(ROPE_SCALINGS)})"
        )
    partial = rope.number("partial_rotary_factor", hf.number(partial_key, default_partial))
    if not 0 < partial <= 1:
        raise hf.error(f"the rotary part of each head must be a fraction in (0, 1]: {partial}")
    rotary_dim = int(d_head * partial)
    if rotary_dim % 2 or not 0 < rotary_dim <= d_head:
        raise hf.error(f"the rotary part of each head must be even and 1..{d_head}: {rotary_dim}")
    scaled = scaling != "default"
    return RopeConfig(
        theta=rope.positive("rope_theta", hf.positive(theta_key, 10000.0)),
        rotary_dim=rotary_dim,
        scaling=scaling,
        factor=rope.positive("factor") if scaled else 1.0,
        low_freq_factor=rope.positive("low_freq_factor", 1.0),
        high_freq_factor=rope.positive("high_freq_factor", 4.0),
        original_n_ctx=rope.size(
            "original_max_position_embeddings", hf.size("max_position_embeddings", 8192)
        ),
    )
