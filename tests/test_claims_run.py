"""README claims about `moectl run` that only an end-to-end run can check: `--baseline/--notes`
(the comparison in the report, the `(+x.xx% vs BASE)` commit subject), `--no-commit`, a report
written but not committed because the branch changed during the run, and exit 1 for an internal
error. Real git repositories, real torchrun (gloo, CPU), the fake engine as the trainer.

Expected figures come from the runs' own metrics.jsonl, read here with json and averaged here,
never from moectl's summaries or formatters. `--override no_other_training`: other sessions may
be training on this machine, and that guard is not the subject of these tests.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moectl.cli import app
from moectl.lock import LOCK_NAME
from tests.conftest import git, wait_for
from tests.test_run import commit_config, write_config

REPO = Path(__file__).resolve().parents[1]
QUIET = ["--override", "no_other_training"]
WINDOW = 5  # [metrics] window: well clear of any warm-up steps in 20-step runs
DEADLINE_S = 180.0
runner = CliRunner()


def configure(repo: Path, monkeypatch) -> Path:
    """test_run's fake-engine project, with a small tail window."""
    write_config(repo, launch=f"\n[metrics]\nwindow = {WINDOW}\n")
    return commit_config(repo, monkeypatch)


@pytest.fixture
def proj(git_repo: Path, monkeypatch) -> Path:
    return configure(git_repo, monkeypatch)


def run(*args: str):
    return runner.invoke(app, ["run", *args])


def head(repo: Path) -> str:
    return git(repo, "rev-parse", "HEAD").strip()


def run_dir(artifact_root: Path, tag: str) -> Path:
    [found] = [p.parent for p in artifact_root.glob(f"*_moe-{tag}/run.json")]
    return found


def tail_tok_per_sec(exp: Path) -> float:
    """The mean tok/sec of the last WINDOW steps in metrics.jsonl, computed here."""
    steps = {}
    for line in (exp / "metrics.jsonl").read_text().splitlines():
        obj = json.loads(line)
        if obj.get("type", "step") == "step":
            steps[obj["step"]] = obj["tok_per_sec"]
    assert len(steps) == 20, sorted(steps)
    tail = [steps[k] for k in sorted(steps)[-WINDOW:]]
    return sum(tail) / len(tail)


def user_state(repo: Path, ignore: tuple[str, ...] = ()) -> dict[str, str]:
    """The user's worktree and index as git sees them, minus the paths moectl writes."""
    def keep(line: str) -> bool:
        return not any(p in line for p in ignore)

    return {
        "status": "\n".join(filter(keep, git(repo, "status", "--porcelain=v1", "-uall").splitlines())),
        "cached": git(repo, "diff", "--cached", "--binary"),
        "unstaged": git(repo, "diff", "--binary", "--", ".", *[f":!{p}" for p in ignore]),
        "index": git(repo, "ls-files", "-s"),
    }


def dirty_the_tree(repo: Path) -> None:
    (repo / "tracked.txt").write_text("v1\n")
    git(repo, "add", "tracked.txt")
    git(repo, "commit", "-q", "-m", "tracked")
    (repo / "tracked.txt").write_text("v2, unstaged\n")
    (repo / "staged.txt").write_text("staged\n")
    git(repo, "add", "staged.txt")
    (repo / "scratch.txt").write_text("untracked\n")


# ------------------------------------------------------------------------- --baseline and --notes


