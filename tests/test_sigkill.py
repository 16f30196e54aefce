"""A moectl killed without a word (SIGKILL: the OOM killer, a dead container) — issue 7.

What must hold: the training it started stops promptly with it, even a trainer that never prints
(and so never meets the closed pipe); the first moectl that reads the store afterwards settles the
record by itself — `interrupted (moectl was killed)`, the metrics on disk summarised, the run lock
and the sweep leg released — and only once no process of the run is left; the real engine stops
cleanly (metrics whole) when the process above it is SIGKILLed; a store that cannot be written
still reads, showing `stale`.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import psutil
import pytest
from typer.testing import CliRunner

from engine.schema import METRICS_FILENAME, RunSummary, StartInfo, StepMetrics, parse_line, to_line
from moectl import store
from moectl.cli import app
from moectl.lock import LOCK_NAME, read_holder
from moectl.records import RUN_RECORD, SWEEP_RECORD, RunRecord, SweepLeg, SweepRecord, save_model
from tests.conftest import kill_all
from tests.test_run import QUIET, REPO, proj, record, run_dirs  # noqa: F401  (proj: fixture)

runner = CliRunner()
KILLED = "interrupted (moectl was killed)"
STOP_BOUND_S = 60.0  # generous for a loaded 2-core machine; without the mechanism it never stops


# --------------------------------------------------------------------------------------- helpers


def wait_for(what: str, done, timeout: float, *, alive: subprocess.Popen | None = None, log: Path | None = None):
    """Poll `done()` until true; fail naming `what` when the deadline passes (or `alive` exits)."""
    deadline = time.monotonic() + timeout
    while not done():
        if alive is not None and alive.poll() is not None:
            pytest.fail(f"{what}: the process exited first ({alive.returncode}):\n{log.read_text() if log else ''}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout:.0f}s" + (f":\n{log.read_text()}" if log else ""))
        time.sleep(0.05)


def steps_on_disk(path: Path) -> list[StepMetrics]:
    """Step records of a metrics.jsonl as written (every line must parse: nothing torn)."""
    if not path.exists():
        return []
    return [rec for rec in (parse_line(line) for line in path.read_text().splitlines() if line.strip())
            if isinstance(rec, StepMetrics)]


def count_steps(path: Path) -> int:
    try:
        return len(steps_on_disk(path))
    except ValueError:
        return 0  # a line being written right now: look again


def alive(proc: psutil.Process) -> bool:
    try:  # is_running() compares create times: a recycled pid does not count as ours
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def describe(procs: list[psutil.Process]) -> str:
    out = []
    for p in procs:
        try:
            out.append(f"pid {p.pid}: {' '.join(p.cmdline())[:200]}")
        except psutil.Error:
            out.append(f"pid {p.pid}")
    return "; ".join(out)


def assert_all_stop(procs: list[psutil.Process], after: str) -> None:
    deadline = time.monotonic() + STOP_BOUND_S
    while any(alive(p) for p in procs):
        if time.monotonic() > deadline:
            survivors = [p for p in procs if alive(p)]
            pytest.fail(f"{len(survivors)} training process(es) still running {STOP_BOUND_S:.0f}s after {after}: "
                        + describe(survivors))
        time.sleep(0.05)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=60)  # reaped: the pid is gone
    return proc.pid


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def moectl_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


# ------------------------------------------------------------- moectl SIGKILLed mid-run (end to end)


@pytest.mark.slow
def test_sigkilled_moectl_stops_a_silent_trainer_and_the_next_read_settles_the_run(proj, artifact_root, tmp_path):
    out = tmp_path / "moectl.out"
    # Two ranks that never print after start-up: only moectl's watchdog can stop them (via torchrun).
    args = ["run", "--steps", "100000", "--nproc", "2", "--tag", "silent", *QUIET,
            "--", "--sleep-per-step", "0.02", "--no-output"]
    with open(out, "w") as fh:
        moectl = subprocess.Popen([sys.executable, "-m", "moectl", *args], cwd=proj, env=moectl_env(),
                                  stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    trainers: list[psutil.Process] = []
    try:
        wait_for("the run directory", lambda: len(run_dirs(artifact_root)) == 1, 120, alive=moectl, log=out)
        [exp] = run_dirs(artifact_root)
        metrics = exp / METRICS_FILENAME
        pids = [exp / "pids" / f"rank{r}.json" for r in (0, 1)]
        # 60 steps: more than the 50-step tail window, so the summary must pick the right ones.
        wait_for("60 steps in metrics.jsonl", lambda: count_steps(metrics) >= 60, 120, alive=moectl, log=out)
        wait_for("both ranks' pid files", lambda: all(p.exists() for p in pids), 60, alive=moectl, log=out)
        ranks = [json.loads(p.read_text()) for p in pids]
        torchrun = psutil.Process(ranks[0]["ppid"])
        trainers = [torchrun] + [psutil.Process(r["pid"]) for r in ranks]
        assert torchrun.ppid() == moectl.pid and all(r["ppid"] == torchrun.pid for r in ranks)
        assert record(exp)["status"] == "running" and (artifact_root / LOCK_NAME).exists()

        moectl.kill()  # SIGKILL: moectl writes nothing more
        moectl.wait(timeout=30)
        assert_all_stop(trainers, "moectl was SIGKILLed")
    finally:
        if moectl.poll() is None:
            moectl.kill()
            moectl.wait(timeout=30)
        kill_all(trainers)  # only reached with survivors on a failure: never leave them behind

    steps = steps_on_disk(metrics)  # every line parses: nothing torn
    assert [s.step for s in steps] == list(range(len(steps))) and 60 <= len(steps) < 100000
    on_disk = (exp / RUN_RECORD).read_bytes()
    assert json.loads(on_disk)["status"] == "running"  # nothing rewrote it on its own

    # The next moectl that reads the store settles the run, unasked.
    r = runner.invoke(app, ["runs", "--json"])
    assert r.exit_code == 0, r.output
    [listed] = json.loads(r.stdout)
    assert (listed["id"], listed["status"], listed["exit_code"]) == (exp.name, "interrupted", None)
    assert "recorded_status" not in listed and listed["error"].startswith(KILLED)
    tail = steps[-50:]
    s = listed["summary"]
    assert (s["window"], s["steps"]) == (50, 50)
    assert s["tok_per_sec"] == pytest.approx(mean([x.tok_per_sec for x in tail]), rel=1e-12)
    assert s["dt_ms"] == pytest.approx(mean([x.dt_ms for x in tail]), rel=1e-12)
    assert s["final_loss"] == pytest.approx(steps[-1].loss, rel=1e-12)
    # finished_at: when the run last wrote (metrics.jsonl / train.log), not when it was noticed.
    last_write = max(metrics.stat().st_mtime, (exp / "train.log").stat().st_mtime)
    assert datetime.fromisoformat(listed["finished_at"]).timestamp() == pytest.approx(last_write, abs=0.002)
    assert not (artifact_root / LOCK_NAME).exists()

    settled = json.loads((exp / RUN_RECORD).read_text())  # rewritten on disk, not only displayed
    assert settled["status"] == "interrupted" and settled["summary"] == s and settled["error"] == listed["error"]
    before = (exp / RUN_RECORD).read_bytes()
    shown = runner.invoke(app, ["show", exp.name])
    assert shown.exit_code == 0 and "status: interrupted" in shown.stdout and KILLED in shown.stdout
    assert (exp / RUN_RECORD).read_bytes() == before  # settled once; later reads write nothing


# --------------------------------------------------- the real engine under a parent that is SIGKILLed

LAUNCHER = """
import sys
from pathlib import Path
from moectl.launch import launch
out = Path(sys.argv[1])
launch(sys.argv[2:], cwd=Path.cwd(), env={}, log_path=out / "train.log", metrics_path=out / "metrics.jsonl")
"""


@pytest.mark.slow
@pytest.mark.parametrize("parent", ["moectl.launch", "torchrun"])
def test_real_engine_stops_cleanly_when_the_process_above_it_is_sigkilled(tmp_path, parent):
    """`moectl.launch`: moectl's watchdog sends torchrun its SIGTERM, and torchrun stops the worker.
    `torchrun`: torchrun itself SIGKILLed, so only the engine's parent-death signal can stop it."""
    exp = tmp_path / "exp"
    exp.mkdir()
    metrics = exp / METRICS_FILENAME
    torchrun_argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                     "-m", "engine.train", "--preset", "tiny", "--steps", "100000", "--log-every", "1000000",
                     "--device", "cpu", "--out-dir", str(exp)]
    env = {**moectl_env(), "OMP_NUM_THREADS": "1"}
    log = tmp_path / "out.log"
    with open(log, "w") as fh:
        argv = [sys.executable, "-c", LAUNCHER, str(exp), *torchrun_argv] if parent == "moectl.launch" else torchrun_argv
        top = subprocess.Popen(argv, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    procs: list[psutil.Process] = []
    try:
        wait_for("3 engine steps in metrics.jsonl", lambda: count_steps(metrics) >= 3, 180, alive=top, log=log)
        procs = [psutil.Process(top.pid), *psutil.Process(top.pid).children(recursive=True)]
        workers = [p for p in procs if "engine.train" in p.cmdline() and "torch.distributed.run" not in p.cmdline()]
        assert len(workers) == 1, describe(procs)
        top.kill()  # SIGKILL: no handler runs in the killed process
        top.wait(timeout=30)
        assert_all_stop(procs, f"{parent} was SIGKILLed")
    finally:
        if top.poll() is None:
            top.kill()
            top.wait(timeout=30)
        kill_all(procs)

    lines = metrics.read_text().splitlines()
    records = [parse_line(line) for line in lines]  # every line whole: the engine closed the file
    assert isinstance(records[0], StartInfo)
    steps = [r.step for r in records if isinstance(r, StepMetrics)]
    assert steps == list(range(len(steps))) and len(steps) >= 3 and len(records) == len(steps) + 1
    if parent == "torchrun":  # the worker's output still has a reader (the file): it says how it stopped
        assert "interrupted by SIGTERM" in log.read_text(), log.read_text()[-2000:]


# ------------------------------------------------------------------- settling, at the library level


def make_stale_run(parent: Path, name: str, n_steps: int, *, window: int | None = 20, host: str | None = None,
                   sweep: str | None = None) -> Path:
    """A run directory as a SIGKILLed moectl leaves it: run.json `running` with a dead pid, the
    metrics so far, a train.log; steps at a known, varying rate."""
    exp = parent / name
    exp.mkdir(parents=True)
    steps = [StepMetrics(step=i, loss=4.0 - 0.01 * i, dt_ms=100.0 + i, tok_per_sec=1000.0 + 7 * i,
                         elapsed_s=0.1 * (i + 1)) for i in range(n_steps)]
    start = StartInfo(steps=1000, world_size=1, tokens_per_step=4096, device="cpu",
                      config={"preset": "tiny", "out_dir": str(exp), "torch_version": "2.x"})
    (exp / METRICS_FILENAME).write_text("\n".join(to_line(r) for r in [start, *steps]) + "\n")
    (exp / "train.log").write_text("".join(f"step {i}\n" for i in range(n_steps)))
    now = store.now_iso()
    store.save_run(RunRecord(id=name, tag=name, status="running", created_at=now, started_at=now, exp_dir=str(exp),
                             argv=["torchrun", "--out-dir", str(exp)], pid=dead_pid(),
                             host=host or socket.gethostname(), window=window, sweep=sweep))
    return exp


def lock_for(root: Path, rec: dict) -> Path:
    path = root / LOCK_NAME
    path.write_text(json.dumps({"pid": rec["pid"], "host": rec["host"], "run_id": rec["id"],
                                "started_at": rec["started_at"], "cmd": "moectl run", "started_ts": time.time() - 5,
                                "token": "x"}))
    return path


def test_a_read_settles_a_stale_run_its_lock_and_its_sweep_leg(tmp_path):
    sweep_dir = tmp_path / "20260101_000000_moe-sw"
    exp = make_stale_run(sweep_dir, "20260101_000001_moe-leg", 70, window=20, sweep=sweep_dir.name)
    save_model(sweep_dir / SWEEP_RECORD, SweepRecord(
        id=sweep_dir.name, name="sw", spec={}, created_at=store.now_iso(), exp_dir=str(sweep_dir),
        legs=[SweepLeg(tag="leg", state="running", run_id=exp.name), SweepLeg(tag="next")]))
    lock = lock_for(tmp_path, record(exp))
    os.utime(exp / "train.log", (1_700_000_000, 1_700_000_000))
    os.utime(exp / METRICS_FILENAME, (1_700_000_100.25, 1_700_000_100.25))  # the last write

    [rec] = store.list_runs(tmp_path)
    assert (rec.status, rec.stale, rec.exit_code) == ("interrupted", False, None)
    assert rec.error.splitlines()[0] == KILLED and rec.error.splitlines()[-1] == "step 69"  # + the log tail
    tail = list(range(50, 70))  # the recorded window (20), not the default 50
    assert (rec.summary.window, rec.summary.steps) == (20, 20)
    assert rec.summary.tok_per_sec == pytest.approx(mean([1000.0 + 7 * i for i in tail]), rel=1e-12)
    assert rec.summary.dt_ms == pytest.approx(mean([100.0 + i for i in tail]), rel=1e-12)
    assert rec.summary.final_loss == pytest.approx(4.0 - 0.01 * 69)
    assert datetime.fromisoformat(rec.finished_at).timestamp() == pytest.approx(1_700_000_100.25, abs=1e-3)
    assert rec.engine == {"preset": "tiny", "torch_version": "2.x"} and rec.torch_version == "2.x"
    on_disk = record(exp)
    assert on_disk["status"] == "interrupted" and on_disk["exp_dir"] == str(exp)
    assert not lock.exists()
    sweep = json.loads((sweep_dir / SWEEP_RECORD).read_text())
    assert [(leg["tag"], leg["state"]) for leg in sweep["legs"]] == [("leg", "interrupted"), ("next", "pending")]

    before = {p: p.read_bytes() for p in (exp / RUN_RECORD, sweep_dir / SWEEP_RECORD)}
    [again] = store.list_runs(tmp_path)
    assert again == rec and {p: p.read_bytes() for p in before} == before  # once only


@pytest.mark.parametrize("holder", ["dead owner, another run", "live owner, this run"])
def test_a_lock_that_is_not_the_dead_owners_is_left_alone(tmp_path, holder):
    exp = make_stale_run(tmp_path, "20260101_000001_moe-a", 5)
    lock = lock_for(tmp_path, record(exp))
    info = json.loads(lock.read_text())
    if holder == "dead owner, another run":
        info["run_id"] = "20260101_000000_moe-other"
    else:  # a live moectl (this test, taking it now) whose lock happens to carry the run's id
        info["pid"], info["started_ts"] = os.getpid(), time.time()
    lock.write_text(json.dumps(info))
    held = lock.read_bytes()
    assert read_holder(tmp_path).stale is (holder == "dead owner, another run")
    [rec] = store.list_runs(tmp_path)
    assert rec.status == "interrupted" and record(exp)["status"] == "interrupted"
    assert lock.read_bytes() == held


def test_not_settled_while_a_process_of_its_training_lives(tmp_path):
    exp = make_stale_run(tmp_path, "20260101_000001_moe-a", 5)
    before = (exp / RUN_RECORD).read_bytes()
    # A worker that outlived its moectl (its watchdog gone too, or still stopping).
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "--out-dir", str(exp)])
    try:
        wait_for("the worker's argv to be visible", lambda: str(exp) in " ".join(psutil.Process(worker.pid).cmdline()), 30)
        [rec] = store.list_runs(tmp_path)
        assert (rec.display_status, rec.status) == ("stale", "running")
        assert (exp / RUN_RECORD).read_bytes() == before
    finally:
        worker.kill()
        worker.wait(timeout=30)
    [rec] = store.list_runs(tmp_path)
    assert rec.status == "interrupted" and record(exp)["status"] == "interrupted"


