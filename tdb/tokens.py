"""Tokenizers: a checkpoint's `tokenizer.json` (or GPT-2's vocab.json + merges.txt), or none.

Without tokenizer files a model still works on token ids; token text is then shown as `<id>`.

BOS: a text prompt starts with the tokens `tokenizer.json`'s post-processor puts before a text
(Llama's `<s>`, Llama 3's `<|begin_of_text|>`, Gemma's `<bos>`), as transformers' tokenizer
does; GPT-2's and the demo's add none. Tokens the post-processor appends (an EOS) are left
out: a prompt is continued, not ended. Targets and distractors never get a BOS.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from tokenizers import Tokenizer as HFTokenizer
from tokenizers.decoders import ByteLevel as ByteLevelDecoder
from tokenizers.models import BPE
from tokenizers.pre_tokenizers import ByteLevel

from tdb.errors import TdbError, reason

T = TypeVar("T")


def token_id(value: object, what: str) -> int:
    """One id of a prompt given as ids (an int, or a numpy / torch integer); a TdbError for
    anything else, such as a list of text prompts passed where one prompt is expected."""
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TdbError(
            f"{what} must be text or a list of token ids, got a list holding {value!r}"
        ) from None


def read_tokenizer(read: Callable[[], T], path: Path) -> T:
    """`read()`, with the tokenizers library's complaint about a broken file as a TdbError."""
    try:
        return read()
    # tokenizers reports a file it cannot parse as a bare Exception, whatever the problem.
    except Exception as e:
        raise TdbError(f"{path}: not a readable tokenizer ({reason(e)})") from None


def bos_prefix(inner: HFTokenizer) -> tuple[int, ...]:
    """The special tokens `inner`'s post-processor puts before a single text (none: `()`).

    Read off an encoding of a probe text with and without the special tokens, so any
    post-processor (TemplateProcessing, RobertaProcessing, a Sequence) is read the same way."""
    for probe in ("a", "Hello", "0"):
        plain = inner.encode(probe, add_special_tokens=False).ids
        if not plain:  # a vocabulary without this text and no unknown token: try another
            continue
        full = inner.encode(probe, add_special_tokens=True).ids
        for start in range(len(full) - len(plain) + 1):
            if full[start : start + len(plain)] == plain:
                return tuple(full[:start])
    return ()


@dataclass(frozen=True)
class Tokenizer:
    """Text <-> token ids. `Tokenizer.from_dir(path)`; `tok.encode(" Mary")` -> `[44]`.

    `inner` is None when the checkpoint has no tokenizer files (ids only). `bos`: the tokens a
    text prompt starts with when the model expects them (see the module docstring).
    """

    inner: HFTokenizer | None
    d_vocab: int
    bos: tuple[int, ...] = ()

    @staticmethod
    def from_dir(directory: Path, d_vocab: int) -> Tokenizer:
        """The checkpoint's tokenizer, checked against the model: each of its token ids must
        have a row in the embedding (`d_vocab` rows), else a TdbError at load time rather than
        an index error in the first forward pass."""
        tokenizer_json = directory / "tokenizer.json"
        vocab, merges = directory / "vocab.json", directory / "merges.txt"
        if tokenizer_json.is_file():
            inner = read_tokenizer(
                lambda: HFTokenizer.from_file(str(tokenizer_json)), tokenizer_json
            )
        elif vocab.is_file() and merges.is_file():
            bpe = read_tokenizer(lambda: BPE.from_file(str(vocab), str(merges)), vocab)
            inner = HFTokenizer(bpe)
            inner.pre_tokenizer = ByteLevel(add_prefix_space=False)
            inner.decoder = ByteLevelDecoder()
        else:
            return Tokenizer(None, d_vocab)
        ids = inner.get_vocab(with_added_tokens=True).values()
        largest = max(ids, default=-1)
        if largest >= d_vocab:
            raise TdbError(
                f"{directory}: the tokenizer has token ids up to {largest}, but the model embeds "
                f"only {d_vocab} (vocab_size in config.json)"
            )
        return Tokenizer(inner, d_vocab, bos_prefix(inner))

    @property
    def has_text(self) -> bool:
        return self.inner is not None

    def encode(self, text: str) -> list[int]:
        if self.inner is None:
            raise TdbError(
                "this checkpoint has no tokenizer (tokenizer.json or vocab.json + merges.txt): "
                "give token ids instead (--token-ids, --target-id, --distractor-id)"
            )
        return list(self.inner.encode(text, add_special_tokens=False).ids)

    def token_text(self, token_id: int) -> str:
        if self.inner is None:
            return f"<{token_id}>"
        return self.inner.decode([token_id], skip_special_tokens=False)

    def single_token(self, text: str, what: str) -> int:
        """The id of `text`, which must be exactly one token (else a TdbError naming its pieces)."""
        ids = self.encode(text)
        if len(ids) != 1:
            pieces = ", ".join(repr(self.token_text(i)) for i in ids) or "nothing"
            raise TdbError(f"{what} {text!r} must be a single token, but it splits into {pieces}")
        return ids[0]

    def check_id(self, token_id: int, what: str) -> int:
        if not 0 <= token_id < self.d_vocab:
            raise TdbError(f"{what} {token_id} is outside the vocabulary (0..{self.d_vocab - 1})")
        return token_id

    def prompt_ids(
        self,
        prompt: str | Sequence[int],
        n_ctx: int,
        what: str = "the prompt",
        bos: bool | None = None,
    ) -> list[int]:
        """A prompt's token ids (text is encoded, ids are checked), non-empty and within `n_ctx`.

        Text starts with the BOS tokens when `bos` is True, or when it is None (the default)
        and the tokenizer adds them (`self.bos`); ids are taken as given.

        >>> tokenizer.prompt_ids("When Mary and John", n_ctx=128)
        """
        if isinstance(prompt, str):
            if not prompt:
                raise TdbError(f"{what} is empty: give some text (or token ids)")
            tokens = self.encode(prompt)
            if bos and not self.bos:
                raise TdbError(
                    "--bos: this tokenizer adds no BOS token (its tokenizer.json has no "
                    "post-processor that starts a text with one); give the BOS id in "
                    "--token-ids instead"
                )
            if bos is not False:
                tokens = [*self.bos, *tokens]
        elif isinstance(prompt, Iterable):
            tokens = [self.check_id(token_id(t, what), "token id") for t in prompt]
        else:
            kind = type(prompt).__name__
            raise TdbError(f"{what} must be text or a list of token ids, got {kind}")
        if not tokens:
            raise TdbError(f"{what} has no tokens")
        if len(tokens) > n_ctx:
            raise TdbError(f"{what} is {len(tokens)} tokens, longer than the model's {n_ctx}")
        return tokens
