"""The `tdb` command. `tdb nodes "PROMPT" --target " Mary" --distractor " John" [-k 10] [--json]`;
`tdb serve [--model DIR] [--port 8000]` for the web page and HTTP API; `tdb task ioi --n 32 >
ioi.jsonl` and `tdb attribute ioi.jsonl --method exact --method ig` over a dataset.

Every error the user can fix prints one line naming the problem and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from tdb.errors import TdbError
from tdb.malloc import keep_freed_memory

if TYPE_CHECKING:
    from tdb.checkpoint import LoadedModel
    from tdb.table.request import NodeRequest

E = TypeVar("E", bound=Enum)


def parse_ids(text: str, flag: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise TdbError(f"{flag}: {text!r} is not a comma-separated list of integers") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tdb", description="A transformer debugger.")
    commands = parser.add_subparsers(dest="command", required=True)
    nodes = commands.add_parser(
        "nodes",
        help="rank the nodes that explain logit(target) - logit(distractor)",
        description="Rank the nodes (MLP neurons, attention heads at (query, key), embeddings, "
        "SAE latents) that explain logit(target) - logit(distractor) at the last token.",
    )
    nodes.add_argument("prompt", nargs="?", help="the prompt text (or use --token-ids)")
    nodes.add_argument(
        "--target", action="append", help="the target token, e.g. ' Mary' (repeatable: mean)"
    )
    nodes.add_argument(
        "--distractor", action="append", help="the distractor token (repeatable: mean)"
    )
    nodes.add_argument("--token-ids", help="the prompt as comma-separated token ids")
    nodes.add_argument("--target-id", help="the target as token ids (comma-separated)")
    nodes.add_argument("--distractor-id", help="the distractor as token ids (comma-separated)")
    nodes.add_argument("--position", default="-1", help="the token whose prediction (default -1)")
    nodes.add_argument("--logprob", action="store_true", help="explain log p(target)")
    nodes.add_argument("--vector", help="explain the final residual stream . vector (.pt/.npy/txt)")
    nodes.add_argument(
        "--ablate",
        action="append",
        default=[],
        metavar="ID[:zero|:mean|:resample]",
        help="ablate a node (repeatable); h<l>.<h>@<q> ablates a head at all keys",
    )
    nodes.add_argument(
        "--mean-prompt", action="append", default=[], help="reference prompt for :mean ablations"
    )
    nodes.add_argument(
        "--trace", metavar="ID[:q|:k|:qk|:v]", help="explain this node's pre-activation instead"
    )
    nodes.add_argument("--downstream", metavar="ID", help="the downstream node of a :v trace")
    nodes.add_argument(
        "--compare-prompt",
        help="a second prompt of the same token count, shown side by side (left, right, diff)",
    )
    nodes.add_argument(
        "--resample-prompt", help="the source of :resample ablations (same token count)"
    )
    nodes.add_argument(
        "--compare-target", help="the compared prompt's own target (default: --target)"
    )
    nodes.add_argument(
        "--compare-distractor", help="the compared prompt's own distractor (default: --distractor)"
    )
    nodes.add_argument(
        "--second-prompt",
        help="older name: --resample-prompt with :resample ablations, else --compare-prompt",
    )
    nodes.add_argument("--verify", default="0", metavar="N", help="ablate the top N nodes")
    nodes.add_argument(
        "--views", action="store_true", help="add token views (logits, per-token effect sums)"
    )
    nodes.add_argument(
        "--view-node", action="append", default=[], metavar="ID", help="add a node's token view"
    )
    nodes.add_argument(
        "--scan",
        metavar="DIR",
        help="a scan explained by `tdb explain --scan DIR`: add each node's explanation and score",
    )
    nodes.add_argument(
        "--sae",
        action="append",
        default=[],
        metavar="DIR_OR_FILE",
        help="attach sparse autoencoders (OpenAI-layout .safetensors, SAELens directory, or a "
        "directory of those; repeatable): their latents become nodes",
    )
    nodes.add_argument(
        "--mlp-nodes",
        choices=("neurons", "latents", "both"),
        default="neurons",
        help="MLP nodes: neurons, SAE latents (demo model: its own SAEs unless --sae), or both",
    )
    nodes.add_argument(
        "--attn-nodes",
        choices=("heads", "latents", "both"),
        default="heads",
        help="attention nodes: heads at (query, key), SAE latents of the attention output, or both",
    )
    nodes.add_argument("-k", type=str, default="10", help="nodes per metric and node type")
    nodes.add_argument(
        "--groups",
        metavar="METRIC,...",
        help="the metrics (columns) to compute, comma-separated (default: all of them; "
        "docs/node-table.md lists them)",
    )
    nodes.add_argument(
        "--node-types",
        metavar="TYPE,...",
        help="show only these node types, comma-separated (e.g. attention_head,mlp_neuron)",
    )
    nodes.add_argument(
        "--sort",
        metavar="METRIC",
        help="order rows by this metric, largest first (signed metrics by magnitude) instead "
        "of the top-k's order (e.g. direct_effect)",
    )
    nodes.add_argument("--model", help="checkpoint directory or cached model name (default: demo)")
    add_device_options(nodes)
    nodes.add_argument("--json", action="store_true", help="print the table as JSON")
    nodes.add_argument(
        "--bos",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="start text prompts with the BOS token (default: when the tokenizer adds one, as "
        "for Llama and Gemma; not for GPT-2 or the demo model)",
    )

    serve = commands.add_parser(
        "serve",
        help="serve the web page and the HTTP API",
        description="Load a model once and serve the node table as a web page (/) and an HTTP "
        "API (/api/..., schema at /openapi.json).",
    )
    serve.add_argument("--model", help="checkpoint directory or cached model name (default: demo)")
    add_device_options(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", default="8000", help="port (default 8000)")
    serve.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also answer requests whose Host is NAME (repeatable); by default only 127.0.0.1, "
        "localhost and [::1] (and the --host address), which stops DNS-rebinding pages",
    )
    serve.add_argument(
        "--max-prompt-tokens", default="512", metavar="N", help="longest prompt (default 512)"
    )
    serve.add_argument(
        "--queue-size", default="8", metavar="N", help="model jobs that may wait (default 8)"
    )
    serve.add_argument(
        "--cache-size", default="256", metavar="N", help="results kept in memory (default 256)"
    )
    serve.add_argument(
        "--scan",
        metavar="DIR",
        help="a finished `tdb scan --out DIR`: serve its component pages (/component/...)",
    )
    add_scan_parser(commands)
    add_explain_parser(commands)
    add_attribution_parsers(commands)
    add_replay_parser(commands)
    return parser


def add_device_options(command: argparse.ArgumentParser, device_map: bool = True) -> None:
    """--device, --dtype and (unless `device_map` is False) --device-map: where the model runs
    (docs/performance.md)."""
    command.add_argument(
        "--device",
        default="auto",
        help="auto (default: CUDA if there is one, else MPS, else the CPU), cpu, cuda, cuda:N, mps",
    )
    command.add_argument(
        "--dtype",
        default="auto",
        help="auto (default: the checkpoint's on a GPU, float32 on the CPU), float32, bfloat16, "
        "float16",
    )
    if not device_map:
        return
    command.add_argument(
        "--device-map",
        metavar="MAP",
        help="spread the layers over devices: auto (accelerate's plan over the visible GPUs), "
        "a JSON file of layer -> device, or LAYER:DEVICE,... (e.g. 0-11:cuda:0,12-23:cuda:1)",
    )


def load_with_device_options(args: argparse.Namespace) -> LoadedModel:
    """`load_model(args.model)` where --device, --dtype and --device-map say."""
    from tdb.checkpoint import load_model

    return load_model(args.model, args.device, args.dtype, args.device_map)


def check_device_options(args: argparse.Namespace) -> None:
    """Bad --device / --dtype answer before anything loads (the map needs the model)."""
    from tdb.device import Placement

    Placement.parse(args.device, args.dtype, args.device_map)


def add_pair_options(command: argparse.ArgumentParser) -> None:
    """The dataset and the options `tdb attribute` and `tdb circuit` share."""
    command.add_argument("dataset", help="JSONL file of prompt pairs (- reads standard input)")
    command.add_argument(
        "--ablation",
        help="replace by the corrupted prompt's value (default when the dataset has corrupted "
        "prompts), zero, or the dataset mean (default otherwise)",
    )
    command.add_argument(
        "--components",
        default="heads,neurons",
        help="heads,neurons,latents (default heads,neurons)",
    )
    command.add_argument("--logprob", action="store_true", help="m = log p(target)")
    command.add_argument("--ig-steps", default="10", help="integrated-gradient steps (default 10)")
    command.add_argument("--batch-size", default="32", help="prompts per forward pass")
    command.add_argument(
        "--sae", action="append", default=[], metavar="DIR_OR_FILE", help="SAEs for latents"
    )
    command.add_argument(
        "--model", help="checkpoint directory or cached model name (default: demo)"
    )
    add_device_options(command)
    command.add_argument("--json", action="store_true", help="print the result as JSON")
    command.add_argument("--quiet", action="store_true", help="no progress bar")


def add_attribution_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    task = commands.add_parser(
        "task",
        help="write a built-in dataset of prompt pairs (JSONL) for `tdb attribute`",
        description="Print N prompt pairs of a built-in task as JSONL (one object a line: prompt, "
        "target, distractor, corrupted), from the demo model's held-out data. See "
        "docs/attribution.md.",
    )
    task.add_argument("name", help="ioi, induction or capitals")
    task.add_argument("--n", default="64", help="number of prompt pairs (default 64)")
    task.add_argument("--seed", default="0", help="random seed (default 0)")
    task.add_argument(
        "--model", help="checkpoint whose tokenizer checks the prompts (default: demo)"
    )

    attribute = commands.add_parser(
        "attribute",
        help="score every component's effect on a task over a dataset of prompt pairs",
        description="Score every attention head, MLP neuron (or SAE latent) by the mean over the "
        "dataset of m(clean) - m(clean with the component's output replaced), m = "
        "logit(target) - logit(distractor) at the last token: exactly (patching) or estimated. "
        "See docs/attribution.md.",
    )
    add_pair_options(attribute)
    attribute.add_argument(
        "--method",
        action="append",
        metavar="METHOD",
        help="ig (default), atp*, atp or exact (repeatable; rows sort by the first)",
    )
    attribute.add_argument(
        "--by", default="component", help="component (default) or position (prompts of one length)"
    )
    attribute.add_argument(
        "--verify", default="0", metavar="N", help="also patch the top N for real (exact)"
    )
    attribute.add_argument("-k", help="show the top K components (default: all)")

    circuit = commands.add_parser(
        "circuit",
        help="find the smallest circuit whose measured faithfulness reaches a target",
        description="Rank components as `tdb attribute` does, then find the smallest set whose "
        "faithfulness (m(circuit) - m(empty)) / (m(full) - m(empty)), measured by patching every "
        "other component from its reference, reaches --target-faithfulness; print it with the "
        "faithfulness curve against random circuits and the edges among its components. See "
        "docs/circuits.md.",
    )
    add_pair_options(circuit)
    circuit.add_argument("--method", default="ig", help="ranking: ig (default), atp*, atp, exact")
    circuit.add_argument("--max-components", default="100", help="largest circuit (default 100)")
    circuit.add_argument(
        "--target-faithfulness", default="0.8", help="faithfulness to reach, in (0, 1] (0.8)"
    )
    circuit.add_argument("--max-edges", default="50", help="edges to report (default 50)")
    circuit.add_argument(
        "--verify", default="0", metavar="N", help="path-patch the top N edges for real"
    )
    circuit.add_argument("--random-draws", default="5", help="random circuits per size (5)")
    circuit.add_argument("--seed", default="0", help="seed of the random circuits")
    circuit.add_argument("--out", metavar="DIR", help="also write circuit.json, .svg, curve.png")


def add_scan_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    scan = commands.add_parser(
        "scan",
        help="find every component's top dataset examples in a corpus (Parquet output)",
        description="For every MLP neuron and attention head, keep its top-k windows of the "
        "corpus, a random sample and statistics; write them as Parquet into --out. Resumes an "
        "unfinished scan in --out. See docs/scan.md.",
    )
    scan.add_argument(
        "--corpus",
        help="a text file (one document per line), a folder of .txt files, .jsonl with a "
        "'text' field, or .parquet with a 'text' column (default: the demo corpus)",
    )
    scan.add_argument("--out", required=True, help="output folder (resumed if it holds this scan)")
    scan.add_argument("--model", help="checkpoint directory or cached model name (default: demo)")
    add_device_options(scan)
    scan.add_argument("-k", default="20", help="top examples (and random ones) per component")
    scan.add_argument("--window", default="64", help="tokens per window")
    scan.add_argument(
        "--context",
        default="16",
        help="left-context tokens run before each window but never ranked (default 16)",
    )
    scan.add_argument("--batch-size", default="32", help="windows per forward pass")
    scan.add_argument("--shard-windows", default="512", help="windows per shard (checkpoint)")
    scan.add_argument("--seed", default="0", help="seed of the random sample")
    scan.add_argument(
        "--sae",
        action="append",
        default=[],
        metavar="DIR_OR_FILE",
        help="also scan this sparse autoencoder's latents (repeatable)",
    )
    scan.add_argument(
        "--latents",
        action="store_true",
        help="also scan the demo model's own SAE latents (demo model only)",
    )
    scan.add_argument(
        "--ray", metavar="ADDRESS", help="run shards on Ray: 'local', 'auto' or a cluster address"
    )
    scan.add_argument("--quiet", action="store_true", help="no progress bar")


def add_explain_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    explain = commands.add_parser(
        "explain",
        help="explain every component of a scan in words, scored by simulation",
        description="Explain every component of a finished `tdb scan` in one sentence with its "
        "evidence, score it by simulating its activations on held-out examples, and write "
        "DIR/explanations.parquet (only what is missing or stale). See docs/explanations.md.",
    )
    explain.add_argument("--scan", required=True, metavar="DIR", help="a finished scan's folder")
    explain.add_argument(
        "--components",
        metavar="KIND,...",
        help="heads, neurons, latents, comma-separated (default: all the scan has)",
    )
    explain.add_argument(
        "--explainer", default="builtin", help="builtin (offline; the default) or llm"
    )
    explain.add_argument(
        "--llm-url",
        metavar="URL",
        help="--explainer llm: an OpenAI-compatible API base, e.g. http://127.0.0.1:8000/v1 "
        "(the key, if any, from TDB_LLM_API_KEY or OPENAI_API_KEY)",
    )
    explain.add_argument("--llm-model", metavar="NAME", help="--explainer llm: the model to ask")
    explain.add_argument(
        "--llm-concurrency", default="4", metavar="N", help="--explainer llm: requests at once (4)"
    )
    explain.add_argument(
        "--llm-timeout", default="120", metavar="SECONDS", help="--explainer llm: per request"
    )
    explain.add_argument(
        "--llm-control",
        action="store_true",
        help="--explainer llm: also a control score (one more request per component)",
    )
    add_device_options(explain, device_map=False)  # the explainer's model runs on one device


def parse_int(text: str, flag: str, minimum: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise TdbError(f"{flag}: {text!r} is not an integer") from None
    if minimum is not None and value < minimum:
        raise TdbError(f"{flag}: must be >= {minimum}, got {value}")
    return value


def parse_choices(text: str | None, flag: str, enum: type[E]) -> list[E] | None:
    """`"a,b"` -> [enum("a"), enum("b")], or a TdbError naming the flag and what is allowed."""
    from tdb.table.request import member

    if text is None:
        return None
    return [member(enum, part.strip(), flag) for part in text.split(",")]


def nodes_request(args: argparse.Namespace) -> NodeRequest:
    """The request `tdb nodes ...` makes: argv parsed into the one type every front end uses."""
    from tdb.metrics import Group
    from tdb.nodes import NodeType
    from tdb.table.request import NodeRequest, second_prompts

    if (args.prompt is None) == (args.token_ids is None):
        raise TdbError("give the prompt either as text or with --token-ids, exactly one of them")
    # --logprob and --vector need no distractor; a trace needs neither (unless through :v).
    uses_tokens = not (args.logprob or args.vector or args.trace)
    target = resolve_choice(args.target, args.target_id, "--target", "--target-id", uses_tokens)
    distractor = resolve_choice(
        args.distractor, args.distractor_id, "--distractor", "--distractor-id", uses_tokens
    )
    groups = parse_choices(args.groups, "--groups", Group)
    sort = parse_choices(args.sort, "--sort", Group)
    if sort is not None and len(sort) != 1:
        raise TdbError("--sort: give one metric")
    compare, resample = second_prompts(
        args.second_prompt, args.ablate, args.compare_prompt, args.resample_prompt
    )
    return NodeRequest(
        prompt=args.prompt if args.token_ids is None else parse_ids(args.token_ids, "--token-ids"),
        target=target,
        distractor=distractor,
        bos=args.bos,
        k=parse_int(args.k, "-k", minimum=0),
        position=parse_int(args.position, "--position"),
        logprob=args.logprob,
        vector=args.vector,
        trace=args.trace,
        downstream=args.downstream,
        ablate=tuple(args.ablate),
        mean_prompts=tuple(args.mean_prompt),
        verify=parse_int(args.verify, "--verify", minimum=0),
        views=args.views,
        view_nodes=tuple(args.view_node),
        saes=tuple(args.sae),
        mlp_nodes=args.mlp_nodes,
        attn_nodes=args.attn_nodes,
        groups=tuple(Group) if groups is None else tuple(groups),
        node_types=parse_choices(args.node_types, "--node-types", NodeType),
        sort=None if sort is None else sort[0],
        compare_prompt=compare,
        resample_prompt=resample,
        compare_target=args.compare_target,
        compare_distractor=args.compare_distractor,
    ).checked()


def run_nodes(args: argparse.Namespace) -> None:
    request = nodes_request(args)
    check_device_options(args)

    from tdb.table import run_request  # imported late: --help and bad flags answer at once

    loaded = load_with_device_options(args)
    table = run_request(loaded, request)
    if args.scan is not None:
        from tdb.scan.explanations import Explanations, with_explanations

        table = with_explanations(table, Explanations.read(Path(args.scan), loaded))
    for warning in table.warnings:
        print(f"tdb: warning: {warning}", file=sys.stderr)
    if args.json:
        json.dump(table.to_json(), sys.stdout)
        sys.stdout.write("\n")
    else:
        from tdb.render import print_node_table

        print_node_table(table, loaded.name)


def run_serve(args: argparse.Namespace) -> None:
    port = parse_int(args.port, "--port", minimum=0)
    if port > 65535:
        raise TdbError(f"--port: must be <= 65535, got {port}")
    max_prompt_tokens = parse_int(args.max_prompt_tokens, "--max-prompt-tokens", minimum=1)
    queue_size = parse_int(args.queue_size, "--queue-size", minimum=0)
    cache_size = parse_int(args.cache_size, "--cache-size", minimum=0)

    check_device_options(args)

    import uvicorn

    from tdb.server.app import create_app

    # Load before binding: a bad --model stops here with its message, and no server starts.
    loaded = load_with_device_options(args)
    routers = []
    if args.scan is not None:
        from tdb.scan.routes import scan_router

        routers.append(scan_router(Path(args.scan)))  # a TdbError when DIR holds no scan
    app = create_app(
        loaded,
        max_prompt_tokens=max_prompt_tokens,
        queue_size=queue_size,
        cache_size=cache_size,
        extra_routers=routers,
        allowed_hosts=serve_hosts(args),
    )
    if args.scan is not None:
        from tdb.scan.routes import serve_explanations

        serve_explanations(app, Path(args.scan))  # a TdbError for a scan of another model
    if args.host not in LOCAL_ADDRESSES:
        print(
            f"tdb: warning: --host {args.host} lets other machines reach this server, which has "
            "no authentication",
            file=sys.stderr,
        )
    print(f"tdb: serving {loaded.name} at http://{args.host}:{port}/", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=port, log_level="warning")


WILDCARD_ADDRESSES = {"0.0.0.0", "::", ""}
LOCAL_ADDRESSES = {"127.0.0.1", "localhost", "::1"}  # always answered (tdb.server.app)


def serve_hosts(args: argparse.Namespace) -> list[str]:
    """The Host names `tdb serve` answers besides the localhost ones: each --allow-host, and the
    address it binds to when that is one address (a name a client may use for it)."""
    bound = [] if args.host in WILDCARD_ADDRESSES | LOCAL_ADDRESSES else [args.host]
    return [*args.allow_host, *(h for h in bound if h not in args.allow_host)]


def resolve_choice(
    texts: list[str] | None, id_text: str | None, flag: str, id_flag: str, required: bool
) -> list[str] | list[int] | None:
    if texts is not None and id_text is not None:
        raise TdbError(f"give {flag} TEXT or {id_flag} N, not both")
    if texts is None and id_text is None:
        if required:
            raise TdbError(f"give exactly one of {flag} TEXT or {id_flag} N")
        return None
    return texts if texts is not None else parse_ids(id_text or "", id_flag)


def demo_sae_dir(model: str | None) -> tuple[str]:
    """`--latents`: the demo model's SAEs, for the demo model only."""
    from tdb.latents import DEMO_SAE_DIR, is_demo_model

    if model is not None and not is_demo_model(Path(model)):
        raise TdbError("--latents: only the demo model has its own SAEs; give --sae DIR_OR_FILE")
    return (str(DEMO_SAE_DIR),)


