"""tdb: a transformer debugger. `node_table(load_model(), prompt, target, distractor)`;
`run_request(loaded, NodeRequest(...))`; `loaded.run(prompts, cache=[...])` (docs/python.md).

Each name below is imported from its module on first use (PEP 562), so that `import tdb` (and
every `tdb` command) loads only what it runs."""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tdb.activation_cache import ActivationCache, RunResult
    from tdb.attribution import Attribution, attribute, attribution
    from tdb.checkpoint import LoadedModel, load_model
    from tdb.hooks import HookPoint, Hooks, patch
    from tdb.metrics import Group
    from tdb.nodes import LatentSite, NodeIndex, NodeType, parse_node_id
    from tdb.sae import AttachedSae, load_saes
    from tdb.table import NodeRequest, NodeTable, node_table, run_request

MODULE_OF = {
    "ActivationCache": "tdb.activation_cache",
    "RunResult": "tdb.activation_cache",
    "Attribution": "tdb.attribution",
    "attribute": "tdb.attribution",
    "attribution": "tdb.attribution",
    "LoadedModel": "tdb.checkpoint",
    "load_model": "tdb.checkpoint",
    "HookPoint": "tdb.hooks",
    "Hooks": "tdb.hooks",
    "patch": "tdb.hooks",
    "Group": "tdb.metrics",
    "LatentSite": "tdb.nodes",
    "NodeIndex": "tdb.nodes",
    "NodeType": "tdb.nodes",
    "parse_node_id": "tdb.nodes",
    "AttachedSae": "tdb.sae",
    "load_saes": "tdb.sae",
    "NodeRequest": "tdb.table",
    "NodeTable": "tdb.table",
    "node_table": "tdb.table",
    "run_request": "tdb.table",
}

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


def __getattr__(name: str) -> Any:
    if name not in MODULE_OF:
        raise AttributeError(f"module 'tdb' has no attribute {name!r}")
    value = getattr(importlib.import_module(MODULE_OF[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *MODULE_OF])


class Package(types.ModuleType):
    """`tdb.attribution` is the function, as it was when this module imported it eagerly:
    importing the subpackage of the same name (which sets the package's attribute to the
    module) leaves it alone."""

    def __setattr__(self, name: str, value: object) -> None:
        if isinstance(value, types.ModuleType) and MODULE_OF.get(name) == f"tdb.{name}":
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = Package
