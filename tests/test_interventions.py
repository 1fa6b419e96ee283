"""Ablations, traces, other directions, two prompts, verification and token views, each against
an independent computation (the naive model of tests/reference.py, or Hugging Face's)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from checkpoints import make_checkpoint
from reference import frozen_layer_norm, naive_run
from transformers import GPT2LMHeadModel

from tdb.ablation import ablation_hooks, parse_ablation
from tdb.capture import capture
from tdb.checkpoint import LoadedModel, load_model
from tdb.cli import main
from tdb.direction import AttentionLogit, LogitDiff, NeuronPreActivation
from tdb.errors import TdbError
from tdb.metrics import ALL_GROUPS, Group
from tdb.nodes import NodeIndex, NodeType
from tdb.table import node_table

TOKENS = [5, 17, 99, 250, 3, 17, 42, 8, 77, 5]
SECOND = [6, 18, 98, 251, 4, 16, 43, 9, 76, 6]
T, D = 11, 12
LAST = len(TOKENS) - 1


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[GPT2LMHeadModel, LoadedModel]:
    directory = tmp_path_factory.mktemp("interventions")
    hf = make_checkpoint(directory, n_layer=3, n_embd=32, n_head=4, with_tokenizer=False)
    return hf, load_model(directory)


def value_of(table_json: dict[str, object]) -> float:
    direction = table_json["direction"]
    assert isinstance(direction, dict)
    return float(direction["value"])


def set_entry(
    name: str,
    layer: int | None,
    head: int | None,
    index: tuple[int | slice, ...],
    value: float | torch.Tensor,
):
    """An edit for naive_run that sets one entry."""

    def edit(n: str, ly: int | None, h: int | None, x: torch.Tensor) -> torch.Tensor:
        if (n, ly, h) != (name, layer, head):
            return x
        x = x.clone()
        x[index] = value
        return x

    return edit


@pytest.mark.parametrize(
    ("ablation", "edit"),
    [
        ("n1.7@4", set_entry("post", 1, None, (4, 7), 0.0)),
        ("n0.3@9:zero", set_entry("post", 0, None, (9, 3), 0.0)),
        ("h1.2@9:3", set_entry("probs", 1, 2, (9, 3), 0.0)),
        ("h2.0@9", set_entry("head_out", 2, 0, (9,), 0.0)),
        ("e@2", set_entry("resid", None, None, (2,), 0.0)),
        # Whole components and layers: every position.
        ("h2.0", set_entry("head_out", 2, 0, (slice(None),), 0.0)),
        ("n1.7", set_entry("post", 1, None, (slice(None), 7), 0.0)),
        ("m1", set_entry("mlp_out", 1, None, (slice(None),), 0.0)),
        ("a0:zero", set_entry("attn_out", 0, None, (slice(None),), 0.0)),
    ],
)
def test_zero_ablation_changes_the_direction_as_the_naive_model_says(
    pair: tuple[GPT2LMHeadModel, LoadedModel], ablation: str, edit: object
) -> None:
    hf, loaded = pair
    table = node_table(loaded, TOKENS, T, D, k=3, ablate=[ablation])
    expected = naive_run(hf, TOKENS, LAST, T, D, edit=edit)  # type: ignore[arg-type]
    baseline = naive_run(hf, TOKENS, LAST, T, D)
    assert table.direction_value == pytest.approx(expected.value, abs=1e-5)
    assert table.baseline_value == pytest.approx(baseline.value, abs=1e-5)
    # Per metric: ablated, baseline and their difference, at every node of the table.
    baseline_store = capture(
        loaded.model, torch.tensor(TOKENS), LogitDiff((T,), (D,), LAST), ALL_GROUPS
    )
    for g in ALL_GROUPS:
        before = baseline_store.store.values_at(g, table.nodes).tolist()
        assert table.columns[f"{g.value}_baseline"] == pytest.approx(before, abs=1e-6)
        diff = [a - b for a, b in zip(table.values[g], before, strict=True)]
        assert table.columns[f"{g.value}_diff"] == pytest.approx(diff, abs=1e-6)


def test_whole_layer_mean_ablation_is_the_layers_mean_write(
    pair: tuple[GPT2LMHeadModel, LoadedModel],
) -> None:
    """`m1:mean`: layer 1's MLP output at every position becomes its mean over the prompt."""
    hf, loaded = pair
    mean = naive_run(hf, TOKENS, LAST, T, D).mlp_out[1].mean(dim=0)  # [d_model]
    expected = naive_run(hf, TOKENS, LAST, T, D, edit=set_entry("mlp_out", 1, None, (), mean))
    table = node_table(loaded, TOKENS, T, D, k=1, ablate=["m1:mean"])
    assert table.direction_value == pytest.approx(expected.value, abs=1e-5)
    with pytest.raises(TdbError, match="layer 7 is outside"):
        node_table(loaded, TOKENS, T, D, ablate=["a7"])
    with pytest.raises(TdbError, match=r"h9\.1: layer 9 is outside"):
        node_table(loaded, TOKENS, T, D, ablate=["h9.1"])
    with pytest.raises(TdbError, match="a component id"):
        node_table(loaded, TOKENS, T, D, ablate=["x1.2"])


