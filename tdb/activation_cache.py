"""Run a batch of prompts and keep the activations asked for: `loaded.run(prompts, cache=[...])`.

    >>> result = loaded.run(["When Mary and John went", "Paris, France."], cache=["resid_pre"])
    >>> result.logits  # [batch pos d_vocab], right-padded
    >>> result.cache["resid_pre", 1]  # [batch pos d_model], right-padded the same way
    >>> result.prompt(1).cache["resid_pre", 1]  # [1 pos d_model], the second prompt's tokens only

Prompts of different lengths are right-padded (with token 0) into one batch and run without an
attention mask: the models are causal and every prompt's positions start at 0, so a real token
attends only to tokens at or before it, all real, and computes exactly what it computes alone
(to float32 rounding; tests/test_activation_cache.py checks it for every architecture). Positions
past a prompt's length hold whatever the pad tokens computed: ignore them, or take
`result.prompt(i)`, whose tensors stop at the prompt's last token.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tdb.errors import TdbError
from tdb.hooks import (
    NO_HOOKS,
    OUTSIDE_LAYERS,
    HookFn,
    HookPoint,
    Hooks,
    Patch,
    compose,
    position_axes,
)
from tdb.models.base import TransformerModel
from tdb.tokens import Tokenizer

# One prompt is text or token ids (a list, a [pos] tensor or array); a batch is a list of prompts
# (or a [batch pos] tensor or array).
Prompt = str | Sequence[int] | Tensor | np.ndarray
Prompts = Prompt | Sequence[Prompt]
# The points to cache (at every layer), by name or HookPoint.
CachePoints = Iterable[HookPoint | str]
# Hooks by point name, one function or several (run in order) per point; or a `Hooks`.
HooksArg = Hooks | Mapping[HookPoint | str, HookFn | Sequence[HookFn]]
Key = tuple[HookPoint, int | None]

PAD_ID = 0  # any id works: no real token ever reads a pad position


def hook_point(name: HookPoint | str, what: str) -> HookPoint:
    """`name` as a HookPoint ("resid_pre", "RESID_PRE" or HookPoint.RESID_PRE), or a TdbError
    that starts with `what` (the argument it came from) and lists the known points."""
    if isinstance(name, HookPoint):
        return name
    if isinstance(name, str) and name.lower() in {p.value for p in HookPoint}:
        return HookPoint(name.lower())
    known = ", ".join(p.value for p in HookPoint)
    raise TdbError(f"{what}: unknown hook point {name!r} (known: {known})")


@dataclass(frozen=True)
class ActivationCache:
    """Activations of one run by (hook point, layer); points outside the layers by point alone.

    >>> cache["resid_pre", 1]  # or cache[HookPoint.RESID_PRE, 1]; cache["resid_pre", -1]: last
    >>> cache["attn_probs", 2][0, 1]  # [query_pos key_pos]: prompt 0, head 1 of layer 2
    >>> cache["resid_final"]  # layer None
    """

    values: Mapping[Key, Tensor]
    n_layer: int

    def key(self, point: HookPoint | str, layer: int | None) -> Key:
        """(point, layer) checked and normalised (negative layers count from the end)."""
        shown = f"cache[{str(point)!r}{'' if layer is None else f', {layer}'}]"
        point = hook_point(point, shown)
        if point in OUTSIDE_LAYERS:
            if layer is not None:
                raise TdbError(f"{shown}: {point.value} is outside the layers: no layer")
            return point, None
        if layer is None:
            raise TdbError(
                f"{shown}: {point.value} is per layer: give one, e.g. [{point.value!r}, 0]"
            )
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TdbError(f"{shown}: layer must be an int, got {layer!r}")
        n = self.n_layer
        if not -n <= layer < n:
            raise TdbError(f"{shown}: layer {layer} is out of range: {n} layers, 0..{n - 1}")
        return point, layer % n

    def __getitem__(self, key: HookPoint | str | tuple[HookPoint | str, int | None]) -> Tensor:
        point, layer = key if isinstance(key, tuple) else (key, None)
        checked = self.key(point, layer)
        if checked not in self.values:
            cached = sorted({p.value for p, _ in self.values}) or ["nothing"]
            raise TdbError(
                f"cache[{str(point)!r}{'' if layer is None else f', {layer}'}]: not cached "
                f"(this run cached {', '.join(cached)}); pass it in run(..., cache=[...]). A point "
                "this architecture never computes (mlp_up outside gated MLPs, pos_embed in rotary "
                "models, SAE latents) is never cached"
            )
        return self.values[checked]

    def __contains__(self, key: object) -> bool:
        point, layer = key if isinstance(key, tuple) and len(key) == 2 else (key, None)
        if not isinstance(point, HookPoint | str) or not isinstance(layer, int | None):
            return False
        try:
            return self.key(point, layer) in self.values
        except TdbError:
            return False

    def __iter__(self) -> Iterator[Key]:
        return iter(self.values)

    def __len__(self) -> int:
        return len(self.values)

    def keys(self) -> Iterable[Key]:
        return self.values.keys()

    def prompt(self, index: int, length: int) -> ActivationCache:
        """Prompt `index`'s activations, batch axis kept, positions cut at `length`."""
        trimmed = {}
        for (point, layer), x in self.values.items():
            x = x[index : index + 1]
            for axis in position_axes(point):
                x = x.narrow(axis, 0, length)
            trimmed[point, layer] = x
        return ActivationCache(trimmed, self.n_layer)


