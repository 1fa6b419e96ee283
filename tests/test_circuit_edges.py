"""Edges of a circuit (`tdb.circuit.edges`): path patching against Hugging Face models patched by
hand (layer norm recomputed from the weights, the projection modules called on it), the edge
estimate into the logits against an autograd reference, and the estimates summed over readers
against the node scores of `tdb.attribution`."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from checkpoints import make_checkpoint
from reference import naive_run
from test_architectures import make_checkpoint as make_arch_checkpoint
from transformers import PreTrainedModel

from tdb.attribution import Reference, attribution
from tdb.attribution.run import as_dataset
from tdb.checkpoint import LoadedModel, load_model
from tdb.circuit.edges import edge_scores
from tdb.circuit.result import Edge
from tdb.errors import TdbError
from tdb.nodes import ComponentIndex, LatentSite, NodeType, parse_target

N_LAYER, N_HEAD, D_MLP = 2, 4, 128


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[PreTrainedModel, LoadedModel]:
    directory = tmp_path_factory.mktemp("edges-gpt2")
    hf = make_checkpoint(directory, n_layer=N_LAYER, n_embd=32, n_head=N_HEAD, with_tokenizer=False)
    return hf, load_model(directory)


def records(n: int, vocab: int, seed: int = 0, length: int = 8) -> list[dict[str, object]]:
    """Random prompt pairs of token ids; the corrupted twin changes two tokens."""
    rng = random.Random(seed)
    out: list[dict[str, object]] = []
    for i in range(n):
        prompt = [rng.randrange(1, vocab) for _ in range(length)]
        corrupted = list(prompt)
        for p in rng.sample(range(length), 2):
            corrupted[p] = rng.randrange(1, vocab)
        out.append(
            {
                "prompt_ids": prompt,
                "corrupted_ids": corrupted,
                "target_ids": [11 + i % 3],
                "distractor_ids": [12 + i % 5],
            }
        )
    return out


def components(*ids: str) -> list[ComponentIndex]:
    out = [parse_target(i) for i in ids]
    assert all(isinstance(c, ComponentIndex) for c in out)
    return out  # type: ignore[return-value]


def by_key(edges: list[Edge]) -> dict[tuple[str, str, str], Edge]:
    return {(e.source, e.target, e.input): e for e in edges}


# --- path patching by hand, on the Hugging Face model ------------------------------------------


@dataclass(frozen=True)
class Anatomy:
    """Where a Hugging Face model keeps what path patching reads and changes."""

    arch: str
    hf: PreTrainedModel

    @property
    def layers(self) -> list[torch.nn.Module]:
        if self.arch == "gpt2":
            return list(self.hf.transformer.h)
        if self.arch == "gpt_neox":
            return list(self.hf.gpt_neox.layers)
        return list(self.hf.model.layers)

    @property
    def final_norm(self) -> torch.nn.Module:
        if self.arch == "gpt2":
            return self.hf.transformer.ln_f  # type: ignore[no-any-return]
        if self.arch == "gpt_neox":
            return self.hf.gpt_neox.final_layer_norm  # type: ignore[no-any-return]
        return self.hf.model.norm  # type: ignore[no-any-return]

    def norms(self, layer: int) -> tuple[torch.nn.Module, torch.nn.Module]:
        block = self.layers[layer]
        if self.arch == "gpt2":
            return block.ln_1, block.ln_2
        return block.input_layernorm, block.post_attention_layernorm

    def attn_out(self, layer: int) -> torch.nn.Module:
        block = self.layers[layer]
        return {
            "gpt2": lambda: block.attn.c_proj,
            "gpt_neox": lambda: block.attention.dense,
            "llama": lambda: block.self_attn.o_proj,
        }[self.arch]()

    def mlp_out(self, layer: int) -> torch.nn.Module:
        name = {"gpt2": "c_proj", "gpt_neox": "dense_4h_to_h", "llama": "down_proj"}[self.arch]
        return getattr(self.layers[layer].mlp, name)  # type: ignore[no-any-return]

    def mlp_in(self, layer: int) -> list[torch.nn.Module]:
        mlp = self.layers[layer].mlp
        if self.arch == "gpt2":
            return [mlp.c_fc]
        if self.arch == "gpt_neox":
            return [mlp.dense_h_to_4h]
        return [mlp.gate_proj, mlp.up_proj]

    def head_input(self, layer: int, head: int, which: str) -> tuple[torch.nn.Module, slice]:
        """The projection whose output holds `which` ("q", "k", "v") of `head`, and its columns."""
        cfg = self.hf.config
        d, n_head = cfg.hidden_size, cfg.num_attention_heads
        dh = d // n_head
        slot = "qkv".index(which)
        block = self.layers[layer]
        if self.arch == "gpt2":
            start = slot * d + head * dh
            return block.attn.c_attn, slice(start, start + dh)
        if self.arch == "gpt_neox":  # per head: [q k v]
            start = head * 3 * dh + slot * dh
            return block.attention.query_key_value, slice(start, start + dh)
        module = getattr(block.self_attn, f"{which}_proj")
        return module, slice(head * dh, (head + 1) * dh)

    def normalize(self, norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The norm recomputed from its weights."""
        if self.arch == "llama":
            eps = norm.variance_epsilon
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm.weight
        return F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps)


