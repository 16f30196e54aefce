"""Commits beside other git processes (issue 8 §2): real lock holders, real racing commits.

An editor's background git holds `.git/index.lock` for a moment; another tool may commit to the
branch with its own index while moectl commits. moectl must end either "committed, index
consistent" or "nothing moved, report on disk, a message naming `moectl commit <run id>`" - never
a commit the user's index does not know about. `moectl commit RUN` is the way back.
"""
from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moectl.cli import app
from moectl.config import load_config
from moectl.gitops import GitBusy, commit_paths
from moectl.records import GitInfo, RunRecord, Summary, write_text_atomic
from moectl.report import report_path, run_report
from moectl.store import create_run_dir, run_id, save_run
from tests.conftest import git
from tests.test_gitops import snapshot, user_mess

runner = CliRunner()
EVENT_TIMEOUT_S = 30  # generous: 2 cores shared with other test sessions

# A real process holding index.lock the way git does, until the test creates the release file.
HOLDER = r"""
import os, sys, time
lock, release = sys.argv[1], sys.argv[2]
fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
deadline = time.monotonic() + 120  # never outlive a broken test
while not os.path.exists(release) and time.monotonic() < deadline:
    time.sleep(0.01)
os.close(fd)
os.unlink(lock)
"""


class LockHolder:
    def __init__(self, repo: Path, tmp: Path):
        self.lock = repo / ".git" / "index.lock"
        self.release_file = tmp / "release-index-lock"
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(self.lock), str(self.release_file)])
        deadline = time.monotonic() + EVENT_TIMEOUT_S
        while not self.lock.exists():
            assert self.proc.poll() is None, f"the lock holder exited early ({self.proc.returncode})"
            assert time.monotonic() < deadline, "the lock holder never created index.lock"
            time.sleep(0.01)

    def release(self, waiter: bool = False) -> None:
        """`waiter`: a moectl waits for the lock, and takes it the moment this one is gone."""
        self.release_file.touch()
        assert self.proc.wait(timeout=EVENT_TIMEOUT_S) == 0
        assert waiter or not self.lock.exists()


