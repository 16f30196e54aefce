"""The git guard on real repositories stopped in the middle of an operation: a conflicting rebase
(both backends), `git am`, a cherry-pick and a revert (stopped on a conflict, and between the
commits of a multi-commit pick), a merge and a bisect. Each time `moectl check` exits 3, the git
guard is the one that refuses, and its message names the operation and the command that ends it.

`--override no_other_training`: other test sessions may be training on this machine; that guard
is not the subject here, and every other guard must pass so that the exit code is the git guard's.
"""
from __future__ import annotations

import json
import os
import time
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moectl.cli import app
from tests.conftest import git

runner = CliRunner()


def check(repo: Path) -> tuple[int, dict]:
    r = runner.invoke(app, ["check", "--json", "--device", "cpu", "--override", "no_other_training",
                            "--config", str(repo / ".moectl.toml")])
    return r.exit_code, json.loads(r.stdout)


def refusal(repo: Path) -> str:
    """Assert that `moectl check` refuses because of git alone; return the git guard's message."""
    code, data = check(repo)
    failing = {g["name"]: g["message"] for g in data["guards"] if not (g["ok"] or g["overridden"])}
    assert code == 3 and data["ok"] is False, data
    assert set(failing) == {"git"}, failing
    assert data["exit_code"] == 3 and data["error"] == f"refused: git: {failing['git']}"  # as every error document
    return failing["git"]


def commit_file(repo: Path, name: str, text: str, message: str) -> str:
    (repo / name).write_text(text)
    git(repo, "add", name)
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD").strip()


def git_fails(repo: Path, *args: str) -> str:
    """Run a git command that must stop on a conflict (exit non-zero); return its output."""
    r = subprocess.run(["git", "-C", str(repo), "-c", "core.editor=true", *args], capture_output=True, text=True)
    assert r.returncode != 0, f"git {' '.join(args)} did not stop: {r.stdout}{r.stderr}"
    return r.stdout + r.stderr


@pytest.fixture
def diverged(project: Path) -> Path:
    """`project` (on main, clean, guards passing) with a branch `other` whose commits conflict
    with main's: both change notes.txt differently; `other` has a second, clean commit (o2.txt)."""
    commit_file(project, "notes.txt", "base\n", "notes")
    git(project, "switch", "-q", "-c", "other")
    commit_file(project, "notes.txt", "other side\n", "other: notes")
    commit_file(project, "o2.txt", "o2\n", "other: o2")
    git(project, "switch", "-q", "main")
    commit_file(project, "notes.txt", "main side\n", "main: notes")
    code, data = check(project)
    assert code == 0, data  # the starting point passes: what follows is what refuses
    return project


@pytest.mark.parametrize("backend", ["--merge", "--apply"])
def test_stopped_rebase_is_named_not_just_a_detached_head(diverged, backend):
    git_fails(diverged, "rebase", backend, "other")
    marker = "rebase-merge" if backend == "--merge" else "rebase-apply"
    assert (Path(git(diverged, "rev-parse", "--absolute-git-dir").strip()) / marker).is_dir()
    msg = refusal(diverged)
    assert "a rebase is in progress" in msg and "git rebase --abort" in msg
    git(diverged, "rebase", "--abort")
    assert check(diverged)[0] == 0


def test_stopped_am_is_named_am(diverged, tmp_path):
    patch = tmp_path / "patch"
    patch.write_text(git(diverged, "format-patch", "-1", "--stdout", "other~1"))
    git_fails(diverged, "am", str(patch))
    msg = refusal(diverged)
    assert "a git am is in progress" in msg and "git am --abort" in msg
    git(diverged, "am", "--abort")
    assert check(diverged)[0] == 0


def test_stopped_cherry_pick_is_named(diverged):
    git_fails(diverged, "cherry-pick", "other~1")
    msg = refusal(diverged)
    assert "a cherry-pick is in progress" in msg and "git cherry-pick --abort" in msg
    git(diverged, "cherry-pick", "--abort")
    assert check(diverged)[0] == 0


