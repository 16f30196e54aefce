"""`moectl run` end to end: real git repositories, real torchrun (gloo, CPU), real records on disk.

Most runs use `tests.fixtures.fake_engine` as `launch.module` (same metrics contract as the engine,
no torch in the worker, steps of a few ms); one test runs the real engine's `tiny` preset. Output
and exit codes go through CliRunner; signals are in test_run_signals.py (real subprocesses).

Other test sessions may run torchrun on this machine at the same time, and the `no_other_training`
guard rightly sees their processes. Runs whose subject is not that guard therefore pass
`--override no_other_training` (QUIET): on a quiet machine the guard passes and nothing is recorded
as overridden. Only test_live_lock_* hold the run lock from another process on purpose.
"""
from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.schema import EXIT_COMPILE_FAILED, RunSummary, StartInfo, StepMetrics, parse_line
from moectl.cli import app
from moectl.config import load_config
from moectl.lock import LOCK_NAME
from moectl.plan import GUARD_NAMES, RunRequest, plan_run
from moectl.runner import RunOutcome, fallback_request
from tests.conftest import git, gpu, readline_within, stop_process

REPO = Path(__file__).resolve().parents[1]
FAKE = "tests.fixtures.fake_engine"
QUIET = ["--override", "no_other_training"]
FAST = ["--", "--sleep-per-step", "0.01"]  # fake engine args (after `--`)
runner = CliRunner()


def write_config(repo: Path, module: str = FAKE, launch: str = "") -> None:
    """A .moectl.toml whose engine runs from this checkout (the tmp repo has no engine/ of its own)."""
    (repo / ".moectl.toml").write_text(
        '[project]\nname = "moe"\nbranch = "main"\nvenv = ""\n\n'
        f'[launch]\nmodule = "{module}"\nenv = {{ PYTHONPATH = "{REPO}", OMP_NUM_THREADS = "1" }}\n{launch}\n'
        '[defaults]\npreset = "tiny"\n'
    )


def commit_config(repo: Path, monkeypatch) -> Path:
    git(repo, "add", ".moectl.toml")
    git(repo, "commit", "-q", "-m", "moectl config")
    monkeypatch.chdir(repo)
    return repo


@pytest.fixture
def proj(git_repo: Path, monkeypatch) -> Path:
    """A real repo with a committed .moectl.toml running the fake engine; cwd inside it."""
    write_config(git_repo)
    return commit_config(git_repo, monkeypatch)


def run(*args: str):
    return runner.invoke(app, ["run", *args])


def run_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.glob("*/run.json"))