def test_pair_ablation_touches_only_that_pair_and_does_not_renormalise(
    pair: tuple[GPT2LMHeadModel, LoadedModel],
) -> None:
    hf, loaded = pair
    hooks = ablation_hooks(loaded.model, TOKENS, [parse_ablation("h1.2@9:3")])
    cap = capture(
        loaded.model, torch.tensor(TOKENS), LogitDiff((T,), (D,), LAST), ALL_GROUPS, hooks=hooks
    )
    row = [NodeIndex(NodeType.ATTENTION_HEAD, 1, 9, 2, key_token=key) for key in range(10)]
    ablated = cap.store.values_at(Group.ACTIVATION, row).tolist()
    ref = naive_run(hf, TOKENS, LAST, T, D)
    expected = ref.probs[1][2][9].tolist()
    expected[3] = 0.0
    assert ablated == pytest.approx(expected, abs=1e-6)


def test_mean_and_resample_ablations(pair: tuple[GPT2LMHeadModel, LoadedModel]) -> None:
    hf, loaded = pair
    ref = naive_run(hf, TOKENS, LAST, T, D)
    mean = float(ref.post[1][:, 7].mean())
    table = node_table(loaded, TOKENS, T, D, k=2, ablate=["n1.7@4:mean"])
    expected = naive_run(hf, TOKENS, LAST, T, D, edit=set_entry("post", 1, None, (4, 7), mean))
    assert table.direction_value == pytest.approx(expected.value, abs=1e-5)

    probs = ref.probs[1][2]
    pair_mean = float(probs[torch.ones_like(probs, dtype=torch.bool).tril()].mean())
    table = node_table(loaded, TOKENS, T, D, k=2, ablate=["h1.2@9:3:mean"])
    expected = naive_run(hf, TOKENS, LAST, T, D, edit=set_entry("probs", 1, 2, (9, 3), pair_mean))
    assert table.direction_value == pytest.approx(expected.value, abs=1e-5)

    other = naive_run(hf, SECOND, LAST, T, D)
    table = node_table(
        loaded, TOKENS, T, D, k=2, ablate=["n2.5@6:resample", "e@1:resample"], second_prompt=SECOND
    )
    resid_second = other.resid[1]

    def both(n: str, ly: int | None, h: int | None, x: torch.Tensor) -> torch.Tensor:
        x = set_entry("post", 2, None, (6, 5), float(other.post[2][6, 5]))(n, ly, h, x)
        return set_entry("resid", None, None, (1,), resid_second)(n, ly, h, x)

    expected = naive_run(hf, TOKENS, LAST, T, D, edit=both)
    assert table.direction_value == pytest.approx(expected.value, abs=1e-5)

    mean_over_refs = float(torch.cat([ref.post[1][:, 7], other.post[1][:, 7]]).mean())
    table = node_table(
        loaded, TOKENS, T, D, k=2, ablate=["n1.7@4:mean"], mean_prompts=[TOKENS, SECOND]
    )
    expected = naive_run(
        hf, TOKENS, LAST, T, D, edit=set_entry("post", 1, None, (4, 7), mean_over_refs)
    )
    assert table.direction_value == pytest.approx(expected.value, abs=1e-5)


