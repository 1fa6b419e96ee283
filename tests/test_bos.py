"""BOS tokens: a text prompt starts with what the tokenizer's post-processor puts before a text,
exactly as transformers' `AutoTokenizer` does (compared on tokenizer files built here), never
for targets and distractors; `--bos / --no-bos` and the HTTP `bos` field override; the demo
model adds none."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, processors
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from tdb.attribution.dataset import dataset_from_records
from tdb.checkpoint import LoadedModel, load_model
from tdb.cli import main
from tdb.errors import TdbError
from tdb.server.app import create_app
from tdb.table import node_table
from tdb.tokens import Tokenizer

WORDS = ["<unk>", "<s>", "</s>", "When", "Mary", "and", "John", "went", "to", "the", "store"]
VOCAB = {w: i for i, w in enumerate(WORDS)}
TEXT = "When Mary and John went to the store"
BOS_ONLY = processors.TemplateProcessing(
    single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
)
BOS_AND_EOS = processors.TemplateProcessing(
    single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)]
)
POST_PROCESSORS = {
    "none": None,
    "bos": BOS_ONLY,
    "bos-eos": BOS_AND_EOS,
    "bytelevel": processors.ByteLevel(trim_offsets=False),  # GPT-2's: adds no token
}


def save_tokenizer(
    directory: Path, post: processors.PostProcessor | None, config: dict[str, object] | None
) -> Path:
    """A word-level tokenizer.json (and optionally a tokenizer_config.json) in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = HFTokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(["<unk>", "<s>", "</s>"])
    if post is not None:
        tokenizer.post_processor = post
    tokenizer.save(str(directory / "tokenizer.json"))
    if config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


