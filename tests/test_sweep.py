"""`moectl sweep`: spec validation, dry run, and real sweeps on CPU through real torchrun.

The fast stand-in engine (tests/fixtures/fake_engine.py) drives the failure, interrupt and
compile-fallback cases; one sweep runs the real `engine.train` tiny preset. Other test sessions
may run torchrun on this machine at the same time, and the `no_other_training` guard rightly sees
their processes; sweeps whose subject is not that guard pass `--override no_other_training`
(QUIET, as in test_run), so they neither wait for a quiet machine nor depend on one.
"""
from __future__ import annotations

import hashlib
import json
import re
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
import time
from typing import Optional

import pytest
from typer.testing import CliRunner

from moectl.cli import app
from moectl.sweep.spec import grid_tag, load_spec, parse_spec
from moectl.errors import UsageError
from tests.conftest import fake_slurm_bin, git, signal_when, stop_process, wait_for

MOECTL_ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--override", "no_other_training"]


def sweep_project(repo: Path, module: str = "tests.fixtures.fake_engine", window: int = 5, summary: bool = True,
                  warmup_steps: int = 0) -> Path:
    """A committed .moectl.toml whose torchrun runs `module` from this checkout. The legs here run a
    handful of steps, so no warm-up by default (tests/test_warmup.py covers the warm-up rule)."""
    (repo / ".moectl.toml").write_text(
        f'[project]\nname = "moe"\nbranch = "main"\nvenv = ""\n\n'
        f'[report]\nsummary = {"true" if summary else "false"}\n\n'
        f'[launch]\nmodule = "{module}"\nenv = {{ PYTHONPATH = "{MOECTL_ROOT}", OMP_NUM_THREADS = "1" }}\n\n'
        f'[metrics]\nwindow = {window}\nwarmup_steps = {warmup_steps}\n\n[defaults]\npreset = "tiny"\ndevice = "cpu"\n'
    )
    git(repo, "add", ".moectl.toml")
    git(repo, "commit", "-q", "-m", "moectl config")
    return repo


def write_spec(repo: Path, text: str, name: str = "spec.toml") -> Path:
    path = repo / name
    path.write_text(text)
    return path


def cli(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def sweep_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if (p / "sweep.json").exists()) if root.exists() else []


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def commit_files(repo: Path, rev: str) -> list[str]:
    return git(repo, "show", "--name-only", "--format=", rev).split()


