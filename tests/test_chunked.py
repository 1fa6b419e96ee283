"""Attention metrics in query chunks (tdb.attention_chunks) give exactly the unchunked results.

- function level: each head metric of a chunk equals the same rows of the whole layer's grid
  (today's unchunked call), bit for bit;
- layer level: the pruned and dense results of one layer equal `LayeredBlockBuilder.add` on the
  whole grids, and the pruned node set equals a brute-force sort, with many ties;
- capture level: a GPT-2 and a grouped-query Llama, several chunk sizes (1, sizes that do not
  divide the prompt, larger than it), dense and pruned, against the default chunking and the
  naive reference model (tests/reference.py).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from checkpoints import make_checkpoint
from node_values import all_nodes, reference_values
from reference import naive_run

from tdb.attention_chunks import (
    chunk_rows,
    head_layer_dense,
    head_layer_pruned,
    query_chunk,
    query_ranges,
    with_key_terms,
)
from tdb.capture import LayeredBlockBuilder, capture
from tdb.checkpoint import load_model
from tdb.direction import LogitDiff
from tdb.metrics import ALL_GROUPS, AttentionInputs, ReadOut, is_signed, metric_function
from tdb.models.layers import RopeConfig
from tdb.models.llama import Llama, LlamaConfig
from tdb.nodes import NodeIndex, NodeType
from tdb.store import GridBlock, ListBlock, ScalarStore

HEAD = NodeType.ATTENTION_HEAD
CHUNKS = [1, 2, 3, 4, 7, 100]


def random_layer(
    n_head: int, n_pos: int, positions: tuple[int, ...], ties: bool
) -> AttentionInputs:
    """One layer's inputs: causal probabilities (0 where key > query), their gradients, values.
    With `ties`, values come from a few levels, so most metrics are full of exact ties."""
    gen = torch.Generator().manual_seed(n_pos * 31 + n_head)
    scores = torch.randn(n_head, n_pos, n_pos, generator=gen)
    if ties:
        scores = scores.round()
    causal = torch.ones(n_pos, n_pos, dtype=torch.bool).tril()
    probs = scores.masked_fill(~causal, -math.inf).softmax(dim=-1)
    grad = torch.randn(n_head, n_pos, n_pos, generator=gen)
    if ties:
        grad = grad.round() * (torch.rand(n_head, n_pos, n_pos, generator=gen) < 0.3)
    v = torch.randn(n_pos, n_head, 4, generator=gen)
    W_O = torch.randn(n_head, 4, 6, generator=gen)
    read = ReadOut(positions, torch.randn(len(positions), 6, generator=gen))
    return AttentionInputs(probs, grad, v, W_O, read)


@pytest.mark.parametrize("positions", [(10,), (4, 9)])
def test_every_chunk_equals_the_same_rows_of_the_whole_layer(positions: tuple[int, ...]) -> None:
    x = random_layer(3, 11, positions, ties=False)
    whole = {g: metric_function(HEAD, g)(x) for g in ALL_GROUPS}  # today's unchunked call
    prepared = with_key_terms(x)
    for rows in CHUNKS:
        for start, stop in query_ranges(10, rows):
            chunk = query_chunk(prepared, start, stop)
            for g in ALL_GROUPS:
                got = metric_function(HEAD, g)(chunk)
                assert torch.equal(got, whole[g][:, start:stop, :stop]), (g, rows, start)


def brute_force_kept(values: dict, k: int, valid: torch.Tensor) -> list[int]:
    """Each metric's k best valid entries (ties: smaller index first) by sorting in Python."""
    kept: set[int] = set()
    for g, v in values.items():
        entries = [(float(v[i]), i) for i in range(len(v)) if valid[i]]
        kept |= {i for _, i in sorted(entries, key=lambda e: (-e[0], e[1]))[:k]}
        if is_signed(g):
            kept |= {i for _, i in sorted(entries, key=lambda e: (e[0], e[1]))[:k]}
    return sorted(kept)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("last_token", [12, 6])
def test_one_layer_pruned_and_dense_equal_the_whole_grid(ties: bool, last_token: int) -> None:
    n_head, n_pos = 3, 13
    x = random_layer(n_head, n_pos, (last_token,), ties)
    whole = {g: metric_function(HEAD, g)(x) for g in ALL_GROUPS}
    for k in (1, 3, 20, 10_000):
        today = LayeredBlockBuilder(HEAD, ALL_GROUPS, k, last_token)
        today.add(0, whole)
        nodes = today.nodes
        assert nodes is not None
        flat = {g: v.flatten() for g, v in whole.items()}
        assert today.kept[0].tolist() == brute_force_kept(flat, k, nodes)
        for rows in CHUNKS:
            kept, values = head_layer_pruned(x, ALL_GROUPS, last_token, rows, k)
            assert torch.equal(kept, today.kept[0]), (k, rows)
            for g in ALL_GROUPS:
                assert torch.equal(values[g], today.layers[0][g]), (g, k, rows)
    dense_today = LayeredBlockBuilder(HEAD, ALL_GROUPS, None, last_token)
    dense_today.add(0, whole)
    for rows in CHUNKS:
        dense = head_layer_dense(x, ALL_GROUPS, last_token, rows)
        for g in ALL_GROUPS:
            assert torch.equal(dense[g].isnan(), dense_today.layers[0][g].isnan())
            assert torch.equal(dense[g].nan_to_num(), dense_today.layers[0][g].nan_to_num())