def test_wait_on_a_killed_moectls_run_waits_for_its_training_to_stop_and_says_interrupted(tmp_path, monkeypatch):
    # `wait` returned at once with exit 4 ("training failed") while the killed moectl's training was
    # still running: the record said `running` with its owner dead, and wait took `stale` as settled.
    exp = make_stale_run(tmp_path, "20260101_000001_moe-a", 5)
    monkeypatch.setenv("MOECTL_ARTIFACT_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "--out-dir", str(exp)])
    try:
        wait_for("the worker's argv to be visible", lambda: str(exp) in " ".join(psutil.Process(worker.pid).cmdline()), 30)
        started = time.monotonic()
        r = runner.invoke(app, ["wait", exp.name, "--timeout", "2s", "--json"])
        assert r.exit_code == 130 and time.monotonic() - started >= 2, r.output  # the timeout ran out: still going
        assert json.loads(r.stdout)[0]["status"] == "stale"
    finally:
        worker.kill()
        worker.wait(timeout=30)
    r = runner.invoke(app, ["wait", exp.name, "--json"])
    assert r.exit_code == 130, r.output
    assert json.loads(r.stdout)[0]["status"] == "interrupted" and record(exp)["error"].startswith(KILLED)


def test_another_hosts_run_is_never_settled(tmp_path):
    exp = make_stale_run(tmp_path, "20260101_000001_moe-a", 5, host=socket.gethostname() + "-elsewhere")
    before = (exp / RUN_RECORD).read_bytes()
    [rec] = store.list_runs(tmp_path)
    assert (rec.display_status, rec.stale) == ("running", False)
    assert (exp / RUN_RECORD).read_bytes() == before


def test_a_killed_run_recorded_before_the_window_field_uses_the_default_window(tmp_path):
    exp = make_stale_run(tmp_path, "20260101_000001_moe-a", 70, window=None)
    [rec] = store.list_runs(tmp_path)
    assert (rec.summary.window, rec.summary.steps) == (50, 50)
    assert rec.summary.tok_per_sec == pytest.approx(mean([1000.0 + 7 * i for i in range(20, 70)]), rel=1e-12)
    assert record(exp)["summary"]["window"] == 50


def test_killed_after_its_training_finished_says_so(tmp_path):
    # moectl died between torchrun's exit and its final record: the metrics are whole, the run
    # was still never recorded, reported or committed, so it is `interrupted` but says what it has.
    exp = make_stale_run(tmp_path, "20260101_000001_moe-a", 10)
    with open(exp / METRICS_FILENAME, "a") as fh:
        fh.write(to_line(RunSummary(steps=10, world_size=1, total_time_s=1.0, final_loss=3.91)) + "\n")
    [rec] = store.list_runs(tmp_path)
    assert rec.status == "interrupted"
    assert rec.error.splitlines()[0] == KILLED + "; its training had finished (metrics.jsonl ends with its summary)"
    assert rec.summary.total_time_min == pytest.approx(1.0 / 60)  # the engine's own figure


def test_two_readers_at_once_settle_to_the_same_record(tmp_path):
    exp = make_stale_run(tmp_path, "20260101_000001_moe-a", 30)
    lock_for(tmp_path, record(exp))
    code = "import sys; from moectl.store import list_runs; print(list_runs(sys.argv[1])[0].model_dump_json())"
    readers = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=moectl_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in readers]
    assert all(p.returncode == 0 for p in readers), outs
    shown = [json.loads(o) for o, _ in outs]
    assert shown[0] == shown[1] and shown[0]["status"] == "interrupted"
    on_disk = record(exp)
    assert {k: on_disk[k] for k in ("status", "summary", "finished_at", "error")} == \
        {k: shown[0][k] for k in ("status", "summary", "finished_at", "error")}
    assert not (tmp_path / LOCK_NAME).exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp or aside file left


