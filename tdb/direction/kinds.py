"""Directions of interest: the scalar whose causes the node table explains.

A direction reads the residual stream at one point of the forward pass (its `read_point`: after the
last block for logits, or before a layer's attention / MLP when tracing upstream from a node) at
one or more token positions, through the reading layer norm with its scale held fixed. `read`
computes the scalar from that residual stream; the capture calls it once on the forward pass's
own tensor (for the backward pass) and once on a detached copy (for `g`, the gradient that turns
write vectors into direct effects).

    LogitDiff((mary,), (john,), position=13)      mean logit of targets - mean of distractors
    LogProb(mary, position=13)                    log p(target)
    ResidualDirection(vector, position=13)        final residual stream . vector
    NeuronPreActivation(layer, token, neuron)     trace upstream from an MLP neuron
    AttentionLogit(layer, head, query, key, "q")  trace upstream from a head through q, k or qk
    HeadValueWrite(layer, head, query, key, ...)  trace upstream from a head through its value
    LatentPreActivation(attached_sae, token, j)   trace upstream from an SAE latent
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import torch
from jaxtyping import Float
from torch import Tensor

from tdb.hooks import HookPoint, Hooks
from tdb.models.base import TransformerModel
from tdb.nodes import LatentSite
from tdb.sae import AttachedSae


def _detach(x: Tensor, layer: int | None) -> Tensor:
    return x.detach()


# Reading a direction holds every layer norm's scale fixed, as the backward pass does.
FROZEN_SCALES = Hooks(
    {p: _detach for p in (HookPoint.LN1_SCALE, HookPoint.LN2_SCALE, HookPoint.LN_FINAL_SCALE)}
)


@dataclass(frozen=True)
class ReadPoint:
    """Where in the forward pass a direction reads the residual stream."""

    hook: HookPoint  # RESID_FINAL, RESID_MID (before layer's MLP) or RESID_PRE (before attention)
    layer: int | None

    def upstream_layers(self, n_layer: int, node_is_attention: bool) -> int:
        """How many layers (from 0) hold nodes that can affect what is read here."""
        if self.hook is HookPoint.RESID_FINAL or self.layer is None:
            return n_layer
        if self.hook is HookPoint.RESID_MID and node_is_attention:
            return self.layer + 1  # the layer's own attention writes before its MLP reads
        return self.layer


FINAL = ReadPoint(HookPoint.RESID_FINAL, None)


@runtime_checkable  # so the tests' runtime type checker (beartype) can check isinstance
class Direction(Protocol):
    @property
    def kind(self) -> str: ...

    @property
    def read_point(self) -> ReadPoint: ...

    @property
    def read_positions(self) -> tuple[int, ...]: ...

    @property
    def position(self) -> int:
        """The position reported as the direction's (the last one it reads)."""
        ...

    def read(
        self, model: TransformerModel, resid: Float[Tensor, "pos d_model"]
    ) -> Float[Tensor, ""]: ...

    def to_json(self) -> dict[str, object]: ...


def final_logits(
    model: TransformerModel, resid: Tensor, position: int
) -> Float[Tensor, " d_vocab"]:
    normed: Tensor = model.ln_f(resid[position][None, None], FROZEN_SCALES)[0, 0]
    # The logits in float32 (whatever the model's dtype) for the direction's mean or softmax.
    return (normed.to(model.unembed.device) @ model.unembed).float()


@dataclass(frozen=True)
class LogitDiff:
    """Mean logit of the targets minus mean logit of the distractors at one token position.

    >>> LogitDiff(target_ids=(44,), distractor_ids=(51,), position=11)
    """

    target_ids: tuple[int, ...]
    distractor_ids: tuple[int, ...]
    position: int
    kind: str = "logit_diff"
    read_point: ReadPoint = FINAL

    @property
    def read_positions(self) -> tuple[int, ...]:
        return (self.position,)

    def read(self, model: TransformerModel, resid: Tensor) -> Tensor:
        logits = final_logits(model, resid, self.position)
        targets = logits[list(self.target_ids)].mean()
        return targets - logits[list(self.distractor_ids)].mean()

    def to_json(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "target_ids": list(self.target_ids),
            "distractor_ids": list(self.distractor_ids),
            "position": self.position,
        }


