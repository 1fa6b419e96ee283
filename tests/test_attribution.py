"""Task-level attribution (`tdb attribute`, `tdb.attribution`): exact patching against the naive
model of tests/reference.py, the estimators against their definitions, datasets and their
errors, the CLI and its JSON document."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from checkpoints import make_checkpoint
from reference import Reference, naive_run
from transformers import GPT2LMHeadModel

from tdb.attribution import attribution, task_records
from tdb.attribution.dataset import parse_lines
from tdb.checkpoint import LoadedModel, load_model
from tdb.cli import main
from tdb.errors import TdbError
from tdb.hooks import HookPoint, Hooks
from tdb.latents import attach
from tdb.sae import load_saes

N_LAYER, N_HEAD, D_MLP = 2, 4, 128


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[GPT2LMHeadModel, LoadedModel]:
    directory = tmp_path_factory.mktemp("attribution-gpt2")
    hf = make_checkpoint(directory, n_layer=N_LAYER, n_embd=32, n_head=N_HEAD, with_tokenizer=False)
    return hf, load_model(directory)


def tiny_records(n: int, length: int | None = None, seed: int = 0) -> list[dict[str, object]]:
    """Random prompt pairs of token ids: the corrupted twin changes two tokens."""
    rng = random.Random(seed)
    out: list[dict[str, object]] = []
    for i in range(n):
        size = length or rng.randint(6, 10)
        prompt = [rng.randrange(1, 100) for _ in range(size)]
        corrupted = list(prompt)
        for p in rng.sample(range(size), 2):
            corrupted[p] = rng.randrange(1, 100)
        out.append(
            {
                "prompt_ids": prompt,
                "corrupted_ids": corrupted,
                "target_ids": [11 + i % 3],
                "distractor_ids": [12 + i % 5],
            }
        )
    return out


def naive_score(
    hf: GPT2LMHeadModel, records: list[dict[str, object]], kind: str, layer: int, index: int
) -> float:
    """Mean over prompts of m(clean) - m(clean with one head or neuron from the corrupted run),
    patched in the naive model."""
    total = 0.0
    for r in records:
        tokens, corrupted = list(r["prompt_ids"]), list(r["corrupted_ids"])  # type: ignore[call-overload]
        target, distractor = r["target_ids"][0], r["distractor_ids"][0]  # type: ignore[index]
        last = len(tokens) - 1
        source = naive_run(hf, corrupted, last, target, distractor)
        clean = naive_run(hf, tokens, last, target, distractor)

        def edit(
            name: str, at: int | None, head: int | None, x: torch.Tensor, source: Reference = source
        ) -> torch.Tensor:
            if kind == "head" and name == "head_out" and at == layer and head == index:
                return source.head_writes[layer][index].sum(dim=1)
            if kind == "neuron" and name == "post" and at == layer:
                x = x.clone()
                x[:, index] = source.post[layer][:, index]
            return x

        patched = naive_run(hf, tokens, last, target, distractor, edit=edit)
        total += clean.value - patched.value
    return total / len(records)


def scores(result: object, method: str) -> dict[str, float]:
    return {
        row.id: row.scores[method]  # type: ignore[attr-defined]
        for row in result.rows  # type: ignore[attr-defined]
    }


def test_exact_agrees_with_the_naive_model(tiny: tuple[GPT2LMHeadModel, LoadedModel]) -> None:
    hf, loaded = tiny
    records = tiny_records(6)
    result = attribution(loaded, records, methods=["exact"], batch_size=4)
    exact = scores(result, "exact")
    assert len(exact) == N_LAYER * (N_HEAD + D_MLP)
    for kind, layer, index in [("head", 0, 1), ("head", 1, 3), ("neuron", 0, 7), ("neuron", 1, 50)]:
        component = f"{'h' if kind == 'head' else 'n'}{layer}.{index}"
        expected = naive_score(hf, records, kind, layer, index)
        assert exact[component] == pytest.approx(expected, abs=1e-4), component


def test_atp_is_activation_difference_times_gradient(
    tiny: tuple[GPT2LMHeadModel, LoadedModel],
) -> None:
    """AtP from the naive model's autograd: (post_clean - post_corrupted) . d m / d post."""
    hf, loaded = tiny
    records = tiny_records(3)
    atp = scores(attribution(loaded, records, methods=["atp"], components="neurons"), "atp")
    expected: dict[str, float] = {}
    for r in records:
        tokens, corrupted = list(r["prompt_ids"]), list(r["corrupted_ids"])  # type: ignore[call-overload]
        target, distractor = r["target_ids"][0], r["distractor_ids"][0]  # type: ignore[index]
        last = len(tokens) - 1

        def read(
            state: dict[str, object],
            last: int = last,
            target: int = target,
            distractor: int = distractor,
        ) -> torch.Tensor:  # m with the live final norm
            x = state["final"][last]  # type: ignore[index]
            sd = state["sd"]
            logits = (
                torch.nn.functional.layer_norm(
                    x, (x.shape[-1],), sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"]
                )
                @ sd["transformer.wte.weight"].T
            )  # type: ignore[index]
            return logits[target] - logits[distractor]

        clean = naive_run(hf, tokens, last, target, distractor, read=read)
        source = naive_run(hf, corrupted, last, target, distractor)
        for layer in range(N_LAYER):
            per_neuron = ((clean.post[layer] - source.post[layer]) * clean.post_grad[layer]).sum(0)
            for n in (3, 40, 99):
                key = f"n{layer}.{n}"
                expected[key] = expected.get(key, 0.0) + float(per_neuron[n]) / len(records)
    for key, value in expected.items():
        assert atp[key] == pytest.approx(value, abs=1e-4), key


