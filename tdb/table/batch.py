"""Several node-table requests at once, their main captures run in batches.

    >>> tables = run_requests(loaded, [NodeRequest(p, target=" Mary", distractor=" John")
    ...                                for p in prompts])

Requests share one forward and one backward pass (`tdb.capture.capture_batch`) when nothing
but their prompts and directions differ: no ablations and no comparison (those run more
captures under their own hooks), no SAE files, the same metrics, the same top k kept per layer,
the same node types, and directions that read the residual stream at the same point (every
logit direction does). Every other request runs alone. Each result is the table `run_request`
gives for that request alone (equal up to float rounding in the last digits:
tests/test_batch_requests.py), or the TdbError it raises.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from tdb.capture import Capture, capture_batch
from tdb.checkpoint import LoadedModel
from tdb.direction import Direction
from tdb.errors import TdbError
from tdb.latents import resolve_saes
from tdb.sae import AttachedSae
from tdb.table.request import NodeRequest
from tdb.table.result import NodeTable
from tdb.table.run import main_prune_k, request_direction, run_request


@dataclass(frozen=True)
class Member:
    """A request that can share a batch: its place in the list, its prompt and direction."""

    index: int
    request: NodeRequest
    tokens: Tensor
    direction: Direction
    saes: list[AttachedSae]


def batch_key(request: NodeRequest, direction: Direction) -> Hashable | None:
    """Requests with equal keys can share a capture; None: this one runs alone."""
    if request.ablations or request.compare_prompt is not None or request.saes:
        return None
    return (
        tuple(request.groups),
        main_prune_k(request),
        direction.read_point,
        request.mlp_nodes,
        request.attn_nodes,
    )


def run_requests(
    loaded: LoadedModel, requests: Sequence[NodeRequest]
) -> list[NodeTable | TdbError]:
    """Each request's node table (or its TdbError), in order; see the module docstring."""
    results: list[NodeTable | TdbError | None] = [None] * len(requests)
    batches: dict[Hashable, list[Member]] = {}
    for index, request in enumerate(requests):
        try:
            request = request.checked()
            saes, _ = resolve_saes(loaded, (), request.mlp_nodes, request.attn_nodes)
            n_ctx = loaded.model.config.n_ctx
            tokens = loaded.tokenizer.prompt_ids(request.prompt, n_ctx, bos=request.bos)
            direction = request_direction(loaded, request, tokens, saes)
        except TdbError as e:
            results[index] = e
            continue
        key = batch_key(request, direction)
        if key is not None:
            member = Member(index, request, torch.tensor(tokens), direction, saes)
            batches.setdefault(key, []).append(member)
    for members in batches.values():
        if len(members) < 2:
            continue  # alone: below
        first = members[0]
        captures = capture_batch(
            loaded.model,
            [m.tokens for m in members],
            [m.direction for m in members],
            first.request.groups,
            main_prune_k(first.request),
            saes=first.saes,
        )
        for member, captured in zip(members, captures, strict=True):
            results[member.index] = answer(loaded, member.request, captured)
    return [
        answer(loaded, requests[i]) if result is None else result
        for i, result in enumerate(results)
    ]


def answer(
    loaded: LoadedModel, request: NodeRequest, captured: Capture | None = None
) -> NodeTable | TdbError:
    try:
        return run_request(loaded, request, captured)
    except TdbError as e:
        return e