@dataclass
class Run:
    m: float
    resid_pre: list[torch.Tensor]  # [layer] -> [1 pos d_model]: what attention's norm reads
    mlp_in: list[torch.Tensor]  # what the MLP's norm reads
    z: list[torch.Tensor]  # the heads' outputs, merged [1 pos n_head*d_head]
    post: list[torch.Tensor]  # [1 pos d_mlp]


def hf_run(
    body: Anatomy,
    tokens: list[int],
    target: int,
    distractor: int,
    hooks: Callable[[], list[torch.utils.hooks.RemovableHandle]] = list,
) -> Run:
    n = len(body.layers)
    run = Run(
        0.0, [torch.empty(0)] * n, [torch.empty(0)] * n, [torch.empty(0)] * n, [torch.empty(0)] * n
    )

    def keep(slot: list[torch.Tensor], layer: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            slot[layer] = args[0].detach()

        return hook

    handles = hooks()
    for layer in range(n):
        ln_1, ln_2 = body.norms(layer)
        handles += [
            ln_1.register_forward_pre_hook(keep(run.resid_pre, layer)),
            ln_2.register_forward_pre_hook(keep(run.mlp_in, layer)),
            body.attn_out(layer).register_forward_pre_hook(keep(run.z, layer)),
            body.mlp_out(layer).register_forward_pre_hook(keep(run.post, layer)),
        ]
    try:
        with torch.no_grad():
            logits = body.hf(torch.tensor([tokens])).logits[0, -1]
    finally:
        for h in handles:
            h.remove()
    run.m = float(logits[target] - logits[distractor])
    return run


def hf_write(body: Anatomy, source: str, run: Run) -> torch.Tensor:
    """A source's write into the residual stream [1 pos d_model], by calling its output
    projection on its activation alone (minus the bias)."""
    if source == "embed":
        return run.resid_pre[0]
    c = parse_target(source)
    assert isinstance(c, ComponentIndex)
    if c.node_type is NodeType.ATTENTION_HEAD:
        x, module = run.z[c.layer], body.attn_out(c.layer)
        dh = x.shape[-1] // body.hf.config.num_attention_heads
        keep = torch.zeros(x.shape[-1])
        keep[c.index * dh : (c.index + 1) * dh] = 1
    else:
        x, module = run.post[c.layer], body.mlp_out(c.layer)
        keep = torch.zeros(x.shape[-1])
        keep[c.index] = 1
    with torch.no_grad():
        return module(x * keep) - module(torch.zeros_like(x))


def hf_path_patched(body: Anatomy, record: dict[str, object], edge: tuple[str, str, str]) -> float:
    """m(clean) - m(the source patched from the corrupted run, as the target's input alone sees
    it): that input recomputed by hand from the norm of the changed residual stream."""
    source, target, which = edge
    tokens, corrupted = list(record["prompt_ids"]), list(record["corrupted_ids"])  # type: ignore[call-overload]
    t, dis = record["target_ids"][0], record["distractor_ids"][0]  # type: ignore[index]
    clean, other = hf_run(body, tokens, t, dis), hf_run(body, corrupted, t, dis)
    dW = hf_write(body, source, other) - hf_write(body, source, clean)

    def replace(module: torch.nn.Module, cols: slice | int, x: torch.Tensor, norm: torch.nn.Module):  # type: ignore[no-untyped-def]
        new = module(body.normalize(norm, x + dW))[..., cols].detach()

        def hook(_: torch.nn.Module, args: object, out: torch.Tensor) -> torch.Tensor:
            out = out.clone()
            out[..., cols] = new
            return out

        return module.register_forward_hook(hook)

    def hooks() -> list[torch.utils.hooks.RemovableHandle]:
        if target == "logits":
            return [body.final_norm.register_forward_pre_hook(lambda _, args: (args[0] + dW,))]
        c = parse_target(target)
        assert isinstance(c, ComponentIndex)
        ln_1, ln_2 = body.norms(c.layer)
        if which == "mlp":
            x = clean.mlp_in[c.layer]
            return [replace(m, c.index, x, ln_2) for m in body.mlp_in(c.layer)]
        module, cols = body.head_input(c.layer, c.index, which)
        return [replace(module, cols, clean.resid_pre[c.layer], ln_1)]

    return clean.m - hf_run(body, tokens, t, dis, hooks).m


def check_exact(
    body: Anatomy, loaded: LoadedModel, ids: list[str], edges: list[tuple[str, str, str]]
) -> dict[tuple[str, str, str], Edge]:
    """edge_scores' exact (every edge verified) against path patching by hand, for `edges`."""
    data = records(3, vocab=200, seed=1)
    found = edge_scores(
        loaded,
        as_dataset(loaded, data),
        components(*ids),
        reference=Reference.CORRUPTED,
        method="atp",
        verify=10_000,
        batch_size=2,
    )
    out = by_key(found)
    for edge in edges:
        expected = sum(hf_path_patched(body, r, edge) for r in data) / len(data)
        assert out[edge].exact == pytest.approx(expected, abs=1e-4), edge
    return out


def test_path_patching_matches_the_patched_hugging_face_model(
    tiny: tuple[PreTrainedModel, LoadedModel],
) -> None:
    hf, loaded = tiny
    found = check_exact(
        Anatomy("gpt2", hf),
        loaded,
        ["h0.1", "h0.3", "n0.5", "h1.0", "h1.2", "n1.7"],
        [
            ("h0.1", "h1.0", "q"),
            ("h0.3", "h1.2", "k"),
            ("n0.5", "h1.0", "v"),
            ("embed", "h0.3", "v"),
            ("h0.1", "n0.5", "mlp"),
            ("h1.2", "n1.7", "mlp"),  # same layer: the MLP reads RESID_MID
            ("n0.5", "n1.7", "mlp"),
            ("h1.0", "logits", "logits"),
            ("embed", "logits", "logits"),
        ],
    )
    assert all(e.exact is not None for e in found.values())
    # Only upstream writes: nothing from layer 1 into layer 1's heads or from n0.5 into n0.5.
    assert ("h1.0", "h1.2", "q") not in found and ("n0.5", "n0.5", "mlp") not in found
    assert ("n1.7", "logits", "logits") in found and ("n1.7", "h1.0", "k") not in found
    ordered = [abs(e.score) for e in found.values()]
    assert ordered == sorted(ordered, reverse=True)


# --- the estimate into the logits against autograd ---------------------------------------------


def live_logit_diff(
    sd: dict[str, torch.Tensor], target: int, distractor: int, x: torch.Tensor
) -> torch.Tensor:
    """m from the final residual stream at the last token, the final layer norm live."""
    w, b = sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"]
    logits = F.layer_norm(x, (x.shape[-1],), w, b) @ sd["transformer.wte.weight"].T
    return logits[target] - logits[distractor]


def test_edges_into_the_logits_are_write_change_times_gradient(
    tiny: tuple[PreTrainedModel, LoadedModel],
) -> None:
    """u -> logits: (write_u - write_u_corrupted) . dm/d(final residual stream), the final layer
    norm live, from the naive model's autograd; its exact value from the naive model too."""
    hf, loaded = tiny
    data = records(3, vocab=400, seed=2)
    ids = ["h0.2", "h1.3", "n0.9", "n1.40"]
    found = by_key(
        edge_scores(
            loaded,
            as_dataset(loaded, data),
            components(*ids),
            reference=Reference.CORRUPTED,
            method="atp",
            verify=100,
        )
    )
    score = dict.fromkeys(["embed", *ids], 0.0)
    exact = dict.fromkeys(["embed", *ids], 0.0)
    for r in data:
        tokens, corrupted = list(r["prompt_ids"]), list(r["corrupted_ids"])  # type: ignore[call-overload]
        t, dis = r["target_ids"][0], r["distractor_ids"][0]  # type: ignore[index]
        last = len(tokens) - 1
        final: dict[str, torch.Tensor] = {}
        m_of = partial(live_logit_diff, hf.state_dict(), t, dis)

        def read(
            state: dict[str, object],
            final: dict[str, torch.Tensor] = final,
            m_of: Callable[[torch.Tensor], torch.Tensor] = m_of,
            last: int = last,
        ) -> torch.Tensor:
            x = state["final"]
            assert isinstance(x, torch.Tensor)
            x.retain_grad()
            final["x"] = x
            return m_of(x[last])

        clean = naive_run(hf, tokens, last, t, dis, read=read)
        other = naive_run(hf, corrupted, last, t, dis)
        x, grad = final["x"].detach(), final["x"].grad
        assert grad is not None
        for u in score:
            if u == "embed":
                dW = clean.resid - other.resid
            else:
                c = parse_target(u)
                assert isinstance(c, ComponentIndex)
                if c.node_type is NodeType.ATTENTION_HEAD:
                    dW = (
                        clean.head_writes[c.layer][c.index] - other.head_writes[c.layer][c.index]
                    ).sum(1)
                else:
                    dW = (
                        clean.neuron_writes[c.layer][:, c.index]
                        - other.neuron_writes[c.layer][:, c.index]
                    )
            score[u] += float((dW * grad).sum()) / len(data)
            exact[u] += float(m_of(x[last]) - m_of(x[last] - dW[last])) / len(data)
    for u in score:
        edge = found[u, "logits", "logits"]
        assert edge.score == pytest.approx(score[u], abs=1e-4), u
        assert edge.exact == pytest.approx(exact[u], abs=1e-4), u


# --- summed over readers: the node scores ------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "reference"),
    [("atp", "corrupted"), ("ig", "corrupted"), ("atp", "mean"), ("atp", "zero"), ("ig", "zero")],
)
def test_a_sources_edges_add_up_to_its_node_score(
    tiny: tuple[PreTrainedModel, LoadedModel], method: str, reference: str
) -> None:
    """With every head and neuron in the circuit, every later reader is a target, so a
    component's edges summed over readers are its node estimate (the gradient at its write is
    the sum of what each reader draws). zero / mean references: "ig" is "atp"."""
    _, loaded = tiny
    data = as_dataset(loaded, records(4, vocab=400, seed=3))
    every = [
        ComponentIndex(NodeType.ATTENTION_HEAD, layer, h)
        for layer in range(N_LAYER)
        for h in range(N_HEAD)
    ]
    every += [
        ComponentIndex(NodeType.MLP_NEURON, layer, n)
        for layer in range(N_LAYER)
        for n in range(D_MLP)
    ]
    edges = edge_scores(
        loaded, data, every, reference=Reference(reference), method=method, ig_steps=3, batch_size=3
    )
    summed: dict[str, float] = {}
    for e in edges:
        summed[e.source] = summed.get(e.source, 0.0) + e.score
    node_method = "atp" if reference != "corrupted" else method
    nodes = attribution(
        loaded, data, methods=[node_method], ablation=reference, ig_steps=3, batch_size=3
    )
    assert len(nodes.rows) == len(every)
    for row in nodes.rows:
        assert summed[row.id] == pytest.approx(row.scores[node_method], abs=2e-4, rel=1e-4), row.id
    assert ("embed" in summed) == (reference == "corrupted")


