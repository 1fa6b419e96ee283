"""What the main page's views read from the API: next-token candidates with probabilities and the
loss, the latent rows of the effect-by-token heatmap, and the second prompt's own target and
distractor. Each is checked against an independent computation (softmax, a naive sum over every
latent node of a table, a separate request on the second prompt)."""

from __future__ import annotations

import json
import math
from collections import defaultdict

import pytest
import torch
from fastapi.testclient import TestClient

from tdb.checkpoint import LoadedModel
from tdb.cli import main
from tdb.errors import TdbError
from tdb.metrics import Group
from tdb.nodes import NodeType
from tdb.server.app import create_app
from tdb.table import node_table

PROMPT = "When Mary and John went to the store, John gave a drink to"
SECOND = "When Tom and Anna went to the park, Anna gave a ball to"


def test_candidates_have_probabilities_roles_and_the_loss(demo: LoadedModel) -> None:
    table = node_table(demo, PROMPT, " Mary", " John", k=1, views=True)
    assert table.token_views is not None
    view = table.token_views.logits
    tokens = torch.tensor(demo.tokenizer.encode(PROMPT))
    with torch.no_grad():
        logits = demo.model(tokens[None])[0, -1].double()
    probs = torch.softmax(logits, dim=-1)
    top = view["top"]
    assert isinstance(top, list)
    for t in top:
        assert t["prob"] == pytest.approx(float(probs[t["id"]]), rel=1e-4, abs=1e-9)
    assert sum(t["prob"] for t in top) <= 1 + 1e-9
    pinned = view["pinned"]
    assert isinstance(pinned, list)
    assert [p["role"] for p in pinned] == ["target", "distractor"]
    mary = demo.tokenizer.encode(" Mary")[0]
    assert pinned[0]["id"] == mary
    assert pinned[0]["prob"] == pytest.approx(float(probs[mary]), rel=1e-4)
    assert view["loss"] == pytest.approx(-math.log(float(probs[mary])), rel=1e-4)
    # rank: 0-based, the number of tokens with a higher logit.
    assert pinned[0]["rank"] == int((logits > logits[mary]).sum())


def test_latent_heatmap_rows_are_naive_sums_over_every_latent(demo: LoadedModel) -> None:
    fields = {"mlp_nodes": "latents", "attn_nodes": "latents"}
    table = node_table(demo, PROMPT, " Mary", " John", k=1, views=True, **fields)
    assert table.token_views is not None
    sums = table.token_views.effect_by_token
    n_pos = len(table.tokens)
    # The reference: a table large enough to hold every latent node, summed row by row.
    everything = node_table(
        demo, PROMPT, " Mary", " John", k=100_000, groups=[Group.ACT_TIMES_GRAD], **fields
    )
    naive: dict[str, list[float]] = defaultdict(lambda: [0.0] * n_pos)
    for node, value in zip(everything.nodes, everything.values[Group.ACT_TIMES_GRAD], strict=True):
        if node.node_type is NodeType.AUTOENCODER_LATENT and not math.isnan(value):
            assert node.site is not None
            naive[f"latents_{node.site.value}"][node.token] += value
    assert naive, "the demo model's SAEs produced no latent rows"
    for name, expected in naive.items():
        assert sums[name] == pytest.approx(expected, abs=1e-4), name
        assert any(abs(v) > 1e-3 for v in sums[name]), f"{name} is all zero"
    # Without latents the heatmap keeps its four rows and no latent ones.
    plain = node_table(demo, PROMPT, " Mary", " John", k=1, views=True)
    assert plain.token_views is not None
    assert set(plain.token_views.effect_by_token) == {
        "embedding",
        "mlp",
        "attention_from",
        "attention_to",
    }


def test_second_prompt_gets_its_own_target_and_distractor(demo: LoadedModel) -> None:
    table = node_table(
        demo,
        PROMPT,
        " Mary",
        " John",
        k=2,
        compare_prompt=SECOND,
        compare_target=" Tom",
        compare_distractor=" Anna",
    )
    alone = node_table(demo, SECOND, " Tom", " Anna", k=2)
    assert table.right_value == pytest.approx(alone.direction_value, abs=1e-4)
    assert table.right_value is not None and table.right_value > 0  # the model says " Tom"
    doc = table.direction_json()
    assert doc["right_target_texts"] == [" Tom"] and doc["right_distractor_texts"] == [" Anna"]
    # The right columns explain the right prompt's own direction.
    right_nodes = {n: j for j, n in enumerate(alone.nodes)}
    shared_rows = [(i, right_nodes[n]) for i, n in enumerate(table.nodes) if n in right_nodes]
    assert shared_rows
    for i, j in shared_rows:
        assert table.columns["direct_effect_right"][i] == pytest.approx(
            alone.values[Group.DIRECT_EFFECT][j], abs=1e-4
        )
    # Shared answers (the old behaviour) when none is given.
    shared = node_table(demo, PROMPT, " Mary", " John", k=2, compare_prompt=SECOND)
    assert "right_target_texts" not in shared.direction_json()


def test_compare_answers_need_a_comparison(demo: LoadedModel) -> None:
    with pytest.raises(TdbError, match="need --compare-prompt"):
        node_table(demo, PROMPT, " Mary", " John", compare_target=" Tom")


def test_api_takes_compare_target_with_second_prompt(demo: LoadedModel) -> None:
    with TestClient(create_app(demo), base_url="http://localhost") as client:
        check_compare_target(client)


def check_compare_target(client: TestClient) -> None:
    body = {
        "prompt": PROMPT,
        "target": " Mary",
        "distractor": " John",
        "second_prompt": SECOND,
        "compare_target": " Tom",
        "compare_distractor": " Anna",
        "k": 2,
    }
    response = client.post("/api/nodes", json=body)
    assert response.status_code == 200, response.text
    direction = response.json()["direction"]
    assert direction["right_target_texts"] == [" Tom"]
    alone = client.post(
        "/api/views", json={"prompt": SECOND, "target": " Tom", "distractor": " Anna"}
    ).json()
    assert direction["right_value"] == pytest.approx(alone["direction"]["value"], abs=1e-4)
    assert alone["logits"]["loss"] > 0
    assert [p["role"] for p in alone["logits"]["pinned"]] == ["target", "distractor"]


def test_cli_takes_compare_target(demo: LoadedModel, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["nodes", PROMPT, "--target", " Mary", "--distractor", " John", "-k", "2", "--json"]
    own = ["--compare-prompt", SECOND, "--compare-target", " Tom", "--compare-distractor", " Anna"]
    assert main([*args, *own]) == 0
    direction = json.loads(capsys.readouterr().out)["direction"]
    alone = node_table(demo, SECOND, " Tom", " Anna", k=1)
    assert direction["right_value"] == pytest.approx(alone.direction_value, abs=1e-4)
    assert direction["right_target_texts"] == [" Tom"]
    assert main([*args, "--compare-target", " Tom"]) == 2  # without --compare-prompt
    assert "need --compare-prompt" in capsys.readouterr().err
