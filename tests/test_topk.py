"""The multi-group top-k against a brute-force sort, and the pruned store against the dense one."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
from checkpoints import make_checkpoint

from tdb.capture import capture
from tdb.checkpoint import load_model
from tdb.direction import LogitDiff
from tdb.errors import TdbError
from tdb.metrics import ALL_GROUPS, Group, is_signed
from tdb.nodes import NodeIndex, NodeType
from tdb.store import GridBlock, ScalarStore, chunked_topk, ranked
from tdb.topk import absolute, keep_token, multi_group_topk

SHAPES = {
    NodeType.EMBEDDING: (5,),
    NodeType.ATTENTION_HEAD: (2, 3, 5, 5),  # [layer head query_pos key_pos]
    NodeType.MLP_NEURON: (2, 5, 4),
}


def random_store(seed: int, ties: bool) -> ScalarStore:
    """Random values; with `ties`, small integers so many values are equal."""
    gen = torch.Generator().manual_seed(seed)
    blocks = {}
    for node_type, shape in SHAPES.items():
        values = {}
        for group in ALL_GROUPS:
            if ties:
                v = torch.randint(-3, 4, shape, generator=gen).float()
            else:
                v = torch.randn(shape, generator=gen)
            if node_type is NodeType.ATTENTION_HEAD:  # key after query: not a node
                future = torch.ones(5, 5, dtype=torch.bool).triu(1)[None, None]
                v = v.masked_fill(future.expand(shape), math.nan)
            values[group] = v.flatten()
        blocks[node_type] = GridBlock(node_type, shape, values)
    return ScalarStore(blocks)


def every_node(store: ScalarStore) -> list[tuple[NodeIndex, dict[Group, float]]]:
    """All nodes with their values, in grid order (the tie-break), by plain iteration."""
    out = []
    for node_type, block in store.blocks.items():
        for flat in range(len(block.values[Group.ACTIVATION])):
            values = {g: float(block.values[g][flat]) for g in ALL_GROUPS}
            if math.isnan(values[Group.ACTIVATION]):
                continue
            node = NodeIndex.from_coords(node_type, block.coords(torch.tensor([flat]))[0])
            out.append((node, values))
    return out


def brute_force(store: ScalarStore, groups: list[Group], k: int) -> list[NodeIndex]:
    nodes = every_node(store)
    union: list[NodeIndex] = []
    for group in groups:
        for node_type in store.blocks:
            of_type = [(i, n, v) for i, (n, v) in enumerate(nodes) if n.node_type is node_type]
            top = sorted(of_type, key=lambda inv: (-inv[2][group], inv[0]))[:k]
            ranked_nodes = [n for _, n, _ in top]
            if is_signed(group):
                bottom = sorted(of_type, key=lambda inv: (inv[2][group], inv[0]))[:k]
                ranked_nodes += [n for _, n, _ in bottom]
            for n in ranked_nodes:
                if n not in union:
                    union.append(n)
    return union


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("k", [0, 1, 3, 7, 1000])
def test_multi_group_topk_equals_brute_force(seed: int, ties: bool, k: int) -> None:
    store = random_store(seed, ties)
    groups = random.Random(seed).sample(list(ALL_GROUPS), k=2 + seed % 3)
    result = multi_group_topk(store, groups, k)
    assert result.nodes == brute_force(store, groups, k)
    lookup = {n: v for n, v in every_node(store)}
    for group in groups:
        expected = [lookup[n][group] for n in result.nodes]
        assert result.values[group].tolist() == pytest.approx(expected)


def test_k_zero_gives_an_empty_table_and_negative_k_an_error() -> None:
    store = random_store(0, ties=False)
    assert multi_group_topk(store, list(ALL_GROUPS), 0).nodes == []
    with pytest.raises(TdbError, match="k must be >= 0"):
        multi_group_topk(store, list(ALL_GROUPS), -1)


def test_k_larger_than_candidates_takes_all_of_them() -> None:
    store = random_store(1, ties=True)
    result = multi_group_topk(store, [Group.ACTIVATION], 10_000)
    assert len(result.nodes) == 5 + 2 * 15 * 3 + 2 * 5 * 4  # every node once, no non-nodes


def test_unsigned_groups_take_no_bottom_k() -> None:
    store = random_store(2, ties=False)
    result = multi_group_topk(store, [Group.WRITE_NORM], 2)
    assert len(result.nodes) == 3 * 2
    signed = multi_group_topk(store, [Group.DIRECT_EFFECT], 2)
    assert len(signed.nodes) == 3 * 4


def test_transform_and_index_map() -> None:
    store = random_store(3, ties=False)
    result = multi_group_topk(store, [Group.WRITE_NORM], 3, transform=keep_token(2))
    assert result.nodes and all(n.token == 2 for n in result.nodes)
    brute = [
        n
        for n, v in sorted(
            ((n, v) for n, v in every_node(store) if n.node_type is NodeType.MLP_NEURON),
            key=lambda nv: -abs(nv[1][Group.DIRECT_EFFECT]),
        )
    ][:3]
    by_magnitude = multi_group_topk(store, [Group.DIRECT_EFFECT], 3, transform=absolute)
    assert [n for n in by_magnitude.nodes if n.node_type is NodeType.MLP_NEURON][:3] == brute

    def to_token_zero(node: NodeIndex) -> NodeIndex:
        return NodeIndex(
            node.node_type, node.layer, 0, node.index, 0 if node.key_token is not None else None
        )

    mapped = multi_group_topk(store, [Group.ACTIVATION], 4, index_map=to_token_zero)
    assert all(n.token == 0 for n in mapped.nodes)
    assert len(mapped.nodes) == len(set(mapped.nodes))  # duplicates after mapping are dropped


def test_ranked_breaks_ties_by_smaller_index_and_skips_nan() -> None:
    values = torch.tensor([1.0, 3.0, math.nan, 3.0, -2.0, -2.0])
    assert ranked(values, 2).tolist() == [1, 3]
    assert ranked(values, 3, largest=False).tolist() == [4, 5, 0]
    assert ranked(values, 10).tolist() == [1, 3, 0, 4, 5]


@pytest.mark.parametrize("k", [1, 4, 20])
def test_pruned_capture_gives_the_same_table_as_the_dense_one(tmp_path: Path, k: int) -> None:
    make_checkpoint(tmp_path, with_tokenizer=False, n_layer=3, n_embd=32, n_head=4)
    model = load_model(tmp_path).model
    tokens = torch.randint(0, 400, (30,), generator=torch.Generator().manual_seed(k))
    direction = LogitDiff((1,), (2,), 29)
    dense = capture(model, tokens, direction, ALL_GROUPS)
    pruned = capture(model, tokens, direction, ALL_GROUPS, prune_k=k)
    a = multi_group_topk(dense.store, list(ALL_GROUPS), k)
    b = multi_group_topk(pruned.store, list(ALL_GROUPS), k)
    assert a.nodes == b.nodes
    for group in ALL_GROUPS:
        torch.testing.assert_close(a.values[group], b.values[group])
    with pytest.raises(TdbError, match="larger than the k"):
        multi_group_topk(pruned.store, list(ALL_GROUPS), k + 1)


@pytest.mark.parametrize("n", [10, 512 * 3, 512 * 40 + 17, (1 << 15) * 3 + 17])
@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("ties", [False, True])
def test_chunked_topk_equals_a_sort(n: int, largest: bool, ties: bool) -> None:
    gen = torch.Generator().manual_seed(n)
    values = (
        torch.randint(-3, 4, (n,), generator=gen).float() if ties else torch.randn(n, generator=gen)
    )
    top_values, top_indices = chunked_topk(values, 7, largest)
    expected = sorted(values.tolist(), reverse=largest)[:7]
    assert top_values.tolist() == expected
    assert values[top_indices].tolist() == expected
    assert len(set(top_indices.tolist())) == 7


@pytest.mark.parametrize("largest", [True, False])
def test_chunked_topk_ranks_nan_first(largest: bool) -> None:
    """NaN ranks first either way, so that `ranked` sees it and takes its exact path."""
    values = torch.randn(512 * 20, generator=torch.Generator().manual_seed(1))
    values[[5, 4000, 9000]] = math.nan
    top_values, top_indices = chunked_topk(values, 5, largest)
    assert sorted(top_indices[:3].tolist()) == [5, 4000, 9000]
    finite = values.nan_to_num(-math.inf if largest else math.inf)
    expected = sorted(finite.tolist(), reverse=largest)[:2]
    assert top_values[3:].tolist() == expected


def test_ranked_on_long_tensors_with_ties_and_masks() -> None:
    gen = torch.Generator().manual_seed(0)
    values = torch.randint(-5, 6, (100_000,), generator=gen).float()
    valid = torch.rand(100_000, generator=gen) > 0.3
    for largest in (True, False):
        got = ranked(values, 25, largest, valid).tolist()
        candidates = [i for i in range(len(values)) if valid[i]]
        sign = -1 if largest else 1
        expected = sorted(candidates, key=lambda i: (sign * float(values[i]), i))[:25]
        assert got == expected
