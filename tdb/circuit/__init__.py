"""Circuits over a dataset of prompt pairs: the smallest set of components whose measured
faithfulness reaches a target, the curve against random circuits, and edges (docs/circuits.md).

    >>> from tdb.circuit import find_circuit
    >>> circuit = find_circuit(loaded, "ioi.jsonl", target_faithfulness=0.8)
"""

from tdb.circuit.result import Circuit, CurvePoint, Edge, faithfulness
from tdb.circuit.search import find_circuit

__all__ = ["Circuit", "CurvePoint", "Edge", "faithfulness", "find_circuit"]