@dataclass(frozen=True)
class RunResult:
    """The logits and cached activations of a batch of prompts, right-padded to the longest.

    >>> result = loaded.run(["When Mary and John went to the store, John gave a drink to"])
    >>> result.last_logits[0, loaded.tokenizer.encode(" Mary")[0]]
    """

    tokens: Int[Tensor, "batch pos"]  # padded with PAD_ID
    lengths: tuple[int, ...]  # each prompt's token count
    logits: Float[Tensor, "batch pos d_vocab"]
    cache: ActivationCache

    @property
    def last_logits(self) -> Float[Tensor, "batch d_vocab"]:
        """The logits at each prompt's last token (the next-token prediction)."""
        last = torch.tensor(self.lengths, device=self.logits.device) - 1
        return self.logits[torch.arange(len(self.lengths), device=last.device), last]

    def prompt(self, index: int) -> RunResult:
        """Prompt `index` alone: batch of one, no padding (as if it had been run by itself)."""
        n = len(self.lengths)
        if isinstance(index, bool) or not isinstance(index, int) or not -n <= index < n:
            raise TdbError(f"prompt({index!r}): out of range for {n} prompts")
        index %= n
        length = self.lengths[index]
        return RunResult(
            self.tokens[index : index + 1, :length],
            (length,),
            self.logits[index : index + 1, :length],
            self.cache.prompt(index, length),
        )


def run_with_cache(
    model: TransformerModel,
    tokenizer: Tokenizer,
    prompts: Prompts,
    cache: CachePoints = (),
    hooks: HooksArg | None = None,
) -> RunResult:
    """Run `prompts` (text, token ids, or a list of either) in one batch, without gradients,
    keeping the activations at the `cache` points of every layer, after `hooks` changed them.

    >>> result = run_with_cache(loaded.model, loaded.tokenizer, ["Hello", "Hi there"],
    ...                         cache=[HookPoint.ATTN_PROBS], hooks={"attn_z": zero_head})
    """
    token_lists = prompt_tokens(tokenizer, prompts, model.config.n_ctx)
    if isinstance(cache, str):  # one name: a common slip for [name]
        cache = [cache]
    points = {hook_point(name, "cache"): None for name in cache}
    values: dict[Key, Tensor] = {}

    def keep(point: HookPoint) -> HookFn:
        def hook(x: Tensor, layer: int | None) -> None:
            # A copy: the same tensor object flows on (resid_post of one layer is resid_pre of
            # the next), and a later hook may change it in place.
            values[point, layer] = x.detach().clone()

        return hook

    lengths = tuple(len(ids) for ids in token_lists)
    n_pos = max(lengths)
    device = next(model.parameters()).device
    padded = [ids + [PAD_ID] * (n_pos - len(ids)) for ids in token_lists]
    tokens = torch.tensor(padded, dtype=torch.long, device=device)  # [batch pos]
    all_hooks = compose(as_hooks(hooks), Hooks({p: keep(p) for p in points}))
    with torch.no_grad():
        logits = model(tokens, hooks=all_hooks)
    return RunResult(tokens, lengths, logits, ActivationCache(values, model.config.n_layer))


