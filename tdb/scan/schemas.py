"""Response schemas of the component routes (pydantic v2; no logic here)."""

from __future__ import annotations

from pydantic import BaseModel

from tdb.nodes import NodeType


class Example(BaseModel):
    rank: int | None  # 0 = highest; None for the random sample
    activation: float  # the maximum over the window
    doc_id: int
    window_start: int
    token_position: int  # where the maximum is, as an index into tokens
    tokens: list[str]
    activations: list[float]


class ComponentStats(BaseModel):
    count: int  # tokens scanned
    mean: float | None  # None where nothing was counted
    variance: float | None  # population variance
    max: float | None


class Component(BaseModel):
    node_type: NodeType
    layer: int
    index: int
    site: str | None = None  # SAE latents: the activation their SAE reads
    stats: ComponentStats
    top: list[Example]  # rank order
    random_sample: list[Example]