@pytest.fixture
def hold_index_lock(git_repo, tmp_path):
    holders = []

    def start(repo: Path = git_repo) -> LockHolder:
        holders.append(LockHolder(repo, tmp_path))
        return holders[-1]

    yield start
    for h in holders:
        h.release_file.touch()
        try:
            h.proc.wait(timeout=EVENT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            h.proc.kill()
            h.proc.wait(timeout=EVENT_TIMEOUT_S)


def index_entries(repo: Path) -> dict[tuple[str, int], bytes]:
    """Every entry of .git/index (versions 2 and 3) as its raw on-disk bytes - stat data, mode,
    blob id, flags - keyed by (path, stage): what "the user's index is untouched" means."""
    data = (repo / ".git" / "index").read_bytes()
    sig, version, count = struct.unpack(">4sLL", data[:12])
    assert sig == b"DIRC" and version in (2, 3), (sig, version)
    entries, off = {}, 12
    for _ in range(count):
        flags = struct.unpack(">H", data[off + 60:off + 62])[0]
        name_at = off + 62 + (2 if version == 3 and flags & 0x4000 else 0)
        end = data.index(b"\0", name_at)
        size = (end - off + 8) & ~7  # entries are NUL-padded to a multiple of 8
        entries[(data[name_at:end].decode(), (flags >> 12) & 3)] = data[off:off + size]
        off += size
    return entries


def without(entries: dict, *paths: str) -> dict:
    return {k: v for k, v in entries.items() if k[0] not in paths}


def head(repo: Path) -> str:
    return git(repo, "rev-parse", "HEAD").strip()


# ------------------------------------------------------------------------ the library: commit_paths


def test_lock_held_briefly_moectl_waits_then_commits_cleanly(git_repo, hold_index_lock):
    user_mess(git_repo)
    before_status, before_entries, head0 = snapshot(git_repo), index_entries(git_repo), head(git_repo)
    report = git_repo / "reports" / "20250101_1200_run.md"
    report.write_text("# report\n")
    holder = hold_index_lock()
    waiting, result = threading.Event(), {}

    def commit():
        try:
            result["sha"] = commit_paths(git_repo, [report], "report: waited", branch="main", wait_s=120,
                                         on_wait=lambda lock: waiting.set())
        except BaseException as exc:  # reported by the main thread
            result["error"] = exc

    t = threading.Thread(target=commit)
    t.start()
    assert waiting.wait(EVENT_TIMEOUT_S), f"moectl never started waiting for index.lock: {result}"
    assert t.is_alive() and head(git_repo) == head0  # held: nothing moved yet
    holder.release()
    t.join(EVENT_TIMEOUT_S)
    assert not t.is_alive(), "moectl did not finish its commit after the lock was released"
    assert "error" not in result, result.get("error")

    assert head(git_repo) == result["sha"] and git(git_repo, "rev-parse", "HEAD^").strip() == head0
    assert git(git_repo, "show", "--name-only", "--format=", "HEAD").split() == ["reports/20250101_1200_run.md"]
    assert git(git_repo, "status", "--porcelain", "--", "reports/20250101_1200_run.md") == ""
    # The user's staged, modified and untracked files: status and diffs, and every index entry
    # but ours, byte for byte.
    assert snapshot(git_repo) == before_status
    assert without(index_entries(git_repo), "reports/20250101_1200_run.md") == before_entries
    assert not (git_repo / ".git" / "index.lock").exists()


def test_lock_held_past_the_wait_moves_nothing(git_repo, hold_index_lock):
    user_mess(git_repo)
    report = git_repo / "reports" / "r.md"
    report.write_text("# report\n")
    index_bytes, head0, status0 = (git_repo / ".git" / "index").read_bytes(), head(git_repo), snapshot(git_repo)
    reflog0 = git(git_repo, "reflog")
    holder = hold_index_lock()

    with pytest.raises(GitBusy, match=r"another git process holds .*index\.lock.*nothing was committed"):
        commit_paths(git_repo, [report], "report: never", branch="main", wait_s=0.3)

    assert head(git_repo) == head0 and git(git_repo, "reflog") == reflog0
    assert (git_repo / ".git" / "index").read_bytes() == index_bytes
    assert holder.lock.exists()  # theirs, still held: we never touch another process's lock
    holder.release()
    assert snapshot(git_repo) == status0 and report.read_text() == "# report\n"


def test_wait_comes_from_the_environment(git_repo, hold_index_lock, monkeypatch):
    (git_repo / "r.md").write_text("x\n")
    hold_index_lock()
    monkeypatch.setenv("MOECTL_GIT_LOCK_WAIT", "0.2")
    t0 = time.monotonic()
    with pytest.raises(GitBusy, match=r"waited 0\.2 s"):
        commit_paths(git_repo, [git_repo / "r.md"], "msg")
    assert time.monotonic() - t0 < EVENT_TIMEOUT_S


RACING_HOOK = """#!/bin/sh
# Another process commits to the branch while moectl is mid-commit. moectl holds index.lock, so
# this commit uses its own index (as a tool committing from a temporary index does). It runs once:
# on the first index write git makes for moectl, i.e. after moectl read the branch.
mkdir "{marker}" 2>/dev/null || exit 0
test -e "{lock}" && : > "{marker}/moectl_held_the_lock"
export GIT_INDEX_FILE="{marker}/user-index"
git read-tree HEAD
printf 'the user commit\\n' > "{repo}/user_commit.txt"
git update-index --add user_commit.txt
git commit -q -m "user: racing commit"
"""


def racing_user_commit(repo: Path, tmp: Path) -> Path:
    marker = tmp / "user-committed"
    hook = repo / ".git" / "hooks" / "post-index-change"
    hook.write_text(RACING_HOOK.format(marker=marker, lock=repo / ".git" / "index.lock", repo=repo))
    hook.chmod(0o755)
    return marker


def test_a_user_commit_racing_moectls_is_kept(git_repo, tmp_path):
    user_mess(git_repo)
    entries0, head0 = index_entries(git_repo), head(git_repo)
    report = git_repo / "reports" / "r.md"
    report.write_text("# report\n")
    marker = racing_user_commit(git_repo, tmp_path)

    sha = commit_paths(git_repo, [report], "report: raced", branch="main")

    assert (marker / "moectl_held_the_lock").exists(), "the user's commit did not land mid-commit"
    # No commit lost: ours sits on top of theirs, theirs on top of where we started.
    assert head(git_repo) == sha
    assert git(git_repo, "log", "--format=%s", "-3").splitlines() == ["report: raced", "user: racing commit", "more files"]
    assert git(git_repo, "rev-parse", "HEAD~2").strip() == head0
    assert git(git_repo, "show", "HEAD:user_commit.txt") == "the user commit\n"
    assert git(git_repo, "show", "--name-only", "--format=", "HEAD").split() == ["reports/r.md"]
    assert git(git_repo, "status", "--porcelain", "--", "reports/r.md") == ""
    assert without(index_entries(git_repo), "reports/r.md") == entries0


def test_a_race_lost_on_every_try_moves_nothing(git_repo, tmp_path):
    """The same race with no second try: the branch keeps the user's commit, the index is exactly
    as it was, no lock is left (this also shows the race above is real)."""
    user_mess(git_repo)
    report = git_repo / "reports" / "r.md"
    report.write_text("# report\n")
    index_bytes = (git_repo / ".git" / "index").read_bytes()
    racing_user_commit(git_repo, tmp_path)

    with pytest.raises(GitBusy, match="kept moving"):
        commit_paths(git_repo, [report], "report: raced", branch="main", cas_tries=1)

    assert git(git_repo, "log", "-1", "--format=%s").strip() == "user: racing commit"
    assert (git_repo / ".git" / "index").read_bytes() == index_bytes
    assert not (git_repo / ".git" / "index.lock").exists() and report.is_file()


def test_a_report_committed_by_someone_else_mid_commit_is_not_committed_again_nor_the_rest_alone(git_repo, tmp_path):
    """`unless_committed`: the report committed by another process after moectl read the branch
    (under moectl's lock, on an index of its own): the retry finds it there and commits nothing -
    not EXPERIMENTS.md alone under the report's subject."""
    report, summary = git_repo / "reports" / "r.md", git_repo / "EXPERIMENTS.md"
    report.parent.mkdir()
    report.write_text("# report\n")
    summary.write_text("# experiments\n")
    marker = tmp_path / "user-committed"
    hook = git_repo / ".git" / "hooks" / "post-index-change"
    hook.write_text(RACING_HOOK.format(marker=marker, lock=git_repo / ".git" / "index.lock", repo=git_repo).replace(
        "printf 'the user commit\\n' > \"%s/user_commit.txt\"\n" % git_repo, "").replace(
        "git update-index --add user_commit.txt", "git update-index --add reports/r.md"))
    hook.chmod(0o755)

    assert commit_paths(git_repo, [report, summary], "report: r", branch="main", unless_committed=report) is None

    assert (marker / "moectl_held_the_lock").exists(), "the other commit did not land mid-commit"
    assert git(git_repo, "log", "-1", "--format=%s").strip() == "user: racing commit"
    assert git(git_repo, "show", "--name-only", "--format=", "HEAD").split() == ["reports/r.md"]
    assert git(git_repo, "status", "--porcelain", "--", "EXPERIMENTS.md") == "?? EXPERIMENTS.md\n"
    assert not (git_repo / ".git" / "index.lock").exists()


# --------------------------------------------------------------------------- moectl commit RUN


def finished_run(project: Path, tag: str = "bufreuse", write_report: bool = True) -> tuple[RunRecord, Path]:
    """A completed run in the store and its report in report_dir, as `moectl run --no-commit` leaves them."""
    cfg = load_config(None)
    rid = run_id("moe", tag)
    exp = create_run_dir(cfg.artifact_root / rid)
    rec = RunRecord(id=rid, tag=tag, status="completed", created_at="2025-01-01T12:00:00+00:00",
                    finished_at="2025-01-01T12:05:00+00:00", exit_code=0, options={"cap": 1.0},
                    git=GitInfo(branch="main", commit=head(project), dirty=False), exp_dir=str(exp),
                    summary=Summary(window=50, steps=10, tok_per_sec=806400.06))
    save_run(rec)
    report = report_path(cfg.report_dir, tag)
    if write_report:
        report.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(report, run_report(rec))
    return rec, report


def test_a_slurm_followers_last_line_says_a_found_commit_is_not_this_runs(project, capsys):
    """The follower renders the job's record: a commit the job found (run.json commit_found) is
    said as not this run's, as `moectl run`'s own last line says it; one the job made is named
    with what it holds."""
    from moectl.cli.cluster import _render_final

    rec, report = finished_run(project)
    git(project, "add", report.relative_to(project).as_posix())
    git(project, "commit", "-q", "-m", "my own commit of the report")
    sha = head(project)
    rec.report, rec.commit, rec.commit_found = str(report), sha, True
    _render_final(rec)
    said = capsys.readouterr().out
    assert f"report already committed in {sha[:10]}, not by this run; nothing committed" in said, said
    assert f"committed {sha[:10]} (" not in said
    rec.commit_found = False  # (as a job that committed it records it)
    _render_final(rec)
    assert f"committed {sha[:10]} ({report.name}; nothing else)" in capsys.readouterr().out


def commit_cmd(*args: str):
    return runner.invoke(app, ["commit", *args])


def test_moectl_commit_commits_the_report_and_summary_then_is_idempotent(project):
    user_mess(project)
    status0, entries0, head0 = snapshot(project), index_entries(project), head(project)
    rec, report = finished_run(project)
    rel = report.relative_to(project).as_posix()

    r = commit_cmd(rec.id, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out == {"run": rec.id, "report": str(report), "paths": [str(report), str(project / "EXPERIMENTS.md")],
                   "commit": head(project), "created": True}
    assert git(project, "rev-parse", "HEAD^").strip() == head0
    assert sorted(git(project, "show", "--name-only", "--format=", "HEAD").split()) == ["EXPERIMENTS.md", rel]
    assert git(project, "log", "-1", "--format=%s").strip() == "report: cap1.0 bufreuse — 806400 tok/s"
    assert snapshot(project) == status0
    assert without(index_entries(project), rel, "EXPERIMENTS.md") == entries0
    assert json.loads((Path(rec.exp_dir) / "run.json").read_text())["commit"] == out["commit"]
    # the record names its report too (a moectl killed before its last save wrote neither)
    assert json.loads((Path(rec.exp_dir) / "run.json").read_text())["report"] == str(report)

    again = commit_cmd("bufreuse")  # a tag works as everywhere; nothing to do the second time
    assert again.exit_code == 0, again.output
    assert f"already committed in {out['commit'][:10]}" in again.stdout
    assert head(project) == out["commit"]


def test_what_moectl_commit_says_it_committed_is_what_its_commit_holds(project):
    """Audit L #3: EXPERIMENTS.md already listing the run as HEAD has it (a `moectl summary` after
    a `--no-commit` run): the commit holds the report alone, but `moectl commit` said
    `committed X (REPORT, EXPERIMENTS.md; nothing else)` and its --json `paths` named both."""
    rec, report = finished_run(project, tag="listed")
    assert runner.invoke(app, ["summary"]).exit_code == 0
    assert git(project, "show", "--name-only", "--format=", "HEAD").split() == ["EXPERIMENTS.md"]
    r = commit_cmd(rec.id)
    assert r.exit_code == 0, r.output
    rel = report.relative_to(project).as_posix()
    assert git(project, "show", "--name-only", "--format=", "HEAD").split() == [rel]
    assert r.stdout.strip() == f"committed {head(project)[:10]} ({report.name}; nothing else)"


@pytest.mark.parametrize("staged", [False, True])
def test_moectl_commit_after_the_user_edited_a_committed_report_commits_nothing(project, staged):
    # The user's half-written note in the report (staged or not) is theirs: SPEC §9.
    rec, report = finished_run(project)
    first = json.loads(commit_cmd(rec.id, "--json").stdout)["commit"]
    with report.open("a") as fh:
        fh.write("\nmy note, half-writ")
    if staged:
        git(project, "add", "--", str(report))
    status0, entries0, edited = snapshot(project), index_entries(project), report.read_bytes()
    r = commit_cmd(rec.id, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert (out["commit"], out["created"]) == (first, False) and head(project) == first
    assert "the changes to it since are not moectl's" in r.stderr
    assert snapshot(project) == status0 and index_entries(project) == entries0 and report.read_bytes() == edited


@pytest.mark.parametrize("blocked", ["read_only", "unwritable"])
def test_moectl_commit_commits_the_report_when_experiments_md_cannot_be_written(project, blocked):
    # EXPERIMENTS.md in a `[paths] read_only` tree, or not writable (here a directory in its way):
    # the report still goes in, alone, with the reason as a warning (no errno traceback, no exit 2).
    if blocked == "read_only":
        cfg_file = project / ".moectl.toml"
        cfg_file.write_text(cfg_file.read_text() + '\n[paths]\nread_only = ["EXPERIMENTS.md"]\n')
        git(project, "commit", "-q", "-am", "read-only summary")
    else:
        (project / "EXPERIMENTS.md").mkdir()
        (project / "EXPERIMENTS.md" / "keep").write_text("x\n")
    rec, report = finished_run(project)
    r = commit_cmd(rec.id, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["paths"] == [str(report)]
    assert git(project, "show", "--name-only", "--format=", "HEAD").split() == [report.relative_to(project).as_posix()]
    reason = "read-only tree" if blocked == "read_only" else "cannot write"
    assert f"warning: EXPERIMENTS.md not refreshed: " in r.stderr and reason in r.stderr, r.stderr
    assert (project / "EXPERIMENTS.md").is_dir() == (blocked == "unwritable")


def test_moectl_commit_of_a_run_that_ended_without_its_report_writes_it_from_the_record(project):
    # Its moectl was killed after the training ended, before the report: the record holds what the
    # report says, so `moectl commit RUN` writes it and commits it (was: "has no report", exit 2).
    user_mess(project)
    status0 = snapshot(project)
    rec, report = finished_run(project, write_report=False)
    r = commit_cmd(rec.id, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    written = Path(out["report"])
    assert written.parent == report.parent and written.name.endswith("_bufreuse.md") and out["created"] is True
    assert written.read_text() == run_report(rec)
    assert f"{written.name} was written now, from its record" in r.stderr
    assert sorted(git(project, "show", "--name-only", "--format=", "HEAD").split()) == sorted(
        ["EXPERIMENTS.md", written.relative_to(project).as_posix()])
    assert snapshot(project) == status0 and json.loads((Path(rec.exp_dir) / "run.json").read_text())["report"] == str(written)
    # its own moectl still alive (it saved the record and is about to write the report): its to write
    import socket
    from datetime import datetime

    from tests.conftest import start_process, stop_process

    owner = start_process([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        time.sleep(0.05)
        busy, _ = finished_run(project, tag="busy", write_report=False)
        save_run(busy.model_copy(update={"pid": owner.pid, "host": socket.gethostname(),
                                         "created_at": datetime.now().astimezone().isoformat()}))
        r = commit_cmd(busy.id)
        assert r.exit_code == 3 and f"its moectl (pid {owner.pid}) is writing its report" in r.stderr, r.output
    finally:
        stop_process(owner)
    # still running, or imported: nothing to write, exit 2
    running, _ = finished_run(project, tag="live", write_report=False)
    save_run(running.model_copy(update={"status": "running", "pid": None}))
    r = commit_cmd(running.id)
    assert r.exit_code == 2 and "reports are written when a run ends; the run is running" in r.stderr, r.stderr
    r = commit_cmd("no-such-run")
    assert r.exit_code == 2 and "no run matches" in r.stderr
    # Its report was written, then deleted: said so, not "written when a run ends".
    gone, report_of_gone = finished_run(project, tag="gone")
    save_run(gone.model_copy(update={"report": str(report_of_gone)}))
    report_of_gone.unlink()
    r = commit_cmd(gone.id)
    assert r.exit_code == 2 and f"report {report_of_gone} is gone (deleted or moved)" in r.stderr, r.stderr
    # Committed, then deleted (and the deletion staged): already committed, exit 0 as for an edit; the
    # deletion is the user's and stays uncommitted.
    kept, report_of_kept = finished_run(project, tag="kept")
    assert commit_cmd(kept.id).exit_code == 0
    head = git(project, "rev-parse", "HEAD")
    git(project, "rm", "-q", "--cached", report_of_kept.relative_to(project).as_posix())
    report_of_kept.unlink()
    r = commit_cmd(kept.id)
    assert r.exit_code == 0 and "deleted since; the deletion is not moectl's" in r.stderr, r.output
    assert git(project, "rev-parse", "HEAD") == head
    assert f"D  {report_of_kept.relative_to(project).as_posix()}" in git(project, "status", "--porcelain")


def test_moectl_commit_on_the_wrong_branch_refuses_and_writes_nothing(project):
    rec, report = finished_run(project)
    git(project, "switch", "-q", "-c", "elsewhere")
    head0 = head(project)
    r = commit_cmd(rec.id)
    assert r.exit_code == 3
    assert "on branch 'elsewhere', expected 'main'" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert head(project) == head0 and not (project / "EXPERIMENTS.md").exists()
    git(project, "switch", "-q", "main")
    assert commit_cmd(rec.id).exit_code == 0
    assert report.relative_to(project).as_posix() in git(project, "show", "--name-only", "--format=", "HEAD")


def test_with_any_branch_allowed_moectl_commit_goes_to_the_runs_own_branch(project):
    """`branch = "*"`: a run guarded on feat-a whose commit was refused because the user switched
    to feat-b meanwhile. `moectl commit` committed it onto feat-b; the run's branch is feat-a."""
    cfg_file = project / ".moectl.toml"
    cfg_file.write_text(cfg_file.read_text().replace('branch = "main"', 'branch = "*"'))
    git(project, "commit", "-qam", "any branch")
    git(project, "switch", "-q", "-c", "feat-a")
    rec, report = finished_run(project)
    save_run(rec.model_copy(update={"git": GitInfo(branch="feat-a", commit=head(project), dirty=False)}))
    git(project, "switch", "-q", "-c", "feat-b")
    head_b = head(project)
    r = commit_cmd(rec.id)
    assert r.exit_code == 3 and "on branch 'feat-b', expected 'feat-a'" in r.stderr, r.output
    assert head(project) == head_b
    git(project, "switch", "-q", "feat-a")
    assert commit_cmd(rec.id).exit_code == 0
    assert report.relative_to(project).as_posix() in git(project, "show", "--name-only", "--format=", "HEAD")
    assert git(project, "rev-parse", "feat-b").strip() == head_b


def test_moectl_commit_waits_for_a_lock_then_gives_up_naming_itself(project, hold_index_lock, monkeypatch):
    rec, report = finished_run(project)
    summary, summary_before = project / "EXPERIMENTS.md", b"# an older summary of moectl's\n"
    summary.write_bytes(summary_before)
    git(project, "add", "EXPERIMENTS.md")
    git(project, "commit", "-q", "-m", "summary")
    os.utime(summary, ns=(10**18, 10**18))
    holder = hold_index_lock(project)
    monkeypatch.setenv("MOECTL_GIT_LOCK_WAIT", "0.3")
    head0 = head(project)
    r = commit_cmd(rec.id)
    assert r.exit_code == 3
    assert "waiting for" in r.stderr and "index.lock" in r.stderr
    assert f"moectl commit {rec.id}" in r.stderr and head(project) == head0
    # EXPERIMENTS.md, refreshed for the commit that failed, is as it was: no change of moectl's left
    # in the user's tree (the next run's git.diff would carry it)
    assert summary.read_bytes() == summary_before and summary.stat().st_mtime_ns == 10**18
    holder.release()
    assert commit_cmd(rec.id).exit_code == 0 and head(project) != head0


def test_bad_lock_wait_is_a_usage_error(project, monkeypatch):
    rec, _ = finished_run(project)
    monkeypatch.setenv("MOECTL_GIT_LOCK_WAIT", "soon")
    r = commit_cmd(rec.id)
    assert r.exit_code == 2 and "MOECTL_GIT_LOCK_WAIT='soon'" in r.stderr
    # run and sweep say it before anything trains (it would only matter at their commits)
    spec = project / "s.toml"
    spec.write_text('name = "s"\n[[legs]]\ntag = "a"\n')
    root = Path(os.environ["MOECTL_ARTIFACT_ROOT"])
    before = set(root.iterdir())
    for args in (["run", "--device", "cpu", "--steps", "2"], ["sweep", str(spec)]):
        r = runner.invoke(app, args)
        assert r.exit_code == 2 and "MOECTL_GIT_LOCK_WAIT='soon'" in r.stderr, (args, r.output)
    assert set(root.iterdir()) == before  # nothing started


def test_commit_help_has_examples():
    r = commit_cmd("--help")
    assert r.exit_code == 0 and "Example" in r.stdout and "moectl commit" in r.stdout


# ----------------------------------------------------------------- the report, end to end


@pytest.mark.slow
def test_a_run_ending_under_a_held_lock_moves_nothing_and_moectl_commit_finishes_it(
        git_repo, monkeypatch, artifact_root, hold_index_lock):
    """The reproduction: `.git/index.lock` held when a run finishes. Before the fix moectl moved
    the branch, failed to update the index, and said "not committed"."""
    from tests.test_run import QUIET, FAST, commit_config, write_config

    write_config(git_repo)
    commit_config(git_repo, monkeypatch)
    user_mess(git_repo)
    index_bytes, status0, head0 = (git_repo / ".git" / "index").read_bytes(), snapshot(git_repo), head(git_repo)
    holder = hold_index_lock()
    monkeypatch.setenv("MOECTL_GIT_LOCK_WAIT", "0.5")

    r = runner.invoke(app, ["run", "--steps", "3", "--tag", "locked", *QUIET, *FAST])
    assert r.exit_code == 0, r.output  # the run itself completed
    [exp] = [p.parent for p in artifact_root.glob("*/run.json")]
    assert "report not committed: another git process holds" in r.stderr
    assert f"moectl commit {exp.name}" in r.stderr
    assert head(git_repo) == head0 and (git_repo / ".git" / "index").read_bytes() == index_bytes
    assert not (git_repo / "EXPERIMENTS.md").exists()  # refreshed for the commit, then put back: none
    [report] = [p for p in (git_repo / "reports").glob("*.md") if p.name != "user_note.md"]
    assert f"`{exp.name}`" in report.read_text()

    holder.release()
    done = commit_cmd(exp.name)
    assert done.exit_code == 0, done.output
    rel = report.relative_to(git_repo).as_posix()
    assert sorted(git(git_repo, "show", "--name-only", "--format=", "HEAD").split()) == ["EXPERIMENTS.md", rel]
    assert git(git_repo, "status", "--porcelain", "--", rel, "EXPERIMENTS.md") == ""
    assert snapshot(git_repo) == status0


@pytest.mark.slow
def test_a_run_whose_commit_cannot_be_signed_keeps_its_report_and_moectl_commit_finishes_it(
        git_repo, monkeypatch, artifact_root, gnupg_home):
    """commit.gpgSign on and no usable key: the run completes, its report stays on disk untracked
    (never committed unsigned), one line says why and names `moectl commit`, which refuses the same
    way (exit 2) until signing works or is turned off."""
    from tests.test_run import QUIET, FAST, commit_config, write_config

    write_config(git_repo)
    commit_config(git_repo, monkeypatch)
    git(git_repo, "config", "commit.gpgsign", "true")
    git(git_repo, "config", "user.signingkey", "0xBADC0FFEE0DDF00D")
    head0 = head(git_repo)

    r = runner.invoke(app, ["run", "--steps", "3", "--tag", "unsigned", *QUIET, *FAST])
    assert r.exit_code == 0, r.output  # the run itself completed
    [exp] = [p.parent for p in artifact_root.glob("*/run.json")]
    [line] = [x for x in r.stderr.splitlines() if "report not committed" in x]
    assert "commit.gpgSign is on and git could not sign the commit" in line and f"moectl commit {exp.name}" in line
    [report] = (git_repo / "reports").glob("*.md")
    rel = report.relative_to(git_repo).as_posix()
    assert head(git_repo) == head0
    assert git(git_repo, "status", "--porcelain", "-uall", "--", "reports").splitlines() == [f"?? {rel}"]

    again = commit_cmd(exp.name)
    assert again.exit_code == 2 and len(again.stderr.strip().splitlines()) == 1
    assert "could not sign" in again.stderr and f"moectl commit {exp.name}" in again.stderr
    assert head(git_repo) == head0

    git(git_repo, "config", "commit.gpgsign", "false")
    done = commit_cmd(exp.name)
    assert done.exit_code == 0, done.output
    assert rel in git(git_repo, "show", "--name-only", "--format=", "HEAD").split()


@pytest.mark.slow
def test_ctrl_c_while_the_report_commit_waits_for_git_says_how_to_commit_it(git_repo, hold_index_lock, monkeypatch,
                                                                            artifact_root, tmp_path):
    # A real `moectl run` whose training is over and whose commit waits for another git's index.lock:
    # Ctrl-C there ends it (130) naming `moectl commit RUN`, the record says why, and that command
    # commits the report once the lock is gone.
    from tests.test_run import FAKE, QUIET, commit_config, write_config

    write_config(git_repo, module=FAKE)
    commit_config(git_repo, monkeypatch)
    holder = hold_index_lock()
    out = tmp_path / "out.txt"
    env = {**os.environ, "MOECTL_GIT_LOCK_WAIT": "120", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with open(out, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "moectl", "run", "--steps", "3", "--tag", "held", *QUIET,
                                 "--", "--sleep-per-step", "0.01"], cwd=git_repo, env=env, stdout=fh,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        from tests.conftest import wait_for

        wait_for(lambda: "waiting for" in out.read_text() and "index.lock" in out.read_text(),
                 "moectl waiting for index.lock to commit", 120, proc=proc, output=out.read_text)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130, out.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    [run_dir] = [p for p in artifact_root.iterdir() if p.is_dir()]
    rec = json.loads((run_dir / "run.json").read_text())
    said = out.read_text()
    assert f"the report is kept: commit it with `moectl commit {rec['id']}`" in said, said
    assert rec["status"] == "completed" and rec["commit"] is None and "interrupted" in rec["commit_error"]
    assert Path(rec["report"]).is_file()
    shown = runner.invoke(app, ["show", rec["id"]]).stdout
    assert f"commit     none: interrupted before the report was committed; the report is kept" in shown, shown
    holder.release()
    r = runner.invoke(app, ["commit", rec["id"]])
    assert r.exit_code == 0, r.output
    assert f"reports/{Path(rec['report']).name}" in git(git_repo, "show", "--name-only", "--format=", "HEAD")


def _run_waiting_for_the_index_lock(git_repo: Path, tmp_path: Path, tag: str, summary: bool = True):
    """A real `moectl run` (the fake engine) whose training is over and whose report commit waits
    for another git's index.lock (held by the caller): (process, its output file, run directory, report)."""
    from tests.conftest import wait_for
    from tests.test_run import QUIET

    out = tmp_path / f"{tag}.out"
    env = {**os.environ, "MOECTL_GIT_LOCK_WAIT": "120", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with open(out, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "moectl", "run", "--steps", "3", "--tag", tag, *QUIET,
                                 "--", "--sleep-per-step", "0.01"], cwd=git_repo, env=env, stdout=fh,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    wait_for(lambda: "waiting for" in out.read_text() and "index.lock" in out.read_text(),
             "moectl waiting for index.lock to commit", 120, proc=proc, output=out.read_text)
    [run_dir] = [p.parent for p in (git_repo.parent / "artifacts").glob("*/run.json")]
    [report] = (git_repo / "reports").glob("*.md")
    if summary:  # refreshed for the commit, before it waits
        assert "EXPERIMENTS.md" in git(git_repo, "status", "--porcelain", "--", "EXPERIMENTS.md")
    return proc, out, run_dir, report


def _commit_with_own_index(repo: Path, tmp: Path, *paths: Path) -> str:
    """The user's `git commit` of `paths` made beside a held .git/index.lock (on an index of its own,
    as a second worktree's or a script's is): HEAD moves without moectl's lock."""
    env = {**os.environ, "GIT_INDEX_FILE": str(tmp / "own-index")}
    subprocess.run(["git", "read-tree", "HEAD"], cwd=repo, env=env, check=True)
    subprocess.run(["git", "add", "--", *map(str, paths)], cwd=repo, env=env, check=True)
    subprocess.run(["git", "commit", "-q", "-m", "the user's own commit"], cwd=repo, env=env, check=True)
    return head(repo)


@pytest.mark.slow
def test_moectl_commit_while_the_runs_own_commit_waits_for_git_is_refused_and_the_report_is_committed_once(
        git_repo, hold_index_lock, monkeypatch, artifact_root, tmp_path):
    """Audit L #2: `moectl commit RUN` while that run's own moectl waited for index.lock to commit
    its report. Both waited; whichever went second made a second `report: ...` commit (of
    EXPERIMENTS.md alone, said as the report's and recorded as its commit), or found nothing to
    commit and recorded `commit: null` over the other's. Now `moectl commit` refuses at once (its
    own moectl commits it) and the run's commit is the one commit of the report."""
    from tests.conftest import wait_for
    from tests.test_run import commit_config, write_config

    write_config(git_repo)
    commit_config(git_repo, monkeypatch)
    head0 = head(git_repo)
    holder = hold_index_lock()
    proc, out, run_dir, report = _run_waiting_for_the_index_lock(git_repo, tmp_path, "racing")
    cout = tmp_path / "commit.out"
    env = {**os.environ, "MOECTL_GIT_LOCK_WAIT": "120", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    try:
        with open(cout, "w") as fh:
            committer = subprocess.Popen([sys.executable, "-m", "moectl", "commit", run_dir.name], cwd=git_repo,
                                         env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        # (before the fix it waited for the lock too: then both go on once it is released)
        wait_for(lambda: committer.poll() is not None or "waiting for" in cout.read_text(),
                 "moectl commit refusing, or waiting for index.lock", 120)
        holder.release(waiter=True)
        assert committer.wait(timeout=120) == 3, cout.read_text()
        assert proc.wait(timeout=120) == 0, out.read_text()
    finally:
        for p in (proc, committer):
            if p.poll() is None:
                p.kill()
    said = cout.read_text()
    assert said.strip().splitlines() == [
        f"error: run {run_dir.name} has just ended and its moectl (pid {proc.pid}) is writing its report and "
        "committing it; let it finish (it commits the report itself)"], said
    rel = report.relative_to(git_repo).as_posix()
    assert git(git_repo, "rev-list", "--count", f"{head0}..HEAD").strip() == "1"  # one commit of the report
    assert sorted(git(git_repo, "show", "--name-only", "--format=", "HEAD").split()) == ["EXPERIMENTS.md", rel]
    rec = json.loads((run_dir / "run.json").read_text())
    assert (rec["commit"], rec["commit_error"], rec["report"]) == (head(git_repo), None, str(report))
    assert f"committed {head(git_repo)[:10]} ({report.name}, EXPERIMENTS.md; nothing else)" in out.read_text()
    again = commit_cmd(run_dir.name)  # its moectl is done: already committed
    assert again.exit_code == 0 and f"already committed in {head(git_repo)[:10]}" in again.stdout, again.output


@pytest.mark.slow
@pytest.mark.parametrize("summary", [True, False])
def test_a_run_whose_report_was_committed_by_someone_else_while_it_waited_records_that_commit_and_says_so(
        git_repo, hold_index_lock, monkeypatch, artifact_root, tmp_path, summary):
    """Audit L #2: the report committed by another process while the run's commit waited for git.
    The run then committed EXPERIMENTS.md alone under its report's subject and recorded that as the
    report's commit, or (nothing left to commit, `[report] summary = false`) recorded no commit and
    said nothing. Now it commits nothing, records the commit that holds its report, and says so."""
    from tests.test_run import commit_config, write_config

    write_config(git_repo)
    if not summary:
        with (git_repo / ".moectl.toml").open("a") as fh:
            fh.write("\n[report]\nsummary = false\n")
    commit_config(git_repo, monkeypatch)
    holder = hold_index_lock()
    proc, out, run_dir, report = _run_waiting_for_the_index_lock(git_repo, tmp_path, "found", summary)
    try:
        theirs = _commit_with_own_index(git_repo, tmp_path, report)
        holder.release(waiter=True)
        assert proc.wait(timeout=120) == 0, out.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert head(git_repo) == theirs, git(git_repo, "log", "--oneline", "-3")  # no second commit
    rec = json.loads((run_dir / "run.json").read_text())
    assert (rec["commit"], rec["commit_error"], rec["report"], rec["commit_found"]) == (theirs, None, str(report), True)
    said = out.read_text()
    assert f"report already committed in {theirs[:10]}, not by this run; nothing committed" in said, said
    assert "committed " + theirs[:10] + " (" not in said
    # Nothing of moectl's is left changed in the tree: the EXPERIMENTS.md it refreshed for a commit
    # it then did not make is put back, as after a commit that failed.
    assert "EXPERIMENTS.md" not in git(git_repo, "status", "--porcelain"), git(git_repo, "status", "--porcelain")
    shown = commit_cmd(run_dir.name)
    assert shown.exit_code == 0 and f"already committed in {theirs[:10]}" in shown.stdout, shown.output


@pytest.mark.slow
def test_what_a_run_says_it_committed_is_what_its_commit_holds(git_repo, hold_index_lock, monkeypatch, artifact_root,
                                                                 tmp_path):
    """Audit L #3: EXPERIMENTS.md committed as the run refreshed it (a `moectl summary`) while the
    run's commit waited for git: the run's commit holds the report alone, but it said
    `committed X (REPORT, EXPERIMENTS.md; nothing else)` - the list it meant to commit."""
    from tests.test_run import commit_config, write_config

    write_config(git_repo)
    commit_config(git_repo, monkeypatch)
    holder = hold_index_lock()
    proc, out, run_dir, report = _run_waiting_for_the_index_lock(git_repo, tmp_path, "held")
    try:
        _commit_with_own_index(git_repo, tmp_path, git_repo / "EXPERIMENTS.md")
        holder.release(waiter=True)
        assert proc.wait(timeout=120) == 0, out.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    rel = report.relative_to(git_repo).as_posix()
    assert git(git_repo, "show", "--name-only", "--format=", "HEAD").split() == [rel]
    said = out.read_text()
    assert f"committed {head(git_repo)[:10]} ({report.name}; nothing else)" in said, said
    assert json.loads((run_dir / "run.json").read_text())["commit"] == head(git_repo)


# ------------------------------------------------------- a moectl killed in the middle of a commit


def _killed_mid_commit(repo: Path, tmp_path: Path, when: str) -> None:
    """`commit_paths(r1.md)` in a process SIGKILLed `before` or `after` its `git update-ref` (a git
    stand-in first on PATH holds there): the lock, the staged index and the owner note left as a
    power cut would leave them."""
    import shutil

    real_git, bin_dir, mark = shutil.which("git"), tmp_path / "bin", tmp_path / "held"
    bin_dir.mkdir()
    hold = f'touch {mark}; exec sleep 600'
    (bin_dir / "git").write_text(
        "#!/bin/sh\ncase \" $* \" in *\" update-ref \"*)\n"
        + (f"  {hold}\n" if when == "before" else f"  {real_git} \"$@\"; {hold}\n")
        + f"esac\nexec {real_git} \"$@\"\n")
    (bin_dir / "git").chmod(0o755)
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r}); from pathlib import Path; "
            f"from moectl.gitops import commit_paths; repo = Path({str(repo)!r}); "
            f"commit_paths(repo, [repo / 'r1.md'], 'report: r1', branch='main', wait_s=0)")
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
                            start_new_session=True)
    try:
        deadline = time.monotonic() + EVENT_TIMEOUT_S
        while not mark.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the commit never reached update-ref"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # moectl and its git, at once
        proc.wait()


@pytest.mark.parametrize("when", ["before", "after"])
def test_the_next_commit_finishes_or_undoes_the_commit_of_a_killed_moectl(git_repo, tmp_path, when):
    # Killed holding index.lock: git's own crashed lock waits for a person, and a person removing
    # this one by hand after the branch moved would make their next commit revert the report.
    user_mess(git_repo)
    (git_repo / "r1.md").write_text("report one\n")
    before, entries, head0 = snapshot(git_repo), index_entries(git_repo), head(git_repo)
    _killed_mid_commit(git_repo, tmp_path, when)
    assert (git_repo / ".git" / "index.lock").exists() and (git_repo / ".git" / "moectl-index.lock.owner").exists()
    landed = head(git_repo) != head0
    assert landed == (when == "after")

    (git_repo / "r2.md").write_text("report two\n")
    sha = commit_paths(git_repo, [git_repo / "r2.md"], "report: r2", branch="main", wait_s=0)  # no wait, no GitBusy
    assert sha == head(git_repo) and git(git_repo, "rev-parse", "HEAD~2" if landed else "HEAD~1").strip() == head0
    committed = git(git_repo, "ls-tree", "--name-only", "HEAD").split()
    assert "r2.md" in committed and ("r1.md" in committed) == landed
    # The user's index and files exactly as before, only our files' entries changed; nothing left over.
    assert without(index_entries(git_repo), "r1.md", "r2.md") == entries
    status = git(git_repo, "status", "--porcelain=v1", "--untracked-files=all")
    assert ("?? r1.md" in status) == (not landed) and " r1.md" not in status.replace("?? r1.md", "")
    assert "r2.md" not in status
    leftovers = [p.name for p in (git_repo / ".git").iterdir() if p.name.startswith(("index.lock", "moectl-index-"))
                 or p.name == "moectl-index.lock.owner"]
    assert leftovers == [], leftovers
    if landed:  # the killed commit is the parent of ours, whole
        assert git(git_repo, "show", "--name-only", "--format=%s", "HEAD~1").split() == ["report:", "r1", "r1.md"]
    # and the user's own work: as it was, but for our two reports
    assert [x for x in snapshot(git_repo)[0].split("\0") if "r1.md" not in x and "r2.md" not in x] == \
        [x for x in before[0].split("\0") if "r1.md" not in x]
    assert snapshot(git_repo)[1:] == before[1:]


def test_stopped_after_the_branch_moved_the_index_still_goes_in(git_repo, monkeypatch):
    # Ctrl-C / SIGTERM (KeyboardInterrupt) landing as `git update-ref` returns: the branch holds the
    # report, so the staged index must go in too - dropping the lock left a commit the index did not
    # know about, and the user's next `git commit -a` reverted the report.
    import moectl.gitops as gitops

    user_mess(git_repo)
    before, head0 = snapshot(git_repo), head(git_repo)
    (git_repo / "r1.md").write_text("report one\n")
    real_run = gitops._run

    def interrupted_after_update_ref(repo, args, env=None):
        r = real_run(repo, args, env)
        if args[:1] == ["update-ref"] and r.returncode == 0:
            raise KeyboardInterrupt
        return r

    monkeypatch.setattr(gitops, "_run", interrupted_after_update_ref)
    with pytest.raises(KeyboardInterrupt):
        commit_paths(git_repo, [git_repo / "r1.md"], "report: r1", branch="main", wait_s=0)
    monkeypatch.setattr(gitops, "_run", real_run)
    assert git(git_repo, "rev-parse", "HEAD~1").strip() == head0  # the commit landed ...
    assert "r1.md" not in git(git_repo, "status", "--porcelain=v1", "--untracked-files=all")  # ... and the index knows it
    assert snapshot(git_repo)[1:] == before[1:]
    assert not (git_repo / ".git" / "index.lock").exists() and not (git_repo / ".git" / "moectl-index.lock.owner").exists()


def test_a_lock_that_is_not_the_dead_moectls_own_is_left_alone(git_repo, tmp_path):
    # The killed moectl's note says which lock file was its own (its inode): a lock the user's git
    # took since is not touched - moectl waits for it as for any git, then gives up.
    (git_repo / "r1.md").write_text("report one\n")
    _killed_mid_commit(git_repo, tmp_path, "before")
    lock = git_repo / ".git" / "index.lock"
    os.link(lock, tmp_path / "old-lock")  # (kept, so its inode number cannot be handed out again)
    lock.unlink()  # removed by hand ...
    lock.write_bytes(b"someone else's\n")  # ... and taken by another git (a new file)
    note_file = git_repo / ".git" / "moectl-index.lock.owner"
    note = json.loads(note_file.read_text())
    assert os.stat(lock).st_ino != note["ino"]
    with pytest.raises(GitBusy):
        commit_paths(git_repo, [git_repo / "r1.md"], "report: r1", branch="main", wait_s=0.2)
    assert lock.read_bytes() == b"someone else's\n"
    # ... also when the file system hands the new lock the dead one's inode number (ext4 does, at
    # once): the change time tells the files apart. (The note made to say the reused number.)
    note_file.write_text(json.dumps({**note, "ino": os.stat(lock).st_ino, "dev": os.stat(lock).st_dev}))
    with pytest.raises(GitBusy):
        commit_paths(git_repo, [git_repo / "r1.md"], "report: r1", branch="main", wait_s=0.2)
    assert lock.read_bytes() == b"someone else's\n"


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("command", ["summary", "status", "commit"])
def test_a_killed_moectls_lock_is_recovered_by_commands_with_nothing_to_commit(project, tmp_path, command, when):
    # `summary` with nothing new, `commit` of a committed report, `status`: none takes the index lock,
    # so none recovered a killed moectl's - which then blocked every git command of the user's, and
    # (killed after the branch moved) `git status` showed the commit undone in the stale index.
    user_mess(project)
    rec, report = finished_run(project)
    assert runner.invoke(app, ["commit", rec.id]).exit_code == 0  # the report and EXPERIMENTS.md: in HEAD
    assert runner.invoke(app, ["summary"]).exit_code == 0
    entries = without(index_entries(project), "r1.md")
    (project / "r1.md").write_text("report one\n")
    _killed_mid_commit(project, tmp_path, when)
    lock, note = project / ".git" / "index.lock", project / ".git" / "moectl-index.lock.owner"
    assert lock.exists() and note.exists()

    r = runner.invoke(app, {"summary": ["summary"], "status": ["status", "--json"], "commit": ["commit", rec.id]}[command])
    assert r.exit_code == 0, r.output
    said = json.loads(r.stdout)["git"]["index_lock"] if command == "status" else r.stderr
    assert f"recovered {lock}, left by a killed moectl" in said, r.output
    assert ("the index it staged went in" if when == "after" else "the lock was removed") in said
    assert not lock.exists() and not note.exists()
    assert git(project, "status", "--porcelain", "--", "r1.md") == ("" if when == "after" else "?? r1.md\n")
    assert without(index_entries(project), "r1.md") == entries  # the user's index: as it was
    if command == "status":  # counted after the recovery: the user's own staged files, not a phantom
        assert json.loads(r.stdout)["git"]["staged"] == len(git(project, "diff", "--cached", "--name-only").split())


@pytest.mark.slow
def test_a_run_recovers_a_killed_moectls_lock_before_its_guards_and_git_diff(project, tmp_path):
    """Left alone until the run's own commit, the stale index made the run's git.diff (and its
    `dirty` flag) describe a half-made commit of someone else's, not the user's tree."""
    user_mess(project)
    rec, report = finished_run(project)
    assert runner.invoke(app, ["commit", rec.id]).exit_code == 0
    (project / "r1.md").write_text("report one\n")
    _killed_mid_commit(project, tmp_path, "after")
    lock = project / ".git" / "index.lock"
    r = runner.invoke(app, ["run", "--device", "cpu", "--steps", "2", "--no-commit", "--override", "no_other_training"])
    assert r.exit_code == 0, r.output
    assert f"note: recovered {lock}, left by a killed moectl" in r.stderr and not lock.exists()
    [exp] = [d for d in load_config(None).artifact_root.iterdir() if (d / "run.json").exists() and d.name != rec.id]
    assert "r1.md" not in (exp / "git.diff").read_text()  # committed by the recovery: not an uncommitted change


def test_status_names_an_index_lock_that_is_not_a_killed_moectls_and_leaves_it(project):
    lock = project / ".git" / "index.lock"
    lock.write_bytes(b"")  # the user's git, or a crashed one: not moectl's to remove
    r = runner.invoke(app, ["status", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["git"]["index_lock"].startswith(f"{lock} exists: another git process holds it")
    r = runner.invoke(app, ["status"])
    assert f"git lock    {lock} exists" in r.stdout and lock.exists()
