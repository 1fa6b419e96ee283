"""Node types, node indices, and the short ids every command accepts wherever a node is expected.

n1.234@5     MLP neuron 234 of layer 1 at token 5
h2.3@7:4     attention head 3 of layer 2, query token 7, key token 4
h2.3@7       the same head at query token 7, all keys (where a node is ablated)
e@5          the embedding at token 5 (token + position embedding)
am1.42@5     latent 42 of the sparse autoencoder on layer 1's MLP output, at token 5
             (`aa`: on the attention output, `ap`: on the MLP post-activation; see LatentSite)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from tdb.errors import TdbError


class NodeType(StrEnum):
    EMBEDDING = "embedding"
    ATTENTION_HEAD = "attention_head"
    MLP_NEURON = "mlp_neuron"
    AUTOENCODER_LATENT = "autoencoder_latent"


class LatentSite(StrEnum):
    """Which activation a sparse autoencoder reads (and reconstructs), in forward-pass order."""

    ATTN_OUT = "attn_out"  # what attention writes [pos d_model]
    MLP_POST = "mlp_post"  # the MLP's hidden activations [pos d_mlp]
    MLP_OUT = "mlp_out"  # what the MLP writes [pos d_model]

    @property
    def code(self) -> str:
        """The letter after `a` in a latent's id: `aa1.2@3`, `ap1.2@3`, `am1.2@3`."""
        return {"attn_out": "a", "mlp_post": "p", "mlp_out": "m"}[self.value]

    @property
    def reads_mlp(self) -> bool:
        return self is not LatentSite.ATTN_OUT


SITES = tuple(LatentSite)


@runtime_checkable  # so the tests' runtime type checker (beartype) can check isinstance
class ModelShape(Protocol):
    @property
    def n_layer(self) -> int: ...
    @property
    def n_head(self) -> int: ...
    @property
    def d_mlp(self) -> int: ...


# A node index as one row of a LongTensor, so blocks of nodes are tensors, not lists of objects.
# SITE holds a latent's `LatentSite` as its position in SITES.
LAYER, TOKEN, KEY_TOKEN, INDEX, SITE = range(5)
NO_COORD = -1
NODE_TEMPLATE = (NO_COORD, NO_COORD, NO_COORD, 0, NO_COORD)  # coordinates a node type lacks


@dataclass(frozen=True, order=True)
class NodeIndex:
    """Which node: `NodeIndex(NodeType.ATTENTION_HEAD, layer=2, token=7, index=3, key_token=4)`;
    a latent also names the activation its autoencoder reads:
    `NodeIndex(NodeType.AUTOENCODER_LATENT, 1, 5, 42, site=LatentSite.MLP_OUT)`."""

    node_type: NodeType
    layer: int | None
    token: int
    index: int
    key_token: int | None = None
    site: LatentSite | None = None

    @property
    def id(self) -> str:
        if self.node_type is NodeType.EMBEDDING:
            return f"e@{self.token}"
        if self.node_type is NodeType.ATTENTION_HEAD:
            keys = "" if self.key_token is None else f":{self.key_token}"
            return f"h{self.layer}.{self.index}@{self.token}{keys}"
        if self.node_type is NodeType.MLP_NEURON:
            return f"n{self.layer}.{self.index}@{self.token}"
        assert self.site is not None
        return f"a{self.site.code}{self.layer}.{self.index}@{self.token}"

    def coords(self) -> tuple[int, int, int, int, int]:
        return (
            NO_COORD if self.layer is None else self.layer,
            self.token,
            NO_COORD if self.key_token is None else self.key_token,
            self.index,
            NO_COORD if self.site is None else SITES.index(self.site),
        )

    @staticmethod
    def from_coords(node_type: NodeType, row: Tensor | tuple[int, ...]) -> NodeIndex:
        layer, token, key_token, index, site = (int(v) for v in row)
        return NodeIndex(
            node_type,
            None if layer == NO_COORD else layer,
            token,
            index,
            None if key_token == NO_COORD else key_token,
            None if site == NO_COORD else SITES[site],
        )


