"""The corpus loaders: line splitting, type checks, malformed input as a TdbError (never a
traceback, never silently empty documents), and a Hypothesis fuzz of every format: a corrupted
or truncated corpus either reads as what the format says it holds or is a TdbError."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tdb.errors import TdbError
from tdb.scan.corpus import count_documents, read_corpus


def docs_of(path: Path) -> list[tuple[int, str]]:
    return [(d.doc_id, d.text) for d in read_corpus(path)]


def test_text_lines_end_at_newline_only(tmp_path: Path) -> None:
    """A lone carriage return is part of its line; "\\r\\n" endings are stripped whole."""
    path = tmp_path / "docs.txt"
    path.write_bytes(b"one\rstill one\ntwo\r\n\r\nfour\r\r\nfive\r")
    expected = [(0, "one\rstill one"), (1, "two"), (2, ""), (3, "four\r"), (4, "five\r")]
    assert docs_of(path) == expected
    assert count_documents(path) == len(expected)
    jsonl = tmp_path / "docs.jsonl"  # JSON allows "\r" between tokens: not a line break either
    jsonl.write_bytes(b'{"text": "a"}\r{"x": 1}\n{"text": "b"}\r\n')
    with pytest.raises(TdbError, match=r"docs.jsonl:1: not JSON"):
        docs_of(jsonl)
    jsonl.write_bytes(b'{"text": "a",\r "x": 1}\n{"text": "b"}\r\n')
    assert docs_of(jsonl) == [(0, "a"), (1, "b")] and count_documents(jsonl) == 2


def test_a_parquet_text_column_that_is_not_strings_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"text": [1, 2, 3]}), path)
    with pytest.raises(TdbError, match=r"ints.parquet: column 'text' holds int64, not strings"):
        docs_of(path)
    nulls = tmp_path / "nulls.parquet"  # a null is an empty document, like a blank line
    strings = pa.array(["a", None, "c"]).dictionary_encode()
    pq.write_table(pa.table({"text": strings}), nulls)
    assert docs_of(nulls) == [(0, "a"), (1, ""), (2, "c")]


def test_malformed_files_are_errors_that_name_the_file_and_line(tmp_path: Path) -> None:
    bad_utf8 = tmp_path / "latin1.jsonl"
    bad_utf8.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(TdbError, match=r"latin1.jsonl:2: not UTF-8 \(byte 14 of the line\)"):
        docs_of(bad_utf8)
    deep = tmp_path / "deep.jsonl"
    deep.write_text("[" * 100_000 + "\n")
    with pytest.raises(TdbError, match=r"deep.jsonl:1: not JSON"):
        docs_of(deep)
    surrogate = tmp_path / "surrogate.jsonl"
    surrogate.write_text('{"text": "a\\ud800b"}\n')
    with pytest.raises(TdbError, match=r"surrogate.jsonl:1: field 'text' holds a lone surrogate"):
        docs_of(surrogate)
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"this is not a parquet file at all\n" * 10)
    for read in (docs_of, count_documents):
        with pytest.raises(TdbError, match=r"garbage.parquet: not a readable Parquet file"):
            read(garbage)


# --- fuzz: corrupted and truncated corpora ------------------------------------------------------

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

Corruption = tuple[str, int, bytes]
CORRUPTIONS = st.lists(
    st.tuples(
        st.sampled_from(["flip", "insert", "delete", "truncate"]),
        st.integers(0, 1 << 20),
        st.binary(min_size=1, max_size=8) | st.sampled_from([b"\r", b"\n", b"\xff", b"\x00"]),
    ),
    max_size=3,
)


def corrupt(data: bytes, corruptions: list[Corruption]) -> bytes:
    for op, at, chunk in corruptions:
        at %= len(data) + 1
        if op == "flip":
            data = data[:at] + chunk[:1] + data[at + 1 :]
        elif op == "insert":
            data = data[:at] + chunk + data[at:]
        elif op == "delete":
            data = data[:at] + data[at + len(chunk) :]
        else:
            data = data[:at]
    return data


def reference_lines(data: bytes) -> list[bytes]:
    """Lines as `wc -l` counts them (plus an unterminated last one), "\\n" or "\\r\\n" removed."""
    *lines, last = data.split(b"\n")
    return [line.removesuffix(b"\r") for line in lines] + ([last] if last else [])


def reference_jsonl(data: bytes) -> list[str] | None:
    """The `text` of every line, or None where any line is not a JSON object with one."""
    texts = []
    *lines, last = data.split(b"\n")
    for raw in lines + ([last] if last else []):
        try:
            line = raw.decode("utf-8")
            if not line.strip():
                texts.append("")
                continue
            record = json.loads(line)
            text = record["text"] if isinstance(record, dict) else None
            if not isinstance(text, str):
                return None
            text.encode("utf-8")
        except (ValueError, KeyError, RecursionError):
            return None
        texts.append(text)
    return texts


def reference_parquet(path: Path) -> list[str] | None:
    """The `text` column as pyarrow reads it, or None where it cannot (or it is not strings)."""
    try:
        column = pq.read_table(path, columns=["text"], page_checksum_verification=True)["text"]
        if not pa.types.is_string(
            column.type.value_type if pa.types.is_dictionary(column.type) else column.type
        ):
            return None
        return ["" if t is None else t for t in column.to_pylist()]
    except (pa.ArrowException, OSError, ValueError, KeyError):
        return None


def write_valid(fmt: str, root: Path, docs: list[str]) -> Path:
    if fmt == "txt":
        path = root / "docs.txt"
        path.write_bytes("".join(d.replace("\n", " ") + "\n" for d in docs).encode())
    elif fmt == "jsonl":
        path = root / "docs.jsonl"
        path.write_bytes("".join(json.dumps({"text": d}) + "\n" for d in docs).encode())
    elif fmt == "parquet":
        path = root / "docs.parquet"
        pq.write_table(
            pa.table({"text": pa.array(docs, pa.string())}),
            path,
            row_group_size=3,
            write_page_checksum=True,
        )
    else:
        path = root / "folder"
        path.mkdir()
        for i, d in enumerate(docs):
            (path / f"{i:02d}.txt").write_bytes(d.encode())
    return path


@pytest.mark.slow  # 4 x 50 examples
@pytest.mark.parametrize("fmt", ["txt", "folder", "jsonl", "parquet"])
@hypothesis.settings(max_examples=50, deadline=None, derandomize=True, database=None)
@hypothesis.given(docs=st.lists(st.text(max_size=20), max_size=8), corruptions=CORRUPTIONS)
def test_a_corrupted_corpus_reads_as_what_it_holds_or_is_a_tdb_error(
    fmt: str, docs: list[str], corruptions: list[Corruption]
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = write_valid(fmt, Path(tmp), docs)
        target = path / "00.txt" if fmt == "folder" else path
        if fmt != "folder" or docs:
            target.write_bytes(corrupt(target.read_bytes(), corruptions))
        if fmt == "txt":
            expected: list[str] | None = [
                line.decode("utf-8", errors="replace")
                for line in reference_lines(path.read_bytes())
            ]
        elif fmt == "folder":  # one file, one document: its text, line endings as "\n"
            expected = [
                p.read_bytes()
                .decode("utf-8", errors="replace")
                .replace("\r\n", "\n")
                .replace("\r", "\n")
                for p in sorted(path.iterdir())
            ]
        elif fmt == "jsonl":
            expected = reference_jsonl(path.read_bytes())
        else:
            expected = reference_parquet(path)
        if not corruptions and fmt in ("jsonl", "parquet"):  # they keep any text as it is
            assert expected == docs
        try:
            got = docs_of(path)
        except TdbError:
            hypothesis.event("refused (TdbError)")
            return  # a malformed corpus may be refused, with a message
        hypothesis.event("read")
        assert expected is not None, f"read a corpus that does not parse: {got[:3]}"
        assert got == list(enumerate(expected))
        assert count_documents(path) == len(got)