def test_trace_a_neuron_equals_hand_built_autograd(
    pair: tuple[GPT2LMHeadModel, LoadedModel],
) -> None:
    hf, loaded = pair
    layer, token, neuron = 2, 7, 11

    def read(state: dict[str, object]) -> torch.Tensor:
        sd, eps = state["sd"], state["eps"]
        x = state["resid_mid"][layer][token]  # type: ignore[index]
        p = f"transformer.h.{layer}."
        h = frozen_layer_norm(x, sd[p + "ln_2.weight"], sd[p + "ln_2.bias"], eps)  # type: ignore[index, arg-type]
        return h @ sd[p + "mlp.c_fc.weight"][:, neuron] + sd[p + "mlp.c_fc.bias"][neuron]  # type: ignore[index, no-any-return]

    ref = naive_run(hf, TOKENS, LAST, T, D, read=read)
    cap = capture(
        loaded.model, torch.tensor(TOKENS), NeuronPreActivation(layer, token, neuron), ALL_GROUPS
    )
    assert cap.direction_value == pytest.approx(ref.value, abs=1e-5)
    mlp = cap.store.blocks[NodeType.MLP_NEURON]
    heads = cap.store.blocks[NodeType.ATTENTION_HEAD]
    assert mlp.shape[0] == layer and heads.shape[0] == layer + 1  # type: ignore[union-attr]
    for ly in range(layer):
        node = NodeIndex(NodeType.MLP_NEURON, ly, 5, 3)
        expected = float(ref.post[ly][5, 3] * ref.post_grad[ly][5, 3])
        assert float(cap.store.values_at(Group.ACT_TIMES_GRAD, [node])[0]) == pytest.approx(
            expected, abs=1e-5
        )
    node = NodeIndex(NodeType.ATTENTION_HEAD, layer, 7, 1, key_token=2)  # same layer's attention
    expected = float(ref.probs[layer][1][7, 2] * ref.probs_grad[layer][1][7, 2])
    assert float(cap.store.values_at(Group.ACT_TIMES_GRAD, [node])[0]) == pytest.approx(
        expected, abs=1e-5
    )
    # Nodes that cannot affect it are not in the store at all: the same layer's MLP, later tokens.
    later = [
        NodeIndex(NodeType.MLP_NEURON, layer, token, 0),
        NodeIndex(NodeType.MLP_NEURON, 0, token + 1, 0),
        NodeIndex(NodeType.ATTENTION_HEAD, 0, token + 1, 0, key_token=0),
    ]
    assert all(math.isnan(v) for v in cap.store.values_at(Group.ACT_TIMES_GRAD, later).tolist())
    table = node_table(loaded, TOKENS, T, D, k=5, trace=f"n{layer}.{neuron}@{token}")
    assert all(n.token <= token for n in table.nodes)
    assert all(
        n.layer is None
        or n.layer < layer
        or (n.node_type is NodeType.ATTENTION_HEAD and n.layer == layer)
        for n in table.nodes
    )
    assert table.to_json()["direction"]["kind"] == "mlp_pre_activation"  # type: ignore[index]


