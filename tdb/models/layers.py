"""Pieces shared by the architectures: activations, LayerNorm, RMSNorm, rotary position
embeddings, the causal (optionally sliding-window) mask, multi-head attention (grouped-query,
rotary or not), and the plain and gated MLPs. Each model file puts them together in its block.

    >>> rotary = Rotary.at(position_ids, RopeConfig(theta=10000.0, rotary_dim=64))
    >>> out = attn(ln_1(x, hooks), causal_mask(n_pos, None, None, x.device), hooks, rotary)

Every piece calls the same hook points at the same meaning in every architecture (see
`tdb.hooks`), so the capture and the metrics need no special case per architecture. Weights are
stored in the shapes the math uses: `W_Q[head, d_model, d_head]`, `W_O[head, d_head, d_model]`,
`W_out[d_mlp, d_model]`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from tdb.hooks import HookPoint, Hooks

ROPE_SCALINGS = ("default", "linear", "llama3")

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}


def normal(*shape: int, std: float = 0.02) -> nn.Parameter:
    """A freshly initialised weight. On the meta device (where loading builds models, about to
    replace every weight) nothing is drawn: meta random numbers cost ~7 ms a call."""
    weight = torch.empty(*shape)
    return nn.Parameter(weight if weight.is_meta else weight.normal_(0.0, std))


def zeros(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape))


def device_of(module: nn.Module) -> torch.device:
    """Where a module's weights are (one layer of a device map sits on one device)."""
    return next(module.parameters()).device


class LayerNorm(nn.Module):
    """Layer norm whose scale 1/sqrt(var + eps) is a hook point, so it can be read or frozen."""

    def __init__(self, d_model: int, eps: float, scale_point: HookPoint) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(d_model))
        self.b = nn.Parameter(torch.zeros(d_model))
        self.eps = eps
        self.scale_point = scale_point

    def forward(
        self, x: Float[Tensor, "batch pos d_model"], hooks: Hooks
    ) -> Float[Tensor, "batch pos d_model"]:
        # In float32 whatever the model's dtype, as transformers does; the result is cast back.
        x32 = x.float()
        centred = x32 - x32.mean(dim=-1, keepdim=True)
        scale = (centred.pow(2).mean(dim=-1, keepdim=True) + self.eps).rsqrt()  # [batch pos 1]
        scale = hooks(self.scale_point, scale)
        return (centred * scale * self.w.float() + self.b.float()).to(x.dtype)


class RMSNorm(nn.Module):
    """x · scale · w with scale = 1/sqrt(mean(x²) + eps) a hook point, so it can be read or frozen.

    Gemma's (1 + w) gain is folded into `w` when its checkpoint is loaded.
    """

    def __init__(self, d_model: int, eps: float, scale_point: HookPoint) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(d_model))
        self.eps = eps
        self.scale_point = scale_point

    def forward(
        self, x: Float[Tensor, "batch pos d_model"], hooks: Hooks
    ) -> Float[Tensor, "batch pos d_model"]:
        x32 = x.float()  # in float32 whatever the model's dtype, cast back at the end
        scale = (x32.pow(2).mean(dim=-1, keepdim=True) + self.eps).rsqrt()  # [batch pos 1]
        scale = hooks(self.scale_point, scale)
        return (x32 * scale * self.w.float()).to(x.dtype)


