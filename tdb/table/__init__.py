"""The node table: a request (`NodeRequest`) in, ranked nodes (`NodeTable`) out.

    >>> table = node_table(load_model(), "When Mary and John went to the store, John gave a "
    ...                    "drink to", target=" Mary", distractor=" John", k=10)

`request` (what is asked), `run` (the one function that answers it), `result` (the table and
its JSON document).
"""

from tdb.table.request import NodeRequest, second_prompts
from tdb.table.result import NodeTable, TokenViews, Verification
from tdb.table.run import node_table, run_request

__all__ = [
    "NodeRequest",
    "NodeTable",
    "TokenViews",
    "Verification",
    "node_table",
    "run_request",
    "second_prompts",
]
