"""Every derived scalar against an independent reference (tests/reference.py).

- direct effect: the exact linear contribution of the node's explicit write vector through the
  frozen final layer norm and the unembedding;
- activation × gradient: autograd on the naive model;
- write magnitude: the norm of the explicit write vector;
- activation: the naive model's probabilities, post-activations, and 1 for embeddings;
- SAE latents (one SAE per site on layer 1): the naive encoder on the naive model's activations
  (tests/sae_reference.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from checkpoints import make_checkpoint
from node_values import all_nodes, reference_values
from reference import naive_run
from sae_reference import latent_reference, saes_for_tests
from transformers import GPT2LMHeadModel

from tdb.capture import capture
from tdb.checkpoint import load_model
from tdb.direction import LogitDiff
from tdb.metrics import ALL_GROUPS, METRIC_SPECS, Group
from tdb.nodes import NodeIndex, NodeType

TOKENS = [5, 17, 99, 250, 3, 17, 42, 8, 77]
TARGET, DISTRACTOR = 11, 12


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
    saes = saes_for_tests(model.config.d_model, model.config.d_mlp, layers=[1])
    cap = capture(model, torch.tensor(TOKENS), direction, ALL_GROUPS, saes=saes)
    ref = naive_run(hf_model, TOKENS, position, TARGET, DISTRACTOR)
    assert cap.direction_value == pytest.approx(ref.value, abs=1e-5)

    nodes = all_nodes(cap.store)
    n, h, m, layers = position + 1, hf_model.config.n_head, model.config.d_mlp, model.config.n_layer
    latents = sum(n * a.sae.d_sae for a in saes)
    # Only tokens up to the position can affect the direction; for heads, key <= query only.
    assert len(nodes) == n + layers * h * n * (n + 1) // 2 + layers * n * m + latents
    checked: set[tuple[NodeType, Group]] = set()

    def expected_values(node: NodeIndex) -> dict[Group, float]:
        if node.node_type is NodeType.AUTOENCODER_LATENT:
            return latent_reference(ref, hf_model, saes, node, position)
        return reference_values(ref, node, position)

    for group in ALL_GROUPS:
        ours = cap.store.values_at(group, nodes)
        expected = torch.tensor([expected_values(node)[group] for node in nodes])
        torch.testing.assert_close(
            ours, expected, atol=2e-5, rtol=1e-4, msg=lambda m, group=group: f"{group}: {m}"
        )
        checked |= {(node.node_type, group) for node in nodes}
    assert checked == {
        (t, g) for g, spec in METRIC_SPECS.items() for t in spec.functions
    }  # the whole registry was walked


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
