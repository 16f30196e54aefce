"""Spawn torchrun, tee its output to train.log, follow metrics.jsonl, stop it cleanly on Ctrl-C/SIGTERM.

    result = launch(plan.argv, cwd=repo, env=plan.env, log_path=exp/"train.log",
                    metrics_path=exp/"metrics.jsonl", progress=make_progress(stdout_is_tty(), quiet))
    status = "interrupted" if result.interrupted else "completed" if result.exit_code == 0 else "failed"

Why the process handling looks the way it does:
- torchrun runs in its OWN session, so a Ctrl-C in the terminal reaches moectl only. moectl then
  stops the run deliberately (SIGTERM to torchrun, which forwards it to its workers) instead of
  every process in the foreground group receiving SIGINT at once and racing to exit.
- torchrun starts each worker in a new session of its own, so killing torchrun's process group does
  not reach the workers. We therefore keep a list of torchrun's descendants (psutil, refreshed while
  it runs and right before every signal) and kill those too when the grace period runs out, and
  after torchrun exits we make sure none of them is left behind.
- If moectl itself dies without a word (SIGKILL, the OOM killer), torchrun must not train on
  unrecorded. A watchdog (WATCHDOG: a small single-threaded process in a session of its own,
  started before torchrun) holds the read end of a pipe only this process writes to: end of file
  without the "finished" byte means moectl died. It then does what moectl does on Ctrl-C: one
  SIGTERM to torchrun (which forwards it to its workers), and SIGKILL for whatever of the run is
  still alive after the grace, workers reparented to init included (it keeps its own list of
  them, and adds every process whose environment carries the run's MOECTL_RUN_TOKEN: a helper
  that double-forked out of the tree). Not the kernel's parent-death signal
  (`prctl(PR_SET_PDEATHSIG)`) on torchrun: that signal comes once per thread of the dying parent
  that the child is handed to on the way out, so a multi-threaded moectl could give torchrun two
  SIGTERMs (seen in tests), and torchrun's handler raises on each, the second inside its own shutdown; once on a loaded CI machine a torchrun was
  still alive 60 s after moectl's SIGKILL, its workers gone. The parent-death signal remains the
  fallback where the watchdog cannot start, and what the engine asks of torchrun
  (engine/train.py: a torchrun itself SIGKILLed). Should all of it fail, the next moectl that
  reads the record settles it once no process of the run is left (store.settle_stale).
- Signal handlers only set a flag and wake the wait loop; all the acting happens in the loop, never
  inside whatever code the signal happened to interrupt. They are installed for the duration of
  `launch` and the previous ones restored on every path.
- A reader thread drains the pipe line by line into the log (flushed, so `tail -f` works), so a
  chatty run can never fill the pipe and block. A line ends at a newline or at the `\r` with which
  a progress bar redraws itself (moectl.stdout_metrics.split_lines), so each bar is read as it
  comes; the log gets the bytes exactly as written.

Torch-free: this module runs in the moectl process.
"""
from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Optional, Protocol

import psutil

from moectl.entry import hung_up, stop_signals
from moectl.progress import MetricsFollower, ProgressSink
from moectl.text import tail_line

LOG_TAIL_LINES = 40
# torchrun's elastic agent logs this once a worker fails, before ~35 lines of its own traceback and
# report; the worker's error is in the lines before it, so the tail for the record ends here.
_WORKER_FAILED = re.compile(rb"failed \(exitcode: (-?\d+)\) local_rank")
POLL_S = 0.25  # metrics poll / wait-loop tick
SNAPSHOT_S = 1.0  # how often the list of torchrun's descendants is refreshed


class OutputMetrics(Protocol):
    """What turns a trainer's output lines into metrics.jsonl (moectl.stdout_metrics.LiveMetricsWriter)."""

    def __call__(self, line: str) -> None: ...

    def close(self) -> None: ...