def prompt_tokens(tokenizer: Tokenizer, prompts: Prompts, n_ctx: int) -> list[list[int]]:
    """Each prompt's token ids, checked: not empty, within the vocabulary and the context."""
    given = _as_list(prompts, "prompts")
    batch: list[object]
    if isinstance(given, str) or (
        isinstance(given, Sequence) and given and all(_is_id(t) for t in given)
    ):
        batch = [given]  # one prompt: text or ids
    elif isinstance(given, Sequence) and given:
        batch = list(given)
    else:
        raise TdbError(
            f"prompts: expected text, a list of texts, token ids or a list of token id lists, "
            f"got {given!r}"
        )
    token_lists = []
    for i, prompt in enumerate(batch):
        what = f"prompts[{i}]"
        prompt = _as_list(prompt, what)
        if isinstance(prompt, str):
            ids = [*tokenizer.bos, *tokenizer.encode(prompt)]  # BOS as in the node table
        elif isinstance(prompt, Sequence) and all(_is_id(t) for t in prompt):
            ids = [tokenizer.check_id(int(t), f"{what}: token id") for t in prompt]
        else:
            raise TdbError(f"{what}: expected text or a list of token ids, got {prompt!r}")
        if not ids:
            raise TdbError(f"{what}: {prompt!r} has no tokens")
        if len(ids) > n_ctx:
            raise TdbError(f"{what}: {len(ids)} tokens, more than the model's context of {n_ctx}")
        token_lists.append(ids)
    return token_lists


def _as_list(x: object, what: str) -> object:
    """A torch or numpy array of token ids as (nested) lists; anything else as it is."""
    if not isinstance(x, Tensor | np.ndarray):
        return x
    if x.ndim not in (1, 2) or not _is_integer_dtype(x):
        raise TdbError(
            f"{what}: an array of token ids must be [pos] or [batch pos] integers, "
            f"got {x.dtype} {list(x.shape)}"
        )
    return x.tolist()


def _is_integer_dtype(x: Tensor | np.ndarray) -> bool:
    if isinstance(x, Tensor):
        return not (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool)
    return bool(np.issubdtype(x.dtype, np.integer))  # numpy's bool is not an integer type


def _is_id(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)  # numpy ints too


def as_hooks(hooks: HooksArg | None) -> Hooks:
    """`run`'s hooks argument as one `Hooks`: several functions at a point run in order."""
    if hooks is None:
        return NO_HOOKS
    if isinstance(hooks, Hooks):
        return hooks
    if not isinstance(hooks, Mapping):
        raise TdbError(f"hooks: expected a dict of hook point -> function, got {hooks!r}")
    combined = NO_HOOKS
    for name, fns in hooks.items():
        point = hook_point(name, "hooks")
        chain = [fns] if callable(fns) else list(fns) if isinstance(fns, Sequence) else [fns]
        for fn in chain:
            if not callable(fn):
                raise TdbError(
                    f"hooks[{name!r}]: expected fn(tensor, layer) or a list of them, got {fn!r}"
                )
            if isinstance(fn, Patch) and fn.point != point:
                raise TdbError(f"hooks[{name!r}]: {fn.name} patches {fn.point.value}, not {point}")
            combined = compose(combined, Hooks({point: fn}))
    return combined