CONFIGS = {
    "no-config": None,
    "add_bos_token-true": {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True},
    "add_bos_token-false": {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": False},
}


@pytest.mark.parametrize("config", CONFIGS, ids=list(CONFIGS))
@pytest.mark.parametrize("post", POST_PROCESSORS, ids=list(POST_PROCESSORS))
def test_prompt_ids_match_transformers(tmp_path: Path, post: str, config: str) -> None:
    directory = save_tokenizer(tmp_path, POST_PROCESSORS[post], CONFIGS[config])
    expected = AutoTokenizer.from_pretrained(directory)(TEXT).input_ids
    if post == "bos-eos":  # a prompt is continued, not ended: tdb keeps the BOS, drops the EOS
        assert expected[-1] == VOCAB["</s>"]
        expected = expected[:-1]
    tokenizer = Tokenizer.from_dir(directory, d_vocab=len(WORDS))
    assert tokenizer.prompt_ids(TEXT, n_ctx=64) == expected
    plain = AutoTokenizer.from_pretrained(directory)(TEXT, add_special_tokens=False).input_ids
    assert tokenizer.prompt_ids(TEXT, n_ctx=64, bos=False) == plain
    assert tokenizer.encode(" Mary") == [VOCAB["Mary"]]  # targets: never a BOS
    assert tokenizer.bos == ((VOCAB["<s>"],) if post.startswith("bos-") or post == "bos" else ())


def test_bos_override_and_its_errors(tmp_path: Path) -> None:
    with_bos = Tokenizer.from_dir(save_tokenizer(tmp_path / "a", BOS_ONLY, None), len(WORDS))
    without = Tokenizer.from_dir(save_tokenizer(tmp_path / "b", None, None), len(WORDS))
    assert with_bos.prompt_ids(TEXT, 64, bos=True) == with_bos.prompt_ids(TEXT, 64)
    assert with_bos.prompt_ids([3, 4], 64, bos=True) == [3, 4]  # ids are taken as given
    with pytest.raises(TdbError, match="--bos: this tokenizer adds no BOS token"):
        without.prompt_ids(TEXT, 64, bos=True)
    with pytest.raises(TdbError, match="longer than the model's 8"):
        with_bos.prompt_ids(TEXT, 8)  # 8 words + the BOS


@pytest.fixture(scope="module")
def llama_with_bos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Llama whose tokenizer starts every text with `<s>`."""
    directory = tmp_path_factory.mktemp("llama-bos")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(WORDS), hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, num_hidden_layers=2, max_position_embeddings=64,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(directory)
    save_tokenizer(directory, BOS_ONLY, {"bos_token": "<s>", "add_bos_token": True})
    return directory


def test_the_table_shows_the_bos_as_token_0(llama_with_bos: Path) -> None:
    loaded = load_model(llama_with_bos)
    table = node_table(loaded, TEXT, " Mary", " John", k=3)
    assert table.tokens == [VOCAB[w] for w in ["<s>", *TEXT.split()]]
    assert table.token_texts[0] == "<s>"
    assert table.direction.position == len(TEXT.split())  # the last token, BOS counted
    assert table.direction.to_json()["target_ids"] == [VOCAB["Mary"]]
    no_bos = node_table(loaded, TEXT, " Mary", " John", k=3, bos=False)
    assert no_bos.tokens == table.tokens[1:]
    # The BOS is a node position like any other: the same run as the ids given with it.
    by_ids = node_table(loaded, table.tokens, " Mary", " John", k=3)
    assert by_ids.to_json() == table.to_json()


def test_cli_bos_flags(llama_with_bos: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["nodes", TEXT, "--target", " Mary", "--distractor", " John", "-k", "2", "--json"]
    args += ["--model", str(llama_with_bos)]
    tokens = []
    for flag in ([], ["--bos"], ["--no-bos"]):
        assert main([*args, *flag]) == 0
        tokens.append([t["id"] for t in json.loads(capsys.readouterr().out)["tokens"]])
    assert tokens[0] == tokens[1] == [VOCAB["<s>"], *tokens[2]]


def test_cli_bos_without_a_bos_token_is_a_one_line_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["nodes", "When Mary and John", "--target", " Mary", "--distractor", " John"]
    assert main([*args, "--bos"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--bos: this tokenizer adds no BOS token" in err and "\n" not in err


def test_the_demo_model_adds_no_bos(demo: LoadedModel) -> None:
    assert demo.tokenizer.bos == ()
    prompt = "When Mary and John went to the store, John gave a drink to"
    assert demo.tokenizer.prompt_ids(prompt, 128) == demo.tokenizer.encode(prompt)


def test_http_bos_field(llama_with_bos: Path) -> None:
    request = {"prompt": TEXT, "target": " Mary", "distractor": " John", "k": 2}
    with TestClient(create_app(load_model(llama_with_bos)), base_url="http://localhost") as c:
        default = c.post("/api/nodes", json=request).json()
        off = c.post("/api/nodes", json=request | {"bos": False}).json()
        on = c.post("/api/nodes", json=request | {"bos": True}).json()
    ids = [[t["id"] for t in out["tokens"]] for out in (default, on, off)]
    assert ids[0] == ids[1] == [VOCAB["<s>"], *ids[2]]


def test_loaded_run_starts_text_with_the_bos(llama_with_bos: Path) -> None:
    loaded = load_model(llama_with_bos)
    result = loaded.run([TEXT, "Mary and John"])
    assert result.tokens[0].tolist() == [VOCAB[w] for w in ["<s>", *TEXT.split()]]
    assert result.tokens[1, :4].tolist() == [VOCAB[w] for w in ["<s>", "Mary", "and", "John"]]
    assert loaded.run([[3, 4]]).tokens.tolist() == [[3, 4]]  # ids as given


def test_dataset_text_prompts_start_with_the_bos(llama_with_bos: Path) -> None:
    """Task-level attribution tokenizes a text prompt (and its corrupted twin) as the node table
    does: the BOS first; token-id prompts and the answers are taken as they are."""
    loaded = load_model(llama_with_bos)
    record = {"prompt": "Mary and John", "corrupted": "John and Mary", "target": "Mary"}
    pair = dataset_from_records([record], loaded.tokenizer, 64).pairs[0]
    assert list(pair.tokens) == loaded.tokenizer.prompt_ids("Mary and John", 64)
    assert pair.tokens[0] == VOCAB["<s>"] and pair.corrupted is not None
    assert pair.corrupted[0] == VOCAB["<s>"] and pair.target == (VOCAB["Mary"],)
    by_ids = {"prompt_ids": [VOCAB["Mary"], VOCAB["and"]], "target": "Mary"}
    assert dataset_from_records([by_ids], loaded.tokenizer, 64).pairs[0].tokens == (
        VOCAB["Mary"],
        VOCAB["and"],
    )