@dataclass
class LaunchResult:
    exit_code: Optional[int]  # torchrun's exit code (None if it never started); -N when killed by signal N
    interrupted: bool  # we stopped it because of SIGINT/SIGTERM
    signal_name: Optional[str]  # "SIGINT" / "SIGTERM"
    duration_s: float
    log_tail: str  # last ~40 lines of the output, for failed runs' records
    pid: Optional[int] = None  # torchrun's pid
    killed: bool = False  # the grace period ran out (or a second signal came): we sent SIGKILL
    metrics_records: int = 0  # well-formed lines read from metrics.jsonl
    malformed_lines: int = 0  # lines of metrics.jsonl that did not parse (skipped)
    error: Optional[str] = None  # why it never started (exit_code is None)
    log_error: Optional[str] = None  # train.log could not be written (a full disk): the output was read on
    # torchrun exits 1 whatever its worker returned; the worker's own code (e.g. the engine's
    # EXIT_COMPILE_FAILED) is only in torchrun's report, so we read it from there.
    worker_exit_code: Optional[int] = None


class _StopRequest:
    """What the signal handler leaves for the wait loop: how many signals, and the first one's name."""

    def __init__(self) -> None:
        self.count = 0
        self.signal_name: Optional[str] = None
        self.wake = threading.Event()

    def handler(self, signum: int, frame) -> None:  # runs between two bytecodes: only set state
        hung_up(signum)
        self.count += 1
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
        self.wake.set()


# Every process of a run inherits this variable (unless it scrubs its environment): how the end
# of a run finds a helper forked just before the trainer exited (after the last snapshot) or one
# that left the session, whose parent is init by then.
RUN_TOKEN_ENV = "MOECTL_RUN_TOKEN"


class _Family:
    """torchrun and everything it started, remembered even after they are reparented to init."""

    def __init__(self, pid: int, token: Optional[str] = None):
        self.pid = pid
        self.token = token
        self.procs: dict[int, psutil.Process] = {}

    def adopt_by_token(self) -> None:
        """The processes whose environment carries this run's token (one pass over /proc)."""
        if self.token is None:
            return
        mine = f"{RUN_TOKEN_ENV}={self.token}".encode()
        for pid in psutil.pids():
            if pid in self.procs or pid == os.getpid():
                continue
            try:
                with open(f"/proc/{pid}/environ", "rb") as fh:
                    if mine in fh.read().split(b"\0"):
                        self.procs.setdefault(pid, psutil.Process(pid))
            except (OSError, psutil.Error):
                pass  # gone, not ours to read, or no /proc (not Linux): the snapshots stand

    def snapshot(self) -> None:
        try:
            root = psutil.Process(self.pid)
            for child in root.children(recursive=True):
                self.procs.setdefault(child.pid, child)
        except psutil.Error:
            pass  # torchrun already gone: keep what we knew
        # Grandchildren of processes we know (a worker's own helpers) even once torchrun is gone.
        for p in list(self.procs.values()):
            try:
                for child in p.children(recursive=True):
                    self.procs.setdefault(child.pid, child)
            except psutil.Error:
                pass

    def alive(self) -> list[psutil.Process]:
        out = []
        for p in self.procs.values():
            try:
                # is_running() compares create times, so a recycled pid is not mistaken for ours.
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.Error:
                pass
        return out

    def kill_all(self, root_alive: bool) -> None:
        self.snapshot()
        self.adopt_by_token()
        if root_alive:
            _signal_group(self.pid, signal.SIGKILL)
        for p in self.alive():
            try:
                p.kill()
            except psutil.Error:
                pass

    def stop_survivors(self, grace_s: float, already_killed: bool,
                       hurry: Callable[[], bool] = lambda: False) -> bool:
        """After torchrun exited: TERM then KILL whatever it left behind. True if anything was killed.
        KILL comes once the grace is over, or as soon as `hurry()` says so (a Ctrl-C meanwhile)."""
        self.snapshot()
        self.adopt_by_token()
        left = self.alive()
        if not left:
            return False
        if not already_killed:
            for p in left:
                try:
                    p.terminate()
                except psutil.Error:
                    pass
            deadline = time.monotonic() + grace_s
            while left and not hurry() and time.monotonic() < deadline:
                _, left = psutil.wait_procs(left, timeout=min(0.1, max(0.0, deadline - time.monotonic())))
        for p in left:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(left, timeout=5.0)
        return bool(left)


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_this_thread() -> Optional[Callable[[], None]]:
    """A `preexec_fn` giving the child SIGTERM when the calling thread dies; None where the
    kernel has no such thing (not Linux, no libc prctl): the run then just lacks this guard."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent, sigterm = os.getpid(), int(signal.SIGTERM)

    def set_parent_death_signal() -> None:
        # In the child between fork and exec: two syscalls, no imports, no locks.
        if prctl(PR_SET_PDEATHSIG, sigterm, 0, 0, 0) == 0 and os.getppid() != parent:
            os._exit(128 + sigterm)  # we died before prctl took effect: the signal would never come

    return set_parent_death_signal


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _has_exited(pid: int) -> bool:
    """True once the child has exited, WITHOUT reaping it: while it is a zombie its pid (also its
    process group id) cannot be reused, so signalling the group stays safe until we reap."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


