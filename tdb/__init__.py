"""tdb: a transformer debugger. `node_table(load_model(), prompt, target, distractor)`;
`run_request(loaded, NodeRequest(...))`; `loaded.run(prompts, cache=[...])` (docs/python.md)."""

from tdb.activation_cache import ActivationCache, RunResult
from tdb.attribution import Attribution, attribute, attribution
from tdb.checkpoint import LoadedModel, load_model
from tdb.hooks import HookPoint, Hooks, patch
from tdb.metrics import Group
from tdb.nodes import LatentSite, NodeIndex, NodeType, parse_node_id
from tdb.sae import AttachedSae, load_saes
from tdb.table import NodeRequest, NodeTable, node_table, run_request

__all__ = [
    "ActivationCache",
    "AttachedSae",
    "Attribution",
    "Group",
    "HookPoint",
    "Hooks",
    "LatentSite",
    "LoadedModel",
    "NodeIndex",
    "NodeRequest",
    "NodeTable",
    "NodeType",
    "RunResult",
    "attribute",
    "attribution",
    "load_model",
    "load_saes",
    "node_table",
    "parse_node_id",
    "patch",
    "run_request",
]