@pytest.mark.parametrize("through", ["q", "k", "qk"])
def test_trace_an_attention_logit_equals_hand_built_autograd(
    pair: tuple[GPT2LMHeadModel, LoadedModel], through: str
) -> None:
    hf, loaded = pair
    layer, head, query, key = 2, 1, 8, 3
    d, dh = 32, 8

    def read(state: dict[str, object]) -> torch.Tensor:
        sd, eps = state["sd"], state["eps"]
        x = state["resid_pre"][layer]  # type: ignore[index]
        p = f"transformer.h.{layer}."
        h = frozen_layer_norm(x, sd[p + "ln_1.weight"], sd[p + "ln_1.bias"], eps)  # type: ignore[index, arg-type]
        qkv = h @ sd[p + "attn.c_attn.weight"] + sd[p + "attn.c_attn.bias"]  # type: ignore[index]
        cols = slice(head * dh, (head + 1) * dh)
        q = qkv[query, :d][cols]
        k = qkv[key, d : 2 * d][cols]
        q = q if "q" in through else q.detach()
        k = k if "k" in through else k.detach()
        return q @ k / math.sqrt(dh)

    ref = naive_run(hf, TOKENS, LAST, T, D, read=read)
    cap = capture(
        loaded.model,
        torch.tensor(TOKENS),
        AttentionLogit(layer, head, query, key, through),
        ALL_GROUPS,
    )  # type: ignore[arg-type]
    assert cap.direction_value == pytest.approx(ref.value, abs=1e-5)
    for ly in range(layer):
        for t in (1, 3, 6):
            if through == "k" and t > key:
                continue  # after the key token: not a node of this direction (checked below)
            node = NodeIndex(NodeType.MLP_NEURON, ly, t, 4)
            expected = float(ref.post[ly][t, 4] * ref.post_grad[ly][t, 4])
            got = float(cap.store.values_at(Group.ACT_TIMES_GRAD, [node])[0])
            assert got == pytest.approx(expected, abs=1e-5)
    # A head of the same layer is not upstream.
    same_layer = NodeIndex(NodeType.ATTENTION_HEAD, layer, 3, 0, key_token=1)
    assert math.isnan(float(cap.store.values_at(Group.ACT_TIMES_GRAD, [same_layer])[0]))
    if through == "k":  # nothing after the key token can affect the key side
        late = NodeIndex(NodeType.MLP_NEURON, 0, key + 1, 0)
        assert math.isnan(float(cap.store.values_at(Group.ACT_TIMES_GRAD, [late])[0]))


def test_trace_through_the_value(pair: tuple[GPT2LMHeadModel, LoadedModel]) -> None:
    hf, loaded = pair
    table = node_table(loaded, TOKENS, T, D, k=3, trace="h1.2@9:3:v")
    direction = table.to_json()["direction"]
    assert direction["kind"] == "attention_value_write"  # type: ignore[index]
    assert all(n.token <= 3 for n in table.nodes)  # only what the value at key 3 reads
    # The head's explicit write at (9, 3) dotted with the gradient of the direction with respect
    # to the residual stream at token 9 right after layer 1's attention (naive autograd).
    ref = naive_run(hf, TOKENS, LAST, T, D)
    expected = float(ref.head_writes[1][2][9, 3] @ ref.resid_mid_grad[1][9])
    assert table.direction_value == pytest.approx(expected, abs=1e-5)