@dataclass(frozen=True)
class LogProb:
    """log p(target) at one position: `LogProb(target_id=44, position=11)`."""

    target_id: int
    position: int
    kind: str = "logprob"
    read_point: ReadPoint = FINAL

    @property
    def read_positions(self) -> tuple[int, ...]:
        return (self.position,)

    def read(self, model: TransformerModel, resid: Tensor) -> Tensor:
        return final_logits(model, resid, self.position).log_softmax(dim=-1)[self.target_id]

    def to_json(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "target_ids": [self.target_id],
            "distractor_ids": [],
            "position": self.position,
        }


@dataclass(frozen=True)
class ResidualDirection:
    """The final residual stream at `position` dotted with a vector (e.g. a probe direction).

    >>> ResidualDirection(torch.load("probe.pt"), position=11, name="probe.pt")
    """

    vector: Float[Tensor, " d_model"] = field(compare=False)
    position: int
    name: str = "vector"
    kind: str = "residual_direction"
    read_point: ReadPoint = FINAL

    @property
    def read_positions(self) -> tuple[int, ...]:
        return (self.position,)

    def read(self, model: TransformerModel, resid: Tensor) -> Tensor:
        return resid[self.position].float() @ self.vector.to(resid.device, torch.float32)

    def to_json(self) -> dict[str, object]:
        return {"kind": self.kind, "vector": self.name, "position": self.position}


@dataclass(frozen=True)
class NeuronPreActivation:
    """Trace upstream: the pre-activation of MLP neuron `neuron` of `layer` at `token`."""

    layer: int
    token: int
    neuron: int
    reads: HookPoint = HookPoint.RESID_MID  # RESID_PRE where attention and MLP run in parallel
    kind: str = "mlp_pre_activation"

    @property
    def read_point(self) -> ReadPoint:
        return ReadPoint(self.reads, self.layer)

    @property
    def read_positions(self) -> tuple[int, ...]:
        return (self.token,)

    @property
    def position(self) -> int:
        return self.token

    def read(self, model: TransformerModel, resid: Tensor) -> Tensor:
        block = model.block(self.layer)
        x: Tensor = block.ln_2(resid[self.token][None, None], FROZEN_SCALES)[0, 0]
        return block.mlp.pre_activation(x, self.neuron)

    def to_json(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "node": f"n{self.layer}.{self.neuron}@{self.token}",
            "position": self.token,
        }


@dataclass(frozen=True)
class AttentionLogit:
    """Trace upstream: head `head`'s attention logit at (query, key), through the query side,
    the key side, or both (the other side then held fixed)."""

    layer: int
    head: int
    query: int
    key: int
    through: Literal["q", "k", "qk"]
    kind: str = "attention_logit"

    @property
    def read_point(self) -> ReadPoint:
        return ReadPoint(HookPoint.RESID_PRE, self.layer)

    @property
    def read_positions(self) -> tuple[int, ...]:
        sides = {"q": (self.query,), "k": (self.key,), "qk": (self.key, self.query)}
        return tuple(sorted(set(sides[self.through])))

    @property
    def position(self) -> int:
        return max(self.read_positions)

    def read(self, model: TransformerModel, resid: Tensor) -> Tensor:
        block = model.block(self.layer)
        x: Tensor = block.ln_1(resid[[self.query, self.key]][None], FROZEN_SCALES)[0]  # [2 d_model]
        x_query = x[0] if "q" in self.through else x[0].detach()
        x_key = x[1] if "k" in self.through else x[1].detach()
        return block.attn.head_logit(x_query, x_key, self.head, self.query, self.key)

    def to_json(self) -> dict[str, object]:
        node = f"h{self.layer}.{self.head}@{self.query}:{self.key}"
        return {"kind": self.kind, "node": node, "through": self.through, "position": self.position}


