"""Devices, dtypes and device maps: parity with transformers in bfloat16 and float16 on every
architecture, the node table in those dtypes against float32, a device map that names the CPU
for every layer against no map, the options' errors, loading memory, Ray's GPU options, and
(marked `cuda`, skipped without a GPU) the same on CUDA."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from checkpoints import make_checkpoint as make_gpt2
from test_architectures import make_checkpoint as make_rotary
from test_architectures import one_thread  # noqa: F401  (autouse: these models run on one thread)
from transformers import PreTrainedModel

from tdb.capture import capture
from tdb.checkpoint import LoadedModel, load_model
from tdb.cli import main
from tdb.device import Placement, devices_from_plan, parse_layer_list
from tdb.direction import LogitDiff
from tdb.errors import TdbError
from tdb.metrics import ALL_GROUPS, Group
from tdb.nodes import NodeType
from tdb.scan.ray_executor import actor_options
from tdb.scan.shard import ScanSettings

# One shape per architecture tdb loads (GPT-2 from tests/checkpoints.py, the rest as in
# tests/test_architectures.py).
SHAPES: dict[str, dict[str, object]] = {
    "gpt2": {},
    "llama": {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2},
    "qwen2": {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2},
    "mistral": {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
                "sliding_window": 4},
    "gemma": {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 1,
              "head_dim": 16},
    "gpt_neox": {"hidden_size": 32, "num_attention_heads": 4},
}  # fmt: skip
HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# Documented in docs/performance.md ("dtypes"): the largest logit difference from transformers
# run in the same dtype, relative to the largest |logit|; and how far the half-precision node
# table's values may be from float32's, relative to the largest |value| of that metric over all
# nodes (act_times_grad: through a backward pass in that dtype). Measured maxima over these
# shapes: logits 0.038 (bfloat16) and 0.0042 (float16); table 0.048, act_times_grad 0.139
# (Gemma), and 0.0057 (float16).
LOGIT_TOLERANCE = {"bfloat16": 0.05, "float16": 0.01}
TABLE_TOLERANCE = {"bfloat16": 0.07, "float16": 0.01}
GRADIENT_TOLERANCE = {"bfloat16": 0.2, "float16": 0.01}
TOKENS = [5, 17, 99, 150, 3, 17, 42, 8, 77, 5, 120]
TARGET, DISTRACTOR = 11, 12
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def save_in(directory: Path, arch: str, dtype: torch.dtype) -> PreTrainedModel:
    """A random checkpoint of `arch` saved in `dtype`, and the transformers model in that dtype
    with eager attention (softmax in float32, as tdb computes it)."""
    if arch == "gpt2":
        model = make_gpt2(directory / "f32", vocab_size=400)
    else:
        model = make_rotary(directory / "f32", arch, **SHAPES[arch])
    model = model.to(dtype)
    model.config._attn_implementation = "eager"
    model.save_pretrained(directory / "half")
    return model


@pytest.fixture(scope="module", params=[(a, d) for a in SHAPES for d in HALF], ids=str)
def half(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, str, PreTrainedModel, Path]:
    arch, dtype = request.param
    directory = tmp_path_factory.mktemp(f"{arch}-{dtype}")
    return arch, dtype, save_in(directory, arch, HALF[dtype]), directory


def test_logits_match_transformers_in_the_same_dtype(
    half: tuple[str, str, PreTrainedModel, Path],
) -> None:
    _, dtype, reference, directory = half
    loaded = load_model(directory / "half", dtype=dtype)
    model = loaded.model
    assert loaded.placement.dtype == HALF[dtype] and model.unembed.dtype == HALF[dtype]
    tokens = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(tokens).logits.float()
        ours = model(tokens).float()
    scale = expected.abs().max().item()
    assert (ours - expected).abs().max().item() <= LOGIT_TOLERANCE[dtype] * scale
    # And well away from float32's answer would be a sign of a cast in the wrong place: the
    # same logits within the tolerance of the float32 model too.
    full = load_model(directory / "f32").model
    with torch.no_grad():
        exact = full(tokens)
    assert (ours - exact).abs().max().item() <= 2 * LOGIT_TOLERANCE[dtype] * scale


def test_node_table_top_nodes_match_float32(half: tuple[str, str, PreTrainedModel, Path]) -> None:
    """Every metric's top nodes in half precision are float32's top nodes (up to ties within
    the tolerance), with float32's values within the tolerance."""
    _, dtype, _, directory = half
    direction = LogitDiff((TARGET,), (DISTRACTOR,), len(TOKENS) - 1)
    ours = capture(load_model(directory / "half", dtype=dtype).model, torch.tensor(TOKENS),
                   direction, ALL_GROUPS)  # fmt: skip
    exact = capture(
        load_model(directory / "f32").model, torch.tensor(TOKENS), direction, ALL_GROUPS
    )
    assert ours.direction_value == pytest.approx(exact.direction_value, abs=0.1, rel=0.05)
    k = 5
    for group in ALL_GROUPS:
        for node_type in (NodeType.ATTENTION_HEAD, NodeType.MLP_NEURON, NodeType.EMBEDDING):
            blocks = exact.store.blocks.values()
            scale = max(float(b.values[group].nan_to_num().abs().max()) for b in blocks) or 1.0
            relative = GRADIENT_TOLERANCE if group is Group.ACT_TIMES_GRAD else TABLE_TOLERANCE
            tol = relative[dtype] * scale
            for largest in (True, False):
                top, ours_values = ours.store.topk(group, node_type, k, largest)
                assert ours_values.dtype == torch.float32
                exact_values = exact.store.values_at(group, top)
                torch.testing.assert_close(ours_values, exact_values, atol=tol, rtol=0)
                # float32's own k-th pick is not better than ours' worst beyond the tolerance.
                _, best = exact.store.topk(group, node_type, k, largest)
                sign = 1 if largest else -1
                worst = (sign * exact_values).min()
                assert float(worst) >= float((sign * best).min()) - 2 * tol, (group, node_type)