def test_logprob_and_vector_directions(
    pair: tuple[GPT2LMHeadModel, LoadedModel], tmp_path: Path
) -> None:
    hf, loaded = pair
    with torch.no_grad():
        logits = hf(torch.tensor([TOKENS])).logits[0, 6]
    table = node_table(loaded, TOKENS, T, None, logprob=True, position=6, k=2)
    assert table.direction_value == pytest.approx(float(logits.log_softmax(-1)[T]), abs=1e-5)
    assert all(n.token <= 6 for n in table.nodes)
    vector = torch.randn(32)
    torch.save(vector, tmp_path / "v.pt")
    table = node_table(loaded, TOKENS, vector=tmp_path / "v.pt", k=2)
    ref = naive_run(hf, TOKENS, LAST, T, D, read=lambda state: state["final"][LAST] @ vector)  # type: ignore[index]
    assert table.direction_value == pytest.approx(ref.value, rel=1e-5, abs=1e-5)
    assert table.to_json()["direction"]["kind"] == "residual_direction"  # type: ignore[index]
    act_times_grad = ref.resid[3] @ ref.resid_grad[3]
    embedding = capture(loaded.model, torch.tensor(TOKENS), table.direction, [Group.ACT_TIMES_GRAD])
    node = NodeIndex(NodeType.EMBEDDING, None, 3, 0)
    got = embedding.store.values_at(Group.ACT_TIMES_GRAD, [node])
    assert float(got[0]) == pytest.approx(float(act_times_grad), abs=1e-5)
    (tmp_path / "bad.txt").write_text("1 2 3")
    with pytest.raises(TdbError, match="must hold 32 numbers"):
        node_table(loaded, TOKENS, vector=tmp_path / "bad.txt")
    several = node_table(loaded, TOKENS, [T, 20], [D, 30], k=1)
    with torch.no_grad():
        last = hf(torch.tensor([TOKENS])).logits[0, LAST]
    expected = float((last[T] + last[20]) / 2 - (last[D] + last[30]) / 2)
    assert several.direction_value == pytest.approx(expected, abs=1e-5)


def test_two_prompts_side_by_side(pair: tuple[GPT2LMHeadModel, LoadedModel]) -> None:
    _, loaded = pair
    table = node_table(loaded, TOKENS, T, D, k=3, second_prompt=SECOND)
    left = capture(loaded.model, torch.tensor(TOKENS), LogitDiff((T,), (D,), LAST), ALL_GROUPS)
    right = capture(loaded.model, torch.tensor(SECOND), LogitDiff((T,), (D,), LAST), ALL_GROUPS)
    assert table.right_value == pytest.approx(right.direction_value)
    for g in ALL_GROUPS:
        assert table.values[g] == pytest.approx(left.store.values_at(g, table.nodes).tolist())
        r = right.store.values_at(g, table.nodes).tolist()
        assert table.columns[f"{g.value}_right"] == pytest.approx(r)
        assert table.columns[f"{g.value}_diff"] == pytest.approx(
            [b - a for a, b in zip(table.values[g], r, strict=True)]
        )
    with pytest.raises(TdbError, match="same number of tokens"):
        node_table(loaded, TOKENS, T, D, second_prompt=SECOND[:-1])


def test_verify_reports_real_ablation_effects(pair: tuple[GPT2LMHeadModel, LoadedModel]) -> None:
    hf, loaded = pair
    table = node_table(loaded, TOKENS, T, D, k=5, verify=4)
    doc = table.to_json()
    rows = doc["verification"]
    assert isinstance(rows, list) and len(rows) == 4
    estimates = [abs(r["estimated"]) for r in rows]
    assert estimates == sorted(estimates, reverse=True)
    baseline = naive_run(hf, TOKENS, LAST, T, D).value
    for row in rows:
        node = table.nodes[[n.id for n in table.nodes].index(row["id"])]
        i = table.nodes.index(node)
        assert row["estimated"] == pytest.approx(table.values[Group.ACT_TIMES_GRAD][i])
        assert row["direct"] == pytest.approx(table.values[Group.DIRECT_EFFECT][i])
        ablated = node_table(loaded, TOKENS, T, D, k=1, ablate=[row["id"]]).direction_value
        assert row["actual"] == pytest.approx(baseline - ablated, abs=1e-5)
    summary = doc["verification_summary"]
    assert isinstance(summary, dict) and -1 <= summary["correlation_estimated_actual"] <= 1


