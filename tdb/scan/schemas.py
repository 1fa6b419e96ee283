"""Response schemas of the component routes (pydantic v2; no logic here)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tdb.nodes import NodeType


class Example(BaseModel):
    rank: int | None  # 0 = highest; None for the random sample
    activation: float  # the maximum over the window
    doc_id: int
    window_start: int
    token_position: int  # where the maximum is, as an index into tokens
    tokens: list[str]
    activations: list[float]
    context_tokens: list[str] = []  # run before `tokens` as left context, never ranked


class ComponentStats(BaseModel):
    count: int  # tokens scanned
    mean: float | None  # None where nothing was counted
    variance: float | None  # population variance
    max: float | None


class ExplanationOut(BaseModel):
    """A component's explanation (`tdb explain --scan DIR`): the sentence, its score (simulated
    against real activations on held-out examples) and the evidence it was built from."""

    id: str  # the component's id as the node table writes it: h1.3, n0.57, am1.42
    node_type: NodeType
    layer: int
    index: int
    site: str | None = None
    explanation: str
    score: float | None
    explainer: str
    evidence: dict[str, Any]


class ExplanationsResponse(BaseModel):
    explanations: list[ExplanationOut]


class LogitLens(BaseModel):
    """Weight-based token views of a neuron or latent: the vocabulary tokens its write vector
    promotes and suppresses (through the final norm's gain and the unembedding), and for
    neurons the input tokens whose embeddings alone excite it most."""

    promotes: list[str]
    suppresses: list[str]
    exciting_tokens: list[str] | None = None


class ComponentActivationsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    component: str = Field(
        examples=["h1.3"], description="a component id (h1.3, n0.57, am1.42) or one of its node ids"
    )
    prompt: str | list[int] = Field(description="the prompt as text or token ids")


class ComponentActivationsResponse(BaseModel):
    component: str  # its id
    node_type: NodeType
    layer: int
    index: int
    site: str | None = None
    meaning: str  # what a value is, for a person
    tokens: list[str]
    token_ids: list[int]
    values: list[float | None]  # one per token
    top_keys: list[int] | None = None  # heads: per query token, the key it writes most from


class Component(BaseModel):
    id: str = ""  # as the node table writes it: h1.3, n0.57, am1.42
    kind: str = ""  # for a person: "attention head", "MLP neuron", "SAE latent (mlp_out)"
    node_type: NodeType
    layer: int
    index: int
    site: str | None = None  # SAE latents: the activation their SAE reads
    stats: ComponentStats
    top: list[Example]  # rank order
    random_sample: list[Example]
    explanation: ExplanationOut | None = None  # when `tdb explain --scan DIR` has run
    logit_lens: LogitLens | None = None  # neurons and latents, when the model is at hand