def test_estimates_approach_exact_for_small_changes(
    tiny: tuple[GPT2LMHeadModel, LoadedModel],
) -> None:
    """With corrupted prompts equal to the clean ones every score is 0; on a small random model,
    whose components barely interact, the estimators agree with exact patching."""
    _, loaded = tiny
    same = [dict(r, corrupted_ids=r["prompt_ids"]) for r in tiny_records(3)]
    result = attribution(loaded, same, methods=["exact", "atp", "atp*", "ig"])
    for row in result.rows:
        assert all(abs(v or 0.0) < 1e-5 for v in row.scores.values())
    result = attribution(loaded, tiny_records(8), methods=["exact", "atp", "atp*", "ig"])
    for method in ("atp", "atp*", "ig"):
        exact = torch.tensor([r.scores["exact"] for r in result.rows])
        estimate = torch.tensor([r.scores[method] for r in result.rows])
        assert torch.corrcoef(torch.stack([exact, estimate]))[0, 1] > 0.95, method


def test_by_position_sums_to_by_component_for_linear_estimates(
    tiny: tuple[GPT2LMHeadModel, LoadedModel],
) -> None:
    _, loaded = tiny
    records = tiny_records(4, length=8)
    whole = attribution(loaded, records, methods=["atp", "exact"], components="heads")
    per_position = attribution(
        loaded, records, methods=["atp", "exact"], components="heads", by="position"
    )
    assert len(per_position.rows) == 8 * len(whole.rows)
    sums: dict[str, float] = {}
    for row in per_position.rows:
        assert row.position is not None and row.id.endswith(f"@{row.position}")
        sums[row.component.id] = sums.get(row.component.id, 0.0) + row.scores["atp"]  # type: ignore[operator]
    for row in whole.rows:
        assert sums[row.id] == pytest.approx(row.scores["atp"], abs=1e-5)
    # exact at one position: the naive model with the head replaced at that query only
    with pytest.raises(TdbError, match="--by position: the prompts must have one token count"):
        attribution(loaded, tiny_records(4), by="position")


def test_verify_adds_exact_for_the_top_n(tiny: tuple[GPT2LMHeadModel, LoadedModel]) -> None:
    _, loaded = tiny
    records = tiny_records(4)
    exact = scores(attribution(loaded, records, methods=["exact"]), "exact")
    result = attribution(loaded, records, methods=["atp"], verify=5)
    assert result.methods == ("atp", "exact")
    verified = [r for r in result.rows if r.scores["exact"] is not None]
    assert [r.id for r in verified] == [r.id for r in result.rows[:5]]
    for row in verified:
        assert row.scores["exact"] == pytest.approx(exact[row.id], abs=1e-5)
    top = attribution(loaded, records, methods=["atp"], k=3)
    assert [r.id for r in top.rows] == [r.id for r in result.rows[:3]]