def test_token_views(pair: tuple[GPT2LMHeadModel, LoadedModel]) -> None:
    hf, loaded = pair
    table = node_table(loaded, TOKENS, T, D, k=2, view_nodes=["n1.7@4", "h2.1@9:3"])
    views = table.to_json()["token_views"]
    assert isinstance(views, dict)
    with torch.no_grad():
        logits = hf(torch.tensor([TOKENS])).logits[0, LAST]
    top = views["logits"]["top"]
    assert [t["id"] for t in top] == torch.topk(logits, 100).indices.tolist()
    pinned = {p["id"]: p for p in views["logits"]["pinned"]}
    assert pinned[T]["rank"] == int((logits > logits[T]).sum())
    ref = naive_run(hf, TOKENS, LAST, T, D)
    sd = hf.state_dict()
    write = ref.neuron_writes[1][4, 7]
    scores = (write * sd["transformer.ln_f.weight"]) @ sd["transformer.wte.weight"].T
    scores = scores - scores.mean()
    neuron_view = views["nodes"][0]
    assert [t["id"] for t in neuron_view["promotes"]] == torch.topk(scores, 10).indices.tolist()
    assert [t["id"] for t in neuron_view["suppresses"]] == torch.topk(
        scores, 10, largest=False
    ).indices.tolist()
    assert neuron_view["exciting_tokens"][0]["token"] == int(ref.post[1][:, 7].argmax())
    head_write = ref.head_writes[2][1][9, 3]
    head_scores = (head_write * sd["transformer.ln_f.weight"]) @ sd["transformer.wte.weight"].T
    head_view = views["nodes"][1]
    assert head_view["promotes"][0]["id"] == int((head_scores - head_scores.mean()).argmax())
    sums = views["effect_by_token"]
    emb = [float((ref.resid[t] * ref.resid_grad[t]).sum()) for t in range(len(TOKENS))]
    assert sums["embedding"] == pytest.approx(emb, abs=1e-5)
    to_key = [
        sum(
            float((ref.probs[ly][h][:, t] * ref.probs_grad[ly][h][:, t]).sum())
            for ly in range(3)
            for h in range(4)
        )
        for t in range(len(TOKENS))
    ]
    assert sums["attention_to"] == pytest.approx(to_key, abs=1e-5)


def test_cli_flags_and_json(
    pair: tuple[GPT2LMHeadModel, LoadedModel], capsys: pytest.CaptureFixture[str]
) -> None:
    _, loaded = pair
    ids = ",".join(map(str, TOKENS))
    model = str(loaded.path)
    base = [
        "nodes",
        "--token-ids",
        ids,
        "--target-id",
        str(T),
        "--distractor-id",
        str(D),
        "--model",
        model,
        "--json",
        "-k",
        "3",
    ]
    assert main([*base, "--ablate", "n1.7@4", "--ablate", "h1.2@9:3:mean", "--verify", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "baseline_value" in out["direction"]
    assert {"id", "estimated", "direct", "actual"} <= set(out["verification"][0])
    assert "activation_baseline" in out["nodes"][0] and "activation_diff" in out["nodes"][0]
    assert main([*base, "--trace", "h2.1@9:3:k"]) == 0
    assert json.loads(capsys.readouterr().out)["direction"]["kind"] == "attention_logit"
    assert main([*base, "--trace", "h2.1@9:3:v", "--downstream", "n2.4@9"]) == 0
    assert json.loads(capsys.readouterr().out)["direction"]["downstream"] == "n2.4@9"
    for bad, message in [
        (["--ablate", "n9.1@2"], "layer 9 is outside 0..2"),
        (["--ablate", "h0.1@2:5"], "key token 5 must be in 0..2"),
        (["--ablate", "n0.1@2:resample"], "needs a second prompt"),
        (["--trace", "e@3"], "trace an MLP neuron"),
        (["--trace", "n0.1@2:q"], "applies to attention heads only"),
        (["--position", "40"], "outside the prompt"),
        (["--verify", "-1"], "--verify: must be >= 0"),
        (["--downstream", "n1.1@1"], "--downstream applies only with --trace"),
    ]:
        assert main([*base, *bad]) == 2
        assert message in capsys.readouterr().err
