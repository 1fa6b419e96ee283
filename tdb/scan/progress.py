"""The scan's progress bar: documents done of the corpus' count, tokens/s, time left.

>>> with ScanProgressBar() as bar:
...     scan(corpus, out, settings, progress=bar)
"""

from __future__ import annotations

import time
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)


class ScanProgressBar:
    """A rich progress bar on stderr; ETA from documents done, speed in tokens/s."""

    def __init__(self) -> None:
        self.bar = Progress(
            TextColumn("scan"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("docs"),
            TextColumn("{task.fields[rate]}"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self.task: TaskID | None = None
        self.n_tokens = 0
        self.started = time.perf_counter()

    def __enter__(self) -> ScanProgressBar:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self, total_docs: int) -> None:
        self.bar.start()
        self.started = time.perf_counter()
        self.task = self.bar.add_task("scan", total=total_docs, rate="")

    def docs(self, n: int) -> None:
        if self.task is not None:
            self.bar.advance(self.task, n)

    def tokens(self, n: int) -> None:
        self.n_tokens += n
        rate = self.n_tokens / max(time.perf_counter() - self.started, 1e-9)
        if self.task is not None:
            self.bar.update(self.task, rate=f"{self.n_tokens:,} tokens, {rate:,.0f} tokens/s")

    def stop(self) -> None:
        self.bar.stop()
