"""The King James Bible as plain English prose for the demo model's training mix.

    >>> chapters = load_bible_chapters()  # needs: apt-get install bible-kjv-text bible-kjv
    >>> len(chapters)
    1189
    >>> doc = bible_document(random.Random(0), chapters)

The text comes from the Debian package `bible-kjv-text` (a compressed data file) and is read with
the `bible` command of package `bible-kjv`; nothing is downloaded.
"""

from __future__ import annotations

import random
import re
import shutil
import subprocess
from pathlib import Path

_DATA_FILE = Path("/usr/lib/bible.data")
_INSTALL_HINT = (
    "The demo model's training data needs the King James Bible from Debian: install it with\n"
    "    apt-get update && apt-get install -y bible-kjv-text bible-kjv\n"
    "(package bible-kjv-text holds the text, bible-kjv the `bible` command that reads it)."
)
_VERSE = re.compile(r"^\s+\d+ (.*)$")


class BibleNotInstalledError(RuntimeError):
    """Raised when the Debian packages with the King James Bible are missing."""


def load_bible_chapters() -> list[list[str]]:
    """All 1,189 chapters, each a list of verse strings without verse numbers.

    >>> load_bible_chapters()[0][0]
    'In the beginning God created the heaven and the earth.'
    """
    bible = shutil.which("bible")
    if bible is None or not _DATA_FILE.exists():
        raise BibleNotInstalledError(_INSTALL_HINT)
    # A very wide line length stops `bible` from wrapping, so one verse is one line.
    text = subprocess.run(
        [bible, "-l100000", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True
    ).stdout
    chapters: list[list[str]] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        match = _VERSE.match(line)
        if match is None:  # a heading such as "Genesis 1" starts a chapter
            chapters.append([])
        elif chapters:
            chapters[-1].append(match.group(1).strip())
    chapters = [c for c in chapters if c]
    if len(chapters) != 1189:
        raise BibleNotInstalledError(
            f"expected 1189 chapters from `bible`, got {len(chapters)}.\n{_INSTALL_HINT}"
        )
    return chapters


def bible_document(rng: random.Random, chapters: list[list[str]]) -> str:
    """A run of consecutive verses from a random chapter, about 150-500 characters.

    >>> bible_document(random.Random(0), [["In the beginning.", "And it was so."]])
    'In the beginning. And it was so.'
    """
    chapter = rng.choice(chapters)
    start = rng.randrange(len(chapter))
    target = rng.randint(150, 500)
    verses: list[str] = []
    length = 0
    for verse in chapter[start:]:
        verses.append(verse)
        length += len(verse) + 1
        if length >= target:
            break
    return " ".join(verses)
