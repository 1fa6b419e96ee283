"""`tdb explain`: every component of a finished scan explained, scored, and written to
DIR/explanations.parquet, incrementally.

A component is (re-)explained when it has no row, or its row is stale: the scan's examples of it
changed (`examples_fingerprint`) or the explainer's version did. Its control score (another
component's evidence of the same kind, simulated on its held-out examples) is filled in last,
once every component of the kind has evidence.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tdb.checkpoint import LoadedModel, load_model
from tdb.errors import TdbError
from tdb.explain import attention, llm_prompts, simulate
from tdb.explain.evidence import token_evidence
from tdb.explain.llm import (
    LlmExplainer,
    LlmRun,
    check_config,
    control_with_llm,
    explain_with_llm,
    explainer_name,
)
from tdb.explain.llm_client import LlmConfig
from tdb.explain.output import EXPLANATIONS, Row, read_rows, write_rows
from tdb.explain.scan_data import (
    ComponentExamples,
    ComponentKey,
    ScanData,
    check_scan,
    read_scan,
)
from tdb.explain.sentence import sentence
from tdb.explain.token_views import exciting_tokens, latent_writes, logit_lens, neuron_writes
from tdb.sae import AttachedSae, load_saes
from tdb.scan import out_folder
from tdb.scan.corpus import corpus_fingerprint
from tdb.scan.output import WindowTokens

EXPLAINER = "builtin"
VERSION = "builtin-1"
CONTROL_SEED = 0
KINDS = {"heads": "attention_head", "neurons": "mlp_neuron", "latents": "autoencoder_latent"}

Progress = Callable[[int, int], None]  # (components done, components to do)


@dataclass(frozen=True)
class ExplainResult:
    path: Path
    explained: int  # components explained by this run
    controlled: int  # control scores computed (or cleared) by this run
    total: int  # rows in the file
    failed: list[tuple[ComponentKey, str]] = field(default_factory=list)  # LLM: key, why


def kind_of(key: ComponentKey) -> tuple[str, str | None]:
    return key[0], key[3]


def _group_key(key: ComponentKey) -> tuple[str, str | None, int]:
    return key[0], key[3], key[1]


class Explainer:
    """The built-in explainer's model-side evidence: logit lens, exciting tokens, attention."""

    def __init__(
        self, data: ScanData, head_windows: list[tuple[int, int]], placement: tuple[str, str]
    ) -> None:
        self.head_windows = head_windows  # (doc_id, window_start) of every head window needed
        identity = data.identity
        device, dtype = placement
        self.loaded: LoadedModel = load_model(identity["model"], device, dtype)
        self.saes: dict[tuple[str, int], AttachedSae] = {
            (str(a.site), a.layer): a for path in identity.get("saes", []) for a in load_saes(path)
        }
        self.identity = identity
        self.folder = data.folder
        self._views: dict[tuple[str, str | None, int], dict[str, Any]] = {}
        self._windows: WindowTokens | None = None

    def views(self, key: ComponentKey) -> dict[str, Any]:
        node_type, layer, index, site = key
        group = (node_type, site, layer)
        if group not in self._views:
            model, tokenizer = self.loaded.model, self.loaded.tokenizer
            if node_type == "mlp_neuron":
                promotes, suppresses = logit_lens(model, neuron_writes(model, layer), tokenizer)
                exciting = exciting_tokens(model, layer, tokenizer)
            else:
                attached = self.saes.get((str(site), layer))
                if attached is None:
                    raise TdbError(f"--scan {self.folder}: the SAE of {site} layer {layer} is gone")
                promotes, suppresses = logit_lens(model, latent_writes(model, attached), tokenizer)
                exciting = None
            self._views[group] = {"p": promotes, "s": suppresses, "e": exciting}
        v = self._views[group]
        return {
            "promotes": v["p"][index],
            "suppresses": v["s"][index],
            "exciting_tokens": None if v["e"] is None else v["e"][index],
        }

    def window_tokens(self, doc_start: list[tuple[int, int]]) -> list[list[int]]:
        if self._windows is None:
            corpus = Path(self.identity["corpus"])
            if (
                not corpus.exists()
                or corpus_fingerprint(corpus) != self.identity["corpus_fingerprint"]
            ):
                raise TdbError(
                    f"--scan {self.folder}: its corpus {corpus} is gone or changed since the "
                    "scan, and heads need the example windows' tokens: scan again"
                )
            keys = np.array([(d << 32) | s for d, s in self.head_windows], dtype=np.int64)
            self._windows = WindowTokens(
                corpus, self.loaded.tokenizer, int(self.identity["window"]), keys
            )
        w = self._windows
        rows = w.rows(np.array([(d << 32) | s for d, s in doc_start], dtype=np.int64))
        return [w.tokens[r, : w.lengths[r]].tolist() for r in rows]


def explain_component(
    examples: ComponentExamples, data: ScanData, code_of: dict[str, int], explainer: Explainer
) -> Row:
    node_type, layer, index, site = examples.key
    is_head = node_type == "attention_head"
    evidence = token_evidence(examples.explain.flat(), data.vocab, data.corpus_counts, is_head)
    if is_head:
        top = examples.explain_top
        evidence["attention"] = attention.head_attention(
            explainer.loaded, layer, index, explainer.window_tokens(top.doc_start), top.acts
        )
    else:
        evidence |= explainer.views(examples.key)
    evidence["baseline"] = simulate.baseline(evidence, examples.explain.flat(), code_of)
    held = examples.held_out.flat()
    return {
        "node_type": node_type,
        "layer": layer,
        "index": index,
        "site": site,
        "explanation": sentence(evidence),
        "evidence": json.dumps(evidence),
        "score": simulate.score(evidence, held, code_of),
        "control_score": None,
        "scored_on": examples.held_out.labels,
        "explainer": EXPLAINER,
        "version": VERSION,
        "examples_fingerprint": examples.fingerprint,
    }