# --- every architecture ------------------------------------------------------------------------

ARCH_SHAPES = [
    ("llama", {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 4}),
    ("gpt_neox", {"hidden_size": 32, "num_attention_heads": 4}),  # parallel blocks, rotary 1/4
    ("gpt_neox", {"hidden_size": 32, "num_attention_heads": 4, "use_parallel_residual": False}),
]


@pytest.mark.parametrize(
    ("arch", "shape"), ARCH_SHAPES, ids=lambda v: v if isinstance(v, str) else ""
)
def test_path_patching_in_each_architecture(
    tmp_path: Path, arch: str, shape: dict[str, object]
) -> None:
    """Rotary (patched before the rotation by hand, after it by tdb), gated MLPs (gate and up),
    RMSNorm, parallel blocks (whose MLP does not read its own layer's attention)."""
    hf = make_arch_checkpoint(tmp_path, arch, **shape)
    loaded = load_model(tmp_path)
    parallel = arch == "gpt_neox" and shape.get("use_parallel_residual", True)
    found = check_exact(
        Anatomy(arch, hf),
        loaded,
        ["h0.1", "h0.2", "h0.3", "n0.5", "h1.0", "h1.1", "h1.2", "n1.7"],
        [
            ("h0.1", "h1.2", "q"),
            ("h0.3", "h1.0", "k"),
            ("n0.5", "h1.1", "v"),
            ("h0.2", "n1.7", "mlp"),
            ("embed", "h0.1", "q"),
            *([] if parallel else [("h1.0", "n1.7", "mlp")]),
        ],
    )
    assert (("h1.0", "n1.7", "mlp") in found) == (not parallel)