def test_mean_ablation_replaces_by_the_dataset_mean(
    tiny: tuple[GPT2LMHeadModel, LoadedModel],
) -> None:
    hf, loaded = tiny
    records = [{k: v for k, v in r.items() if k != "corrupted_ids"} for r in tiny_records(3)]
    result = attribution(loaded, records, methods=["exact"], components="neurons")
    assert result.reference == "mean" and result.corrupted is None
    posts = [
        naive_run(hf, list(r["prompt_ids"]), 0, 1, 2).post[1][:, 9]  # type: ignore[call-overload]
        for r in records
    ]
    mean = torch.cat(posts).mean()
    total = 0.0
    for r in records:
        tokens = list(r["prompt_ids"])  # type: ignore[call-overload]
        t, d = r["target_ids"][0], r["distractor_ids"][0]  # type: ignore[index]

        def edit(name: str, at: int | None, head: int | None, x: torch.Tensor) -> torch.Tensor:
            if name == "post" and at == 1:
                x = x.clone()
                x[:, 9] = mean
            return x

        clean = naive_run(hf, tokens, len(tokens) - 1, t, d)
        patched = naive_run(hf, tokens, len(tokens) - 1, t, d, edit=edit)
        total += clean.value - patched.value
    assert scores(result, "exact")["n1.9"] == pytest.approx(total / len(records), abs=1e-4)


def test_latents_exact_matches_a_hooked_patch(demo: LoadedModel) -> None:
    records = task_records("ioi", n=4, seed=1, tokenizer=demo.tokenizer)
    result = attribution(demo, records, methods=["exact", "atp"], components="latents", k=3)
    saes = load_saes(Path("tdb/demo/sae"))
    top = result.rows[0]
    attached = next(
        a for a in saes if a.layer == top.component.layer and a.site == top.component.site
    )
    point = attached.site.latent_point
    total = 0.0
    kept: dict[str, torch.Tensor] = {}
    for r in records:
        clean, corrupted = (demo.tokenizer.encode(r[f]) for f in ("prompt", "corrupted"))  # type: ignore[arg-type]
        t, d = (demo.tokenizer.encode(r[f])[0] for f in ("target", "distractor"))  # type: ignore[arg-type]
        kept.clear()

        def keep(x: torch.Tensor, layer: int | None) -> None:
            if layer == attached.layer:
                kept["z"] = x.detach().clone()

        def swap(x: torch.Tensor, layer: int | None) -> torch.Tensor | None:
            if layer != attached.layer:
                return None
            x = x.clone()
            x[..., top.component.index] = kept["z"][..., top.component.index]
            return x

        def m(tokens: list[int], fn: object, t: int = t, d: int = d) -> float:
            hooks = attach([attached], Hooks({point: fn}))  # type: ignore[dict-item]
            with torch.no_grad():
                logits = demo.model(torch.tensor([tokens]), hooks=hooks)
            return float(logits[0, -1, t] - logits[0, -1, d])

        m(corrupted, keep)
        total += m(clean, lambda x, layer: None) - m(clean, swap)
    assert top.scores["exact"] == pytest.approx(total / len(records), abs=1e-3)
    assert top.component.node_type.value == "autoencoder_latent" and top.id.startswith("a")
    assert HookPoint(point)  # the latent point is a hook point


def test_bfloat16_agrees_with_float32(tiny: tuple[GPT2LMHeadModel, LoadedModel]) -> None:
    _, loaded = tiny
    records = tiny_records(4)
    full = attribution(loaded, records, methods=["exact", "atp*", "ig"], components="heads")
    half = LoadedModel(
        loaded.model.to(torch.bfloat16),
        loaded.tokenizer,
        loaded.name,
        loaded.path,  # type: ignore[arg-type]
    )
    try:
        low = attribution(half, records, methods=["exact", "atp*", "ig"], components="heads")
    finally:
        loaded.model.to(torch.float32)  # type: ignore[attr-defined]
    by_id = {r.id: r for r in low.rows}
    scale = max(abs(r.scores["exact"] or 0.0) for r in full.rows)
    for row in full.rows:
        for method in ("exact", "atp*", "ig"):
            got, want = by_id[row.id].scores[method], row.scores[method]
            assert got is not None and want is not None
            assert abs(got - want) < 0.05 * scale + 0.02, (row.id, method)


# --- datasets ---------------------------------------------------------------------------------


BAD_LINES = [
    ([], "the dataset is empty"),
    (["{not json"], "line 1: not JSON"),
    (['{"prompt": "a b"}'], "line 1: missing 'target'"),
    (['{"prompt": "When Mary", "target": " Mary Ann", "distractor": " John"}'], "line 1: target"),
    (
        ['{"prompt": "When Mary went", "corrupted": "When", "target": " Mary"}'],
        "line 1: corrupted has 1 tokens, prompt has 3",
    ),
    (['{"prompt": "a", "prompt_ids": [1], "target": " a"}'], "give prompt or prompt_ids"),
    (['{"prompt": "a", "target": " a", "distracter": " b"}'], "unknown field 'distracter'"),
    (['{"prompt_ids": [1, -4], "target_ids": [2]}'], "outside the vocabulary"),
    (["", '{"prompt": "a", "target": " a"}', "[1, 2]"], "line 3: expected a JSON object"),
]