def record(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def head(repo: Path) -> str:
    return git(repo, "rev-parse", "HEAD").strip()


def commit_files(repo: Path, rev: str = "HEAD") -> set[str]:
    return set(git(repo, "show", "--name-only", "--format=", rev).split())


def tree_state(repo: Path, ignore: tuple[str, ...] = ()) -> dict[str, str]:
    """Everything about the working tree and index that moectl must leave alone. `ignore`: paths
    moectl committed (their index entries are ours and now match HEAD)."""
    index = [line for line in git(repo, "ls-files", "-s").splitlines() if line.split("\t", 1)[1] not in ignore]
    return {
        "status": git(repo, "status", "--porcelain=v1", "-uall"),
        "cached": git(repo, "diff", "--cached", "--binary"),
        "unstaged": git(repo, "diff", "--binary"),
        "index": "\n".join(index),
    }


def ours(repo: Path, report: Path) -> set[str]:
    """What moectl may commit: the report, and EXPERIMENTS.md once the summary hook refreshes it."""
    allowed = {report.relative_to(repo).as_posix()}
    if (repo / "EXPERIMENTS.md").exists():
        allowed.add("EXPERIMENTS.md")
    return allowed


def the_report(repo: Path) -> Path:
    reports = sorted((repo / "reports").glob("*.md"))
    assert len(reports) == 1, reports
    return reports[0]


def tail_mean(values: list[float], window: int = 50) -> float:
    tail = values[-window:]
    return sum(tail) / len(tail)


# ------------------------------------------------------------------------ 1. the real engine, end to end


@pytest.mark.slow
def test_real_tiny_run_end_to_end(git_repo, monkeypatch, artifact_root):
    write_config(git_repo, module="engine.train")
    commit_config(git_repo, monkeypatch)
    launch_head = head(git_repo)

    r = run("--device", "cpu", "--steps", "4", "--tag", "e2e", *QUIET)
    assert r.exit_code == 0, r.output
    [exp] = run_dirs(artifact_root)
    assert exp.name.endswith("_moe-e2e")
    rec = record(exp)
    assert rec["status"] == "completed" and rec["exit_code"] == 0 and rec["error"] is None
    assert rec["id"] == exp.name and rec["tag"] == "e2e" and Path(rec["exp_dir"]) == exp
    assert rec["argv"][:7] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m"]
    assert rec["argv"][7] == "engine.train" and rec["argv"][rec["argv"].index("--out-dir") + 1] == str(exp)
    assert {k: rec["options"][k] for k in ("preset", "steps", "device", "nproc")} == {
        "preset": "tiny", "steps": 4, "device": "cpu", "nproc": 1}
    assert rec["git"] == {"branch": "main", "commit": launch_head, "dirty": False}
    assert [g["name"] for g in rec["guards"]] == list(GUARD_NAMES)
    assert all(g["ok"] or g["name"] == "no_other_training" for g in rec["guards"]), rec["guards"]
    assert rec["host"] == socket.gethostname() and rec["started_at"] and rec["finished_at"]
    assert rec["repo"] == str(git_repo.resolve())  # EXPERIMENTS.md of another project sharing the store leaves it out
    # the --override given is recorded whether or not its guard failed (SPEC §5); the guard says which
    assert rec["overrides"] == ["no_other_training"]
    assert rec["torch_version"]  # from the engine's start line
    # The engine's resolved configuration (the preset's settings, not only the flags we passed).
    assert rec["engine"]["preset"] == "tiny" and rec["engine"]["steps"] == rec["options"]["steps"]
    assert rec["engine"]["n_experts"] >= rec["engine"]["top_k"] >= 1 and "out_dir" not in rec["engine"]

    # The files of SPEC §6, each holding what it should.
    cmd = (exp / "command.txt").read_text()
    assert shlex.split(cmd)[:3] == ["cd", str(git_repo), "&&"]  # pasted from anywhere: the module is found from there
    # cd ... && PYTHONPATH=... OMP_NUM_THREADS=1 CUDA_VISIBLE_DEVICES= <argv>  (a cpu run sees no GPU)
    assert shlex.split(cmd)[5:] == ["CUDA_VISIBLE_DEVICES=", *rec["argv"]]
    assert (exp / "git.diff").read_text() == ""  # a clean tree at launch
    lines = [parse_line(x) for x in (exp / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if isinstance(x, StepMetrics)]
    assert isinstance(lines[0], StartInfo) and isinstance(lines[-1], RunSummary) and len(steps) == 4
    assert "step 00003/00004" in (exp / "train.log").read_text()
    s = rec["summary"]
    assert s["steps"] == 4 and s["window"] == 50
    assert s["tok_per_sec"] == pytest.approx(tail_mean([x.tok_per_sec for x in steps]))
    assert s["final_loss"] == pytest.approx(steps[-1].loss)
    assert "progress: step 4/4" in r.stdout  # plain progress lines when not a TTY

    # The report: written, committed alone, on top of the launch commit; the tree stays clean.
    report = the_report(git_repo)
    assert "completed" in report.read_text() and exp.name in report.read_text()
    assert "Engine configuration" in report.read_text() and "| n_experts |" in report.read_text()
    assert git(git_repo, "rev-parse", "HEAD~1").strip() == launch_head
    assert commit_files(git_repo) == ours(git_repo, report)
    assert git(git_repo, "log", "-1", "--format=%s").startswith("report: ")
    assert git(git_repo, "status", "--porcelain", "-uall") == ""
    assert f"committed {head(git_repo)[:10]} ({report.name}" in r.stdout
    assert not (artifact_root / LOCK_NAME).exists()


def test_a_diverged_engine_run_counts_every_step_and_says_it_diverged(git_repo, monkeypatch, artifact_root, tmp_path):
    """lr 1e30 without clipping: the real engine's loss goes NaN within a few steps and it exits 0.
    The run stays `completed` (every step ran and was measured) but nothing reads like a healthy run:
    all 14 steps count, the final loss is NaN (null), and the record, `show`, `runs`, the report,
    `compare`, `export` and `plot` all say the loss was not finite from the step the engine wrote."""
    write_config(git_repo, module="engine.train")
    commit_config(git_repo, monkeypatch)
    r = run("--device", "cpu", "--steps", "14", "--tag", "nan", *QUIET, "--", "--lr", "1e30", "--grad-clip", "0")
    assert r.exit_code == 0, r.output
    [exp] = run_dirs(artifact_root)
    raw = [json.loads(x) for x in (exp / "metrics.jsonl").read_text().splitlines()]
    raw_steps = [x for x in raw if x.get("type") == "step"]
    first_null = next(x["step"] for x in raw_steps if x["loss"] is None)  # where the engine wrote a null loss
    n_null = sum(1 for x in raw_steps if x["loss"] is None)
    assert len(raw_steps) == 14 and raw_steps[-1]["loss"] is None  # it diverged and stayed diverged
    rec = record(exp)
    assert rec["status"] == "completed" and rec["exit_code"] == 0 and rec["notes"] is None  # no line was malformed
    s = rec["summary"]
    assert s["steps"] == 4 and s["final_loss"] is None  # steps 10-13 past the warm-up: all NaN-loss, all counted
    assert (s["loss_not_finite"], s["loss_not_finite_from"]) == (n_null, first_null)
    assert s["tok_per_sec"] == pytest.approx(tail_mean([x["tok_per_sec"] for x in raw_steps[10:]]))
    [warning] = rec["warnings"]
    assert warning.startswith(f"loss not finite from step {first_null} (diverged): {n_null} of 14 steps")
    assert "progress: finished 14 steps" in r.stdout and f"warning: {warning}" in r.stdout and "loss NaN" in r.stdout
    assert warning in the_report(git_repo).read_text()

    shown = runner.invoke(app, ["show", "nan"])
    assert shown.exit_code == 0, shown.output
    assert f"warning: {warning}" in shown.output and f"final loss NaN (not finite from step {first_null})" in shown.output
    listed = runner.invoke(app, ["runs"])
    assert listed.exit_code == 0 and f"! {rec['id']}: {warning}" in listed.output, listed.output
    fixture = REPO / "tests" / "fixtures" / "metrics_small.jsonl"  # a healthy run beside it
    assert runner.invoke(app, ["import", str(fixture), "--format", "jsonl", "--name", "healthy"]).exit_code == 0
    compared = runner.invoke(app, ["compare", "healthy", "nan", "--json"])
    assert compared.exit_code == 0, compared.output
    data = json.loads(compared.stdout, parse_constant=lambda name: pytest.fail(f"{name} in compare --json"))
    assert data["runs"][1]["metrics"]["final_loss"] == {**data["runs"][1]["metrics"]["final_loss"],
                                                        "value": None, "not_finite": True}
    assert any(note.startswith("diverged: nan") for note in data["notes"])
    exported = runner.invoke(app, ["export", "nan", "--csv", str(tmp_path / "csv")])
    assert exported.exit_code == 0, exported.output
    steps_csv = (tmp_path / "csv" / "steps.csv").read_text().splitlines()
    assert len(steps_csv) == 1 + 14 and sum(1 for line in steps_csv if ",nan," in line) == n_null
    assert ",nan," in (tmp_path / "csv" / "summary.csv").read_text().splitlines()[1]
    pytest.importorskip("matplotlib")
    plotted = runner.invoke(app, ["plot", "nan", "-m", "loss", "-o", str(tmp_path / "loss.png")])
    assert plotted.exit_code == 0, plotted.output
    assert f"loss not finite at {n_null} of 14 steps (from step {first_null}); not drawn" in plotted.output


# --------------------------------------------------------------------------- 2. commit only our files


@pytest.mark.slow
def test_commit_leaves_staged_modified_and_untracked_user_files_alone(proj, artifact_root):
    (proj / "a.txt").write_text("a1\n")
    (proj / "b.txt").write_text("b1\n")
    git(proj, "add", "a.txt", "b.txt")
    git(proj, "commit", "-q", "-m", "user files")
    (proj / "a.txt").write_text("a2 unstaged\n")  # unstaged modification
    (proj / "b.txt").write_text("b2 staged\n")
    git(proj, "add", "b.txt")
    (proj / "b.txt").write_text("b3 staged then modified again\n")  # staged, then modified again
    (proj / "new.txt").write_text("new, staged\n")
    git(proj, "add", "new.txt")  # staged new file
    (proj / "reports").mkdir()
    (proj / "reports" / "draft.md").write_text("my notes, untracked, inside report_dir\n")
    (proj / "scratch.txt").write_text("untracked\n")
    before, old_head = tree_state(proj), head(proj)
    diff_at_launch = git(proj, "diff", "HEAD", "--no-color", "--binary")

    r = run("--steps", "3", "--tag", "dirty", *QUIET, *FAST)
    assert r.exit_code == 0, r.output

    report = next(p for p in (proj / "reports").glob("*.md") if p.name != "draft.md")
    # porcelain, the user's index entries, staged and unstaged diffs: all identical
    assert tree_state(proj, ignore=tuple(ours(proj, report))) == before
    assert report.relative_to(proj).as_posix() in git(proj, "ls-files")  # our entry: tracked now
    assert git(proj, "rev-parse", "HEAD~1").strip() == old_head
    assert commit_files(proj) == ours(proj, report)
    # The user's work is not in the new commit's tree either.
    assert git(proj, "show", "HEAD:a.txt") == "a1\n" and git(proj, "show", "HEAD:b.txt") == "b1\n"
    assert "new.txt" not in git(proj, "ls-tree", "-r", "--name-only", "HEAD").split()
    assert (proj / "reports" / "draft.md").read_text().startswith("my notes")

    [exp] = run_dirs(artifact_root)
    # Tracked changes exactly as `git diff HEAD` saw them, then the untracked files as new files.
    recorded = (exp / "git.diff").read_text()
    assert recorded.startswith(diff_at_launch.rstrip("\n") + "\n")
    assert "+my notes, untracked, inside report_dir" in recorded and "+untracked" in recorded
    assert "a2 unstaged" in diff_at_launch and "b3 staged then modified again" in diff_at_launch
    assert record(exp)["git"]["dirty"] is True
    assert "dirty: see git.diff" in report.read_text()


@pytest.mark.slow
def test_the_users_edit_of_experiments_md_survives_a_run_whose_report_is_committed(proj, artifact_root):
    # EXPERIMENTS.md is the one tracked file moectl rewrites: a note of the user's in it, staged and
    # then edited again, is theirs (SPEC §9) - the run commits its report and leaves that file alone.
    assert run("--steps", "3", "--tag", "first", *QUIET, *FAST).exit_code == 0
    doc = proj / "EXPERIMENTS.md"
    assert "EXPERIMENTS.md" in git(proj, "ls-files")
    with open(doc, "a") as fh:
        fh.write("\nNOTE staged\n")
    git(proj, "add", "EXPERIMENTS.md")
    with open(doc, "a") as fh:
        fh.write("NOTE not staged\n")
    before, old_head = tree_state(proj), head(proj)

    r = run("--steps", "3", "--tag", "second", *QUIET, *FAST)
    assert r.exit_code == 0, r.output
    assert "EXPERIMENTS.md not refreshed: EXPERIMENTS.md has changes staged in the index" in r.output
    report = next(p for p in (proj / "reports").glob("*.md") if "second" in p.name)
    assert commit_files(proj) == {report.relative_to(proj).as_posix()}
    assert git(proj, "rev-parse", "HEAD~1").strip() == old_head
    assert tree_state(proj, ignore=(report.relative_to(proj).as_posix(),)) == before


@pytest.mark.slow
def test_non_utf8_content_and_file_names_do_not_stop_status_check_or_run(proj, artifact_root):
    """A tracked file modified with latin-1 bytes, an untracked latin-1 file and an untracked file
    whose name is not UTF-8: status, check and run all work, git.diff holds git's own bytes, and
    the commit holds moectl's files alone."""
    def gitb(*args: str) -> bytes:
        return subprocess.run(["git", "-C", str(proj), *args], capture_output=True, check=True, timeout=60).stdout

    (proj / "model.py").write_bytes(b"# caf\xe9\n")
    git(proj, "add", "model.py")
    git(proj, "commit", "-q", "-m", "a latin-1 source file")
    (proj / "model.py").write_bytes(b"# caf\xe9 cr\xe8me\n")  # tracked, modified
    (proj / "latin1.txt").write_bytes(b"caf\xe9\n")  # untracked
    (proj / os.fsdecode(b"bad\xffname")).write_bytes(b"odd name\n")  # untracked, name not UTF-8
    status0, old_head = gitb("status", "--porcelain=v1", "-z", "--untracked-files=all"), head(proj)
    diff_at_launch = gitb("diff", "HEAD", "--no-color", "--binary")

    st = runner.invoke(app, ["status", "--json"])
    assert st.exit_code == 0, st.output
    assert {k: json.loads(st.stdout)["git"][k] for k in ("dirty", "staged", "untracked")} == \
        {"dirty": True, "staged": 0, "untracked": 2}
    ch = runner.invoke(app, ["check", "--device", "cpu", *QUIET])
    assert ch.exit_code == 0, ch.output

    r = run("--device", "cpu", "--steps", "3", "--tag", "latin1", *QUIET, *FAST)
    assert r.exit_code == 0, r.output
    [exp] = run_dirs(artifact_root)
    assert record(exp)["status"] == "completed" and record(exp)["exit_code"] == 0
    recorded = (exp / "git.diff").read_bytes()
    assert recorded.startswith(diff_at_launch)
    assert b"+caf\xe9\n" in recorded and b'"b/bad\\377name"' in recorded and b"+odd name\n" in recorded
    report = the_report(proj)
    assert git(proj, "rev-parse", "HEAD~1").strip() == old_head
    assert commit_files(proj) == ours(proj, report)
    assert gitb("status", "--porcelain=v1", "-z", "--untracked-files=all") == status0


# ------------------------------------------------------------------------------ 3. dry run and refusals


def test_dry_run_prints_command_and_guards_and_writes_nothing(proj, artifact_root):
    before, old_head = tree_state(proj), head(proj)
    args = ["--steps", "3", "--exp-dir", str(artifact_root / "dry"), *QUIET, *FAST]  # same dir in both calls
    r = run("--dry-run", *args)
    assert r.exit_code == 0, r.output
    for name in GUARD_NAMES:
        assert name in r.stdout
    data = json.loads(run("--dry-run", "--json", *args).stdout)
    assert data["ok"] is True and [g["name"] for g in data["guards"]] == list(GUARD_NAMES)
    argv = data["argv"]
    env_words = " ".join(f"{k}={shlex.quote(v)}" for k, v in data["env"].items())
    assert data["env"]["OMP_NUM_THREADS"] == "1" and data["command"] == f"{env_words} {shlex.join(argv)}"
    assert argv[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert argv[argv.index("-m", 3) + 1] == FAKE and argv[-2:] == ["--sleep-per-step", "0.01"]
    assert argv[argv.index("--out-dir") + 1] == data["exp_dir"]
    assert data["exp_dir"] == str(artifact_root / "dry")
    # The text output prints the same command, as a shell line with the env additions.
    assert f"OMP_NUM_THREADS=1 CUDA_VISIBLE_DEVICES='' {shlex.join(argv)}" in " ".join(r.stdout.split())
    assert not artifact_root.exists()  # not even the root is created
    assert tree_state(proj) == before and head(proj) == old_head and not (proj / "reports").exists()


@pytest.mark.slow
def test_dry_run_command_is_exactly_what_runs_then_exp_dir_is_never_reused(proj, artifact_root):
    exp = artifact_root / "explicit"
    dry = json.loads(run("--dry-run", "--json", "--steps", "2", "--exp-dir", str(exp), *QUIET, *FAST).stdout)
    r = run("--steps", "2", "--exp-dir", str(exp), *QUIET, *FAST)
    assert r.exit_code == 0, r.output
    assert record(exp)["argv"] == dry["argv"]
    assert (exp / "command.txt").read_text().strip() == f"cd {shlex.quote(str(proj))} && {dry['command']}"
    assert record(exp)["id"] == "explicit" and json.loads(runner.invoke(app, ["show", "explicit", "--json"]).stdout)["exp_dir"] == str(exp)
    reports, old_head = sorted((proj / "reports").glob("*.md")), head(proj)

    r = run("--steps", "2", "--exp-dir", str(exp), *QUIET, *FAST)  # exists now: a refusal
    assert r.exit_code == 3
    assert "fresh_dir" in r.stdout and "already exists" in " ".join(r.stdout.split())
    assert "a guard refused the run; nothing was written" in r.stderr
    assert sorted((proj / "reports").glob("*.md")) == reports and head(proj) == old_head
    assert run_dirs(artifact_root) == [exp]


def test_a_no_commit_run_stopped_during_its_report_says_no_commit_owed(proj, artifact_root, monkeypatch):
    # It recorded "interrupted before the report was committed ... commit it with moectl commit",
    # though --no-commit never asked for a commit.
    import moectl.runner as runner_mod

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner_mod, "_commit_report", stopped)
    r = run("--steps", "2", "--no-commit", "--tag", "nc", *QUIET, *FAST)
    assert r.exit_code == 130, r.output
    [exp] = run_dirs(artifact_root)
    rec = record(exp)
    assert rec["status"] == "completed" and rec["commit"] is None and rec["commit_error"] is None
    assert Path(rec["report"]).is_file()
    assert f"error: interrupted; the report is written ({rec['report']}; --no-commit)" in r.stderr
    assert "moectl commit" not in r.stderr


@pytest.mark.parametrize("tag, said", [
    ("ñandú", "--tag 'ñandú': not usable in a directory name (use letters, digits, . _ -; not first . or -; no `..`), e.g. --tag and"),
    ("my run", "--tag 'my run': not usable in a directory name (use letters, digits, . _ -; not first . or -; no `..`), e.g. --tag my_run"),
    ("-x", "--tag '-x': not usable in a directory name (use letters, digits, . _ -; not first . or -; no `..`), e.g. --tag x"),
    ("", "--tag '': not usable in a directory name (an empty tag names nothing; leave --tag out for the default), e.g. --tag "),
    ("../../x", "--tag '../../x': not usable in a directory name"),
    ("x" * 300, "--tag: the run directory name would be 320 bytes, over the filesystem's 255"),  # 16 + "moe-" + 300
])
def test_a_tag_that_cannot_name_a_directory_is_refused_not_rewritten(proj, artifact_root, tag, said):
    # A silently rewritten tag ("ñandú" -> "and") is one `show ñandú` never finds.
    before, old_head = tree_state(proj), head(proj)
    r = run("--steps", "2", "--tag", tag, *QUIET, *FAST)
    assert r.exit_code == 2, r.output
    assert said in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not artifact_root.exists() and tree_state(proj) == before and head(proj) == old_head


def test_wrong_branch_refuses_naming_the_guard(proj, artifact_root):
    git(proj, "switch", "-q", "-c", "experiment")
    before = tree_state(proj)
    r = run("--steps", "2", *QUIET, *FAST)
    assert r.exit_code == 3
    row = next(line for line in r.stdout.splitlines() if line.startswith("git "))
    assert "FAIL" in row and "expected 'main'" in " ".join(r.stdout.split())
    assert "a guard refused the run" in r.stderr and "Traceback" not in r.output
    assert not artifact_root.exists() and tree_state(proj) == before and not (proj / "reports").exists()
    r = run("--json", "--steps", "2", *QUIET, *FAST)  # refusals in --json too, with every error's keys
    data = json.loads(r.stdout)
    assert data["ok"] is False and data["exit_code"] == 3 == r.exit_code
    assert data["error"] == "a guard refused the run; nothing was written" == r.stderr.strip().removeprefix("error: ")
    assert {g["name"] for g in data["guards"] if not (g["ok"] or g["overridden"])} == {"git"}


# ------------------------------------------------------------------------------------ 4. failed training


@pytest.mark.slow
def test_failed_training_is_recorded_reported_and_exits_4(proj, artifact_root):
    r = run("--json", "--steps", "6", "--tag", "boom", *QUIET,
            "--", "--fail-at-step", "2", "--exit-code", "4", "--sleep-per-step", "0.01")
    assert r.exit_code == 4, r.output
    out = json.loads(r.stdout)
    [exp] = run_dirs(artifact_root)
    rec = record(exp)
    assert out["id"] == rec["id"] and out["status"] == rec["status"] == "failed"
    assert rec["exit_code"] == 4  # the worker's code, read from torchrun's report
    assert "fake failure at step 2" in rec["error"]
    assert rec["summary"]["steps"] == 2  # the steps before the failure are summarised
    report = Path(out["report"])
    text = report.read_text()
    assert "— failed" in text and "## Error" in text and "fake failure at step 2" in text
    assert out["commit"] == head(proj) and commit_files(proj) == ours(proj, report)
    assert (rec["report"], rec["commit"], rec["commit_error"]) == (out["report"], out["commit"], None)  # on disk too
    assert out["previous_attempts"] == []
    assert "failed (trainer exit 4)" in git(proj, "log", "-1", "--format=%s")
    assert not (artifact_root / LOCK_NAME).exists()
    # With --json the record is stdout's; what a person (or a log tail) reads goes to stderr:
    # the guards line, the run directory, progress, and the outcome.
    assert f"run {rec['id']} -> {exp}" in r.stderr and "progress: step 1/6" in r.stderr
    assert r.stderr.strip().splitlines()[-1] == f"failed: {rec['id']} (trainer exit 4)", r.stderr


# ------------------------------------------------------------------------------- 7. --exp-dir must be new, inside


def _refused_paths(r, artifact_root: Path, before: set) -> None:
    assert r.exit_code == 3, r.output
    row = next(line for line in r.stdout.splitlines() if line.startswith("paths "))
    assert "FAIL" in row and "outside artifact_root" in " ".join(r.stdout.split())
    assert set(artifact_root.rglob("*")) == before  # nothing written


def test_exp_dir_outside_artifact_root_refused(proj, artifact_root, tmp_path):
    artifact_root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (artifact_root / "link").symlink_to(outside, target_is_directory=True)
    before = set(artifact_root.rglob("*"))
    for exp in (tmp_path / "elsewhere", artifact_root / ".." / "escape", artifact_root / "link" / "run"):
        r = run("--steps", "2", "--exp-dir", str(exp), "--override", "no_other_training", *FAST)
        _refused_paths(r, artifact_root, before)
        assert not exp.exists()
    # Not even --override can skip the path guard.
    r = run("--steps", "2", "--exp-dir", str(outside / "x"), "--override", "paths")
    assert r.exit_code == 2 and "cannot be overridden" in r.stderr
    assert list(outside.iterdir()) == [] and not (tmp_path / "elsewhere").exists()
    assert not (proj / "reports").exists()


def test_exp_dir_must_be_directly_in_artifact_root_where_the_run_store_looks(proj, artifact_root):
    # Inside the root but deeper (in another run's directory, say), a run would be missing from
    # runs/show/compare; the root itself is no run directory. The path guard says so, writing nothing.
    (artifact_root / "20260101_000000_moe-old" / "ckpt_root").mkdir(parents=True)
    before = set(artifact_root.rglob("*"))
    for exp, why in ((artifact_root / "20260101_000000_moe-old" / "ckpt_root" / "nested", "is not directly in artifact_root"),
                     (artifact_root / "sub" / "deep", "is not directly in artifact_root"),
                     (artifact_root, "is artifact_root itself")):
        r = run("--steps", "2", "--exp-dir", str(exp), "--override", "no_other_training", *FAST)
        assert r.exit_code == 3, r.output
        row = next(line for line in r.stdout.splitlines() if line.startswith("paths "))
        assert "FAIL" in row and why in " ".join(r.stdout.split()), r.stdout
        assert set(artifact_root.rglob("*")) == before


def test_an_artifact_root_or_report_dir_that_cannot_take_files_is_refused_before_training(proj, artifact_root,
                                                                                          monkeypatch):
    # Found by the paths guard, not after training (the report) or as an errno from the lock file.
    afile = proj.parent / "afile"
    afile.write_text("not a directory\n")
    monkeypatch.setenv("MOECTL_ARTIFACT_ROOT", str(afile))
    status = runner.invoke(app, ["status"])
    assert status.exit_code == 0, status.output  # status always answers
    def paths_guard() -> str:
        checked = runner.invoke(app, ["check", "--json", "--override", "no_other_training"])
        assert checked.exit_code == 3, checked.output
        [paths] = [g for g in json.loads(checked.stdout)["guards"] if g["name"] == "paths"]
        assert paths["ok"] is False
        return paths["message"]

    assert f"artifact_root: {afile} is not a directory" in paths_guard()
    r = run("--steps", "2", "--override", "no_other_training", *FAST)
    assert r.exit_code == 3 and afile.read_text() == "not a directory\n", r.output
    monkeypatch.setenv("MOECTL_ARTIFACT_ROOT", str(artifact_root))
    (proj / "reports").write_text("a file where report_dir should be\n")
    assert f"report_dir: {proj / 'reports'} is not a directory" in paths_guard()
    before = tree_state(proj)
    r = run("--steps", "2", "--override", "no_other_training", *FAST)
    assert r.exit_code == 3, r.output
    assert not artifact_root.exists() and tree_state(proj) == before


@pytest.mark.parametrize("name, said", [
    (".hidden", "its name '.hidden' becomes the run id; use letters, digits, . _ - (not first), e.g. hidden"),
    ("my exp", "its name 'my exp' becomes the run id; use letters, digits, . _ - (not first), e.g. my_exp"),
    ("x" * 300, "its name is 300 bytes, over the filesystem's 255"),
])
def test_an_exp_dir_whose_name_cannot_be_a_run_id_is_refused_before_anything_is_written(proj, artifact_root, name, said):
    r = run("--steps", "2", "--exp-dir", str(artifact_root / name), "--override", "no_other_training", *FAST)
    assert r.exit_code == 2 and said in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.output
    assert not artifact_root.exists()


def test_relative_exp_dir_resolves_against_cwd(proj, artifact_root, monkeypatch):
    artifact_root.mkdir()
    monkeypatch.chdir(artifact_root)
    data = json.loads(run("--dry-run", "--json", "--exp-dir", "rel", "--config", str(proj / ".moectl.toml"), *QUIET).stdout)
    assert data["ok"] is True and data["exp_dir"] == str(artifact_root / "rel")
    monkeypatch.chdir(proj)
    r = run("--steps", "2", "--exp-dir", "rel", *QUIET)  # relative to the repo now: outside
    _refused_paths(r, artifact_root, set())


# -------------------------------------------------------------------------- 8.-9. GPU guard: override, wait


@pytest.mark.slow
def test_override_gpus_idle_is_recorded_and_reported(proj, artifact_root, fake_nvml):
    fake_nvml(gpus=[gpu(0, util_pct=93, mem_used_mib=60000, processes=[{"pid": 4242, "name": "python", "used_mib": 59000}])])
    r = run("--device", "cuda", "--steps", "3", "--tag", "busy", "--override", "gpus_idle", *QUIET, *FAST)
    assert r.exit_code == 0, r.output
    [exp] = run_dirs(artifact_root)
    rec = record(exp)
    assert "gpus_idle" in rec["overrides"] and rec["status"] == "completed"
    g = next(g for g in rec["guards"] if g["name"] == "gpus_idle")
    assert g["ok"] is False and g["overridden"] is True and "util 93%" in g["message"]
    assert rec["gpus"] == ["NVIDIA H100 80GB HBM3"] and rec["driver"] == "580.1"
    assert rec["options"]["device"] == "cuda" and "--device" in rec["argv"]
    text = the_report(proj).read_text()
    assert "## Overrides (guards skipped knowingly)" in text and "- `gpus_idle`: GPU 0: util 93%" in text


NOT_CHECKED = "gpus_idle skipped (cpu run: GPU idleness not checked)"


def guard_table(text: str) -> dict[str, str]:
    """The guard table's rows in a command's output: guard name -> result column."""
    return {w[0]: w[1] for w in (line.split() for line in text.splitlines()) if len(w) > 1 and w[0] in GUARD_NAMES}


@pytest.mark.slow
@pytest.mark.parametrize("nvml, args, lines", [
    # (the line on a quiet machine, the line when another session's training is running here)
    ({"error": "NVML Shared Library Not Found"}, ["--device", "cpu"],
     (f"guards: 7 passed, {NOT_CHECKED}", f"guards: 6 passed, {NOT_CHECKED}, no_other_training overridden")),
    ({"gpus": [gpu(0)]}, ["--device", "cuda"], ("guards: 8 passed", "guards: 7 passed, no_other_training overridden")),
    ({"gpus": [gpu(0, util_pct=93)]}, ["--device", "cuda", "--override", "gpus_idle"],
     ("guards: 7 passed, gpus_idle overridden", "guards: 6 passed, gpus_idle overridden, no_other_training overridden")),
])
def test_a_run_that_starts_prints_its_guards_as_one_line(proj, artifact_root, fake_nvml, nvml, args, lines):
    fake_nvml(**nvml)
    r = run(*args, "--steps", "2", "--no-commit", *QUIET, *FAST)
    assert r.exit_code == 0, r.output
    [exp] = run_dirs(artifact_root)
    overridden = {g["name"] for g in record(exp)["guards"] if g["overridden"]}
    quiet, busy = lines
    out = r.stdout.splitlines()
    assert out[0] == (busy if "no_other_training" in overridden else quiet)
    assert out[1] == f"run {exp.name} -> {exp}"
    assert guard_table(r.stdout) == {} and "is valid" not in r.stdout  # no table, no guard messages


def test_dry_run_and_refusal_print_the_full_table_and_the_line(proj, artifact_root, fake_nvml):
    dry = run("--dry-run", "--device", "cpu", "--steps", "2", *QUIET, *FAST)
    assert dry.exit_code == 0, dry.output
    table = guard_table(dry.stdout)
    assert list(table) == list(GUARD_NAMES) and table["gpus_idle"] == "skipped"
    assert dry.stdout.splitlines()[-1].startswith("guards: ") and NOT_CHECKED in dry.stdout.splitlines()[-1]
    fake_nvml(gpus=[gpu(0, util_pct=93)])
    refused = run("--device", "cuda", "--steps", "2", *QUIET, *FAST)
    assert refused.exit_code == 3 and list(guard_table(refused.stdout)) == list(GUARD_NAMES)
    *_, line, last = refused.stdout.splitlines()
    assert line.startswith("guards: ") and line.endswith("gpus_idle FAILED")
    assert last == "refused: fix the FAIL lines above" and not artifact_root.exists()


def test_busy_gpu_without_override_refuses(proj, artifact_root, fake_nvml):
    fake_nvml(gpus=[gpu(0, util_pct=93)])
    r = run("--device", "cuda", "--steps", "2", *QUIET, *FAST)
    assert r.exit_code == 3 and "--override gpus_idle" in " ".join(r.stdout.split())
    assert not artifact_root.exists()


def test_wait_gpus_polls_then_refuses(proj, artifact_root, fake_nvml):
    fake_nvml(gpus=[gpu(0, mem_used_mib=30000)])
    t0 = time.monotonic()
    r = run("--device", "cuda", "--wait-gpus", "2s", "--steps", "2", *QUIET, *FAST)
    waited = time.monotonic() - t0
    assert r.exit_code == 3, r.output
    assert waited >= 2.0
    assert "waiting for gpus_idle" in r.stdout and "30000 MiB used" in " ".join(r.stdout.split())
    assert not artifact_root.exists()


@pytest.mark.parametrize("value", ["xyz", "10 minutes", "-5s"])
def test_bad_wait_gpus_is_a_usage_error(proj, artifact_root, value):
    r = run("--wait-gpus", value, "--steps", "2")
    assert r.exit_code == 2
    assert r.stderr.count("error:") == 1 and "--wait-gpus" in r.stderr and "Traceback" not in r.output
    assert not artifact_root.exists()


# ---------------------------------------------------------------------------------- 10. compile fallback


@pytest.mark.slow
def test_compile_failure_falls_back_to_compile_none(proj, artifact_root):
    r = run("--compile", "static", "--steps", "3", "--tag", "cf", *QUIET,
            "--", "--compile-fails", "--sleep-per-step", "0.01")
    assert r.exit_code == 0, r.output
    assert "re-running with --compile none" in r.stdout
    first, second = sorted(run_dirs(artifact_root), key=lambda d: record(d)["created_at"])
    a, b = record(first), record(second)
    assert (a["tag"], a["status"], a["exit_code"]) == ("cf", "failed", EXIT_COMPILE_FAILED)
    assert "fake compile failure" in a["error"]
    assert (b["tag"], b["status"], b["options"]["compile"]) == ("cf_fallback_none", "completed", "none")
    assert b["argv"][b["argv"].index("--compile") + 1] == "none" and "--compile-fails" in b["argv"]
    assert a["id"] in b["notes"] and b["summary"]["steps"] == 3
    # Each run has its own report and commit, the fallback's on top.
    assert len(list((proj / "reports").glob("*.md"))) == 2
    subjects = git(proj, "log", "-2", "--format=%s").splitlines()
    assert "cf_fallback_none" in subjects[0] and "tok/s" in subjects[0]
    assert "static cf — failed (trainer exit 3)" in subjects[1]


@pytest.mark.slow
def test_compile_fallback_json_is_one_object(proj, artifact_root):
    r = run("--json", "--compile", "dynamic", "--steps", "2", "--tag", "cj", *QUIET,
            "--", "--compile-fails", "--sleep-per-step", "0.01")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)  # one document, not one per attempt
    assert (data["tag"], data["status"], data["options"]["compile"]) == ("cj_fallback_none", "completed", "none")
    [first] = data["previous_attempts"]
    assert (first["tag"], first["status"], first["exit_code"]) == ("cj", "failed", EXIT_COMPILE_FAILED)
    assert first["commit"] == git(proj, "rev-parse", "HEAD~1").strip() and data["commit"] == head(proj)
    assert {d.name for d in run_dirs(artifact_root)} == {first["id"], data["id"]}


def _outcome(cfg, request: RunRequest, compile_failed: bool) -> RunOutcome:
    from datetime import datetime

    plan = plan_run(cfg, request, datetime(2026, 1, 1), None)
    return RunOutcome(exit_code=4, plan=plan, guards=[], compile_failed=compile_failed)


def test_fallback_request_only_for_compile_failures_with_fallback_on(proj):
    cfg = load_config()
    req = RunRequest(compile="static", tag="t", exp_dir="/somewhere/explicit", extra_args=["--seed", "3"])
    retry = fallback_request(cfg, req, _outcome(cfg, req, compile_failed=True))
    assert retry is not None
    assert (retry.compile, retry.tag, retry.exp_dir, retry.extra_args) == ("none", "t_fallback_none", None, ["--seed", "3"])
    assert "compile fallback of explicit " in retry.notes  # the failed run's id: its --exp-dir's name
    assert fallback_request(cfg, req, _outcome(cfg, req, compile_failed=False)) is None
    none_req = RunRequest(compile="none", tag="t")
    assert fallback_request(cfg, none_req, _outcome(cfg, none_req, compile_failed=True)) is None
    # A trainer of the user's own may exit 3 for its own reasons: not a compile failure to re-run.
    failed = _outcome(cfg, req, compile_failed=True)
    cfg.file.launch.options = {"compile": "--compile={}"}
    assert fallback_request(cfg, req, failed) is None
    cfg.file.launch.options = None
    assert fallback_request(cfg, req, failed) is not None
    cfg.file.launch.compile_fallback = False
    assert fallback_request(cfg, req, _outcome(cfg, req, compile_failed=True)) is None


@pytest.mark.slow
def test_compile_fallback_off_fails_with_exit_4(git_repo, monkeypatch, artifact_root):
    write_config(git_repo, launch="compile_fallback = false\n")
    commit_config(git_repo, monkeypatch)
    r = run("--compile", "static", "--steps", "2", *QUIET, "--", "--compile-fails")
    assert r.exit_code == 4 and "re-running" not in r.stdout
    assert [record(d)["status"] for d in run_dirs(artifact_root)] == ["failed"]


# -------------------------------------------------------------------------------------- 11. bad input


def test_unknown_preset_is_a_usage_error_before_anything_runs(git_repo, monkeypatch, artifact_root):
    write_config(git_repo, module="engine.train")
    commit_config(git_repo, monkeypatch)
    r = run("--preset", "d99-huge", "--steps", "2", *QUIET)
    assert r.exit_code == 2, r.output
    assert r.stderr.strip().count("\n") == 0 and "--preset" in r.stderr and "tiny" in r.stderr
    assert not artifact_root.exists() and not (git_repo / "reports").exists()


def test_negative_cap_is_one_line_exit_2(proj, artifact_root):
    r = run("--cap", "-1", "--steps", "2")
    assert r.exit_code == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith("error: --cap:")
    assert not artifact_root.exists()


def test_malformed_config_one_line_per_field(proj, artifact_root):
    (proj / ".moectl.toml").write_text(
        '[project]\nnme = "typo"\n\n[gpu]\nmax_util_pct = 500\n\n[launch]\nnproc_per_node = 0\n'
    )
    r = run("--steps", "2")
    assert r.exit_code == 2 and "Traceback" not in r.output
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith("error: invalid config .moectl.toml (3 problem(s))")
    assert sorted(line.split(":")[1].strip() for line in lines[1:]) == [
        "gpu.max_util_pct", "launch.nproc_per_node", "project.nme"]
    (proj / ".moectl.toml").write_text("[project\nname = 1\n")
    r = run("--steps", "2")
    assert r.exit_code == 2 and "malformed TOML" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not artifact_root.exists()


def test_run_help_has_examples():
    r = runner.invoke(app, ["run", "--help"])
    assert r.exit_code == 0 and "Examples:" in r.stdout and "moectl run --cap 1.0" in r.stdout


def test_preset_names_match_the_engine():
    from engine.schema import DEFAULT_PRESET, PRESET_EXPERTS, PRESET_NAMES
    from engine.train import PRESETS, build_parser  # imports torch: fine in a test, never in moectl

    assert sorted(PRESET_NAMES) == sorted(PRESETS)
    assert PRESET_EXPERTS == {name: p["n_experts"] for name, p in PRESETS.items()}
    assert build_parser().parse_args([]).preset == DEFAULT_PRESET


@pytest.mark.parametrize("defaults, args, message", [
    ("", ["--ep", "3"], "--ep 3: does not divide the 4 experts (preset tiny)"),
    ("", ["--ep", "3", "--preset", "d12-moe"], "--ep 3: does not divide the 8 experts (preset d12-moe)"),
    ("n_experts = 6\n", ["--ep", "4"], "--ep 4: does not divide the 6 experts (n_experts)"),
])
def test_an_ep_that_cannot_split_the_experts_is_refused_before_anything_is_written(git_repo, monkeypatch, artifact_root,
                                                                                   defaults, args, message):
    write_config(git_repo, module="engine.train")
    with (git_repo / ".moectl.toml").open("a") as fh:
        fh.write(defaults)  # appended to [defaults]
    commit_config(git_repo, monkeypatch)
    r = run("--device", "cpu", *QUIET, *args)
    assert r.exit_code == 2 and message in r.output, r.output
    assert run_dirs(artifact_root) == []
    assert run("--device", "cpu", "--dry-run", *QUIET, "--ep", "2", "--nproc", "2").exit_code == 0  # 2 divides 4, 8 and 6
    r = run("--device", "cpu", *QUIET, "--ep", "2")  # one process cannot be split two ways
    assert r.exit_code == 2 and "--ep 2: does not divide the world size 1 (--nproc 1)" in r.output, r.output
    assert run_dirs(artifact_root) == []


def test_ctrl_c_just_before_launch_leaves_an_interrupted_record_and_no_lock(proj, artifact_root):
    from moectl.runner import execute_run

    def ctrl_c(record):  # on_start runs right before torchrun is spawned
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        execute_run(load_config(), RunRequest(steps=2, overrides=["no_other_training"]), on_start=ctrl_c)
    [exp] = run_dirs(artifact_root)
    rec = record(exp)
    assert (rec["status"], rec["error"]) == ("interrupted", "interrupted before training started")
    assert rec["finished_at"] and not (exp / "train.log").exists()  # torchrun never started
    assert not (artifact_root / LOCK_NAME).exists()


def _then_ctrl_c(real):
    """`real`, then a real SIGINT to this process: Python raises its KeyboardInterrupt as `real`
    returns - where a Ctrl-C during that call lands."""
    import signal

    def called(*args, **kwargs):
        result = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)
        return result

    return called


