"""Follow a run's `metrics.jsonl` as it grows and show progress (rich when a TTY, plain lines otherwise).

The engine appends one JSON line per optimizer step (see `engine.schema`) and flushes it, so a reader
polling the file sees complete lines plus, now and then, the first half of the next one. The follower
only consumes complete lines; a malformed line is counted and skipped, never fatal (a killed engine
can leave half a line behind).

Steps in the engine's metrics are 0-based (the seed's CSVs and nanochat's logs count from 0 too), so step
`s` means `s + 1` steps done. A trainer of the user's own that counts from 1 (its first step is step 1,
moectl.metrics.counted_from's rule) has done `s` steps at step `s`. The total comes from the `start` record.

Torch-free: this module runs in the moectl process.
"""
from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import IO, Optional, Protocol, Union

from engine.schema import Record, RunSummary, StartInfo, StepMetrics, parse_line


class MetricsFollower:
    """Incremental reader of a metrics file that may not exist yet and may end in a partial line."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.malformed = 0  # lines that were not a well-formed record
        self.records = 0  # well-formed records consumed so far
        self._fh: Optional[IO[bytes]] = None
        self._pending = b""  # the tail after the last newline: an unfinished line

    def poll(self, final: bool = False) -> list[Record]:
        """Return the records completed since the last call.

        With `final=True` (the writer is gone) an unfinished last line is parsed too: if the engine
        died mid-write it fails to parse and is counted as malformed.
        """
        if self._fh is None:
            try:
                self._fh = open(self.path, "rb")
            except FileNotFoundError:
                return []
        chunk = self._fh.read()
        if chunk:
            self._pending += chunk
        *complete, self._pending = self._pending.split(b"\n")
        replaced = not final and self._replaced()
        if replaced:
            # A requeued Slurm job sets the last attempt's file aside and the engine's resume writes
            # the steps it keeps into a new one: what is read from now on is that file, from its start.
            self._fh.close()
            self._fh, self._pending = None, b""
        if final and self._pending.strip():
            complete.append(self._pending)
            self._pending = b""
        out: list[Record] = []
        for raw in complete:
            if not raw.strip():
                continue
            try:
                out.append(parse_line(raw.decode("utf-8", errors="replace")))
            except ValueError:
                self.malformed += 1
        self.records += len(out)
        return out + self.poll() if replaced else out

    def _replaced(self) -> bool:
        """The path now names another file than the one open (renamed aside, rewritten and renamed
        over it, deleted), or the open one was truncated below what was read."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return True
        return st.st_ino != os.fstat(self._fh.fileno()).st_ino or st.st_size < self._fh.tell()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class ProgressSink(Protocol):
    """What the launcher feeds: records as they appear, torchrun's output lines when echoing, close."""

    def record(self, rec: Record) -> None: ...

    def echo(self, line: str) -> None: ...

    def close(self) -> None: ...


def eta_seconds(
    done: int, total: int, first_done: int, first_t: float, now: float, dt_ms: Optional[float]
) -> Optional[float]:
    """Seconds left, from the pace since the first step we saw (so step 0's compile time is excluded).

    With a single step seen there is no pace yet: fall back to that step's own dt.
    """
    remaining = total - done
    if remaining <= 0:
        return 0.0
    if done > first_done and now > first_t:
        return (now - first_t) / (done - first_done) * remaining
    if dt_ms is not None and dt_ms > 0:
        return dt_ms / 1000.0 * remaining
    return None


