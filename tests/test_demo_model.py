"""The shipped demo model: its held-out scores, its tokenizer, and the data it was trained on."""

from __future__ import annotations

import random
import re

import pytest
import torch

from tdb.checkpoint import DEMO_MODEL_DIR, LoadedModel
from tdb.demo import bible
from tdb.demo.batches import document_layout
from tdb.demo.data import (
    CAPITALS,
    IOI_COMPOSED_TEMPLATES,
    IOI_HELDOUT_TEMPLATES,
    IOI_TRAIN_TEMPLATES,
    NAMES,
    capital_document,
    heldout_capital_adjacencies,
    heldout_capital_prompts,
    heldout_ioi_prompts,
    heldout_name_pairs,
    induction_document,
    ioi_document,
    simple_name_document,
)
from tdb.demo.evaluate import (
    CAPITAL_MIN_ACCURACY,
    INDUCTION_MIN_ACCURACY,
    IOI_MIN_ACCURACY,
    IOI_MIN_LOGIT_DIFF,
    DemoEval,
    evaluate_model,
)

REQUIRED_NAMES = (
    "Mary", "John", "Tom", "Anna", "Sarah", "David", "Lisa", "Mark", "James", "Emma",
    "Paul", "Kate", "Peter", "Alice", "Laura", "Michael", "Robert", "Susan", "George", "Helen",
)  # fmt: skip


def test_demo_is_the_default_model(demo: LoadedModel) -> None:
    assert demo.path == DEMO_MODEL_DIR
    assert sum(f.stat().st_size for f in DEMO_MODEL_DIR.iterdir()) <= 30 * 2**20


@pytest.fixture(scope="module")
def scores(demo: LoadedModel) -> DemoEval:
    return evaluate_model(demo.model, demo.tokenizer)


@pytest.mark.slow  # evaluates the demo model on every held-out set
def test_demo_passes_heldout_thresholds(scores: DemoEval) -> None:
    assert scores.ioi_logit_diff >= IOI_MIN_LOGIT_DIFF, scores.summary()
    assert scores.induction_accuracy >= INDUCTION_MIN_ACCURACY, scores.summary()
    assert scores.capital_accuracy >= CAPITAL_MIN_ACCURACY, scores.summary()
    assert scores.ioi_accuracy >= IOI_MIN_ACCURACY, scores.summary()


def test_names_and_countries_are_single_tokens(demo: LoadedModel) -> None:
    assert len(NAMES) >= 60 and set(REQUIRED_NAMES) <= set(NAMES)
    ids = [demo.tokenizer.single_token(f" {name}", "name") for name in NAMES]
    assert len(set(ids)) == len(NAMES)
    for name, token_id in zip(NAMES, ids, strict=True):
        assert demo.tokenizer.token_text(token_id) == f" {name}"
    for _, country in CAPITALS:
        demo.tokenizer.single_token(f" {country}", "country")
    assert demo.tokenizer.single_token("<|endoftext|>", "end of text") == 0


def test_ioi_prompt_reads_as_expected(demo: LoadedModel) -> None:
    """The example in the docs: ' Mary' must beat ' John'."""
    tok = demo.tokenizer
    prompt = tok.encode("When Mary and John went to the store, John gave a drink to")
    logits = demo.model(torch.tensor([prompt]))[0, -1]
    assert logits[tok.single_token(" Mary", "name")] > logits[tok.single_token(" John", "name")]


def _names_in(text: str) -> set[str]:
    return set(re.findall(r"[A-Z][a-z]+", text)) & set(NAMES)


def test_training_documents_avoid_heldout_name_pairs_and_templates() -> None:
    rng = random.Random(1)
    held = heldout_name_pairs()
    trained = set(IOI_TRAIN_TEMPLATES) | set(IOI_COMPOSED_TEMPLATES)
    assert held and len(trained) >= 15 and not set(IOI_HELDOUT_TEMPLATES) & trained
    for _ in range(2000):
        for doc in (ioi_document(rng), simple_name_document(rng)):
            names = _names_in(doc)
            pairs = {frozenset((a, b)) for a in names for b in names if a != b}
            assert not pairs & held, doc
    for prompt in heldout_ioi_prompts(100):
        assert frozenset((prompt.io, prompt.s)) in held
        assert prompt.text.count(prompt.s) == 2 and prompt.text.count(prompt.io) == 1


def test_training_capital_lists_avoid_heldout_adjacencies() -> None:
    rng = random.Random(2)
    held_texts = {p.text for p in heldout_capital_prompts()}
    assert len(held_texts) == len(heldout_capital_adjacencies())
    for _ in range(3000):
        doc = capital_document(rng)
        assert not any(text in doc for text in held_texts), doc


def test_induction_document_repeats_once() -> None:
    rng = random.Random(3)
    for _ in range(100):
        doc = induction_document(rng, d_vocab=4096, exclude=frozenset({0}))
        half = len(doc) // 2
        assert 10 <= half <= 30 and doc[:half] == doc[half:] and 0 not in doc


def test_document_layout_matches_a_naive_loop() -> None:
    tokens = torch.randint(0, 6, (4, 40), generator=torch.Generator().manual_seed(0))
    positions, mask = document_layout(tokens, eot=0)
    for b in range(4):
        doc, pos = 0, 0
        docs = []
        for t in range(40):
            docs.append(doc)
            assert positions[b, t] == pos
            pos += 1
            if tokens[b, t] == 0:  # the end-of-text token closes its document
                doc, pos = doc + 1, 0
        for q in range(40):
            for k in range(40):
                assert mask[b, q, k] == (docs[q] == docs[k])


def test_missing_bible_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shutil.which", lambda _: None)
    with pytest.raises(bible.BibleNotInstalledError, match="apt-get install -y bible-kjv-text"):
        bible.load_bible_chapters()


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--cooldown-fraction", "0", "--cooldown-fraction must be in (0, 1]"),
        ("--cooldown-fraction", "1.5", "--cooldown-fraction must be in (0, 1]"),
        ("--d-mlp", "0", "--d-mlp must be a positive whole number"),
    ],
)
def test_training_script_rejects_bad_settings_before_training(
    flag: str, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from tdb.demo.train import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--out", "unused", flag, value])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
