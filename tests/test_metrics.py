"""Every derived scalar against an independent reference (tests/reference.py).

- direct effect: the exact linear contribution of the node's explicit write vector through the
  frozen final layer norm and the unembedding;
- activation × gradient: autograd on the naive model;
- write magnitude: the norm of the explicit write vector;
- activation: the naive model's probabilities, post-activations, and 1 for embeddings.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from checkpoints import make_checkpoint
from reference import Reference, naive_run
from transformers import GPT2LMHeadModel

from tdb.capture import capture
from tdb.checkpoint import load_model
from tdb.direction import LogitDiff
from tdb.metrics import ALL_GROUPS, METRICS, Group
from tdb.nodes import NodeIndex, NodeType
from tdb.store import GridBlock, ScalarStore

TOKENS = [5, 17, 99, 250, 3, 17, 42, 8, 77]
TARGET, DISTRACTOR = 11, 12


def reference_values(ref: Reference, node: NodeIndex, position: int) -> dict[Group, float]:
    """The four metrics of one node, from the naive model alone."""
    if node.node_type is NodeType.EMBEDDING:
        activation = 1.0
        write = ref.resid[node.token]
        act_times_grad = float((ref.resid[node.token] * ref.resid_grad[node.token]).sum())
    elif node.node_type is NodeType.ATTENTION_HEAD:
        assert node.layer is not None and node.key_token is not None
        q, k = node.token, node.key_token
        activation = float(ref.probs[node.layer][node.index][q, k])
        write = ref.head_writes[node.layer][node.index][q, k]
        act_times_grad = activation * float(ref.probs_grad[node.layer][node.index][q, k])
    else:
        assert node.layer is not None
        activation = float(ref.post[node.layer][node.token, node.index])
        write = ref.neuron_writes[node.layer][node.token, node.index]
        act_times_grad = activation * float(ref.post_grad[node.layer][node.token, node.index])
    direct = float(ref.contribution(write)) if node.token == position else 0.0
    return {
        Group.ACTIVATION: activation,
        Group.WRITE_NORM: float(write.norm()),
        Group.DIRECT_EFFECT: direct,
        Group.ACT_TIMES_GRAD: act_times_grad,
    }


def all_nodes(store: ScalarStore) -> list[NodeIndex]:
    nodes = []
    for node_type, block in store.blocks.items():
        assert isinstance(block, GridBlock)
        flat = torch.arange(len(block.values[Group.ACTIVATION]))
        valid = ~torch.isnan(block.values[Group.ACTIVATION])
        nodes += [NodeIndex.from_coords(node_type, row) for row in block.coords(flat[valid])]
    return nodes


@pytest.fixture(
    scope="module",
    params=[
        {"n_layer": 2, "n_embd": 32, "n_head": 4},
        {"n_layer": 3, "n_embd": 24, "n_head": 2, "tie_word_embeddings": False, "n_inner": 40},
    ],
)
def model_pair(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[GPT2LMHeadModel, Path]:
    directory = tmp_path_factory.mktemp("metrics")
    return make_checkpoint(directory, with_tokenizer=False, **request.param), directory


@pytest.mark.parametrize("position", [8, 5])
def test_every_metric_of_every_node_matches_the_reference(
    model_pair: tuple[GPT2LMHeadModel, Path], position: int
) -> None:
    hf_model, directory = model_pair
    model = load_model(directory).model
    direction = LogitDiff((TARGET,), (DISTRACTOR,), position)
    cap = capture(model, torch.tensor(TOKENS), direction, ALL_GROUPS)
    ref = naive_run(hf_model, TOKENS, position, TARGET, DISTRACTOR)
    assert cap.direction_value == pytest.approx(ref.value, abs=1e-5)

    nodes = all_nodes(cap.store)
    n, h, m, layers = position + 1, hf_model.config.n_head, model.config.d_mlp, model.config.n_layer
    # Only tokens up to the position can affect the direction; for heads, key <= query only.
    assert len(nodes) == n + layers * h * n * (n + 1) // 2 + layers * n * m
    checked: set[tuple[NodeType, Group]] = set()
    for group in ALL_GROUPS:
        ours = cap.store.values_at(group, nodes)
        expected = torch.tensor([reference_values(ref, node, position)[group] for node in nodes])
        torch.testing.assert_close(
            ours, expected, atol=2e-5, rtol=1e-4, msg=lambda m, group=group: f"{group}: {m}"
        )
        checked |= {(node.node_type, group) for node in nodes}
    assert checked == set(METRICS)  # the whole registry was walked


def test_direct_effects_at_the_position_add_up_to_the_direction(
    model_pair: tuple[GPT2LMHeadModel, Path],
) -> None:
    """Every write into the residual stream at the position, plus the biases, is the direction."""
    hf_model, directory = model_pair
    model = load_model(directory).model
    direction = LogitDiff((TARGET,), (DISTRACTOR,), 8)
    cap = capture(model, torch.tensor(TOKENS), direction, [Group.DIRECT_EFFECT])
    total = sum(
        float(b.values[Group.DIRECT_EFFECT].nan_to_num().sum()) for b in cap.store.blocks.values()
    )
    ref = naive_run(hf_model, TOKENS, 8, TARGET, DISTRACTOR)
    sd = hf_model.state_dict()
    bias = sum(
        sd[f"transformer.h.{layer}.{name}"]
        for layer in range(model.config.n_layer)
        for name in ("attn.c_proj.bias", "mlp.c_proj.bias")
    )
    centred_value = total + float(ref.contribution(bias))
    beta = sd["transformer.ln_f.bias"] @ ref.unembed_diff
    assert centred_value + float(beta) == pytest.approx(cap.direction_value, abs=1e-4)


def test_no_parameter_gradients_and_backward_only_when_needed(
    model_pair: tuple[GPT2LMHeadModel, Path],
) -> None:
    _, directory = model_pair
    model = load_model(directory).model
    model.requires_grad_(True)  # even a model with trainable weights gets no .grad
    direction = LogitDiff((TARGET,), (DISTRACTOR,), 8)
    capture(model, torch.tensor(TOKENS), direction, ALL_GROUPS)
    assert all(p.grad is None for p in model.parameters())
    forward_only = capture(
        model, torch.tensor(TOKENS), direction, [Group.ACTIVATION, Group.DIRECT_EFFECT]
    )
    assert forward_only.store.groups == [Group.ACTIVATION, Group.DIRECT_EFFECT]
