"""Token views: which vocabulary tokens a prompt's logits or a node's write vector favour, which
prompt tokens excite a neuron, and where (per token) the estimated total effect sits."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from tdb.ablation import record
from tdb.hooks import HookPoint
from tdb.latents import check_saes, write_directions
from tdb.metrics import Group, Metric
from tdb.models.base import TransformerModel
from tdb.nodes import SITE, SITES, TOKEN, NodeIndex, NodeType, target_location
from tdb.sae import AttachedSae
from tdb.store import GridBlock, ListBlock, ScalarStore
from tdb.tokens import Tokenizer


def ranked_tokens(
    scores: Float[Tensor, " d_vocab"],
    tokenizer: Tokenizer,
    n: int,
    largest: bool,
    log_probs: Float[Tensor, " d_vocab"] | None = None,
) -> list[dict[str, object]]:
    """The n highest (lowest) scoring tokens; with `log_probs`, each with its probability."""
    top = torch.topk(scores, min(n, len(scores)), largest=largest)
    out: list[dict[str, object]] = []
    for v, i in zip(top.values, top.indices, strict=True):
        token: dict[str, object] = {
            "id": int(i),
            "text": tokenizer.token_text(int(i)),
            "value": float(v),
        }
        if log_probs is not None:
            token["prob"] = float(log_probs[i].exp())
        out.append(token)
    return out


def logit_view(
    logits: Float[Tensor, " d_vocab"],
    tokenizer: Tokenizer,
    pinned: Sequence[int],
    n: int = 100,
    roles: Sequence[str] = (),
) -> dict[str, object]:
    """The top and bottom n next-token logits with their probabilities, and the pinned tokens
    (target, distractor) with their rank (0 = highest logit) and `roles[i]` ("target",
    "distractor"); `loss` is −log p of the target (the mean over several targets; null
    without one).

    >>> logit_view(capture.logits, tokenizer, pinned=[mary, john], roles=["target", "distractor"])
    """
    order = torch.argsort(logits, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    # float64: a probability of 1e-9 must not round to 0 (the page shows its logarithm's scale).
    log_probs = torch.log_softmax(logits.double(), dim=-1)  # [d_vocab]

    targets = [t for t, role in zip(pinned, roles, strict=False) if role == "target"]
    loss = -float(log_probs[targets].mean()) if targets else None
    return {
        "top": ranked_tokens(logits, tokenizer, n, largest=True, log_probs=log_probs),
        "bottom": ranked_tokens(logits, tokenizer, n, largest=False, log_probs=log_probs),
        "pinned": [
            {
                "id": t,
                "text": tokenizer.token_text(t),
                "value": float(logits[t]),
                "rank": int(rank[t]),
                "prob": float(log_probs[t].exp()),
                "role": roles[i] if i < len(roles) else None,
            }
            for i, t in enumerate(pinned)
        ],
        "loss": loss,
    }


# What one node writes into the residual stream on a prompt, computed explicitly: one function
# per node type (the metrics compute the same writes for whole layers at once, tdb.metrics).
WriteVector = Callable[
    [TransformerModel, Sequence[int], NodeIndex, Sequence[AttachedSae]], Float[Tensor, " d_model"]
]


def embedding_write(
    model: TransformerModel, tokens: Sequence[int], node: NodeIndex, saes: Sequence[AttachedSae]
) -> Tensor:
    """Token + position embedding at the token."""
    location = target_location(node)
    return record(model, [tokens], {location})[location][0][node.token]


def head_write(
    model: TransformerModel, tokens: Sequence[int], node: NodeIndex, saes: Sequence[AttachedSae]
) -> Tensor:
    """p[query, key] · v[key] @ W_O[head], summed over keys when the node is a head at a query
    for all keys (value bias included, output bias not)."""
    assert node.layer is not None
    sites: set[tuple[HookPoint, int | None]] = {
        (HookPoint.ATTN_PROBS, node.layer),
        (HookPoint.V, node.layer),
    }
    recorded = record(model, [tokens], sites)
    probs = recorded[(HookPoint.ATTN_PROBS, node.layer)][0]  # [head query_pos key_pos]
    v = recorded[(HookPoint.V, node.layer)][0]  # [pos head d_head]
    W_O = model.block(node.layer).attn.W_O[node.index]  # [d_head d_model]
    keys = list(range(node.token + 1)) if node.key_token is None else [node.key_token]
    weights = probs[node.index, node.token, keys]  # [key]
    return (weights[:, None] * v[keys, node.index]).sum(dim=0) @ W_O


def neuron_write(
    model: TransformerModel, tokens: Sequence[int], node: NodeIndex, saes: Sequence[AttachedSae]
) -> Tensor:
    """a · W_out[neuron]."""
    assert node.layer is not None
    location = target_location(node)
    post = record(model, [tokens], {location})[location][0]  # [pos d_mlp]
    return post[node.token, node.index] * model.block(node.layer).mlp.W_out[node.index]


def latent_write(
    model: TransformerModel, tokens: Sequence[int], node: NodeIndex, saes: Sequence[AttachedSae]
) -> Tensor:
    """z · the latent's write direction (tdb.latents.write_directions)."""
    assert node.site is not None and node.layer is not None
    attached = check_saes(saes, model.config)[(node.site, node.layer)]
    location = target_location(node)
    z = record(model, [tokens], {location}, saes)[location][0]  # [pos d_sae]
    return z[node.token, node.index] * write_directions(model, attached)[node.index]


