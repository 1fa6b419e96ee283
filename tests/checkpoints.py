"""Random-weight GPT-2 checkpoints built with Hugging Face `transformers`, for the tests."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from tokenizers.decoders import ByteLevel as ByteLevelDecoder
from transformers import GPT2Config, GPT2LMHeadModel

CORPUS = [
    "When Mary and John went to the store, John gave a drink to Mary.",
    "When Tom and Anna went to the park, Anna gave a ball to Tom.",
    "Paris, France. Ottawa, Canada. Berlin, Germany. Rome, Italy.",
    "The quick brown fox jumps over the lazy dog again and again.",
] * 20


def train_tokenizer(vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = ByteLevelDecoder()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


def make_checkpoint(
    directory: Path,
    *,
    n_layer: int = 2,
    n_embd: int = 32,
    n_head: int = 4,
    n_inner: int | None = None,
    n_positions: int = 64,
    vocab_size: int = 400,
    tie_word_embeddings: bool = True,
    activation_function: str = "gelu_new",
    with_tokenizer: bool = True,
    safetensors: bool = True,
    seed: int = 0,
) -> GPT2LMHeadModel:
    """Save a random GPT-2 (weights scaled up so activations are not all tiny) and return it."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        n_inner=n_inner,
        tie_word_embeddings=tie_word_embeddings,
        activation_function=activation_function,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" not in name:
                p.normal_(0.0, 0.2 if p.ndim > 1 else 0.05)
            else:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(directory, safe_serialization=safetensors)
    if with_tokenizer:
        train_tokenizer(vocab_size).save(str(directory / "tokenizer.json"))
    return model