# --- rotary position embeddings --------------------------------------------------------------


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: the first `rotary_dim` dims of each query and key head turn, in pairs
    (i, i + rotary_dim/2), by position · inverse_frequency[i]; the rest pass through.

    `scaling` stretches the frequencies for longer contexts: "linear" divides them all by
    `factor`; "llama3" (Llama 3.1) divides those with wavelengths longer than
    `original_n_ctx / low_freq_factor`, keeps those shorter than `original_n_ctx /
    high_freq_factor`, and blends in between.
    """

    theta: float
    rotary_dim: int
    scaling: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_n_ctx: int = 8192


def inverse_frequencies(rope: RopeConfig) -> Float[Tensor, " half_rotary"]:
    """theta^(-2i / rotary_dim) for i < rotary_dim / 2, scaled as `rope.scaling` says."""
    exponents = torch.arange(0, rope.rotary_dim, 2, dtype=torch.float32) / rope.rotary_dim
    inv_freq = 1.0 / rope.theta**exponents
    if rope.scaling == "linear":
        return inv_freq / rope.factor
    if rope.scaling == "llama3":
        wavelength = 2 * math.pi / inv_freq
        # 1 keeps a frequency, 0 divides it by `factor`; linear in context / wavelength between.
        keep = (rope.original_n_ctx / wavelength - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        keep = keep.clamp(0.0, 1.0)
        return keep * inv_freq + (1 - keep) * inv_freq / rope.factor
    return inv_freq


@dataclass(frozen=True)
class Rotary:
    """cos and sin of every position's rotation angles, computed once per forward pass."""

    cos: Float[Tensor, "batch pos half_rotary"]
    sin: Float[Tensor, "batch pos half_rotary"]

    @staticmethod
    def at(position_ids: Int[Tensor, "batch pos"], rope: RopeConfig) -> Rotary:
        """>>> Rotary.at(torch.arange(5)[None], RopeConfig(theta=1e4, rotary_dim=8))"""
        inv_freq = inverse_frequencies(rope).to(position_ids.device)
        angles = position_ids[..., None].float() * inv_freq  # [batch pos half_rotary]
        return Rotary(angles.cos(), angles.sin())

    def to(self, device: torch.device) -> Rotary:
        """The same rotations on `device` (a device map's layer boundary)."""
        return (
            self if self.cos.device == device else Rotary(self.cos.to(device), self.sin.to(device))
        )

    def rotate(
        self, x: Float[Tensor, "batch pos head d_head"]
    ) -> Float[Tensor, "batch pos head d_head"]:
        """Turn each pair (x[i], x[i + half]) by its angle; dims past the rotary part pass."""
        half = self.cos.shape[-1]
        x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
        # Angles in float32, the product in the model's dtype (as transformers does).
        cos = self.cos[:, :, None].to(x.dtype)  # [batch pos 1 half_rotary]
        sin = self.sin[:, :, None].to(x.dtype)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


def causal_mask(
    n_pos: int,
    window: int | None,
    attention_mask: Bool[Tensor, "#batch query_pos key_pos"] | None,
    device: torch.device,
) -> Bool[Tensor, "#batch query_pos key_pos"]:
    """True where a query may attend: keys at or before it, and (sliding window) fewer than
    `window` tokens back; combined with the caller's `attention_mask` (True = may attend)."""
    query = torch.arange(n_pos, device=device)[:, None]
    key = torch.arange(n_pos, device=device)[None, :]
    allowed = key <= query  # [query_pos key_pos]
    if window is not None:
        allowed = allowed & (key > query - window)
    return allowed[None] if attention_mask is None else allowed[None] & attention_mask


