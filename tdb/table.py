"""The node table: the Python API that turns a prompt and a direction into ranked nodes.

loaded = load_model()                       # the demo model
table = node_table(loaded, "When Mary and John went to the store, John gave a drink to",
                   target=" Mary", distractor=" John", k=10)
table.to_json(); table.to_dataframe()
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tdb.capture import capture
from tdb.checkpoint import LoadedModel
from tdb.direction import Direction, LogitDiff
from tdb.errors import TdbError
from tdb.metrics import ALL_GROUPS, Group
from tdb.nodes import NodeIndex, NodeType
from tdb.tokens import Tokenizer
from tdb.topk import multi_group_topk

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class NodeTable:
    """Ranked nodes with every metric's value; one row per node, one column per group."""

    tokens: list[int]
    token_texts: list[str]
    direction: Direction
    direction_value: float
    target_texts: list[str]
    distractor_texts: list[str]
    k: int
    groups: list[Group]
    nodes: list[NodeIndex]
    values: dict[Group, list[float]]

    def node_name(self, node: NodeIndex) -> str:
        """A name a person reads: `L2 head 3 ' to'@7 <- ' Mary'@4`."""

        def tok(i: int) -> str:
            return f"{self.token_texts[i]!r}@{i}"

        if node.node_type is NodeType.EMBEDDING:
            return f"embedding {tok(node.token)}"
        if node.node_type is NodeType.ATTENTION_HEAD:
            assert node.key_token is not None
            return f"L{node.layer} head {node.index} {tok(node.token)} <- {tok(node.key_token)}"
        if node.node_type is NodeType.MLP_NEURON:
            return f"L{node.layer} neuron {node.index} {tok(node.token)}"
        return f"L{node.layer} latent {node.index} {tok(node.token)}"

    def rows(self) -> list[dict[str, object]]:
        rows: list[dict[str, object]] = []
        for i, node in enumerate(self.nodes):
            row: dict[str, object] = {
                "id": node.id,
                "node_type": node.node_type.value,
                "layer": node.layer,
                "token": node.token,
            }
            if node.node_type is NodeType.ATTENTION_HEAD:
                row["key_token"] = node.key_token
            row["index"] = node.index
            row["name"] = self.node_name(node)
            row |= {g.value: self.values[g][i] for g in self.groups}
            rows.append(row)
        return rows

    def to_json(self) -> dict[str, object]:
        """The schema other tools rely on (see docs/node-table.md)."""
        return {
            "tokens": [
                {"id": t, "text": text}
                for t, text in zip(self.tokens, self.token_texts, strict=True)
            ],
            "direction": self.direction.to_json()
            | {
                "value": self.direction_value,
                "target_texts": self.target_texts,
                "distractor_texts": self.distractor_texts,
            },
            "k": self.k,
            "groups": [g.value for g in self.groups],
            "nodes": self.rows(),
        }

    def to_dataframe(self) -> pd.DataFrame:
        """One row per node: id, node_type, layer, token, key_token, index, name, metrics."""
        import pandas as pd  # imported here: the CLI's JSON path never pays for pandas

        columns = ["id", "node_type", "layer", "token", "key_token", "index", "name"]
        return pd.DataFrame(self.rows(), columns=columns + [g.value for g in self.groups])


def resolve_tokens(tokenizer: Tokenizer, prompt: str | Sequence[int], n_ctx: int) -> list[int]:
    if isinstance(prompt, str):
        if not prompt:
            raise TdbError("the prompt is empty: give some text (or token ids)")
        tokens = tokenizer.encode(prompt)
    else:
        tokens = [tokenizer.check_id(int(t), "token id") for t in prompt]
    if not tokens:
        raise TdbError("the prompt has no tokens")
    if len(tokens) > n_ctx:
        raise TdbError(f"the prompt is {len(tokens)} tokens, longer than the model's {n_ctx}")
    return tokens


def resolve_token(tokenizer: Tokenizer, token: str | int, what: str) -> int:
    if isinstance(token, str):
        return tokenizer.single_token(token, what)
    return tokenizer.check_id(token, what)


def node_table(
    loaded: LoadedModel,
    prompt: str | Sequence[int],
    target: str | int,
    distractor: str | int,
    k: int = 10,
    position: int = -1,
    groups: Sequence[Group] = ALL_GROUPS,
) -> NodeTable:
    """Explain logit(target) - logit(distractor) at `position` (default: the last token).

    >>> table = node_table(load_model(), "Paris, France. Ottawa,", " Canada", " France", k=5)
    >>> table.to_dataframe().head()
    """
    if k < 0:
        raise TdbError(f"k must be >= 0, got {k}")
    if not groups:
        raise TdbError(f"groups: give at least one of {', '.join(g.value for g in Group)}")
    model, tokenizer = loaded.model, loaded.tokenizer
    tokens = resolve_tokens(tokenizer, prompt, model.config.n_ctx)
    if not -len(tokens) <= position < len(tokens):
        raise TdbError(f"position {position} is outside the prompt's {len(tokens)} tokens")
    target_id = resolve_token(tokenizer, target, "target")
    distractor_id = resolve_token(tokenizer, distractor, "distractor")
    direction = LogitDiff((target_id,), (distractor_id,), position % len(tokens))
    cap = capture(model, torch.tensor(tokens), direction, groups, prune_k=k)
    result = multi_group_topk(cap.store, groups, k)
    return NodeTable(
        tokens=tokens,
        token_texts=[tokenizer.token_text(t) for t in tokens],
        direction=direction,
        direction_value=cap.direction_value,
        target_texts=[tokenizer.token_text(target_id)],
        distractor_texts=[tokenizer.token_text(distractor_id)],
        k=k,
        groups=list(groups),
        nodes=result.nodes,
        values={g: result.values[g].tolist() for g in groups},
    )
