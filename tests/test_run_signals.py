"""`moectl run` under real signals: a real `python -m moectl run` subprocess driving real torchrun
(gloo, CPU) and the fake engine, stopped with SIGINT / SIGTERM, or SIGKILLed to leave a stale run.

What must hold (issue 3): Ctrl-C/SIGTERM stops torchrun and every worker, the record says
`interrupted` with the steps so far summarised, exit 130, the run lock is released; a moectl that
dies without a word leaves `running` on disk, shown as `stale`, and its lock blocks nobody.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional

import psutil
import pytest
from typer.testing import CliRunner

from moectl.cli import app
from moectl.lock import LOCK_NAME
from tests.conftest import (
    catches, fake_slurm_bin, git, kill_all, no_other_training_on_a_quiet_machine, signal_when, steps_written,
    stop_process, wait_for,
)
from tests.test_run import QUIET, REPO, FAST, commit_files, ours, proj, record, run_dirs  # noqa: F401  (proj: fixture)

runner = CliRunner()
SLOW_RUN = ["--steps", "300", "--tag", "long", *QUIET, "--", "--sleep-per-step", "0.1"]


def spawn(repo: Path, out: Path, *args: str, sigint_ignored: bool = False, nohup: bool = False,
          bin_dir: Optional[Path] = None) -> subprocess.Popen:
    """`python -m moectl run ...` in `repo`, as a person would start it (env from this test:
    MOECTL_ARTIFACT_ROOT and MOECTL_FAKE_NVML come from the conftest fixtures). sigint_ignored:
    as a shell script's `moectl run ... &` starts it (SIGINT ignored, inherited through exec);
    nohup: as `nohup moectl run ...` does (SIGHUP ignored); bin_dir: commands found there first
    (tests.conftest.fake_slurm_bin)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if bin_dir is not None:
        env["PATH"] = f"{bin_dir}:/usr/bin:/bin"
    ignored = [sig for sig, on in ((signal.SIGINT, sigint_ignored), (signal.SIGHUP, nohup)) if on]
    ignore = (lambda: [signal.signal(sig, signal.SIG_IGN) for sig in ignored]) if ignored else None
    with open(out, "w") as fh:
        return subprocess.Popen([sys.executable, "-m", "moectl", "run", *args], cwd=repo, env=env,
                                stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=ignore)


def steps_so_far(root: Path) -> int:
    return sum(len(steps_written(path)) for path in root.glob("*/metrics.jsonl"))


def wait_for_steps(proc: subprocess.Popen, root: Path, n: int, out: Path, timeout: float = 120.0) -> None:
    wait_for(lambda: steps_so_far(root) >= n, f"{n} training steps in metrics.jsonl", timeout, proc=proc,
             output=out.read_text)


def family(pid: int) -> list[psutil.Process]:
    """moectl's descendants right now: torchrun and its worker(s)."""
    return psutil.Process(pid).children(recursive=True)


