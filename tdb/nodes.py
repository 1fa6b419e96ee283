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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from tdb.errors import TdbError
from tdb.hooks import HookPoint


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

    @property
    def point(self) -> HookPoint:
        """The hook point the SAE reads (and reconstructs)."""
        return {"attn_out": HookPoint.ATTN_OUT, "mlp_post": HookPoint.MLP_POST}.get(
            self.value, HookPoint.MLP_OUT
        )

    @property
    def latent_point(self) -> HookPoint:
        """The hook point of the SAE's latents [batch pos d_sae] (tdb.latents calls it)."""
        return {
            "attn_out": HookPoint.ATTN_OUT_LATENTS,
            "mlp_post": HookPoint.MLP_POST_LATENTS,
        }.get(self.value, HookPoint.MLP_OUT_LATENTS)


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
        return NODE_SPECS[self.node_type].format_id(self)

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


@dataclass(frozen=True)
class NodeSpec:
    """Everything that is particular to one node type, in one place: its id grammar, its grid
    (how the store lays out one layer's values), how a person reads it, where its activation
    lives in the forward pass (which is where an ablation replaces it) and whether it is a
    component with a page of dataset examples. Metrics are per (node type, metric) in
    `tdb.metrics.METRIC_SPECS`; write vectors per node type in `tdb.token_views.WRITE_VECTORS`."""

    node_type: NodeType
    grammar: str  # the id grammar, as error messages show it
    pattern: re.Pattern[str]  # the id grammar, as a regex
    from_match: Callable[[re.Match[str]], NodeIndex]
    format_id: Callable[[NodeIndex], str]
    grid_axes: tuple[int, ...]  # which node coordinate each axis of one layer's grid holds
    label: Callable[[NodeIndex, Callable[[int], str]], str]  # (node, token name) -> text
    has_component: bool  # a component (neuron, head, latent) with a page of dataset examples
    # Where the node's activation lives: (hook point, layer), and its entry in that tensor
    # (batch first) at a token, or at every token (`slice(None)`). Ablations replace it there.
    location: Callable[[NodeIndex], tuple[HookPoint, int | None]]
    entry: Callable[[NodeIndex, int | slice], tuple[int | slice, ...]]


def _embedding_id(node: NodeIndex) -> str:
    return f"e@{node.token}"


def _head_id(node: NodeIndex) -> str:
    keys = "" if node.key_token is None else f":{node.key_token}"
    return f"h{node.layer}.{node.index}@{node.token}{keys}"


def _neuron_id(node: NodeIndex) -> str:
    return f"n{node.layer}.{node.index}@{node.token}"


def _latent_id(node: NodeIndex) -> str:
    assert node.site is not None
    return f"a{node.site.code}{node.layer}.{node.index}@{node.token}"


def _head_location(node: NodeIndex) -> tuple[HookPoint, int | None]:
    # A (query, key) pair is one attention probability; a head at a query for all keys (and a
    # whole head) is its output z before W_O.
    return (HookPoint.ATTN_Z if node.key_token is None else HookPoint.ATTN_PROBS), node.layer


def _head_entry(node: NodeIndex, token: int | slice) -> tuple[int | slice, ...]:
    if node.key_token is None:
        return (0, token, node.index)  # ATTN_Z [batch pos head d_head]
    return (0, node.index, token, node.key_token)  # ATTN_PROBS [batch head query_pos key_pos]


def _unit_entry(node: NodeIndex, token: int | slice) -> tuple[int | slice, ...]:
    return (0, token, node.index)  # [batch pos d_mlp] or [batch pos d_sae]


def _latent_location(node: NodeIndex) -> tuple[HookPoint, int | None]:
    assert node.site is not None
    return node.site.latent_point, node.layer


def _head_label(node: NodeIndex, tok: Callable[[int], str]) -> str:
    keys = "all keys" if node.key_token is None else tok(node.key_token)
    return f"L{node.layer} head {node.index} {tok(node.token)} <- {keys}"


def _latent_label(node: NodeIndex, tok: Callable[[int], str]) -> str:
    site = "" if node.site is None else f"{node.site.value} "
    return f"L{node.layer} {site}latent {node.index} {tok(node.token)}"


