"""Progress bars for the `fd-ray-sync` command: on stderr, for a person watching.

Bars show only when stderr is a terminal, so scripts, CI logs and `--json` outputs stay as
they were; `FD_RAY_SYNC_PROGRESS=1` forces them on (a test reads them from a pipe), `=0`
turns them off. What a command prints on stdout never changes: while bars show on the same
terminal, its lines are printed above them.

Library code does not import this module: long work (`bench`, `chaos`) reports through a
plain callback `on_progress(done, total, label)`, which a `Task` here is. Work that runs in
the coordinator (an update, a scale-out) is followed by polling its `status()`, which
answers while the work runs; `update_progress` and `scale_progress` read a bar's position
from one status answer.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

PROGRESS_ENV = "FD_RAY_SYNC_PROGRESS"  # "1": bars even off a terminal; "0": never

# The phases of an update, in the order the coordinator runs them (actors/transaction.py,
# `_transaction`); "clear" runs only in in-place mode.
UPDATE_PHASES = ("prepare", "pause", "clear", "restart", "load", "verify", "commit")

# (done, total, label): where a bar stands; total None when not known yet.
Position = tuple[int, int | None, str]


def progress_wanted(stream: Any = None) -> bool:
    """Whether bars show: forced by the environment, else when `stream` (stderr) is a TTY."""
    forced = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return True
    if forced in ("0", "false", "no", "off"):
        return False
    stream = sys.stderr if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


def _same_terminal() -> bool:
    """stdout and stderr are one terminal: stdout's lines can go above the bars through it."""
    try:
        if not (sys.stdout.isatty() and sys.stderr.isatty()):
            return False
        out, err = os.fstat(sys.stdout.fileno()), os.fstat(sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return out.st_rdev == err.st_rdev


class Task:
    """One bar. Calling it is an `on_progress(done, total, label)` callback; it does nothing
    when the bars are off."""

    def __init__(self, progress: Progress | None, label: str, total: int | None):
        self._progress = progress
        self._id = progress.add_task(label, total=total) if progress is not None else None

    def __call__(self, done: int, total: int | None, label: str) -> None:
        if self._progress is not None:
            self._progress.update(self._id, completed=done, total=total, description=label)

    def finish(self, label: str) -> None:
        """Fill the bar (a known total) and say how it ended."""
        if self._progress is not None:
            task = self._progress.tasks[self._id]
            total = task.total if task.total is not None else task.completed
            self._progress.update(self._id, completed=total, total=total, description=label)


class Bars:
    """The bars of one command, live on stderr inside `with Bars() as bars:`.

    `enabled` None: as `progress_wanted()` decides. `console`: where they draw (tests pass a
    console writing to a string).
    """

    def __init__(self, enabled: bool | None = None, console: Console | None = None):
        self.enabled = progress_wanted() if enabled is None else enabled
        self._console = console
        self._progress: Progress | None = None

    def __enter__(self) -> Bars:
        if self.enabled:
            console = self._console or Console(stderr=True, force_terminal=True)
            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("[progress.description]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
                # Only onto the same terminal: stdout piped elsewhere must keep its lines.
                redirect_stdout=self._console is None and _same_terminal(),
                redirect_stderr=False,
            )
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def task(self, label: str, total: int | None = None) -> Task:
        return Task(self._progress, label, total)

    @contextlib.contextmanager
    def follow(
        self,
        status: Callable[[], dict],
        task: Task,
        position: Callable[[dict], Position | None],
        interval_s: float = 0.25,
    ) -> Iterator[None]:
        """While the block runs, poll `status()` (a fleet's: its coordinator answers while
        an update runs) and move `task` to `position(answer)` (None: leave it). Nothing
        polls when the bars are off."""
        if self._progress is None:
            yield
            return
        stop = threading.Event()

        def poll() -> None:
            while not stop.wait(interval_s):
                try:
                    answer = status()
                except Exception:  # noqa: BLE001 - a slow or restarting coordinator: ask again
                    continue
                where = position(answer)
                if where is not None and not stop.is_set():
                    task(*where)

        thread = threading.Thread(target=poll, name="fd-ray-sync-progress", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=1.0)  # a status call in flight is left to finish alone


def update_progress(status: dict) -> Position | None:
    """The running update in a coordinator's `status()`: a pipelined one's buckets written
    by every rank (of those the trainer has put so far), else its phase among
    `UPDATE_PHASES`; None when no update runs."""
    phase, feed = status.get("phase"), status.get("update")
    if feed and feed.get("buckets_put"):
        written = min(feed["written"], default=0)
        return written, feed["buckets_put"], f"{phase or 'feed'}: buckets written by every rank"
    if phase is None:
        return None
    done = UPDATE_PHASES.index(phase) if phase in UPDATE_PHASES else 0
    return done, len(UPDATE_PHASES), f"phase {phase}"


def scale_progress(status: dict, old_dp: int, dp: int, loads: bool) -> Position:
    """Replicas `old_dp..dp-1` coming up, from a coordinator's `status()`: each new rank
    counts once placed (it answers), once set up, and, when the fleet has a version to
    `load`, once it holds it."""
    tp = status["tp"]
    new = [r for r in status.get("ranks", []) if old_dp * tp <= r.get("rank", -1) < dp * tp]
    count = (dp - old_dp) * tp
    placed = sum(1 for r in new if "pid" in r)
    set_up = sum(1 for r in new if r.get("set_up"))
    loaded = sum(1 for r in new if r.get("weights") == "NORMAL") if loads else 0
    label = f"ranks placed {placed}/{count}, set up {set_up}/{count}"
    if loads:
        label += f", loaded {loaded}/{count}"
    return placed + set_up + loaded, count * (3 if loads else 2), label