@pytest.mark.parametrize("arch", list(SHAPES))
def test_tdb_nodes_runs_in_bfloat16_on_the_cpu_on_every_architecture(
    arch: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save_in(tmp_path, arch, torch.bfloat16)
    code = main(["nodes", "--token-ids", ",".join(map(str, TOKENS)), "--target-id", str(TARGET),
                 "--distractor-id", str(DISTRACTOR), "--model", str(tmp_path / "half"),
                 "--dtype", "bfloat16", "--device", "cpu", "--json", "-k", "3"])  # fmt: skip
    assert code == 0
    table = json.loads(capsys.readouterr().out)
    assert table["nodes"] and all(isinstance(n["direct_effect"], float) for n in table["nodes"])


# --- loading ----------------------------------------------------------------------------------


def test_auto_dtype_is_float32_on_the_cpu_and_norms_stay_float32(tmp_path: Path) -> None:
    save_in(tmp_path, "llama", torch.bfloat16)
    assert load_model(tmp_path / "half").model.unembed.dtype == torch.float32  # auto on the CPU
    assert Placement(dtype=None).dtype_for(torch.bfloat16) == torch.float32
    cuda = Placement(torch.device("cuda", 0), None)
    assert cuda.dtype_for(torch.bfloat16) == torch.bfloat16  # the checkpoint's, on a GPU
    model = load_model(tmp_path / "half", dtype=torch.bfloat16).model
    dtypes = {name: p.dtype for name, p in model.named_parameters()}  # type: ignore[attr-defined]
    assert {d for n, d in dtypes.items() if ".ln_" in n or n.startswith("ln_")} == {torch.float32}
    assert {d for n, d in dtypes.items() if "W_" in n} == {torch.bfloat16}


@pytest.mark.slow
def test_loading_a_bfloat16_checkpoint_peaks_near_its_file_size(tmp_path: Path) -> None:
    """Peak host memory (ru_maxrss of a fresh process, every weight touched) while loading a
    ~250 MB bfloat16 checkpoint in bfloat16: about the file's size, not float32's double.
    benchmarks/load_memory.py measures it on a bigger file (docs/performance.md)."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from load_memory import measure, write_checkpoint

    write_checkpoint(tmp_path / "ckpt", 250)
    result = measure(tmp_path / "ckpt", "bfloat16")
    assert result["ratio"] <= 1.2, result  # goal 1.1x; 1.00x measured at 300 MB
    assert measure(tmp_path / "ckpt", "float32")["ratio"] >= 1.9  # so the measurement can fail


# --- device maps ------------------------------------------------------------------------------


def table_json(capsys: pytest.CaptureFixture[str], *extra: str) -> dict[str, Any]:
    prompt = "When Mary and John went to the store, John gave a drink to"
    args = ["nodes", prompt, "--target", " Mary", "--distractor", " John", "--json", "-k", "5"]
    args += ["--verify", "2"]
    assert main([*args, *extra]) == 0
    out: dict[str, Any] = json.loads(capsys.readouterr().out)
    return out


def test_a_map_that_names_the_cpu_for_every_layer_changes_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    plain = table_json(capsys)
    assert table_json(capsys, "--device-map", "0-1:cpu,2:cpu") == plain
    map_file = tmp_path / "map.json"
    map_file.write_text(json.dumps({"0": "cpu", "1": "cpu", "2": "cpu"}))
    assert table_json(capsys, "--device-map", str(map_file)) == plain
    loaded = load_model(device_map="0-2:cpu")
    assert loaded.placement.layer_devices == (torch.device("cpu"),) * 3


def test_the_server_says_where_its_model_runs() -> None:
    from fastapi.testclient import TestClient

    from tdb.server.app import create_app

    app = create_app(load_model(dtype="bfloat16"), max_prompt_tokens=64)
    with TestClient(app, base_url="http://localhost") as client:
        info = client.get("/api/model").json()
    assert (info["device"], info["dtype"]) == ("cpu", "bfloat16")


def test_layer_list_and_accelerate_plans() -> None:
    assert parse_layer_list("0-1:cuda:0,2:cuda:1") == {0: "cuda:0", 1: "cuda:0", 2: "cuda:1"}
    plan: dict[str, int | str | torch.device] = {"W_E": 0, "blocks.0": 0, "blocks.1": 1, "ln_f": 1}
    assert devices_from_plan(plan, 2) == (torch.device("cuda", 0), torch.device("cuda", 1))
    with pytest.raises(TdbError, match="does not fit the GPUs"):
        devices_from_plan({"W_E": 0, "blocks.0": 0, "blocks.1": "cpu", "ln_f": "cpu"}, 2)


def test_accelerate_plans_our_model_by_whole_layers(demo: LoadedModel) -> None:
    """The planner reads our module tree: every block on one device, none split."""
    from accelerate import infer_auto_device_map

    with torch.device("meta"):
        meta = type(demo.model)(demo.model.config)  # type: ignore[call-arg]
    size = sum(p.numel() * 4 for p in meta.parameters())
    plan = infer_auto_device_map(
        meta, max_memory={0: size // 2, 1: size}, no_split_module_classes=["Block"]
    )
    devices = devices_from_plan(plan, demo.model.config.n_layer)
    assert len(devices) == 3 and set(devices) <= {torch.device("cuda", 0), torch.device("cuda", 1)}
    assert not any(k.startswith("blocks.") and k.count(".") > 1 for k in plan)


# --- bad input --------------------------------------------------------------------------------

ERRORS = [
    (["--dtype", "float64"], "--dtype: 'float64' is not a dtype"),
    (["--device", "gpu"], "--device: 'gpu' is not a device"),
    (["--device", "cpu:1"], "--device: 'cpu:1'"),
    (["--device-map", "0:cpu"], "--device-map: names no device for layer 1"),
    (["--device-map", "0-3:cpu"], "--device-map: names layer 3"),
    (["--device-map", "0-2:gpu"], "--device-map: 'gpu' is not a device"),
    (["--device-map", "zero:cpu"], "--device-map: 'zero:cpu' is not LAYER:DEVICE"),
]


@pytest.mark.parametrize(("extra", "message"), ERRORS, ids=lambda x: str(x))
def test_bad_device_options_fail_in_one_line(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["nodes", "Hi", "--target", " a", "--distractor", " b", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tdb: error: {message}") and err.count("\n") == 1, err


CUDA_FLAGS = [["--device", "cuda"], ["--device", "cuda:1"], ["--device-map", "auto"]]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("flag", [*CUDA_FLAGS, ["--device-map", "0-2:cuda"]])
def test_cuda_without_cuda_fails_in_one_line(
    flag: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    for command in (["nodes", "Hi", "--target", " a", "--distractor", " b"], ["serve"]):
        assert main([*command, *flag]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"tdb: error: {flag[0]}") and "CUDA" in err and err.count("\n") == 1


def test_a_dtype_the_device_cannot_compute_in_fails_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """float16 where the device lacks it (simulated: the CPU here has it)."""
    import tdb.device

    def lacks_float16(dtype: torch.dtype, device: torch.device) -> str | None:
        return "no float16 kernels" if dtype == torch.float16 else None

    monkeypatch.setattr(tdb.device, "computes_in", lacks_float16)
    assert main(["nodes", "Hi", "--target", " a", "--distractor", " b", "--dtype", "float16"]) == 2
    err = capsys.readouterr().err
    assert err == "tdb: error: --dtype: float16 is not supported on cpu (no float16 kernels)\n"


def test_the_cpu_computes_in_every_dtype() -> None:
    from tdb.device import computes_in

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert computes_in(dtype, torch.device("cpu")) is None


# --- Ray --------------------------------------------------------------------------------------


def test_ray_actors_ask_for_gpus_on_cuda() -> None:
    env: dict[str, Any] = {"env_vars": {}}
    assert actor_options(ScanSettings(device="cpu"), env) == {"num_cpus": 1, "runtime_env": env}
    assert actor_options(ScanSettings(device="cuda"), env)["num_gpus"] == 1
    assert actor_options(ScanSettings(device="cuda:1"), env)["num_gpus"] == 1
    two = ScanSettings(device="cuda", device_map="0:cuda:0,1:cuda:1")
    assert actor_options(two, env)["num_gpus"] == 2
    auto = actor_options(ScanSettings(device="auto"), env)
    assert ("num_gpus" in auto) == torch.cuda.is_available()


# --- on a GPU ---------------------------------------------------------------------------------


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_node_table_on_cuda_matches_the_cpu(dtype: str, capsys: pytest.CaptureFixture[str]) -> None:
    cpu = table_json(capsys, "--device", "cpu", "--dtype", dtype)
    gpu = table_json(capsys, "--device", "cuda", "--dtype", dtype)
    assert [n["id"] for n in gpu["nodes"]][:5] == [n["id"] for n in cpu["nodes"]][:5]
    tol = 1e-3 if dtype == "float32" else TABLE_TOLERANCE[dtype]
    for a, b in zip(cpu["nodes"], gpu["nodes"], strict=True):
        for group in ("activation", "write_norm", "direct_effect", "act_times_grad"):
            assert b[group] == pytest.approx(a[group], abs=tol * max(1.0, abs(a[group])))


@pytest.mark.cuda
@needs_cuda
def test_attribution_and_scan_on_cuda(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dataset = tmp_path / "ioi.jsonl"
    assert main(["task", "ioi", "--n", "8"]) == 0
    dataset.write_text(capsys.readouterr().out)
    results = []
    for device in ("cpu", "cuda"):
        args = ["attribute", str(dataset), "--device", device, "--dtype", "float32"]
        assert main([*args, "--method", "exact", "--json", "--quiet"]) == 0
        results.append(
            {
                c["id"]: c["scores"]["exact"]
                for c in json.loads(capsys.readouterr().out)["components"]
            }
        )
    cpu, cuda = results
    assert cpu.keys() == cuda.keys()
    for key, value in cpu.items():
        assert cuda[key] == pytest.approx(value, abs=1e-3, rel=1e-3), key
    out = tmp_path / "scan"
    args = ["scan", "--out", str(out), "--device", "cuda", "--quiet", "--shard-windows", "64"]
    assert main(args) == 0
    manifest = json.loads((out / "scan.json").read_text())
    assert manifest.get("complete") is True


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_a_map_over_two_gpus_matches_one(capsys: pytest.CaptureFixture[str]) -> None:
    one = table_json(capsys, "--device", "cuda:0")
    two = table_json(capsys, "--device-map", "0:cuda:0,1-2:cuda:1")
    assert [n["id"] for n in two["nodes"]] == [n["id"] for n in one["nodes"]]
    for a, b in zip(one["nodes"], two["nodes"], strict=True):
        assert b["direct_effect"] == pytest.approx(a["direct_effect"], abs=1e-4)
    assert table_json(capsys, "--device-map", "auto")["nodes"]


# --- benchmarks/gpu.py ------------------------------------------------------------------------


def gpu_benchmark() -> Any:
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import gpu

    return gpu


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_the_gpu_benchmark_stops_at_once_without_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu_benchmark().main(["--tokens", "2048"]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and err.count("\n") == 1


def test_the_gpu_benchmark_runs_a_tiny_model_on_the_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu_benchmark().main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "node table" in out and "floor" in out and "tokens/s" in out


def test_token_views_in_bfloat16_match_float32(capsys: pytest.CaptureFixture[str]) -> None:
    """The views unembed write vectors with the float32 norm gain and the bfloat16 unembedding."""
    half = table_json(capsys, "--dtype", "bfloat16", "--views")["token_views"]
    full = table_json(capsys, "--views")["token_views"]
    assert half["logits"]["top"][0]["id"] == full["logits"]["top"][0]["id"]
    assert [v["id"] for v in half["nodes"]][:3] == [v["id"] for v in full["nodes"]][:3]


SECOND = "When Tom and Anna went to the park, Anna gave a ball to"  # as long as the prompt
HALF_PATHS = [
    ["--ablate", "h2.3@13:1", "--ablate", "n1.5@13:mean", "--verify", "3"],
    ["--trace", "h2.1@9:3:q"],
    ["--trace", "h2.1@9:3:v", "--downstream", "n2.4@9"],
    ["--mlp-nodes", "latents", "--attn-nodes", "latents", "--ablate", "am1.42@13"],
    ["--ablate", "h2.3:resample", "--resample-prompt", SECOND],
]


@pytest.mark.parametrize("extra", HALF_PATHS, ids=lambda x: x[0] + x[1])
def test_ablations_traces_and_latents_run_in_bfloat16(
    extra: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Every path of the table (ablations, traces, SAE latents, resampling, verification) in
    bfloat16 gives the float32 direction value within the bfloat16 tolerance."""
    half = table_json(capsys, "--dtype", "bfloat16", *extra)["direction"]["value"]
    full = table_json(capsys, *extra)["direction"]["value"]
    assert half == pytest.approx(full, abs=0.1, rel=TABLE_TOLERANCE["bfloat16"])
