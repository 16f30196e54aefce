"""The launcher: real subprocesses, real torchrun (gloo, CPU), real signals.

The engine is stood in for by `tests/fixtures/fake_engine.py` (no torch, same metrics contract), so
these tests exercise process handling, not training. Signal tests run `launch` inside a child python
so that the test process itself is never signalled.
"""
from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable, Optional

import psutil
import pytest

from engine.schema import RunSummary, StartInfo, StepMetrics, parse_line, to_line
from moectl.launch import LaunchResult, launch
from moectl.progress import (
    MetricsFollower,
    NullProgress,
    PlainProgress,
    RichProgress,
    eta_seconds,
    make_progress,
)
from tests.conftest import kill_all, steps_written, stop_process, wait_for

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
ENV = {"PYTHONPATH": str(REPO)}


def fake_argv(out: Path, *extra: str, nproc: int | None = None) -> list[str]:
    """The fake engine, bare (nproc=None) or under real torchrun."""
    engine = ["-m", "tests.fixtures.fake_engine", "--out-dir", str(out), *extra]
    if nproc is None:
        return [PY, *engine]
    return [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *engine]


class Recorder:
    """A ProgressSink that remembers what it was fed."""

    def __init__(self):
        self.records, self.echoed, self.closed = [], [], 0

    def record(self, rec):
        self.records.append(rec)

    def echo(self, line):
        self.echoed.append(line)

    def close(self):
        self.closed += 1


def steps_in(path: Path) -> list[int]:
    recs = [parse_line(l) for l in path.read_text().splitlines() if l.strip()]
    return [r.step for r in recs if isinstance(r, StepMetrics)]


def worker_pids(out: Path) -> list[int]:
    return [json.loads(p.read_text())["pid"] for p in sorted((out / "pids").glob("rank*.json"))]


