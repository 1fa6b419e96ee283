"""The model architectures (`gpt2`, `llama`, `neox`), their shared pieces (`layers`), and the
interface they all share (`base`).

>>> from tdb.checkpoint import load_model
>>> load_model("path/to/llama-checkpoint").model  # a tdb.models.llama.Llama
"""
