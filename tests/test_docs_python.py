"""Every ```python block of docs/python.md runs, in order, in one namespace (so a later block uses
what an earlier one defined); a block that raises, or its `assert`s failing, fails the test."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).parent.parent / "docs" / "python.md"


def python_blocks(markdown: str) -> list[str]:
    """The code of each ```python fenced block, in order."""
    return re.findall(r"^```python\n(.*?)^```$", markdown, flags=re.DOTALL | re.MULTILINE)


def test_python_blocks_are_found() -> None:
    text = "intro\n```python\na = 1\n```\n```\nnot python\n```\n```python\nb = a + 1\n```\n"
    assert python_blocks(text) == ["a = 1\n", "b = a + 1\n"]


def test_every_snippet_of_docs_python_md_runs() -> None:
    blocks = python_blocks(DOC.read_text())
    assert len(blocks) >= 10, "docs/python.md lost its snippets"
    namespace: dict[str, object] = {"__name__": "docs_python"}
    for i, block in enumerate(blocks):
        code = compile(block, f"{DOC}:python block {i + 1}", "exec")
        exec(code, namespace)
