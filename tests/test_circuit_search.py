"""`tdb circuit` / `tdb.circuit.find_circuit`: the faithfulness it reports is a real patching
measurement (checked against a whole forward pass with every other component patched by hand),
the search reaches its target, the CLI, its files and its errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from checkpoints import make_checkpoint
from transformers import GPT2LMHeadModel

from tdb.activation_cache import RunResult
from tdb.attribution import task_records
from tdb.attribution.components import ComponentKind, sites
from tdb.attribution.run import Reference, Runner, as_dataset
from tdb.checkpoint import LoadedModel, load_model
from tdb.circuit import find_circuit
from tdb.circuit.search import Evaluator
from tdb.cli import main
from tdb.errors import TdbError
from tdb.hooks import HookPoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[GPT2LMHeadModel, LoadedModel]:
    directory = tmp_path_factory.mktemp("circuit-gpt2")
    hf = make_checkpoint(directory, n_layer=2, n_embd=32, n_head=4, with_tokenizer=False)
    return hf, load_model(directory)


def records(n: int, seed: int = 0) -> list[dict[str, object]]:
    rng = random.Random(seed)
    out: list[dict[str, object]] = []
    for i in range(n):
        prompt = [rng.randrange(1, 100) for _ in range(rng.randint(6, 9))]
        corrupted = list(prompt)
        corrupted[rng.randrange(len(prompt))] = rng.randrange(1, 100)
        out.append(
            {
                "prompt_ids": prompt,
                "corrupted_ids": corrupted,
                "target_ids": [11 + i % 3],
                "distractor_ids": [15],
            }
        )
    return out


def patched_by_hand(
    loaded: LoadedModel, recs: list[dict[str, object]], keep: set[str], neurons_too: bool = True
) -> float:
    """Mean metric with every head (and neuron) not in `keep` replaced by its corrupted value,
    prompt by prompt, in a whole forward pass."""
    total = 0.0
    for r in recs:
        clean = r.get("prompt_ids", r.get("prompt"))
        corrupted = r.get("corrupted_ids", r.get("corrupted"))
        source = loaded.run(corrupted, cache=["attn_z", "mlp_post"])  # type: ignore[arg-type]

        def heads(x: torch.Tensor, layer: int | None, source: RunResult = source) -> torch.Tensor:
            x = x.clone()
            for h in range(x.shape[2]):
                if f"h{layer}.{h}" not in keep:
                    x[:, :, h] = source.cache["attn_z", layer][:, :, h]  # type: ignore[index]
            return x

        def neurons(x: torch.Tensor, layer: int | None, source: RunResult = source) -> torch.Tensor:
            x = x.clone()
            for n in range(x.shape[2]):
                if f"n{layer}.{n}" not in keep:
                    x[:, :, n] = source.cache["mlp_post", layer][:, :, n]  # type: ignore[index]
            return x

        hooks = {"attn_z": heads, "mlp_post": neurons} if neurons_too else {"attn_z": heads}
        if isinstance(clean, str):
            clean = loaded.tokenizer.encode(clean)
        logits = loaded.run([clean], hooks=hooks).last_logits[0]  # type: ignore[arg-type, list-item]
        target, distractor = r.get("target_ids", [None])[0], r.get("distractor_ids", [None])[0]  # type: ignore[index]
        if target is None:
            target = loaded.tokenizer.encode(str(r["target"]))[0]
            distractor = loaded.tokenizer.encode(str(r["distractor"]))[0]
        total += float(logits[target] - logits[distractor])
    return total / len(recs)


def test_measured_metric_equals_patching_by_hand(
    tiny: tuple[GPT2LMHeadModel, LoadedModel],
) -> None:
    _, loaded = tiny
    recs = records(5)
    kinds = [ComponentKind.HEADS, ComponentKind.NEURONS]
    site_list = sites(loaded.model.config, kinds, [])
    data = as_dataset(loaded, recs)
    evaluator = Evaluator(
        Runner(loaded, [], False), data, site_list, Reference.CORRUPTED, 2, torch.device("cpu")
    )
    head = (HookPoint.ATTN_Z, 1)
    neuron = (HookPoint.MLP_POST, 0)
    circuits = [frozenset(), frozenset({(head, 2)}), frozenset({(head, 2), (neuron, 17)})]
    every = frozenset((s.key, i) for s in site_list for i in range(s.size))
    measured = evaluator.metric([*circuits, every])
    expected = [
        patched_by_hand(loaded, recs, set()),
        patched_by_hand(loaded, recs, {"h1.2"}),
        patched_by_hand(loaded, recs, {"h1.2", "n0.17"}),
    ]
    for got, want in zip(measured, expected, strict=False):
        assert got == pytest.approx(want, abs=1e-4)
    assert measured[-1] == pytest.approx(evaluator.clean, abs=1e-5)  # nothing patched


@pytest.mark.slow  # a search over the demo model's heads: about 20 s
def test_find_circuit_reaches_its_target_and_reports_it_honestly(demo: LoadedModel) -> None:
    recs = task_records("ioi", 6, 3, demo.tokenizer)
    circuit = find_circuit(
        demo, recs, components="heads", target_faithfulness=0.7, max_components=20, max_edges=0
    )
    assert circuit.faithfulness >= 0.7
    assert 1 <= len(circuit.components) <= 20
    by_hand = patched_by_hand(demo, recs, set(circuit.components), neurons_too=False)
    assert circuit.m_circuit == pytest.approx(by_hand, abs=1e-3)
    empty = patched_by_hand(demo, recs, set(), neurons_too=False)
    assert circuit.m_empty == pytest.approx(empty, abs=1e-3)
    sizes = [p.n for p in circuit.curve]
    assert sizes == sorted(sizes) and sizes[-1] == 20
    assert all(abs(p.random) < 0.5 for p in circuit.curve[:3])
    doc = circuit.to_json()
    assert set(doc) >= {"components", "faithfulness", "curve", "edges", "m_full", "m_empty"}
    assert doc["faithfulness"] == pytest.approx(
        (circuit.m_circuit - circuit.m_empty) / (circuit.clean - circuit.m_empty)
    )
    assert all(set(p) == {"n", "faithfulness", "random"} for p in doc["curve"])  # type: ignore[union-attr]


def test_find_circuit_bad_input(tiny: tuple[GPT2LMHeadModel, LoadedModel]) -> None:
    _, loaded = tiny
    recs = records(2)
    for kwargs, message in [
        ({"max_components": 0}, "--max-components"),
        ({"target_faithfulness": 0.0}, r"--target-faithfulness: must be in \(0, 1\]"),
        ({"target_faithfulness": 1.5}, "--target-faithfulness"),
        ({"method": "magic"}, "--method"),
        ({"max_edges": -1}, "--max-edges"),
    ]:
        with pytest.raises(TdbError, match=message):
            find_circuit(loaded, recs, **kwargs)  # type: ignore[arg-type]
    no_reference = [{k: v for k, v in r.items() if k != "corrupted_ids"} for r in recs]
    with pytest.raises(TdbError, match="line 1: no 'corrupted'"):
        find_circuit(loaded, no_reference, ablation="corrupted")


@pytest.mark.slow  # two searches over the demo model's heads
def test_cli_circuit_json_and_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], demo: LoadedModel
) -> None:
    data = tmp_path / "ioi.jsonl"
    data.write_text(
        "".join(json.dumps(r) + "\n" for r in task_records("ioi", 6, 0, demo.tokenizer))
    )
    out = tmp_path / "figures"
    argv = ["circuit", str(data), "--max-components", "24", "--components", "heads", "--quiet"]
    assert main([*argv, "--json", "--out", str(out), "--max-edges", "5"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["n_prompts"] == 6 and doc["components"] and doc["faithfulness"] >= 0.8
    assert {p.name for p in out.iterdir()} == {
        "circuit.json",
        "circuit.svg",
        "curve.svg",
        "curve.png",
    }
    assert json.loads((out / "circuit.json").read_text()) == doc
    assert (out / "curve.png").read_bytes().startswith(b"\x89PNG")
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "faithfulness" in text and "random" in text


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--max-components", "0"], "--max-components: must be >= 1"),
        (["--target-faithfulness", "1.5"], "--target-faithfulness: must be in (0, 1]"),
        (["--target-faithfulness", "x"], "--target-faithfulness: 'x' is not a number"),
        (["--method", "magic"], "--method"),
        (["--ablation", "corrupted", "--logprob"], "line 1: no 'corrupted'"),
    ],
)
def test_cli_circuit_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"prompt": "When Mary and John went", "target": " Mary"}) + "\n")
    assert main(["circuit", str(data), *extra]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and message in err, err
