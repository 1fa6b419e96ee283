"""Reading a corpus: documents with stable ids, from four formats.

    >>> for doc in read_corpus(Path("corpus.jsonl")):
    ...     doc.doc_id, doc.text

| `PATH` | one document is | `doc_id` |
|---|---|---|
| a folder | one `*.txt` file (recursively, sorted by relative path) | its place in that order |
| `*.jsonl` | the `text` field of one line | the line number (0-based) |
| `*.parquet` | the `text` column of one row | the row number (0-based) |
| any other file | one line of text | the line number (0-based) |

Ids count empty documents too (a blank line is document n, it just has no windows), so an id
always points back at a line or row of the input.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tdb.errors import TdbError

DEMO_CORPUS = Path(__file__).parent.parent / "demo" / "corpus.txt"


@dataclass(frozen=True)
class Document:
    doc_id: int
    text: str


def _folder_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.txt") if p.is_file())


def _check(path: Path) -> None:
    if not path.exists():
        raise TdbError(f"--corpus: {path} does not exist")


def read_corpus(path: Path) -> Iterator[Document]:
    """Every document of the corpus at `path`, in order (see the module docstring)."""
    _check(path)
    if path.is_dir():
        for doc_id, file in enumerate(_folder_files(path)):
            yield Document(doc_id, file.read_text(encoding="utf-8", errors="replace"))
    elif path.suffix == ".jsonl":
        yield from _read_jsonl(path)
    elif path.suffix == ".parquet":
        yield from _read_parquet(path)
    else:
        with path.open(encoding="utf-8", errors="replace") as f:
            for doc_id, line in enumerate(f):
                yield Document(doc_id, line.rstrip("\r\n"))


def _read_jsonl(path: Path) -> Iterator[Document]:
    with path.open(encoding="utf-8") as f:
        for doc_id, line in enumerate(f):
            if not line.strip():
                yield Document(doc_id, "")
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise TdbError(f"{path}:{doc_id + 1}: not JSON ({e})") from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise TdbError(f"{path}:{doc_id + 1}: no string field 'text'")
            yield Document(doc_id, text)


def _read_parquet(path: Path) -> Iterator[Document]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    if "text" not in parquet.schema_arrow.names:
        raise TdbError(
            f"{path}: no column 'text' (columns: {', '.join(parquet.schema_arrow.names)})"
        )
    doc_id = 0
    for batch in parquet.iter_batches(columns=["text"], batch_size=1024):
        for text in batch.column(0).to_pylist():
            yield Document(doc_id, text if isinstance(text, str) else "")
            doc_id += 1


def count_documents(path: Path) -> int:
    """How many documents `read_corpus(path)` yields, read cheaply (for the progress bar's ETA)."""
    _check(path)
    if path.is_dir():
        return len(_folder_files(path))
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return int(pq.ParquetFile(path).metadata.num_rows)
    with path.open("rb") as f:
        return sum(1 for _ in f)


def corpus_fingerprint(path: Path) -> str:
    """A short hash of the corpus files' names, sizes and modification times: a resumed scan must
    read the same corpus (reading every byte again would cost as much as tokenizing it)."""
    _check(path)
    files = _folder_files(path) if path.is_dir() else [path]
    h = hashlib.sha256()
    for file in files:
        stat = file.stat()
        h.update(
            f"{file.relative_to(path) if path.is_dir() else file.name}\0{stat.st_size}\0".encode()
        )
        h.update(f"{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]
