"""The built-in demo model: a 3-layer GPT-2 trained by `tdb.demo.train`, shipped in `checkpoint/`.

    >>> from tdb.checkpoint import load_model
    >>> loaded = load_model(None)  # the demo model
    $ python -m tdb.demo.evaluate  # its held-out IOI, induction and capital scores

Modules: `data` (generators and the held-out split), `bible` (the prose), `tokenizer` (BPE),
`batches` (the mix packed into rows), `train`, `evaluate`. See docs/model-card.md.
"""