@pytest.mark.slow
def test_baseline_and_notes_reach_the_report_and_the_commit_subject(proj, artifact_root):
    r = run("--steps", "20", "--tag", "base", *QUIET, "--", "--sleep-per-step", "0.03")
    assert r.exit_code == 0, r.output
    base = tail_tok_per_sec(run_dir(artifact_root, "base"))

    for tag, sleep, sign in (("fast", "0.003", "+"), ("slow", "0.12", "-")):
        notes = f"hypothesis for {tag}: sleeping {sleep}s a step changes tok/sec"
        before = head(proj)
        r = run("--steps", "20", "--tag", tag, "--baseline", "base", "--notes", notes, *QUIET,
                "--", "--sleep-per-step", sleep)
        assert r.exit_code == 0, r.output
        value = tail_tok_per_sec(run_dir(artifact_root, tag))
        delta = (value - base) / base * 100
        assert f"{delta:+.2f}".startswith(sign), (tag, base, value)  # the runs differ as designed

        subject = git(proj, "log", "-1", "--format=%s").strip()
        assert git(proj, "rev-parse", "HEAD~1").strip() == before
        assert subject.startswith("report: ") and tag in subject, subject
        assert subject.endswith(f" — {value:.0f} tok/s ({delta:+.2f}% vs base)"), (subject, value, delta)

        [report] = [p for p in (proj / "reports").glob(f"*_{tag}.md")]
        text = report.read_text()
        assert f"## Notes\n\n{notes}\n" in text
        assert "## Against the baseline" in text
        table = text[text.index("## Against the baseline"):]
        [base_row] = [ln for ln in table.splitlines() if ln.startswith("| base (baseline) |")]
        [row] = [ln for ln in table.splitlines() if ln.startswith(f"| {tag} |")]
        tok_cell = row.split("|")[3].strip()  # | run | steps | tok/sec | ...
        assert tok_cell.startswith(f"{value:.2f} ±") and f"({delta:+.2f}%" in tok_cell, (tok_cell, value, delta)
        assert base_row.split("|")[3].strip().startswith(f"{base:.2f} ±")
        assert "baseline `base`" in table  # the legend names the baseline the deltas are against
        assert json.loads((run_dir(artifact_root, tag) / "run.json").read_text())["notes"] == notes


# ------------------------------------------------------------------------------------- --no-commit


@pytest.mark.slow
def test_no_commit_writes_the_report_and_commits_nothing(proj, artifact_root):
    dirty_the_tree(proj)
    before, old_head = user_state(proj), head(proj)
    r = run("--steps", "3", "--tag", "nc", "--no-commit", *QUIET, "--", "--sleep-per-step", "0.01")
    assert r.exit_code == 0, r.output
    [report] = list((proj / "reports").glob("*_nc.md"))
    assert "completed" in report.read_text() and run_dir(artifact_root, "nc").name in report.read_text()
    assert f"report: {report}" in r.stdout and "committed" not in r.stdout
    assert head(proj) == old_head and git(proj, "rev-parse", "main").strip() == old_head
    rel = report.relative_to(proj).as_posix()
    assert f"?? {rel}" in git(proj, "status", "--porcelain=v1", "-uall").splitlines()  # on disk, untracked
    assert rel not in git(proj, "ls-files")
    # The user's files and index exactly as they were (EXPERIMENTS.md is moectl's, refreshed on disk).
    assert user_state(proj, ignore=(rel, "EXPERIMENTS.md")) == before
    assert not (artifact_root / LOCK_NAME).exists()


# --------------------------------------------------------------- the branch changes during the run


