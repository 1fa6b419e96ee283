"""The `tdb` command. `tdb nodes "PROMPT" --target " Mary" --distractor " John" [-k 10] [--json]`.

Every error the user can fix prints one line naming the problem and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from tdb.errors import TdbError


def parse_ids(text: str, flag: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise TdbError(f"{flag}: {text!r} is not a comma-separated list of integers") from None


def parse_id(text: str, flag: str) -> int:
    ids = parse_ids(text, flag)
    if len(ids) != 1:
        raise TdbError(f"{flag}: expected one integer token id, got {text!r}")
    return ids[0]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tdb", description="A transformer debugger.")
    commands = parser.add_subparsers(dest="command", required=True)
    nodes = commands.add_parser(
        "nodes",
        help="rank the nodes that explain logit(target) - logit(distractor)",
        description="Rank the nodes (MLP neurons, attention heads at (query, key), embeddings) "
        "that explain logit(target) - logit(distractor) at the last token.",
    )
    nodes.add_argument("prompt", nargs="?", help="the prompt text (or use --token-ids)")
    nodes.add_argument("--target", help="the target token, e.g. ' Mary' (one token)")
    nodes.add_argument("--distractor", help="the distractor token, e.g. ' John' (one token)")
    nodes.add_argument("--token-ids", help="the prompt as comma-separated token ids")
    nodes.add_argument("--target-id", help="the target as a token id")
    nodes.add_argument("--distractor-id", help="the distractor as a token id")
    nodes.add_argument("-k", type=str, default="10", help="nodes per metric and node type")
    nodes.add_argument("--model", help="checkpoint directory or cached model name (default: demo)")
    nodes.add_argument("--json", action="store_true", help="print the table as JSON")
    return parser


def run_nodes(args: argparse.Namespace) -> None:
    try:
        k = int(args.k)
    except ValueError:
        raise TdbError(f"-k: {args.k!r} is not an integer") from None
    if k < 0:
        raise TdbError(f"-k: must be >= 0, got {k}")
    if (args.prompt is None) == (args.token_ids is None):
        raise TdbError("give the prompt either as text or with --token-ids, exactly one of them")
    target = resolve_choice(args.target, args.target_id, "--target", "--target-id")
    distractor = resolve_choice(
        args.distractor, args.distractor_id, "--distractor", "--distractor-id"
    )
    prompt = args.prompt if args.token_ids is None else parse_ids(args.token_ids, "--token-ids")

    from tdb.checkpoint import load_model  # imported late: --help and bad flags answer at once
    from tdb.table import node_table

    loaded = load_model(args.model)
    table = node_table(loaded, prompt, target, distractor, k=k)
    if args.json:
        json.dump(table.to_json(), sys.stdout)
        sys.stdout.write("\n")
    else:
        from tdb.render import print_node_table

        print_node_table(table, loaded.name)


def resolve_choice(text: str | None, id_text: str | None, flag: str, id_flag: str) -> str | int:
    if (text is None) == (id_text is None):
        raise TdbError(f"give exactly one of {flag} TEXT or {id_flag} N")
    return text if text is not None else parse_id(id_text or "", id_flag)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "nodes":
            run_nodes(args)
    except TdbError as e:
        print(f"tdb: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