def run_scan(args: argparse.Namespace) -> None:

    from tdb.scan import ScanSettings, scan
    from tdb.scan.corpus import DEMO_CORPUS
    from tdb.scan.progress import ScanProgressBar

    settings = ScanSettings(
        model=args.model,
        k=parse_int(args.k, "-k", minimum=1),
        window=parse_int(args.window, "--window", minimum=1),
        context=parse_int(args.context, "--context", minimum=0),
        batch_size=parse_int(args.batch_size, "--batch-size", minimum=1),
        shard_windows=parse_int(args.shard_windows, "--shard-windows", minimum=1),
        seed=parse_int(args.seed, "--seed", minimum=0),
        saes=tuple(args.sae) + (demo_sae_dir(args.model) if args.latents else ()),
        device=args.device,
        dtype=args.dtype,
        device_map=args.device_map,
    )
    check_device_options(args)
    corpus = Path(args.corpus) if args.corpus else DEMO_CORPUS
    if args.quiet:
        result = scan(corpus, Path(args.out), settings, ray_address=args.ray)
    else:
        with ScanProgressBar() as bar:
            result = scan(corpus, Path(args.out), settings, ray_address=args.ray, progress=bar)
    what = "already complete" if result.shards_run == 0 else f"{result.shards_run} shards scanned"
    print(
        f"{result.out}: {result.n_docs:,} documents, {result.n_windows:,} windows, "
        f"{result.n_tokens:,} tokens in {result.n_shards} shards ({what})"
    )


