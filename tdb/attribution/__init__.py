"""Task-level attribution over datasets of prompt pairs (docs/attribution.md).

>>> from tdb.attribution import attribution
>>> result = attribution(loaded, "ioi.jsonl", methods=["exact", "atp*"])
"""

from tdb.attribution.components import ComponentKind
from tdb.attribution.dataset import Dataset, PromptPair, load_dataset
from tdb.attribution.run import (
    DEFAULT_METHOD,
    Attribution,
    By,
    ComponentScore,
    Method,
    Progress,
    Reference,
    attribute,
    attribution,
)
from tdb.attribution.tasks import Task, task_records

__all__ = [
    "DEFAULT_METHOD",
    "Attribution",
    "By",
    "ComponentKind",
    "ComponentScore",
    "Dataset",
    "Method",
    "Progress",
    "PromptPair",
    "Reference",
    "Task",
    "attribute",
    "attribution",
    "load_dataset",
    "task_records",
]