NODE_SPECS: dict[NodeType, NodeSpec] = {
    NodeType.EMBEDDING: NodeSpec(
        NodeType.EMBEDDING,
        grammar="e@<token>",
        pattern=re.compile(r"e@(\d+)"),
        from_match=lambda m: NodeIndex(NodeType.EMBEDDING, None, int(m[1]), 0),
        format_id=_embedding_id,
        grid_axes=(TOKEN,),
        label=lambda node, tok: f"embedding {tok(node.token)}",
        has_component=False,
        location=lambda node: (HookPoint.RESID_EMBED, None),
        entry=lambda node, token: (0, token),  # [batch pos d_model]
    ),
    NodeType.ATTENTION_HEAD: NodeSpec(
        NodeType.ATTENTION_HEAD,
        grammar="h<layer>.<head>@<query>:<key> (or h<layer>.<head>@<query> for all keys)",
        pattern=re.compile(r"h(\d+)\.(\d+)@(\d+)(?::(\d+))?"),
        from_match=lambda m: NodeIndex(
            NodeType.ATTENTION_HEAD,
            int(m[1]),
            int(m[3]),
            int(m[2]),
            key_token=None if m[4] is None else int(m[4]),
        ),
        format_id=_head_id,
        grid_axes=(LAYER, INDEX, TOKEN, KEY_TOKEN),
        label=_head_label,
        has_component=True,
        location=_head_location,
        entry=_head_entry,
    ),
    NodeType.MLP_NEURON: NodeSpec(
        NodeType.MLP_NEURON,
        grammar="n<layer>.<neuron>@<token>",
        pattern=re.compile(r"n(\d+)\.(\d+)@(\d+)"),
        from_match=lambda m: NodeIndex(NodeType.MLP_NEURON, int(m[1]), int(m[3]), int(m[2])),
        format_id=_neuron_id,
        grid_axes=(LAYER, TOKEN, INDEX),
        label=lambda node, tok: f"L{node.layer} neuron {node.index} {tok(node.token)}",
        has_component=True,
        location=lambda node: (HookPoint.MLP_POST, node.layer),
        entry=_unit_entry,
    ),
    NodeType.AUTOENCODER_LATENT: NodeSpec(
        NodeType.AUTOENCODER_LATENT,
        grammar="a<a|p|m><layer>.<latent>@<token> (autoencoder latent on the attention output, "
        "the MLP post-activation or the MLP output)",
        pattern=re.compile(r"a([apm])(\d+)\.(\d+)@(\d+)"),
        from_match=lambda m: NodeIndex(
            NodeType.AUTOENCODER_LATENT,
            int(m[2]),
            int(m[4]),
            int(m[3]),
            site=next(s for s in SITES if s.code == m[1]),
        ),
        format_id=_latent_id,
        grid_axes=(LAYER, TOKEN, INDEX),  # per SAE; the store keeps latents as a list of nodes
        label=_latent_label,
        has_component=True,
        location=_latent_location,
        entry=_unit_entry,
    ),
}


def parse_node_id(text: str) -> NodeIndex:
    """The node of a short id: `parse_node_id("h2.3@7:4")`."""
    for spec in NODE_SPECS.values():
        match = spec.pattern.fullmatch(text.strip())
        if match is not None:
            return spec.from_match(match)
    grammars = ", ".join(spec.grammar for spec in NODE_SPECS.values())
    raise TdbError(f"node id {text!r} is not one of: {grammars}")


def node_label(node: NodeIndex, token_texts: Sequence[str]) -> str:
    """A name a person reads: `L2 head 3 ' to'@7 <- ' Mary'@4`."""

    def tok(i: int) -> str:
        return f"{token_texts[i]!r}@{i}"

    return NODE_SPECS[node.node_type].label(node, tok)


def component_link(node: NodeIndex) -> str | None:
    """Where the component's page of dataset examples lives (`tdb serve --scan`), or None."""
    if not NODE_SPECS[node.node_type].has_component:
        return None
    link = f"/component/{node.node_type.value}/{node.layer}/{node.index}"
    return link if node.site is None else f"{link}?site={node.site.value}"


