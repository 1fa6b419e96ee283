"""Request and response schemas of the HTTP API (pydantic v2). Shapes only, no logic.

Field names follow the Python API (`tdb.node_table`) and the CLI's flags; see docs/server.md.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from tdb.metrics import ALL_GROUPS, Group
from tdb.nodes import NodeType

# Bounds on what a request may hold, before any model work. The prompt's token count has its own,
# configurable, limit (`tdb serve --max-prompt-tokens`), checked after tokenization.
MAX_TEXT_CHARS = 20_000
MAX_TOKEN_IDS = 8_192
MAX_K = 100
MAX_VERIFY = 20
MAX_LIST = 32
MAX_BATCH = 16

Text = Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)]
TokenIds = Annotated[list[int], Field(min_length=1, max_length=MAX_TOKEN_IDS)]
Prompt = Text | TokenIds
TokenSpec = Annotated[str, Field(max_length=200)] | int
Tokens = TokenSpec | Annotated[list[TokenSpec], Field(max_length=MAX_LIST)]
# Strict models take an enum's member only as a Python object; from JSON it is its value.
GroupName = Annotated[Group, Field(strict=False)]
NodeTypeName = Annotated[NodeType, Field(strict=False)]
NodeId = Annotated[str, Field(min_length=1, max_length=64, examples=["h2.3@13:1"])]


class Strict(BaseModel):
    """Unknown fields are an error (a typo such as `targt` must not be silently ignored), and
    so is a value of another type (`"k": "5"`): what the schema says is what is accepted."""

    model_config = ConfigDict(extra="forbid", strict=True)


class PromptRequest(Strict):
    """A prompt, the direction of interest, and the interventions on it."""

    prompt: Prompt = Field(description="the prompt text, or its token ids")
    target: Tokens | None = Field(
        default=None, description="target token(s): text or id; several: mean"
    )
    distractor: Tokens | None = Field(default=None, description="distractor token(s): text or id")
    logprob: bool = Field(
        default=False, description="explain log p(target) instead of a difference"
    )
    position: int = Field(
        default=-1, description="whose next-token prediction (negative: from the end)"
    )
    trace: NodeId | None = Field(
        default=None,
        description="explain this node's pre-activation: n1.5@3, h2.3@13:1[:q|:k|:qk|:v]",
    )
    downstream: NodeId | None = Field(default=None, description="the downstream node of a :v trace")
    ablate: Annotated[list[NodeId], Field(max_length=MAX_LIST)] = Field(
        default_factory=list, description="node ids, optionally :zero, :mean or :resample"
    )
    compare_prompt: Prompt | None = Field(
        default=None, description="a second prompt (same token count) shown side by side"
    )
    resample_prompt: Prompt | None = Field(
        default=None, description="the source of :resample ablations (same token count)"
    )
    second_prompt: Prompt | None = Field(
        default=None,
        description="older name: resample_prompt with :resample ablations, else compare_prompt",
    )
    mean_prompts: Annotated[list[Prompt], Field(max_length=8)] = Field(
        default_factory=list, description="reference prompts for :mean ablations"
    )
    # Which nodes stand for the MLP and attention layers: sparse-autoencoder latents come from
    # the demo model's own SAEs (other models: none, so asking for latents is a 400).
    mlp_nodes: Literal["neurons", "latents", "both"] = Field(
        default="neurons", description="MLP nodes: neurons, SAE latents, or both"
    )
    attn_nodes: Literal["heads", "latents", "both"] = Field(
        default="heads", description="attention nodes: heads, SAE latents, or both"
    )


class NodeTableRequest(PromptRequest):
    k: int = Field(default=10, ge=1, le=MAX_K, description="nodes per metric and node type")
    groups: Annotated[list[GroupName], Field(min_length=1, max_length=len(ALL_GROUPS))] = Field(
        default_factory=lambda: list(ALL_GROUPS), description="the metrics (table columns)"
    )
    node_types: Annotated[list[NodeTypeName], Field(max_length=len(NodeType))] | None = Field(
        default=None,
        description="show only these node types (display only: the cached result is reused)",
    )
    verify: int = Field(default=0, ge=0, le=MAX_VERIFY, description="zero-ablate the top N nodes")
    sort: GroupName | None = Field(
        default=None,
        description="order rows by this metric, largest first (signed metrics by magnitude); "
        "display only, like node_types",
    )
    views: bool = Field(default=False, description="add token views (`token_views`)")
    view_nodes: Annotated[list[NodeId], Field(max_length=MAX_LIST)] = Field(
        default_factory=list, description="nodes whose promoted / suppressed tokens to show"
    )


class ViewsRequest(PromptRequest):
    view_nodes: Annotated[list[NodeId], Field(max_length=MAX_LIST)] = Field(
        default_factory=list, description="nodes whose promoted / suppressed tokens to show"
    )


class TokenizeRequest(Strict):
    text: Annotated[str, Field(max_length=MAX_TEXT_CHARS)]


class TokenOut(BaseModel):
    id: int
    text: str


class TokenizeResponse(BaseModel):
    tokens: list[TokenOut]
    single_token: bool = Field(description="whether the text is exactly one token")


class ModelInfo(BaseModel):
    name: str
    architecture: str
    n_layer: int
    n_head: int
    d_model: int
    d_mlp: int
    d_vocab: int
    n_ctx: int
    has_tokenizer: bool
    max_prompt_tokens: int
    max_k: int
    groups: list[Group]
    node_types: list[NodeType]


class Direction(BaseModel):
    """The direction of interest as `tdb nodes --json` shows it; other fields depend on `kind`
    (e.g. `target_ids`, `position`, `node`, `baseline_value`, `right_value`)."""

    model_config = ConfigDict(extra="allow")

    kind: str
    value: float | None
    target_texts: list[str]
    distractor_texts: list[str]


class NodeRow(BaseModel):
    """One node. Each column's value is under `values` and also a field of its own (as
    `tdb nodes --json` has always had them), so the row holds more fields than listed here."""

    model_config = ConfigDict(extra="allow")

    id: str = Field(examples=["h2.3@13:1"])
    node_type: NodeType
    layer: int | None
    token: int
    key_token: int | None = Field(description="the key token of an attention head (else null)")
    site: str | None = Field(
        default=None, description="which activation an SAE latent's autoencoder reads (else null)"
    )
    index: int
    name: str
    component: str | None = Field(
        description="the component's page (its top dataset examples), null for embeddings"
    )
    traces: dict[str, str] = Field(
        default_factory=dict,
        description="the trace ids this node offers (`trace`): q, k, qk, v for a head at a "
        "(query, key) pair, pre for a neuron or a latent",
    )
    values: dict[str, float | None] = Field(
        description="one entry per column (`columns`); null where the value is undefined"
    )


class RankedToken(BaseModel):
    id: int
    text: str
    value: float | None


class PinnedToken(RankedToken):
    rank: int


class LogitView(BaseModel):
    top: list[RankedToken]
    bottom: list[RankedToken]
    pinned: list[PinnedToken]


class ExcitingToken(BaseModel):
    token: int
    text: str
    value: float | None


class NodeView(BaseModel):
    id: str
    promotes: list[RankedToken]
    suppresses: list[RankedToken]
    exciting_tokens: list[ExcitingToken] | None = None


class TokenViews(BaseModel):
    logits: LogitView
    effect_by_token: dict[str, list[float | None]] = Field(
        description="per prompt token, sums of act_times_grad: embedding, mlp, "
        "attention_from (by query token), attention_to (by key token)"
    )
    nodes: list[NodeView]


class NodeTableResponse(BaseModel):
    tokens: list[TokenOut]
    right_tokens: list[TokenOut] | None = None
    direction: Direction
    k: int
    groups: list[Group]
    columns: list[str] = Field(
        description="metric columns, e.g. act_times_grad, act_times_grad_baseline, _diff, _right"
    )
    nodes: list[NodeRow]
    verification: list[dict[str, object]] | None = None
    verification_summary: dict[str, object] | None = None
    token_views: TokenViews | None = Field(
        default=None, description="with `views` or `view_nodes`: as the views route's fields"
    )
    warnings: list[str] = Field(
        default_factory=list,
        description="what makes the table unhelpful without an error, for a person to read "
        "(e.g. a target equal to the distractor: a zero direction)",
    )


class ViewsResponse(TokenViews):
    """The prompt's tokens, the direction, and the token views' fields."""

    tokens: list[TokenOut]
    direction: Direction


class NodesItem(Strict):
    route: Literal["nodes"]
    request: NodeTableRequest


class ViewsItem(Strict):
    route: Literal["views"]
    request: ViewsRequest


class TokenizeItem(Strict):
    route: Literal["tokenize"]
    request: TokenizeRequest


BatchItem = Annotated[NodesItem | ViewsItem | TokenizeItem, Field(discriminator="route")]


class BatchRequest(Strict):
    requests: Annotated[list[BatchItem], Field(min_length=1, max_length=MAX_BATCH)]


class ErrorResponse(BaseModel):
    error: str = Field(description="what is wrong and what is allowed, for a person to read")
    detail: list[dict[str, object]] | None = Field(
        default=None, description="for invalid requests: where each problem is (pydantic's errors)"
    )


class BatchResult(BaseModel):
    status: int = Field(description="the HTTP status the request would get alone")
    body: NodeTableResponse | ViewsResponse | TokenizeResponse | None = None
    error: ErrorResponse | None = None


class BatchResponse(BaseModel):
    responses: list[BatchResult]
