"""How a request names its direction of interest: target / distractor tokens, log-prob, a
residual-stream vector, or a node's pre-activation (a trace upstream).

    >>> make_direction(loaded, tokens, " Mary", " John")                 # LogitDiff
    >>> make_direction(loaded, tokens, None, None, trace="h1.2@9:3:q")     # AttentionLogit
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from tdb.checkpoint import LoadedModel, load_tensors_only
from tdb.direction.kinds import (
    AttentionLogit,
    Direction,
    HeadValueWrite,
    LatentPreActivation,
    LogitDiff,
    LogProb,
    NeuronPreActivation,
    ResidualDirection,
)
from tdb.errors import TdbError, reason
from tdb.hooks import HookPoint, Hooks, compose
from tdb.latents import check_saes, latent_sizes
from tdb.models.base import TransformerModel
from tdb.nodes import NodeIndex, NodeType, check_node, parse_node_id
from tdb.sae import AttachedSae
from tdb.tokens import Tokenizer

TokenSpec = str | int
TRACE_MODES = ("q", "k", "qk", "v")


def resolve_token_list(
    tokenizer: Tokenizer, spec: TokenSpec | Sequence[TokenSpec] | None, what: str
) -> tuple[int, ...]:
    if spec is None:
        return ()
    specs = [spec] if isinstance(spec, str | int) else list(spec)
    return tuple(
        tokenizer.single_token(s, what) if isinstance(s, str) else tokenizer.check_id(s, what)
        for s in specs
    )


def load_vector(path: str | Path, d_model: int) -> Tensor:
    """A residual-stream direction from .pt/.pth (torch), .npy (numpy) or text (numbers)."""
    path = Path(path)
    if not path.is_file():
        raise TdbError(f"--vector: {path} is not a file")
    vector: object
    try:
        if path.suffix in {".pt", ".pth"}:
            vector = load_tensors_only(path)
        elif path.suffix == ".npy":
            import numpy as np

            array = np.load(path, allow_pickle=False)
            if array.dtype.kind not in "fiu":  # floats, signed or unsigned integers
                raise TdbError(f"{path} holds {array.dtype}, not real numbers")
            vector = torch.from_numpy(array.astype(np.float32))
        else:
            vector = torch.tensor([float(x) for x in path.read_text().replace(",", " ").split()])
    except TdbError as e:
        raise TdbError(f"--vector: {e}") from None
    # torch's restricted unpickler and numpy's reader report a refused or broken file in many
    # ways (UnpicklingError, EOFError, ValueError, RuntimeError, ...); each means the same here.
    except Exception as e:
        raise TdbError(f"--vector: cannot read {path}: {reason(e)}") from None
    if not isinstance(vector, Tensor) or vector.shape != (d_model,):
        shape = tuple(vector.shape) if isinstance(vector, Tensor) else type(vector).__name__
        raise TdbError(f"--vector: {path} must hold {d_model} numbers (d_model), got {shape}")
    if vector.is_complex() or not bool(torch.isfinite(vector.float()).all()):
        raise TdbError(f"--vector: {path} must hold finite real numbers")
    return vector.float()


def trace_ids(node: NodeIndex) -> dict[str, str]:
    """The traces a node offers, by name: a head at a (query, key) pair through each of
    q, k, qk, v; a neuron or a latent through its pre-activation (`"pre"`); else none. The page
    offers these ids as they are (ids are printed by Python only)."""
    if node.node_type is NodeType.ATTENTION_HEAD and node.key_token is not None:
        return {mode: f"{node.id}:{mode}" for mode in TRACE_MODES}
    if node.node_type in (NodeType.MLP_NEURON, NodeType.AUTOENCODER_LATENT):
        return {"pre": node.id}
    return {}


def parse_trace(text: str) -> tuple[NodeIndex, str | None]:
    """`h1.2@9:3:q` -> (node, "q"); `n1.5@3` -> (node, None)."""
    head, _, mode = text.rpartition(":")
    if mode in TRACE_MODES and head:
        return parse_node_id(head), mode
    return parse_node_id(text), None


def trace_direction(
    model: TransformerModel,
    tokens: list[int],
    text: str,
    downstream: Direction | None,
    saes: Sequence[AttachedSae] = (),
) -> Direction:
    """The direction that makes a node's pre-activation the thing to explain."""
    node, mode = parse_trace(text)
    check_node(node, model.config, len(tokens), "--trace", latent_sizes(saes))
    assert node.layer is not None or node.node_type is NodeType.EMBEDDING
    if node.node_type is NodeType.AUTOENCODER_LATENT:
        if mode is not None:
            raise TdbError(f"--trace {text}: :{mode} applies to attention heads only")
        assert node.layer is not None and node.site is not None
        attached = check_saes(saes, model.config)[(node.site, node.layer)]
        reads = model.block(node.layer).mlp_input
        return LatentPreActivation(attached, node.token, node.index, reads)
    if node.node_type is NodeType.MLP_NEURON:
        if mode is not None:
            raise TdbError(f"--trace {text}: :{mode} applies to attention heads only")
        assert node.layer is not None
        reads = model.block(node.layer).mlp_input
        return NeuronPreActivation(node.layer, node.token, node.index, reads)
    if node.node_type is not NodeType.ATTENTION_HEAD or node.key_token is None:
        raise TdbError(
            f"--trace {text}: trace an MLP neuron (n<layer>.<neuron>@<token>), an SAE latent "
            "(a<a|p|m><layer>.<latent>@<token>) or an attention head at a (query, key) pair "
            "(h<layer>.<head>@<query>:<key>[:q|:k|:qk|:v])"
        )
    assert node.layer is not None
    if mode != "v":
        through = "qk" if mode is None else mode
        return AttentionLogit(node.layer, node.index, node.token, node.key_token, through)  # type: ignore[arg-type]
    if downstream is None:
        raise TdbError(
            f"--trace {text}: a trace through the value projects the head's write on a "
            "downstream gradient: give --target/--distractor (or --logprob, --vector) or "
            "--downstream ID"
        )
    prob, grad = value_trace_inputs(model, tokens, node, downstream)
    name = downstream.to_json().get("node", downstream.kind)
    return HeadValueWrite(node.layer, node.index, node.token, node.key_token, prob, grad, str(name))


