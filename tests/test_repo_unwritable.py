"""A repository moectl cannot write when a run, a sweep or `moectl summary` ends: git's own files
(a read-only `.git`, a directory where moectl's lock note goes), the report (a full disk, a file
where report_dir should be), EXPERIMENTS.md and its note. The run is over and recorded: its exit
code stands, the record and one error line say what is missing and which command finishes it; a
sweep goes on with its legs; `moectl summary` leaves EXPERIMENTS.md as it was, with the SPEC §8
code of the condition (2 a full disk, 3 a repository that refused).

Real git repositories, real torchrun with the fake engine (test_run's project). Where a trick
without privileges reaches the same code (a directory in a file's way, RLIMIT_FSIZE), it is used;
the real conditions - a read-only bind mount of `.git`, a full tmpfs - need mount(8), i.e. root
(as CI runs), and are skipped with the reason elsewhere.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moectl.cli import app
from tests.conftest import git, wait_for
from tests.test_run import commit_config, write_config

REPO = Path(__file__).resolve().parents[1]
QUIET = ["--override", "no_other_training"]  # other sessions may train on this machine
OWNER_NOTE = "moectl-index.lock.owner"  # gitops.OWNER_NAME: written as the index lock is taken
NOTE_LOG = "moectl-summary-written"  # summary.WRITTEN_LOG
runner = CliRunner()


class Mounts:
    """mount(8) for a test, undone at its end; the test is skipped (saying why) where mounting is
    not permitted."""

    def __init__(self):
        self.done: list[Path] = []

    def mount(self, target: Path, *args: str) -> None:
        r = subprocess.run(["mount", *args, str(target)], capture_output=True, text=True)
        if r.returncode != 0:
            said = " ".join(r.stderr.split()) or f"exit {r.returncode}"
            pytest.skip(f"`mount {' '.join(args)}` is not permitted here ({said}): a real read-only or full "
                        "file system needs root (CAP_SYS_ADMIN), as CI runs")
        self.done.append(target)

    def read_only(self, directory: Path) -> None:
        """`directory` read-only: bound onto itself, the binding remounted read-only."""
        self.mount(directory, "--bind", str(directory))
        subprocess.run(["mount", "-o", "remount,bind,ro", str(directory)], check=True)

    def undo(self, target: Path) -> None:
        self.done.remove(target)
        subprocess.run(["umount", str(target)], check=True)


@pytest.fixture
def mounts():
    m = Mounts()
    yield m
    for target in reversed(m.done):
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def full_tmpfs(directory: Path, mount, free_pages: int = 0) -> Path:
    """`directory` (made empty) on its own small tmpfs, filled up but for `free_pages` 4 KiB pages;
    returns the file to remove for room."""
    directory.mkdir(parents=True, exist_ok=True)
    mount.mount(directory, "-t", "tmpfs", "-o", "size=256k", "tmpfs")
    return fill(directory, free_pages)


def fill(directory: Path, free_pages: int = 0) -> Path:
    filler = directory / ".filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:  # (ENOSPC: full)
        pass
    finally:
        os.close(fd)
    if free_pages:
        os.truncate(filler, max(0, os.stat(filler).st_size - free_pages * 4096))
    return filler


@pytest.fixture
def proj(git_repo: Path, monkeypatch) -> Path:
    write_config(git_repo)
    return commit_config(git_repo, monkeypatch)


def head(repo: Path) -> str:
    return git(repo, "rev-parse", "HEAD").strip()


def the_run(artifact_root: Path, tag: str) -> dict:
    [found] = list(artifact_root.glob(f"**/*_moe-{tag}/run.json"))
    return json.loads(found.read_text())


def error_lines(stderr: str, start: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(start)]


# ------------------------------------------------------------------------------ run: git unwritable


@pytest.mark.parametrize("how", ["note_in_the_way", "read_only_git"])
def test_a_run_whose_commit_cannot_write_git_keeps_its_report_and_its_exit_code(proj, artifact_root, mounts, how):
    # Was: `error: .../.git/index.lock: Read-only file system`, exit 2, no `completed:` line, and a
    # record with neither report nor commit_error - as if the run had failed. A full `.git` (git's
    # own error) already took the path of any commit that fails; an OSError from the index lock now does.
    before = head(proj)
    if how == "read_only_git":
        mounts.read_only(proj / ".git")
    else:  # the lock note cannot be renamed into place: an OSError as the lock is taken, for anyone
        (proj / ".git" / OWNER_NOTE).mkdir()
    r = runner.invoke(app, ["run", "--steps", "3", "--tag", "rogit", *QUIET])
    rec = the_run(artifact_root, "rogit")
    assert r.exit_code == 0, r.output  # the run completed: SPEC §8's code is the run's
    assert rec["status"] == "completed" and f"completed: {rec['id']}" in r.stdout and "tail" in r.stdout
    [line] = error_lines(r.stderr, "error: report not committed: ")
    reason = "Read-only file system" if how == "read_only_git" else "Is a directory"
    assert f"{proj}/.git/" in line and reason in line, line
    assert line.endswith(f"; the report is kept: commit it with `moectl commit {rec['id']}` once that is resolved")
    assert "Traceback" not in r.output and len(error_lines(r.stderr, "error: ")) == (2 if how == "read_only_git" else 1)
    assert rec["commit"] is None and line == f"error: report not committed: {rec['commit_error']}"
    report = Path(rec["report"])
    assert report.is_file() and report.parent == proj / "reports"
    # Nothing of moectl's left changed in the tree but the kept report: EXPERIMENTS.md put back (it
    # was not there), or - its note in the read-only .git impossible - never written.
    assert head(proj) == before and not (proj / "EXPERIMENTS.md").exists()
    assert git(proj, "status", "--porcelain", "--untracked-files=all") == f"?? reports/{report.name}\n"
    if how == "read_only_git":
        assert "EXPERIMENTS.md not refreshed: " in r.stderr and NOTE_LOG in r.stderr
        mounts.undo(proj / ".git")
    else:
        (proj / ".git" / OWNER_NOTE).rmdir()
    c = runner.invoke(app, ["commit", rec["id"]])
    assert c.exit_code == 0, c.output
    assert f"reports/{report.name}" in git(proj, "show", "--name-only", "--format=", "HEAD")
    assert git(proj, "status", "--porcelain") == ""


# ------------------------------------------------------------------------ run: report unwritable


@pytest.mark.parametrize("how", ["report_dir_replaced_while_training", "full_disk"])
def test_a_run_whose_report_cannot_be_written_is_still_completed_and_says_how_to_finish(proj, artifact_root,
                                                                                        tmp_path, mounts, how):
    # Was: `error: No space left on device`, exit 2, no path, no `completed:` line and no hint.
    held = []
    if how == "full_disk":
        filler = full_tmpfs(proj / "reports", mounts)
    else:  # past the paths guard (which refuses a report_dir that is not a directory), a file in its place
        gate = tmp_path / "go"
        held = ["--", "--hold-at-step", "0", "--hold-until", str(gate)]

        def replace_report_dir():
            wait_for(Path(f"{gate}.waiting").exists, "the run training, held", 120)
            (proj / "reports").write_text("not a directory\n")
            gate.touch()

        threading.Thread(target=replace_report_dir, daemon=True).start()
    r = runner.invoke(app, ["run", "--steps", "3", "--tag", "rfull", *QUIET, *held])
    rec = the_run(artifact_root, "rfull")
    assert r.exit_code == 0, r.output
    assert rec["status"] == "completed" and f"completed: {rec['id']}" in r.stdout and "tail" in r.stdout
    [line] = error_lines(r.stderr, "error: ")
    if how == "full_disk":  # the report's own path, though the write that failed named none
        [name] = [n for n in line.split() if n.startswith(f"{proj}/reports/")]
        assert name.endswith("_rfull.md:") and "No space left on device" in line, line
        assert [p.name for p in (proj / "reports").iterdir()] == [filler.name]  # no half-written report
    else:
        assert f"cannot write the report {proj}/reports: File exists" in line, line
    assert line.startswith("error: report not committed: cannot write the report ")
    assert line.endswith(f"the run is recorded: `moectl commit {rec['id']}` writes its report and commits it "
                         "once that is resolved")
    assert (rec["report"], rec["commit"]) == (None, None) and line == f"error: report not committed: {rec['commit_error']}"
    # Room again: the hint works (in this very process, which ran the run: it no longer writes the report).
    if how == "full_disk":
        filler.unlink()
    else:
        (proj / "reports").unlink()
    c = runner.invoke(app, ["commit", rec["id"]])
    assert c.exit_code == 0 and "could not be written then" in c.stderr, c.output
    [written] = (proj / "reports").glob("*_rfull.md")
    assert f"reports/{written.name}" in git(proj, "show", "--name-only", "--format=", "HEAD")


# ----------------------------------------------------------------------------------------- sweep


@pytest.mark.parametrize("how", ["note_in_the_way", "full_disk"])
def test_a_sweep_goes_on_past_legs_whose_reports_cannot_be_committed_and_ends_with_its_resume(proj, artifact_root,
                                                                                             tmp_path, mounts, how):
    # Was: exit 2 after the first leg (`error: .../index.lock: Read-only file system`, or `No space
    # left on device`), the second leg `pending`, no resume command, two reports nobody accounted for.
    spec = tmp_path / "two.toml"
    spec.write_text('name = "rfill"\n[common]\nsteps = 3\n[[legs]]\ntag = "ra"\n[[legs]]\ntag = "rb"\n')
    before = head(proj)
    if how == "note_in_the_way":
        (proj / ".git" / OWNER_NOTE).mkdir()
    else:
        filler = full_tmpfs(proj / "reports", mounts)
    r = runner.invoke(app, ["sweep", str(spec), *QUIET, "--quiet"])
    assert r.exit_code == 0, r.output  # every leg completed; only commits are missing
    [sweep_json] = list(artifact_root.glob("*_moe-rfill/sweep.json"))
    sweep = json.loads(sweep_json.read_text())
    assert [leg["state"] for leg in sweep["legs"]] == ["completed", "completed"] and sweep["finished_at"] is None
    for leg in sweep["legs"]:
        rec = json.loads((sweep_json.parent / leg["run_id"] / "run.json").read_text())
        assert rec["commit"] is None and f"`moectl commit {rec['id']}`" in rec["commit_error"]
        assert f"note: leg {leg['tag']}: report not committed: {rec['commit_error']}" in r.stdout
    assert f"write it: moectl sweep --resume {sweep['id']}" in r.stdout
    assert "Traceback" not in r.output and head(proj) == before
    if how == "note_in_the_way":  # the sweep's report is written, its commit refused like the legs'
        assert "note: sweep report not committed: " in r.stdout
    else:  # neither the legs' reports nor the sweep's could be written: the resume writes the latter
        assert f"note: sweep report not written: {proj}/reports/" in r.stdout and "No space left" in r.stdout
        assert [p.name for p in (proj / "reports").iterdir()] == [filler.name]
    # Nothing else of moectl's left changed: EXPERIMENTS.md put back each time (it was not there).
    assert not (proj / "EXPERIMENTS.md").exists()

    if how == "note_in_the_way":
        (proj / ".git" / OWNER_NOTE).rmdir()
    else:
        filler.unlink()
    for leg in sweep["legs"]:
        assert runner.invoke(app, ["commit", leg["run_id"]]).exit_code == 0
    resumed = runner.invoke(app, ["sweep", "--resume", sweep["id"], *QUIET, "--quiet"])
    assert resumed.exit_code == 0 and "final report was never written; writing it now" in resumed.stdout, resumed.output
    assert json.loads(sweep_json.read_text())["finished_at"] is not None
    assert git(proj, "status", "--porcelain", "--untracked-files=all") == ""


# ---------------------------------------------------------------------------------------- summary


def summary_project(repo: Path, monkeypatch) -> Path:
    from tests.test_summary import summary_project as project

    project(repo, monkeypatch)
    r = runner.invoke(app, ["summary"])  # the shipped EXPERIMENTS.md, committed
    assert r.exit_code == 0, r.output
    from moectl import store
    from engine.schema import StepMetrics

    store.import_run(Path(os.environ["MOECTL_ARTIFACT_ROOT"]), "moe", "later", [
        StepMetrics(step=0, loss=2.0, dt_ms=5.0, tok_per_sec=999.0, elapsed_s=1.0)], window=5)  # news to write
    os.utime(repo / "EXPERIMENTS.md", ns=(1_000_000_000, 1_000_000_000))  # any rewrite shows
    return repo / "EXPERIMENTS.md"


def as_it_was(repo: Path, doc: Path, shipped: bytes) -> bool:
    return (doc.read_bytes() == shipped and doc.stat().st_mtime_ns == 1_000_000_000
            and git(repo, "status", "--porcelain") == "")


@pytest.mark.parametrize("how", ["note_in_the_way", "read_only_git"])
def test_summary_whose_git_cannot_be_written_leaves_experiments_md_as_it_was(git_repo, artifact_root, monkeypatch,
                                                                           mounts, how):
    # Was: exit 2 with `.git/index.lock: Read-only file system`, EXPERIMENTS.md left rewritten and,
    # its note unsaved in the read-only .git, every later `moectl summary` refused (exit 3: "has
    # uncommitted changes") - moectl's own text taken for the user's edit.
    doc = summary_project(git_repo, monkeypatch)
    shipped = doc.read_bytes()
    if how == "read_only_git":
        mounts.read_only(git_repo / ".git")
    else:
        (git_repo / ".git" / OWNER_NOTE).mkdir()
    r = runner.invoke(app, ["summary"])
    assert r.exit_code == 3, r.output  # the repository refused (as a reference-transaction hook's no)
    [line] = r.stderr.strip().splitlines()
    if how == "read_only_git":  # not even written: its note could not be saved
        assert line == (f"error: cannot write {doc}: the note that moectl wrote it cannot be saved "
                        f"({git_repo}/.git/{NOTE_LOG}: Read-only file system)"), line
    else:
        assert line.startswith("error: EXPERIMENTS.md not committed: ") and f"{OWNER_NOTE}: Is a directory" in line
        assert line.endswith("; the file is left as it was")
    assert as_it_was(git_repo, doc, shipped)
    if how == "read_only_git":
        mounts.undo(git_repo / ".git")
    else:
        (git_repo / ".git" / OWNER_NOTE).rmdir()
    r = runner.invoke(app, ["summary"])
    assert r.exit_code == 0 and "later" in doc.read_text() and git(git_repo, "status", "--porcelain") == "", r.output


def test_summary_no_commit_does_not_write_what_it_cannot_note_as_its_own(git_repo, artifact_root, monkeypatch):
    # Was: the note's failure ignored, the file written, and every later `moectl summary` refused
    # (exit 3, "EXPERIMENTS.md has uncommitted changes") until the user discarded moectl's own text.
    doc = summary_project(git_repo, monkeypatch)
    shipped = doc.read_bytes()
    (git_repo / ".git" / NOTE_LOG).unlink()
    (git_repo / ".git" / NOTE_LOG).mkdir()
    r = runner.invoke(app, ["summary", "--no-commit"])
    assert r.exit_code == 3 and f"{NOTE_LOG}: Is a directory" in r.stderr and "Traceback" not in r.output, r.output
    assert as_it_was(git_repo, doc, shipped)
    (git_repo / ".git" / NOTE_LOG).rmdir()
    assert runner.invoke(app, ["summary"]).exit_code == 0 and "later" in doc.read_text()
    assert git(git_repo, "status", "--porcelain") == ""


def moectl_limited(repo: Path, fsize: int, *args: str) -> subprocess.CompletedProcess:
    """`moectl ARGS` whose files may not grow past `fsize` bytes (RLIMIT_FSIZE: EFBIG, as a quota)."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run([sys.executable, "-m", "moectl", *args], cwd=repo, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, preexec_fn=limit, timeout=120)