def check_node(
    node: NodeIndex,
    config: ModelShape,
    n_pos: int,
    what: str,
    latent_sizes: Mapping[tuple[LatentSite, int], int] | None = None,
) -> NodeIndex:
    """The node, if it exists in this model on a prompt of `n_pos` tokens; else a TdbError.
    `latent_sizes`: d_sae of each attached autoencoder by (site, layer)."""
    problems = []
    if not 0 <= node.token < n_pos:
        problems.append(f"token {node.token} is outside the prompt (0..{n_pos - 1})")
    if node.node_type is not NodeType.EMBEDDING and not 0 <= (node.layer or 0) < config.n_layer:
        problems.append(f"layer {node.layer} is outside 0..{config.n_layer - 1}")
    if node.node_type is NodeType.MLP_NEURON and not 0 <= node.index < config.d_mlp:
        problems.append(f"neuron {node.index} is outside 0..{config.d_mlp - 1}")
    if node.node_type is NodeType.ATTENTION_HEAD:
        if not 0 <= node.index < config.n_head:
            problems.append(f"head {node.index} is outside 0..{config.n_head - 1}")
        if node.key_token is not None and not 0 <= node.key_token <= node.token:
            problems.append(f"key token {node.key_token} must be in 0..{node.token} (the query)")
    if node.node_type is NodeType.AUTOENCODER_LATENT and not problems:
        assert node.site is not None and node.layer is not None
        size = (latent_sizes or {}).get((node.site, node.layer))
        if size is None:
            problems.append(
                f"no sparse autoencoder is attached at layer {node.layer}'s {node.site.value} "
                "(attach one with --sae, or --mlp-nodes/--attn-nodes latents on the demo model)"
            )
        elif not 0 <= node.index < size:
            problems.append(f"latent {node.index} is outside 0..{size - 1}")
    if problems:
        raise TdbError(f"{what} {node.id}: " + "; ".join(problems))
    return node


def coords_tensor(nodes: list[NodeIndex]) -> Tensor:
    """[n, 5] long tensor of (layer, token, key_token, index, site)."""
    return torch.tensor([n.coords() for n in nodes], dtype=torch.long).reshape(-1, 5)


_ID_PATTERNS = {
    NodeType.EMBEDDING: re.compile(r"e@(\d+)"),
    NodeType.ATTENTION_HEAD: re.compile(r"h(\d+)\.(\d+)@(\d+)(?::(\d+))?"),
    NodeType.MLP_NEURON: re.compile(r"n(\d+)\.(\d+)@(\d+)"),
    NodeType.AUTOENCODER_LATENT: re.compile(r"a([apm])(\d+)\.(\d+)@(\d+)"),
}


def parse_node_id(text: str) -> NodeIndex:
    """The node of a short id: `parse_node_id("h2.3@7:4")`."""
    for node_type, pattern in _ID_PATTERNS.items():
        match = pattern.fullmatch(text.strip())
        if match is None:
            continue
        nums = [int(g) for g in match.groups() if g is not None and g.isdigit()]
        if node_type is NodeType.AUTOENCODER_LATENT:
            site = next(s for s in SITES if s.code == match.group(1))
            nums = [int(g) for g in match.groups()[1:]]
            return NodeIndex(node_type, nums[0], nums[2], nums[1], site=site)
        if node_type is NodeType.EMBEDDING:
            return NodeIndex(node_type, None, nums[0], 0)
        if node_type is NodeType.ATTENTION_HEAD:
            key = nums[3] if len(nums) == 4 else None
            return NodeIndex(node_type, nums[0], nums[2], nums[1], key_token=key)
        return NodeIndex(node_type, nums[0], nums[2], nums[1])
    raise TdbError(
        f"node id {text!r} is not one of: n<layer>.<neuron>@<token>, "
        "h<layer>.<head>@<query>:<key> (or h<layer>.<head>@<query> for all keys), e@<token>, "
        "a<a|p|m><layer>.<latent>@<token> (autoencoder latent on the attention output, the MLP "
        "post-activation or the MLP output)"
    )
