"""The derived scalars of the node table: one small pure function per (node type, metric).

Every function reads one layer's worth of captured tensors and returns one value per node of that
layer, in the node type's grid layout:

    embedding       [pos]
    attention_head  [head query_pos key_pos]   (pairs with key > query are not nodes, see
                                                 `node_mask`; their values are never read)
    mlp_neuron      [pos d_mlp]
    autoencoder_latent  [pos d_sae]            (one SAE at a time: its layer and site are
                                                 the capture's business)

`g` is the gradient of the direction with respect to the residual stream at the direction's
position, the final layer norm's scale held fixed; a write vector w at that position changes the
direction by exactly w · g, and anywhere else not at all (directly).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

import torch
from jaxtyping import Float
from torch import Tensor

from tdb.nodes import NODE_SPECS, NodeType


class Group(StrEnum):
    """A metric: one column of the node table, comparable across node types."""

    ACTIVATION = "activation"
    WRITE_NORM = "write_norm"
    DIRECT_EFFECT = "direct_effect"
    ACT_TIMES_GRAD = "act_times_grad"


ALL_GROUPS = tuple(Group)
# What identifies a metric: a `Group` member, or a member of a caller's own StrEnum that has an
# entry in `METRIC_SPECS` (tests/test_registry.py adds one that way).
Metric = StrEnum
# Which node coordinate each grid axis holds, per node type (from the node types' specs).
GRID_AXES: dict[NodeType, tuple[int, ...]] = {t: spec.grid_axes for t, spec in NODE_SPECS.items()}


@dataclass(frozen=True)
class ReadOut:
    """Where the direction reads the residual stream, and its gradient there: a write vector w
    at `positions[i]` changes the direction by exactly w · g[i] (reading norms' scales fixed)."""

    positions: tuple[int, ...]
    g: Float[Tensor, "read_pos d_model"]


@dataclass(frozen=True)
class EmbeddingInputs:
    resid: Float[Tensor, "pos d_model"]  # token + position embedding
    grad: Float[Tensor, "pos d_model"] | None  # dD/d(resid)
    read: ReadOut


@dataclass(frozen=True)
class KeyTerms:
    """A head's write at (query, key) is p · (v[key, head] W_O[head]): its per-key factors,
    computed once per layer so that the layer's query chunks (tdb.attention_chunks) share them."""

    write_norm: Float[Tensor, "key_pos head"]  # ‖v W_O[h]‖
    write_g: Float[Tensor, "read_pos head key_pos"]  # (v W_O[h]) · g at each read position


@dataclass(frozen=True)
class AttentionInputs:
    """One layer's heads, or one query chunk of them: `probs` rows are the queries
    `first_query`, `first_query + 1`, ... and its columns the keys 0, 1, ... (a chunk may stop
    at its last query: later keys are not nodes)."""

    probs: Float[Tensor, "head query_pos key_pos"]
    grad_probs: Float[Tensor, "head query_pos key_pos"] | None
    v: Float[Tensor, "pos head d_head"] | None  # value bias included; only if a metric reads it
    W_O: Float[Tensor, "head d_head d_model"]
    read: ReadOut
    first_query: int = 0
    keys: KeyTerms | None = None  # None: computed from v when a metric needs it


@dataclass(frozen=True)
class MlpInputs:
    post: Float[Tensor, "pos d_mlp"]
    grad_post: Float[Tensor, "pos d_mlp"] | None
    W_out: Float[Tensor, "d_mlp d_model"]
    read: ReadOut


@dataclass(frozen=True)
class LatentInputs:
    z: Float[Tensor, "pos d_sae"]
    grad_z: Float[Tensor, "pos d_sae"] | None
    write_dirs: Float[Tensor, "d_sae d_model"]  # per latent, its write per unit of z
    read: ReadOut


def node_mask(node_type: NodeType, layer_shape: tuple[int, ...], last_token: int) -> Tensor:
    """Which entries of one layer's grid are nodes that can affect the direction: tokens up to
    `last_token` (the last one it reads), and for heads key <= query."""
    if node_type is NodeType.ATTENTION_HEAD:
        n_head, n_pos, _ = layer_shape
        causal = torch.ones(n_pos, n_pos, dtype=torch.bool).tril()  # [query_pos key_pos]
        causal[last_token + 1 :] = False
        return causal.expand(n_head, n_pos, n_pos)
    mask = torch.ones(layer_shape, dtype=torch.bool)
    mask[last_token + 1 :] = False  # [pos ...]
    return mask


def grad_or_fail(grad: Tensor | None) -> Tensor:
    if grad is None:
        raise ValueError("act_times_grad needs the backward pass, which was not run")
    return grad


def values_or_fail(v: Tensor | None) -> Tensor:
    if v is None:
        raise ValueError("this metric reads the attention values, which were not saved")
    return v


# --- embeddings: activation 1, write vector = the embedding itself ---------------------------


def embedding_activation(x: EmbeddingInputs) -> Tensor:
    return torch.ones(x.resid.shape[0], dtype=x.resid.dtype, device=x.resid.device)


def embedding_write_norm(x: EmbeddingInputs) -> Tensor:
    return x.resid.pow(2).sum(dim=-1).sqrt()


def embedding_direct_effect(x: EmbeddingInputs) -> Tensor:
    out = x.resid.new_zeros(x.resid.shape[0])
    positions = list(x.read.positions)
    out[positions] = (x.resid[positions] * x.read.g).sum(dim=-1)
    return out


def embedding_act_times_grad(x: EmbeddingInputs) -> Tensor:
    return (x.resid * grad_or_fail(x.grad)).sum(dim=-1)


# --- attention heads at (query, key): activation p, write vector p · (v[key, head] @ W_O[head]) --


def head_activation(x: AttentionInputs) -> Tensor:
    return x.probs


def key_terms(
    v: Float[Tensor, "pos head d_head"], W_O: Float[Tensor, "head d_head d_model"], read: ReadOut
) -> KeyTerms:
    """The per-key factors of every head's write vector (see `KeyTerms`), in float32."""
    v, W_O = v.float(), W_O.float()
    # ‖v W_O[h]‖² = v · (W_O[h] W_O[h]ᵀ) v: d_head² multiplications per key and head instead of
    # d_head · d_model (the corpus scan computes this for every token of every batch).
    gram = torch.einsum("hed,hfd->hef", W_O, W_O)  # [head d_head d_head]
    per_head = v.transpose(0, 1)  # [head key_pos d_head]
    # One batched matmul per head (a three-operand einsum plans worse: 2x slower on the CPU).
    squared = (torch.bmm(per_head, gram) * per_head).sum(dim=-1).T  # [key_pos head]
    write_g = [
        torch.einsum("khe,he->hk", v, W_O @ g.float())  # [head key_pos]
        for g in read.g
    ]
    return KeyTerms(
        squared.clamp(min=0).sqrt(),
        torch.stack(write_g) if write_g else v.new_zeros(0, v.shape[1], v.shape[0]),
    )


def keys_of(x: AttentionInputs) -> KeyTerms:
    return key_terms(values_or_fail(x.v), x.W_O, x.read) if x.keys is None else x.keys


def head_write_norm(x: AttentionInputs) -> Tensor:
    n_keys = x.probs.shape[-1]
    return x.probs * keys_of(x).write_norm[:n_keys].T[:, None, :]  # [head query_pos key_pos]


def head_direct_effect(x: AttentionInputs) -> Tensor:
    out = torch.zeros_like(x.probs)
    n_query, n_keys = x.probs.shape[1:]
    for query, write_g in zip(x.read.positions, keys_of(x).write_g, strict=True):
        row = query - x.first_query
        if 0 <= row < n_query:
            out[:, row] = x.probs[:, row] * write_g[:, :n_keys]
    return out


def head_act_times_grad(x: AttentionInputs) -> Tensor:
    return x.probs * grad_or_fail(x.grad_probs)


# --- MLP neurons: activation a, write vector a · W_out[neuron] -------------------------------


def neuron_activation(x: MlpInputs) -> Tensor:
    return x.post


def scaled_write_norm(act: Tensor, writes: Tensor) -> Tensor:
    """|a| · ‖w‖ per unit: activations [pos unit] scaling fixed write vectors [unit d_model]."""
    return act.abs() * writes.pow(2).sum(dim=-1).sqrt()


def scaled_direct_effect(act: Tensor, writes: Tensor, read: ReadOut) -> Tensor:
    """a · (w · g) at the read positions, zero elsewhere (units that write a · w)."""
    out = torch.zeros_like(act)
    positions = list(read.positions)
    out[positions] = act[positions] * (read.g @ writes.T)  # [read_pos unit]
    return out


def neuron_write_norm(x: MlpInputs) -> Tensor:
    return scaled_write_norm(x.post, x.W_out)


def neuron_direct_effect(x: MlpInputs) -> Tensor:
    return scaled_direct_effect(x.post, x.W_out, x.read)


def neuron_act_times_grad(x: MlpInputs) -> Tensor:
    return x.post * grad_or_fail(x.grad_post)


# --- SAE latents: activation z, write vector z · write_dirs[latent] (tdb.latents) ------------


def latent_activation(x: LatentInputs) -> Tensor:
    return x.z


def latent_write_norm(x: LatentInputs) -> Tensor:
    return scaled_write_norm(x.z, x.write_dirs)


def latent_direct_effect(x: LatentInputs) -> Tensor:
    return scaled_direct_effect(x.z, x.write_dirs, x.read)


def latent_act_times_grad(x: LatentInputs) -> Tensor:
    return x.z * grad_or_fail(x.grad_z)


@dataclass(frozen=True)
class MetricSpec:
    """Everything about one metric: its function per node type, and what it needs.

    `signed`: the multi-group top-k keeps its bottom k too (the others are non-negative or,
    for activations, read for their top only: their bottom k would be rows of near-zeros).
    `needs_gradient`: the capture runs the backward pass. `needs_values`: the capture saves
    the attention values v."""

    signed: bool
    needs_gradient: bool
    needs_values: bool
    functions: Mapping[NodeType, Callable[..., Tensor]]


# The registry: adding a metric is one entry here (a `Group` member and its functions).
METRIC_SPECS: dict[Metric, MetricSpec] = {
    Group.ACTIVATION: MetricSpec(
        signed=False,
        needs_gradient=False,
        needs_values=False,
        functions={
            NodeType.EMBEDDING: embedding_activation,
            NodeType.ATTENTION_HEAD: head_activation,
            NodeType.MLP_NEURON: neuron_activation,
            NodeType.AUTOENCODER_LATENT: latent_activation,
        },
    ),
    Group.WRITE_NORM: MetricSpec(
        signed=False,
        needs_gradient=False,
        needs_values=True,
        functions={
            NodeType.EMBEDDING: embedding_write_norm,
            NodeType.ATTENTION_HEAD: head_write_norm,
            NodeType.MLP_NEURON: neuron_write_norm,
            NodeType.AUTOENCODER_LATENT: latent_write_norm,
        },
    ),
    Group.DIRECT_EFFECT: MetricSpec(
        signed=True,
        needs_gradient=False,
        needs_values=True,
        functions={
            NodeType.EMBEDDING: embedding_direct_effect,
            NodeType.ATTENTION_HEAD: head_direct_effect,
            NodeType.MLP_NEURON: neuron_direct_effect,
            NodeType.AUTOENCODER_LATENT: latent_direct_effect,
        },
    ),
    Group.ACT_TIMES_GRAD: MetricSpec(
        signed=True,
        needs_gradient=True,
        needs_values=False,
        functions={
            NodeType.EMBEDDING: embedding_act_times_grad,
            NodeType.ATTENTION_HEAD: head_act_times_grad,
            NodeType.MLP_NEURON: neuron_act_times_grad,
            NodeType.AUTOENCODER_LATENT: latent_act_times_grad,
        },
    ),
}


def metric_function(node_type: NodeType, group: Metric) -> Callable[..., Tensor]:
    """The function computing `group` for one layer of `node_type` nodes."""
    return METRIC_SPECS[group].functions[node_type]


def is_signed(group: Metric) -> bool:
    return METRIC_SPECS[group].signed


def needs_gradient(groups: Iterable[Metric]) -> bool:
    return any(METRIC_SPECS[g].needs_gradient for g in groups)


def needs_values(groups: Iterable[Metric]) -> bool:
    return any(METRIC_SPECS[g].needs_values for g in groups)