# --- attention ---------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head attention with `n_kv_head` key/value heads shared by groups of
    `n_head // n_kv_head` query heads (grouped-query; n_kv_head = n_head is plain multi-head).
    Rotary when `rope` is given; without (GPT-2) positions are in the residual stream already.

    K and V are hooked per query head (the shared heads repeated), so every hook point and every
    metric sees `n_head` ordinary heads, and a hook may change one query head's key alone.
    Scores are q · k · `score_scale`, by default 1 / sqrt(d_head).
    """

    def __init__(
        self,
        d_model: int,
        n_head: int,
        n_kv_head: int,
        d_head: int,
        rope: RopeConfig | None,
        score_scale: float | None = None,
    ) -> None:
        super().__init__()
        if n_head % n_kv_head:
            raise ValueError(f"{n_head} query heads cannot share {n_kv_head} key/value heads")
        self.W_Q = normal(n_head, d_model, d_head)
        self.W_K = normal(n_kv_head, d_model, d_head)
        self.W_V = normal(n_kv_head, d_model, d_head)
        self.b_Q = zeros(n_head, d_head)
        self.b_K = zeros(n_kv_head, d_head)
        self.b_V = zeros(n_kv_head, d_head)
        self.W_O = normal(n_head, d_head, d_model)
        self.b_O = zeros(d_model)
        self.group = n_head // n_kv_head
        self.score_scale = 1.0 / math.sqrt(d_head) if score_scale is None else score_scale
        self.rope = rope  # the forward pass gets its rotations ready-made; head_logit needs this

    def per_query_head(
        self, x: Float[Tensor, "batch pos kv_head d_head"]
    ) -> Float[Tensor, "batch pos head d_head"]:
        if self.group == 1:
            return x
        return x.repeat_interleave(self.group, dim=2)  # query head h reads kv head h // group

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        mask: Bool[Tensor, "#batch query_pos key_pos"],
        hooks: Hooks,
        rotary: Rotary | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        # Plain matmuls (einsum's own planning costs more than it saves at these shapes).
        q = self._projected(x, self.W_Q) + self.b_Q  # [batch pos head d_head]
        k = self._projected(x, self.W_K) + self.b_K  # [batch pos kv_head d_head]
        v = self._projected(x, self.W_V) + self.b_V  # [batch pos kv_head d_head]
        if rotary is not None:
            q, k = rotary.rotate(q), rotary.rotate(k)
        q = hooks(HookPoint.Q, q)
        k = hooks(HookPoint.K, self.per_query_head(k))
        v = hooks(HookPoint.V, self.per_query_head(v))
        logits = (q.transpose(1, 2) @ k.permute(0, 2, 3, 1)) * self.score_scale
        logits = hooks(HookPoint.ATTN_LOGITS, logits)  # [batch head query_pos key_pos]
        logits = logits.masked_fill(~mask[:, None], float("-inf"))
        # The softmax in float32 whatever the model's dtype, as transformers does.
        probs = logits.softmax(dim=-1, dtype=torch.float32).to(logits.dtype)
        probs = hooks(HookPoint.ATTN_PROBS, probs)
        z = hooks(HookPoint.ATTN_Z, (probs @ v.transpose(1, 2)).transpose(1, 2))  # bqhe
        n_head, d_head, d_model = self.W_O.shape
        out = z.reshape(*z.shape[:2], n_head * d_head) @ self.W_O.reshape(-1, d_model)
        return out + self.b_O  # [batch pos d_model]

    def query_change(
        self, dx: Float[Tensor, "batch pos d_model"], position_ids: Int[Tensor, "batch pos"]
    ) -> Float[Tensor, "batch pos head d_head"]:
        """The change of `Q` when the attention input changes by `dx` (linear: no bias)."""
        return self._rotated(dx, self.W_Q, position_ids)

    def key_change(
        self, dx: Float[Tensor, "batch pos d_model"], position_ids: Int[Tensor, "batch pos"]
    ) -> Float[Tensor, "batch pos head d_head"]:
        """The change of `K` (per query head) when the attention input changes by `dx`."""
        return self.per_query_head(self._rotated(dx, self.W_K, position_ids))

    def value_change(
        self, dx: Float[Tensor, "batch pos d_model"], position_ids: Int[Tensor, "batch pos"]
    ) -> Float[Tensor, "batch pos head d_head"]:
        """The change of `V` (per query head) when the attention input changes by `dx`. Values
        do not turn, so `position_ids` is unused: it is there to match the other two."""
        return self.per_query_head(self._projected(dx, self.W_V))

    def _projected(self, dx: Tensor, W: Float[Tensor, "h d_model d_head"]) -> Tensor:
        flat = W.permute(1, 0, 2).reshape(W.shape[1], -1)  # [d_model h*d_head]
        return (dx @ flat).reshape(*dx.shape[:2], W.shape[0], W.shape[2])  # [batch pos h d_head]

    def _rotated(
        self, dx: Tensor, W: Float[Tensor, "h d_model d_head"], position_ids: Tensor
    ) -> Tensor:
        out = self._projected(dx, W)
        return out if self.rope is None else Rotary.at(position_ids, self.rope).rotate(out)

    def head_value(self, x_key: Float[Tensor, " d_model"], head: int) -> Float[Tensor, " d_head"]:
        """One query head's value from the (normalised) key residual stream."""
        kv_head = head // self.group
        return x_key @ self.W_V[kv_head] + self.b_V[kv_head]

    def head_logit(
        self,
        x_query: Float[Tensor, " d_model"],
        x_key: Float[Tensor, " d_model"],
        head: int,
        query_pos: int,
        key_pos: int,
    ) -> Float[Tensor, ""]:
        """One head's attention logit from the (normalised) query and key residual streams at
        token positions `query_pos` and `key_pos` (the rotation, if any, depends on them)."""
        kv_head = head // self.group
        q = x_query @ self.W_Q[head] + self.b_Q[head]  # [d_head]
        k = x_key @ self.W_K[kv_head] + self.b_K[kv_head]
        if self.rope is None:
            return (q @ k) * self.score_scale
        positions = torch.tensor([[query_pos, key_pos]], device=q.device)  # [batch=1 pos=2]
        rotary = Rotary.at(positions, self.rope)
        qk = rotary.rotate(torch.stack([q, k])[None, :, None])[0, :, 0]  # [2 d_head]
        return (qk[0] @ qk[1]) * self.score_scale