def test_ctrl_c_as_the_run_directory_is_made_leaves_no_directory_and_no_lock(proj, artifact_root, monkeypatch):
    # Audit L #4: a Ctrl-C between the directory's making and the try that records an interrupted
    # start ended the run with a bare `interrupted` and an empty directory no command lists.
    from moectl import store
    from moectl.errors import Interrupted
    from moectl.runner import execute_run

    monkeypatch.setattr(store, "create_run_dir", _then_ctrl_c(store.create_run_dir))
    with pytest.raises(KeyboardInterrupt) as stopped:  # (not Interrupted: a bare Ctrl-C was pytest's own)
        execute_run(load_config(), RunRequest(steps=2, overrides=["no_other_training"]))
    assert isinstance(stopped.value, Interrupted), "a bare KeyboardInterrupt: nothing said, nothing cleaned"
    assert stopped.value.message.startswith("interrupted before run ") and stopped.value.message.endswith(" is removed")
    assert [p.name for p in artifact_root.iterdir()] == []  # no run directory, no lock
    assert not run_dirs(artifact_root)


@pytest.mark.parametrize("where", ["run_report", "write_report"])
def test_ctrl_c_as_the_report_is_made_records_how_to_finish_it(proj, artifact_root, monkeypatch, where):
    # Audit L #4: a Ctrl-C while the run's report was made (or just after it was written, before
    # the try that commits it) was a bare `interrupted`: the record said completed, with no report
    # and no `moectl commit` to finish it. Now it says so, as a Ctrl-C during the commit does.
    import moectl.runner as runner_mod
    from moectl.errors import Interrupted
    from moectl.runner import execute_run

    real = getattr(runner_mod, where)
    monkeypatch.setattr(runner_mod, where, _then_ctrl_c(real))
    with pytest.raises(KeyboardInterrupt) as stopped:  # (not Interrupted: a bare Ctrl-C was pytest's own)
        execute_run(load_config(), RunRequest(steps=2, tag="cut", overrides=["no_other_training"]))
    assert isinstance(stopped.value, Interrupted), "a bare KeyboardInterrupt: nothing said, nothing recorded"
    [exp] = run_dirs(artifact_root)
    rec = record(exp)
    assert rec["status"] == "completed" and rec["commit"] is None
    assert f"`moectl commit {rec['id']}`" in rec["commit_error"] and rec["commit_error"] in stopped.value.message
    assert ("interrupted before the report was committed" if where == "write_report"
            else "interrupted before the report was written") in rec["commit_error"]
    reports = list((proj / "reports").glob("*.md")) if (proj / "reports").exists() else []
    assert [str(p) for p in reports] == ([rec["report"]] if where == "write_report" else [])
    assert not (artifact_root / LOCK_NAME).exists()
    monkeypatch.setattr(runner_mod, where, real)
    r = runner.invoke(app, ["commit", rec["id"]])  # the command it names finishes it
    assert r.exit_code == 0, r.output
    [report] = (proj / "reports").glob("*.md")
    assert report.relative_to(proj).as_posix() in commit_files(proj)
    assert record(exp)["commit"] == head(proj) and record(exp)["commit_error"] is None