def value_trace_inputs(
    model: TransformerModel, tokens: list[int], node: NodeIndex, downstream: Direction
) -> tuple[float, Tensor]:
    """The head's probability at (query, key), and d(downstream)/d(residual stream at the query
    right after the head's layer), from one forward and one backward pass."""
    assert node.layer is not None and node.key_token is not None
    layer = node.layer
    if downstream.read_point.upstream_layers(model.config.n_layer, True) <= layer:
        raise TdbError(f"--downstream must read the residual stream after layer {layer}")
    saved: dict[str, Tensor] = {}

    def keep(name: str, at_layer: int | None = None) -> Callable[[Tensor, int | None], None]:
        def hook(x: Tensor, hook_layer: int | None) -> None:
            if hook_layer == at_layer:
                saved[name] = x

        return hook

    def leaf(x: Tensor, _: int | None) -> Tensor:
        return x.detach().requires_grad_(True)

    hooks = Hooks(
        {
            HookPoint.RESID_EMBED: leaf,
            HookPoint.RESID_MID: keep("mid", layer),
            HookPoint.ATTN_PROBS: keep("probs", layer),
        }
    )
    point = downstream.read_point
    hooks = compose(hooks, Hooks({point.hook: keep("read", point.layer)}))
    with torch.enable_grad():
        model(torch.tensor([tokens]), hooks, logit_positions=torch.tensor([len(tokens) - 1]))
        value = downstream.read(model, saved["read"][0])
        (grad,) = torch.autograd.grad(value, saved["mid"])
    prob = float(saved["probs"][0, node.index, node.token, node.key_token].detach())
    return prob, grad[0, node.token].detach()


def make_direction(
    loaded: LoadedModel,
    tokens: list[int],
    target: TokenSpec | Sequence[TokenSpec] | None,
    distractor: TokenSpec | Sequence[TokenSpec] | None,
    position: int = -1,
    logprob: bool = False,
    vector: str | Path | None = None,
    trace: str | None = None,
    downstream: str | None = None,
    saes: Sequence[AttachedSae] = (),
) -> Direction:
    """The direction of interest a request names (see `node_table` for the arguments)."""
    model, tokenizer = loaded.model, loaded.tokenizer
    if not -len(tokens) <= position < len(tokens):
        raise TdbError(f"position {position} is outside the prompt's {len(tokens)} tokens")
    position %= len(tokens)
    targets = resolve_token_list(tokenizer, target, "target")
    distractors = resolve_token_list(tokenizer, distractor, "distractor")
    # A trace explains a node's pre-activation: only a trace through a head's value (`:v`)
    # reads a downstream direction, so a trace needs no target unless it is given one.
    given = bool(targets or distractors or logprob or vector is not None)
    base = None
    if given or trace is None:
        base = base_direction(model, targets, distractors, position, logprob, vector)
    if trace is None:
        if downstream is not None:
            raise TdbError("--downstream applies only with --trace ...:v")
        assert base is not None
        return base
    down = base if downstream is None else trace_direction(model, tokens, downstream, None, saes)
    return trace_direction(model, tokens, trace, down, saes)


def base_direction(
    model: TransformerModel,
    targets: tuple[int, ...],
    distractors: tuple[int, ...],
    position: int,
    logprob: bool,
    vector: str | Path | None,
) -> Direction:
    """The direction at the output: logit difference, log-prob or a residual-stream vector."""
    if vector is not None:
        if targets or distractors or logprob:
            raise TdbError("--vector replaces --target/--distractor/--logprob: give only one")
        return ResidualDirection(load_vector(vector, model.config.d_model), position, str(vector))
    if logprob:
        if len(targets) != 1 or distractors:
            raise TdbError("--logprob explains log p(target): give one target and no distractor")
        return LogProb(targets[0], position)
    if not targets or not distractors:
        raise TdbError(
            "give a target and a distractor (or --logprob with a target, or --vector FILE)"
        )
    return LogitDiff(targets, distractors, position)