def run_explain(args: argparse.Namespace) -> None:
    from tdb.explain import explain
    from tdb.explain.llm import component_name
    from tdb.explain.llm_client import LlmConfig

    kinds = None if args.components is None else [k.strip() for k in args.components.split(",")]
    args.device_map = None  # no --device-map: one device
    check_device_options(args)
    llm = None
    if args.explainer == "llm" and (args.llm_url is None or args.llm_model is None):
        raise TdbError("--explainer llm: needs --llm-url URL and --llm-model NAME")
    if args.explainer == "llm":
        llm = LlmConfig(
            args.llm_url,
            args.llm_model,
            concurrency=parse_int(args.llm_concurrency, "--llm-concurrency", minimum=1),
            timeout_s=parse_float(args.llm_timeout, "--llm-timeout"),
            control=args.llm_control,
        )
    elif args.llm_url is not None or args.llm_model is not None or args.llm_control:
        raise TdbError("--llm-url, --llm-model, --llm-control: only with --explainer llm")
    result = explain(
        Path(args.scan), kinds, args.explainer, llm=llm, device=args.device, dtype=args.dtype
    )
    print(
        f"{result.path}: {result.explained:,} components explained, "
        f"{result.controlled:,} control scores, {result.total:,} rows"
    )
    if result.failed:
        (key, why), n = result.failed[0], len(result.failed)
        first = f"{component_name(key)}: {why}{', ...' * (n > 1)}"
        raise TdbError(
            f"{n:,} component{'s' * (n != 1)} not explained ({first}); "
            "the others are saved: run again to retry them"
        )


