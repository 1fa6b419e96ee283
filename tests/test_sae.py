"""Sparse autoencoders: both file layouts, SAEs inside the forward pass, latent ablations and
traces, the CLI. Latent metrics are checked with every other metric in tests/test_metrics.py.

The layouts are written here by hand with `safetensors` (not by tdb's saver) and checked against
the formulas each layout documents; ablations and traces against the naive model
(tests/reference.py) with the SAE applied by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from checkpoints import make_checkpoint
from reference import frozen_layer_norm, naive_run
from sae_reference import naive_encode, saes_for_tests, site_tensors
from safetensors.torch import save_file
from transformers import GPT2LMHeadModel

from tdb.capture import capture
from tdb.checkpoint import LoadedModel, load_model
from tdb.cli import main
from tdb.direction import LatentPreActivation
from tdb.errors import TdbError
from tdb.hooks import HookPoint, Hooks
from tdb.latents import attach
from tdb.metrics import ALL_GROUPS, Group
from tdb.nodes import LatentSite, NodeIndex, NodeType, parse_node_id
from tdb.sae import AttachedSae, load_saes, save_openai_layout
from tdb.table import node_table

TOKENS = [5, 17, 99, 250, 3, 17, 42, 8, 77, 5]
SECOND = [6, 18, 98, 251, 4, 16, 43, 9, 76, 6]
T, D = 11, 12
LAST = len(TOKENS) - 1
D_MODEL, D_MLP = 32, 128


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[GPT2LMHeadModel, LoadedModel]:
    directory = tmp_path_factory.mktemp("sae-model")
    hf = make_checkpoint(directory, n_layer=3, n_embd=D_MODEL, n_head=4, with_tokenizer=False)
    return hf, load_model(directory)


@pytest.fixture(scope="module")
def saes() -> list[AttachedSae]:
    return saes_for_tests(D_MODEL, D_MLP, layers=[0, 1])


# --- file layouts -----------------------------------------------------------------------------


def write_openai(
    path: Path, d_in: int, d_sae: int, metadata: dict[str, str]
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    tensors = {
        "pre_bias": torch.randn(d_in, generator=g),
        "encoder.weight": torch.randn(d_sae, d_in, generator=g),
        "latent_bias": torch.randn(d_sae, generator=g),
        "decoder.weight": torch.randn(d_in, d_sae, generator=g),
        "stats_last_nonzero": torch.zeros(d_sae, dtype=torch.long),  # in OpenAI's files; unused
    }
    save_file(tensors, str(path), metadata=metadata)
    return tensors


@pytest.mark.parametrize("activation", ["ReLU", "TopK"])
def test_openai_layout_loads_and_encodes_as_documented(tmp_path: Path, activation: str) -> None:
    metadata = {"activation": activation, "site": "resid_delta_mlp", "layer": "2"}
    if activation == "TopK":
        metadata["k"] = "3"
    w = write_openai(tmp_path / "sae.safetensors", 8, 16, metadata)
    (attached,) = load_saes(tmp_path / "sae.safetensors")
    assert (attached.site, attached.layer, attached.sae.d_sae) == (LatentSite.MLP_OUT, 2, 16)
    x = torch.randn(5, 8)
    pre = (x - w["pre_bias"]) @ w["encoder.weight"].T + w["latent_bias"]
    if activation == "ReLU":
        expected = pre.relu()
    else:
        keep = pre >= pre.sort(dim=-1, descending=True).values[:, 2:3]
        expected = torch.where(keep, pre.relu(), 0.0)
        assert bool(((expected > 0).sum(dim=-1) <= 3).all())
    z = attached.sae.encode(x)
    torch.testing.assert_close(z, expected)
    torch.testing.assert_close(attached.sae.decode(z), z @ w["decoder.weight"].T + w["pre_bias"])


@pytest.mark.parametrize("subtract_b_dec", [True, False])
@pytest.mark.parametrize("topk", [False, True])
def test_saelens_layout_loads_and_encodes_as_documented(
    tmp_path: Path, subtract_b_dec: bool, topk: bool
) -> None:
    g = torch.Generator().manual_seed(2)
    w = {
        "W_enc": torch.randn(8, 12, generator=g),
        "W_dec": torch.randn(12, 8, generator=g),
        "b_enc": torch.randn(12, generator=g),
        "b_dec": torch.randn(8, generator=g),
    }
    directory = tmp_path / "blocks.1.hook_attn_out"
    directory.mkdir()
    save_file(w, str(directory / "sae_weights.safetensors"))
    cfg: dict[str, object] = {
        "d_in": 8,
        "d_sae": 12,
        "hook_name": "blocks.1.hook_attn_out",
        "hook_layer": 1,
        "apply_b_dec_to_input": subtract_b_dec,
        "activation_fn_str": "topk" if topk else "relu",
        "normalize_activations": "none",
    }
    if topk:
        cfg["activation_fn_kwargs"] = {"k": 4}
    (directory / "cfg.json").write_text(json.dumps(cfg))
    (attached,) = load_saes(directory)
    assert (attached.site, attached.layer, attached.sae.k) == (
        LatentSite.ATTN_OUT,
        1,
        4 if topk else None,
    )
    x = torch.randn(5, 8)
    pre = (x - w["b_dec"] * subtract_b_dec) @ w["W_enc"] + w["b_enc"]
    expected = pre.relu()
    if topk:
        expected = torch.where(pre >= pre.sort(dim=-1, descending=True).values[:, 3:4], expected, 0)
    z = attached.sae.encode(x)
    torch.testing.assert_close(z, expected)
    torch.testing.assert_close(attached.sae.decode(z), z @ w["W_dec"] + w["b_dec"])


def test_a_directory_of_saes_and_clear_errors(tmp_path: Path, saes: list[AttachedSae]) -> None:
    tied = saes[0]
    with torch.no_grad():
        tied.sae.decoder_bias.copy_(tied.sae.pre_bias)
    save_openai_layout(tied, tmp_path / "a.safetensors")
    save_openai_layout(tied, tmp_path / "b.safetensors", dtype=torch.float16)
    loaded = load_saes(tmp_path)
    assert [a.name for a in loaded] == ["a", "b"]
    torch.testing.assert_close(loaded[0].sae.W_dec, tied.sae.W_dec)
    assert loaded[0].sae.k == tied.sae.k
    write_openai(tmp_path / "bad.safetensors", 4, 4, {"activation": "ReLU"})
    with pytest.raises(TdbError, match="must say where the SAE reads"):
        load_saes(tmp_path / "bad.safetensors")
    jump = tmp_path / "jump"
    jump.mkdir()
    (jump / "cfg.json").write_text(json.dumps({"architecture": "jumprelu"}))
    save_file({"W_enc": torch.zeros(1)}, str(jump / "sae_weights.safetensors"))
    with pytest.raises(TdbError, match="not supported"):
        load_saes(jump)
    with pytest.raises(TdbError, match="neither a file nor a directory"):
        load_saes(tmp_path / "missing")


# --- inside the forward pass ------------------------------------------------------------------


def test_logits_unchanged_and_latents_are_the_encoder_of_the_site(
    pair: tuple[GPT2LMHeadModel, LoadedModel], saes: list[AttachedSae]
) -> None:
    hf, loaded = pair
    tokens = torch.tensor([TOKENS])
    seen: dict[tuple[HookPoint, int | None], torch.Tensor] = {}
    sites: dict[tuple[HookPoint, int | None], torch.Tensor] = {}

    def keep(store: dict[tuple[HookPoint, int | None], torch.Tensor], point: HookPoint):  # type: ignore[no-untyped-def]
        def hook(x: torch.Tensor, layer: int | None) -> None:
            store[(point, layer)] = x.detach()[0]

        return hook

    latent_points = [
        HookPoint.ATTN_OUT_LATENTS,
        HookPoint.MLP_POST_LATENTS,
        HookPoint.MLP_OUT_LATENTS,
    ]
    hooks = Hooks({p: keep(seen, p) for p in latent_points})
    with torch.no_grad():
        plain = loaded.model(tokens)
        with_saes = loaded.model(tokens, attach(saes, hooks))
        loaded.model(
            tokens,
            Hooks(
                {
                    p: keep(sites, p)
                    for p in (HookPoint.ATTN_OUT, HookPoint.MLP_POST, HookPoint.MLP_OUT)
                }
            ),
        )
    torch.testing.assert_close(with_saes, plain, atol=1e-5, rtol=0)
    assert len(seen) == len(saes)
    for a in saes:
        point = {"attn_out": HookPoint.ATTN_OUT, "mlp_post": HookPoint.MLP_POST}.get(
            a.site.value, HookPoint.MLP_OUT
        )
        z = seen[(HookPoint(f"{a.site.value}_latents"), a.layer)]
        torch.testing.assert_close(z, naive_encode(a.sae, sites[(point, a.layer)]))
        assert bool((z > 0).any())
    # The naive model's activations are the same ones.
    ref = naive_run(hf, TOKENS, LAST, T, D)
    torch.testing.assert_close(sites[(HookPoint.MLP_OUT, 1)], ref.mlp_out[1], atol=1e-5, rtol=1e-4)


def test_other_nodes_keep_the_models_own_gradient(
    pair: tuple[GPT2LMHeadModel, LoadedModel], saes: list[AttachedSae]
) -> None:
    """Attaching SAEs changes no other node's metric: the error term carries x's gradient."""
    _, loaded = pair
    direction_tokens = torch.tensor(TOKENS)
    from tdb.direction import LogitDiff

    direction = LogitDiff((T,), (D,), LAST)
    plain = capture(loaded.model, direction_tokens, direction, ALL_GROUPS)
    with_saes = capture(loaded.model, direction_tokens, direction, ALL_GROUPS, saes=saes)
    assert with_saes.direction_value == pytest.approx(plain.direction_value, abs=1e-5)
    for node_type in (NodeType.EMBEDDING, NodeType.ATTENTION_HEAD, NodeType.MLP_NEURON):
        for group in ALL_GROUPS:
            torch.testing.assert_close(
                with_saes.store.blocks[node_type].values[group],
                plain.store.blocks[node_type].values[group],
                atol=1e-5,
                rtol=1e-4,
                equal_nan=True,
            )


# --- ablations and traces against the naive model ------------------------------------------


def busiest_latent(ref_x: torch.Tensor, a: AttachedSae, token: int) -> int:
    return int(naive_encode(a.sae, ref_x)[token].argmax())


@pytest.mark.parametrize("site", list(LatentSite))
@pytest.mark.parametrize("kind", ["zero", "mean", "resample"])
def test_latent_ablation_matches_the_naive_model(
    pair: tuple[GPT2LMHeadModel, LoadedModel],
    saes: list[AttachedSae],
    site: LatentSite,
    kind: str,
) -> None:
    hf, loaded = pair
    a = next(a for a in saes if a.site is site and a.layer == 1)
    token = 7
    base = naive_run(hf, TOKENS, LAST, T, D)
    x, _ = site_tensors(base, site, 1)
    latent = busiest_latent(x, a, token)
    z = naive_encode(a.sae, x)[token, latent]
    if kind == "zero":
        new = torch.tensor(0.0)
    elif kind == "mean":
        new = naive_encode(a.sae, x)[:, latent].mean()
    else:
        other = naive_run(hf, SECOND, LAST, T, D)
        new = naive_encode(a.sae, site_tensors(other, site, 1)[0])[token, latent]
    name = {"attn_out": "attn_out", "mlp_post": "post", "mlp_out": "mlp_out"}[site.value]

    def edit(n: str, layer: int | None, head: int | None, t: torch.Tensor) -> torch.Tensor:
        if (n, layer) != (name, 1):
            return t
        t = t.clone()
        t[token] = t[token] + (new - z) * a.sae.W_dec[latent]  # reconstruction + error, by hand
        return t

    expected = naive_run(hf, TOKENS, LAST, T, D, edit=edit)
    node_id = f"a{site.code}1.{latent}@{token}:{kind}"
    source = {"resample_prompt": SECOND} if kind == "resample" else {}
    table = node_table(loaded, TOKENS, T, D, k=3, ablate=[node_id], saes=saes, **source)
    assert table.direction_value == pytest.approx(expected.value, abs=1e-4)
    assert table.baseline_value == pytest.approx(base.value, abs=1e-5)
    assert abs(expected.value - base.value) > 1e-4  # the ablation did something


@pytest.mark.parametrize("site", list(LatentSite))
def test_latent_trace_matches_autograd_on_the_naive_model(
    pair: tuple[GPT2LMHeadModel, LoadedModel], saes: list[AttachedSae], site: LatentSite
) -> None:
    """Tracing a latent explains its pre-activation W_enc[j] · (x - pre_bias) + b[j]: value and
    every upstream node's activation x gradient against the naive model with that read-out."""
    hf, loaded = pair
    a = next(a for a in saes if a.site is site and a.layer == 1)
    token, sd = 6, hf.state_dict()
    latent = busiest_latent(site_tensors(naive_run(hf, TOKENS, LAST, T, D), site, 1)[0], a, token)
    p, eps = "transformer.h.1.", hf.config.layer_norm_epsilon

    def read(state: dict[str, object]) -> torch.Tensor:
        if site is LatentSite.ATTN_OUT:
            resid = state["resid_pre"][1][: token + 1]  # type: ignore[index]
            h = frozen_layer_norm(resid, sd[p + "ln_1.weight"], sd[p + "ln_1.bias"], eps)
            q, k, v = (h @ sd[p + "attn.c_attn.weight"] + sd[p + "attn.c_attn.bias"]).split(
                D_MODEL, -1
            )
            dh = D_MODEL // 4
            out = sd[p + "attn.c_proj.bias"].clone()
            for head in range(4):
                cols = slice(head * dh, (head + 1) * dh)
                probs = (k[:, cols] @ q[token, cols] / dh**0.5).softmax(-1)
                out = out + (probs @ v[:, cols]) @ sd[p + "attn.c_proj.weight"][cols]
            x = out
        else:
            resid = state["resid_mid"][1][token]  # type: ignore[index]
            h = frozen_layer_norm(resid, sd[p + "ln_2.weight"], sd[p + "ln_2.bias"], eps)
            pre = h @ sd[p + "mlp.c_fc.weight"] + sd[p + "mlp.c_fc.bias"]
            x = torch.nn.functional.gelu(pre, approximate="tanh")
            if site is LatentSite.MLP_OUT:
                x = x @ sd[p + "mlp.c_proj.weight"] + sd[p + "mlp.c_proj.bias"]
        return (x - a.sae.pre_bias) @ a.sae.W_enc[latent] + a.sae.latent_bias[latent]

    ref = naive_run(hf, TOKENS, LAST, T, D, read=read)
    direction = LatentPreActivation(a, token, latent)
    cap = capture(loaded.model, torch.tensor(TOKENS), direction, ALL_GROUPS, saes=saes)
    assert cap.direction_value == pytest.approx(ref.value, abs=1e-5)
    for layer in (0, 1):
        for head in range(4):
            for q in range(token + 1):
                node = NodeIndex(NodeType.ATTENTION_HEAD, layer, q, head, key_token=0)
                if layer == 1 and site is LatentSite.ATTN_OUT:
                    continue  # the traced layer's own attention is not upstream of its input
                expected = float(ref.probs[layer][head][q, 0] * ref.probs_grad[layer][head][q, 0])
                got = float(cap.store.values_at(Group.ACT_TIMES_GRAD, [node])[0])
                assert got == pytest.approx(expected, abs=1e-5)
    embedding = cap.store.values_at(Group.ACT_TIMES_GRAD, [parse_node_id("e@2")])
    assert float(embedding[0]) == pytest.approx(
        float((ref.resid[2] * ref.resid_grad[2]).sum()), abs=1e-5
    )
    # Latents of layer 0 are upstream nodes of the trace too.
    assert NodeType.AUTOENCODER_LATENT in cap.store.blocks


