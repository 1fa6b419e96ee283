"""Reading a corpus: documents with stable ids, from four formats.

    >>> for doc in read_corpus(Path("corpus.jsonl")):
    ...     doc.doc_id, doc.text

| `PATH` | one document is | `doc_id` |
|---|---|---|
| a folder | one `*.txt` file (recursively, sorted by relative path) | its place in that order |
| `*.jsonl` | the `text` field of one line | the line number (0-based) |
| `*.parquet` | the `text` column of one row | the row number (0-based) |
| any other file | one line of text | the line number (0-based) |

Lines end at "\n" only (a "\r\n" ending loses its "\r" too): a lone "\r" inside a line is part
of its document, so line n is always document n, as `wc -l` and a text editor count them. Ids
count empty documents too (a blank line is document n, it just has no windows; so is a null in
a Parquet `text` column), so an id always points back at a line or row of the input.

Text files are read as UTF-8 with invalid bytes replaced (U+FFFD); a JSONL line that is not
UTF-8 or not JSON, a Parquet file that does not parse or whose `text` column does not hold
strings, is a `TdbError` naming the file (and line), never a traceback or an empty document.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def _unreadable(path: Path, e: OSError) -> TdbError:
    return TdbError(f"--corpus: cannot read {path} ({e.strerror or e})")


def read_corpus(path: Path) -> Iterator[Document]:
    """Every document of the corpus at `path`, in order (see the module docstring)."""
    _check(path)
    try:
        if path.is_dir():
            for doc_id, file in enumerate(_folder_files(path)):
                yield Document(doc_id, file.read_text(encoding="utf-8", errors="replace"))
        elif path.suffix == ".jsonl":
            yield from _read_jsonl(path)
        elif path.suffix == ".parquet":
            yield from _read_parquet(path)
        else:
            yield from _read_lines(path)
    except OSError as e:
        raise _unreadable(path, e) from None


def _line_text(line: str) -> str:
    """The line without its "\n" or "\r\n" ending."""
    return line[:-1].removesuffix("\r") if line.endswith("\n") else line


def _read_lines(path: Path) -> Iterator[Document]:
    # newline="\n": Python's default (universal newlines) would also end a line at a lone "\r",
    # and every later doc_id would be off by one.
    with path.open(encoding="utf-8", errors="replace", newline="\n") as f:
        for doc_id, line in enumerate(f):
            yield Document(doc_id, _line_text(line))


def _read_jsonl(path: Path) -> Iterator[Document]:
    with path.open("rb") as f:  # lines end at b"\n" only, as for text files
        for doc_id, raw in enumerate(f):
            where = f"{path}:{doc_id + 1}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise TdbError(f"{where}: not UTF-8 (byte {e.start + 1} of the line)") from None
            if not line.strip():
                yield Document(doc_id, "")
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError) as e:  # RecursionError: nested too deep
                raise TdbError(f"{where}: not JSON ({e})") from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise TdbError(f"{where}: no string field 'text'")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # "\ud800" is valid JSON but no text a tokenizer reads
                raise TdbError(
                    f"{where}: field 'text' holds a lone surrogate (\\u escape)"
                ) from None
            yield Document(doc_id, text)


def _parquet_file(path: Path) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path, page_checksum_verification=True)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise TdbError(f"{path}: not a readable Parquet file ({e})") from None


def _is_text(kind: Any) -> bool:
    import pyarrow as pa

    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return bool(pa.types.is_string(kind) or pa.types.is_large_string(kind))


def _read_parquet(path: Path) -> Iterator[Document]:
    import pyarrow as pa

    parquet = _parquet_file(path)
    names = parquet.schema_arrow.names
    if "text" not in names:
        raise TdbError(f"{path}: no column 'text' (columns: {', '.join(names)})")
    kind = parquet.schema_arrow.field("text").type
    if not _is_text(kind):
        raise TdbError(f"{path}: column 'text' holds {kind}, not strings")
    doc_id = 0
    batches = parquet.iter_batches(columns=["text"], batch_size=1024)
    while True:
        try:
            batch = next(batches, None)
            texts = [] if batch is None else batch.column(0).to_pylist()
        except (
            pa.ArrowException,
            OSError,
            ValueError,
        ) as e:  # a corrupt page (UnicodeDecodeError too)
            raise TdbError(f"{path}: row {doc_id} onwards cannot be read ({e})") from None
        if batch is None:
            break
        for text in texts:
            yield Document(doc_id, "" if text is None else text)
            doc_id += 1
    if doc_id != parquet.metadata.num_rows:
        raise TdbError(
            f"{path}: {doc_id} rows read, but its footer says {parquet.metadata.num_rows}"
        )


def count_documents(path: Path) -> int:
    """How many documents `read_corpus(path)` yields, read cheaply (for the progress bar's ETA)."""
    _check(path)
    try:
        if path.is_dir():
            return len(_folder_files(path))
        if path.suffix == ".parquet":
            return int(_parquet_file(path).metadata.num_rows)
        with path.open("rb") as f:
            return sum(1 for _ in f)
    except OSError as e:
        raise _unreadable(path, e) from None


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