def run_task(args: argparse.Namespace) -> None:
    n = parse_int(args.n, "--n", minimum=1)
    seed = parse_int(args.seed, "--seed")

    from tdb.attribution.tasks import Task, task_records
    from tdb.checkpoint import load_model
    from tdb.table.request import member

    task = member(Task, args.name, "task")
    loaded = load_model(args.model)
    for record in task_records(task, n, seed, loaded.tokenizer):
        sys.stdout.write(json.dumps(record) + "\n")


def run_attribute(args: argparse.Namespace) -> None:
    from tdb.attribution.run import check_options, run_attribution

    options = check_options(  # bad flags answer before the model loads
        methods=args.method or ["ig"],
        ablation=args.ablation,
        components=args.components,
        by=args.by,
        verify=parse_int(args.verify, "--verify", minimum=0),
        k=None if args.k is None else parse_int(args.k, "-k", minimum=1),
        logprob=args.logprob,
        ig_steps=parse_int(args.ig_steps, "--ig-steps", minimum=1),
        batch_size=parse_int(args.batch_size, "--batch-size", minimum=1),
        saes=tuple(args.sae),
    )

    check_device_options(args)

    from tdb.render import AttributionProgressBar, print_attribution

    loaded = load_with_device_options(args)
    with AttributionProgressBar(quiet=args.quiet) as bar:
        result = run_attribution(loaded, args.dataset, options, bar)
    if args.json:
        json.dump(result.to_json(), sys.stdout)
        sys.stdout.write("\n")
    else:
        print_attribution(result, loaded.name)


