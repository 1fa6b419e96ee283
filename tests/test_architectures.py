"""Llama, Qwen2, Mistral, Gemma and GPT-NeoX: logits against Hugging Face `transformers`, every
metric of every node against a naive reference (tests/reference_rotary.py), the hook points, the
`tdb nodes` command, and loading errors. Each architecture in two random-weight shapes."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hook_shapes import assert_documented_hook_shapes
from node_values import all_nodes, reference_values
from reference_rotary import naive_run
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from tdb.capture import capture
from tdb.checkpoint import load_model
from tdb.cli import main
from tdb.direction import LogitDiff
from tdb.errors import TdbError
from tdb.hooks import HookPoint, Hooks
from tdb.metrics import ALL_GROUPS, METRIC_SPECS, Group
from tdb.models.llama import Llama
from tdb.nodes import NodeType
from tdb.table import node_table

ARCHITECTURES: dict[str, tuple[Any, Any]] = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "gemma": (GemmaConfig, GemmaForCausalLM),
    "gpt_neox": (GPTNeoXConfig, GPTNeoXForCausalLM),
}
# Two shapes per architecture. The sliding windows (3, 4, 6) are shorter than TOKENS.
SHAPES: list[tuple[str, dict[str, object]]] = [
    ("llama", {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
               "tie_word_embeddings": True}),
    ("llama", {"hidden_size": 48, "num_attention_heads": 6, "num_key_value_heads": 6,
               "intermediate_size": 80, "attention_bias": True, "mlp_bias": True}),
    ("qwen2", {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2}),
    ("qwen2", {"hidden_size": 48, "num_attention_heads": 4, "num_key_value_heads": 1,
               "head_dim": 16, "use_sliding_window": True, "sliding_window": 3,
               "max_window_layers": 1, "tie_word_embeddings": True}),
    ("mistral", {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
                 "sliding_window": 4}),
    ("mistral", {"hidden_size": 48, "num_attention_heads": 4, "num_key_value_heads": 4,
                 "head_dim": 16, "sliding_window": 6, "num_hidden_layers": 3}),
    ("gemma", {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 1,
               "head_dim": 16}),
    ("gemma", {"hidden_size": 48, "num_attention_heads": 2, "num_key_value_heads": 2,
               "head_dim": 24, "tie_word_embeddings": False}),
    ("gpt_neox", {"hidden_size": 32, "num_attention_heads": 4}),  # parallel, rotary 1/4
    ("gpt_neox", {"hidden_size": 48, "num_attention_heads": 4, "use_parallel_residual": False,
                  "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                      "partial_rotary_factor": 0.5}}),
]  # fmt: skip
TOKENS = [5, 17, 99, 150, 3, 17, 42, 8, 77, 5, 120]
TARGET, DISTRACTOR = 11, 12
VOCAB = 200


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Models this small run fastest on one thread; on a busy machine, two spin-wait on each other
    (a forward pass took 100x longer)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_checkpoint(directory: Path, arch: str, **shape: object) -> PreTrainedModel:
    """Save a random model of `arch` (weights scaled up so activations are not all tiny)."""
    config_class, model_class = ARCHITECTURES[arch]
    torch.manual_seed(0)
    defaults = {"vocab_size": VOCAB, "num_hidden_layers": 2, "intermediate_size": 64,
                "max_position_embeddings": 64}  # fmt: skip
    model = model_class(config_class(**{**defaults, **shape})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            else:
                p.normal_(0.0, 0.2 if p.ndim > 1 else 0.05)
    model.save_pretrained(directory)
    return model  # type: ignore[no-any-return]


def shape_id(shape: tuple[str, dict[str, object]]) -> str:
    arch, kwargs = shape
    short = {"hidden_size": "d", "num_attention_heads": "h", "num_key_value_heads": "kv"}
    parts = [f"{short[k]}{v}" for k, v in kwargs.items() if k in short]
    return "-".join([arch, *parts, *(k for k in kwargs if k not in short)])


@pytest.fixture(scope="module", params=SHAPES, ids=shape_id)
def checkpoint(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[PreTrainedModel, Path]:
    arch, shape = request.param
    directory = tmp_path_factory.mktemp(arch)
    return make_checkpoint(directory, arch, **shape), directory


def test_logits_match_transformers(checkpoint: tuple[PreTrainedModel, Path]) -> None:
    reference, directory = checkpoint
    model = load_model(directory).model
    assert not any(p.requires_grad for p in model.parameters())
    tokens = torch.randint(0, VOCAB, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(tokens).logits
        ours = model(tokens)
        some = model(tokens, logit_positions=torch.tensor([3, 39]))
    assert (ours - expected).abs().max().item() < 1e-4
    torch.testing.assert_close(some, ours[:, [3, 39]])


# --- every metric of every node against the naive reference ------------------------------------


@pytest.mark.parametrize("position", [len(TOKENS) - 1, 6])
def test_every_metric_of_every_node_matches_the_reference(
    checkpoint: tuple[PreTrainedModel, Path], position: int
) -> None:
    hf_model, directory = checkpoint
    model = load_model(directory).model
    direction = LogitDiff((TARGET,), (DISTRACTOR,), position)
    cap = capture(model, torch.tensor(TOKENS), direction, ALL_GROUPS)
    ref = naive_run(hf_model, TOKENS, position, TARGET, DISTRACTOR)
    assert cap.direction_value == pytest.approx(ref.value, abs=1e-4)

    nodes = all_nodes(cap.store)
    c = model.config
    n = position + 1  # only tokens up to the position can affect the direction
    assert len(nodes) == n + c.n_layer * (c.n_head * n * (n + 1) // 2 + n * c.d_mlp)
    checked: set[tuple[NodeType, Group]] = set()
    for group in ALL_GROUPS:
        ours = cap.store.values_at(group, nodes)
        expected = torch.tensor([reference_values(ref, node, position)[group] for node in nodes])
        torch.testing.assert_close(
            ours, expected, atol=5e-5, rtol=2e-4, msg=lambda m, group=group: f"{group}: {m}"
        )
        checked |= {(node.node_type, group) for node in nodes}
    # The whole registry was walked, but for SAE latents: an SAE is a hook on the activations
    # every architecture names alike; tests/test_metrics.py checks its metrics on GPT-2.
    assert checked == {
        (t, g)
        for g, spec in METRIC_SPECS.items()
        for t in spec.functions
        if t is not NodeType.AUTOENCODER_LATENT
    }


def test_direct_effects_add_up_to_the_direction(checkpoint: tuple[PreTrainedModel, Path]) -> None:
    """Every write at the position (nodes, plus output biases, which belong to no node) and the
    final norm's bias make up the direction."""
    hf_model, directory = checkpoint
    model = load_model(directory).model
    position = len(TOKENS) - 1
    direction = LogitDiff((TARGET,), (DISTRACTOR,), position)
    cap = capture(model, torch.tensor(TOKENS), direction, [Group.DIRECT_EFFECT])
    total = sum(
        float(b.values[Group.DIRECT_EFFECT].nan_to_num().sum()) for b in cap.store.blocks.values()
    )
    ref = naive_run(hf_model, TOKENS, position, TARGET, DISTRACTOR)
    out_biases = ("o_proj.bias", "down_proj.bias", "attention.dense.bias", "dense_4h_to_h.bias")
    biases = [v for k, v in hf_model.state_dict().items() if k.endswith(out_biases)]
    bias_effect = float(ref.contribution(sum(biases, torch.zeros(model.config.d_model))))
    total += bias_effect + ref.final_bias_effect
    assert total == pytest.approx(cap.direction_value, abs=1e-4)