def exited(pid: int) -> bool:
    """The process no longer runs (absent, or a zombie waiting for init to reap it)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def assert_gone(*pids: int) -> None:
    for pid in pids:
        wait_for(lambda: exited(pid), f"pid {pid} exiting (it survived the stop)", 30)


# --- metrics follower and progress sinks (no subprocess) -------------------------------------------


def test_follower_waits_for_file_and_complete_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    f = MetricsFollower(path)
    assert f.poll() == []  # the engine has not created it yet
    line = to_line(StepMetrics(step=0, loss=3.5, tok_per_sec=1000.0))
    with open(path, "w") as fh:
        fh.write(line[:17])  # half a line, as a reader may see it mid-write
        fh.flush()
        assert f.poll() == []
        fh.write(line[17:] + "\n")
        fh.flush()
        got = f.poll()
        assert [(r.step, r.loss) for r in got] == [(0, 3.5)]
        fh.write("{not json\n" + to_line(StepMetrics(step=1, loss=3.0)) + "\n")
        fh.flush()
        assert [r.step for r in f.poll()] == [1]
    assert f.malformed == 1 and f.records == 2
    f.close()


def test_follower_final_poll_counts_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(to_line(StepMetrics(step=0, loss=1.0)) + "\n" + '{"step": 1, "lo')
    f = MetricsFollower(path)
    assert [r.step for r in f.poll()] == [0]
    assert f.poll(final=True) == []
    assert f.malformed == 1


def test_follower_goes_on_in_a_metrics_file_replaced_under_it(tmp_path):
    # A requeued Slurm job sets the attempt's metrics.jsonl aside and the resumed engine writes the
    # steps it keeps into a new file: the follower read the old handle forever (no progress shown).
    path = tmp_path / "metrics.jsonl"
    lines = [to_line(StepMetrics(step=i, loss=3.0)) + "\n" for i in range(8)]
    path.write_text("".join(lines[:6]))
    f = MetricsFollower(path)
    assert [r.step for r in f.poll()] == list(range(6))
    path.rename(tmp_path / "metrics.jsonl.attempt1")
    assert f.poll() == []  # nothing there yet
    fresh = tmp_path / "fresh.jsonl"
    fresh.write_text("".join(lines[:4]))  # resumed at the step-4 checkpoint: steps 0-3 kept
    os.replace(fresh, path)
    assert [r.step for r in f.poll()] == [0, 1, 2, 3]
    with open(path, "a") as fh:
        fh.write(lines[4] + lines[5] + lines[6])
    assert [r.step for r in f.poll()] == [4, 5, 6]
    path.write_text(lines[0])  # truncated in place below what was read: read again from its start
    assert [r.step for r in f.poll()] == [0]
    f.close()


def test_eta_uses_pace_since_first_seen_step():
    # 4 steps took 8 s after the first one we saw: 2 s/step, 5 steps left.
    assert eta_seconds(done=5, total=10, first_done=1, first_t=100.0, now=108.0, dt_ms=999.0) == pytest.approx(10.0)
    # one step seen: fall back to its dt
    assert eta_seconds(done=1, total=4, first_done=1, first_t=0.0, now=0.0, dt_ms=500.0) == pytest.approx(1.5)
    assert eta_seconds(done=4, total=4, first_done=1, first_t=0.0, now=9.0, dt_ms=None) == 0.0
    assert eta_seconds(done=1, total=4, first_done=1, first_t=0.0, now=0.0, dt_ms=None) is None


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_plain_progress_cadence_and_format():
    out, clock = io.StringIO(), Clock()
    sink = PlainProgress(stream=out, every_steps=10, every_s=10.0, clock=clock)
    sink.record(StartInfo(steps=25, world_size=2, tokens_per_step=4096, device="cpu"))
    for step in range(25):
        clock.t += 0.5
        if step == 14:
            clock.t += 11.0  # a slow step: the time cadence prints it although 10 steps have not passed
        sink.record(StepMetrics(step=step, loss=4.0 - 0.1 * step, dt_ms=500.0, tok_per_sec=8192.0, mfu=1.25))
    sink.record(RunSummary(steps=25, world_size=2, total_time_s=24.0))
    sink.close()
    sink.close()  # idempotent
    lines = out.getvalue().splitlines()
    assert lines[0] == "progress: 25 steps, world size 2, cpu"
    shown = [int(re.match(r"progress: step (\d+)/25 ", l).group(1)) for l in lines[1:-1]]
    assert shown == [1, 11, 15, 25]
    assert re.fullmatch(
        r"progress: step 11/25 \(44\.0%\) \| loss 3\.0000 \| tok/sec 8,192 \| dt 500\.0ms \| mfu 1\.25% \| eta 7s",
        lines[2],
    ), lines[2]
    assert lines[-2].endswith("eta 0s")
    assert lines[-1] == "progress: finished 25 steps in 24s"


def test_plain_progress_prints_last_step_on_close_when_run_stops_early():
    out = io.StringIO()
    sink = PlainProgress(stream=out, every_steps=10, clock=Clock())
    sink.record(StartInfo(steps=100, world_size=1, tokens_per_step=1, device="cpu"))
    for step in range(4):
        sink.record(StepMetrics(step=step, loss=1.0))
    sink.close()
    assert [l.split(" | ")[0] for l in out.getvalue().splitlines()[1:]] == [
        "progress: step 1/100 (1.0%)", "progress: step 4/100 (4.0%)"]


def test_progress_of_a_trainer_counting_from_1_is_the_steps_done_and_a_resumed_engines_is_not():
    def heads(start: StartInfo, numbers) -> list[str]:
        out = io.StringIO()
        sink = PlainProgress(stream=out, every_steps=2, every_s=1e9, clock=Clock())
        sink.record(start)
        for step in numbers:
            sink.record(StepMetrics(step=step, loss=1.0))
        return [l.split(" | ")[0] for l in out.getvalue().splitlines()[1:]]

    # `step 1/5` .. `step 5/5`: 5 of 5 done at its step 5, not "step 6 (past the planned 5)".
    assert heads(StartInfo(steps=5, world_size=1, tokens_per_step=1, device="cpu"), range(1, 6)) == [
        "progress: step 1/5 (20.0%)", "progress: step 3/5 (60.0%)", "progress: step 5/5 (100.0%)"]
    # The engine resumed at step 1 (a checkpoint after step 0) numbers from 0: step 1 is its second.
    assert heads(StartInfo(steps=5, world_size=1, tokens_per_step=1, device="cpu", start_step=1), range(1, 5)) == [
        "progress: step 2/5 (40.0%)", "progress: step 4/5 (80.0%)", "progress: step 5/5 (100.0%)"]
    # A trainer resumed at step 3 (no start_step: a stdout-parsed one) is where its numbers say.
    assert heads(StartInfo(steps=5, world_size=1, tokens_per_step=1, device="cpu"), range(3, 5)) == [
        "progress: step 4/5 (80.0%)", "progress: step 5/5 (100.0%)"]


def test_a_trainer_running_past_its_planned_steps_is_said_so_at_the_usual_cadence():
    # A trainer that ignores --steps: not a line per step with "2720.0%" and a meaningless ETA.
    out = io.StringIO()
    sink = PlainProgress(stream=out, every_steps=10, every_s=1e9, clock=Clock())
    sink.record(StartInfo(steps=5, world_size=1, tokens_per_step=1, device="cpu"))
    for step in range(30):
        sink.record(StepMetrics(step=step, loss=1.0))
    heads = [l.split(" | ")[0] for l in out.getvalue().splitlines()[1:]]
    assert heads == ["progress: step 1/5 (20.0%)", "progress: step 5/5 (100.0%)",
                     "progress: step 15 (past the planned 5)", "progress: step 25 (past the planned 5)"]
    assert "eta" not in out.getvalue().splitlines()[-1]


def test_make_progress_picks_sink():
    assert isinstance(make_progress(console_is_tty=False, quiet=False), PlainProgress)
    assert isinstance(make_progress(console_is_tty=True, quiet=True), NullProgress)
    sink = make_progress(console_is_tty=True, quiet=False)
    try:
        assert isinstance(sink, RichProgress)
        sink.record(StartInfo(steps=3, world_size=1, tokens_per_step=1, device="cpu"))
        sink.record(StepMetrics(step=0, loss=2.0, tok_per_sec=10.0))
    finally:
        sink.close()


# --- launch with a bare python child (fast) ---------------------------------------------------------


def test_launch_plain_child_tees_output_and_restores_handlers(tmp_path):
    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    rec = Recorder()
    spawned = []
    # 20k lines (~2.5 MB) through a 64 KiB pipe: a non-draining launcher would block forever.
    r = launch(fake_argv(tmp_path, "--steps", "5", "--sleep-per-step", "0.01", "--spam-lines", "20000"),
               cwd=REPO, env=ENV, log_path=tmp_path / "train.log", metrics_path=tmp_path / "metrics.jsonl",
               progress=rec, echo=True, on_spawn=spawned.append)
    assert (r.exit_code, r.interrupted, r.signal_name, r.killed) == (0, False, None, False)
    assert r.worker_exit_code is None
    assert spawned == [r.pid]
    log = (tmp_path / "train.log").read_text().splitlines()
    assert sum("filler line" in l for l in log) == 20000
    assert len(rec.echoed) == len(log)
    assert r.log_tail.splitlines()[-1] == "[rank 0] done" and len(r.log_tail.splitlines()) == 40
    assert [x.step for x in rec.records if isinstance(x, StepMetrics)] == [0, 1, 2, 3, 4]
    assert isinstance(rec.records[0], StartInfo) and isinstance(rec.records[-1], RunSummary)
    assert (r.metrics_records, r.malformed_lines, rec.closed) == (7, 0, 1)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_the_tail_a_record_keeps_is_text_of_bounded_lines(tmp_path):
    """A trainer that printed 2 MB lines (a tensor, a config dump) put all of them into run.json and
    the committed report, and its NULs and colours made git take the report for a binary file. The
    log keeps every byte; the tail keeps text, each line cut at TAIL_LINE_CHARS, saying so."""
    from moectl.text import TAIL_LINE_CHARS

    code = ("import sys\n"
            "sys.stdout.write('\\x1b[31mError\\x1b[0m: bad\\x00value ' + 'x' * 2_000_000 + '\\n')\n"
            "sys.stdout.write('last\\tline\\n')\nsys.exit(1)\n")
    r = launch([sys.executable, "-c", code], cwd=REPO, env=ENV, log_path=tmp_path / "train.log",
               metrics_path=tmp_path / "metrics.jsonl", progress=Recorder(), echo=False)
    assert r.exit_code == 1
    first, last = r.log_tail.splitlines()
    assert first.startswith("Error: badvalue xxx") and first.endswith(f"({2_000_016 - TAIL_LINE_CHARS:,} more characters)")
    assert len(first) < TAIL_LINE_CHARS + 40 and last == "last\tline"
    assert len((tmp_path / "train.log").read_bytes()) > 2_000_000  # the log has it all


def test_a_helper_forked_as_the_trainer_exits_is_stopped_and_the_summary_still_written(tmp_path):
    """A trainer that forks a helper (its own session, holding the output pipe) just before it
    exits: no snapshot saw it, and its parent is init by the end. It outlived the run, and the
    tee waited on its pipe until the join timed out, so the parsed run lost its summary line."""
    from moectl.stdout_metrics import LiveMetricsWriter, StdoutFormat, StdoutParser

    pid_file = tmp_path / "helper.pid"
    code = ("import os, sys, time\n"
            "print('step 0 | loss: 3.0 | dt: 100ms', flush=True)\n"
            "print('step 1 | loss: 2.0 | dt: 100ms', flush=True)\n"
            "if os.fork() == 0:\n"
            "    os.setsid()\n"
            f"    open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
            "    time.sleep(60)\n"
            "    os._exit(0)\n"
            f"while not os.path.exists({str(pid_file)!r}): time.sleep(0.01)\n"
            "sys.exit(0)\n")
    writer = LiveMetricsWriter(tmp_path / "metrics.jsonl", StdoutParser(StdoutFormat.build("nanochat")))
    r = launch([sys.executable, "-c", code], cwd=REPO, env=ENV, log_path=tmp_path / "train.log",
               metrics_path=tmp_path / "metrics.jsonl", progress=Recorder(), echo=False, output_metrics=writer)
    pid = int(pid_file.read_text())
    try:
        helper = psutil.Process(pid)
    except psutil.NoSuchProcess:
        helper = None  # stopped and reaped already
    try:
        assert r.exit_code == 0
        assert helper is None or not helper.is_running() or helper.status() == psutil.STATUS_ZOMBIE
        records = [parse_line(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
        assert isinstance(records[-1], RunSummary) and records[-1].steps == 2
    finally:
        kill_all([helper] if helper is not None else [])


def test_a_pipe_held_open_by_a_process_outside_the_run_still_gets_the_summary_written(tmp_path):
    """The trainer hands its output pipe to a process that is neither its descendant nor carries
    the run's token (here: one started before the run, over a unix socket), and exits. No kill
    can end the pipe, so the tee reads on after the run; the parsed run's summary line was only
    written once the tee had ended, so it was never written."""
    import socket

    from moectl.stdout_metrics import LiveMetricsWriter, StdoutFormat, StdoutParser

    sock_path = tmp_path / "holder.sock"
    holder = subprocess.Popen([PY, "-c", (
        "import socket, sys, time\n"
        "s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(1)\n"
        "conn, _ = s.accept()\n"
        "msg, fds, _, _ = socket.recv_fds(conn, 16, 1)\n"
        "conn.sendall(b'held')\n"
        "time.sleep(120)\n"), str(sock_path)])
    code = ("import socket, sys\n"
            "print('step 0 | loss: 3.0 | dt: 100ms', flush=True)\n"
            "print('step 1 | loss: 2.0 | dt: 100ms', flush=True)\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            f"s.connect({str(sock_path)!r})\n"
            "socket.send_fds(s, [b'x'], [sys.stdout.fileno()])\n"
            "assert s.recv(4) == b'held'\n")
    try:
        wait_for(sock_path.exists, "the holder listening", 60, proc=holder)
        writer = LiveMetricsWriter(tmp_path / "metrics.jsonl", StdoutParser(StdoutFormat.build("nanochat")))
        r = launch([PY, "-c", code], cwd=REPO, env=ENV, log_path=tmp_path / "train.log",
                   metrics_path=tmp_path / "metrics.jsonl", progress=Recorder(), echo=False, output_metrics=writer)
        assert r.exit_code == 0 and holder.poll() is None  # the pipe is still held
        records = [parse_line(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
        assert [type(x) for x in records] == [StartInfo, StepMetrics, StepMetrics, RunSummary] and records[-1].steps == 2
    finally:
        stop_process(holder)


def test_ctrl_c_while_the_trainers_leftovers_get_their_grace_ends_the_grace(tmp_path):
    """The trainer exits 0 and leaves a helper that notes SIGTERM and carries on. moectl gives such
    leftovers the grace (60 s here) before SIGKILL; a Ctrl-C meanwhile was counted and not acted
    on, so moectl sat out the whole grace."""
    pid_file, noted = tmp_path / "helper.pid", tmp_path / "helper.sigterms"
    helper = ("import os, signal, sys, time\n"
              f"signal.signal(signal.SIGTERM, lambda *_: open({str(noted)!r}, 'a').write('SIGTERM\\n'))\n"
              f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
              "while True: time.sleep(0.05)\n")
    trainer = ("import os, subprocess, sys, time\n"
               f"subprocess.Popen([sys.executable, '-c', {helper!r}])\n"
               f"while not os.path.exists({str(pid_file)!r}): time.sleep(0.01)\n"
               "print('step 0 | loss: 3.0 | dt: 100ms', flush=True)\n")
    grace = 60.0
    r, took = run_and_signal(tmp_path, [PY, "-c", trainer], [signal.SIGINT], grace=grace,
                             ready=(noted.exists, "the helper told to stop (its SIGTERM noted)"))
    assert r.exit_code == 0 and not r.interrupted  # the trainer had ended by itself, and well
    assert took < grace / 2, "the Ctrl-C did not end the grace: moectl waited it out"
    assert exited(int(pid_file.read_text()))  # killed at the Ctrl-C, not after the grace


def test_launch_missing_executable_reports_and_closes(tmp_path):
    rec = Recorder()
    r = launch([str(tmp_path / "no-such-python"), "-V"], cwd=tmp_path, env={}, log_path=tmp_path / "train.log",
               metrics_path=tmp_path / "metrics.jsonl", progress=rec)
    assert r.exit_code is None and r.pid is None and not r.interrupted
    assert "could not start" in r.error and "no-such-python" in (tmp_path / "train.log").read_text()
    assert rec.closed == 1


CHILD = textwrap.dedent("""
    import json, sys
    from dataclasses import asdict
    from pathlib import Path
    from moectl.launch import launch
    from moectl.progress import PlainProgress
    out, grace, argv = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]
    r = launch(argv, cwd=Path.cwd(), env={}, log_path=out / "train.log", metrics_path=out / "metrics.jsonl",
               progress=PlainProgress(stream=sys.stderr, every_steps=1), stop_grace_s=grace)
    print(json.dumps(asdict(r)))