def parse_float(text: str, flag: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise TdbError(f"{flag}: {text!r} is not a number") from None


def run_circuit(args: argparse.Namespace) -> None:
    from tdb.attribution.run import check_options

    settings = {
        "max_components": parse_int(args.max_components, "--max-components", minimum=1),
        "target_faithfulness": parse_float(args.target_faithfulness, "--target-faithfulness"),
        "max_edges": parse_int(args.max_edges, "--max-edges", minimum=0),
        "verify": parse_int(args.verify, "--verify", minimum=0),
        "random_draws": parse_int(args.random_draws, "--random-draws", minimum=0),
        "seed": parse_int(args.seed, "--seed"),
    }
    if not 0 < settings["target_faithfulness"] <= 1:
        raise TdbError(f"--target-faithfulness: must be in (0, 1], got {args.target_faithfulness}")
    check_options(  # bad flags answer before the model loads
        methods=[args.method],
        ablation=args.ablation,
        components=args.components,
        ig_steps=parse_int(args.ig_steps, "--ig-steps", minimum=1),
        batch_size=parse_int(args.batch_size, "--batch-size", minimum=1),
    )

    check_device_options(args)

    from tdb.circuit import find_circuit
    from tdb.render import AttributionProgressBar, print_circuit

    loaded = load_with_device_options(args)
    with AttributionProgressBar(quiet=args.quiet) as bar:
        circuit = find_circuit(
            loaded,
            args.dataset,
            method=args.method,
            ablation=args.ablation,
            components=args.components,
            logprob=args.logprob,
            ig_steps=int(args.ig_steps),
            saes=tuple(args.sae),
            batch_size=int(args.batch_size),
            progress=bar,
            **settings,  # type: ignore[arg-type]
        )
    if args.out is not None:
        from tdb.circuit.graph import write_figures

        write_figures(circuit, loaded.model.config.n_layer, Path(args.out))
    if args.json:
        json.dump(circuit.to_json(), sys.stdout)
        sys.stdout.write("\n")
    else:
        print_circuit(circuit, loaded.name)


def add_replay_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    replay = commands.add_parser(
        "replay",
        help="recompute a saved investigation and report what changed",
        description="Recompute every step of an investigation file (the web page's Save) and "
        "compare each response with the saved one, numbers within a tolerance. Exit 0 when all "
        "are the same, 1 when some differ, 2 on a bad file. See docs/investigations.md.",
    )
    replay.add_argument("file", help="an investigation file (.json) saved by the page")
    replay.add_argument(
        "--model", help="checkpoint directory or cached model name (default: the file's model)"
    )
    replay.add_argument("--json", action="store_true", help="print the report as JSON")
    replay.add_argument("--rtol", default="1e-4", help="relative tolerance (default 1e-4)")
    replay.add_argument("--atol", default="1e-5", help="absolute tolerance (default 1e-5)")


def parse_tolerance(text: str, flag: str) -> float:
    value = parse_float(text, flag)
    if not value >= 0 or value == float("inf"):
        raise TdbError(f"{flag}: must be a finite number >= 0, got {text}")
    return value


def run_replay(args: argparse.Namespace) -> int:
    """`tdb replay FILE`: 0 when every step is the same, 1 when some differ."""
    rtol = parse_tolerance(args.rtol, "--rtol")
    atol = parse_tolerance(args.atol, "--atol")
    from tdb.checkpoint import load_model
    from tdb.investigation import read_investigation
    from tdb.replay import replay

    investigation = read_investigation(Path(args.file))
    model = args.model
    if model is None and investigation.model.name != "demo":
        model = investigation.model.name
    try:
        loaded = load_model(model)
    except TdbError as e:
        if args.model is not None:
            raise
        raise TdbError(f"{e} (the file's model; give another with --model)") from None
    report = replay(loaded, investigation, rtol=rtol, atol=atol)
    if args.json:
        json.dump(report.to_json(), sys.stdout)
        sys.stdout.write("\n")
    else:
        print("\n".join(report.lines()))
    return 0 if report.same else 1


def check_utf8(argv: Sequence[str]) -> None:
    """Refuse arguments that are not UTF-8 text. Python hands such bytes over as lone surrogates
    (`tdb nodes $'\\xff'` arrives as '\\udcff'), which the tokenizer and the JSON output
    cannot take."""
    for arg in argv:
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            try:  # show the bytes as given
                shown = arg.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            except UnicodeEncodeError:  # a surrogate that stands for no byte
                shown = arg.encode("utf-8", "backslashreplace").decode("utf-8")
            raise TdbError(f"argument '{shown}' is not valid UTF-8 text") from None


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        check_utf8(argv)
    except TdbError as e:
        print(f"tdb: error: {e}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    try:
        if args.command == "nodes":
            run_nodes(args)
        elif args.command == "serve":
            run_serve(args)
        elif args.command == "scan":
            run_scan(args)
        elif args.command == "explain":
            run_explain(args)
        elif args.command == "task":
            run_task(args)
        elif args.command == "attribute":
            run_attribute(args)
        elif args.command == "circuit":
            run_circuit(args)
        elif args.command == "replay":
            return run_replay(args)
    except TdbError as e:
        print(f"tdb: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