class _Tee(threading.Thread):
    """Copy the child's merged stdout/stderr into the log (and optionally the screen), line by line."""

    def __init__(self, stream: IO[bytes], log_fh: IO[bytes], echo: Optional[Callable[[str], None]],
                 on_eof: Callable[[], None], on_line: Optional[Callable[[str], None]] = None):
        super().__init__(name="moectl-tee", daemon=True)
        self.stream, self.log_fh, self.echo, self.on_eof = stream, log_fh, echo, on_eof
        self.on_line = on_line
        self.parser_lock = threading.Lock()  # held while on_line runs: detach_parser() waits for it
        self.tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        self.eof_at: Optional[float] = None  # when the pipe closed
        self.failure_tail: Optional[list[str]] = None  # the tail as it was when a worker failed
        self.worker_exit_code: Optional[int] = None
        self.lock = threading.Lock()  # the main thread closes the log under it
        self._redraw = False  # the last line ended in a bare `\r`: the next one replaces it on screen
        self.log_error: Optional[str] = None  # the first failed write to the log; none is tried after it

    def run(self) -> None:
        # Whatever the pipe has, as it comes (read1), cut into lines where a terminal starts over:
        # at newlines and at the `\r` of a progress bar that redraws itself each step (which a
        # readline would hold back until the bar's final newline).
        from moectl.stdout_metrics import split_lines

        pieces: list[bytes] = []  # the line being read, in the pieces it came in
        open_ = True
        while open_:
            chunk = self.stream.read1(65536)
            if chunk and b"\n" not in chunk and b"\r" not in chunk and not (pieces and pieces[-1].endswith(b"\r")):
                pieces.append(chunk)  # mid-line (a long one): nothing to split, and nothing re-scanned
                continue
            lines, pending = split_lines(b"".join(pieces) + chunk, ended=not chunk)
            if not chunk and pending:
                lines.append(pending)  # the last line has no newline: cut mid-print
            pieces = [pending] if chunk and pending else []
            log_open = all(self._line(raw) for raw in lines)
            open_ = bool(chunk) and log_open
        # EOF almost always means torchrun has exited: wake the wait loop now instead of at its next tick.
        self.eof_at = time.monotonic()
        self.on_eof()

    def _line(self, raw: bytes) -> bool:
        """One line to the log, the tail, the parser and the screen; False once the log is closed."""
        text = raw.decode("utf-8", errors="replace")
        with self.lock:
            if self.log_fh.closed:
                return False
            self._log(raw)
            if self._redraw and self.tail:
                self.tail.pop()  # the bar this line redraws: the tail keeps what the screen shows
            self._redraw = raw.endswith(b"\r")
            self.tail.append(tail_line(text))
            if self.failure_tail is None:
                m = _WORKER_FAILED.search(raw)
                if m:
                    self.worker_exit_code = int(m.group(1))
                    self.failure_tail = list(self.tail)
        with self.parser_lock:
            if self.on_line is not None:
                try:
                    self.on_line(text)
                except Exception as exc:  # a parser bug must not stop the log (nor the run)
                    self.on_line = None
                    with self.lock:
                        if not self.log_fh.closed:
                            self._log(f"moectl: stdout metrics parser stopped: {exc!r}\n".encode())
        if self.echo is not None:
            try:
                self.echo(text)
            except Exception:  # a broken terminal must not stop the log
                self.echo = None
        return True

    def detach_parser(self) -> None:
        """No line goes to on_line after this returns (one being parsed now is finished first)."""
        with self.parser_lock:
            self.on_line = None

    def _log(self, data: bytes) -> None:
        """Write to train.log; a failed write (the disk is full) is remembered and ends the logging,
        never the reading: a tee that stopped reading would leave the trainer blocked on a full pipe
        and moectl waiting on it forever."""
        if self.log_error is not None:
            return
        try:
            self.log_fh.write(data)
            self.log_fh.flush()
        except OSError as exc:
            self.log_error = (f"train.log is incomplete: writing it failed ({exc.strerror or exc}); "
                              "the output after that was read but not logged")


