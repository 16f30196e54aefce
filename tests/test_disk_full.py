"""A disk that fills, or a run directory that turns read-only, around a real `moectl run` (audit K):
the run's end is still recorded, or said with its run, its run.json and what the training did;
one that cannot start leaves no half-made directory; every write error names its file.

The full disk is a real one: a small tmpfs, mounted for the test (root only, as CI runs: skipped
where mount is not permitted) and filled by the trainer itself, so it fills exactly when its
training ends. Errors of a single write come from RLIMIT_FSIZE instead (no root needed): a write
past it fails with EFBIG, through the same code as ENOSPC.
"""
from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.schema import StepMetrics, to_line
from moectl.atomic import atomic_file
from moectl.cli import app
from tests.conftest import git
from tests.test_export import make_run, steps_of
from tests.test_run import QUIET, REPO, commit_config, record, run_dirs

runner = CliRunner()


@pytest.fixture
def small_fs(tmp_path):
    """mount(size) -> a fresh tmpfs of that size; unmounted after the test."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs (a real full disk) needs root; CI runs the suite as root")
        where = tmp_path / f"small{len(mounted)}"
        where.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"mount is not permitted here ({r.stderr.strip() or r.returncode}): a real full disk needs it")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


LINES = "".join(to_line(StepMetrics(step=i, loss=3.0 - i / 10, dt_ms=10.0, tok_per_sec=1000.0, elapsed_s=0.01 * (i + 1))) + "\n"
                for i in range(3))

# A trainer of the user's own that writes its metrics, then fills the disk (or makes its run directory read-only)
# and exits with EXIT: its end is the first thing moectl must write on a disk with no room.
TRAINER = '''import os, subprocess, sys
out = sys.argv[sys.argv.index("--out") + 1]
with open(os.path.join(out, "metrics.jsonl"), "w") as fh:
    fh.write({lines!r})
if {end!r} == "fill":
    try:
        with open(os.path.join({disk!r}, "filler"), "wb", buffering=0) as fh:
            while True:
                fh.write(bytes(4096))
    except OSError:
        pass
else:
    # its run directory, read-only from here on (moectl's open train.log keeps the disk busy)
    subprocess.run(["mount", "--bind", out, out], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", out], check=True)
sys.exit({exit})
'''


def own_trainer_project(repo: Path, monkeypatch, disk: Path, end: str, exit: int) -> None:
    (repo / "train.py").write_text(TRAINER.format(lines=LINES, disk=str(disk), end=end, exit=exit))
    (repo / ".moectl.toml").write_text(
        '[project]\nname = "own"\nbranch = "main"\nvenv = ""\n\n[paths]\nmin_free_gib = 0.0\n\n'
        '[launch]\nscript = "train.py"\nlauncher = "python"\n\n[launch.options]\nout_dir = "--out {}"\n\n'
        '[metrics]\nsource = "jsonl"\n')
    git(repo, "add", "train.py")
    commit_config(repo, monkeypatch)
    monkeypatch.setenv("MOECTL_ARTIFACT_ROOT", str(disk / "exp"))


@pytest.mark.parametrize("trainer_exit, status, code", [(0, "completed", 0), (1, "failed", 4)])
def test_a_disk_that_fills_as_the_training_ends_still_gets_the_runs_end(git_repo, monkeypatch, small_fs,
                                                                      trainer_exit, status, code):
    """The disk filled (by the trainer here; checkpoints, anyone's files in life) before moectl wrote
    the run's end: `error: No space left on device`, exit 2, run.json left `running` and later read as
    a killed moectl. The room held for the last record (store.reserve_space) takes it."""
    disk = small_fs("1m")
    own_trainer_project(git_repo, monkeypatch, disk, "fill", trainer_exit)
    result = runner.invoke(app, ["run", "--device", "cpu", "--no-commit", *QUIET])
    assert result.exit_code == code, result.output
    [exp] = run_dirs(disk / "exp")
    rec = record(exp)
    assert rec["status"] == status and rec["exit_code"] == trainer_exit
    assert rec["summary"] is not None
    assert not (exp / ".moectl-reserve").exists()  # (store.RESERVE) given back: the disk is as full as the trainer left it


@pytest.mark.parametrize("trainer_exit, said, code", [(0, "completed", 2), (1, "failed (exit 1)", 4)])
def test_a_run_whose_end_cannot_be_written_says_which_run_and_what_its_training_did(
        git_repo, monkeypatch, small_fs, trainer_exit, said, code):
    """A run directory that turned read-only while it trained: nothing can record the end. It was
    `error: …/run.json: Read-only file system`, exit 2, for a training that failed too (SPEC §8: 4)."""
    disk = small_fs("1m")
    own_trainer_project(git_repo, monkeypatch, disk, "readonly", trainer_exit)
    result = runner.invoke(app, ["run", "--device", "cpu", "--no-commit", *QUIET])
    assert result.exit_code == code, result.output
    [exp] = run_dirs(disk / "exp")
    assert record(exp)["status"] == "running"  # whole, as it was: an atomic write changes nothing when it fails
    line = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert line == [f"error: run {exp.name}: its training {said}, but its record could not be written "
                    f"({exp / 'run.json'}: Read-only file system): run.json still says `running` and no report "
                    "was written"], result.output
    assert not (git_repo / "reports").exists()


def test_a_sweep_whose_leg_cannot_be_recorded_ends_with_its_resume_command(git_repo, monkeypatch, small_fs):
    disk = small_fs("1m")
    own_trainer_project(git_repo, monkeypatch, disk, "readonly", 1)
    spec = git_repo / "s.toml"
    spec.write_text('name = "ro"\n[[legs]]\ntag = "a"\n[[legs]]\ntag = "b"\n')
    result = runner.invoke(app, ["sweep", str(spec), "--no-commit", *QUIET])
    assert result.exit_code == 4, result.output
    [sweep_dir] = (disk / "exp").iterdir()
    assert "its training failed (exit 1), but its record could not be written" in result.output
    assert f"the sweep stopped at leg a; resume it in a fresh directory: moectl sweep --resume {sweep_dir.name}" \
        in result.output


def test_a_run_that_cannot_write_its_first_files_leaves_no_half_made_directory(git_repo, monkeypatch, small_fs):
    """A page for the run lock, none for command.txt: it left command.txt (empty), git.diff and an
    empty ckpt_root/ with no run.json, a directory no `moectl runs` lists or cleans, after an
    `error: No space left on device` naming nothing."""
    disk = small_fs("4k")
    own_trainer_project(git_repo, monkeypatch, disk, "fill", 0)
    result = runner.invoke(app, ["run", "--device", "cpu", "--no-commit", *QUIET])
    assert result.exit_code == 2, result.output
    [line] = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    name = line.split()[2]
    exp = disk / "exp" / name
    assert line == f"error: run {name} did not start: {exp / 'command.txt'}: No space left on device; {exp} is removed"
    assert list((disk / "exp").iterdir()) == []  # (the run lock went too)


def test_a_run_that_cannot_write_git_diff_but_can_its_record_is_listed_failed(git_repo, monkeypatch, small_fs):
    """Room for a record, not for a large git.diff: the record says why, and the error which run."""
    disk = small_fs("12k")
    own_trainer_project(git_repo, monkeypatch, disk, "fill", 0)
    (git_repo / "dirty.txt").write_text("x" * 6000)  # git.diff holds it: two pages, one free
    git(git_repo, "add", "dirty.txt")
    result = runner.invoke(app, ["run", "--device", "cpu", "--no-commit", *QUIET])
    assert result.exit_code == 2, result.output
    [exp] = run_dirs(disk / "exp")
    rec = record(exp)
    assert rec["status"] == "failed" and "No space left on device" in rec["error"] and str(exp / "git.diff") in rec["error"]
    [line] = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert line == f"error: run {exp.name} did not start: {exp / 'git.diff'}: No space left on device; its record says so"


def limited(limit: int):
    """preexec_fn: writes past `limit` bytes fail with EFBIG (not SIGXFSZ)."""
    def set_limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return set_limit


def in_child(code: str, limit: int = 4096) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, preexec_fn=limited(limit),
                          env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)


@pytest.mark.parametrize("call", ["write_text_atomic(p, 'x' * 20000)", "create_new_file(p, 'x' * 20000)",
                                  "atomic_file_write(p)"])
def test_a_write_that_fails_names_its_file(tmp_path, call):
    """write/flush errors named nothing (`error: File too large`, `No space left on device`)."""
    target = tmp_path / "out.json"
    r = in_child("import errno, sys\nfrom pathlib import Path\n"
                 "from moectl.atomic import atomic_file, create_new_file, write_text_atomic\n"
                 "def atomic_file_write(p):\n"
                 "    with atomic_file(p, 'wb') as fh:\n"
                 "        fh.write(b'x' * 3000)\n"
                 "        fh.write(b'y' * 3000)\n"
                 f"p = Path({str(target)!r})\n"
                 f"try:\n    {call}\n"
                 "except OSError as exc:\n    print(exc.errno == errno.EFBIG, exc.filename, exc.strerror)\n")
    assert r.stdout.split(" ", 2) == ["True", str(target), "File too large\n"], r.stdout + r.stderr
    assert os.listdir(tmp_path) == []  # no temp file left, no half file


def test_an_error_inside_the_block_keeps_its_own_name(tmp_path):
    """Only the temp file's own errors are renamed: export writes two at once, and the one that
    failed is the one said."""
    other = tmp_path / "other.csv"
    with pytest.raises(OSError) as exc:
        with atomic_file(tmp_path / "a.csv"):
            raise OSError(errno.ENOSPC, "No space left on device", str(other))
    assert exc.value.filename == str(other)


def test_export_on_a_full_disk_names_the_file_and_leaves_no_empty_directory(project, artifact_root, tmp_path):
    make_run(artifact_root, "big", 1, steps_of(200, seed=1))
    out = tmp_path / "new" / "csv"
    r = subprocess.run([sys.executable, "-m", "moectl", "export", "big", "--csv", str(out)], capture_output=True,
                       text=True, preexec_fn=limited(4096), cwd=project, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip() == f"error: {out / 'steps.csv'}: File too large", r.stderr
    assert not (tmp_path / "new").exists()


def test_a_record_that_cannot_take_the_reports_place_after_the_runs_end_keeps_the_runs_outcome(tmp_path):
    # A disk that went on filling after the run's end was saved (the room held for it given back):
    # the save of the report's place (or of why there is none) raised, and `moectl run` ended in
    # `error: …/run.json: No space left on device`, exit 2, for a run whose own exit code was 4.
    # A run directory that is a file by then fails the same save, with a real OSError.
    from moectl import store
    from moectl.records import RunRecord
    from moectl.runner import RunOutcome, _save_late

    gone = tmp_path / "run"
    gone.write_text("not a directory any more")
    record = RunRecord(id="r", tag="t", status="failed", created_at=store.now_iso(), exp_dir=str(gone))
    why = "cannot write the report reports/r.md: No space left on device; the run is recorded: ..."
    outcome = RunOutcome(exit_code=4, plan=None, guards=[], record=record, commit_error=why)
    _save_late(outcome, lambda: store.save_run(record))
    assert outcome.exit_code == 4 and outcome.commit_error.startswith(why + "; run.json does not say so (")
    assert str(gone) in outcome.commit_error
    quiet = RunOutcome(exit_code=0, plan=None, guards=[], record=record, commit="abc123")  # committed: found again later
    _save_late(quiet, lambda: store.save_run(record))
    assert quiet.commit_error is None
    unsaid = RunOutcome(exit_code=0, plan=None, guards=[], record=record)
    _save_late(unsaid, lambda: store.save_run(record))
    assert unsaid.commit_error.startswith("run.json does not say so (")