def hold_the_lock(artifact_root) -> subprocess.Popen:
    """Another live 'moectl' holding this artifact root's run lock (a real process and lock file)."""
    code = (
        "import sys, time; from pathlib import Path; from moectl.lock import acquire\n"
        "lock = acquire(Path(sys.argv[1]), 'other-run', 'moectl run --tag other')\n"
        "print('locked', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(artifact_root)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert readline_within(proc.stdout, 60, "the other moectl taking the lock").strip() == "locked"
    return proc


@pytest.fixture
def live_lock_holder(artifact_root):
    proc = hold_the_lock(artifact_root)
    yield proc
    stop_process(proc)


def test_two_overridden_runs_starting_together_both_run(proj, artifact_root, monkeypatch):
    # The guard saw no lock, then the other run took it before this one could: the person's
    # --override no_other_training still means "run beside it", not exit 3.
    import moectl.runner as runner_module

    real, holders = runner_module.check_request, []

    def guards_then_the_other_run_locks(*args, **kwargs):
        judged = real(*args, **kwargs)
        holders.append(hold_the_lock(artifact_root))
        return judged

    monkeypatch.setattr(runner_module, "check_request", guards_then_the_other_run_locks)
    try:
        r = run("--steps", "2", "--override", "no_other_training", *FAST)
        assert r.exit_code == 0, r.output
        rec = record(run_dirs(artifact_root)[0])
        assert rec["status"] == "completed" and rec["overrides"] == ["no_other_training"]
        guard = next(g for g in rec["guards"] if g["name"] == "no_other_training")
        assert guard["overridden"] and f"pid {holders[0].pid}" in guard["message"]
        assert "other-run" in (artifact_root / LOCK_NAME).read_text()  # the other run's lock, untouched
    finally:
        for proc in holders:
            stop_process(proc)


def test_live_lock_refuses_a_second_run(proj, artifact_root, live_lock_holder):
    r = run("--steps", "2", *FAST)
    assert r.exit_code == 3, r.output
    row = next(line for line in r.stdout.splitlines() if line.startswith("no_other_training"))
    assert "FAIL" in row and str(live_lock_holder.pid) in " ".join(r.stdout.split())
    assert run_dirs(artifact_root) == []


def test_live_lock_with_override_runs_beside_it_and_leaves_its_lock(proj, artifact_root, live_lock_holder):
    lock_before = (artifact_root / LOCK_NAME).read_text()
    r = run("--steps", "2", "--override", "no_other_training", *FAST)
    assert r.exit_code == 0, r.output
    (exp,) = run_dirs(artifact_root)
    rec = record(exp)
    assert rec["status"] == "completed" and "no_other_training" in rec["overrides"]
    assert (artifact_root / LOCK_NAME).read_text() == lock_before  # the other run's lock, untouched


@pytest.mark.slow
def test_repeat_group_whose_compile_fails_labels_the_fallback_group_not_its_own(proj, artifact_root):
    """Both repeats of `cf-x2` failed to compile; the figures are their --compile none re-runs',
    which are group `…_fallback_none`, tag `cf_fallback_none`: the group summary says so."""
    # One --json run (8 engine runs in all): what a person reads goes to stderr, the document to stdout.
    r = run("--json", "--compile", "static", "--steps", "3", "--tag", "cf", "--repeat", "2", "--no-commit", *QUIET,
            "--", "--compile-fails", "--sleep-per-step", "0.01")
    assert r.exit_code == 0, r.output
    [group] = {record(d)["group"] for d in run_dirs(artifact_root) if record(d)["tag"] == "cf"}
    fallback = f"{group}_fallback_none"
    assert {record(d)["group"] for d in run_dirs(artifact_root) if record(d)["tag"] == "cf_fallback_none"} == {fallback}
    lines = r.stderr.splitlines()
    assert not any(ln.startswith(f"group {group}: mean of") for ln in lines), r.stderr
    assert not any("by its tag cf" in ln and "cf_fallback_none" not in ln for ln in lines), r.stderr
    assert f"group {group}: 0/2 completed; no group mean" in lines
    assert any(ln.startswith(f"group {fallback}: mean of 2 tail means") for ln in lines), r.stderr
    assert f"re-runs are group {fallback} (tag cf_fallback_none)" in r.stderr
    # the summary describes the group named, whose runs all failed: none.
    data = json.loads(r.stdout)
    assert data["group"] == group and data["summary"] is None
    assert [x["group"] for x in data["runs"]] == [fallback] * 2


@pytest.mark.parametrize("edit", ["staged_and_unstaged", "unstaged", "staged_as_written"])
def test_moectl_commit_never_commits_the_users_edits_to_a_no_commit_report(proj, artifact_root, edit):
    # `run --no-commit` leaves its report for `moectl commit RUN`; lines the user added meanwhile
    # (staged or not) are theirs, not the run's: refused like EXPERIMENTS.md edits (exit 3), with
    # the file, its index entry and HEAD exactly as they were. `git add` of moectl's own text is fine.
    r = run("--device", "cpu", "--steps", "2", "--no-commit", *QUIET, *FAST)
    assert r.exit_code == 0, r.output
    [exp] = run_dirs(artifact_root)
    report, rec = the_report(proj), record(exp)
    rel = report.relative_to(proj).as_posix()
    blob = git(proj, "hash-object", "--", rel).strip()  # what moectl wrote, recorded (run.json report_blob)
    if edit == "staged_as_written":
        git(proj, "add", "--", rel)
    else:
        if edit == "staged_and_unstaged":
            with report.open("a") as fh:
                fh.write("USER STAGED\n")
            git(proj, "add", "--", rel)
        with report.open("a") as fh:
            fh.write("USER UNSTAGED\n")
    before, head0, text = tree_state(proj), head(proj), report.read_bytes()
    r = runner.invoke(app, ["commit", exp.name])
    if edit == "staged_as_written":
        assert r.exit_code == 0, r.output
        assert rel in commit_files(proj) and git(proj, "status", "--porcelain", "--", rel) == ""
        assert (rec["report"], rec["report_blob"]) == (str(report), blob)
        return
    assert r.exit_code == 3, r.output
    line = r.stderr.strip()
    assert "\n" not in line and line.startswith(f"error: {report.name} has ") and "nothing committed" in line
    assert ("has changes staged in the index" if edit == "staged_and_unstaged" else "has uncommitted changes") in line
    assert head(proj) == head0 and tree_state(proj) == before and report.read_bytes() == text
    assert record(exp)["commit"] is None and (rec["report"], rec["report_blob"]) == (str(report), blob)


def test_moectl_commit_of_a_repeat_group_commits_every_repeats_report(proj, artifact_root):
    """`run --repeat 2 --no-commit` leaves two reports; `moectl commit <tag>` committed only the
    newest repeat's, and the group's own id was "no run matches"."""
    r = run("--device", "cpu", "--steps", "3", "--tag", "grp", "--repeat", "2", "--no-commit", *QUIET, *FAST)
    assert r.exit_code == 0, r.output
    reports = sorted((proj / "reports").glob("*_grp-r*.md"))
    assert len(reports) == 2 and not any(p.relative_to(proj).as_posix() in commit_files(proj) for p in reports)
    [group] = {record(d)["group"] for d in run_dirs(artifact_root)}
    head0 = head(proj)
    r = runner.invoke(app, ["commit", "grp", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["group"] == group and [x["created"] for x in data["runs"]] == [True, True]
    committed = set(git(proj, "log", "--name-only", "--format=", f"{head0}..HEAD").split())
    assert {p.relative_to(proj).as_posix() for p in reports} <= committed
    r = runner.invoke(app, ["commit", group])  # by its id: already committed, both
    assert r.exit_code == 0 and r.stdout.count("is already committed") == 2, r.output

