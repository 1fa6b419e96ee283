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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

from jaxtyping import Float
from torch import Tensor

from tdb.hooks import HookPoint, Hooks
from tdb.models.base import TransformerModel


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
    return normed @ model.unembed


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
        return resid[self.position] @ self.vector

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
        return write @ self.downstream_grad

    def to_json(self) -> dict[str, object]:
        node = f"h{self.layer}.{self.head}@{self.query}:{self.key}"
        return {
            "kind": self.kind,
            "node": node,
            "through": "v",
            "downstream": self.downstream,
            "position": self.key,
        }