@dataclass(frozen=True, order=True)
class ComponentIndex:
    """A component at every position: `h2.1` (head 1 of layer 2, every query), `n1.5`,
    `am1.42`. Its id is its nodes' id without the `@token` part."""

    node_type: NodeType
    layer: int
    index: int
    site: LatentSite | None = None

    def at(self, token: int) -> NodeIndex:
        """The component's node at one token (for heads: at one query, every key)."""
        return NodeIndex(self.node_type, self.layer, token, self.index, site=self.site)

    @property
    def id(self) -> str:
        return self.at(0).id.rpartition("@")[0]


class LayerPart(StrEnum):
    MLP = "mlp"
    ATTENTION = "attention"


@dataclass(frozen=True, order=True)
class LayerOutput:
    """What one layer's MLP (`m1`) or attention (`a1`) writes, at every position."""

    part: LayerPart
    layer: int

    @property
    def id(self) -> str:
        return f"{'m' if self.part is LayerPart.MLP else 'a'}{self.layer}"

    @property
    def point(self) -> HookPoint:
        return HookPoint.MLP_OUT if self.part is LayerPart.MLP else HookPoint.ATTN_OUT


# What an ablation can replace: one node, a component at every position, a layer's output.
Target = NodeIndex | ComponentIndex | LayerOutput
_LAYER_ID = re.compile(r"([ma])(\d+)")


def parse_target(text: str) -> Target:
    """A node id (`h2.1@7:3`), a component id (`h2.1`, `n1.5`, `am1.42`) or a layer's output
    (`m1`, `a1`): `parse_target("h2.1")`."""
    text = text.strip()
    layer = _LAYER_ID.fullmatch(text)
    if layer is not None:
        part = LayerPart.MLP if layer[1] == "m" else LayerPart.ATTENTION
        return LayerOutput(part, int(layer[2]))
    if "@" in text or text.startswith("e"):
        return parse_node_id(text)
    try:
        node = parse_node_id(text + "@0")  # a component's id is its nodes' without the token
    except TdbError:
        raise TdbError(
            f"node id {text!r} is not one of: "
            f"{', '.join(s.grammar for s in NODE_SPECS.values())}; nor a component id "
            "(h<layer>.<head>, n<layer>.<neuron>, a<a|p|m><layer>.<latent>: every position) or "
            "a layer's output (m<layer>, a<layer>: every position)"
        ) from None
    assert node.layer is not None
    return ComponentIndex(node.node_type, node.layer, node.index, node.site)


def target_location(target: Target) -> tuple[HookPoint, int | None]:
    """The hook point (and layer) whose tensor holds the target's activation."""
    if isinstance(target, LayerOutput):
        return target.point, target.layer
    node = target.at(0) if isinstance(target, ComponentIndex) else target
    return NODE_SPECS[node.node_type].location(node)


def target_entry(target: Target) -> tuple[int | slice, ...]:
    """The target's entry in its location's tensor (batch first; `slice(None)`: every token)."""
    if isinstance(target, LayerOutput):
        return (0, slice(None))  # [batch pos d_model]
    if isinstance(target, ComponentIndex):
        return NODE_SPECS[target.node_type].entry(target.at(0), slice(None))
    return NODE_SPECS[target.node_type].entry(target, target.token)


def check_target(
    target: Target,
    config: ModelShape,
    n_pos: int,
    what: str,
    latent_sizes: Mapping[tuple[LatentSite, int], int] | None = None,
) -> Target:
    """The target, if it exists in this model on a prompt of `n_pos` tokens; else a TdbError."""
    if isinstance(target, NodeIndex):
        return check_node(target, config, n_pos, what, latent_sizes)
    if isinstance(target, LayerOutput):
        if not 0 <= target.layer < config.n_layer:
            raise TdbError(
                f"{what} {target.id}: layer {target.layer} is outside 0..{config.n_layer - 1}"
            )
        return target
    try:
        check_node(target.at(0), config, 1, what, latent_sizes)
    except TdbError as e:
        raise TdbError(str(e).replace(target.at(0).id, target.id, 1)) from None
    return target