def control_partners(keys: list[ComponentKey]) -> dict[ComponentKey, ComponentKey]:
    """Per component, whose explanation is its control: components of one kind in a cycle of a
    seeded random order, each taking the next one's (deterministic; nobody gets its own when
    the kind has two or more)."""
    partners: dict[ComponentKey, ComponentKey] = {}
    for kind in sorted({kind_of(k) for k in keys}, key=str):
        members = sorted(k for k in keys if kind_of(k) == kind)
        order = np.random.default_rng(CONTROL_SEED).permutation(len(members))
        cycle = [members[i] for i in order]
        for i, key in enumerate(cycle):
            partners[key] = cycle[(i + 1) % len(cycle)]
    return partners


def explain(
    folder: Path,
    kinds: list[str] | None = None,
    explainer: str = EXPLAINER,
    progress: Progress | None = None,
    llm: LlmConfig | None = None,
    device: str = "cpu",
    dtype: str = "auto",
) -> ExplainResult:
    """Explain and score every component of the finished scan in `folder` (of these kinds:
    heads, neurons, latents; default all) that lacks a current explanation: with the built-in
    explainer, or with `explainer="llm"` and the endpoint of `llm`.

    >>> explain(Path("scan_dir"), ["neurons"]).explained
    1536
    >>> explain(Path("scan_dir"), ["heads"], "llm", llm=LlmConfig(url, "my-model")).failed
    []
    """
    if explainer not in (EXPLAINER, "llm"):
        raise TdbError(f"--explainer: {explainer!r} is not available (choose builtin or llm)")
    if explainer == "llm":
        if llm is None:
            raise TdbError("--explainer llm: needs --llm-url URL and --llm-model NAME")
        check_config(llm)
    for kind in kinds or []:
        if kind not in KINDS:
            raise TdbError(f"--components: {kind!r} is not one of {', '.join(KINDS)}")
    node_types = {KINDS[k] for k in kinds or KINDS}
    check_scan(folder)
    with out_folder.locked(folder, command="tdb explain", flag="--scan"):
        llm_config = llm if explainer == "llm" else None
        return _explain(folder, node_types, progress, llm_config, (device, dtype))


def _explain(
    folder: Path,
    node_types: set[str],
    progress: Progress | None,
    llm: LlmConfig | None,
    placement: tuple[str, str],
) -> ExplainResult:
    data = read_scan(folder, node_types)
    code_of = {text: code for code, text in enumerate(data.vocab)}
    by_key = {c.key: c for c in data.components}
    rows = read_rows(folder)
    # Rows of components the scan no longer has (of the kinds asked for) go.
    rows = {k: r for k, r in rows.items() if k in by_key or k[0] not in node_types}
    name, version = (
        (EXPLAINER, VERSION) if llm is None else (explainer_name(llm), llm_prompts.VERSION)
    )
    todo = [
        c
        for c in data.components
        if c.key not in rows
        or rows[c.key]["explainer"] != name
        or rows[c.key]["version"] != version
        or rows[c.key]["examples_fingerprint"] != c.fingerprint
    ]
    stale = {c.key for c in todo}
    if llm is not None:
        explainer = LlmExplainer(folder, llm, data.vocab)
        run = explain_with_llm(explainer, todo, rows, progress)
        controls = LlmRun()
        if llm.control:
            partners = control_partners(list(by_key))
            controls = control_with_llm(explainer, by_key, partners, rows, stale)
        builtin = _control_scores(by_key, rows, stale, code_of)  # built-in rows left over
        if builtin:
            write_rows(folder, rows)
        return ExplainResult(
            folder / EXPLANATIONS,
            run.explained,
            controls.explained + builtin,
            len(rows),
            run.failures + controls.failures,
        )
    explained = 0
    if todo:
        heads = {d for c in todo if c.key[0] == "attention_head" for d in c.explain_top.doc_start}
        runner = Explainer(data, sorted(heads), placement)
        groups: dict[tuple[str, str | None, int], list[ComponentExamples]] = {}
        for c in todo:
            groups.setdefault(_group_key(c.key), []).append(c)
        for group in sorted(groups, key=str):
            for c in groups[group]:
                rows[c.key] = explain_component(c, data, code_of, runner)
                explained += 1
            write_rows(folder, rows)  # a whole layer at a time: resumable
            if progress is not None:
                progress(explained, len(todo))
    controlled = _control_scores(by_key, rows, stale, code_of)
    if controlled:
        write_rows(folder, rows)
    return ExplainResult(folder / EXPLANATIONS, explained, controlled, len(rows))


def _control_scores(
    by_key: dict[ComponentKey, ComponentExamples],
    rows: dict[ComponentKey, Row],
    stale: set[ComponentKey],
    code_of: dict[str, int],
) -> int:
    """Fill in the built-in rows' control scores that are new or whose partner changed; a row
    whose partner has no built-in evidence (an LLM row, or none) has none. How many changed."""
    partners = control_partners(list(by_key))
    controlled = 0
    for key in by_key:
        row, partner = rows.get(key), rows.get(partners[key])
        if row is None or row["explainer"] != EXPLAINER:
            continue
        if partner is None or partner["explainer"] != EXPLAINER:
            if row["control_score"] is not None:
                row["control_score"] = None
                controlled += 1
            continue
        if row["control_score"] is not None and not {key, partners[key]} & stale:
            continue
        evidence = json.loads(str(partner["evidence"]))
        row["control_score"] = simulate.score(evidence, by_key[key].held_out.flat(), code_of)
        controlled += 1
    return controlled