def alive(p: psutil.Process) -> bool:
    try:  # is_running() compares create times: a recycled pid does not count as ours
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def worker_pid(exp: Path) -> int:
    return json.loads((exp / "pids" / "rank0.json").read_text())["pid"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_signal_stops_everything_records_interrupted_and_releases_lock(proj, artifact_root, tmp_path, sig):
    # SIGHUP: the terminal was closed - the same stop, record and report as Ctrl-C, not a dead moectl.
    out = tmp_path / "moectl.out"
    proc = spawn(proj, out, *SLOW_RUN)
    try:
        wait_for_steps(proc, artifact_root, 3, out)
        procs = family(proc.pid)
        [exp] = run_dirs(artifact_root)
        worker = psutil.Process(worker_pid(exp))
        assert worker.pid in {p.pid for p in procs} and len(procs) >= 2  # torchrun + the worker
        assert (artifact_root / LOCK_NAME).exists() and record(exp)["status"] == "running"
        proc.send_signal(sig)
        rc = proc.wait(timeout=120)  # a bound against a hang, not a latency check
    finally:
        if proc.poll() is None:
            stop_process(proc)
    text = out.read_text()
    assert rc == 130, text
    assert not [p for p in procs if alive(p)], "torchrun or a worker survived"
    assert not (artifact_root / LOCK_NAME).exists()

    rec = record(exp)
    name = signal.Signals(sig).name
    assert rec["status"] == "interrupted" and rec["error"].startswith(f"interrupted by {name}")
    # torchrun answers moectl's SIGTERM with ~30 lines of SignalException traceback: the stop's, no news
    assert "Traceback" not in rec["error"] and "SignalException" not in rec["error"], rec["error"]
    assert rec["exit_code"] == 130  # moectl's (SPEC §8), as it exited: not torchrun's 1 / -15 once stopped
    done = steps_so_far(artifact_root)
    # The metrics so far, summarised: past the default 10 warm-up steps the window is the clean
    # steps (at most 50); a run stopped inside its warm-up is summarised over what exists, marked.
    clean = done - 10
    assert 3 <= done < 300 and rec["summary"]["steps"] == (min(50, clean) if clean > 0 else done)
    assert rec["summary"]["clean"] is (clean > 0)
    assert rec["finished_at"] and f"interrupted: {rec['id']} (by {name})" in text  # not torchrun's exit code
    # SPEC §6's files, a run stopped before its first checkpoint too (ckpt_root/ came with the first save)
    files = {p.name for p in exp.iterdir()}
    assert {"run.json", "command.txt", "git.diff", "train.log", "metrics.jsonl", "ckpt_root"} <= files, files
    assert (exp / "ckpt_root").is_dir()

    report = next((proj / "reports").glob("*.md"))
    assert "— interrupted" in report.read_text() and "Traceback" not in report.read_text()
    assert commit_files(proj) == ours(proj, report) and "interrupted" in git(proj, "log", "-1", "--format=%s")

    # The next run starts at once (the lock was released, nothing is left running).
    r = runner.invoke(app, ["run", "--steps", "2", "--tag", "next", *QUIET, *FAST])
    assert r.exit_code == 0, r.output
    assert sorted(record(d)["status"] for d in run_dirs(artifact_root)) == ["completed", "interrupted"]


@pytest.mark.slow
def test_under_nohup_a_hangup_does_not_stop_the_run(proj, artifact_root, tmp_path):
    out = tmp_path / "moectl.out"
    proc = spawn(proj, out, *SLOW_RUN, nohup=True)
    try:
        wait_for_steps(proc, artifact_root, 3, out)
        proc.send_signal(signal.SIGHUP)
        at_hangup = steps_so_far(artifact_root)
        wait_for_steps(proc, artifact_root, at_hangup + 3, out)  # still training
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 130
    finally:
        if proc.poll() is None:
            stop_process(proc)
    [exp] = run_dirs(artifact_root)
    assert record(exp)["error"].startswith("interrupted by SIGTERM")


@pytest.mark.slow
def test_sigkilled_moectl_blocks_nothing_and_its_run_is_settled(proj, artifact_root, tmp_path):
    out = tmp_path / "moectl.out"
    proc = spawn(proj, out, *SLOW_RUN)
    procs: list[psutil.Process] = []
    try:
        wait_for_steps(proc, artifact_root, 2, out)
        procs = family(proc.pid)
        proc.kill()  # SIGKILL: moectl gets no chance to write anything
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            stop_process(proc)
        # torchrun stops with its parent (tests/test_sigkill.py shows it); this only makes sure.
        kill_all(procs)
    [exp] = run_dirs(artifact_root)
    assert record(exp)["status"] == "running"  # on disk: what moectl last wrote
    holder = json.loads((artifact_root / LOCK_NAME).read_text())
    assert holder["pid"] == proc.pid  # the dead moectl still "holds" the lock file

    # The guard sees the lock as stale, not as a live run: `check` never calls it held (whatever else
    # runs on this machine), and where no other training runs, it passes and says it takes it over ...
    check = json.loads(runner.invoke(app, ["check", "--json", "--steps", "2"]).stdout)
    guard = next(g for g in check["guards"] if g["name"] == "no_other_training")
    assert "holds the run lock" not in guard["message"]
    verdict = no_other_training_on_a_quiet_machine()
    assert verdict.ok and verdict.message.endswith(f"stale lock of pid {proc.pid} will be taken over")
    # ... and the next run takes the lock over, runs, and releases it.
    r = runner.invoke(app, ["run", "--steps", "2", "--tag", "after", *QUIET, *FAST])
    assert r.exit_code == 0, r.output
    assert not (artifact_root / LOCK_NAME).exists()
    after = next(d for d in run_dirs(artifact_root) if d != exp)
    assert record(after)["status"] == "completed"

    # The killed run is settled by the first read (tests/test_sigkill.py covers how): never left
    # `running` or `stale` for good, and no listing calls it live.
    r = runner.invoke(app, ["runs", "--json"])
    assert r.exit_code == 0, r.output
    listed = {x["id"]: x for x in json.loads(r.stdout)}
    assert (listed[exp.name]["status"], listed[exp.name]["error"].splitlines()[0]) == (
        "interrupted", "interrupted (moectl was killed)")
    assert record(exp)["status"] == "interrupted" and listed[after.name]["status"] == "completed"


@pytest.mark.parametrize("sig,sigint_ignored", [(signal.SIGINT, False), (signal.SIGTERM, False), (signal.SIGINT, True)],
                         ids=["SIGINT", "SIGTERM", "SIGINT-after-background-start"])
def test_signal_while_waiting_for_gpus_exits_130_and_writes_nothing(proj, artifact_root, fake_nvml, tmp_path, sig,
                                                                   sigint_ignored):
    from tests.conftest import gpu

    fake_nvml(gpus=[gpu(0, util_pct=80)])
    out = tmp_path / "moectl.out"
    proc = spawn(proj, out, "--device", "cuda", "--wait-gpus", "10m", "--steps", "2", *QUIET,
                 sigint_ignored=sigint_ignored)
    rc = signal_when(proc, lambda: "waiting for gpus_idle" in out.read_text(), "moectl saying it waits for gpus_idle",
                     sig, output=out.read_text)
    assert rc == 130, out.read_text()
    assert "error: interrupted" in out.read_text() and "Traceback" not in out.read_text()
    assert not artifact_root.exists() and not (proj / "reports").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_stopped_moectl_wait_exits_130_and_the_run_goes_on(proj, artifact_root, tmp_path, sig):
    # `moectl wait` killed by a CI timeout (SIGTERM) or a closed terminal: 130 as Ctrl-C, not 143/129;
    # what it waited on is not its to stop.
    gate = tmp_path / "go"
    out, waiter_out = tmp_path / "run.out", tmp_path / "wait.out"
    proc = spawn(proj, out, "--steps", "2", "--tag", "held", "--no-commit", *QUIET,
                 "--", "--hold-at-step", "0", "--hold-until", str(gate))
    waiter = None
    try:
        wait_for(Path(f"{gate}.waiting").exists, "the trainer holding at step 0", 120, proc=proc, output=out.read_text)
        with open(waiter_out, "w") as fh:
            waiter = subprocess.Popen([sys.executable, "-m", "moectl", "wait", "held"], cwd=proj, stdout=fh,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      env={**os.environ, "PYTHONPATH": str(REPO)})
        # Its handler is in place (the kernel's SigCgt mask says so): no race with its start-up.
        wait_for(lambda: catches(waiter.pid, sig) or waiter.poll() is not None, "moectl wait handling the signal", 120,
                 output=waiter_out.read_text)
        waiter.send_signal(sig)
        rc = waiter.wait(timeout=120)
        assert rc == 130 and "Traceback" not in waiter_out.read_text(), waiter_out.read_text()
        assert proc.poll() is None  # the run it waited on trains on
        gate.touch()
        assert proc.wait(timeout=120) == 0, out.read_text()
    finally:
        for p in (waiter, proc):
            if p is not None and p.poll() is None:
                stop_process(p)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_repeat_group_stopped_while_it_submits_leaves_nothing_queued(proj, artifact_root, tmp_path, sig):
    # `run --slurm --repeat 3` stopped after its first job was queued: that job is cancelled and its
    # record ended, not left queued with nobody following it.
    bin_dir, mark, log = fake_slurm_bin(tmp_path, block_at=2)
    out = tmp_path / "moectl.out"
    proc = spawn(proj, out, "--slurm", "--repeat", "3", "--steps", "2", "--tag", "grp", *QUIET, bin_dir=bin_dir)
    rc = signal_when(proc, mark.exists, "the second sbatch call", sig, output=out.read_text)
    text = out.read_text()
    assert rc == 130 and "Traceback" not in text, text
    assert "interrupted while submitting repeat group" in text and "1 queued run(s) were cancelled" in text, text
    assert log.read_text().split() == ["101"]
    records = [record(d) for d in run_dirs(artifact_root) if (d / "run.json").exists()]
    assert sorted((r["status"], r["error"].splitlines()[0]) for r in records) == [
        ("interrupted", "cancelled (scancel 101) before it started"),  # queued, then cancelled
        ("interrupted", "interrupted before it was submitted"),  # the one sbatch was busy with
    ], records