def _install_handlers(stop: _StopRequest) -> dict[int, object]:
    if threading.current_thread() is not threading.main_thread():
        return {}  # signal.signal only works in the main thread; the caller owns signals then
    previous = {}
    for sig in stop_signals():
        previous[sig] = signal.getsignal(sig)
        signal.signal(sig, stop.handler)
    return previous


def _restore_handlers(previous: dict[int, object]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _echo_to_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


# What torchrun does for its workers, for a trainer started as one plain `python script ...`
# (launcher = "python"): run it in a process group of its own, and on SIGTERM/SIGINT/SIGHUP stop
# that whole group - the trainer and whatever it started - escalating to SIGKILL after the grace.
# Without it, a moectl killed without a word (its parent-death signal reaching only its direct
# child) stopped the trainer but left the trainer's own children running on unrecorded. Stdlib
# only; it runs on moectl's interpreter, in the session launch() gives the child, and leaves with
# the trainer's exit status (a trainer killed by a signal: the same signal, SIGKILL included).
SUPERVISOR = """\
import os, signal, subprocess, sys, time
grace = float(sys.argv[1])
def own_group():
    os.setpgrp()  # the trainer and its helpers: a group of their own, which this process is not in
    try:  # and it stops if this process dies (SIGKILLed itself)
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    except Exception:
        pass
child = subprocess.Popen(sys.argv[2:], preexec_fn=own_group)
deadline = None
def signal_group(sig):
    try:
        os.killpg(child.pid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
def stop(signum, frame):
    global deadline
    if deadline is None:
        deadline = time.monotonic() + grace
        signal_group(signum)
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(sig, stop)
# Until the trainer exits; once told to stop, also until the rest of its group is gone (a helper
# that ignores SIGTERM is SIGKILLed when the grace runs out).
while child.poll() is None or (deadline is not None and signal_group(0)):
    time.sleep(0.05)
    if deadline is not None and time.monotonic() > deadline:
        signal_group(signal.SIGKILL)
code = child.returncode
if code < 0:
    try:
        signal.signal(-code, signal.SIG_DFL)
    except (OSError, ValueError):
        pass  # SIGKILL / SIGSTOP keep their default: what os.kill below wants anyway
    os.kill(os.getpid(), -code)
sys.exit(code)
"""


def supervised(argv: list[str], grace_s: float = 10.0) -> list[str]:
    """`argv` run under SUPERVISOR (see there): for the `python` launcher."""
    return [sys.executable, "-c", SUPERVISOR, str(grace_s), *argv]


# The watchdog (see the module docstring): argv GRACE_S. Its stdin is a pipe from launch(): first
# a line "PID CREATE_TIME TOKEN" naming the process to watch and the run's RUN_TOKEN_ENV value;
# "T" when moectl sent that process its own SIGTERM (Ctrl-C); "." once the run ended under moectl's eyes (exit quietly). End of file before
# "." = moectl died: one SIGTERM to the watched process (none if moectl sent one: a second would
# land inside torchrun's shutdown), then SIGKILL for every survivor of the family GRACE_S after
# whichever SIGTERM came first. The family is refreshed every 5 s and at moectl's death (one pass
# over the process table each), so workers reparented to init are still known; at moectl's death
# and before the SIGKILLs it also adopts every process whose environment carries the run's token
# (a helper that double-forked out of the tree between two refreshes). Its first line
# marks it for tests. Its argv carries none of the words moectl's process probes match (so it is
# never taken for training), nor "moectl": a `pkill -f moectl` meant for moectl should leave it
# to stop the training.
WATCHDOG_MARK = "# run watchdog: ends the training if its launcher dies"
WATCHDOG = WATCHDOG_MARK + """
import os, select, signal, sys, time
import psutil
grace = float(sys.argv[1])
line = b""
while not line.endswith(b"\\n"):
    byte = os.read(0, 1)
    if not byte:
        sys.exit(0)  # nothing to watch: launch() never started it, or died first
    line += byte
pid, created, token = (line.split() + [b""])[:3]
try:
    root = psutil.Process(int(pid))
    if abs(root.create_time() - float(created)) > 2.0:  # loose: a clock step moves both a little
        sys.exit(0)  # already gone, its pid reused
except psutil.Error:
    sys.exit(0)
family = {root.pid: root}
def alive(p):
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
def adopt_by_token():
    # One pass over /proc (Linux): environments are readable by their owner and by root.
    if not token:
        return
    mine = b"MOECTL_RUN_TOKEN=" + token
    for name in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not name.isdigit() or int(name) in family or int(name) == os.getpid():
            continue
        try:
            with open("/proc/" + name + "/environ", "rb") as fh:
                if mine in fh.read().split(bytes(1)):
                    family[int(name)] = psutil.Process(int(name))
        except (OSError, psutil.Error):
            pass
def refresh():
    # Descend only from members still alive: a dead member's pid may belong to a stranger now.
    kids = {}
    for p in psutil.process_iter(["ppid"]):
        kids.setdefault(p.info["ppid"], []).append(p)
    todo = [pid for pid, p in family.items() if alive(p)]
    while todo:
        for c in kids.get(todo.pop(), []):
            if c.pid not in family:
                family[c.pid] = c
                todo.append(c.pid)
told_at = None  # when the launcher sent its own SIGTERM (it wrote "T")
next_refresh = 0.0
while True:
    if time.monotonic() >= next_refresh:  # every 5 s: a scan of a busy node's table costs ~30 ms
        refresh()
        next_refresh = time.monotonic() + 5.0
    if select.select([0], [], [], 1.0)[0]:
        byte = os.read(0, 1)
        if byte == b"T":
            told_at = time.monotonic()
            continue
        if byte:
            sys.exit(0)  # finished normally: the launcher saw to everything
        break  # end of file: the launcher is gone
refresh()
adopt_by_token()
if told_at is None and alive(root):
    try:
        root.send_signal(signal.SIGTERM)
    except psutil.Error:
        pass
deadline = (time.monotonic() if told_at is None else told_at) + grace
ticks = 0
while time.monotonic() < deadline:
    if ticks % 5 == 0:
        refresh()
    ticks += 1
    if not any(alive(p) for p in family.values()):
        sys.exit(0)
    time.sleep(0.1)
refresh()
adopt_by_token()
for p in family.values():
    if alive(p):
        try:
            p.kill()
        except psutil.Error:
            pass
"""


class _Watchdog:
    """WATCHDOG, started before the process it will watch: `watch(pid)` once that runs,
    `finished()` when the run ended under our eyes. `ok` is False when it could not start."""

    def __init__(self, grace_s: float):
        self.proc: Optional[subprocess.Popen] = None
        self.fd: Optional[int] = None
        try:
            read_fd, self.fd = os.pipe()  # not inheritable (PEP 446): no other child holds the write end
            try:
                self.proc = subprocess.Popen(
                    [sys.executable, "-c", WATCHDOG, str(grace_s)], stdin=read_fd, stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL, start_new_session=True,
                    cwd="/",  # `-c` puts the cwd first on sys.path: a select.py there must not break it
                )
            finally:
                os.close(read_fd)
        except OSError:
            self._close_fd()

    @property
    def ok(self) -> bool:
        return self.proc is not None

    def _write(self, data: bytes) -> None:
        if self.fd is not None:
            try:
                os.write(self.fd, data)
            except OSError:
                pass

    def _close_fd(self) -> None:
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None

    def watch(self, pid: int, token: str = "") -> None:
        try:
            self._write(f"{pid} {psutil.Process(pid).create_time()!r} {token}\n".encode())
        except psutil.Error:
            pass  # already gone: nothing to guard

    def told_to_stop(self) -> None:
        """moectl sent the watched process its SIGTERM: the watchdog must not send another."""
        self._write(b"T")

    def finished(self) -> None:
        """The run ended under our eyes: the watchdog exits (and is reaped here)."""
        self._write(b".")
        self._close_fd()
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def launch(
    argv: list[str],
    *,
    cwd: Path,
    env: dict[str, str],
    log_path: Path,
    metrics_path: Path,
    progress: Optional[ProgressSink] = None,
    stop_grace_s: float = 10.0,
    echo: bool = False,
    on_spawn: Optional[Callable[[int], None]] = None,
    output_metrics: Optional[OutputMetrics] = None,
) -> LaunchResult:
    """Run `argv` (the torchrun command) to the end, or until SIGINT/SIGTERM stops it.

    `env` is laid over this process's environment. Output goes to `log_path` (appended, flushed per
    line) and, with `echo`, to the progress sink's `echo` (or stdout). Records appearing in
    `metrics_path` are fed to `progress`, which is closed before returning. `on_spawn(pid)` is
    called once torchrun is running (e.g. to record its pid). `output_metrics` (a trainer whose
    metrics are parsed from its stdout) is called with every output line from the tee thread and
    closed once the output has ended, before the final read of `metrics_path`, which it writes.
    Never raises for what the child does.
    """
    t0 = time.monotonic()
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    follower = MetricsFollower(Path(metrics_path))
    stop = _StopRequest()
    child_env = {**os.environ, **env}
    child_env.setdefault("PYTHONUNBUFFERED", "1")  # line-by-line output from torchrun itself
    token = f"{os.getpid()}.{time.time_ns()}"
    child_env[RUN_TOKEN_ENV] = token

    def feed(final: bool = False) -> None:
        for rec in follower.poll(final=final):
            if progress is not None:
                try:
                    progress.record(rec)
                except Exception:
                    pass  # a display bug must not cost the run

    previous = _install_handlers(stop)
    log_fh = open(log_path, "ab")
    proc: Optional[subprocess.Popen] = None
    tee: Optional[_Tee] = None
    family: Optional[_Family] = None
    watchdog: Optional[_Watchdog] = None
    killed = False
    interrupted = False  # a stop signal ended it (one that arrives after a clean exit 0 is ignored)
    exit_code: Optional[int] = None
    error: Optional[str] = None
    try:
        if stop.count:  # a signal arrived before we even started: do not start
            error = f"stopped by {stop.signal_name} before start"
            interrupted = True
        else:
            watchdog = _Watchdog(stop_grace_s)
            try:
                proc = subprocess.Popen(
                    argv, cwd=str(cwd), env=child_env, stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                    preexec_fn=None if watchdog.ok else _die_with_this_thread(),
                )
            except OSError as exc:
                error = f"could not start {argv[0] if argv else '(empty argv)'}: {exc}"
                log_fh.write(f"moectl: {error}\n".encode())
        if proc is not None:
            family = _Family(proc.pid, token)
            watchdog.watch(proc.pid, token)
            if echo:
                sink_echo = progress.echo if progress is not None else _echo_to_stdout
            else:
                sink_echo = None
            tee = _Tee(proc.stdout, log_fh, sink_echo, on_eof=stop.wake.set, on_line=output_metrics)
            tee.start()
            if on_spawn is not None:
                on_spawn(proc.pid)

            term_at: Optional[float] = None
            last_snapshot = 0.0
            while not _has_exited(proc.pid):
                now = time.monotonic()
                if stop.count and term_at is None:
                    family.snapshot()
                    # The watchdog hears of it first: a moectl SIGKILLed between the two (the
                    # trainer already stopping) left it to send a second SIGTERM into torchrun's
                    # shutdown. Killed before its own, the watchdog's SIGKILL still ends the run.
                    watchdog.told_to_stop()
                    _signal_one(proc.pid, signal.SIGTERM)  # torchrun forwards it to the workers
                    term_at = now
                    interrupted = True
                if not killed and term_at is not None and (stop.count >= 2 or now - term_at >= stop_grace_s):
                    family.kill_all(root_alive=True)
                    killed = True
                if now - last_snapshot >= SNAPSHOT_S:
                    family.snapshot()
                    last_snapshot = now
                feed()
                # Short ticks while stopping, or just after the pipe closed (exit is imminent; a child
                # that closes its output and keeps running falls back to the normal tick).
                busy = term_at is not None or (tee.eof_at is not None and now - tee.eof_at < 2.0)
                stop.wake.wait(0.01 if busy else POLL_S)
                stop.wake.clear()
            # torchrun has exited but is not reaped yet; kill its group's stragglers while the pgid
            # is still reserved, then the workers it may have left in their own sessions.
            _signal_group(proc.pid, signal.SIGKILL if killed else signal.SIGTERM)
            remaining = stop_grace_s if term_at is None else max(0.5, stop_grace_s - (time.monotonic() - term_at))
            # A Ctrl-C while the stragglers get their grace ends it: any one if torchrun had ended by
            # itself, a second one (as in the wait loop) if a signal had stopped it.
            hurry_at = 1 if term_at is None else 2
            if family.stop_survivors(remaining, already_killed=killed, hurry=lambda: stop.count >= hurry_at) and interrupted:
                killed = True
            exit_code = proc.wait()
            if stop.count and not interrupted and exit_code != 0:
                # The same signal reached torchrun first (Slurm's scancel and time limit signal every
                # process of the job at once): it was stopped, it did not fail.
                interrupted = True
            tee.join(timeout=5.0)  # an escaped process may still hold the pipe: do not hang on it
            if output_metrics is not None:
                # Its summary line, before the last read below. A tee still reading (an escaped
                # process holds the pipe) hands no more lines to it from here on.
                tee.detach_parser()
                output_metrics.close()
            feed(final=True)
    finally:
        if proc is not None and proc.returncode is None:
            # Only reached on a bug or an exception we did not expect: never leave torchrun behind.
            if family is not None:
                family.kill_all(root_alive=True)
            proc.kill()
            proc.wait()
        if watchdog is not None:
            watchdog.finished()
        _restore_handlers(previous)
        try:
            if tee is not None:
                with tee.lock:
                    log_fh.close()
            else:
                log_fh.close()
        except OSError:  # what a full disk left in its buffer (the tee says the log is incomplete)
            pass
        if proc is not None and proc.stdout is not None and (tee is None or not tee.is_alive()):
            proc.stdout.close()
        follower.close()
        if progress is not None:
            try:
                progress.close()
            except Exception:
                pass

    return LaunchResult(
        exit_code=exit_code,
        interrupted=interrupted,
        signal_name=stop.signal_name if interrupted else None,
        duration_s=time.monotonic() - t0,
        log_tail=_tail_text(tee, error),
        pid=proc.pid if proc is not None else None,
        killed=killed,
        metrics_records=follower.records,
        malformed_lines=follower.malformed,
        error=error,
        worker_exit_code=tee.worker_exit_code if tee is not None else None,
        log_error=tee.log_error if tee is not None else None,
    )


def _tail_text(tee: Optional[_Tee], error: Optional[str]) -> str:
    if tee is None:
        return error or ""
    return "\n".join(tee.failure_tail if tee.failure_tail is not None else tee.tail)


def _signal_one(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
