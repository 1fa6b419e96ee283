"""Request and response schemas of the HTTP API (pydantic v2). Shapes only, no logic.

Field names follow the Python API (`tdb.node_table`) and the CLI's flags; see docs/server.md.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tdb.attribution import By, ComponentKind, Method, Reference, Task
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
# Task-level attribution (`POST /api/attribute`): its cost grows with prompts x components.
MAX_RECORDS = 512
MAX_TASK_N = 256
MAX_IG_STEPS = 50
MAX_ATTRIBUTION_K = 100_000
# Circuits (`POST /api/circuit`): each step of the search measures a patched forward pass.
MAX_CIRCUIT_COMPONENTS = 200
MAX_CIRCUIT_EDGES = 1_000

Text = Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)]
TokenIds = Annotated[list[int], Field(min_length=1, max_length=MAX_TOKEN_IDS)]
Prompt = Text | TokenIds
TokenSpec = Annotated[str, Field(max_length=200)] | int
Tokens = TokenSpec | Annotated[list[TokenSpec], Field(max_length=MAX_LIST)]
# Strict models take an enum's member only as a Python object; from JSON it is its value.
GroupName = Annotated[Group, Field(strict=False)]
NodeTypeName = Annotated[NodeType, Field(strict=False)]
NodeId = Annotated[str, Field(min_length=1, max_length=64, examples=["h2.3@13:1"])]
MethodName = Annotated[Method, Field(strict=False)]
ReferenceName = Annotated[Reference, Field(strict=False)]
ComponentKindName = Annotated[ComponentKind, Field(strict=False)]
ByName = Annotated[By, Field(strict=False)]
TaskName = Annotated[Task, Field(strict=False)]
Answer = Annotated[str, Field(max_length=200)]
Answers = Answer | Annotated[list[Answer], Field(min_length=1, max_length=MAX_LIST)]
AnswerIds = int | Annotated[list[int], Field(min_length=1, max_length=MAX_LIST)]


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
    compare_target: Tokens | None = Field(
        default=None,
        description="the compared prompt's own target (default: `target`); also with "
        "`second_prompt` used as the comparison",
    )
    compare_distractor: Tokens | None = Field(
        default=None, description="the compared prompt's own distractor (default: `distractor`)"
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
    bos: bool | None = Field(
        default=None,
        description="start text prompts with the BOS token (default: when the tokenizer adds "
        "one, as for Llama and Gemma; not GPT-2 or the demo); token ids are taken as given",
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
    fingerprint: str = Field(
        description="a hash of the model's config and weights (tdb.fingerprint), for saved "
        "investigations"
    )
    tdb_version: str = Field(description="the tdb package's version")
    max_prompt_tokens: int
    max_k: int
    groups: list[Group]
    node_types: list[NodeType]
    device: str = Field("cpu", description="where the model runs (layer 0's, under a device map)")
    dtype: str = Field("float32", description="the weights' dtype: float32, bfloat16, float16")


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
    explanation: str | None = Field(
        default=None,
        description="the component's explanation when the server has `--scan DIR` and "
        "`tdb explain --scan DIR` has run (else null; embeddings have none)",
    )
    explanation_score: float | None = Field(
        default=None, description="the explanation's score (simulated vs real activations)"
    )


class RankedToken(BaseModel):
    id: int
    text: str
    value: float | None


class CandidateToken(RankedToken):
    """A next-token candidate: its logit (`value`) and probability."""

    prob: float | None = Field(default=None, description="the softmax of the logits")


class PinnedToken(CandidateToken):
    rank: int = Field(description="0 = the highest logit")
    role: Literal["target", "distractor"] | None = Field(
        default=None, description="which token of the direction it is"
    )


class LogitView(BaseModel):
    top: list[CandidateToken]
    bottom: list[CandidateToken]
    pinned: list[PinnedToken]
    loss: float | None = Field(
        default=None, description="−log p(target) (mean over several targets; null: none)"
    )


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
        "attention_from (by query token), attention_to (by key token) and, with SAE latents, "
        "latents_attn_out / latents_mlp_post / latents_mlp_out (each site's latents)"
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


class DatasetRecord(Strict):
    """One line of a dataset of prompt pairs (`tdb.attribution.dataset`): each text field or its
    token-id twin. Which are required, one-token answers and equal token counts are checked
    with the dataset (a 400 naming the record: `dataset line 3: ...`, counted from 1)."""

    prompt: Text | None = Field(default=None, description="the clean prompt")
    prompt_ids: TokenIds | None = None
    target: Answers | None = Field(
        default=None, description="one-token answer(s) at the last token; several: mean"
    )
    target_ids: AnswerIds | None = None
    distractor: Answers | None = Field(
        default=None, description="optional: without one, the metric is log p(target) (logprob)"
    )
    distractor_ids: AnswerIds | None = None
    corrupted: Text | None = Field(
        default=None, description="the corrupted twin: as many tokens as the prompt"
    )
    corrupted_ids: TokenIds | None = None
    meta: Any = Field(default=None, description="anything (not used)")


class TaskSpec(Strict):
    """A built-in dataset (`tdb task`): `n` prompt pairs, the same for the same seed."""

    name: TaskName = Field(description="ioi, induction or capitals")
    n: int = Field(default=16, ge=1, le=MAX_TASK_N, description="prompt pairs")
    seed: int = Field(default=0, ge=0, le=2**32 - 1)


class PairsRequest(Strict):
    """What task-level requests share: the prompt pairs (a dataset or a built-in task; give exactly
    one), the ablation, the components and the metric."""

    dataset: Annotated[list[DatasetRecord], Field(min_length=1, max_length=MAX_RECORDS)] | None = (
        Field(default=None, description="the dataset's lines (JSONL) as objects")
    )
    task: TaskSpec | None = Field(default=None, description="a built-in task instead")
    ablation: ReferenceName | None = Field(
        default=None,
        description="corrupted, zero or mean (default: corrupted when the records have "
        "corrupted prompts, else mean)",
    )
    components: Annotated[
        list[ComponentKindName], Field(min_length=1, max_length=len(ComponentKind))
    ] = Field(
        default_factory=lambda: [ComponentKind.HEADS, ComponentKind.NEURONS],
        description="heads, neurons, latents",
    )
    logprob: bool = Field(default=False, description="the metric is log p(target)")
    ig_steps: int = Field(default=10, ge=1, le=MAX_IG_STEPS, description="ig's path points")


class AttributionRequest(PairsRequest):
    """Task-level attribution over a dataset or a built-in task (give exactly one); the other
    fields are `tdb.attribution.attribution`'s options (`tdb attribute`'s flags)."""

    methods: Annotated[list[MethodName], Field(min_length=1, max_length=len(Method))] = Field(
        default_factory=lambda: [Method.IG], description="exact, atp, atp*, ig (first: the sort)"
    )
    by: ByName = Field(default=By.COMPONENT, description="component, or (component, position)")
    verify: int = Field(
        default=0, ge=0, le=MAX_VERIFY, description="exact scores of the top N as well"
    )
    k: int | None = Field(
        default=None, ge=1, le=MAX_ATTRIBUTION_K, description="keep the top k rows (null: all)"
    )


class CircuitRequest(PairsRequest):
    """A circuit over a dataset or a built-in task (give exactly one), as `tdb.circuit.find_circuit`
    finds it; the other fields are its options (`tdb circuit`'s flags)."""

    method: MethodName = Field(
        default=Method.IG, description="the estimator that orders the search: exact, atp, atp*, ig"
    )
    max_components: int = Field(
        default=100, ge=1, le=MAX_CIRCUIT_COMPONENTS, description="the largest circuit searched"
    )
    target_faithfulness: float = Field(
        default=0.8, gt=0, le=1, description="the smallest circuit that reaches it"
    )
    max_edges: int = Field(
        default=50, ge=0, le=MAX_CIRCUIT_EDGES, description="keep the top edges by |score|"
    )
    verify: int = Field(
        default=0, ge=0, le=MAX_VERIFY, description="path-patch the top N edges (their exact)"
    )


class AttributionMetric(BaseModel):
    kind: Literal["logit_diff", "logprob"]
    clean: float = Field(description="the metric's mean over the clean prompts")
    corrupted: float | None = Field(description="... over the corrupted ones (null: none)")


class ComponentScoreOut(BaseModel):
    id: str = Field(examples=["h2.1"])
    node_type: NodeType
    layer: int
    index: int
    site: str | None = Field(description="an SAE latent's site (else null)")
    position: int | None = Field(description="the token position (by position; else null)")
    component: str | None = Field(
        default=None, description="the component's page, as the node table's rows link to it"
    )
    scores: dict[str, float | None] = Field(
        description="per method; null where it did not score the row (exact beyond verify)"
    )


class AttributionResponse(BaseModel):
    """`Attribution.to_json()` (what `tdb attribute --json` prints), each row with its link."""

    metric: AttributionMetric
    n_prompts: int
    methods: list[Method]
    ablation: Reference
    by: By
    components: list[ComponentScoreOut] = Field(description="sorted by the first method's |score|")


class CurvePointOut(BaseModel):
    n: int
    faithfulness: float | None = Field(description="the top-n circuit's (null: undefined)")
    random: float | None = Field(description="the mean over random circuits of size n")


class EdgeOut(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    source: str = Field(alias="from", examples=["h0.4"], description="a component id or embed")
    target: str = Field(alias="to", examples=["h2.1"], description="a component id or logits")
    input: Literal["q", "k", "v", "mlp", "logits"]
    score: float | None = Field(description="the estimate (edge attribution patching)")
    exact: float | None = Field(description="path patching; null unless verified")


class CircuitResponse(BaseModel):
    """`Circuit.to_json()` (what `tdb circuit --json` prints), the graph and the curve as SVG,
    and each component's page."""

    metric: AttributionMetric
    n_prompts: int
    ablation: Reference
    method: Method
    target_faithfulness: float
    components: list[str] = Field(description="the circuit, by decreasing estimated score")
    faithfulness: float | None = Field(
        description="measured: (m_circuit - m_empty) / (m_full - m_empty)"
    )
    m_full: float
    m_empty: float
    m_circuit: float
    curve: list[CurvePointOut]
    edges: list[EdgeOut]
    links: dict[str, str | None] = Field(
        description="each component's page, as the node table's rows link to it"
    )
    svg: str = Field(description="the circuit's graph (tdb.circuit.graph.circuit_svg)")
    curve_svg: str = Field(description="the faithfulness curve (tdb.circuit.graph.curve_svg)")


class TasksResponse(BaseModel):
    tasks: list[Task]
    max_n: int = Field(description="the most prompt pairs a task request may ask for")
    max_records: int = Field(description="the most records a dataset request may hold")


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
