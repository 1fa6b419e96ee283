"""tdb: a transformer debugger. `node_table(load_model(), prompt, target, distractor)`."""

from tdb.checkpoint import LoadedModel, load_model
from tdb.metrics import Group
from tdb.nodes import NodeIndex, NodeType, parse_node_id
from tdb.table import NodeTable, node_table

__all__ = [
    "Group",
    "LoadedModel",
    "NodeIndex",
    "NodeTable",
    "NodeType",
    "load_model",
    "node_table",
    "parse_node_id",
]
