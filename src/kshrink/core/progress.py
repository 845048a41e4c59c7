"""How long work says how far it got.

A progress callback takes one message, a `str` (so `print` is one). Work that counts (layers
solved, layers scored, candidates tried) sends `Message`s that also carry `stage`, `done` and
`total`, which `Console` turns into a progress bar on a terminal and into one line per stage
elsewhere.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
Progress = Callable[[str], None]


class Message(str):
    """A progress message; for counted work, `done` of `total` units of `stage` are done and
    `item` is the one under way. A `result` (what a round of a search measured) is a line of
    its own, however quickly the next message follows."""

    stage: str
    done: int | None
    total: int | None
    item: str
    result: bool

    def __new__(cls, text: str, stage: str | None = None, done: int | None = None,
                total: int | None = None, item: str = "", result: bool = False):
        message = super().__new__(cls, text)
        message.stage, message.done, message.total = stage or text, done, total
        message.item, message.result = item, result
        return message


def counting(progress: Progress | None, stage: str, items: Iterable[T],
             name: Callable[[T], str] = str) -> Iterator[T]:
    """Yields `items`, telling `progress` before each one: `"stage: 3/12 name"`."""
    items = list(items)
    for done, item in enumerate(items):
        if progress:
            label = name(item)
            progress(Message(f"{stage}: {done + 1}/{len(items)} {label}", stage, done,
                             len(items), label))
        yield item


def within(progress: Progress | None, prefix: str) -> Progress | None:
    """`progress` with every message (and stage) prefixed by `prefix`."""
    if progress is None:
        return None

    def say(message: str) -> None:
        if isinstance(message, Message):
            message = Message(f"{prefix}: {message}", f"{prefix}: {message.stage}",
                              message.done, message.total, message.item, message.result)
        else:
            message = f"{prefix}: {message}"
        progress(message)

    return say


class Console:
    """The progress of `compress` and the CLI on stderr (or `file`); `terminal` says whether
    it is a terminal (default: ask the file). Use it as a context manager, or call `close()`.

    A stage that counts (layers solved, layers scored) says so when it starts: on a terminal
    with a bar that goes when the stage ends, leaving one line with its time; elsewhere with
    one line. A stage that does not count gets its line when it ends, if it took a second or
    more (so an error a moment into a command stays the only line).
    """

    SLOW = 1.0  # seconds: an uncounted stage this long gets its line

    def __init__(self, file=None, terminal: bool | None = None):
        from rich.console import Console as RichConsole

        self._console = RichConsole(file=file or sys.stderr, force_terminal=terminal)
        self._bar = None
        self._stage = None
        self._counted = False
        self._started = 0.0

    def __call__(self, message: str) -> None:
        if getattr(message, "result", False):
            self._end_stage()
            self._line(message)
            return
        counted = isinstance(message, Message) and message.total is not None
        stage = message.stage if isinstance(message, Message) else message
        if stage != self._stage:
            self._end_stage()
            self._stage, self._counted, self._started = stage, counted, time.perf_counter()
            if counted and not self._console.is_terminal:
                self._line(f"{stage} ({message.total})")
        if counted and self._console.is_terminal:
            self._show(message)

    def _show(self, message: Message) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
        from rich.progress import TimeElapsedColumn

        if self._bar is None:
            self._bar = Progress(TextColumn("kshrink: {task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(),
                                 console=self._console, transient=True)
            self._bar.start()
            self._task = self._bar.add_task(message.stage, total=message.total)
        self._bar.update(self._task, completed=message.done,
                         description=f"{message.stage}: {message.item}")

    def _end_stage(self) -> None:
        if self._stage is None:
            return
        seconds = time.perf_counter() - self._started
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
            self._line(f"{self._stage} ({seconds:.1f} s)")
        elif not self._counted and seconds >= self.SLOW:
            self._line(f"{self._stage} ({seconds:.1f} s)")
        self._stage = None

    def _line(self, text: str) -> None:
        self._console.print(f"kshrink: {text}", highlight=False, markup=False, soft_wrap=True)

    def close(self) -> None:
        self._end_stage()

    def __enter__(self) -> Console:
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False
