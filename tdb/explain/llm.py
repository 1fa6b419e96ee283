"""The LLM explainer: per component, an explain prompt on its explaining top examples, then a
simulate prompt with that sentence on its held-out examples (the ones the built-in explainer
scores on); the score is the correlation of the simulated and the real activations
(`simulate.correlation`, as for the built-in explainer).

Components are asked `concurrency` at a time, on that many threads: the requests wait on the
network, and a thread pool is the plain way to keep a bounded number in flight with the
standard library's blocking HTTP. A component's row is made only when both its answers parsed,
so it is written whole or not at all; the file is rewritten every few seconds and at the end
(each answer is also in the cache, so a killed run loses no paid request). See
docs/explanations.md.
"""

from __future__ import annotations

import functools
import json
import time
import urllib.parse
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tdb.errors import TdbError
from tdb.explain import llm_prompts, simulate
from tdb.explain.llm_client import Cache, Client, LlmConfig, LlmError, LlmFatalError, api_key
from tdb.explain.llm_prompts import BadAnswerError, Messages
from tdb.explain.output import Row, write_rows
from tdb.explain.scan_data import ComponentExamples, ComponentKey, Windows

SAVE_EVERY_S = 10.0


def explainer_name(config: LlmConfig) -> str:
    return f"llm:{config.model}"


def check_config(config: LlmConfig) -> None:
    """A one-line TdbError for settings that cannot work."""
    url = urllib.parse.urlsplit(config.url)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise TdbError(
            f"--llm-url: {config.url!r} is not an http:// or https:// URL "
            "(the API base, e.g. http://127.0.0.1:8000/v1)"
        )
    if not config.model.strip():
        raise TdbError("--llm-model: empty (name the model the endpoint serves)")
    if config.concurrency < 1:
        raise TdbError(f"--llm-concurrency: must be >= 1, got {config.concurrency}")
    if not 0 < config.timeout_s < 1e6:  # NaN fails too
        raise TdbError(f"--llm-timeout: must be > 0 seconds, got {config.timeout_s}")
    if config.attempts < 1:
        raise TdbError(f"attempts: must be >= 1, got {config.attempts}")


def component_name(key: ComponentKey) -> str:
    node_type, layer, index, site = key
    return f"{node_type} {site + ' ' if site else ''}L{layer}/{index}"


@dataclass
class LlmRun:
    """What an LLM run did: rows made, components that failed (with why)."""

    explained: int = 0
    failures: list[tuple[ComponentKey, str]] = field(default_factory=list)


class LlmExplainer:
    """Asks (or reads from the cache) both prompts of one component and makes its row."""

    def __init__(self, folder: Path, config: LlmConfig, vocab: list[str]) -> None:
        self.config = config
        self.folder = folder
        self.vocab = vocab
        self.client = Client(config, api_key())
        self.cache = Cache(folder)

    def _texts(self, windows: Windows) -> list[list[str]]:
        return [[self.vocab[c] for c in codes.tolist()] for codes in windows.codes]

    def _ask(
        self,
        kind: str,
        key: ComponentKey,
        messages: Messages,
        parse: Callable[[str], object],
    ) -> object:
        cache_key = Cache.key(kind, llm_prompts.VERSION, self.config.model, key, messages)
        cached = self.cache.get(cache_key)
        if cached is not None:
            try:
                return parse(cached)
            except BadAnswerError:
                pass  # a cache entry of an older parser: ask again
        answer = self.client.complete(messages)
        try:
            parsed = parse(answer)
        except BadAnswerError as e:
            raise LlmError(f"{kind} answer: {e}") from None
        record = {"kind": kind, "version": llm_prompts.VERSION, "model": self.config.model}
        self.cache.put(cache_key, record | {"component": list(key), "answer": answer})
        return parsed

    def simulate_score(self, key: ComponentKey, sentence: str, held: Windows) -> float:
        """The correlation of the activations simulated from `sentence` on the windows `held`
        with the real ones."""
        texts = self._texts(held)
        lengths = [len(t) for t in texts]
        if sum(lengths) < 2:  # nothing to correlate: the score is 0, as built in
            return 0.0
        predicted = self._ask(
            "simulate",
            key,
            llm_prompts.simulate_messages(sentence, texts),
            lambda answer: llm_prompts.parse_simulation(answer, lengths),
        )
        assert isinstance(predicted, list)
        flat = np.array([v for values in predicted for v in values], dtype=np.float64)
        return simulate.correlation(flat, held.flat().acts)

    def control_row(self, examples: ComponentExamples, row: Row, partner: Row) -> Row:
        """`row` with its control score: the partner's explanation simulated on this
        component's held-out examples."""
        sentence = str(partner["explanation"])
        control = self.simulate_score(examples.key, sentence, examples.held_out)
        return row | {"control_score": control}

    def row(self, examples: ComponentExamples) -> Row:
        """The component's row: explained on its explaining top examples, scored on its
        held-out examples."""
        node_type, layer, index, site = examples.key
        top = examples.explain_top
        messages = llm_prompts.explain_messages(self._texts(top), top.acts)
        sentence = str(self._ask("explain", examples.key, messages, llm_prompts.parse_explanation))
        held = examples.held_out
        score = self.simulate_score(examples.key, sentence, held)
        evidence = {
            "explained_on": top.labels,
            "max_activation": max((float(a.max()) for a in top.acts if len(a)), default=0.0),
            "model": self.config.model,
        }
        return {
            "node_type": node_type,
            "layer": layer,
            "index": index,
            "site": site,
            "explanation": sentence,
            "evidence": json.dumps(evidence),
            "score": score,
            "control_score": None,  # filled in by `control_with_llm` when asked for
            "scored_on": held.labels,
            "explainer": explainer_name(self.config),
            "version": llm_prompts.VERSION,
            "examples_fingerprint": examples.fingerprint,
        }