# --- errors ------------------------------------------------------------------------------------


def test_errors_name_the_problem(tiny: tuple[PreTrainedModel, LoadedModel]) -> None:
    _, loaded = tiny
    data = as_dataset(loaded, records(2, vocab=400))
    latent = ComponentIndex(NodeType.AUTOENCODER_LATENT, 1, 42, LatentSite.MLP_OUT)
    cases: list[tuple[list[ComponentIndex], dict[str, object], str]] = [
        ([latent], {}, "am1.42"),
        (components("h2.0"), {}, "no component h2.0"),
        (components("n1.500"), {}, "no component n1.500"),
        (components("h0.1"), {"method": "exact"}, "method must be one of atp, ig"),
        (components("h0.1"), {"verify": -1}, "verify"),
        (components("h0.1"), {"max_edges": 0}, "max_edges"),
    ]
    for comps, options, message in cases:
        with pytest.raises(TdbError, match=message):
            edge_scores(loaded, data, comps, reference=Reference.CORRUPTED, **options)  # type: ignore[arg-type]
    no_corrupted = as_dataset(
        loaded,
        [{k: v for k, v in r.items() if k != "corrupted_ids"} for r in records(2, vocab=400)],
    )
    with pytest.raises(TdbError, match="corrupted"):
        edge_scores(loaded, no_corrupted, components("h0.1"), reference=Reference.CORRUPTED)


def test_max_edges_keeps_the_top_ones(tiny: tuple[PreTrainedModel, LoadedModel]) -> None:
    _, loaded = tiny
    data = as_dataset(loaded, records(3, vocab=400))
    ids = components("h0.1", "n0.3", "h1.2")
    every = edge_scores(loaded, data, ids, reference=Reference.MEAN, method="atp")
    top = edge_scores(
        loaded, data, ids, reference=Reference.MEAN, method="atp", max_edges=4, verify=2
    )
    assert [(e.source, e.target, e.input) for e in top] == [
        (e.source, e.target, e.input) for e in every[:4]
    ]
    assert [e.exact is not None for e in top] == [True, True, False, False]
    assert not any(e.source == "embed" for e in every)  # no embedding reference without corrupted