@pytest.mark.parametrize("how", ["file_size_limit", "full_disk", "full_git"])
def test_summary_on_a_full_disk_exits_2_naming_the_file_and_leaves_it_as_it_was(git_repo, artifact_root,
                                                                                monkeypatch, tmp_path, mounts, how):
    # SPEC §8: a full disk is neither a guard's refusal (was 3, when EXPERIMENTS.md could not be
    # written) nor a bug of moectl's (was 1, when git's commit failed for want of room): exit 2, as
    # every other write of moectl's that meets it, with the file named and EXPERIMENTS.md as it was.
    if how != "file_size_limit":  # the repository on a small tmpfs of its own
        small = tmp_path / "small"
        small.mkdir()
        mounts.mount(small, "-t", "tmpfs", "-o", "size=1m", "tmpfs")
        shutil.copytree(git_repo, small / "repo", symlinks=True)
        git_repo = small / "repo"
    doc = summary_project(git_repo, monkeypatch)
    shipped = doc.read_bytes()
    if how == "file_size_limit":  # EXPERIMENTS.md (2 KiB and more) may not be written; its note may
        assert len(shipped) > 1024
        r = moectl_limited(git_repo, 1024, "summary")
        assert r.returncode == 2, (r.stdout, r.stderr)
        assert r.stderr.strip() == f"error: cannot write {doc}: File too large", r.stderr
    else:
        # full_disk: no room at all (the note that comes first says so); full_git: room for the note
        # and the file, none for git's objects and index (the commit fails inside git)
        fill(git_repo.parent, free_pages=0 if how == "full_disk" else 2)
        r = runner.invoke(app, ["summary"])
        assert r.exit_code == 2, r.output
        [line] = r.stderr.strip().splitlines()
        assert "No space left on device" in line or "Out of diskspace" in line, line
        if how == "full_disk":
            assert line.startswith(f"error: cannot write {doc}: "), line
        else:
            assert line.startswith("error: EXPERIMENTS.md not committed: git "), line
            assert line.endswith("; the file is left as it was")
    assert doc.read_bytes() == shipped and doc.stat().st_mtime_ns == 1_000_000_000
    assert "Traceback" not in (r.stderr if isinstance(r, subprocess.CompletedProcess) else r.output)
