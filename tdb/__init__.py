"""tdb: a transformer debugger. `node_table(load_model(), prompt, target, distractor)`."""

from tdb.checkpoint import LoadedModel, load_model
from tdb.metrics import Group
from tdb.nodes import LatentSite, NodeIndex, NodeType, parse_node_id
from tdb.sae import AttachedSae, load_saes
from tdb.table import NodeTable, node_table

__all__ = [
    "AttachedSae",
    "Group",
    "LatentSite",
    "LoadedModel",
    "NodeIndex",
    "NodeTable",
    "NodeType",
    "load_model",
    "load_saes",
    "node_table",
    "parse_node_id",
]