def explain_with_llm(
    explainer: LlmExplainer,
    todo: list[ComponentExamples],
    rows: dict[ComponentKey, Row],
    progress: Callable[[int, int], None] | None = None,
) -> LlmRun:
    """Explain the components of `todo` into `rows`, `concurrency` at a time, saving the file
    as rows come in. An `LlmFatalError` (endpoint unreachable, key refused) stops the run after
    saving what is done; an `LlmError` fails only its component."""
    tasks: dict[ComponentKey, Callable[[], Row]] = {
        c.key: functools.partial(explainer.row, c) for c in todo
    }
    return _in_pool(explainer, tasks, rows, progress)


def control_with_llm(
    explainer: LlmExplainer,
    components: dict[ComponentKey, ComponentExamples],
    partners: dict[ComponentKey, ComponentKey],
    rows: dict[ComponentKey, Row],
    stale: set[ComponentKey],
) -> LlmRun:
    """Control scores of this explainer's rows that lack one or whose partner changed: one more
    simulate request each, the partner's explanation on the component's held-out examples."""
    name = explainer_name(explainer.config)
    tasks: dict[ComponentKey, Callable[[], Row]] = {}
    for key, examples in components.items():
        row, partner = rows.get(key), rows.get(partners[key])
        if (
            row is None
            or partner is None
            or name != row["explainer"]
            or name != partner["explainer"]
        ):
            continue
        if row["control_score"] is None or {key, partners[key]} & stale:
            tasks[key] = functools.partial(explainer.control_row, examples, row, partner)
    run = _in_pool(explainer, tasks, rows, None)
    run.failures = [(key, f"control: {why}") for key, why in run.failures]
    return run


def _in_pool(
    explainer: LlmExplainer,
    tasks: dict[ComponentKey, Callable[[], Row]],
    rows: dict[ComponentKey, Row],
    progress: Callable[[int, int], None] | None,
) -> LlmRun:
    """Run `tasks` (each makes one component's row) on `concurrency` threads into `rows`."""
    result = LlmRun()
    saved_at = time.monotonic()
    dirty = False
    pool = ThreadPoolExecutor(
        max_workers=explainer.config.concurrency, thread_name_prefix="tdb-llm"
    )
    try:
        pending = {pool.submit(task): key for key, task in tasks.items()}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                key = pending.pop(future)
                try:
                    rows[key] = future.result()
                except LlmError as e:
                    result.failures.append((key, str(e)))
                    continue
                result.explained += 1
                dirty = True
            if progress is not None:
                progress(result.explained + len(result.failures), len(tasks))
            if dirty and time.monotonic() - saved_at > SAVE_EVERY_S:
                write_rows(explainer.folder, rows)
                saved_at, dirty = time.monotonic(), False
    except LlmFatalError:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        if dirty:
            write_rows(explainer.folder, rows)
    return result
