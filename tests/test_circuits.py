"""The debugger finds the demo model's circuits: ablating the heads the node table ranks highest
removes most of the behaviour; ablating random heads from the same layers does not."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
import torch

from tdb.ablation import Ablation, ablation_hooks
from tdb.capture import capture, direction_value
from tdb.checkpoint import LoadedModel, load_model
from tdb.demo.data import heldout_induction_sequences, heldout_ioi_prompts
from tdb.direction import LogitDiff
from tdb.hooks import NO_HOOKS
from tdb.metrics import Group
from tdb.nodes import NodeIndex, NodeType
from tdb.token_views import effect_by_head

Case = tuple[list[int], LogitDiff]


@pytest.fixture(scope="module")
def demo() -> LoadedModel:
    return load_model()


def ioi_cases(loaded: LoadedModel, n: int) -> list[Case]:
    cases = []
    for prompt in heldout_ioi_prompts(n):
        tokens = loaded.tokenizer.encode(prompt.text)
        io = loaded.tokenizer.single_token(" " + prompt.io, "io")
        s = loaded.tokenizer.single_token(" " + prompt.s, "s")
        cases.append((tokens, LogitDiff((io,), (s,), len(tokens) - 1)))
    return cases


def induction_cases(loaded: LoadedModel, n: int) -> list[Case]:
    """Repeated random sequences cut in the second half: the target is the token that followed
    the current one in the first half; the distractor is the sequence's first token."""
    rng = random.Random(0)
    cases = []
    special = frozenset({0})
    for seq in heldout_induction_sequences(n, loaded.model.config.d_vocab, special, seed=1):
        half = len(seq) // 2
        m = rng.randrange(3, half - 1)
        tokens = seq[: half + m]
        target, distractor = seq[m], seq[0]
        if target == distractor:
            continue
        cases.append((tokens, LogitDiff((target,), (distractor,), len(tokens) - 1)))
    return cases


def whole_head_ablation(
    loaded: LoadedModel, tokens: list[int], heads: Sequence[tuple[int, int]]
) -> list[Ablation]:
    """Zero each head's output at every query position."""
    return [
        Ablation(NodeIndex(NodeType.ATTENTION_HEAD, layer, q, head))
        for layer, head in heads
        for q in range(len(tokens))
    ]


def mean_value(loaded: LoadedModel, cases: list[Case], heads: Sequence[tuple[int, int]]) -> float:
    values = []
    for tokens, direction in cases:
        hooks = (
            ablation_hooks(loaded.model, tokens, whole_head_ablation(loaded, tokens, heads))
            if heads
            else NO_HOOKS
        )
        values.append(direction_value(loaded.model, torch.tensor(tokens), direction, hooks))
    return sum(values) / len(values)


def top_heads(loaded: LoadedModel, cases: list[Case], n: int) -> list[tuple[int, int]]:
    """The n heads with the largest summed act x grad over all their pairs and all prompts."""
    total = sum(
        effect_by_head(capture(loaded.model, torch.tensor(t), d, [Group.ACT_TIMES_GRAD]).store)
        for t, d in cases
    )
    assert isinstance(total, torch.Tensor)
    flat = torch.argsort(total.flatten(), descending=True)[:n]
    return [(int(i) // total.shape[1], int(i) % total.shape[1]) for i in flat]


def check_circuit(loaded: LoadedModel, cases: list[Case]) -> dict[str, float]:
    assert len(cases) >= 20
    baseline = mean_value(loaded, cases, [])
    heads = top_heads(loaded, cases, 3)
    ablated = mean_value(loaded, cases, heads)
    rng = random.Random(0)
    n_head = loaded.model.config.n_head
    random_cuts = []
    for _ in range(10):
        drawn: set[tuple[int, int]] = set()
        for layer, _head in heads:  # one random head from each top head's layer
            options = [(layer, h) for h in range(n_head) if (layer, h) not in heads]
            drawn.add(rng.choice([o for o in options if o not in drawn]))
        random_cuts.append(1 - mean_value(loaded, cases, sorted(drawn)) / baseline)
    result = {
        "baseline": baseline,
        "top3_cut": 1 - ablated / baseline,
        "random_cut": sum(random_cuts) / len(random_cuts),
    }
    print(f"heads {heads}: {result}")
    return result


def test_ioi_heads_the_table_points_at_carry_the_behaviour(demo: LoadedModel) -> None:
    result = check_circuit(demo, ioi_cases(demo, 24))
    assert result["baseline"] > 2.0
    assert result["top3_cut"] >= 0.5
    assert result["random_cut"] < 0.2


def test_induction_heads_the_table_points_at_carry_the_behaviour(demo: LoadedModel) -> None:
    result = check_circuit(demo, induction_cases(demo, 24))
    assert result["top3_cut"] >= 0.5
    assert result["random_cut"] < 0.2