WRITE_VECTORS: dict[NodeType, WriteVector] = {
    NodeType.EMBEDDING: embedding_write,
    NodeType.ATTENTION_HEAD: head_write,
    NodeType.MLP_NEURON: neuron_write,
    NodeType.AUTOENCODER_LATENT: latent_write,
}


def write_vector(
    model: TransformerModel,
    tokens: Sequence[int],
    node: NodeIndex,
    saes: Sequence[AttachedSae] = (),
) -> Float[Tensor, " d_model"]:
    """What the node writes into the residual stream on this prompt, computed explicitly
    (`saes`: the attached SAEs, for latents)."""
    return WRITE_VECTORS[node.node_type](model, tokens, node, saes)


def unembedded(
    model: TransformerModel, writes: Float[Tensor, "*n d_model"]
) -> Float[Tensor, "*n d_vocab"]:
    """Write vectors through the final norm's gain and the unembedding, in float32 on the
    CPU (the gain is kept in float32 and the unembedding in the model's dtype and device)."""
    unembed = model.unembed
    scaled = writes.float() * model.ln_f.w.float().to(writes.device)
    return (scaled.to(unembed.device, unembed.dtype) @ unembed).float().cpu()


def node_view(
    model: TransformerModel,
    tokenizer: Tokenizer,
    tokens: Sequence[int],
    node: NodeIndex,
    n: int = 10,
    saes: Sequence[AttachedSae] = (),
) -> dict[str, object]:
    """The vocabulary tokens the node's write vector promotes and suppresses (through the final
    layer norm's gain and the unembedding, mean-centred) and, for an MLP neuron or an SAE
    latent, the prompt's tokens ranked by its activation."""
    write = write_vector(model, tokens, node, saes)
    scores = unembedded(model, write)  # [d_vocab]
    scores = scores - scores.mean()
    view: dict[str, object] = {
        "id": node.id,
        "promotes": ranked_tokens(scores, tokenizer, n, largest=True),
        "suppresses": ranked_tokens(scores, tokenizer, n, largest=False),
        "exciting_tokens": None,
    }
    if node.node_type in (NodeType.MLP_NEURON, NodeType.AUTOENCODER_LATENT):
        location = target_location(node)
        post = record(model, [tokens], {location}, saes)[location][0][:, node.index]  # [pos]
        order = torch.argsort(post, descending=True, stable=True)[:n]
        view["exciting_tokens"] = [
            {"token": int(t), "text": tokenizer.token_text(tokens[int(t)]), "value": float(post[t])}
            for t in order
        ]
    return view


def effect_by_token(store: ScalarStore, n_pos: int) -> dict[str, list[float]]:
    """Per prompt token, sums of estimated total effect (act × grad): embeddings, MLP neurons,
    attention by query token (attended from) and by key token (attended to) and, when the store
    holds SAE latents, each autoencoder site's latents by token (`latents_attn_out`,
    `latents_mlp_post`, `latents_mlp_out`). Needs a dense store.

    >>> effect_by_token(capture.store, len(tokens))["latents_mlp_out"]  # [pos]
    """
    out: dict[str, list[float]] = {}
    for node_type, name in [(NodeType.EMBEDDING, "embedding"), (NodeType.MLP_NEURON, "mlp")]:
        block = store.blocks.get(node_type)
        if block is None:
            out[name] = [0.0] * n_pos
            continue
        assert isinstance(block, GridBlock)
        values = block.values[Group.ACT_TIMES_GRAD].nan_to_num().reshape(block.shape)
        per_token = values if node_type is NodeType.EMBEDDING else values.sum(dim=(0, 2))
        out[name] = per_token.tolist()
    heads = store.blocks.get(NodeType.ATTENTION_HEAD)
    if heads is None:
        out["attention_from"] = out["attention_to"] = [0.0] * n_pos
    else:
        assert isinstance(heads, GridBlock)
        values = heads.values[Group.ACT_TIMES_GRAD].nan_to_num().reshape(heads.shape)
        out["attention_from"] = values.sum(dim=(0, 1, 3)).tolist()  # [layer head query key]
        out["attention_to"] = values.sum(dim=(0, 1, 2)).tolist()
    latents = store.blocks.get(NodeType.AUTOENCODER_LATENT)
    if isinstance(latents, ListBlock):
        out |= latent_effect_by_token(latents, n_pos)
    return out


def latent_effect_by_token(latents: ListBlock, n_pos: int) -> dict[str, list[float]]:
    """Per autoencoder site present, the latents' act × grad summed by token (a list block:
    coordinates per row, tokens past the direction's position absent, so they read 0)."""
    values = latents.values[Group.ACT_TIMES_GRAD].nan_to_num()  # [n]
    sites = latents.node_coords[:, SITE]  # [n]
    tokens = latents.node_coords[:, TOKEN]  # [n]
    out = {}
    for code, site in enumerate(SITES):
        here = sites == code
        if bool(here.any()):
            sums = torch.zeros(n_pos, dtype=values.dtype)
            sums.index_add_(0, tokens[here], values[here])
            out[f"latents_{site.value}"] = sums.tolist()
    return out


def effect_by_head(store: ScalarStore, group: Metric = Group.ACT_TIMES_GRAD) -> Tensor:
    """[layer head]: a metric summed over every (query, key) pair of each head (whole-head
    importance, e.g. to pick heads to ablate). Needs a dense store."""
    heads = store.blocks[NodeType.ATTENTION_HEAD]
    assert isinstance(heads, GridBlock)
    values = heads.values[group].nan_to_num().reshape(heads.shape)  # [layer head query key]
    return values.sum(dim=(2, 3))