def test_node_table_latents_instead_of_neurons_and_heads(
    pair: tuple[GPT2LMHeadModel, LoadedModel], saes: list[AttachedSae]
) -> None:
    _, loaded = pair
    table = node_table(
        loaded, TOKENS, T, D, k=4, saes=saes, mlp_nodes="latents", attn_nodes="latents", verify=3
    )
    types = {n.node_type for n in table.nodes}
    assert types == {NodeType.EMBEDDING, NodeType.AUTOENCODER_LATENT}
    rows = table.to_json()["nodes"]
    assert isinstance(rows, list)
    latent_row = next(r for r in rows if r["node_type"] == "autoencoder_latent")
    assert latent_row["site"] in {"attn_out", "mlp_post", "mlp_out"}
    node = parse_node_id(str(latent_row["id"]))
    assert node.site is not None and node.site.value == latent_row["site"]
    assert (node.layer, node.index, node.token) == (
        latent_row["layer"],
        latent_row["index"],
        latent_row["token"],
    )
    # Verification zero-ablates latents for real: estimate and truth come back per node.
    assert table.verification is not None and len(table.verification.rows) == 3
    both = node_table(loaded, TOKENS, T, D, k=4, saes=saes)  # latents next to neurons and heads
    assert {n.node_type for n in both.nodes} == set(NodeType)
    with pytest.raises(TdbError, match="need an SAE"):
        node_table(loaded, TOKENS, T, D, mlp_nodes="latents")
    with pytest.raises(TdbError, match="no sparse autoencoder is attached"):
        node_table(loaded, TOKENS, T, D, saes=saes, ablate=["am2.0@3"])