# --- MLPs -------------------------------------------------------------------------------------


class MLP(nn.Module):
    """act(x @ W_in + b_in) @ W_out + b_out; one node per hidden unit."""

    def __init__(self, d_model: int, d_mlp: int, act: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.W_in = normal(d_model, d_mlp)
        self.b_in = zeros(d_mlp)
        self.W_out = normal(d_mlp, d_model)
        self.b_out = zeros(d_model)
        self.act = act

    def forward(
        self, x: Float[Tensor, "batch pos d_model"], hooks: Hooks
    ) -> Float[Tensor, "batch pos d_model"]:
        pre = hooks(HookPoint.MLP_PRE, x @ self.W_in + self.b_in)  # [batch pos d_mlp]
        post = hooks(HookPoint.MLP_POST, self.act(pre))
        return post @ self.W_out + self.b_out

    def pre_activation(self, x: Float[Tensor, " d_model"], neuron: int) -> Float[Tensor, ""]:
        return x @ self.W_in[:, neuron] + self.b_in[neuron]


class GatedMLP(nn.Module):
    """(act(x @ W_gate) * (x @ W_up)) @ W_out: a node is one hidden unit, its activation
    act(gate) * up (`MLP_POST`), its write that times its row of W_out. `MLP_PRE` is the gate
    before the activation, `MLP_UP` the linear branch. Biases are zero unless the checkpoint
    has them (Llama's `mlp_bias`)."""

    def __init__(self, d_model: int, d_mlp: int, act: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.W_gate = normal(d_model, d_mlp)
        self.b_gate = zeros(d_mlp)
        self.W_up = normal(d_model, d_mlp)
        self.b_up = zeros(d_mlp)
        self.W_out = normal(d_mlp, d_model)
        self.b_out = zeros(d_model)
        self.act = act

    def forward(
        self, x: Float[Tensor, "batch pos d_model"], hooks: Hooks
    ) -> Float[Tensor, "batch pos d_model"]:
        gate = hooks(HookPoint.MLP_PRE, x @ self.W_gate + self.b_gate)  # [batch pos d_mlp]
        up = hooks(HookPoint.MLP_UP, x @ self.W_up + self.b_up)  # [batch pos d_mlp]
        post = hooks(HookPoint.MLP_POST, self.act(gate) * up)
        return post @ self.W_out + self.b_out

    def pre_activation(self, x: Float[Tensor, " d_model"], neuron: int) -> Float[Tensor, ""]:
        """The gate's pre-activation (what `MLP_PRE` holds)."""
        return x @ self.W_gate[:, neuron] + self.b_gate[neuron]