@pytest.mark.parametrize(("lines", "message"), BAD_LINES)
def test_bad_datasets_name_the_line(demo: LoadedModel, lines: list[str], message: str) -> None:
    with pytest.raises(TdbError, match=message.replace("(", r"\(")):
        parse_lines(lines, demo.tokenizer, demo.model.config.n_ctx, "data.jsonl")


def test_tasks_are_seeded_pairs_of_one_token_count(demo: LoadedModel) -> None:
    for task in ("ioi", "induction", "capitals"):
        records = task_records(task, n=12, seed=3, tokenizer=demo.tokenizer)
        assert records == task_records(task, n=12, seed=3, tokenizer=demo.tokenizer)
        assert records != task_records(task, n=12, seed=4, tokenizer=demo.tokenizer)
        dataset = parse_lines(
            [json.dumps(r) for r in records], demo.tokenizer, demo.model.config.n_ctx, task
        )
        assert len(dataset) == 12
        for pair in dataset.pairs:
            assert pair.corrupted is not None and len(pair.corrupted) == len(pair.tokens)
            assert pair.corrupted != pair.tokens and pair.target != pair.distractor
    ioi = task_records("ioi", n=4, seed=0, tokenizer=demo.tokenizer)[0]
    assert str(ioi["target"]).strip() in str(ioi["prompt"])


def test_demo_behaviours_are_present_on_the_tasks(demo: LoadedModel) -> None:
    """The clean metric is large and the corrupted one small: something to attribute."""
    for task in ("ioi", "induction", "capitals"):
        records = task_records(task, n=8, seed=0, tokenizer=demo.tokenizer)
        result = attribution(demo, records, methods=["atp"], components="heads")
        assert result.corrupted is not None
        assert result.clean > 3.0 and result.clean - result.corrupted > 3.0, task


# --- the command line -------------------------------------------------------------------------


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_task_then_attribute_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["task", "ioi", "--n", "4", "--seed", "1"], capsys)
    assert code == 0 and len(out.splitlines()) == 4
    path = tmp_path / "ioi.jsonl"
    path.write_text(out)
    code, out, err = run_cli(
        ["attribute", str(path), "--method", "exact", "--method", "atp*", "--json", "--quiet"],
        capsys,
    )
    assert code == 0, err
    doc = json.loads(out)
    assert set(doc) >= {"metric", "n_prompts", "methods", "ablation", "by", "components"}
    assert doc["metric"]["kind"] == "logit_diff" and doc["n_prompts"] == 4
    assert doc["methods"] == ["exact", "atp*"] and doc["ablation"] == "corrupted"
    assert len(doc["components"]) == 3 * 8 + 3 * 512
    first = doc["components"][0]
    assert set(first) >= {"id", "node_type", "layer", "index", "scores"}
    assert set(first["scores"]) == {"exact", "atp*"}
    magnitudes = [abs(c["scores"]["exact"]) for c in doc["components"]]
    assert magnitudes == sorted(magnitudes, reverse=True)
    code, out, err = run_cli(["attribute", str(path), "-k", "5", "--components", "heads"], capsys)
    assert code == 0 and "h2.1" in out and "ig" in out, err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["attribute", "missing.jsonl"], "dataset 'missing.jsonl': no such file"),
        (["attribute", "{data}", "--method", "magic"], "--method"),
        (["attribute", "{data}", "--components", "heads,layers"], "--components"),
        (["attribute", "{data}", "--ablation", "noise"], "--ablation"),
        (["attribute", "{data}", "--by", "token"], "--by"),
        (["attribute", "{data}", "-k", "0"], "-k: must be >= 1"),
        (["attribute", "{data}", "--ig-steps", "x"], "--ig-steps"),
        (["attribute", "{empty}"], "the dataset is empty"),
        (["attribute", "{data}", "--ablation", "corrupted", "--logprob"], "line 1: no 'corrupted'"),
        (["task", "greater-than"], "task"),
        (["task", "ioi", "--n", "0"], "--n: must be >= 1"),
    ],
)
def test_cli_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"prompt": "When Mary and John went", "target": " Mary"}) + "\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    argv = [a.format(data=data, empty=empty) for a in argv]
    code, out, err = run_cli(argv, capsys)
    assert code == 2 and out == ""
    assert err.startswith("tdb: error: ") and err.count("\n") == 1 and message in err, err