# --- hook points, the command line ---------------------------------------------------------------


def test_every_hook_point_fires_with_the_documented_shape(
    checkpoint: tuple[PreTrainedModel, Path],
) -> None:
    assert_documented_hook_shapes(load_model(checkpoint[1]).model)


def test_a_replacing_hook_changes_the_output(checkpoint: tuple[PreTrainedModel, Path]) -> None:
    model = load_model(checkpoint[1]).model
    tokens = torch.tensor([TOKENS])
    for point in (HookPoint.MLP_POST, HookPoint.ATTN_PROBS, HookPoint.RESID_MID):
        zeroed = model(tokens, Hooks({point: lambda x, layer: x * 0}))
        assert not torch.allclose(zeroed, model(tokens)), point


def test_tdb_nodes_json(
    checkpoint: tuple[PreTrainedModel, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    ids = ",".join(map(str, TOKENS))
    args = ["nodes", "--token-ids", ids, "--target-id", str(TARGET), "--distractor-id",
            str(DISTRACTOR), "--model", str(checkpoint[1]), "-k", "3", "--json"]  # fmt: skip
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert [t["id"] for t in out["tokens"]] == TOKENS
    assert {n["node_type"] for n in out["nodes"]} == {"embedding", "attention_head", "mlp_neuron"}


def test_traced_directions_equal_the_forward_pass(checkpoint: tuple[PreTrainedModel, Path]) -> None:
    """A traced node's direction value is the pre-activation / attention logit the forward pass
    computes (read back through the block's own input: RESID_PRE for parallel blocks)."""
    loaded = load_model(checkpoint[1])
    saved: dict[HookPoint, torch.Tensor] = {}

    def keep(point: HookPoint):  # type: ignore[no-untyped-def]
        return lambda x, layer: saved.setdefault(point, x) if layer == 1 else None

    points = (HookPoint.MLP_PRE, HookPoint.ATTN_LOGITS)
    loaded.model(torch.tensor([TOKENS]), Hooks({p: keep(p) for p in points}))
    neuron = node_table(loaded, TOKENS, TARGET, DISTRACTOR, k=2, trace="n1.3@6")
    assert neuron.direction_value == pytest.approx(
        float(saved[HookPoint.MLP_PRE][0, 6, 3]), abs=1e-5
    )
    assert all(n.token <= 6 for n in neuron.nodes)
    for through in ("q", "k", "qk"):
        table = node_table(loaded, TOKENS, TARGET, DISTRACTOR, k=2, trace=f"h1.1@8:2:{through}")
        expected = float(saved[HookPoint.ATTN_LOGITS][0, 1, 8, 2])
        assert table.direction_value == pytest.approx(expected, abs=1e-5)
        assert all(n.layer is None or n.layer < 1 for n in table.nodes)
    value = node_table(loaded, TOKENS, TARGET, DISTRACTOR, k=2, trace="h1.1@8:2:v")
    assert all(n.token <= 2 for n in value.nodes)


# --- architecture details ----------------------------------------------------------------------


def test_sliding_window_hides_keys_beyond_it(tmp_path: Path) -> None:
    """Qwen2 with a window of 3 from layer 1: layer 0 sees every earlier key, layer 1 three."""
    make_checkpoint(tmp_path, SHAPES[3][0], **SHAPES[3][1])
    model = load_model(tmp_path).model
    probs: dict[int | None, torch.Tensor] = {}
    model(
        torch.tensor([TOKENS]),
        Hooks({HookPoint.ATTN_PROBS: lambda x, layer: probs.update({layer: x})}),
    )
    distance = torch.arange(len(TOKENS))[:, None] - torch.arange(len(TOKENS))[None]  # q - k
    assert (probs[0][0][:, distance >= 3] > 0).all()
    assert (probs[1][0][:, distance >= 3] == 0).all()
    assert (probs[1][0][:, (distance >= 0) & (distance < 3)] > 0).all()


ROPE_SCALINGS = [
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
]  # fmt: skip


@pytest.mark.parametrize("rope", ROPE_SCALINGS, ids=lambda r: str(r["rope_type"]))
def test_rope_scaling_matches_transformers(tmp_path: Path, rope: dict[str, object]) -> None:
    shape = {"hidden_size": 32, "num_attention_heads": 2, "rope_parameters": rope}
    reference = make_checkpoint(tmp_path, "llama", num_hidden_layers=1, **shape)
    tokens = torch.randint(0, VOCAB, (2, 60), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = load_model(tmp_path).model(tokens) - reference(tokens).logits
    assert diff.abs().max().item() < 1e-4


def rewrite_config(directory: Path, drop: tuple[str, ...], **values: object) -> None:
    config = json.loads((directory / "config.json").read_text())
    config = {k: v for k, v in config.items() if k not in drop} | values
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("arch", "old_keys"),
    [
        ("gpt_neox", {"rotary_emb_base": 10000, "rotary_pct": 0.25}),
        ("llama", {"rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 2.0}}),
        (
            "gemma",
            {"rope_theta": 10000.0, "hidden_act": "gelu", "hidden_activation": "gelu_pytorch_tanh"},
        ),
    ],
)
def test_config_keys_of_older_transformers(
    tmp_path: Path, arch: str, old_keys: dict[str, object]
) -> None:
    """Checkpoints saved before transformers 5 say rope_theta / rope_scaling / rotary_pct."""
    scaling = old_keys.get("rope_scaling")
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if isinstance(scaling, dict):
        rope = {"rope_type": "linear", "rope_theta": 10000.0, "factor": scaling["factor"]}
    if arch == "gpt_neox":
        rope["partial_rotary_factor"] = 0.25
    reference = make_checkpoint(
        tmp_path, arch, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=1, rope_parameters=rope,
    )  # fmt: skip
    rewrite_config(tmp_path, ("rope_parameters",), **old_keys)
    tokens = torch.tensor([TOKENS])
    with torch.no_grad():
        diff = load_model(tmp_path).model(tokens) - reference(tokens).logits
    assert diff.abs().max().item() < 1e-4


def test_sharded_checkpoint(tmp_path: Path) -> None:
    reference = make_checkpoint(tmp_path, "llama", hidden_size=32, num_attention_heads=4)
    sharded = tmp_path / "sharded"
    reference.save_pretrained(sharded, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    tokens = torch.tensor([TOKENS])
    with torch.no_grad():
        diff = load_model(sharded).model(tokens) - reference(tokens).logits
    assert diff.abs().max().item() < 1e-4


def test_head_logit_and_value_match_the_forward_pass(tmp_path: Path) -> None:
    """Tracing upstream rebuilds one head's logit and value from the residual stream."""
    make_checkpoint(
        tmp_path, SHAPES[0][0], **SHAPES[0][1]
    )  # Llama, two query heads per key/value head
    model = load_model(tmp_path).model
    assert isinstance(model, Llama)
    saved: dict[HookPoint, torch.Tensor] = {}

    def keep(point: HookPoint):  # type: ignore[no-untyped-def]
        return lambda x, layer: saved.setdefault(point, x) if layer == 1 else None

    points = (HookPoint.RESID_PRE, HookPoint.ATTN_LOGITS, HookPoint.V)
    model(torch.tensor([TOKENS]), Hooks({p: keep(p) for p in points}))
    block = model.block(1)
    x = block.ln_1(saved[HookPoint.RESID_PRE], Hooks())[0]  # [pos d_model]
    query, key, head = 7, 3, 3
    logit = block.attn.head_logit(x[query], x[key], head, query, key)
    torch.testing.assert_close(logit, saved[HookPoint.ATTN_LOGITS][0, head, query, key])
    torch.testing.assert_close(
        block.attn.head_value(x[key], head), saved[HookPoint.V][0, key, head]
    )


# --- loading errors ------------------------------------------------------------------------------


def test_unknown_model_type_and_missing_config_key(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(TdbError, match=r"unsupported architecture 'bert'.*llama, qwen2, mistral"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(TdbError, match="hidden_size is missing"):
        load_model(tmp_path)


def test_loading_errors_name_the_problem(tmp_path: Path) -> None:
    make_checkpoint(tmp_path, SHAPES[2][0], **SHAPES[2][1])  # Qwen2: q/k/v biases
    config = json.loads((tmp_path / "config.json").read_text())

    rewrite_config(tmp_path, (), rope_parameters={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(TdbError, match="unsupported rotary scaling 'yarn'"):
        load_model(tmp_path)
    rewrite_config(tmp_path, (), **{**config, "num_key_value_heads": 3})
    with pytest.raises(TdbError, match="4 attention heads cannot share 3 key/value heads"):
        load_model(tmp_path)
    rewrite_config(tmp_path, (), **{**config, "intermediate_size": 65})
    with pytest.raises(TdbError, match=r"weights do not match config\.json"):
        load_model(tmp_path)
    rewrite_config(tmp_path, (), **{**config, "num_hidden_layers": "two"})
    with pytest.raises(TdbError, match="num_hidden_layers must be an integer"):
        load_model(tmp_path)

    rewrite_config(tmp_path, (), **config)
    from safetensors.torch import load_file, save_file

    weights = load_file(str(tmp_path / "model.safetensors"))
    del weights["model.layers.1.self_attn.k_proj.bias"]
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(TdbError, match=r"missing tensor 'model.layers.1.self_attn.k_proj.bias'"):
        load_model(tmp_path)


def test_query_and_key_changes_give_the_changed_attention_logits(
    checkpoint: tuple[PreTrainedModel, Path],
) -> None:
    """atp*'s QK fix: the queries and keys of a changed residual stream (query_change and
    key_change of the normalised change: rotary, grouped-query) give the attention logits a
    forward pass with that residual stream computes."""
    loaded = load_model(checkpoint[1])
    layer, n = 1, len(TOKENS)
    clean = loaded.run([TOKENS], cache=["resid_pre", "q", "k", "attn_logits"])
    x = clean.cache["resid_pre", layer]
    dx = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)) * x.std()
    changed = loaded.run(
        [TOKENS],
        cache=["attn_logits"],
        hooks={"resid_pre": lambda t, at: t + dx if at == layer else None},
    )
    block = loaded.model.block(layer)
    dx_norm = block.ln_1(x + dx, Hooks()) - block.ln_1(x, Hooks())
    positions = torch.arange(n)[None]
    q = clean.cache["q", layer] + block.attn.query_change(dx_norm, positions)
    k = clean.cache["k", layer] + block.attn.key_change(dx_norm, positions)
    logits = torch.einsum("bqhe,bkhe->bhqk", q, k) * block.attn.score_scale
    expected = changed.cache["attn_logits", layer]
    causal = torch.ones(n, n).tril().bool()
    assert torch.allclose(logits[..., causal], expected[..., causal], atol=1e-4, rtol=1e-4)


def test_exact_attribution_equals_a_patched_forward_pass(
    checkpoint: tuple[PreTrainedModel, Path],
) -> None:
    """`tdb attribute --method exact` resumes each patch at its layer (a neuron's after it):
    the same numbers as patching in a whole forward pass, in every architecture."""
    from tdb.attribution import attribution
    from tdb.hooks import patch

    loaded = load_model(checkpoint[1])
    corrupted = [*TOKENS[:4], 60, 61, *TOKENS[6:]]
    record = {
        "prompt_ids": TOKENS,
        "corrupted_ids": corrupted,
        "target_ids": [TARGET],
        "distractor_ids": [DISTRACTOR],
    }
    result = attribution(loaded, [record], methods=["exact", "atp*", "ig"])
    scores = {row.id: row.scores for row in result.rows}
    source = loaded.run([corrupted], cache=["attn_z", "mlp_post"])

    def metric(hooks: dict[str, object] | None) -> float:
        logits = loaded.run([TOKENS], hooks=hooks).last_logits[0]  # type: ignore[arg-type]
        return float(logits[TARGET] - logits[DISTRACTOR])

    clean = metric(None)
    for layer in range(loaded.model.config.n_layer):
        head = patch(source.cache, "attn_z", layer, heads=1)
        assert scores[f"h{layer}.1"]["exact"] == pytest.approx(
            clean - metric({"attn_z": head}), abs=1e-4
        )

        def neuron(x: torch.Tensor, at: int | None, layer: int = layer) -> torch.Tensor | None:
            if at != layer:
                return None
            x = x.clone()
            x[..., 3] = source.cache["mlp_post", layer][..., 3]
            return x

        assert scores[f"n{layer}.3"]["exact"] == pytest.approx(
            clean - metric({"mlp_post": neuron}), abs=1e-4
        )
    assert all(math.isfinite(v) for s in scores.values() for v in s.values() if v is not None)