# ------------------------------------------------------------------------ a store it cannot write


def _without_root_write_override() -> None:
    """preexec_fn for a root reader: drop CAP_DAC_OVERRIDE from the capability bounding set before
    exec, so file permissions bind it like anyone else (it keeps reading what root owns)."""
    import ctypes

    PR_CAPBSET_DROP, CAP_DAC_OVERRIDE = 24, 1
    if ctypes.CDLL(None, use_errno=True).prctl(PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP, CAP_DAC_OVERRIDE) failed")


def test_a_stale_run_in_a_store_it_cannot_write_still_reads_as_stale(tmp_path):
    """A reader without write access (another user's store, a read-only mount) shows `stale`,
    exits 0, and changes nothing."""
    root = tmp_path / "artifacts"
    exp = make_stale_run(root, "20260101_000001_moe-ro", 10)
    lock = lock_for(root, record(exp))
    files = {p: p.read_bytes() for p in (exp / RUN_RECORD, lock)}
    reader = {"preexec_fn": _without_root_write_override} if os.geteuid() == 0 else {}
    env = {**moectl_env(), "MOECTL_ARTIFACT_ROOT": str(root), "PYTHONDONTWRITEBYTECODE": "1"}
    for d in (root, exp):
        d.chmod(0o555)
    try:
        probe = subprocess.run([sys.executable, "-c", "import os, sys; print(os.access(sys.argv[1], os.W_OK))",
                                str(exp)], capture_output=True, text=True, timeout=60, **reader)
        assert probe.stdout.strip() == "False", f"the reader could write the store: {probe}"
        r = subprocess.run([sys.executable, "-m", "moectl", "runs", "--json"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120, **reader)
    finally:
        for d in (root, exp):
            d.chmod(0o755)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    [listed] = json.loads(r.stdout)
    assert (listed["status"], listed["recorded_status"]) == ("stale", "running")
    assert {p: p.read_bytes() for p in files} == files