@pytest.mark.slow
@pytest.mark.parametrize("project_branch", ["main", "*"])
def test_branch_switched_during_the_run_leaves_the_report_written_but_not_committed(git_repo, monkeypatch,
                                                                                     artifact_root, tmp_path,
                                                                                     project_branch):
    # The trainer holds before its first step until the go-file exists: the test acts while the run
    # is in flight (its guards passed, its record says running), with no race against its speed.
    # `branch = "*"` lets a run start on any branch; its report still belongs to the one it ran on.
    proj = configure(git_repo, monkeypatch)
    if project_branch == "*":
        cfg_file = proj / ".moectl.toml"
        cfg_file.write_text(cfg_file.read_text().replace('branch = "main"', 'branch = "*"'))
        assert 'branch = "*"' in cfg_file.read_text()
        git(proj, "commit", "-q", "-am", "any branch")
    runner.invoke(app, ["summary"])  # EXPERIMENTS.md tracked on main, as after any earlier run
    assert "EXPERIMENTS.md" in git(proj, "ls-files")
    gate = tmp_path / "go"
    launch_head = head(proj)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "moectl", "run", "--steps", "3", "--tag", "moved", *QUIET,
                             "--", "--sleep-per-step", "0.01", "--hold-at-step", "0", "--hold-until", str(gate)],
                            cwd=proj, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(Path(f"{gate}.waiting").exists, "the trainer starting (guards passed, record running)",
                 DEADLINE_S, proc=proc)
        git(proj, "switch", "-q", "-c", "other")  # the user moves on while the run trains
        gate.touch()
        out, err = proc.communicate(timeout=DEADLINE_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=DEADLINE_S)

    # The run itself completed and says so: the exit code is the run's (SPEC §8), not the commit's.
    assert proc.returncode == 0, (out, err)
    exp = run_dir(artifact_root, "moved")
    assert json.loads((exp / "run.json").read_text())["status"] == "completed"
    assert "completed: " + exp.name in out
    # The report is on disk ...
    [report] = list((proj / "reports").glob("*_moved.md"))
    assert "completed" in report.read_text()
    assert f"report: {report}" in out
    # ... but committed on neither branch, and the reason is one clear line on stderr.
    assert head(proj) == launch_head and git(proj, "rev-parse", "main").strip() == launch_head
    assert git(proj, "symbolic-ref", "--short", "HEAD").strip() == "other"
    assert report.relative_to(proj).as_posix() not in git(proj, "ls-files")
    [line] = [ln for ln in err.splitlines() if "not committed" in ln]
    assert line == ("error: report not committed: refusing to commit: on branch 'other', expected 'main'; "
                    f"the report is kept: commit it with `moectl commit {exp.name}` once that is resolved"), err
    assert "Traceback" not in err and "committed " not in out
    assert not (artifact_root / LOCK_NAME).exists()
    # Nothing tracked was rewritten on the other branch (EXPERIMENTS.md): the way back is open.
    assert git(proj, "status", "--porcelain", "--untracked-files=no") == ""
    git(proj, "switch", "-q", "main")
    r = runner.invoke(app, ["commit", exp.name])
    assert r.exit_code == 0 and report.relative_to(proj).as_posix() in git(proj, "show", "--name-only", "--format=", "HEAD")
    assert git(proj, "rev-parse", "other").strip() == launch_head  # nothing landed on the other branch


# ------------------------------------------------------------------------------- exit 1: internal


def test_git_failing_under_moectl_is_an_internal_error_exit_1(proj, artifact_root):
    """A repository whose object store is damaged: `git status` (the guards) still works, but
    `git diff HEAD` (the launch recording git.diff) cannot read the blob. Nothing the user typed is
    wrong: exit 1, one line, no traceback, and the record says what happened."""
    (proj / "data.txt").write_text("committed content\n")
    git(proj, "add", "data.txt")
    git(proj, "commit", "-q", "-m", "data")
    blob = git(proj, "rev-parse", "HEAD:data.txt").strip()
    obj = proj / ".git" / "objects" / blob[:2] / blob[2:]
    obj.chmod(0o644)
    obj.write_bytes(b"this is not a zlib stream")
    (proj / "data.txt").write_text("changed in the worktree\n")  # so the diff must read the blob
    old_head = head(proj)

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "moectl", "run", "--steps", "2", "--tag", "ie", *QUIET],
                       cwd=proj, env=env, capture_output=True, text=True, timeout=DEADLINE_S)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: git diff failed: "), r.stderr
    assert blob in lines[0]  # it names what could not be read
    # The run directory was created and its record does not claim it is still starting.
    rec = json.loads((run_dir(artifact_root, "ie") / "run.json").read_text())
    assert rec["status"] == "failed" and "git diff failed" in rec["error"] and rec["finished_at"]
    assert not (artifact_root / LOCK_NAME).exists()
    assert head(proj) == old_head and not (proj / "reports").exists()
