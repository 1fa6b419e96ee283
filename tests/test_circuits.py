"""The debugger finds the demo model's circuits.

For each prompt, the node table's top 3 attention-head nodes by estimated total effect (act x grad;
a head node is one head at one (query, key) pair) are zero-ablated together; that removes at least
half of the mean logit difference. The control zero-ablates, at the same (query, key) pairs, a
random other head of the same layer (10 draws): that removes less than a fifth.
"""

from __future__ import annotations

import random

import pytest
import torch

from tdb.ablation import Ablation, ablation_hooks
from tdb.capture import direction_value
from tdb.checkpoint import LoadedModel
from tdb.demo.data import heldout_induction_sequences, heldout_ioi_prompts
from tdb.direction import LogitDiff
from tdb.metrics import Group
from tdb.nodes import NodeIndex, NodeType
from tdb.table import node_table

pytestmark = pytest.mark.slow  # ablations over hundreds of held-out prompts on the demo model

Case = tuple[list[int], int, int]  # tokens, target, distractor (at the last token)


def ioi_cases(loaded: LoadedModel, n: int) -> list[Case]:
    tok = loaded.tokenizer
    return [
        (tok.encode(p.text), tok.single_token(" " + p.io, "io"), tok.single_token(" " + p.s, "s"))
        for p in heldout_ioi_prompts(n)
    ]


def induction_cases(loaded: LoadedModel, n: int) -> list[Case]:
    """Repeated random sequences cut in the second half: the target is the token that followed
    the current one in the first half; the distractor is the sequence's first token."""
    rng = random.Random(0)
    cases = []
    for seq in heldout_induction_sequences(n, loaded.model.config.d_vocab, frozenset({0}), seed=1):
        half = len(seq) // 2
        m = rng.randrange(3, half - 1)
        if seq[m] != seq[0]:
            cases.append((seq[: half + m], seq[m], seq[0]))
    return cases


def ablated_value(loaded: LoadedModel, case: Case, nodes: list[NodeIndex]) -> float:
    tokens, target, distractor = case
    direction = LogitDiff((target,), (distractor,), len(tokens) - 1)
    hooks = ablation_hooks(loaded.model, tokens, [Ablation(n) for n in nodes])
    return direction_value(loaded.model, torch.tensor(tokens), direction, hooks)


def check_circuit(loaded: LoadedModel, cases: list[Case]) -> dict[str, float]:
    assert len(cases) >= 20
    rng = random.Random(0)
    n_head = loaded.model.config.n_head
    baseline, top, control = [], [], [[] for _ in range(10)]
    for case in cases:
        tokens, target, distractor = case
        table = node_table(loaded, tokens, target, distractor, k=3, groups=[Group.ACT_TIMES_GRAD])
        heads = [n for n in table.nodes if n.node_type is NodeType.ATTENTION_HEAD][:3]
        baseline.append(table.direction_value)
        top.append(ablated_value(loaded, case, heads))
        for draw in control:
            others = [
                NodeIndex(n.node_type, n.layer, n.token,
                          rng.choice([h for h in range(n_head) if h != n.index]), n.key_token)
                for n in heads
            ]  # fmt: skip
            draw.append(ablated_value(loaded, case, others))
    mean = sum(baseline) / len(baseline)
    result = {
        "baseline": mean,
        "top3_cut": 1 - sum(top) / len(top) / mean,
        "random_cut": sum(1 - sum(d) / len(d) / mean for d in control) / len(control),
    }
    print(result)
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