@dataclass(frozen=True)
class HeadValueWrite:
    """Trace upstream through a head's value: its write at (query, key), p · v[key] @ W_O, dotted
    with `downstream_grad`, the gradient of a downstream direction with respect to the residual
    stream at the query token right after this attention layer. p is held fixed."""

    layer: int
    head: int
    query: int
    key: int
    prob: float
    downstream_grad: Float[Tensor, " d_model"] = field(compare=False)
    downstream: str = "direction"
    kind: str = "attention_value_write"

    @property
    def read_point(self) -> ReadPoint:
        return ReadPoint(HookPoint.RESID_PRE, self.layer)

    @property
    def read_positions(self) -> tuple[int, ...]:
        return (self.key,)

    @property
    def position(self) -> int:
        return self.key

    def read(self, model: TransformerModel, resid: Tensor) -> Tensor:
        block = model.block(self.layer)
        x_key = block.ln_1(resid[self.key][None, None], FROZEN_SCALES)[0, 0]
        write = self.prob * block.attn.head_value(x_key, self.head) @ block.attn.W_O[self.head]
        return write.float() @ self.downstream_grad.to(write.device, torch.float32)

    def to_json(self) -> dict[str, object]:
        node = f"h{self.layer}.{self.head}@{self.query}:{self.key}"
        return {
            "kind": self.kind,
            "node": node,
            "through": "v",
            "downstream": self.downstream,
            "position": self.key,
        }


@dataclass(frozen=True)
class LatentPreActivation:
    """Trace upstream: an SAE latent's pre-activation, W_enc[j] · (x - pre_bias) + latent_bias[j],
    where x is the activation the SAE reads at `token`, recomputed from the residual stream the
    layer reads (norm scales fixed):

        MLP post-activation / MLP output: from the MLP's input at `token` (through the MLP, so
            the direction is not linear in the residual stream: direct effects are first order)
        attention output: from the residual stream before the layer's attention at every token
            up to `token` (queries, keys and values all move it)
    """

    attached: AttachedSae = field(compare=False)
    token: int
    latent: int
    reads: HookPoint = HookPoint.RESID_MID  # the MLP's input (RESID_PRE for parallel blocks)
    kind: str = "latent_pre_activation"

    @property
    def layer(self) -> int:
        return self.attached.layer

    @property
    def read_point(self) -> ReadPoint:
        if self.attached.site is LatentSite.ATTN_OUT:
            return ReadPoint(HookPoint.RESID_PRE, self.layer)
        return ReadPoint(self.reads, self.layer)

    @property
    def read_positions(self) -> tuple[int, ...]:
        if self.attached.site is LatentSite.ATTN_OUT:
            return tuple(range(self.token + 1))
        return (self.token,)

    @property
    def position(self) -> int:
        return self.token

    def site_activation(self, model: TransformerModel, resid: Tensor) -> Tensor:
        """The activation the SAE reads at `token`, from the residual stream at the read point."""
        block = model.block(self.layer)
        if self.attached.site is LatentSite.ATTN_OUT:
            x = block.ln_1(resid[: self.token + 1][None], FROZEN_SCALES)[0]  # [pos d_model]
            return attention_output(model, x, self.layer, self.token)
        x = block.ln_2(resid[self.token][None, None], FROZEN_SCALES)
        if self.attached.site is LatentSite.MLP_OUT:
            out: Tensor = block.mlp(x, Hooks())[0, 0]
            return out
        kept: list[Tensor] = []

        def keep(post: Tensor, layer: int | None) -> None:
            kept.append(post)

        block.mlp(x, Hooks({HookPoint.MLP_POST: keep}))
        return kept[0][0, 0]

    def read(self, model: TransformerModel, resid: Tensor) -> Tensor:
        sae = self.attached.sae
        x = self.site_activation(model, resid)
        return (x - sae.pre_bias) @ sae.W_enc[self.latent] + sae.latent_bias[self.latent]

    def to_json(self) -> dict[str, object]:
        site = self.attached.site
        return {
            "kind": self.kind,
            "node": f"a{site.code}{self.layer}.{self.latent}@{self.token}",
            "site": site.value,
            "position": self.token,
        }


def attention_output(
    model: TransformerModel, x: Float[Tensor, "pos d_model"], layer: int, query: int
) -> Float[Tensor, " d_model"]:
    """Attention's output at `query` from the normalised residual stream at tokens 0..query,
    head by head through the model's own per-head logit and value functions (output bias
    included)."""
    attn = model.block(layer).attn
    out = attn.b_O
    for head in range(model.config.n_head):
        logits = torch.stack(
            [attn.head_logit(x[query], x[key], head, query, key) for key in range(query + 1)]
        )  # [key_pos]
        values = torch.stack([attn.head_value(x[key], head) for key in range(query + 1)])
        out = out + (logits.softmax(dim=0) @ values) @ attn.W_O[head]
    return out