def test_cli_sae_flags(
    pair: tuple[GPT2LMHeadModel, LoadedModel],
    saes: list[AttachedSae],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, loaded = pair
    for a in saes:
        with torch.no_grad():
            a_tied = AttachedSae(a.sae, a.site, a.layer, a.name)
            a_tied.sae.decoder_bias.copy_(a.sae.pre_bias)
        save_openai_layout(a_tied, tmp_path / f"{a.name}.safetensors")
    args = ["nodes", "--token-ids", ",".join(map(str, TOKENS)), "--target-id", str(T)]
    args += ["--distractor-id", str(D), "--model", str(loaded.path), "--json", "-k", "3"]
    assert (
        main([*args, "--sae", str(tmp_path), "--attn-nodes", "latents", "--trace", "am1.0@5"]) == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["direction"]["kind"] == "latent_pre_activation"
    assert {n["node_type"] for n in out["nodes"]} == {
        "embedding",
        "mlp_neuron",
        "autoencoder_latent",
    }
    assert main([*args, "--mlp-nodes", "latents"]) == 2
    assert "need an SAE" in capsys.readouterr().err


def test_demo_model_has_latent_tables(capsys: pytest.CaptureFixture[str]) -> None:
    prompt = "When Mary and John went to the store, John gave a drink to"
    args = ["nodes", prompt, "--target", " Mary", "--distractor", " John", "--json", "-k", "5"]
    assert main([*args, "--mlp-nodes", "latents", "--attn-nodes", "latents"]) == 0
    out = json.loads(capsys.readouterr().out)
    latents = [n for n in out["nodes"] if n["node_type"] == "autoencoder_latent"]
    assert latents and {n["node_type"] for n in out["nodes"]} == {"embedding", "autoencoder_latent"}
    assert {n["site"] for n in latents} <= {"attn_out", "mlp_out"}


def test_training_folds_its_input_scale_into_the_saved_sae() -> None:
    """The demo's training script trains on x / scale; the SAE it saves reads raw x."""
    from tdb.demo.sae.train import finished, new_trainee, train_step

    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(0)) * 3 + 1
    trainee = new_trainee(LatentSite.MLP_OUT, 0, x, d_sae=32, k=4, lr=1e-2, seed=0)
    for _ in range(3):
        train_step(trainee, x, k_aux=8, dead_after=1, aux_weight=1 / 32)
    saved = finished(trainee).sae
    with torch.no_grad():
        z = trainee.sae.encode(x / trainee.scale)
        x_hat = trainee.scale * (z @ trainee.sae.W_dec + trainee.sae.pre_bias)
        torch.testing.assert_close(saved.encode(x), z, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(saved.decode(saved.encode(x)), x_hat, atol=1e-4, rtol=1e-4)
    assert torch.equal(saved.pre_bias, saved.decoder_bias)  # storable in OpenAI's layout


def test_demo_saes_were_trained_on_the_shipped_checkpoint() -> None:
    """The SAEs fit one model: retraining the demo model without retraining them fails here."""
    import json

    from tdb.checkpoint import DEMO_MODEL_DIR
    from tdb.demo.sae.train import DEFAULT_OUT, weights_digest

    stats = json.loads((DEFAULT_OUT / "sae_stats.json").read_text())
    assert stats["model_sha256"] == weights_digest(DEMO_MODEL_DIR)
    for name, numbers in stats["saes"].items():
        assert numbers["fraction_of_variance_explained"] >= 0.8, name