def format_duration(seconds: Optional[float]) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class _Tracker:
    """The state both sinks display: total, last step, pace for the ETA."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.total: Optional[int] = None
        self.world_size: Optional[int] = None
        self.device: Optional[str] = None
        self.last: Optional[StepMetrics] = None
        self.summary: Optional[RunSummary] = None
        self._first: Optional[tuple[int, float]] = None  # (steps done, clock) at the first step seen
        self._resumed = False  # the start record says the run resumed at a later step
        self._counted_from = 0  # what the run numbers its first step: 0, or 1 (set at the first step seen)

    def update(self, rec: Record) -> None:
        if isinstance(rec, StartInfo):
            self.total, self.world_size, self.device = rec.steps, rec.world_size, rec.device
            self._resumed = self._resumed or bool(rec.start_step)
        elif isinstance(rec, StepMetrics):
            self.last = rec
            if self._first is None:
                # Step 1 first, with no resume there: a trainer counting from 1, whose step 1000 of
                # 1000 is its last (read as 0-based, it showed 1000/1000 while that step still ran).
                self._counted_from = 1 if rec.step == 1 and not self._resumed else 0
                self._first = (self.done, self.clock())
        elif isinstance(rec, RunSummary):
            self.summary = rec

    @property
    def done(self) -> int:
        return 0 if self.last is None else self.last.step + 1 - self._counted_from

    def eta(self) -> Optional[float]:
        if self.total is None or self.last is None or self._first is None:
            return None
        return eta_seconds(self.done, self.total, self._first[0], self._first[1], self.clock(), self.last.dt_ms)

    def line(self) -> str:
        """One nanochat-like status line: `step 12/50 (24.0%) | loss 3.4521 | tok/sec 12,345 | ...`."""
        m = self.last
        if m is None:
            return "waiting for the first step"
        if self.total and self.done > self.total:
            head = f"step {self.done} (past the planned {self.total})"  # a trainer that ignores --steps
        elif self.total:
            head = f"step {self.done}/{self.total} ({100.0 * self.done / self.total:.1f}%)"
        else:
            head = f"step {self.done}"
        parts = [head, f"loss {m.loss:.4f}"]
        if m.tok_per_sec is not None:
            parts.append(f"tok/sec {m.tok_per_sec:,.0f}")
        if m.dt_ms is not None:
            parts.append(f"dt {m.dt_ms:.1f}ms")
        if m.mfu is not None:
            parts.append(f"mfu {m.mfu:.2f}%")
        if self.total and self.done <= self.total:
            parts.append(f"eta {format_duration(self.eta())}")
        return " | ".join(parts)


class PlainProgress:
    """Non-TTY progress: a line every `every_steps` steps or every `every_s` seconds, plus the last one.

    Meant for logs and CI, where a live display would be noise: the first step is printed (it shows
    that training started and how long step 0 took), then the cadence, then the final step.
    """

    def __init__(self, stream: Optional[IO[str]] = None, every_steps: int = 10, every_s: float = 10.0,
                 clock=time.monotonic):
        self.stream = stream if stream is not None else sys.stdout
        self.every_steps = max(1, every_steps)
        self.every_s = every_s
        self.clock = clock
        self.t = _Tracker(clock)
        self._printed_step: Optional[int] = None
        self._printed_at = clock()
        self._closed = False

    def _emit(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def record(self, rec: Record) -> None:
        self.t.update(rec)
        if isinstance(rec, StartInfo):
            resumed = f", resuming at step {rec.start_step}" if rec.start_step else ""
            self._emit(f"progress: {rec.steps} steps, world size {rec.world_size}, {rec.device}{resumed}")
        elif isinstance(rec, StepMetrics):
            due = (
                self._printed_step is None
                or self.t.done - self._printed_step >= self.every_steps
                or self.clock() - self._printed_at >= self.every_s
                or (self.t.total is not None and self.t.done == self.t.total)  # the last planned step
            )
            if due:
                self._print_step()

    def _print_step(self) -> None:
        self._emit(f"progress: {self.t.line()}")
        self._printed_step = self.t.done
        self._printed_at = self.clock()

    def echo(self, line: str) -> None:
        self.stream.write(line if line.endswith("\n") else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # The last step is always shown, even when it fell between two cadence points.
        if self.t.last is not None and self._printed_step != self.t.done:
            self._print_step()
        if self.t.summary is not None and self.t.summary.total_time_s is not None:
            self._emit(f"progress: finished {self.t.done} steps in {format_duration(self.t.summary.total_time_s)}")


class RichProgress:
    """TTY progress: one live line with a bar; torchrun's echoed output scrolls above it."""

    def __init__(self, console=None, clock=time.monotonic):
        from rich.console import Console  # only the TTY path pays for rich.live
        from rich.live import Live

        self.console = console or Console(highlight=False)
        self.t = _Tracker(clock)
        self._live = Live(self._render(), console=self.console, refresh_per_second=4, transient=False,
                          redirect_stdout=False, redirect_stderr=False)
        self._live.start()
        self._closed = False

    def _render(self):
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        grid = Table.grid(padding=(0, 1))
        grid.add_column()
        grid.add_column()
        bar = ProgressBar(total=float(self.t.total or 1), completed=float(self.t.done), width=30)
        grid.add_row(bar, self.t.line())
        return grid

    def record(self, rec: Record) -> None:
        self.t.update(rec)
        self._live.update(self._render())

    def echo(self, line: str) -> None:
        # Live.console.print renders above the live line, so the bar stays at the bottom.
        self._live.console.print(line.rstrip("\n"), markup=False, highlight=False, soft_wrap=True)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._live.update(self._render())
            self._live.stop()


class NullProgress:
    """--quiet: nothing on screen (the log file still gets everything)."""

    def record(self, rec: Record) -> None:
        pass

    def echo(self, line: str) -> None:
        pass

    def close(self) -> None:
        pass


def make_progress(console_is_tty: bool, quiet: bool = False) -> Union[RichProgress, PlainProgress, NullProgress]:
    """Pick the sink: nothing when quiet, a live display on a terminal, plain lines in logs and CI."""
    if quiet:
        return NullProgress()
    if console_is_tty:
        return RichProgress()
    return PlainProgress()


def progress_for(json_out: bool, quiet: bool = False) -> Union[RichProgress, PlainProgress, NullProgress]:
    """The sink for a command's output mode: with --json, stdout holds the one JSON document, so the
    progress lines go to stderr as plain lines (a caller tails them there; --quiet turns them off)."""
    if json_out and not quiet:
        return PlainProgress(stream=sys.stderr)
    return make_progress(stdout_is_tty(), quiet=quiet)


def stdout_is_tty() -> bool:
    try:
        return os.isatty(sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):
        return False
