"""Explanations: every component of a scan explained in a sentence, with its evidence, and scored
by simulating its activations from that evidence. See docs/explanations.md.

    >>> from tdb.explain import explain
    >>> explain(Path("scan_dir"))  # writes scan_dir/explanations.parquet
"""

from tdb.explain.run import ExplainResult, explain

__all__ = ["ExplainResult", "explain"]
