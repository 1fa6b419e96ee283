"""Byte-level BPE tokenizer (4,096 tokens, prefix space) for the demo model.

    >>> tokenizer = train_tokenizer(load_bible_chapters(), seed=0)
    >>> check_tokenizer(tokenizer)  # every name and country is one token with its space
    >>> tokenizer.save("tokenizer.json")

It is trained on the text part of the training mix (the whole Bible plus generated IOI, name and
capital documents), so the names and countries become single tokens by frequency rather than by
being forced in as added tokens: added tokens would bypass the byte-level pre-tokenizer and
behave differently from every other word.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tdb.demo.data import (
    CAPITALS,
    NAMES,
    capital_document,
    ioi_document,
    simple_name_document,
)

D_VOCAB = 4096
END_OF_TEXT = "<|endoftext|>"


def _corpus(chapters: list[list[str]], rng: random.Random) -> Iterator[str]:
    """The whole Bible once, then generated documents in about the training proportions."""
    for chapter in chapters:
        yield " ".join(chapter)
    for _ in range(20_000):
        yield ioi_document(rng)
    for _ in range(3_000):
        yield simple_name_document(rng)
    for _ in range(8_000):
        yield capital_document(rng)


def train_tokenizer(chapters: list[list[str]], seed: int) -> Tokenizer:
    """Train the BPE on the text of the training mix; `<|endoftext|>` gets id 0.

    >>> train_tokenizer(load_bible_chapters(), seed=0).get_vocab_size()
    4096
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=D_VOCAB,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(chapters, random.Random(seed)), trainer)
    return tokenizer


def single_token_id(tokenizer: Tokenizer, word: str) -> int:
    """The id of " {word}" (leading space), or ValueError if it is not exactly one token.

    >>> single_token_id(tokenizer, "Mary")  # e.g. 1234
    """
    ids = tokenizer.encode(f" {word}", add_special_tokens=False).ids
    if len(ids) != 1:
        pieces = [tokenizer.id_to_token(i) for i in ids]
        raise ValueError(f"' {word}' is {len(ids)} tokens {pieces}, expected one")
    return ids[0]


def check_tokenizer(tokenizer: Tokenizer) -> None:
    """Raise ValueError unless the vocabulary, names and countries are what evaluation needs.

    >>> check_tokenizer(Tokenizer.from_file("tdb/demo/checkpoint/tokenizer.json"))
    """
    if tokenizer.get_vocab_size() != D_VOCAB:
        raise ValueError(f"vocabulary has {tokenizer.get_vocab_size()} tokens, not {D_VOCAB}")
    if tokenizer.token_to_id(END_OF_TEXT) is None:
        raise ValueError(f"{END_OF_TEXT} is missing from the vocabulary")
    problems = []
    for word in (*NAMES, *(country for _, country in CAPITALS)):
        try:
            single_token_id(tokenizer, word)
        except ValueError as err:
            problems.append(str(err))
    if problems:
        raise ValueError("tokenizer does not fit the demo data:\n" + "\n".join(problems))
