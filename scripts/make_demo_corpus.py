"""Write tdb/demo/corpus.txt, the small corpus `tdb scan` reads when given no --corpus.

    python scripts/make_demo_corpus.py

One document per line: a few pieces from the demo model's own training generators
(`tdb.demo.data`: IOI sentences, sentences about names, capital facts, repeated random tokens)
mixed with short prose written for this file. Seeded, so the file is reproducible; the Bible
text of the training mix is left out (it needs a system package).
"""

from __future__ import annotations

import random
from pathlib import Path

from tdb.checkpoint import DEMO_MODEL_DIR
from tdb.demo import data
from tdb.tokens import Tokenizer

OUT = Path(__file__).parent.parent / "tdb" / "demo" / "corpus.txt"
SEED = 7
N_DOCS = 600

PROSE = (
    "The rain stopped before noon, and the streets dried quickly in the wind.",
    "A small boat drifted past the harbour wall while the gulls circled overhead.",
    "Bread rises faster in a warm kitchen, so the baker lit the oven early.",
    "The train was late again, and the platform filled with tired commuters.",
    "Snow covered the hills for three weeks, and the roads were closed twice.",
    "She counted the coins twice and found that one was missing.",
    "The old clock in the hall struck seven, then stopped for good.",
    "Nobody knew who had planted the apple tree behind the school.",
    "The river rose after the storm and flooded the low fields by the mill.",
    "He wrote the numbers one, two, three and four on the board.",
    "The market opens at dawn, when the first carts arrive from the farms.",
    "A letter came on Monday, but the envelope had no name on it.",
    "The lamp flickered, and the room went dark for a moment.",
    "They walked along the beach until the tide turned.",
    "The recipe needs two eggs, a cup of flour and a pinch of salt.",
    "Every evening the dog waited by the gate for the children.",
    "The museum keeps its oldest maps in a cold room without windows.",
    "It was the longest day of the year, and the light lasted until late.",
    "The team lost the first game but won the next three.",
    "A strong wind blew the kite over the trees and out of sight.",
)


def induction_text(rng: random.Random, tokenizer: Tokenizer) -> str:
    ids = data.induction_document(rng, tokenizer.d_vocab, frozenset({0}))
    text = "".join(tokenizer.token_text(i) for i in ids)
    return text.replace("\ufffd", "").strip()  # drop halves of multi-byte characters


def document(rng: random.Random, tokenizer: Tokenizer) -> str:
    pieces = []
    for _ in range(rng.randint(2, 5)):
        kind = rng.choices(("ioi", "names", "capitals", "induction", "prose"), (4, 2, 2, 1, 3))[0]
        if kind == "ioi":
            pieces.append(data.ioi_document(rng))
        elif kind == "names":
            pieces.append(data.simple_name_document(rng))
        elif kind == "capitals":
            pieces.append(data.capital_document(rng))
        elif kind == "induction":
            pieces.append(induction_text(rng, tokenizer))
        else:
            pieces.append(rng.choice(PROSE))
    return " ".join(pieces).replace("\n", " ")


def main() -> None:
    rng = random.Random(SEED)
    tokenizer = Tokenizer.from_dir(DEMO_MODEL_DIR, 4096)
    OUT.write_text(
        "".join(document(rng, tokenizer) + "\n" for _ in range(N_DOCS)), encoding="utf-8"
    )
    print(f"wrote {OUT} ({OUT.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