""")


def sigterms_noted(out: Path) -> dict[str, int]:
    """SIGTERMs each `--ignore-sigterm` rank has noted so far: {"rank0": 1, ...}."""
    return {f.name: f.read_text().count("SIGTERM") for f in sorted((out / "signals").glob("rank*"))}


def run_and_signal(out: Path, argv: list[str], sigs: list[int], grace: float, ranks: int = 1, after_steps: int = 3,
                   between: Callable[[], bool] = lambda: True,
                   ready: Optional[tuple[Callable[[], bool], str]] = None):
    """Start `launch` in a child python; once every rank is up (its pid file) and `after_steps` steps
    are in metrics - or, given `ready` (an event and what it is), once that holds - send `sigs` to
    that child, each next one only once `between()` holds (the previous one has been acted on).
    Returns (LaunchResult, seconds from the last signal to exit)."""
    out.mkdir(parents=True, exist_ok=True)
    stderr = out / "launch.stderr"  # a file, not a pipe: nobody reads it while we wait
    with open(stderr, "w") as err_fh:
        child = subprocess.Popen([PY, "-c", CHILD, str(out), str(grace), *argv], cwd=REPO, env={**os.environ, **ENV},
                                 stdout=subprocess.PIPE, stderr=err_fh, text=True)
    try:
        def running():
            return len(worker_pids(out)) == ranks and len(steps_written(out / "metrics.jsonl")) >= after_steps

        event, what = ready or (running, f"{ranks} rank(s) up and {after_steps} steps in metrics")
        wait_for(event, what, 120, proc=child, output=stderr.read_text)
        for i, s in enumerate(sigs):
            if i:
                wait_for(between, f"signal {i} acted on before signal {i + 1}", 60, proc=child, output=stderr.read_text)
            child.send_signal(s)
            t_sig = time.monotonic()
        stdout, _ = child.communicate(timeout=grace + 60)  # a bound against a hang, not a latency check
        took = time.monotonic() - t_sig
    finally:
        if child.poll() is None:
            stop_process(child)
    assert child.returncode == 0, stderr.read_text()
    return LaunchResult(**json.loads(stdout.splitlines()[-1])), took


def test_second_signal_escalates_to_sigkill_at_once(tmp_path):
    # A child that carries on through SIGTERM and a long grace: only the second Ctrl-C, sent once the
    # first one's SIGTERM has reached the child, can end it before the grace runs out.
    argv = fake_argv(tmp_path, "--steps", "100000", "--sleep-per-step", "0.05", "--ignore-sigterm")
    grace = 60.0
    r, took = run_and_signal(tmp_path, argv, [signal.SIGINT, signal.SIGINT], grace=grace,
                             between=lambda: sigterms_noted(tmp_path) == {"rank0": 1})
    assert r.interrupted and r.killed and r.signal_name == "SIGINT"
    assert r.exit_code == -signal.SIGKILL
    assert took < grace / 2, "the second signal did not escalate: the child ran on towards the grace"
    assert sigterms_noted(tmp_path) == {"rank0": 1}  # asked politely once, then killed
    assert_gone(r.pid, *worker_pids(tmp_path))
    assert len(steps_in(tmp_path / "metrics.jsonl")) < 100000


def is_watchdog(proc: psutil.Process) -> bool:
    from moectl.launch import WATCHDOG_MARK

    try:
        cmd = proc.cmdline()
        return cmd[1:2] == ["-c"] and cmd[2].startswith(WATCHDOG_MARK + "\n")
    except (psutil.Error, IndexError):
        return False


def kill_launcher_when_up(out: Path, argv: list[str], grace: float, ranks: int = 1,
                          before_kill: Callable[[subprocess.Popen], None] = lambda child: None,
                          ) -> tuple[psutil.Process, list[psutil.Process], int, float]:
    """Start `launch` in a child python and SIGKILL it once every rank is up (and `before_kill`
    returned): -> (the launched process, the ranks, its watchdog's pid, the moment of the kill),
    each taken before the kill. The ranks ignore SIGTERM and never print (`--no-output`), so
    neither a SIGTERM nor a closed pipe stops them."""
    out.mkdir(parents=True, exist_ok=True)
    stderr = out / "launch.stderr"
    with open(stderr, "w") as err_fh:
        child = subprocess.Popen([PY, "-c", CHILD, str(out), str(grace), *argv], cwd=REPO, env={**os.environ, **ENV},
                                 stdout=subprocess.DEVNULL, stderr=err_fh)
    try:
        wait_for(lambda: len(worker_pids(out)) == ranks, f"{ranks} rank(s) up", 120, proc=child, output=stderr.read_text)
        kids = psutil.Process(child.pid).children()
        launched = [p for p in kids if not is_watchdog(p)]
        watchdogs = [p.pid for p in kids if is_watchdog(p)]
        assert len(launched) == 1 and len(watchdogs) == 1, kids
        rank_procs = [psutil.Process(pid) for pid in worker_pids(out)]
        before_kill(child)
        child.kill()
        child.wait(timeout=30)
        return launched[0], rank_procs, watchdogs[0], time.monotonic()
    finally:
        if child.poll() is None:
            stop_process(child)


def test_a_trainer_deaf_to_sigterm_is_killed_after_the_grace_once_its_launcher_is_sigkilled(tmp_path):
    """moectl SIGKILLed: its watchdog sends the trainer one SIGTERM, which it ignores (as a torchrun
    wedged in its own shutdown does), then SIGKILLs it once the grace has passed."""
    argv = fake_argv(tmp_path, "--steps", "100000", "--sleep-per-step", "0.05", "--ignore-sigterm", "--no-output")
    grace = 2.0
    trainer_proc, _, watchdog, killed_at = kill_launcher_when_up(tmp_path, argv, grace)
    trainer = trainer_proc.pid
    try:
        state = lambda: f"SIGTERMs noted: {sigterms_noted(tmp_path)}; trainer exited: {exited(trainer)}"
        wait_for(lambda: sigterms_noted(tmp_path) == {"rank0": 1}, "the watchdog's SIGTERM reaching the trainer", 30,
                 output=state)
        wait_for(lambda: exited(trainer), "the trainer being killed after the grace", 60, output=state)
        took = time.monotonic() - killed_at
        assert took >= grace / 2, f"killed {took:.2f}s after its launcher: the grace ({grace}s) was not granted"
        assert sigterms_noted(tmp_path) == {"rank0": 1}  # one polite request, then SIGKILL
        wait_for(lambda: exited(watchdog), "the watchdog exiting once its work was done", 30)
    finally:
        kill_all([trainer_proc])


def test_after_moectls_own_sigterm_a_sigkilled_moectl_adds_no_second_one(tmp_path):
    """Ctrl-C: moectl sends the trainer its SIGTERM and tells the watchdog; moectl is then
    SIGKILLed inside its grace. The watchdog sends no SIGTERM of its own (a second one would land
    inside torchrun's shutdown) and kills the trainer when moectl's grace would have run out."""
    argv = fake_argv(tmp_path, "--steps", "100000", "--sleep-per-step", "0.05", "--ignore-sigterm", "--no-output")
    grace = 3.0
    sigterm_seen = []

    def ctrl_c_then_wait_for_its_sigterm(child):
        child.send_signal(signal.SIGINT)
        wait_for(lambda: sigterms_noted(tmp_path) == {"rank0": 1}, "moectl's SIGTERM reaching the trainer", 60,
                 proc=child)
        sigterm_seen.append(time.monotonic())

    trainer, _, watchdog, killed_at = kill_launcher_when_up(tmp_path, argv, grace, before_kill=ctrl_c_then_wait_for_its_sigterm)
    try:
        wait_for(lambda: exited(trainer.pid), "the trainer being killed", 60,
                 output=lambda: f"SIGTERMs noted: {sigterms_noted(tmp_path)}")
        assert time.monotonic() - sigterm_seen[0] >= grace / 2  # the grace counted from moectl's SIGTERM...
        assert sigterms_noted(tmp_path) == {"rank0": 1}  # ... and no second SIGTERM
        wait_for(lambda: exited(watchdog), "the watchdog exiting once its work was done", 30)
    finally:
        kill_all([trainer])


def test_a_helper_that_left_the_tree_is_found_by_the_run_token_once_moectl_is_sigkilled(tmp_path):
    """A trainer whose helper double-forked into a session of its own (its parent init at once, so
    no descent from torchrun ever finds it) and ignores SIGTERM. moectl is SIGKILLed: the watchdog
    finds the helper by the run's token in its environment and kills it with the rest."""
    from moectl.launch import RUN_TOKEN_ENV, WATCHDOG

    assert f"{RUN_TOKEN_ENV}=" in WATCHDOG  # the watchdog script spells the same variable
    pid_file = tmp_path / "helper.pid"
    code = ("import os, signal, sys, time\n"
            "if os.fork() == 0:\n"
            "    os.setsid()\n"
            "    if os.fork() == 0:\n"
            "        signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            f"        open({str(pid_file) + '.tmp'!r}, 'w').write(str(os.getpid()))\n"
            f"        os.rename({str(pid_file) + '.tmp'!r}, {str(pid_file)!r})\n"
            "        time.sleep(600)\n"
            "    os._exit(0)\n"
            "while True: time.sleep(0.1)\n")
    stderr = tmp_path / "launch.stderr"
    with open(stderr, "w") as err_fh:
        child = subprocess.Popen([PY, "-c", CHILD, str(tmp_path), "2.0", sys.executable, "-c", code], cwd=REPO,
                                 env={**os.environ, **ENV}, stdout=subprocess.DEVNULL, stderr=err_fh)
    helper = None
    trainer = []
    try:
        wait_for(pid_file.exists, "the helper leaving the process tree", 60, proc=child, output=stderr.read_text)
        helper = psutil.Process(int(pid_file.read_text()))
        trainer = [p for p in psutil.Process(child.pid).children() if not is_watchdog(p)]
        assert helper.ppid() != child.pid and helper not in psutil.Process(child.pid).children(recursive=True)
        child.kill()
        child.wait(timeout=30)
        wait_for(lambda: exited(helper.pid), "the escaped helper being killed by the watchdog", 60,
                 output=lambda: f"helper {helper.pid} status {helper.status() if helper.is_running() else 'gone'}")
        for p in trainer:
            assert_gone(p.pid)
    finally:
        if child.poll() is None:
            stop_process(child)
        kill_all(trainer + ([helper] if helper is not None else []))


def test_a_run_that_ends_normally_leaves_no_watchdog_behind(tmp_path):
    watchdogs = []

    def note_watchdog(pid):
        watchdogs.extend(c.pid for c in psutil.Process().children() if is_watchdog(c))

    r = launch(fake_argv(tmp_path, "--steps", "3", "--sleep-per-step", "0.01"), cwd=REPO, env=ENV,
               log_path=tmp_path / "train.log", metrics_path=tmp_path / "metrics.jsonl", on_spawn=note_watchdog)
    assert r.exit_code == 0 and len(watchdogs) == 1  # it ran while the trainer did
    # Gone and reaped by launch itself: no longer a child of ours, not even a zombie.
    assert watchdogs[0] not in [c.pid for c in psutil.Process().children()]


# --- launch under real torchrun (gloo, CPU) ---------------------------------------------------------


@pytest.mark.slow
def test_torchrun_two_ranks_to_completion(tmp_path):
    rec = Recorder()
    r = launch(fake_argv(tmp_path, "--steps", "6", "--sleep-per-step", "0.05", nproc=2), cwd=REPO, env=ENV,
               log_path=tmp_path / "train.log", metrics_path=tmp_path / "metrics.jsonl", progress=rec)
    assert (r.exit_code, r.interrupted, r.killed) == (0, False, False)
    log = (tmp_path / "train.log").read_text()
    assert "[rank 0] done" in log and "[rank 1] done" in log
    assert "step 00005/00006" in log
    steps = [x.step for x in rec.records if isinstance(x, StepMetrics)]
    assert steps == list(range(6))
    start = rec.records[0]
    assert isinstance(start, StartInfo) and start.world_size == 2 and start.steps == 6
    assert isinstance(rec.records[-1], RunSummary) and rec.records[-1].steps == 6
    assert r.malformed_lines == 0 and rec.closed == 1
    assert_gone(r.pid, *worker_pids(tmp_path))


@pytest.mark.slow
def test_torchrun_failure_propagates_exit_code_and_tail(tmp_path):
    r = launch(fake_argv(tmp_path, "--steps", "10", "--sleep-per-step", "0.02", "--fail-at-step", "3",
                         "--exit-code", "4", nproc=2),
               cwd=REPO, env=ENV, log_path=tmp_path / "train.log", metrics_path=tmp_path / "metrics.jsonl")
    # torchrun itself exits non-zero (1) whatever the worker returned; the worker's code comes from
    # torchrun's failure report, and the tail ends there, not in torchrun's own traceback.
    assert r.exit_code not in (0, None) and not r.interrupted
    assert r.worker_exit_code == 4
    tail = r.log_tail.splitlines()
    assert any("RuntimeError: fake failure at step 3" in l for l in tail)
    assert "exitcode: 4" in tail[-1]
    assert "ChildFailedError" in (tmp_path / "train.log").read_text()  # the full report stays in the log
    # Rank 0 writes the metrics; if rank 1 fails first, torchrun may stop rank 0 before its step 2.
    steps = steps_in(tmp_path / "metrics.jsonl")
    assert steps == list(range(len(steps))) and len(steps) <= 3


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_torchrun_signal_stops_everything_and_keeps_metrics(tmp_path, sig):
    argv = fake_argv(tmp_path, "--steps", "100000", "--sleep-per-step", "0.1", nproc=2)
    r, _ = run_and_signal(tmp_path, argv, [sig], grace=120.0, ranks=2)
    assert r.interrupted and r.signal_name == signal.Signals(sig).name
    # The grace is long enough that only a hang could exhaust it: torchrun stopped its workers itself.
    assert not r.killed, "torchrun did not stop its workers: moectl had to SIGKILL them"
    assert r.exit_code != 0
    pids = worker_pids(tmp_path)
    assert len(pids) == 2
    assert_gone(r.pid, *pids)
    steps = steps_in(tmp_path / "metrics.jsonl")  # every line parses: nothing torn
    assert 3 <= len(steps) < 100000 and steps == list(range(len(steps)))
    assert r.malformed_lines == 0 and r.metrics_records == len(steps) + 1  # + the start record


@pytest.mark.slow
def test_torchrun_worker_ignoring_sigterm_is_killed_after_grace(tmp_path):
    argv = fake_argv(tmp_path, "--steps", "100000", "--sleep-per-step", "0.1", "--ignore-sigterm", nproc=2)
    r, took = run_and_signal(tmp_path, argv, [signal.SIGTERM], grace=1.5, ranks=2)
    assert r.interrupted and r.killed and r.signal_name == "SIGTERM"
    assert took >= 1.5  # the grace was granted before the SIGKILL
    # Both workers got the polite SIGTERM (torchrun forwarded it) and carried on, so only the kill
    # after the grace could stop them.
    noted = sigterms_noted(tmp_path)
    assert sorted(noted) == ["rank0", "rank1"] and min(noted.values()) >= 1, noted
    pids = worker_pids(tmp_path)
    assert len(pids) == 2
    assert_gone(r.pid, *pids)


@pytest.mark.slow
def test_torchrun_and_its_workers_are_killed_after_the_grace_once_the_launcher_is_sigkilled(tmp_path):
    """torchrun forwards the watchdog's SIGTERM to workers that ignore it, then would wait 30 s
    before killing them itself (it can also hang, see moectl.launch): the watchdog, which knows the
    workers from its own snapshots although they run in sessions of their own, kills all three once
    the grace has passed."""
    argv = fake_argv(tmp_path, "--steps", "100000", "--sleep-per-step", "0.05", "--ignore-sigterm", "--no-output",
                     nproc=2)
    torchrun, ranks, watchdog, killed_at = kill_launcher_when_up(tmp_path, argv, grace=1.0, ranks=2)
    procs = [torchrun, *ranks]
    try:
        wait_for(lambda: all(exited(p.pid) for p in procs), "torchrun and both workers being killed", 60)
        # torchrun's own escalation comes 30 s after its SIGTERM; ours comes after the 1 s grace.
        assert time.monotonic() - killed_at < 25, "stopped by torchrun's own 30 s timeout, not the watchdog"
        assert sorted(sigterms_noted(tmp_path)) == ["rank0", "rank1"]  # torchrun did forward its SIGTERM
        wait_for(lambda: exited(watchdog), "the watchdog exiting once its work was done", 30)
    finally:
        kill_all(procs)


def test_a_full_disk_under_train_log_ends_the_logging_not_the_reading(tmp_path):
    """Writing train.log fails (ENOSPC: /dev/full is such a disk). The tee thread died of it, nobody
    read the pipe any more, the trainer blocked on its next print, and moectl waited forever. Now
    the output is still read (the trainer finishes, its steps are parsed) and the run says the log
    is incomplete."""
    code = textwrap.dedent("""
        import json, sys
        from dataclasses import asdict
        from pathlib import Path
        from moectl.launch import launch
        trainer = ("import sys\\n"
                   "for i in range(40):\\n"
                   "    print('noise ' + 'n' * 20000)\\n"  # 800 KB in all: far past a pipe's buffer
                   "    print(f'step {i} | loss: 3.0 | dt: 10ms', flush=True)\\n")
        r = launch([sys.executable, "-c", trainer], cwd=Path.cwd(), env={}, log_path=Path("/dev/full"),
                   metrics_path=Path(sys.argv[1]) / "metrics.jsonl")
        print(json.dumps(asdict(r)))
    """)
    child = subprocess.run([PY, "-c", code, str(tmp_path)], cwd=REPO, env={**os.environ, **ENV},
                           capture_output=True, text=True, timeout=120)  # a hang ends here, failing the test
    assert child.returncode == 0, child.stderr[-3000:]
    assert "Traceback" not in child.stderr, child.stderr[-3000:]
    r = json.loads(child.stdout.splitlines()[-1])
    assert r["exit_code"] == 0 and not r["interrupted"]
    assert r["log_error"].startswith("train.log is incomplete: writing it failed (No space left on device)")
    assert "step 39 | loss: 3.0" in r["log_tail"]  # every line was still read


def test_a_stopped_runs_tail_leaves_out_the_tracebacks_its_stop_caused_and_keeps_any_other():
    from moectl.text import without_stop_tracebacks

    frames = ['  File "/venv/torch/distributed/run.py", line 1032, in <module>', "    main()",
              '  File "/venv/torch/distributed/elastic/multiprocessing/api.py", line 86, in _terminate_process_handler',
              '    raise SignalException(f"Process {os.getpid()} got signal: {sigval}", sigval=sigval)']
    stop = "torch.distributed.elastic.multiprocessing.api.SignalException: Process 12 got signal: 15"
    progress = ["step 00140/00400 (35.00%) | loss: 5.1", "W1128 api.py:753] Received 15 death signal, shutting down workers"]
    tail = "\n".join([*progress, "Traceback (most recent call last):", *frames, stop])
    assert without_stop_tracebacks(tail) == "\n".join(progress)
    # the tail's first 40 lines begin inside the traceback: its frames go too
    assert without_stop_tracebacks("\n".join([*frames[2:], stop, "interrupted by SIGTERM"])) == "interrupted by SIGTERM"
    # a worker's Ctrl-C, and an error on the way down (kept: it is news)
    ctrl_c = ["Traceback (most recent call last):", '  File "train.py", line 3, in <module>', "KeyboardInterrupt"]
    error = ["Traceback (most recent call last):", '  File "train.py", line 9, in save',
             "OSError: [Errno 28] No space left on device"]
    assert without_stop_tracebacks("\n".join([*ctrl_c, *error])) == "\n".join(error)
    assert without_stop_tracebacks("") == "" and without_stop_tracebacks("\n".join(progress)) == "\n".join(progress)