def tree_hash(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------ spec validation


@pytest.mark.parametrize("text, key", [
    ('name = "s"\nbogus = 1\n[[legs]]\ntag = "a"\n', "bogus: unknown key"),
    ('name = "s"\n[[legs]]\ntag = "a"\ncap = "big"\n', "legs[0].cap: must be a number"),
    ('name = "s"\n[[legs]]\ntag = "a"\n[[legs]]\ntag = "b"\ncap = -1.0\n', "legs[1].cap:"),
    ('name = "s"\n[[legs]]\ntag = "a"\n[[legs]]\ntag = "a"\n', "legs[1].tag: duplicate tag 'a'"),
    ('name = "s"\n[[legs]]\ntag = "a"\n[grid]\ncap = [1.0]\n', "legs/grid: give either [[legs]] or [grid], not both"),
    ('name = "s"\n[common]\ncap = 1.0\n', "legs/grid: give either"),
    ('name = "s"\n[grid]\ncompile = ["static", "fast"]\n', "grid.compile:"),
    ('name = "s"\n[[legs]]\ntag = "a"\nwarp = 9\n', "legs[0].warp: unknown option"),
    ('name = "s"\n[common]\nfp8 = "yes"\n[[legs]]\ntag = "a"\n', "common.fp8: must be true or false"),
    ('name = "bad name/x"\n[[legs]]\ntag = "a"\n', "name:"),
    ('[[legs]]\ntag = "a"\n', "name: required"),
    # what would not fit in memory (or in anyone's afternoon) is refused before it is expanded
    ('name = "s"\n[[legs]]\ntag = "a"\nrepeats = 99999999999\n', "legs[0].repeats: must be an integer from 1 to 1000"),
    ('name = "s"\n[grid]\ncap = [' + ", ".join(str(i / 10) for i in range(100)) + ']\nseed = [' +
     ", ".join(map(str, range(100))) + ']\n', "grid: 100 x 100 = 10000 legs, over 1000"),
    ('name = "s"\n[common]\nrepeats = 600\n[[legs]]\ntag = "a"\n[[legs]]\ntag = "b"\n', "legs: 1200 legs with their repeats"),
    # TOML's inf passes `cap >= 0`: it reached the engine, which refused it with the leg `running`
    ('name = "s"\n[[legs]]\ntag = "a"\ncap = inf\n', "legs[0].cap: Input should be a finite number"),
    ('name = "s"\n[common]\nbalance_rate = 1e400\n[[legs]]\ntag = "a"\n', "common.balance_rate: Input should be a finite number"),
])
def test_bad_spec_exits_2_naming_the_key_and_writes_nothing(git_repo, artifact_root, monkeypatch, text, key):
    sweep_project(git_repo)
    monkeypatch.chdir(git_repo)
    spec = write_spec(git_repo, text)
    head = git(git_repo, "rev-parse", "HEAD")
    r = cli("sweep", str(spec))
    assert r.exit_code == 2, r.output
    assert key in r.output
    assert "Traceback" not in r.output
    assert not artifact_root.exists()
    assert git(git_repo, "rev-parse", "HEAD") == head


def test_legs_times_repeats_are_counted_before_anything_is_expanded():
    """1000 legs x repeats 1000 was a million legs built in memory (12 s, 850 MB) before the
    count refused them: now the count comes first, and so does the refusal."""
    import tracemalloc

    data = {"name": "s", "common": {"repeats": 1000}, "legs": [{"tag": f"t{i}"} for i in range(1000)]}
    tracemalloc.start()
    try:
        with pytest.raises(UsageError) as exc:
            parse_spec(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert exc.value.lines == ["legs: 1000000 legs with their repeats, over 1000"]
    assert peak < 64 * 2**20, f"{peak / 2**20:.0f} MiB allocated to refuse it"
    spec = parse_spec({"name": "s", "legs": [{"tag": f"t{i}"} for i in range(1000)]})  # the limit itself
    assert len(spec.legs) == 1000


def test_every_problem_is_reported_at_once():
    with pytest.raises(UsageError) as exc:
        parse_spec({"name": "s", "extra": 1, "legs": [{"tag": "a", "cap": -2.0}, {"tag": "b", "steps": "x"}]})
    text = "\n".join(exc.value.lines)
    assert "extra: unknown key" in text and "legs[0].cap:" in text and "legs[1].steps:" in text


@pytest.mark.parametrize("data, lines", [
    ({"name": "s", "common": {"step": 5}, "legs": [{"cpa": 0.0}]},
     ["common.step: unknown option", "legs[0].cpa: unknown option"]),
    ({"name": "s", "common": {"cap": "x"}, "legs": [{"steps": 2.5}, {"cap": "y"}]},
     ["common.cap: must be a number", "legs[0].steps: must be an integer", "legs[1].cap: must be a number"]),
    ({"name": "s", "grid": {"cap": ["x", 1.0], "stepz": [1]}},
     ["grid.cap: must be a number", "grid.stepz: unknown option"]),
    ({"name": "s", "common": {"repeats": "2"}, "grid": {"cap": [1.0, 2.0]}}, ["common.repeats: must be an integer"]),
    # a type-valid count out of range: once, as common's (was once per leg, blamed on grid[0], grid[1], ...)
    ({"name": "s", "common": {"repeats": 0}, "grid": {"cap": [0.0, 1.0, 2.0]}},
     ["common.repeats: must be an integer from 1 to 1000, got 0"]),
])
def test_a_bad_option_is_one_line_not_one_per_check(data, lines):
    """A key the spec's own check refuses does not go on to `moectl run`'s validation (which would
    name it a second time, or crash deriving a tag from it): one line per bad field."""
    with pytest.raises(UsageError) as exc:
        parse_spec(data)
    assert len(exc.value.lines) == len(lines), exc.value.lines
    assert all(got.startswith(want) for got, want in zip(exc.value.lines, lines)), exc.value.lines


def test_grid_expands_every_combination_with_derived_tags():
    spec = parse_spec({"name": "cap", "common": {"steps": 5}, "grid": {"cap": [0.0, 1.0, 1.25], "compile": ["static", "none"]}})
    assert [leg.tag for leg in spec.legs] == [
        "static_cap0p0", "none_cap0p0", "static_cap1p0", "none_cap1p0", "static_cap1p25", "none_cap1p25"]
    assert spec.legs[4].options == {"steps": 5, "cap": 1.25, "compile": "static"}
    assert grid_tag({"fp8": True, "compile": "dynamic", "cap": 1.0}) == "dynamic_cap1p0_fp8"


def test_a_spec_file_with_a_byte_order_mark_loads(tmp_path):
    path = tmp_path / "spec.toml"
    path.write_bytes(b'\xef\xbb\xbfname = "cap"\n[grid]\ncap = [0.0, 1.0]\n')
    assert [leg.tag for leg in load_spec(path).legs] == ["cap0p0", "cap1p0"]


def test_legs_override_common_and_untagged_legs_get_derived_tags():
    spec = parse_spec({"name": "s", "common": {"cap": 1.0, "compile": "static", "args": ["--seed", "1"]},
                       "legs": [{"tag": "base"}, {"cap": 1.25}]})
    assert [leg.tag for leg in spec.legs] == ["base", "cap1p25"]
    assert spec.legs[1].options == {"cap": 1.25, "compile": "static", "args": ["--seed", "1"]}
    # legs that differ only in `args` (no option to derive a tag from): leg<i>, not "run" for each,
    # which refused the spec as duplicate tags
    spec = parse_spec({"name": "s", "common": {"steps": 20}, "legs": [{"args": ["--lr", "0.02"]},
                                                                      {"args": ["--lr", "0.03"]}, {}]})
    assert [leg.tag for leg in spec.legs] == ["leg0", "leg1", "leg2"]


def test_dry_run_prints_every_leg_command_and_writes_nothing(git_repo, artifact_root, monkeypatch):
    sweep_project(git_repo)
    monkeypatch.chdir(git_repo)
    spec = write_spec(git_repo, 'name = "cap"\n[common]\nsteps = 7\nargs = ["--seed", "3"]\n'
                                '[grid]\ncap = [0.0, 1.0]\ncompile = ["static"]\n')
    status = git(git_repo, "status", "--porcelain")
    r = cli("sweep", str(spec), "--dry-run")
    assert r.exit_code == 0, r.output
    lines = [l for l in r.output.splitlines() if "torch.distributed.run" in l]
    assert len(lines) == 2
    assert "--cap 0.0" in lines[0] and "--cap 1.0" in lines[1]
    assert all("--compile static" in l and "--steps 7" in l and l.endswith("--seed 3") for l in lines)
    assert all(f"{artifact_root}/" in l and "_moe-cap/" in l for l in lines)  # legs inside the sweep dir
    r = cli("sweep", str(spec), "--dry-run", "--json")
    data = json.loads(r.output)
    assert [leg["tag"] for leg in data["legs"]] == ["static_cap0p0", "static_cap1p0"]
    assert not artifact_root.exists()
    assert git(git_repo, "status", "--porcelain") == status
    assert not (git_repo / "reports").exists()


def test_first_leg_refused_writes_nothing(git_repo, artifact_root, monkeypatch):
    sweep_project(git_repo)
    git(git_repo, "checkout", "-q", "-b", "elsewhere")  # the git guard refuses: wrong branch
    monkeypatch.chdir(git_repo)
    spec = write_spec(git_repo, 'name = "s"\n[[legs]]\ntag = "a"\n')
    r = cli("sweep", str(spec), "--json")
    assert r.exit_code == 3
    data = json.loads(r.stdout)
    assert data["sweep"] is None and any(line.startswith("git:") for line in data["refused"])
    # the error document's keys, as every command's refusal has them
    assert (data["ok"], data["exit_code"]) == (False, 3) and data["error"].startswith("refused: git: "), data
    assert sweep_dirs(artifact_root) == []


def test_a_later_leg_that_cannot_run_stops_the_sweep_before_the_first_leg_trains(git_repo, artifact_root, monkeypatch):
    # The engine's own rule (ep divides the world size and the experts), judged for every leg up front:
    # otherwise leg a would train and commit, and the sweep stop at leg b.
    sweep_project(git_repo, module="engine.train")
    monkeypatch.chdir(git_repo)
    spec = write_spec(git_repo, 'name = "s"\n[common]\nsteps = 2\n[[legs]]\ntag = "a"\n[[legs]]\ntag = "b"\nep = 2\n')
    status = git(git_repo, "status", "--porcelain")
    r = cli("sweep", str(spec), *QUIET)
    assert r.exit_code == 2 and "leg b: --ep 2: does not divide the world size 1 (--nproc 1)" in r.output, r.output
    assert not artifact_root.exists() and git(git_repo, "status", "--porcelain") == status


def test_baseline_must_be_a_leg(git_repo, monkeypatch):
    sweep_project(git_repo)
    monkeypatch.chdir(git_repo)
    spec = write_spec(git_repo, 'name = "s"\n[[legs]]\ntag = "a"\n')
    r = cli("sweep", str(spec), "--baseline", "zzz")
    assert r.exit_code == 2 and "--baseline 'zzz' is not a leg" in r.output
    r = cli("sweep", str(spec), "--baseline", "zzz", "--dry-run")  # the preview refuses it as the sweep would
    assert r.exit_code == 2 and "--baseline 'zzz' is not a leg" in r.output


# -------------------------------------------------------------------------------- real sweeps


@pytest.mark.slow
def test_three_leg_tiny_sweep_completes_with_reports_and_commits(git_repo, artifact_root, monkeypatch):
    """The real engine (tiny preset, a few steps) through real torchrun, three legs."""
    sweep_project(git_repo, module="engine.train", window=3)
    monkeypatch.chdir(git_repo)
    spec = write_spec(git_repo, 'name = "capacity"\n'
                      '[common]\nsteps = 4\ncompile = "none"\n'
                      'args = ["--data", "synthetic", "--vocab-size", "256", "--eval-every", "-1", '
                      '"--seq-len", "32", "--device-batch-size", "4"]\n'
                      '[[legs]]\ntag = "cap0p0"\ncap = 0.0\n'
                      '[[legs]]\ntag = "cap1p0"\ncap = 1.0\n'
                      '[[legs]]\ntag = "cap1p25"\ncap = 1.25\n')
    # The user's own work in progress: a staged file, a modified tracked file, an untracked file.
    (git_repo / "staged.txt").write_text("staged\n")
    git(git_repo, "add", "staged.txt")
    (git_repo / "README.md").write_text("edited, not staged\n")
    (git_repo / "notes.txt").write_text("untracked\n")
    status_before = git(git_repo, "status", "--porcelain")
    head_before = git(git_repo, "rev-parse", "HEAD").strip()

    r = cli("sweep", str(spec), "--json", *QUIET)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)

    (sweep_dir,) = sweep_dirs(artifact_root)
    sweep = load(sweep_dir / "sweep.json")
    assert sweep == {**out["sweep"]}
    assert sweep["name"] == "capacity" and sweep["resumed_from"] is None
    assert sweep["config"] == str((git_repo / ".moectl.toml").resolve())  # what a resume must use again
    assert [(leg["tag"], leg["state"]) for leg in sweep["legs"]] == [
        ("cap0p0", "completed"), ("cap1p0", "completed"), ("cap1p25", "completed")]
    for leg in sweep["legs"]:
        run = load(sweep_dir / leg["run_id"] / "run.json")
        assert run["status"] == "completed" and run["sweep"] == sweep["id"]
        assert run["options"]["cap"] == leg["options"]["cap"]
        assert run["summary"]["steps"] == 3 and run["summary"]["tok_per_sec"] > 0

    # Final comparison of all three legs; the recommendation names the fastest by tail tok/sec.
    comp = out["comparison"]
    assert [row["tag"] for row in comp["runs"]] == ["cap0p0", "cap1p0", "cap1p25"]
    best = max(comp["runs"], key=lambda row: row["metrics"]["tok_per_sec"]["value"])
    assert f"`{best['tag']}`" in out["recommendation"]
    report = Path(out["report"])
    text = report.read_text()
    assert all(tag in text for tag in ("cap0p0", "cap1p0", "cap1p25")) and "**Recommendation:**" in text
    for metric in ("loss", "tok_per_sec", "dt_ms"):  # figures linked from the report (MFU is null on CPU)
        fig = report.parent / "figures" / f"{report.stem}_{metric}.png"
        assert fig.stat().st_size > 1000 and f"figures/{fig.name}" in text

    # One commit per leg (its report + the sweep report + EXPERIMENTS.md), then the final one.
    revs = git(git_repo, "rev-list", f"{head_before}..HEAD").split()[::-1]
    assert len(revs) == 4 and revs[-1] == out["commits"][-1]
    for rev, leg in zip(revs, sweep["legs"]):
        files = commit_files(git_repo, rev)
        assert report.relative_to(git_repo).as_posix() in files and "EXPERIMENTS.md" in files
        assert any(f.endswith(f"_{leg['tag']}.md") for f in files)
        assert all(f.startswith("reports/") or f == "EXPERIMENTS.md" for f in files)
    assert all(f.startswith("reports/") or f == "EXPERIMENTS.md" for f in commit_files(git_repo, revs[-1]))
    assert "report: sweep capacity — completed, 3/3 legs" in git(git_repo, "log", "-1", "--format=%s")
    # The user's staged, modified and untracked files are exactly as they were.
    assert git(git_repo, "status", "--porcelain") == status_before
    assert "capacity" in (git_repo / "EXPERIMENTS.md").read_text()


def _spawn_sweep(repo: Path, out: Path, *args: str, bin_dir: Optional[Path] = None) -> subprocess.Popen:
    """`python -m moectl sweep ...`, its output to the file `out` (a pipe nobody reads while the
    test waits could fill and stall it); `bin_dir`: commands found there first."""
    env = {**os.environ, "PYTHONPATH": str(MOECTL_ROOT)}
    if bin_dir is not None:
        env["PATH"] = f"{bin_dir}:/usr/bin:/bin"
    with open(out, "w") as fh:
        return subprocess.Popen([sys.executable, "-m", "moectl", "sweep", *args], cwd=repo, env=env,
                                stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def leg2_gate(git_repo: Path, name: str) -> Path:
    return git_repo.parent / f"{name}-leg2.gate"


def _interrupt_during_leg_2(git_repo, artifact_root, sig, name: str) -> tuple[int, str, Path]:
    """Start a three-leg `moectl sweep` subprocess, send `sig` once leg 2 is training; returns
    (exit code, output, sweep dir). Leg 2 holds before its step 3 until `leg2_gate(git_repo, name)`
    exists, so the signal lands inside it however slow the machine; a resume opens the gate first."""
    gate = leg2_gate(git_repo, name)
    spec = write_spec(git_repo, f'name = "{name}"\n[common]\nsteps = 6\nargs = ["--sleep-per-step", "0.02"]\n'
                      '[[legs]]\ntag = "one"\n'
                      '[[legs]]\ntag = "two"\nsteps = 8\n'
                      f'args = ["--sleep-per-step", "0.02", "--hold-at-step", "3", "--hold-until", "{gate}"]\n'
                      '[[legs]]\ntag = "three"\n')
    out = git_repo.parent / f"sweep-{name}.out"
    proc = _spawn_sweep(git_repo, out, str(spec), "--no-commit", *QUIET)
    try:
        sweep_dir = wait_for(lambda: next(iter(sweep_dirs(artifact_root)), None), "the sweep directory appearing",
                             120, proc=proc, output=out.read_text)

        def leg2_stepping():
            legs = load(sweep_dir / "sweep.json")["legs"]
            if legs[1]["state"] != "running":
                return False
            metrics = sweep_dir / legs[1]["run_id"] / "metrics.jsonl"
            return metrics.exists() and metrics.read_text().count('"step"') >= 3

        wait_for(leg2_stepping, "leg 2 training (3 steps in its metrics)", 120, proc=proc, output=out.read_text)
        proc.send_signal(sig)
        proc.wait(timeout=120)  # a bound against a hang, not a latency check
    finally:
        if proc.poll() is None:
            stop_process(proc)
    return proc.returncode, out.read_text(), sweep_dir


@pytest.mark.slow
def test_a_sweep_killed_during_its_first_leg_leaves_no_placeholder_report(git_repo, artifact_root, monkeypatch):
    # The report name used to be claimed at the start with a `running` placeholder: after a SIGKILL
    # it stayed untracked in report_dir, and neither a resume nor `summary` ever took it.
    sweep_project(git_repo)
    monkeypatch.chdir(git_repo)
    gate = git_repo.parent / "first.gate"
    spec = write_spec(git_repo, 'name = "k"\n[common]\nsteps = 6\n'
                      f'args = ["--sleep-per-step", "0.02", "--hold-at-step", "2", "--hold-until", "{gate}"]\n'
                      '[[legs]]\ntag = "one"\n[[legs]]\ntag = "two"\n')
    out = git_repo.parent / "sweep-k.out"
    proc = _spawn_sweep(git_repo, out, str(spec), *QUIET)
    try:
        wait_for(Path(f"{gate}.waiting").exists, "leg 1 training", 120, proc=proc, output=out.read_text)
        proc.kill()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            stop_process(proc)
        gate.touch()  # the orphaned trainer (if any) may finish; moectl's watchdog stops it anyway
    assert not (git_repo / "reports").exists() or list((git_repo / "reports").iterdir()) == []
    # The sweep's run lock is left behind, and seen stale: the next run takes it over.
    from moectl.lock import read_holder

    holder = read_holder(artifact_root)
    assert holder.stale and (holder.pid, holder.sweep, holder.leg) == (proc.pid, sweep_dirs(artifact_root)[0].name,
                                                                       "one"), holder
    assert git(git_repo, "status", "--porcelain", "--untracked-files=all").splitlines() == ["?? spec.toml"]


@pytest.mark.slow
def _run_in_the_gap(repo: Path, env: dict) -> str:
    """`moectl run` started while a sweep (or a repeat group) waits between two of its runs: refused,
    exit 3; the no_other_training guard's message."""
    r = subprocess.run([sys.executable, "-m", "moectl", "run", "--steps", "2", "--tag", "between", "--no-commit",
                        "--json"], cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, r.stdout + r.stderr
    return next(g for g in json.loads(r.stdout)["guards"] if g["name"] == "no_other_training")["message"]


def _let_go(holder, proc: subprocess.Popen) -> None:
    """Release git's index lock (if held) and stop the moectl under test if it still runs."""
    if holder is not None:
        holder.release_file.touch()
        holder.proc.wait(timeout=30)
    if proc.poll() is None:
        stop_process(proc)


def test_a_run_started_between_two_legs_is_refused_naming_the_sweep_which_runs_every_leg(
        git_repo, artifact_root, monkeypatch, tmp_path):
    """Each leg's run let go of the run lock before its report commit: a `moectl run` started while
    that commit waited for git's index.lock (an editor's `git commit`) took the lock and trained,
    and the sweep's next leg was refused (exit 3, the rest of the sweep undone), the wait said by
    nothing. The sweep holds the lock to its end now: that run is refused naming the sweep and its
    leg, `status` shows the lock as the sweep's, and the sweep says it waits and runs every leg."""
    from tests.test_commit_lock import LockHolder

    sweep_project(git_repo)
    monkeypatch.chdir(git_repo)
    monkeypatch.setenv("MOECTL_GIT_LOCK_WAIT", "120")  # (the sweep's: a bound against a hang)
    gate = tmp_path / "one.gate"
    spec = write_spec(git_repo, 'name = "gap"\n[common]\nsteps = 3\n'
                      f'[[legs]]\ntag = "one"\nargs = ["--hold-at-step", "2", "--hold-until", "{gate}"]\n'
                      '[[legs]]\ntag = "two"\n')
    out = tmp_path / "sweep.out"
    env = {**os.environ, "PYTHONPATH": str(MOECTL_ROOT)}
    proc = _spawn_sweep(git_repo, out, str(spec), *QUIET)
    holder = None
    try:
        wait_for(Path(f"{gate}.waiting").exists, "leg one training", 120, proc=proc, output=out.read_text)
        holder = LockHolder(git_repo, tmp_path)  # git's index lock, held as leg one ends
        gate.touch()
        wait_for(lambda: re.search(r"waiting for \S+/\.git/index\.lock \(another git process holds it\) to commit "
                                   r"the report", out.read_text()),
                 "leg one's report commit waiting for index.lock", 120, proc=proc, output=out.read_text)
        # The gap: leg one's training is over, its commit waits, leg two has not started.
        [sweep_dir] = sweep_dirs(artifact_root)
        one = load(sweep_dir / "sweep.json")["legs"][0]["run_id"]
        guard = _run_in_the_gap(git_repo, env)
        assert (f"moectl pid {proc.pid} on {socket.gethostname()} holds the run lock for sweep {sweep_dir.name} "
                f"(leg one, run {one})") in guard, guard
        lock = json.loads(cli("status", "--json").stdout)["lock"]
        assert (lock["pid"], lock["sweep"], lock["leg"], lock["run_id"], lock["stale"]) == (
            proc.pid, sweep_dir.name, "one", one, False), lock
        holder.release_file.touch()  # (the sweep takes index.lock the moment it is gone: no look at it here)
        assert proc.wait(timeout=120) == 0, out.read_text()
    finally:
        _let_go(holder, proc)
    assert [leg["state"] for leg in load(sweep_dir / "sweep.json")["legs"]] == ["completed", "completed"]
    assert [p.name for p in artifact_root.iterdir() if p.name.endswith("-between")] == []  # it never started
    assert not (artifact_root / ".moectl.lock").exists()  # released at the sweep's end


def test_a_run_started_between_two_repeats_is_refused_and_the_group_runs_every_repeat(
        git_repo, artifact_root, monkeypatch, tmp_path):
    """`run --repeat N` as a sweep: each repeat let go of the run lock at its end, so a `moectl run`
    started while a repeat's report commit waited for git trained, and the next repeat was refused
    (exit 3, the group cut short). The group holds the lock from its first repeat to its last."""
    from tests.test_commit_lock import LockHolder

    sweep_project(git_repo)
    monkeypatch.chdir(git_repo)
    monkeypatch.setenv("MOECTL_GIT_LOCK_WAIT", "120")  # (the group's: a bound against a hang)
    gate = tmp_path / "r1.gate"
    out = tmp_path / "repeat.out"
    env = {**os.environ, "PYTHONPATH": str(MOECTL_ROOT)}
    with open(out, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "moectl", "run", "--repeat", "2", "--steps", "3", "--tag", "grp",
                                 *QUIET, "--", "--hold-at-step", "2", "--hold-until", str(gate)],
                                cwd=git_repo, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    holder = None
    try:
        wait_for(Path(f"{gate}.waiting").exists, "repeat 1 training", 120, proc=proc, output=out.read_text)
        holder = LockHolder(git_repo, tmp_path)  # git's index lock, held as repeat 1 ends
        gate.touch()
        wait_for(lambda: re.search(r"waiting for \S+/\.git/index\.lock", out.read_text()),
                 "repeat 1's report commit waiting for index.lock", 120, proc=proc, output=out.read_text)
        [first] = [p.name for p in artifact_root.iterdir() if p.name.endswith("-grp-r1")]
        guard = _run_in_the_gap(git_repo, env)
        assert f"moectl pid {proc.pid} on {socket.gethostname()} holds the run lock for {first}" in guard, guard
        holder.release_file.touch()
        assert proc.wait(timeout=120) == 0, out.read_text()
    finally:
        _let_go(holder, proc)
    runs = sorted(p.name for p in artifact_root.iterdir() if (p / "run.json").is_file())
    assert [load(artifact_root / r / "run.json")["status"] for r in runs] == ["completed", "completed"], runs
    assert not any(r.endswith("-between") for r in runs) and not (artifact_root / ".moectl.lock").exists()


@pytest.mark.slow
def test_sigterm_during_leg_2_leaves_sweep_json_true(git_repo, artifact_root, monkeypatch):
    """SIGTERM (a scheduler, `kill`) is an interrupt like Ctrl-C: exit 130, no further legs."""
    sweep_project(git_repo)
    monkeypatch.chdir(git_repo)
    code, output, sweep_dir = _interrupt_during_leg_2(git_repo, artifact_root, signal.SIGTERM, "term")
    assert code == 130, output
    legs = load(sweep_dir / "sweep.json")["legs"]
    assert [leg["state"] for leg in legs] == ["completed", "interrupted", "pending"]
    assert load(sweep_dir / legs[1]["run_id"] / "run.json")["status"] == "interrupted"
    assert not (artifact_root / ".moectl.lock").exists()  # the sweep's run lock, released


@pytest.mark.slow
def test_interrupt_during_leg_2_then_resume_runs_only_unfinished_legs(git_repo, artifact_root, monkeypatch):
    sweep_project(git_repo)
    monkeypatch.chdir(git_repo)
    code, output, sweep_dir = _interrupt_during_leg_2(git_repo, artifact_root, signal.SIGINT, "ablate")
    assert code == 130, output
    # Each leg that starts says so with its guards in one line, as `moectl run` does.
    assert len(re.findall(r"leg \S+: run \S+ \(guards: \d+ passed, gpus_idle skipped \(", output)) == 2, output

    old = load(sweep_dir / "sweep.json")
    assert [leg["state"] for leg in old["legs"]] == ["completed", "interrupted", "pending"]
    assert old["legs"][2]["run_id"] is None
    # ... and it ends saying the next command, where the person is looking
    # (with the guard it overrode: the other training it passed over is likely still there)
    assert (f"2 leg(s) did not complete; resume them in a fresh directory: moectl sweep --resume {old['id']} "
            "--override no_other_training\n") in output
    assert old["overrides"] == ["no_other_training"]
    assert load(sweep_dir / old["legs"][1]["run_id"] / "run.json")["status"] == "interrupted"
    assert not (artifact_root / ".moectl.lock").exists()  # the sweep's run lock, released
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == sorted(
        [old["legs"][0]["run_id"], old["legs"][1]["run_id"]])  # leg 3 never started
    before = tree_hash(sweep_dir)

    leg2_gate(git_repo, "ablate").touch()  # the re-run of leg 2 goes through
    r = cli("sweep", "--resume", old["id"], "--no-commit", "--json", *QUIET)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    new_dir = Path(out["sweep"]["exp_dir"])
    assert new_dir != sweep_dir and new_dir.name.endswith("_moe-ablate-resume") and new_dir.parent == artifact_root
    new = load(new_dir / "sweep.json")
    assert new["resumed_from"] == old["id"] and new["name"] == "ablate"
    assert [leg["state"] for leg in new["legs"]] == ["completed"] * 3
    assert new["legs"][0]["run_id"] == old["legs"][0]["run_id"]  # carried over, not re-run
    ran = sorted(p.name for p in new_dir.iterdir() if p.is_dir())
    assert ran == sorted([new["legs"][1]["run_id"], new["legs"][2]["run_id"]])  # exactly the unfinished legs
    assert tree_hash(sweep_dir) == before  # the old directory is untouched
    # The resume's legs ran under its own run lock, held from its first leg to its end.
    guard = next(g for g in load(new_dir / new["legs"][2]["run_id"] / "run.json")["guards"]
                 if g["name"] == "no_other_training")
    assert f"the run lock is this moectl's own, for sweep {new['id']} (leg three)" in guard["message"], guard
    assert not (artifact_root / ".moectl.lock").exists()
    assert [row["id"] for row in out["comparison"]["runs"]] == [leg["run_id"] for leg in new["legs"]]

    # Resuming the resume: nothing left, no new directory.
    r = cli("sweep", "--resume", new["id"], "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["nothing_to_run"] is True
    assert len(sweep_dirs(artifact_root)) == 2


@pytest.mark.slow
def test_a_resume_of_a_resume_records_the_original_as_resumed_from(git_repo, artifact_root, monkeypatch):
    """SIGINT during leg 2, resume, SIGINT during leg 3, resume again: every resume's `resumed_from`
    is the original sweep (SPEC §7a; the second resume named the first resume), `previous` the one it
    continued, and the chain, the report and `--resume` of the original still follow every link."""
    sweep_project(git_repo)
    monkeypatch.chdir(git_repo)
    gates = {tag: git_repo.parent / f"{tag}.gate" for tag in ("two", "three")}
    spec = write_spec(git_repo, 'name = "three"\n[common]\nsteps = 6\n'
                      + "".join(f'[[legs]]\ntag = "{tag}"\n' + (f'args = ["--sleep-per-step", "0.02", "--hold-at-step", '
                                                                  f'"3", "--hold-until", "{gates[tag]}"]\n'
                                                                  if tag in gates else "")
                                for tag in ("one", "two", "three")))

    def stop_while_held(tag: str, *args: str) -> Path:
        out = git_repo.parent / f"sweep-{tag}.out"
        before = set(sweep_dirs(artifact_root))
        proc = _spawn_sweep(git_repo, out, *args, "--no-commit", *QUIET)
        code = signal_when(proc, Path(f"{gates[tag]}.waiting").exists, f"leg {tag} held", signal.SIGINT,
                           output=out.read_text)
        assert code == 130, out.read_text()
        gates[tag].touch()  # its re-run goes through
        [made] = set(sweep_dirs(artifact_root)) - before
        return made

    first = load(stop_while_held("two", str(spec)) / "sweep.json")
    second = load(stop_while_held("three", "--resume", "three") / "sweep.json")
    # What became of each leg, and what the resume does with it (not `two pending` for an interrupted leg).
    assert (f"resuming {first['id']}: one completed (kept), two interrupted (runs again), three pending (runs)"
            in (git_repo.parent / "sweep-three.out").read_text())
    assert [leg["state"] for leg in second["legs"]] == ["completed", "completed", "interrupted"]
    r = cli("sweep", "--resume", "three", "--no-commit", "--json", *QUIET)
    assert r.exit_code == 0, r.output
    assert f"resuming {second['id']}: one completed (kept), two completed (kept), three interrupted (runs again)" \
        in r.output
    out = json.loads(r.stdout)
    third = load(Path(out["sweep"]["exp_dir"]) / "sweep.json")
    assert [leg["state"] for leg in third["legs"]] == ["completed"] * 3
    assert second["resumed_from"] == first["id"] and third["resumed_from"] == first["id"]  # (was second's)
    assert (second["previous"], third["previous"]) == (first["id"], second["id"])
    assert third["legs"][0]["run_id"] == first["legs"][0]["run_id"]  # carried through the chain
    assert third["legs"][1]["run_id"] == second["legs"][1]["run_id"]
    chain = " → ".join(f"`{s['id']}`" for s in (first, second, third))
    assert f"- resumed from: `{first['id']}` (chain: {chain})" in Path(out["report"]).read_text()
    # The original, by its id: its newest resume is the one continued (nothing is left to run).
    r = cli("sweep", "--resume", first["id"], "--dry-run")
    assert r.exit_code == 0 and f"0 leg(s) to run (resuming {third['id']})" in r.output, r.output
    # EXPERIMENTS.md shows the chain once, from its newest sweep.
    handoff = git_repo.parent / "handoff.md"
    assert cli("summary", "--no-commit", "-o", str(handoff)).exit_code == 0
    text = handoff.read_text()
    assert text.count("### three (") == 1
    assert all(f"directory: `{s['exp_dir']}`" in text for s in (first, second, third))


@pytest.mark.slow
def test_a_resume_of_a_chain_written_before_previous_records_its_original(git_repo, artifact_root, monkeypatch):
    """A chain written by an older moectl (no `previous`; each resume's `resumed_from` names the sweep
    it continued): it still resolves, runs only the unfinished leg, and the new resume names the
    chain's original as `resumed_from` and the sweep it continued as `previous`."""
    from moectl.records import SweepLeg
    from tests.test_summary import make_run, make_sweep, populate

    sweep_project(git_repo)
    monkeypatch.chdir(git_repo)
    ids = populate(artifact_root)
    d = artifact_root / "20260102_120000_moe-capacity-resume"
    make_run(d, "20260102_120001_moe-c", "c", "interrupted", 500.0, d.name)
    make_sweep(artifact_root, d.name, "capacity", [SweepLeg(tag="a", state="completed", run_id="20260102_100001_moe-a"),
                                                   SweepLeg(tag="b", state="completed", run_id="20260102_110001_moe-b"),
                                                   SweepLeg(tag="c", state="interrupted", run_id="20260102_120001_moe-c")],
               resumed_from=ids["resume"])
    data = load(d / "sweep.json")
    data.pop("previous", None)  # (as an older moectl wrote it)
    (d / "sweep.json").write_text(json.dumps(data))
    r = cli("sweep", "--resume", ids["original"], "--no-commit", "--json", *QUIET)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    new = load(Path(out["sweep"]["exp_dir"]) / "sweep.json")
    assert new["resumed_from"] == ids["original"] and new["previous"] == d.name
    assert [(leg["tag"], leg["state"]) for leg in new["legs"]] == [("a", "completed"), ("b", "completed"),
                                                                    ("c", "completed")]
    assert new["legs"][1]["run_id"] == "20260102_110001_moe-b"  # carried, not run again
    chain = " → ".join(f"`{i}`" for i in (ids["original"], ids["resume"], d.name, new["id"]))
    assert f"(chain: {chain})" in Path(out["report"]).read_text()


@pytest.mark.slow
def test_a_legs_repeats_are_never_compared_against_each_other_as_the_baseline(git_repo, artifact_root, monkeypatch):
    """`repeats = 2`: ra's repeat 2 was reported and committed `vs ra` - against its own repeat 1, two
    seeds of one configuration, with `*` beyond noise. The baseline leg's own repeats now get no
    baseline; rb's repeats are compared against ra's completed group (mean ± between-runs error),
    as `run --baseline GROUP` does."""
    sweep_project(git_repo)
    monkeypatch.chdir(git_repo)
    spec = write_spec(git_repo, 'name = "rep"\n[common]\nsteps = 6\nrepeats = 2\nargs = ["--sleep-per-step", "0.01"]\n'
                      '[[legs]]\ntag = "ra"\ncap = 0.0\n[[legs]]\ntag = "rb"\ncap = 1.0\n')
    r = cli("sweep", str(spec), *QUIET)
    assert r.exit_code == 0, r.output
    [sweep_dir] = sweep_dirs(artifact_root)
    sweep = load(sweep_dir / "sweep.json")
    assert [(leg["tag"], leg["repeat"], leg["state"]) for leg in sweep["legs"]] == [
        ("ra", 1, "completed"), ("ra", 2, "completed"), ("rb", 1, "completed"), ("rb", 2, "completed")]
    runs = [load(Path(sweep["exp_dir"]) / leg["run_id"] / "run.json") for leg in sweep["legs"]]
    subjects = [git(git_repo, "log", "-1", "--format=%s", run["commit"]).strip() for run in runs]
    reports = [Path(run["report"]).read_text() for run in runs]
    for subject, report in zip(subjects[:2], reports[:2]):  # ra: the baseline leg, its own repeats
        assert " vs " not in subject and "## Against the baseline" not in report, (subject, report)
    for subject, report in zip(subjects[2:], reports[2:]):  # rb: against ra's group of 2
        assert re.search(r"\([+-]\d+\.\d\d% vs ra\)$", subject), subject
        assert "## Against the baseline" in report and "| ra (×2 runs) (baseline) |" in report, report
    # The closing line says what the commits hold: not "reports only" beside figures and EXPERIMENTS.md.
    figures = len(list((git_repo / "reports" / "figures").glob("*.png")))
    assert figures > 0 and (f"committed 5 commit(s), last {git(git_repo, 'rev-parse', 'HEAD')[:10]} (5 reports, "
                            f"{figures} figures, EXPERIMENTS.md; nothing else)") in r.output, r.output


@pytest.mark.slow
def test_failed_leg_does_not_stop_the_sweep_but_fail_fast_does(git_repo, artifact_root, monkeypatch):
    sweep_project(git_repo, summary=False)  # report.summary = false: EXPERIMENTS.md is left alone
    monkeypatch.chdir(git_repo)
    spec = write_spec(git_repo, 'name = "f"\n[common]\nsteps = 4\n'
                      '[[legs]]\ntag = "ok1"\n'
                      '[[legs]]\ntag = "bad"\nargs = ["--fail-at-step", "1", "--exit-code", "7"]\n'
                      '[[legs]]\ntag = "ok2"\n')
    r = cli("sweep", str(spec), "--no-commit", "--json", *QUIET)
    assert r.exit_code == 4, r.output
    legs = json.loads(r.stdout)["sweep"]["legs"]
    assert [(leg["tag"], leg["state"]) for leg in legs] == [("ok1", "completed"), ("bad", "failed"), ("ok2", "completed")]
    assert [row["tag"] for row in json.loads(r.stdout)["comparison"]["runs"]] == ["ok1", "ok2"]

    r = cli("sweep", str(spec), "--no-commit", "--fail-fast", "--json", *QUIET)
    assert r.exit_code == 4, r.output
    legs = json.loads(r.stdout)["sweep"]["legs"]
    assert [leg["state"] for leg in legs] == ["completed", "failed", "pending"]
    assert len(sweep_dirs(artifact_root)) == 2
    assert not (git_repo / "EXPERIMENTS.md").exists() and list((git_repo / "reports").glob("*_sweep_f.md"))


@pytest.mark.slow
def test_compile_failure_reruns_the_leg_as_its_own_fallback_leg(git_repo, artifact_root, monkeypatch):
    sweep_project(git_repo)
    monkeypatch.chdir(git_repo)
    # --compile-fails: the stand-in engine exits 3 (EXIT_COMPILE_FAILED) unless --compile none.
    spec = write_spec(git_repo, 'name = "c"\n[common]\nsteps = 4\nargs = ["--compile-fails"]\n'
                      '[[legs]]\ntag = "eager"\ncompile = "none"\n'
                      '[[legs]]\ntag = "static"\ncompile = "static"\n')
    r = cli("sweep", str(spec), "--json", *QUIET)
    assert r.exit_code == 0, r.output  # the failed leg is settled by its completed fallback
    out = json.loads(r.stdout)
    legs = out["sweep"]["legs"]
    assert [(leg["tag"], leg["state"], leg["fallback_of"]) for leg in legs] == [
        ("eager", "completed", None), ("static", "failed", None), ("static_fallback_none", "completed", "static")]
    sweep_dir = Path(out["sweep"]["exp_dir"])
    failed = load(sweep_dir / legs[1]["run_id"] / "run.json")
    assert failed["exit_code"] == 3 and failed["options"]["compile"] == "static"
    fallback = load(sweep_dir / legs[2]["run_id"] / "run.json")
    assert fallback["status"] == "completed" and fallback["options"]["compile"] == "none"
    text = Path(out["report"]).read_text()
    assert "`static_fallback_none` re-runs `static` with `--compile none`" in text
    assert "completed (1 through its --compile none fallback)" in git(git_repo, "log", "-1", "--format=%s")


@pytest.mark.slow
def test_each_repeat_that_fails_to_compile_gets_its_own_fallback_in_a_group_of_the_fallbacks(git_repo, artifact_root,
                                                                                            monkeypatch):
    sweep_project(git_repo)
    monkeypatch.chdir(git_repo)
    spec = write_spec(git_repo, 'name = "cr"\n[common]\nsteps = 3\nrepeats = 2\nargs = ["--compile-fails"]\n'
                      '[[legs]]\ntag = "static"\ncompile = "static"\n')
    r = cli("sweep", str(spec), "--json", *QUIET)
    assert r.exit_code == 0, r.output
    legs = json.loads(r.stdout)["sweep"]["legs"]
    assert [(leg["tag"], leg["repeat"], leg["state"]) for leg in legs] == [
        ("static", 1, "failed"), ("static_fallback_none", 1, "completed"),
        ("static", 2, "failed"), ("static_fallback_none", 2, "completed")]
    group = legs[0]["group"]
    assert legs[2]["group"] == group and {legs[1]["group"], legs[3]["group"]} == {f"{group}_fallback_none"}
    sweep_dir = Path(json.loads(r.stdout)["sweep"]["exp_dir"])
    fallbacks = [load(sweep_dir / leg["run_id"] / "run.json") for leg in legs[1::2]]
    assert [(x["group"], x["repeat"], x["options"]["compile"]) for x in fallbacks] == [
        (f"{group}_fallback_none", 1, "none"), (f"{group}_fallback_none", 2, "none")]


# ------------------------------------------------------------------------- resume planning (fast)


def test_resume_plan_reruns_stale_and_unfinished_legs_only(git_repo, artifact_root, monkeypatch):
    """A resume of a resume whose last leg was SIGKILLed (sweep.json says `running`, the run's owner
    is dead): only that leg is planned, inside a fresh -resume directory; nothing is written but
    the settling of the killed leg (its run and sweep.json leg become `interrupted`)."""
    from tests.test_summary import populate

    sweep_project(git_repo)
    monkeypatch.chdir(git_repo)
    ids = populate(artifact_root)
    before = {d.name: tree_hash(d) for d in sweep_dirs(artifact_root)}
    r = cli("sweep", "--resume", ids["resume"], "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    resume_dir = artifact_root / ids["resume"]
    killed = load(resume_dir / "20260102_110101_moe-c" / "run.json")
    assert killed["status"] == "interrupted" and killed["error"] == "interrupted (moectl was killed)"
    assert [leg["state"] for leg in load(resume_dir / "sweep.json")["legs"]] == ["completed", "completed", "interrupted"]
    settled = {"20260102_110101_moe-c/run.json", "sweep.json"}
    assert {k: v for k, v in tree_hash(resume_dir).items() if k not in settled} == \
        {k: v for k, v in before[ids["resume"]].items() if k not in settled}
    before[ids["resume"]] = tree_hash(resume_dir)
    data = json.loads(r.stdout)
    # as the resume's sweep.json will say (SPEC §7a): the chain's original, and the sweep it continues
    assert data["resumed_from"] == ids["original"] and data["previous"] == ids["resume"]
    assert [leg["tag"] for leg in data["legs"]] == ["c"]
    assert "_moe-capacity-resume/" in data["legs"][0]["command"]
    # The original, by a unique prefix: it was resumed already, so the newest resume is continued.
    r = cli("sweep", "--resume", ids["original"][:20], "--dry-run")
    assert r.exit_code == 0, r.output
    assert f"(resuming {ids['resume']})" in r.output
    assert "a: completed (run 20260102_100001_moe-a), not re-run" in r.output
    assert "b: completed (run 20260102_110001_moe-b), not re-run" in r.output
    assert r.output.count("torch.distributed.run") == 1
    r = cli("sweep", "--resume", ids["done"], "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["nothing_to_run"] is True
    assert {d.name: tree_hash(d) for d in sweep_dirs(artifact_root)} == before


def test_a_sweep_stopped_after_a_legs_directory_exists_but_before_its_launch_names_that_run(git_repo, artifact_root,
                                                                                            monkeypatch):
    # The leg's run was recorded `interrupted` ("before training started") while sweep.json still
    # said `pending` with no run: a run directory the sweep's table and report did not know.
    import moectl.runner as runner_mod

    sweep_project(git_repo)
    monkeypatch.chdir(git_repo)

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner_mod, "write_run_files", stopped)  # (git diff of a large tree takes a while)
    spec = write_spec(git_repo, 'name = "early"\n[common]\nsteps = 4\n[[legs]]\ntag = "a"\n[[legs]]\ntag = "b"\n')
    r = cli("sweep", str(spec), "--json", *QUIET)
    assert r.exit_code == 130, r.output
    [sweep_dir] = sweep_dirs(artifact_root)
    legs = load(sweep_dir / "sweep.json")["legs"]
    assert [(leg["tag"], leg["state"]) for leg in legs] == [("a", "interrupted"), ("b", "pending")]
    run = load(sweep_dir / legs[0]["run_id"] / "run.json")
    assert run["status"] == "interrupted" and run["error"] == "interrupted before training started"


def test_a_resume_does_not_run_a_fallback_leg_whose_own_leg_runs_again(git_repo, artifact_root, monkeypatch):
    # Interrupted during `static_fallback_none`: the resume ran `static` (which now compiled and
    # completed) and then its fallback as well - a whole leg for nothing, and a table with a
    # fallback for a leg that compiled. The fallback is made anew if `static` fails again.
    from moectl.records import SweepLeg
    from tests.test_summary import make_run, make_sweep

    sweep_project(git_repo)
    monkeypatch.chdir(git_repo)
    sid = "20260103_100000_moe-fb"
    d = make_sweep(artifact_root, sid, "fb", [
        SweepLeg(tag="eager", state="completed", run_id="20260103_100001_moe-eager"),
        SweepLeg(tag="static", state="failed", run_id="20260103_100101_moe-static"),
        SweepLeg(tag="static_fallback_none", state="interrupted", run_id="20260103_100201_moe-static_fallback_none",
                 fallback_of="static", options={"compile": "none"}),
        SweepLeg(tag="last", state="pending")])
    make_run(d, "20260103_100001_moe-eager", "eager", "completed", 1000.0, sid)
    make_run(d, "20260103_100101_moe-static", "static", "failed", 1000.0, sid)
    make_run(d, "20260103_100201_moe-static_fallback_none", "static_fallback_none", "interrupted", 1000.0, sid)
    r = cli("sweep", "--resume", sid, "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    assert [leg["tag"] for leg in json.loads(r.stdout)["legs"]] == ["static", "last"]
    # A completed fallback settles its failed leg: both carried, neither run again.
    sweep = load(d / "sweep.json")
    sweep["legs"][2]["state"] = "completed"
    (d / "sweep.json").write_text(json.dumps(sweep))
    run = load(d / "20260103_100201_moe-static_fallback_none" / "run.json")
    run["status"] = "completed"
    (d / "20260103_100201_moe-static_fallback_none" / "run.json").write_text(json.dumps(run))
    r = cli("sweep", "--resume", sid, "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    assert [leg["tag"] for leg in json.loads(r.stdout)["legs"]] == ["last"]


def test_a_sweep_run_with_another_config_resumes_only_with_that_config(git_repo, artifact_root, monkeypatch):
    # Another config is another trainer or report_dir: a pasted `--resume` without it would run the
    # rest of the legs differently, and the comparison would mix the two without a word.
    from moectl.records import SweepLeg, SweepRecord, save_model
    from moectl.summary import resume_command

    sweep_project(git_repo)
    other = git_repo / "exp_v1.toml"
    other.write_text((git_repo / ".moectl.toml").read_text())
    monkeypatch.chdir(git_repo)
    d = artifact_root / "20260102_100000_moe-v1"
    d.mkdir(parents=True)
    save_model(d / "sweep.json", SweepRecord(id=d.name, name="v1", spec={}, legs=[SweepLeg(tag="a")],
                                             created_at="2026-01-02T10:00:00+00:00", exp_dir=str(d), config=str(other)))
    r = cli("sweep", "--resume", d.name, "--dry-run")
    assert r.exit_code == 2 and f"sweep {d.name} ran with {other}" in r.output, r.output
    assert f"moectl sweep --resume {d.name} --config {other}" in r.output
    assert cli("sweep", "--resume", d.name, "--dry-run", "--config", str(other)).exit_code == 0
    sweep = SweepRecord.model_validate(load(d / "sweep.json"))
    assert resume_command(sweep, git_repo) == f"moectl sweep --resume {d.name} --config exp_v1.toml"  # EXPERIMENTS.md
    # The repository's own .moectl.toml is found anyway: not named.
    own = sweep.model_copy(update={"config": str(git_repo / ".moectl.toml")})
    assert resume_command(own) == f"moectl sweep --resume {d.name}"


def test_a_resume_whose_config_is_gone_is_refused_not_run_with_another(git_repo, artifact_root, monkeypatch):
    # The sweep ran with exp_v1.toml, since deleted (or replaced by a directory): the resume ran its
    # legs with the repository's .moectl.toml, without a word.
    from moectl.records import SweepLeg, SweepRecord, save_model

    sweep_project(git_repo)
    monkeypatch.chdir(git_repo)
    other = git_repo / "exp_v1.toml"
    d = artifact_root / "20260102_100000_moe-v1"
    d.mkdir(parents=True)
    save_model(d / "sweep.json", SweepRecord(id=d.name, name="v1", spec={}, legs=[SweepLeg(tag="a")],
                                             created_at="2026-01-02T10:00:00+00:00", exp_dir=str(d), config=str(other)))
    r = cli("sweep", "--resume", d.name, "--dry-run")
    assert r.exit_code == 2 and f"sweep {d.name} ran with {other}, which is gone; put that configuration back" in r.output
    other.mkdir()
    r = cli("sweep", "--resume", d.name, "--dry-run")
    assert r.exit_code == 2 and f"ran with {other}, which is not a file" in r.output, r.output
    other.rmdir()
    # A clone that moved: the recorded repository is not there at all, so its own config is this one.
    moved = SweepRecord.model_validate(load(d / "sweep.json")).model_copy(
        update={"config": str(git_repo.parent / "old-clone" / ".moectl.toml")})
    save_model(d / "sweep.json", moved)
    assert cli("sweep", "--resume", d.name, "--dry-run").exit_code == 0


def test_a_resume_whose_record_cannot_be_read_stops_the_next_resume(git_repo, artifact_root, monkeypatch):
    # s ran leg a, its resume ran b; that resume's sweep.json is then cut. Resuming s again planned
    # a and b as never run: b (completed in the unreadable resume) would train again.
    from moectl.records import SweepLeg, SweepRecord, save_model

    sweep_project(git_repo)
    monkeypatch.chdir(git_repo)
    first = artifact_root / "20260102_100000_moe-s"
    first.mkdir(parents=True)
    save_model(first / "sweep.json", SweepRecord(id=first.name, name="s", spec={}, legs=[SweepLeg(tag="a"), SweepLeg(tag="b")],
                                                 created_at="2026-01-02T10:00:00+00:00", exp_dir=str(first),
                                                 finished_at="2026-01-02T10:05:00+00:00"))
    resumed = artifact_root / "20260102_110000_moe-s-resume"
    resumed.mkdir()
    (resumed / "sweep.json").write_text("")
    for ref in (first.name, "s"):
        r = cli("sweep", "--resume", ref, "--dry-run")
        assert r.exit_code == 2, r.output
        assert f"sweep {first.name} has a resume whose record cannot be read" in r.output
        assert f"repair or remove {resumed} first" in r.output
    (resumed / "sweep.json").unlink()
    assert cli("sweep", "--resume", first.name, "--dry-run").exit_code == 0
    # Another sweep's unreadable resume (sweep "a-s") is not this chain's; a second resume in one
    # second (`-resume-2`) is.
    other = artifact_root / "20260102_120000_moe-a-s-resume"
    other.mkdir()
    (other / "sweep.json").write_text("{")
    assert cli("sweep", "--resume", first.name, "--dry-run").exit_code == 0
    twin = artifact_root / "20260102_110000_moe-s-resume-2"
    twin.mkdir()
    (twin / "sweep.json").write_text("{")
    r = cli("sweep", "--resume", first.name, "--dry-run")
    assert r.exit_code == 2 and f"repair or remove {twin} first" in r.output, r.output


def test_a_sweep_with_an_unreadable_sweep_json_is_named_with_why(git_repo, artifact_root, monkeypatch):
    sweep_project(git_repo)
    monkeypatch.chdir(git_repo)
    d = artifact_root / "20260102_100000_moe-cut"
    d.mkdir(parents=True)
    (d / "sweep.json").write_text('{"id": "20260102_100000_moe-cut", "name": "cut", "legs": [')  # cut mid-write
    r = cli("sweep", "--resume", d.name, "--dry-run")
    assert r.exit_code == 2 and f"corrupt {d / 'sweep.json'}:" in r.output and "no sweep matches" not in r.output
    (d / "sweep.json").write_text('{"id": "x", "name": "cut", "spec": {}, "legs": [], "created_at": "t"}')
    r = cli("sweep", "--resume", str(d), "--dry-run")
    assert r.exit_code == 2 and "exp_dir: Field required" in r.output, r.output  # pydantic's first problem, named


def test_resume_refuses_a_sweep_that_is_still_running(git_repo, artifact_root, monkeypatch):
    from moectl import store
    from moectl.records import RunRecord, SweepLeg, SweepRecord, save_model

    sweep_project(git_repo)
    monkeypatch.chdir(git_repo)
    d = artifact_root / "20260103_100000_moe-live"
    (d / "20260103_100001_moe-x").mkdir(parents=True)
    store.save_run(RunRecord(id="20260103_100001_moe-x", tag="x", status="running", created_at=store.now_iso(),
                             started_at=store.now_iso(), exp_dir=str(d / "20260103_100001_moe-x"), pid=os.getpid(),
                             host=__import__("socket").gethostname()))
    save_model(d / "sweep.json", SweepRecord(id=d.name, name="live", spec={}, created_at=store.now_iso(), exp_dir=str(d),
                                             legs=[SweepLeg(tag="x", state="running", run_id="20260103_100001_moe-x"),
                                                   SweepLeg(tag="y")]))
    r = cli("sweep", "--resume", "live")  # by name: its most recent sweep
    assert r.exit_code == 3 and "still running: leg x" in r.output
    assert r.exit_code == 3 and len(sweep_dirs(artifact_root)) == 1


def test_spec_and_resume_are_exclusive(git_repo, monkeypatch):
    sweep_project(git_repo)
    monkeypatch.chdir(git_repo)
    spec = write_spec(git_repo, 'name = "s"\n[[legs]]\ntag = "a"\n')
    r = cli("sweep", str(spec), "--resume", "x")
    assert r.exit_code == 2 and "not both" in r.output
    r = cli("sweep", "--resume", "nothing-like-it")
    assert r.exit_code == 2 and "no sweep matches" in r.output
    long = write_spec(git_repo, f'name = "{"n" * 240}"\n[[legs]]\ntag = "a"\n')
    for args in ([str(long), "--dry-run"], [str(long), "--no-commit"]):  # the dry run passed, the sweep failed
        r = cli("sweep", *args)
        assert r.exit_code == 2 and "sweep name: its directory name (with a resume's `-resume`) would be" in r.output
    fifo = git_repo / "piped.toml"
    os.mkfifo(fifo)  # reading it waited for a writer forever
    r = cli("sweep", str(fifo), "--dry-run")
    assert r.exit_code == 2 and f"{fifo} is not a regular file (a pipe or device?)" in r.output, r.output


def test_a_jobs_fallback_leg_goes_right_after_its_leg_once_per_repeat_and_never_twice(tmp_path):
    """sweep.store.add_fallback_leg (moectl.job's side of launch.compile_fallback): the leg goes
    right after the failed one, one per repeat, and not where the sweep has it already (a resumed
    sweep carries its own fallback leg and runs it: the job must then make none)."""
    from moectl.records import SweepLeg, SweepRecord
    from moectl.sweep.store import add_fallback_leg, load_sweep, save_sweep, settled

    legs = [SweepLeg(tag="s", repeat=r, group="g", run_id=f"run-s{r}", state="failed") for r in (1, 2)]
    save_sweep(SweepRecord(id="sw", name="sw", spec={}, legs=legs, created_at="2026-11-27T00:00:00", exp_dir=str(tmp_path)))
    assert add_fallback_leg(tmp_path, of_run="run-s2", run_id="run-f2") is True
    assert add_fallback_leg(tmp_path, of_run="run-s1", run_id="run-f1") is True
    assert add_fallback_leg(tmp_path, of_run="run-s1", run_id="run-again") is False
    got = load_sweep(tmp_path).legs
    assert [(x.tag, x.repeat, x.run_id, x.state, x.fallback_of, x.group) for x in got] == [
        ("s", 1, "run-s1", "failed", None, "g"), ("s_fallback_none", 1, "run-f1", "queued", "s", "g_fallback_none"),
        ("s", 2, "run-s2", "failed", None, "g"), ("s_fallback_none", 2, "run-f2", "queued", "s", "g_fallback_none")]
    got[1].state = "completed"  # repeat 1's fallback completed, repeat 2's not yet
    assert settled(got[0], got) and not settled(got[2], got)


def test_two_sweeps_of_one_name_in_one_minute_never_share_a_report_file(git_repo, monkeypatch):
    # The report name is claimed when the sweep starts (not only picked): two sweeps `s2` started
    # in the same minute each write and commit their own file, neither overwrites the other's.
    from moectl.config import load_config
    from moectl.records import SweepRecord
    from moectl.sweep.report import claim_sweep_report

    sweep_project(git_repo)
    monkeypatch.chdir(git_repo)
    cfg = load_config()
    first, second = (SweepRecord(id=f"20260101_00000{i}_moe-s2", name="s2", spec={"name": "s2"}, legs=[],
                                 created_at="2026-01-01T00:00:00+00:00", exp_dir="/x") for i in (1, 2))
    a, b = claim_sweep_report(cfg, first), claim_sweep_report(cfg, second)
    assert a != b and a.parent == b.parent == cfg.report_dir
    assert first.id in a.read_text() and second.id in b.read_text()
    assert b.name == a.name.replace(".md", "-2.md") or a.name[:13] != b.name[:13]  # -2, or the minute turned


def test_a_signal_while_the_final_report_is_written_is_noted_and_the_report_finished_first():
    # Every leg is settled by then: aborted there, the sweep would have no final report, and
    # `--resume` nothing to rerun that could write it. A second signal still aborts.
    from moectl.errors import Interrupted
    from moectl.records import SweepRecord
    from moectl.sweep.run import _Finishing

    said = []
    before = signal.getsignal(signal.SIGTERM)
    sweep = SweepRecord(id="20260101_100000_moe-cap", name="cap", spec={}, legs=[], created_at="", exp_dir="")
    with _Finishing(said.append, sweep) as finishing:
        os.kill(os.getpid(), signal.SIGTERM)
        finished = True  # still here: the signal did not stop the block
        with pytest.raises(Interrupted) as stopped:
            os.kill(os.getpid(), signal.SIGINT)
    # the second one says how the owed report gets written (it said only "interrupted")
    assert stopped.value.message == ("interrupted while the sweep's final report was written; `moectl sweep --resume "
                                     "20260101_100000_moe-cap` writes and commits it")
    assert finished and finishing.signalled == "SIGTERM"
    assert said == ["SIGTERM: finishing the sweep's final report and commit first (again to abort)"]
    assert signal.getsignal(signal.SIGTERM) is before


def test_the_sweep_lock_is_reentrant_within_a_thread_and_bounded_across_processes(tmp_path):
    # The final report job holds the lock while it settles a leg whose job died, and settling saves
    # the leg under the lock again: that once waited for itself forever (and `moectl cancel SWEEP`
    # behind it). Now the inner taker gets the holder's record; another process waits, boundedly.
    import threading

    from moectl.errors import GuardRefused
    from moectl.records import SweepLeg, SweepRecord, save_model
    from moectl.sweep.store import load_sweep, locked_sweep, update_leg

    d = tmp_path / "20260101_000000_moe-s"
    d.mkdir()
    save_model(d / "sweep.json", SweepRecord(id=d.name, name="s", spec={"name": "s"}, exp_dir=str(d),
                                             created_at="2026-01-01T00:00:00+00:00",
                                             legs=[SweepLeg(tag="a", state="queued", run_id="r1")]))
    done = threading.Event()

    def settle():
        with locked_sweep(d) as sweep:
            update_leg(d, "failed", run_id="r1")  # what settle_gone_job -> save_run_and_leg does
            assert sweep.legs[0].state == "failed"  # the same record: the inner change is the outer's
        done.set()

    t = threading.Thread(target=settle, daemon=True)
    t.start()
    assert done.wait(30), "locked_sweep waited for itself"
    assert load_sweep(d).legs[0].state == "failed"  # saved when the outer holder left

    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time; fh = open(sys.argv[1], 'a'); fcntl.flock(fh, fcntl.LOCK_EX); "
        "print('held', flush=True); time.sleep(60)"), str(d / ".sweep.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(GuardRefused, match="stayed locked by another moectl for 0.3 s"):
            with locked_sweep(d, wait_s=0.3):
                pass
    finally:
        stop_process(holder)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_slurm_sweep_stopped_while_it_submits_exits_130_as_after_ctrl_c(git_repo, artifact_root, tmp_path, sig):
    # `sweep --slurm` had no SIGTERM/SIGHUP handler while submitting: killed there (143), it left a
    # held job nobody could cancel. Here sbatch stands still (a stand-in on PATH, as in
    # tests/conftest.fake_slurm_bin) so the signal lands mid-submission every time.
    sweep_project(git_repo)
    bin_dir, mark, _ = fake_slurm_bin(tmp_path, block_at=1)
    spec = write_spec(git_repo, 'name = "sub"\n[common]\nsteps = 2\n[[legs]]\ntag = "a"\n[[legs]]\ntag = "b"\n')
    out = git_repo.parent / "sub.out"
    proc = _spawn_sweep(git_repo, out, str(spec), "--slurm", "--no-commit", *QUIET, bin_dir=bin_dir)
    rc = signal_when(proc, mark.exists, "the sweep calling sbatch", sig, output=out.read_text)
    assert rc == 130 and "Traceback" not in out.read_text(), out.read_text()
    [sweep_dir] = sweep_dirs(artifact_root)
    states = [leg["state"] for leg in load(sweep_dir / "sweep.json")["legs"]]
    assert "running" not in states, states


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_sweep_stopped_while_its_leg_waits_for_gpus_exits_130_with_every_leg_settled(git_repo, artifact_root,
                                                                                     fake_nvml, sig):
    # Between legs and before a leg's training (waiting for GPUs, its guards) no launch() handler is
    # in place: SIGTERM / SIGHUP still mean Ctrl-C, so the sweep ends 130 with sweep.json true, not 143.
    from tests.conftest import gpu

    sweep_project(git_repo)
    fake_nvml(gpus=[gpu(0, util_pct=80)])
    spec = write_spec(git_repo, 'name = "gw"\n[common]\nsteps = 2\ndevice = "cuda"\n'
                      '[[legs]]\ntag = "a"\n[[legs]]\ntag = "b"\n')
    out = git_repo.parent / "gw.out"
    proc = _spawn_sweep(git_repo, out, str(spec), "--wait-gpus", "10m", "--no-commit", *QUIET)
    rc = signal_when(proc, lambda: "waiting for gpus_idle" in out.read_text(), "the first leg waiting for gpus_idle",
                     sig, output=out.read_text)
    assert rc == 130 and "Traceback" not in out.read_text(), out.read_text()
    [sweep_dir] = sweep_dirs(artifact_root)
    states = [leg["state"] for leg in load(sweep_dir / "sweep.json")["legs"]]
    assert "running" not in states and states[1] == "pending", states
    assert "moectl sweep --resume" in out.read_text()


def test_a_sweep_still_running_or_being_resumed_is_not_resumed_twice(git_repo, artifact_root, monkeypatch):
    # Two agents resuming one sweep at once each ran every unfinished leg and committed two final
    # reports. A sweep whose moectl is alive (between legs no leg is `running`) and a sweep whose
    # resume holds its claim are refused (exit 3), nothing written.
    import socket
    import time

    from moectl import store
    from moectl.lock import acquire
    from moectl.records import SweepLeg, SweepRecord, save_model
    from moectl.sweep.run import RESUME_LOCK
    from tests.conftest import start_process

    sweep_project(git_repo)
    monkeypatch.chdir(git_repo)
    owner = start_process([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        time.sleep(0.1)
        d = artifact_root / "20260401_000000_moe-busy"
        d.mkdir(parents=True)
        rec = SweepRecord(id=d.name, name="busy", spec={"name": "busy"}, legs=[SweepLeg(tag="a"), SweepLeg(tag="b")],
                          created_at=store.now_iso(), exp_dir=str(d), pid=owner.pid, host=socket.gethostname())
        save_model(d / "sweep.json", rec)
        r = CliRunner().invoke(app, ["sweep", "--resume", "busy", "--no-commit", *QUIET])
        assert r.exit_code == 3 and f"sweep {d.name} is still running (moectl pid {owner.pid})" in r.output, r.output
    finally:
        stop_process(owner)
    # Its moectl is gone now; another resume holds the claim: refused too, naming it.
    with acquire(d, f"resume of {d.name}", name=RESUME_LOCK):
        r = CliRunner().invoke(app, ["sweep", "--resume", "busy", "--no-commit", *QUIET])
        assert r.exit_code == 3 and f"sweep {d.name} is being resumed already by pid {os.getpid()}" in r.output, r.output
    assert sweep_dirs(artifact_root) == [d]  # no -resume directory was made
    assert not (d / RESUME_LOCK).exists()


def test_a_sweep_is_named_by_a_prefix_of_its_name_and_an_ambiguous_one_lists_them(tmp_path):
    from moectl import store
    from moectl.records import SweepRecord, save_model
    from moectl.sweep.store import resolve_sweep

    for sid, name in (("20260501_000000_moe-sw1", "sw1"), ("20260501_000001_moe-sw2", "sw2"),
                      ("20260501_000002_moe-capacity", "capacity"), ("20260501_000003_moe-capacity", "capacity")):
        (tmp_path / sid).mkdir()
        save_model(tmp_path / sid / "sweep.json", SweepRecord(id=sid, name=name, spec={}, legs=[],
                                                             created_at=store.now_iso(), exp_dir=str(tmp_path / sid)))
    assert resolve_sweep(tmp_path, "cap").id == "20260501_000003_moe-capacity"  # one name: its newest sweep
    with pytest.raises(UsageError, match="ambiguous sweep reference 'sw': 2 sweeps match") as info:
        resolve_sweep(tmp_path, "sw")
    assert info.value.lines == ["20260501_000000_moe-sw1 (name sw1)", "20260501_000001_moe-sw2 (name sw2)"]
    with pytest.raises(UsageError, match="no sweep matches 'zz'"):
        resolve_sweep(tmp_path, "zz")


def test_a_sweep_name_two_repositories_share_means_this_repositorys_sweep(tmp_path, monkeypatch):
    # Two repositories sharing the default artifact root both ran a sweep `three`: `wait three` and
    # `sweep --resume three` typed in one took the other's, being newer (130 for a leg of theirs,
    # or a resume refused for "ran with <their .moectl.toml>").
    from moectl import store
    from moectl.gitops import same_repository
    from moectl.records import RunRecord, SweepLeg, SweepRecord, save_model
    from moectl.sweep.store import find_sweep, resolve_sweep

    root = tmp_path / "store"
    repos = {}
    for name in ("a", "b"):
        repos[name] = tmp_path / name
        repos[name].mkdir()
        git(repos[name], "init", "-q", "-b", "main")
    sweeps = {}
    for sid, owner, state in (("20260501_000000_moe-three", "a", "completed"),
                              ("20260501_000100_moe-three", "b", "interrupted")):  # theirs, the newer
        d = root / sid
        run = store.create_run_dir(d / f"{sid}_leg")
        store.save_run(RunRecord(id=run.name, tag="leg", status=state, created_at=store.now_iso(), exp_dir=str(run),
                                 sweep=sid, repo=str(repos[owner].resolve())))
        save_model(d / "sweep.json", SweepRecord(id=sid, name="three", spec={}, created_at=store.now_iso(),
                                                 exp_dir=str(d), repo=str(repos[owner].resolve()),
                                                 legs=[SweepLeg(tag="leg", state=state, run_id=run.name)]))
        sweeps[owner] = sid
    for owner in ("a", "b"):
        ours = same_repository(repos[owner])
        assert resolve_sweep(root, "three", ours=ours).id == sweeps[owner]
        assert resolve_sweep(root, "thr", ours=ours).id == sweeps[owner]  # a prefix of the one name
        assert find_sweep(root, "three", ours=ours).id == sweeps[owner]
    assert resolve_sweep(root, "three").id == sweeps["b"]  # no project to prefer: the newest, as before

    monkeypatch.setenv("MOECTL_ARTIFACT_ROOT", str(root))
    monkeypatch.chdir(repos["a"])
    r = CliRunner().invoke(app, ["wait", "three", "--json"])
    assert r.exit_code == 0 and [x["status"] for x in json.loads(r.stdout)] == ["completed"], r.output


class _Died(BaseException):
    """Stands in for a SIGKILL: nothing of moectl's runs after it (not even `except Exception`)."""


@pytest.mark.slow
def test_a_sweep_killed_while_writing_its_final_report_is_finished_by_a_resume(git_repo, artifact_root, monkeypatch):
    """Every leg completed, then moectl died in its final stage (figures, report, commit): the
    report was left at the last leg's progress heading and never committed as final. A resume has
    no leg to run, yet owes that report: it rewrites the sweep's own report file, commits it, and
    only then is the sweep finished (a second resume has nothing to do)."""
    import moectl.sweep.run as sweep_run

    sweep_project(git_repo)
    monkeypatch.chdir(git_repo)
    spec = write_spec(git_repo, 'name = "fin"\n[common]\nsteps = 3\nargs = ["--sleep-per-step", "0.01"]\n'
                      '[[legs]]\ntag = "a"\n[[legs]]\ntag = "b"\n')

    def die_in_the_final_stage(*args, **kwargs):
        raise _Died()

    with monkeypatch.context() as m:
        m.setattr(sweep_run, "_figures", die_in_the_final_stage)  # the first step of the final stage
        with pytest.raises(_Died):
            cli("sweep", str(spec), *QUIET)
    [sweep_dir] = sweep_dirs(artifact_root)
    rec = load(sweep_dir / "sweep.json")
    assert [leg["state"] for leg in rec["legs"]] == ["completed", "completed"] and rec["finished_at"] is None
    assert rec["pid"] == os.getpid()  # this test process ran it: make that moectl a dead one, as after a SIGKILL
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (sweep_dir / "sweep.json").write_text(json.dumps({**rec, "pid": gone.pid, "host": "elsewhere"}))
    # Run on another host: whether its moectl is still writing the report cannot be known here.
    r = cli("sweep", "--resume", rec["id"], *QUIET)
    assert r.exit_code == 3 and "ran on elsewhere and has not finished" in r.output, r.output
    rec = {**rec, "pid": gone.pid}
    (sweep_dir / "sweep.json").write_text(json.dumps(rec))
    assert "Final report not written" not in (git_repo / "EXPERIMENTS.md").read_text()  # written by the live sweep
    handoff = git_repo.parent / "handoff.md"
    r = cli("summary", "--no-commit", "-o", str(handoff))  # read now that its moectl is gone: the report is owed
    assert r.exit_code == 0, r.output
    assert f"Final report not written (its moectl ended first) — write it with `moectl sweep --resume {rec['id']}" \
        in handoff.read_text()
    report = Path(rec["report"])
    assert report.read_text().splitlines()[0] == "# Sweep fin — 2/2 legs completed"  # the last progress version
    head = git(git_repo, "rev-parse", "HEAD").strip()
    stale = report.read_bytes()
    r = cli("sweep", "--resume", rec["id"], "--dry-run", *QUIET)
    assert r.exit_code == 0 and f"the final report of {rec['id']} was never written" in r.output, r.output
    r = cli("sweep", "--resume", rec["id"], "--dry-run", "--json", *QUIET)
    assert json.loads(r.stdout)["final_report_owed"] is True and json.loads(r.stdout)["legs"] == []
    assert report.read_bytes() == stale  # a dry run writes nothing

    r = cli("sweep", "--resume", rec["id"], "--json", *QUIET)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["nothing_to_run"] is True and out["report"] == str(report)  # the same file, rewritten
    assert sweep_dirs(artifact_root) == [sweep_dir]  # no new -resume directory: no leg ran
    text = report.read_text()
    assert text.splitlines()[0] == "# Sweep fin — completed"
    assert "final report written by `moectl sweep --resume`" in text
    assert git(git_repo, "log", "--format=%s", "-1").startswith("report: sweep fin — completed, 2/2 legs")
    assert str(report.relative_to(git_repo)) in commit_files(git_repo, "HEAD")
    assert git(git_repo, "rev-list", "--count", f"{head}..HEAD").strip() == "1"
    assert "Final report not written" not in (git_repo / "EXPERIMENTS.md").read_text()
    done = load(sweep_dir / "sweep.json")
    assert done["finished_at"] is not None and done["report"] == str(report)

    r = cli("sweep", "--resume", rec["id"], "--json", *QUIET)  # finished now: nothing left, nothing written
    assert r.exit_code == 0 and json.loads(r.stdout)["nothing_to_run"] is True
    assert json.loads(cli("sweep", "--resume", rec["id"], "--dry-run", "--json").stdout)["final_report_owed"] is False
    assert git(git_repo, "rev-list", "--count", f"{head}..HEAD").strip() == "1"


def test_the_users_edits_to_a_sweep_report_are_never_overwritten_or_committed(git_repo, artifact_root, monkeypatch):
    """After leg 1's commit the user edits the sweep report (a line staged, another not): leg 2 and
    the end leave the file, its index entry and HEAD's copy exactly as they were, the sweep goes on
    and says once where its own report went instead. A resume owing the final report does the same."""
    import moectl.sweep.run as sweep_run

    sweep_project(git_repo)
    monkeypatch.chdir(git_repo)
    spec = write_spec(git_repo, 'name = "mine"\n[common]\nsteps = 3\nargs = ["--sleep-per-step", "0.01"]\n'
                      '[[legs]]\ntag = "a"\n[[legs]]\ntag = "b"\n')
    real_execute, calls, edited = sweep_run.execute_run, [], {}

    def edit_before_leg_2(cfg, request, **kwargs):
        calls.append(request)
        if len(calls) == 2:  # leg 1 ended and committed the report: now the user edits it
            [report] = (git_repo / "reports").glob("*_sweep_mine.md")
            assert git(git_repo, "status", "--porcelain", "--", str(report)) == ""  # committed by leg 1
            with report.open("a") as fh:
                fh.write("USER STAGED\n")
            git(git_repo, "add", str(report))
            with report.open("a") as fh:
                fh.write("USER UNSTAGED\n")
            rel = report.relative_to(git_repo).as_posix()
            edited.update(report=report, rel=rel, work=report.read_bytes(), index=git(git_repo, "show", f":{rel}"),
                          head=git(git_repo, "show", f"HEAD:{rel}"))
        return real_execute(cfg, request, **kwargs)

    monkeypatch.setattr(sweep_run, "execute_run", edit_before_leg_2)
    r = cli("sweep", str(spec), "--json", *QUIET)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    report, rel = edited["report"], edited["rel"]

    def as_the_user_left_it():
        assert report.read_bytes() == edited["work"]
        assert git(git_repo, "show", f":{rel}") == edited["index"]
        assert git(git_repo, "show", f"HEAD:{rel}") == edited["head"]
        assert git(git_repo, "status", "--porcelain", "--", rel) == f"MM {rel}\n"

    as_the_user_left_it()
    assert [leg["state"] for leg in out["sweep"]["legs"]] == ["completed", "completed"]
    copy = Path(out["sweep"]["exp_dir"]) / "sweep_report.md"
    assert out["report_copy"] == str(copy) and copy.read_text().startswith("# Sweep mine — completed")
    said = [m for m in out["messages"] if m.startswith(f"sweep report {report} ")]
    assert len(said) == 1 and "left exactly as you have it" in said[0] and str(copy) in said[0]
    assert "has changes staged in the index" in said[0]
    # the legs' own reports and EXPERIMENTS.md were still committed; the sweep report never again
    assert git(git_repo, "log", "--format=%s", "-1").startswith("report: sweep mine — completed")
    assert rel not in commit_files(git_repo, "HEAD") and rel not in commit_files(git_repo, "HEAD~1")

    # A resume that owes the final report (its moectl died in the final stage): the same.
    [sweep_dir] = sweep_dirs(artifact_root)
    rec = load(sweep_dir / "sweep.json")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (sweep_dir / "sweep.json").write_text(json.dumps({**rec, "pid": gone.pid, "finished_at": None}))
    copy.unlink()
    r = cli("sweep", "--resume", rec["id"], "--json", *QUIET)
    assert r.exit_code == 0, r.output
    resumed = json.loads(r.stdout)
    as_the_user_left_it()
    assert resumed["report_copy"] == str(copy) and "final report written by `moectl sweep --resume`" in copy.read_text()
    assert sum(m.startswith(f"sweep report {report} ") for m in resumed["messages"]) == 1
    assert load(sweep_dir / "sweep.json")["finished_at"] is not None


@pytest.mark.slow
def test_a_branch_switched_while_a_leg_trains_keeps_the_leg_state_true_and_the_branch_untouched(
        git_repo, artifact_root, monkeypatch):
    """`git switch -c feature` while leg 1 trains: leg 1 completes and sweep.json says so (its state
    was set only with the sweep report, which is skipped off the project branch); leg 2 is refused
    by the git guard; neither the sweep report nor EXPERIMENTS.md is written into the feature
    branch's tree (the report goes to the sweep's directory); back on main, the resume runs leg 2
    and writes and commits the sweep's report."""
    sweep_project(git_repo)
    monkeypatch.chdir(git_repo)
    gate = git_repo.parent / "switch.gate"
    spec = write_spec(git_repo, 'name = "sw"\n[common]\nsteps = 4\n'
                      '[[legs]]\ntag = "one"\n'
                      f'args = ["--sleep-per-step", "0.02", "--hold-at-step", "2", "--hold-until", "{gate}"]\n'
                      '[[legs]]\ntag = "two"\nargs = ["--sleep-per-step", "0.02"]\n')
    git(git_repo, "add", "spec.toml")
    git(git_repo, "commit", "-q", "-m", "spec")
    out = git_repo.parent / "sweep-sw.out"
    proc = _spawn_sweep(git_repo, out, str(spec), *QUIET)
    try:
        wait_for(Path(f"{gate}.waiting").exists, "leg 1 training", 120, proc=proc, output=out.read_text)
        git(git_repo, "checkout", "-q", "-b", "feature")
        gate.touch()
        proc.wait(timeout=180)  # a bound against a hang, not a latency check
    finally:
        if proc.poll() is None:
            stop_process(proc)
    output = out.read_text()
    assert proc.returncode == 3, output
    [sweep_dir] = sweep_dirs(artifact_root)
    record = load(sweep_dir / "sweep.json")
    legs = record["legs"]
    assert [leg["state"] for leg in legs] == ["completed", "pending"], output
    assert load(sweep_dir / legs[0]["run_id"] / "run.json")["status"] == "completed"
    assert record["finished_at"] is None  # a resume finishes it
    # the feature branch's tree: only leg 1's own run report (named, with `moectl commit`), nothing else
    status = git(git_repo, "status", "--porcelain", "--untracked-files=all").splitlines()
    assert [line for line in status if "sweep" in line or "EXPERIMENTS" in line] == [], status
    assert (sweep_dir / "sweep_report.md").exists()
    assert f"moectl sweep --resume {record['id']}` on branch 'main' writes and commits it" in output, output

    git(git_repo, "checkout", "-q", "main")
    r = cli("sweep", "--resume", record["id"], *QUIET)
    assert r.exit_code == 0, r.output
    [resumed] = [d for d in sweep_dirs(artifact_root) if d != sweep_dir]
    assert [leg["state"] for leg in load(resumed / "sweep.json")["legs"]] == ["completed", "completed"]
    committed = commit_files(git_repo, "HEAD")
    assert any("sweep" in f for f in committed) and "EXPERIMENTS.md" in committed, committed


def test_ctrl_c_while_the_sweep_report_is_written_keeps_the_legs_report_named_and_committable(
        git_repo, artifact_root, monkeypatch):
    """A real SIGINT at the moment after a leg's report was written, while the sweep's own report
    is being written: the run record still names its report and how to commit it, the sweep says
    so and exits 130, and `moectl commit RUN` then commits exactly that report."""
    import moectl.sweep.run as sweep_run

    sweep_project(git_repo)
    monkeypatch.chdir(git_repo)
    real = sweep_run.write_sweep_report
    calls = []

    def interrupted_while_writing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:  # after leg 1's report: the signal lands here, as Ctrl-C would
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the KeyboardInterrupt is raised in here
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep_run, "write_sweep_report", interrupted_while_writing)
    spec = write_spec(git_repo, 'name = "ci"\n[common]\nsteps = 3\n[[legs]]\ntag = "one"\n[[legs]]\ntag = "two"\n')
    r = cli("sweep", str(spec), *QUIET)
    assert r.exit_code == 130, r.output
    [sweep_dir] = sweep_dirs(artifact_root)
    legs = load(sweep_dir / "sweep.json")["legs"]
    assert [leg["state"] for leg in legs] == ["completed", "pending"]
    run = load(sweep_dir / legs[0]["run_id"] / "run.json")
    assert run["report"] and Path(run["report"]).exists() and run["commit"] is None
    assert f"moectl commit {run['id']}" in run["commit_error"] and f"moectl commit {run['id']}" in r.output
    r = cli("commit", run["id"])
    assert r.exit_code == 0, r.output
    assert Path(run["report"]).relative_to(git_repo).as_posix() in commit_files(git_repo, "HEAD")


def test_a_sweep_named_whose_record_is_corrupt_is_said_corrupt_not_unknown(tmp_path):
    from moectl.sweep.store import resolve_sweep

    d = tmp_path / "20261127_000000_moe-fails2"
    d.mkdir()
    (d / "sweep.json").write_text('{"id": "20261127_000000_moe-fails2", "name": ')  # cut short
    for ref in ("fails2", d.name, str(d)):
        with pytest.raises(UsageError, match=r"corrupt .*sweep\.json"):
            resolve_sweep(tmp_path, ref)
    with pytest.raises(UsageError, match="no sweep matches 'other'"):
        resolve_sweep(tmp_path, "other")


def test_two_sweeps_whose_legs_share_run_ids_each_find_their_own_runs(git_repo, artifact_root, monkeypatch):
    # Two sweeps started in the same second with the same leg tags give their legs the same run
    # ids, each in its own sweep directory: `wait`/`cancel SWEEP` acted on the other sweep's runs,
    # and waiting on both returned two runs of four.
    from moectl.records import GitInfo, RunRecord, SweepLeg, SweepRecord, save_model
    from moectl.store import save_run
    from moectl.summary import render_summary
    from moectl.config import load_config

    sweep_project(git_repo)
    monkeypatch.chdir(git_repo)
    dirs = {}
    for name in ("tx", "ty"):
        d = artifact_root / f"20260102_100000_moe-{name}"
        legs = []
        for tag in ("twa", "twb"):
            rid = f"20260102_100001_moe-{tag}"
            (d / rid).mkdir(parents=True)
            save_run(RunRecord(id=rid, tag=tag, status="completed", created_at="2026-01-02T10:00:01+00:00",
                               finished_at="2026-01-02T10:05:00+00:00", exit_code=0, sweep=d.name,
                               git=GitInfo(branch="main"), exp_dir=str(d / rid), notes=f"of {name}"))
            legs.append(SweepLeg(tag=tag, state="completed", run_id=rid))
        save_model(d / "sweep.json", SweepRecord(id=d.name, name=name, spec={}, legs=legs,
                                                 created_at="2026-01-02T10:00:00+00:00", exp_dir=str(d)))
        dirs[name] = d
    for name, d in dirs.items():
        r = cli("wait", d.name, "--json")
        assert r.exit_code == 0, r.output
        assert sorted(x["exp_dir"] for x in json.loads(r.stdout)) == sorted(str(d / x) for x in
                                                                          ("20260102_100001_moe-twa", "20260102_100001_moe-twb"))
    r = cli("wait", dirs["tx"].name, dirs["ty"].name, "--json")
    assert r.exit_code == 0 and len(json.loads(r.stdout)) == 4, r.output
    # EXPERIMENTS.md counts each sweep's own legs
    text = render_summary(load_config(None))
    assert "### tx (2/2 legs completed)" in text and "### ty (2/2 legs completed)" in text


@pytest.mark.parametrize("flag, said", [
    (("--fail-fast",), "--fail-fast: not with --slurm: the legs go to Slurm together and run side by side "
                       "(`moectl cancel SWEEP` stops the rest)"),
    (("--wait-gpus", "2m"), "--wait-gpus: not with --slurm: Slurm decides when each job starts, and a job checks "
                            "the GPUs it was given once, on its node"),
])
def test_sweep_flags_a_slurm_sweep_cannot_honour_are_refused_not_ignored(git_repo, artifact_root, monkeypatch,
                                                                         slurm_answers, flag, said):
    # Both were accepted and ignored: the legs ran on after a failed one; each job looked at its GPUs once.
    sweep_project(git_repo)
    monkeypatch.chdir(git_repo)
    spec = write_spec(git_repo, 'name = "ff"\n[[legs]]\ntag = "a"\nsteps = 2\n[[legs]]\ntag = "b"\nsteps = 2\n')
    r = cli("sweep", str(spec), "--slurm", *flag)
    assert r.exit_code == 2 and r.stderr.strip() == f"error: {said}", r.output
    assert not artifact_root.exists()


def test_run_slurm_with_wait_gpus_is_refused_not_ignored(git_repo, artifact_root, monkeypatch, slurm_answers):
    sweep_project(git_repo)
    monkeypatch.chdir(git_repo)
    r = cli("run", "--slurm", "--wait-gpus", "2m", "--steps", "2")
    assert r.exit_code == 2 and r.stderr.strip() == (
        "error: --wait-gpus: not with --slurm: Slurm decides when the job starts, and the job checks the GPUs it "
        "was given once, on its node"), r.output
    assert not artifact_root.exists()


def test_a_slurm_sweep_whose_report_job_ended_without_the_report_gets_it_from_resume_and_wait_says_so(
        git_repo, artifact_root, monkeypatch, slurm_answers):
    # Its final-report job cancelled (or failed): `wait` ended 0 without a word, and `sweep --resume`
    # said "nothing left to run" - the sweep report could never be written.
    import shutil

    from moectl.records import GitInfo, RunRecord, SweepLeg, SweepRecord, save_model
    from moectl.store import save_run

    sweep_project(git_repo)
    monkeypatch.chdir(git_repo)
    d = artifact_root / "20260102_100000_moe-rj"
    legs = []
    for tag in ("a", "b"):
        rid = f"20260102_100001_moe-{tag}"
        (d / rid).mkdir(parents=True)
        shutil.copyfile(MOECTL_ROOT / "tests" / "fixtures" / "metrics_small.jsonl", d / rid / "metrics.jsonl")
        save_run(RunRecord(id=rid, tag=tag, status="completed", created_at="2026-01-02T10:00:01+00:00",
                           finished_at="2026-01-02T10:05:00+00:00", exit_code=0, sweep=d.name, backend="slurm",
                           job_id=str(500 + len(legs)), git=GitInfo(branch="main"), exp_dir=str(d / rid)))
        legs.append(SweepLeg(tag=tag, state="completed", run_id=rid))
    save_model(d / "sweep.json", SweepRecord(id=d.name, name="rj", spec={}, legs=legs, report_job="555",
                                             created_at="2026-01-02T10:00:00+00:00", exp_dir=str(d),
                                             pid=2**22 + 7, host="elsewhere-login"))
    r = cli("wait", d.name)  # (the fake Slurm knows no job: the report job has ended)
    # Exit 0, the legs' code (SPEC §8), so the line is a warning: it said `error:` and exited 0.
    assert r.exit_code == 0, r.output
    assert r.stderr.splitlines() == [f"warning: sweep {d.name}: its final-report job 555 ended without writing the "
                                     f"sweep report; `moectl sweep --resume {d.name} --slurm` writes it"], r.stderr
    r = cli("sweep", "--resume", d.name, "--dry-run", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["final_report_owed"] is True, r.output
    r = cli("sweep", "--resume", d.name)
    assert r.exit_code == 0, r.output
    assert "its final report was never written; writing it now" in r.output
    done = json.loads((d / "sweep.json").read_text())
    assert done["finished_at"] and done["report"] and Path(done["report"]).is_file()
    assert Path(done["report"]).relative_to(git_repo).as_posix() in git(git_repo, "show", "--name-only", "--format=", "HEAD")
