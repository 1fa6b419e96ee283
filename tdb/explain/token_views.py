"""Weight-based evidence of neurons and latents, without any example: the vocabulary tokens
their write vector promotes and suppresses (logit lens: through the final norm's gain and the
unembedding, mean-centred, as tdb.token_views.node_view) and, for neurons, the input tokens
whose embeddings excite them most (the embedding through the layer's MLP norm and W_in: the
direct path only)."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from tdb.hooks import NO_HOOKS
from tdb.latents import write_directions
from tdb.models.base import TransformerModel
from tdb.sae import AttachedSae
from tdb.token_views import unembedded
from tdb.tokens import Tokenizer

N_VIEW = 5

TokenList = list[list[str]]  # per component, token texts


def _top_texts(
    scores: Float[Tensor, "component d_vocab"], tokenizer: Tokenizer, largest: bool
) -> TokenList:
    ids = torch.topk(scores, min(N_VIEW, scores.shape[1]), dim=1, largest=largest).indices
    return [[tokenizer.token_text(int(i)) for i in row] for row in ids]


def logit_lens(
    model: TransformerModel, writes: Float[Tensor, "component d_model"], tokenizer: Tokenizer
) -> tuple[TokenList, TokenList]:
    """Per write direction, the tokens it promotes and those it suppresses most.

    >>> promotes, suppresses = logit_lens(model, model.block(1).mlp.W_out, tokenizer)
    """
    with torch.no_grad():
        scores = unembedded(model, writes)  # [component d_vocab]
        scores = scores - scores.mean(dim=1, keepdim=True)
    return _top_texts(scores, tokenizer, True), _top_texts(scores, tokenizer, False)


def neuron_writes(model: TransformerModel, layer: int) -> Float[Tensor, "d_mlp d_model"]:
    return model.block(layer).mlp.W_out.detach()


def latent_writes(model: TransformerModel, attached: AttachedSae) -> Float[Tensor, "d_sae d_model"]:
    return write_directions(model, attached).detach()


def exciting_tokens(model: TransformerModel, layer: int, tokenizer: Tokenizer) -> TokenList | None:
    """Per neuron of `layer`, the input tokens whose embedding alone excites it most; None for a
    model without a plain token embedding and W_in."""
    W_E = getattr(model, "W_E", None)
    W_in = getattr(model.block(layer).mlp, "W_in", None)
    b_in = getattr(model.block(layer).mlp, "b_in", None)
    if not isinstance(W_E, Tensor) or not isinstance(W_in, Tensor):
        return None
    with torch.no_grad():
        normed = model.block(layer).ln_2(W_E[None], NO_HOOKS)[0]  # [d_vocab d_model]
        pre = normed @ W_in  # [d_vocab d_mlp]
        if isinstance(b_in, Tensor):
            pre = pre + b_in
    return _top_texts(pre.T, tokenizer, True)