def assert_same_store(a: ScalarStore, b: ScalarStore) -> None:
    assert a.blocks.keys() == b.blocks.keys()
    for node_type, block in a.blocks.items():
        other = b.blocks[node_type]
        assert type(block) is type(other)
        if isinstance(block, ListBlock):
            assert isinstance(other, ListBlock)
            assert torch.equal(block.node_coords, other.node_coords), node_type
        else:
            assert isinstance(other, GridBlock)
            assert block.shape == other.shape
        for g, values in block.values.items():
            assert torch.equal(values.isnan(), other.values[g].isnan()), (node_type, g)
            assert torch.equal(values.nan_to_num(), other.values[g].nan_to_num()), (node_type, g)


TOKENS = [5, 17, 99, 250, 3, 17, 42, 8, 77, 5, 3]


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    directory = tmp_path_factory.mktemp("chunked")
    return make_checkpoint(directory, with_tokenizer=False), directory


@pytest.mark.parametrize("position", [10, 6])
def test_chunked_capture_matches_the_naive_reference(
    gpt2: tuple[object, Path], position: int
) -> None:
    hf_model, directory = gpt2
    model = load_model(directory).model
    direction = LogitDiff((11,), (12,), position)
    tokens = torch.tensor(TOKENS)
    ref = naive_run(hf_model, TOKENS, position, 11, 12)
    default = capture(model, tokens, direction, ALL_GROUPS)
    nodes = [n for n in all_nodes(default.store) if n.node_type is HEAD]
    expected = {
        g: torch.tensor([reference_values(ref, n, position)[g] for n in nodes]) for g in ALL_GROUPS
    }
    for g in ALL_GROUPS:
        torch.testing.assert_close(
            default.store.values_at(g, nodes), expected[g], atol=2e-5, rtol=1e-4
        )
    default_pruned = capture(model, tokens, direction, ALL_GROUPS, prune_k=5)
    for rows in CHUNKS:
        dense = capture(model, tokens, direction, ALL_GROUPS, query_chunk=rows)
        assert_same_store(dense.store, default.store)
        pruned = capture(model, tokens, direction, ALL_GROUPS, prune_k=5, query_chunk=rows)
        assert_same_store(pruned.store, default_pruned.store)
    kept = pruned.store.block(HEAD)
    assert isinstance(kept, ListBlock)
    kept_nodes = [NodeIndex.from_coords(HEAD, row) for row in kept.node_coords]
    for g in ALL_GROUPS:
        want = torch.tensor([reference_values(ref, n, position)[g] for n in kept_nodes])
        torch.testing.assert_close(kept.values[g], want, atol=2e-5, rtol=1e-4)


def test_grouped_query_llama_in_chunks() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        d_vocab=50,
        n_ctx=32,
        d_model=16,
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        d_head=4,
        d_mlp=24,
        rope=RopeConfig(theta=10000.0, rotary_dim=4),
    )
    model = Llama(config)
    tokens = torch.randint(0, 50, (13,), generator=torch.Generator().manual_seed(1))
    direction = LogitDiff((3,), (4,), 12)
    dense = capture(model, tokens, direction, ALL_GROUPS, query_chunk=13)
    pruned = capture(model, tokens, direction, ALL_GROUPS, prune_k=4, query_chunk=13)
    for rows in (1, 5, 6):
        assert_same_store(
            capture(model, tokens, direction, ALL_GROUPS, query_chunk=rows).store, dense.store
        )
        again = capture(model, tokens, direction, ALL_GROUPS, prune_k=4, query_chunk=rows)
        assert_same_store(again.store, pruned.store)


def test_chunk_size_fits_the_memory_budget() -> None:
    assert chunk_rows(16, 4096) == 128  # 8 float32 grids of [16 128 4096]: 256 MiB
    assert chunk_rows(16, 4096, budget=8 * 4 * 16 * 4096 * 3) == 3
    assert chunk_rows(64, 1 << 20) == 1  # never below one row
    assert query_ranges(9, 4) == [(0, 4), (4, 8), (8, 10)]


def cast(x: AttentionInputs, dtype: torch.dtype) -> AttentionInputs:
    grad, v = x.grad_probs, x.v
    assert grad is not None and v is not None
    return AttentionInputs(x.probs.to(dtype), grad.to(dtype), v.to(dtype), x.W_O.to(dtype), x.read)


def test_half_precision_inputs_are_ranked_in_float32() -> None:
    """A bfloat16 model's chunks are computed in float32: the same as upcasting first."""
    half = cast(random_layer(3, 13, (12,), ties=False), torch.bfloat16)
    upcast = cast(half, torch.float32)
    want_kept, want = head_layer_pruned(upcast, ALL_GROUPS, 12, 13, 3)
    for rows in (1, 5):
        kept, values = head_layer_pruned(half, ALL_GROUPS, 12, rows, 3)
        assert torch.equal(kept, want_kept)
        for g in ALL_GROUPS:
            assert values[g].dtype == torch.float32
            assert torch.equal(values[g], want[g])