def test_multi_commit_cherry_pick_between_commits_is_still_in_progress(diverged):
    # The first pick conflicts; once it is resolved and committed CHERRY_PICK_HEAD is gone, but
    # the sequencer still has the second commit to pick: the cherry-pick is not over.
    git_fails(diverged, "cherry-pick", "other~1", "other")
    (diverged / "notes.txt").write_text("resolved\n")
    git(diverged, "add", "notes.txt")
    git(diverged, "-c", "core.editor=true", "commit", "-q")
    assert "cherry-pick" in git(diverged, "status").lower()  # git itself says it is in progress
    msg = refusal(diverged)
    assert "a cherry-pick is in progress" in msg and "git cherry-pick --abort" in msg
    git(diverged, "cherry-pick", "--continue")
    assert check(diverged)[0] == 0


def test_stopped_revert_is_named(diverged):
    commit_file(diverged, "notes.txt", "main side, edited again\n", "main: notes again")
    git_fails(diverged, "revert", "--no-edit", "HEAD~1")
    msg = refusal(diverged)
    assert "a revert is in progress" in msg and "git revert --abort" in msg
    git(diverged, "revert", "--abort")
    assert check(diverged)[0] == 0


def test_merge_with_conflicts_is_named(diverged):
    git_fails(diverged, "merge", "other")
    msg = refusal(diverged)
    assert "a merge is in progress" in msg and "git merge --abort" in msg
    git(diverged, "merge", "--abort")
    assert check(diverged)[0] == 0


def test_bisect_is_named_with_its_own_way_out(diverged):
    # `git bisect start` alone leaves HEAD on main; with a bad and a good commit git checks out
    # a commit in between (a detached HEAD). Both are a bisect, and its way out is `reset`.
    first = git(diverged, "rev-list", "--max-parents=0", "HEAD").strip()
    git(diverged, "bisect", "start")
    assert git(diverged, "symbolic-ref", "--short", "HEAD").strip() == "main"
    msg = refusal(diverged)
    assert "a bisect is in progress" in msg and "git bisect reset" in msg and "--abort" not in msg
    git(diverged, "bisect", "bad", "HEAD")
    git(diverged, "bisect", "good", first)
    assert subprocess.run(["git", "-C", str(diverged), "symbolic-ref", "-q", "HEAD"]).returncode != 0  # detached
    msg = refusal(diverged)
    assert "a bisect is in progress" in msg and "git bisect reset" in msg
    git(diverged, "bisect", "reset")
    assert check(diverged)[0] == 0


def test_a_stale_index_lock_refuses_a_run_that_would_commit(project):
    # A crashed git's index.lock (or a `git commit` waiting for its editor): the report commit at
    # the end of the run would wait for it and fail, so the run is refused before it trains.
    lock = project / ".git" / "index.lock"
    lock.write_bytes(b"")
    os.utime(lock, (time.time() - 3600, time.time() - 3600))
    msg = refusal(project)
    assert msg.startswith(f"{lock} exists: another git process holds it") and "there 60 min" in msg, msg
    assert "--no-commit" in msg and lock.exists()  # named, never removed: it may be the user's live git
    r = runner.invoke(app, ["check", "--json", "--device", "cpu", "--override", "no_other_training", "--no-commit",
                            "--config", str(project / ".moectl.toml")])
    assert r.exit_code == 0, r.stdout  # a run that commits nothing never takes the lock
    lock.unlink()
    assert check(project)[0] == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user takes root")
def test_a_repository_owned_by_another_user_is_named_with_safe_directory(project, tmp_path, monkeypatch):
    # git refuses a repository another user owns (safe.directory): that is no "not a repository".
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(tmp_path / "gitconfig"))  # no safe.directory = * of the machine
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    os.chown(project / ".git", 65534, 65534)
    try:
        msg = refusal(project)
    finally:
        os.chown(project / ".git", os.getuid(), os.getgid())
    assert "detected dubious ownership" in msg and f"git config --global --add safe.directory {project}" in msg, msg
