"""`moectl summary`: EXPERIMENTS.md from a real run store (records and metrics on disk) and a real
git repository. The store is written the way moectl writes it (records models, engine.schema
metrics lines) so no torchrun is needed here; test_sweep covers sweeps producing such stores."""
from __future__ import annotations

import json

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.schema import RunSummary, StepMetrics, to_line
from moectl import store
from moectl.cli import app
from moectl.config import load_config
from moectl.records import RunRecord, SweepLeg, SweepRecord, save_model
from moectl.summary import TIMESTAMP_PREFIX, render_summary
from tests.conftest import git, start_sleeping_torchrun, stop_process


def cli(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def make_run(parent: Path, run_id: str, tag: str, status: str, tok_per_sec: float, sweep: str | None, pid=None) -> RunRecord:
    """A run directory as the runner leaves it: run.json + metrics.jsonl (20 steps at a constant rate:
    10 past the default 10 warm-up steps, more than the window of 5)."""
    exp = parent / run_id
    exp.mkdir(parents=True)
    steps = [StepMetrics(step=i, loss=3.0 - 0.1 * i, dt_ms=4096 / tok_per_sec * 1000, tok_per_sec=tok_per_sec,
                         elapsed_s=0.5 * (i + 1)) for i in range(20)]
    lines = [to_line(s) for s in steps] + ([to_line(RunSummary(steps=20, world_size=1, total_time_s=6.0))]
                                          if status == "completed" else [])
    (exp / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    from moectl.metrics import read_metrics, tail_summary

    rec = RunRecord(id=run_id, tag=tag, status=status, created_at=store.now_iso(), exp_dir=str(exp), sweep=sweep,
                    options={"cap": 1.0}, pid=pid, host=None if pid is None else __import__("socket").gethostname(),
                    summary=tail_summary(read_metrics(exp / "metrics.jsonl"), 5, warmup_steps=10))
    store.save_run(rec)
    return rec


def make_sweep(root: Path, sweep_id: str, name: str, legs: list[SweepLeg], resumed_from=None, report_job=None) -> Path:
    d = root / sweep_id
    d.mkdir(parents=True, exist_ok=True)
    save_model(d / "sweep.json", SweepRecord(id=sweep_id, name=name, spec={"name": name}, legs=legs,
                                             resumed_from=resumed_from, created_at=store.now_iso(), exp_dir=str(d),
                                             report_job=report_job))
    return d


def populate(root: Path) -> dict[str, str]:
    """A finished sweep, an interrupted sweep resumed once (its last leg left `running` by a SIGKILL),
    and a standalone imported run."""
    # "done": two legs completed; `fast` is the faster.
    d = root / "20260101_100000_moe-done"
    make_run(d, "20260101_100001_moe-slow", "slow", "completed", 1000.0, "20260101_100000_moe-done")
    make_run(d, "20260101_100101_moe-fast", "fast", "completed", 1500.0, "20260101_100000_moe-done")
    make_sweep(root, d.name, "done", [SweepLeg(tag="slow", state="completed", run_id="20260101_100001_moe-slow"),
                                      SweepLeg(tag="fast", state="completed", run_id="20260101_100101_moe-fast")])
    # "capacity": leg a completed, b interrupted, c pending; then a resume that completed b and was
    # SIGKILLed during c (sweep.json says running, the run's owner is dead).
    o = root / "20260102_100000_moe-capacity"
    make_run(o, "20260102_100001_moe-a", "a", "completed", 2000.0, o.name)
    make_run(o, "20260102_100101_moe-b", "b", "interrupted", 1900.0, o.name)
    make_sweep(root, o.name, "capacity", [SweepLeg(tag="a", state="completed", run_id="20260102_100001_moe-a"),
                                          SweepLeg(tag="b", state="interrupted", run_id="20260102_100101_moe-b"),
                                          SweepLeg(tag="c")])
    r = root / "20260102_110000_moe-capacity-resume"
    make_run(r, "20260102_110001_moe-b", "b", "completed", 2100.0, r.name)
    make_run(r, "20260102_110101_moe-c", "c", "running", 500.0, r.name, pid=dead_pid())
    make_sweep(root, r.name, "capacity", [SweepLeg(tag="a", state="completed", run_id="20260102_100001_moe-a"),
                                          SweepLeg(tag="b", state="completed", run_id="20260102_110001_moe-b"),
                                          SweepLeg(tag="c", state="running", run_id="20260102_110101_moe-c")],
               resumed_from=o.name)
    # 5 steps, all within the 10 warm-up steps: its figures are warm-up only.
    imported = store.import_run(root, "moe", "old_baseline", [
        StepMetrics(step=i, loss=3.0, dt_ms=10.0, tok_per_sec=777.0, elapsed_s=float(i)) for i in range(5)], window=5,
        warmup_steps=10)
    # "wide": a sweep that ran on Slurm (its final report was job 77), one leg never started.
    w = root / "20260103_100000_moe-wide"
    make_run(w, "20260103_100001_moe-x", "x", "completed", 3000.0, w.name)
    make_sweep(root, w.name, "wide", [SweepLeg(tag="x", state="completed", run_id="20260103_100001_moe-x"),
                                      SweepLeg(tag="y")], report_job="77")
    return {"original": o.name, "resume": r.name, "done": d.name, "imported": imported.id, "wide": w.name}


def summary_project(git_repo: Path, monkeypatch) -> Path:
    (git_repo / ".moectl.toml").write_text(
        '[project]\nname = "moe"\nbranch = "main"\nvenv = ""\n\n[paths]\nread_only = ["/srv/datasets"]\n\n'
        '[metrics]\nwindow = 5\n')
    (git_repo / "reports").mkdir()
    (git_repo / "reports" / "20260102_1200_capacity.md").write_text("# capacity\n")
    git(git_repo, "add", ".moectl.toml", "reports")
    git(git_repo, "commit", "-q", "-m", "report: capacity leg b — 2100 tok/s")
    monkeypatch.chdir(git_repo)
    return git_repo


def test_paths_are_repo_relative_or_home_relative():
    """The document reads the same on every machine with the same layout: the shipped
    EXPERIMENTS.md of a fresh clone names `~/.cache/...`, not the generating machine's home."""
    from moectl.summary import _shown

    root = Path("/work/main")
    assert _shown(root / "reports", root) == "reports" and _shown(root, root) == "."
    assert _shown(Path.home() / ".cache" / "moectl" / "tmp_exp", root) == "~/.cache/moectl/tmp_exp"
    assert _shown("/srv/datasets", root) == "/srv/datasets" and _shown(Path.home()) == "~"


def test_summary_has_every_section(git_repo, artifact_root, monkeypatch):
    summary_project(git_repo, monkeypatch)
    ids = populate(artifact_root)
    cfg = load_config()
    text = render_summary(cfg)

    assert text.count(TIMESTAMP_PREFIX) == 1
    assert f"- Repo: `{git_repo}`" in text and "- Branch: `main`" in text
    assert "## Runtime Status" in text and "NVML unavailable: NVML Shared Library Not Found" in text
    # Sweeps: one section per chain (the resume, which lists every leg), with both directories.
    sweeps = text.split("## Sweeps")[1].split("## Unfinished Sweeps")[0]
    assert sweeps.count("### capacity") == 1 and sweeps.count("### done") == 1
    cap = sweeps.split("### capacity")[1]
    assert f"original directory: `{artifact_root / ids['original']}`" in cap
    assert f"resumed directory: `{artifact_root / ids['resume']}`" in cap
    assert "| a | — | completed | `20260102_100001_moe-a` | 2000.00 |" in cap  # carried from the original
    assert "| b | — | completed | `20260102_110001_moe-b` | 2100.00 |" in cap
    # SIGKILLed: reading the store settled it (run and leg), shown as not completed.
    assert "| c | — | interrupted | `20260102_110101_moe-c` |" in cap
    assert "Conclusion: `b` is the fastest leg — 2100.00 tok/s" in cap
    assert f"resume with `moectl sweep --resume {ids['resume']}`" in cap
    done = sweeps.split("### done")[1].split("###")[0]
    assert "Conclusion: `fast` is the fastest leg — 1500.00 tok/s tail mean (+50.00% vs `slow`)" in done
    assert "Unfinished" not in done
    # A sweep run with --baseline keeps it (sweep.json): the handoff concludes as its report did.
    sweep_json = artifact_root / ids["done"] / "sweep.json"
    sweep_json.write_text(json.dumps({**json.loads(sweep_json.read_text()), "baseline": "fast"}))
    done = render_summary(cfg).split("### done")[1].split("###")[0]
    assert "Conclusion: the baseline `fast` is the fastest leg" in done
    # Unfinished: the exact resume command of the latest sweep in the chain, and only that one.
    unfinished = text.split("## Unfinished Sweeps")[1].split("## Standalone Runs")[0]
    assert f"moectl sweep --resume {ids['resume']}\n" in unfinished
    # copy-pasteable from wherever the reader's shell is: the block starts in the repository
    assert unfinished.split("```bash\n")[1].startswith(f"cd {git_repo}\n")
    assert f"moectl sweep --resume {ids['wide']} --slurm\n" in unfinished  # it ran on Slurm: it resumes there
    assert ids["original"] + "\n" not in unfinished and ids["done"] not in unfinished
    standalone = text.split("## Standalone Runs")[1].split("## Latest Report Commits")[0]
    assert f"`{ids['imported']}` | imported | old_baseline | 5/5 | 777.00† | 10.00† |" in standalone
    assert "† warm-up only: the run has no step past its first 10 (compile / warm-up)" in standalone
    assert "moe-a" not in standalone  # sweep legs are not standalone runs
    head = git(git_repo, "rev-parse", "HEAD").strip()
    assert f"- `{head[:7]}` report: capacity leg b — 2100 tok/s" in text
    # a commit of the user's that touched a report is not one of moectl's report commits
    report = next((git_repo / "reports").glob("*.md"))
    report.write_text(report.read_text() + "my notes\n")
    git(git_repo, "commit", "-qam", "notes on leg b")
    commits = render_summary(cfg).split("## Latest Report Commits")[1].split("##")[0]
    assert "notes on leg b" not in commits and f"- `{head[:7]}` report: capacity leg b — 2100 tok/s" in commits
    constraints = text.split("## Constraints Reminder")[1]
    assert "Keep branch at `main`" in constraints and f"`{artifact_root}`" in constraints
    assert "`/srv/datasets`" in constraints and "Reports go to `reports/`" in constraints  # repo-relative
    assert f"only under `{artifact_root}`" in constraints  # outside the home directory: as it is


def test_a_sweeps_legs_table_says_the_options_that_tell_its_legs_apart():
    """Explicit legs are named by their tags (`a`, `b`): the table says each one's cap, and not what
    every leg shares (the common options, said once above it)."""
    from moectl.sweep.report import legs_table

    legs = [SweepLeg(tag="a", options={"preset": "tiny", "cap": 1.0, "steps": 10}),
            SweepLeg(tag="b", options={"preset": "tiny", "cap": 0.0, "steps": 400})]
    rows = legs_table(legs, {}, 50)
    assert rows[0].startswith("| leg | options | state | run |")
    assert rows[2].startswith("| a | `cap=1.0` `steps=10` | pending | — |")
    assert rows[3].startswith("| b | `cap=0.0` `steps=400` | pending | — |")


def test_a_repeat_group_is_one_row_with_its_mean_and_between_runs_error(git_repo, artifact_root, monkeypatch):
    """`run --repeat 3` left three standalone rows and no figure for the group, which is the point."""
    import statistics

    summary_project(git_repo, monkeypatch)
    group = "20260104_100000_moe-r-x3"
    rates = (1000.0, 1100.0, 1300.0)
    for k, tps in enumerate(rates, start=1):
        rec = make_run(artifact_root, f"20260104_10000{k}_moe-r-r{k}", "r", "completed", tps, None)
        store.save_run(rec.model_copy(update={"group": group, "repeat": k}))
    make_run(artifact_root, "20260104_110000_moe-lone", "lone", "completed", 900.0, None)
    text = render_summary(load_config())
    section = text.split("## Repeat Groups")[1].split("##")[0]
    se = statistics.stdev(rates) / 3 ** 0.5
    assert f"| `{group}` | r | 3/3 | {statistics.fmean(rates):,.2f} ± {se:,.2f} | — |" in section
    assert "lone" not in section


def test_another_repositorys_runs_in_a_shared_artifact_root_stay_out_of_this_handoff(git_repo, artifact_root,
                                                                                   monkeypatch, tmp_path):
    summary_project(git_repo, monkeypatch)
    here = str(git_repo.resolve())
    other = tmp_path / "other-project"
    other.mkdir()
    git(other, "init", "-q", "-b", "main")
    linked = tmp_path / "linked"
    git(git_repo, "worktree", "add", "-q", str(linked), "-b", "side")
    one = [StepMetrics(step=0, loss=1.0)]
    mine = store.import_run(artifact_root, "moe", "mine", one, repo=here)
    theirs = store.import_run(artifact_root, "moe", "theirs", one, repo=str(other))  # a repository today
    old = store.import_run(artifact_root, "moe", "old", one)  # before `repo` existed
    moved = store.import_run(artifact_root, "moe", "moved", one, repo=str(tmp_path / "gone"))  # renamed since
    beside = store.import_run(artifact_root, "moe", "beside", one, repo=str(linked))  # this repository's worktree
    d = artifact_root / "20260301_000000_moe-other"
    make_run(d, "20260301_000001_moe-a", "a", "completed", 1000.0, d.name)
    make_sweep(artifact_root, d.name, "othersweep", [SweepLeg(tag="a", state="completed", run_id="20260301_000001_moe-a")])
    sweep_json = d / "sweep.json"
    sweep_json.write_text(json.dumps({**json.loads(sweep_json.read_text()), "repo": str(other)}))
    text = render_summary(load_config())
    assert all(r.id in text for r in (mine, old, moved, beside)) and theirs.id not in text
    assert "othersweep" not in text
    # the run store itself is shared: `runs` lists them all
    assert {mine.id, theirs.id, old.id} <= {r["id"] for r in json.loads(cli("runs", "--json").stdout)}


def test_a_long_history_of_sweeps_keeps_the_handoff_a_page(git_repo, artifact_root, monkeypatch):
    # The newest SWEEP_LIMIT sweeps in full, newest first; the older ones a line each; what to
    # resume still listed in full, near the top, not after a thousand lines of old tables.
    from moectl.summary import SWEEP_LIMIT

    summary_project(git_repo, monkeypatch)
    n = SWEEP_LIMIT + 3
    for i in range(n):
        d = artifact_root / f"20260201_00000{i}_moe-s{i}"
        make_run(d, f"20260201_00001{i}_moe-a", "a", "completed", 1000.0 + i, d.name)
        make_sweep(artifact_root, d.name, f"s{i}", [SweepLeg(tag="a", state="completed", run_id=f"20260201_00001{i}_moe-a"),
                                                     SweepLeg(tag="b")])
    text = render_summary(load_config())
    sweeps = text.split("## Sweeps")[1].split("## Unfinished Sweeps")[0]
    full = [line.split()[1] for line in sweeps.splitlines() if line.startswith("### ")]
    assert full == [f"s{i}" for i in range(n - 1, n - 1 - SWEEP_LIMIT, -1)]
    older = sweeps.split(f"Older sweeps ({n - SWEEP_LIMIT}), newest first:")[1]
    assert [line.split(":")[0] for line in older.strip().splitlines()] == ["- s2", "- s1", "- s0"]
    assert f"- s0: 1/2 legs completed — `{artifact_root / '20260201_000000_moe-s0'}`" in older
    unfinished = text.split("## Unfinished Sweeps")[1].split("## Standalone Runs")[0]
    assert all(f"moectl sweep --resume 20260201_00000{i}_moe-s{i}\n" in unfinished for i in range(n))


def test_summary_commits_only_experiments_md_and_is_stable(git_repo, artifact_root, monkeypatch):
    summary_project(git_repo, monkeypatch)
    populate(artifact_root)
    (git_repo / "wip.txt").write_text("staged by the user\n")
    git(git_repo, "add", "wip.txt")
    (git_repo / "scratch.txt").write_text("untracked\n")
    head = git(git_repo, "rev-parse", "HEAD").strip()

    r = cli("summary", "--json")
    assert r.exit_code == 0, r.output
    import json

    data = json.loads(r.stdout)
    assert data["changed"] is True and data["commit"]
    assert git(git_repo, "show", "--name-only", "--format=", "HEAD").split() == ["EXPERIMENTS.md"]
    assert git(git_repo, "rev-parse", "HEAD~1").strip() == head
    assert git(git_repo, "status", "--porcelain").splitlines() == ["A  wip.txt", "?? scratch.txt"]
    first = (git_repo / "EXPERIMENTS.md").read_text()

    # Again without new runs: only the snapshot of the moment would change -> file and history
    # untouched, even though a training process (a real one) has started on the machine meanwhile
    # (on a shared machine other people's runs come and go; the file must not churn on them).
    run_dir = artifact_root / "20250101_000000_moe-x"
    training = start_sleeping_torchrun(git_repo.parent, "--out-dir", str(run_dir))
    # ... and someone else's, outside this project's artifact root: counted, not listed
    theirs = start_sleeping_torchrun(git_repo.parent, "--out-dir", "/elsewhere/20250101_000000_other-x")
    try:
        assert f"pid {training.pid}" not in first
        r = cli("summary")
        assert r.exit_code == 0 and "already up to date" in r.output
        assert (git_repo / "EXPERIMENTS.md").read_text() == first
        assert git(git_repo, "rev-parse", "HEAD").strip() == data["commit"]

        # Two fresh renderings differ only in that snapshot: the timestamp, the status line and the
        # Runtime Status section (which does list the process: the snapshot is real).
        out_a, out_b = git_repo.parent / "a.md", git_repo.parent / "b.md"
        assert cli("summary", "-o", str(out_a)).exit_code == 0
        text = out_a.read_text()
        assert f"- `{run_dir}` (pid {training.pid})" in text and "- Status: training active" in text
        assert f"pid {theirs.pid}" not in text and "/elsewhere" not in text
        assert "other training process(es) on this machine, not this project's runs" in text
    finally:
        stop_process(training)
        stop_process(theirs)
    assert cli("summary", "-o", str(out_b), "--no-commit").exit_code == 0

    def strip(path):
        head, runtime = path.read_text().split("## Runtime Status", 1)
        rest = "## " + runtime.split("\n## ", 1)[1]
        return [ln for ln in (head + rest).splitlines() if not ln.startswith((TIMESTAMP_PREFIX, "- Status: "))]

    assert strip(out_a) == strip(out_b) == strip(git_repo / "EXPERIMENTS.md")
    assert git(git_repo, "rev-parse", "HEAD").strip() == data["commit"]  # -o never commits

    # A new run changes the document: regenerated and committed again.
    store.import_run(artifact_root, "moe", "newer", [
        StepMetrics(step=0, loss=2.0, dt_ms=5.0, tok_per_sec=999.0, elapsed_s=1.0)], window=5)
    r = cli("summary", "--json")
    assert json.loads(r.stdout)["changed"] is True
    assert "newer" in (git_repo / "EXPERIMENTS.md").read_text()
    assert git(git_repo, "rev-parse", "HEAD~1").strip() == data["commit"]


def test_summary_commits_a_file_that_is_up_to_date_on_disk_but_not_in_head(git_repo, artifact_root, monkeypatch):
    # What a `--no-commit` run leaves: EXPERIMENTS.md refreshed on disk, HEAD's copy behind it.
    import json

    summary_project(git_repo, monkeypatch)
    populate(artifact_root)
    assert cli("summary", "--no-commit").exit_code == 0
    head = git(git_repo, "rev-parse", "HEAD").strip()
    on_disk = (git_repo / "EXPERIMENTS.md").read_text()
    r = cli("summary", "--json")
    data = json.loads(r.stdout)
    assert r.exit_code == 0 and data["changed"] is False and data["commit"], r.output
    assert git(git_repo, "rev-parse", "HEAD~1").strip() == head
    assert git(git_repo, "show", "HEAD:EXPERIMENTS.md") == on_disk and git(git_repo, "status", "--porcelain") == ""
    again = json.loads(cli("summary", "--json").stdout)  # now HEAD has it: nothing to do
    assert (again["changed"], again["commit"]) == (False, None)


def test_summary_that_cannot_commit_writes_nothing_and_says_why_with_the_guard_exit_code(git_repo, artifact_root,
                                                                                        monkeypatch):
    summary_project(git_repo, monkeypatch)
    populate(artifact_root)
    before = git(git_repo, "status", "--porcelain")
    # Wrong branch, then a detached HEAD: refused before the file is written (exit 3), as `commit` does.
    git(git_repo, "switch", "-q", "-c", "feature")
    r = CliRunner().invoke(app, ["summary"])
    assert r.exit_code == 3 and "expected 'main'" in r.stderr and "--no-commit" in r.stderr, r.output
    assert not (git_repo / "EXPERIMENTS.md").exists() and git(git_repo, "status", "--porcelain") == before
    git(git_repo, "switch", "-q", "--detach")
    r = CliRunner().invoke(app, ["summary", "--json"])
    assert r.exit_code == 3 and "detached" in r.stderr and not (git_repo / "EXPERIMENTS.md").exists()
    assert CliRunner().invoke(app, ["summary", "--no-commit"]).exit_code == 0  # writing only: anywhere
    (git_repo / "EXPERIMENTS.md").unlink()
    git(git_repo, "switch", "-q", "main")
    # git itself refusing the commit (a reference-transaction hook): exit 3 and the file as it was.
    committed = cli("summary")
    assert committed.exit_code == 0 and git(git_repo, "status", "--porcelain") == before
    shipped = (git_repo / "EXPERIMENTS.md").read_text()
    import os

    os.utime(git_repo / "EXPERIMENTS.md", ns=(1_000_000_000, 1_000_000_000))  # an old file: any rewrite shows
    make_run(artifact_root, "20260105_000000_moe-later", "later", "completed", 3000.0, None)  # something new to say
    hook = git_repo / ".git" / "hooks" / "reference-transaction"
    hook.write_text('#!/bin/sh\n[ "$1" = prepared ] && exit 1\nexit 0\n')
    hook.chmod(0o755)
    r = CliRunner().invoke(app, ["summary"])
    assert r.exit_code == 3 and "EXPERIMENTS.md not committed" in r.stderr and "left as it was" in r.stderr, r.output
    assert (git_repo / "EXPERIMENTS.md").read_text() == shipped and git(git_repo, "status", "--porcelain") == before
    assert (git_repo / "EXPERIMENTS.md").stat().st_mtime_ns == 1_000_000_000  # an editor holding it sees no change
    hook.unlink()
    assert cli("summary").exit_code == 0 and "later" in (git_repo / "EXPERIMENTS.md").read_text()


def test_summary_without_a_git_identity_is_a_config_error_and_leaves_the_file_as_it_was(git_repo, artifact_root,
                                                                                       monkeypatch):
    # No user.name/user.email: the user's git configuration (exit 2, as for signing), not moectl's bug (1).
    from tests.test_gitops import no_identity

    summary_project(git_repo, monkeypatch)
    populate(artifact_root)
    before, head = git(git_repo, "status", "--porcelain"), git(git_repo, "rev-parse", "HEAD")
    no_identity(git_repo, monkeypatch)
    r = CliRunner().invoke(app, ["summary"])
    assert r.exit_code == 2, r.output
    assert "set user.name and user.email" in r.stderr and "left as it was" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert not (git_repo / "EXPERIMENTS.md").exists()
    assert git(git_repo, "status", "--porcelain") == before and git(git_repo, "rev-parse", "HEAD") == head


def test_summary_leaves_a_read_only_experiments_md_alone(git_repo, artifact_root, monkeypatch):
    summary_project(git_repo, monkeypatch)
    with (git_repo / ".moectl.toml").open("a") as fh:
        fh.write('\n[report]\nsummary = true\n')
    text = (git_repo / ".moectl.toml").read_text().replace('read_only = ["/srv/datasets"]', 'read_only = ["EXPERIMENTS.md"]')
    (git_repo / ".moectl.toml").write_text(text)
    git(git_repo, "commit", "-q", "-am", "read-only summary")
    for args in (["summary"], ["summary", "--no-commit"]):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 3 and "read-only tree" in r.stderr, r.output
        assert not (git_repo / "EXPERIMENTS.md").exists()


def test_a_moectl_killed_right_after_writing_experiments_md_does_not_make_it_the_users(git_repo, artifact_root,
                                                                                       monkeypatch):
    # Killed between writing the file and noting that moectl wrote it, the file read as someone's
    # own edit for good: every later refresh refused. The note now comes first.
    import moectl.summary as summary_mod
    from moectl.summary import users_changes

    summary_project(git_repo, monkeypatch)
    populate(artifact_root)
    real_write = summary_mod.write_text_atomic

    def write_then_die(path, text):
        real_write(path, text)
        if Path(path).name == "EXPERIMENTS.md":
            raise KeyboardInterrupt  # the process ends right after this write, before anything else

    monkeypatch.setattr(summary_mod, "write_text_atomic", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        summary_mod.refresh_summary(load_config())
    monkeypatch.setattr(summary_mod, "write_text_atomic", real_write)
    assert (git_repo / "EXPERIMENTS.md").exists()
    assert users_changes(git_repo, git_repo / "EXPERIMENTS.md") is None  # moectl's, not the user's
    assert cli("summary").exit_code == 0 and git(git_repo, "status", "--porcelain") == ""


def test_the_users_own_edits_to_experiments_md_are_never_overwritten_or_unstaged(git_repo, artifact_root, monkeypatch):
    summary_project(git_repo, monkeypatch)
    populate(artifact_root)
    assert cli("summary").exit_code == 0  # EXPERIMENTS.md as moectl writes it, committed
    doc = git_repo / "EXPERIMENTS.md"

    # moectl's own uncommitted refresh (what `--no-commit` leaves) is not the user's work: a later
    # summary rewrites it and commits it.
    store.import_run(artifact_root, "moe", "second", [
        StepMetrics(step=0, loss=2.0, dt_ms=5.0, tok_per_sec=999.0, elapsed_s=1.0)], window=5)
    assert cli("summary", "--no-commit").exit_code == 0
    assert git(git_repo, "status", "--porcelain") == " M EXPERIMENTS.md\n"
    store.import_run(artifact_root, "moe", "third", [
        StepMetrics(step=0, loss=2.0, dt_ms=5.0, tok_per_sec=999.0, elapsed_s=1.0)], window=5)
    r = cli("summary", "--json")
    assert r.exit_code == 0 and "third" in doc.read_text() and git(git_repo, "status", "--porcelain") == ""

    # A note of the user's, staged, then another one not staged: both stay exactly as they were.
    with open(doc, "a") as fh:
        fh.write("\nNOTE staged\n")
    git(git_repo, "add", "EXPERIMENTS.md")
    with open(doc, "a") as fh:
        fh.write("NOTE not staged\n")
    before = (doc.read_bytes(), git(git_repo, "diff", "--cached"), git(git_repo, "rev-parse", "HEAD"))
    store.import_run(artifact_root, "moe", "fourth", [
        StepMetrics(step=0, loss=2.0, dt_ms=5.0, tok_per_sec=999.0, elapsed_s=1.0)], window=5)
    r = CliRunner().invoke(app, ["summary"])
    assert r.exit_code == 3, r.output
    assert "EXPERIMENTS.md has changes staged in the index: left exactly as it is" in r.output
    assert (doc.read_bytes(), git(git_repo, "diff", "--cached"), git(git_repo, "rev-parse", "HEAD")) == before

    # Unstaged only: the same.
    git(git_repo, "reset", "-q", "--", "EXPERIMENTS.md")
    before = (doc.read_bytes(), git(git_repo, "status", "--porcelain"))
    r = CliRunner().invoke(app, ["summary"])
    assert r.exit_code == 3 and "EXPERIMENTS.md has uncommitted changes" in r.output
    assert (doc.read_bytes(), git(git_repo, "status", "--porcelain")) == before
    assert b"NOTE staged\nNOTE not staged\n" in doc.read_bytes()

    # Deleted, not staged (`rm EXPERIMENTS.md`): theirs too - not written back behind their back.
    git(git_repo, "checkout", "--", "EXPERIMENTS.md")
    doc.unlink()
    r = CliRunner().invoke(app, ["summary"])
    assert r.exit_code == 3 and "EXPERIMENTS.md is deleted in the working tree (not staged)" in r.output
    assert not doc.exists() and git(git_repo, "status", "--porcelain") == " D EXPERIMENTS.md\n"


def test_an_intent_to_add_experiments_md_of_moectls_own_is_committed_not_refused(git_repo, artifact_root,
                                                                                 monkeypatch):
    # `git add -N EXPERIMENTS.md` stages nothing (an empty-blob placeholder): the file still holds
    # exactly what moectl wrote, so the next summary commits it. It was refused as "staged changes".
    summary_project(git_repo, monkeypatch)
    populate(artifact_root)
    assert cli("summary", "--no-commit").exit_code == 0
    git(git_repo, "add", "-N", "EXPERIMENTS.md")
    assert git(git_repo, "diff", "--cached", "--name-only") == ""
    r = CliRunner().invoke(app, ["summary"])
    assert r.exit_code == 0, r.output
    assert git(git_repo, "status", "--porcelain") == ""
    assert "EXPERIMENTS.md" in git(git_repo, "show", "--name-only", "--format=", "HEAD")
    # A real staged empty file of the user's is still theirs.
    (git_repo / "EXPERIMENTS.md").write_text("")
    git(git_repo, "add", "EXPERIMENTS.md")
    r = CliRunner().invoke(app, ["summary"])
    assert r.exit_code == 3 and "EXPERIMENTS.md has changes staged in the index" in r.output
    assert (git_repo / "EXPERIMENTS.md").read_text() == ""


def test_a_symlinked_experiments_md_is_refused_not_replaced_by_a_file(git_repo, artifact_root, monkeypatch):
    # Written with a rename, the link became a regular file and the type change was committed.
    summary_project(git_repo, monkeypatch)
    populate(artifact_root)
    (git_repo / "docs").mkdir()
    (git_repo / "docs" / "EXPERIMENTS.md").write_text("# old\n")
    (git_repo / "EXPERIMENTS.md").symlink_to("docs/EXPERIMENTS.md")
    git(git_repo, "add", "docs", "EXPERIMENTS.md")
    git(git_repo, "commit", "-q", "-m", "link")
    head = git(git_repo, "rev-parse", "HEAD")
    for args in (["summary"], ["summary", "--no-commit"]):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 3, r.output
        assert "EXPERIMENTS.md is a symbolic link (to docs/EXPERIMENTS.md): moectl does not replace it" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert (git_repo / "EXPERIMENTS.md").is_symlink() and (git_repo / "docs" / "EXPERIMENTS.md").read_text() == "# old\n"
    assert git(git_repo, "rev-parse", "HEAD") == head and git(git_repo, "status", "--porcelain") == ""


def test_summary_o_replaces_only_its_own_earlier_output(git_repo, artifact_root, monkeypatch, tmp_path):
    # -o README.md used to replace the user's README, and -o EXPERIMENTS.md their uncommitted edits.
    summary_project(git_repo, monkeypatch)
    (git_repo / "README.md").write_text("my readme, edited\n")
    (git_repo / "EXPERIMENTS.md").write_text("my handoff note\n")
    before = {p: p.read_bytes() for p in (git_repo / "README.md", git_repo / "EXPERIMENTS.md")}
    r = cli("summary", "--no-commit", "-o", "README.md")
    assert r.exit_code == 2 and "exists and is not a summary moectl wrote; not replacing it" in r.output
    r = cli("summary", "--no-commit", "-o", "EXPERIMENTS.md")
    assert r.exit_code == 2 and "is the repository's own EXPERIMENTS.md" in r.output
    assert {p: p.read_bytes() for p in before} == before
    out = tmp_path / "handoff.md"
    assert cli("summary", "-o", str(out)).exit_code == 0 and out.read_text().startswith("# moe — experiments progress summary")
    assert cli("summary", "-o", str(out)).exit_code == 0  # its own earlier output: replaced (or left, if the same)
    r = cli("summary", "-o", str(tmp_path))
    assert r.exit_code == 2 and "is a directory" in r.output
    # a file named where nothing can be made: a usage error, as `plot -o` and `export --csv` say it (was 3)
    r = cli("summary", "--no-commit", "-o", "/proc/no-such-dir/handoff.md")
    assert r.exit_code == 2 and r.output.startswith("error: -o /proc/no-such-dir/handoff.md: cannot write "), r.output


def test_a_completed_leg_whose_run_directory_is_gone_shows_as_missing_and_unfinished(git_repo, artifact_root,
                                                                                      monkeypatch):
    # A resume runs such a leg again: the handoff must not call it completed.
    import shutil

    summary_project(git_repo, monkeypatch)
    ids = populate(artifact_root)
    shutil.rmtree(artifact_root / ids["done"] / "20260101_100101_moe-fast")
    done = render_summary(load_config()).split("### done")[1].split("###")[0]
    assert "| fast | — | missing |" in done and f"Unfinished legs: `fast` — resume with `moectl sweep --resume {ids['done']}`" in done


def test_summary_on_an_empty_store(git_repo, artifact_root, monkeypatch):
    summary_project(git_repo, monkeypatch)
    r = cli("summary", "--no-commit")
    assert r.exit_code == 0, r.output
    text = (git_repo / "EXPERIMENTS.md").read_text()
    assert "No sweeps yet." in text and "## Unfinished Sweeps\n\nNone." in text
    assert git(git_repo, "status", "--porcelain").strip() == "?? EXPERIMENTS.md"  # --no-commit


def test_summary_names_unreadable_run_and_sweep_records(git_repo, artifact_root, monkeypatch):
    summary_project(git_repo, monkeypatch)
    for name, record, data in (("bad-run", "run.json", b'{"id": "x", "status'), ("bad-sweep", "sweep.json", b"\xff\xfe")):
        (artifact_root / name).mkdir(parents=True)
        (artifact_root / name / record).write_bytes(data)
    r = cli("summary", "--no-commit")
    assert r.exit_code == 0, r.output
    unreadable = [ln for ln in (git_repo / "EXPERIMENTS.md").read_text().splitlines() if ln.startswith("- unreadable record:")]
    assert len(unreadable) == 2 and "bad-run/run.json" in unreadable[0] and "bad-sweep/sweep.json" in unreadable[1]


def test_help_has_examples():
    for cmd in ("sweep", "summary"):
        r = cli(cmd, "--help")
        assert r.exit_code == 0 and "Examples:" in r.output and f"moectl {cmd}" in r.output


def test_the_shipped_experiments_md_is_what_summary_writes(tmp_path, monkeypatch):
    """A newcomer sees the handoff document before running anything: the repository ships
    EXPERIMENTS.md, as `moectl summary` writes it (so it stays regenerable). Its title, its sections
    and the constraints (a function of .moectl.toml alone) must be what the code writes today; the
    rest depends on the store, the machine and the moment (after a first `moectl run`, the
    committed file lists that run), so it is not compared."""
    from moectl.config import load_config

    repo = Path(__file__).resolve().parents[1]
    shipped = repo / "EXPERIMENTS.md"
    assert shipped.is_file(), "EXPERIMENTS.md is missing from the repository"
    monkeypatch.setenv("HOME", str(tmp_path))  # the default artifact root, empty: a fresh machine
    monkeypatch.delenv("MOECTL_ARTIFACT_ROOT")
    regenerated = render_summary(load_config(repo / ".moectl.toml"))
    text = shipped.read_text(encoding="utf-8")

    def headings(t: str) -> list[str]:
        return [ln for ln in t.splitlines() if ln.startswith(("# ", "## "))]

    assert headings(text) == headings(regenerated)
    assert text.split("## Constraints Reminder")[1] == regenerated.split("## Constraints Reminder")[1]
    assert text.count(TIMESTAMP_PREFIX) == 1


def test_the_cd_lines_are_shell_words_for_a_path_with_spaces():
    from moectl.summary import _shell_path

    assert _shell_path("/tmp/my repo") == "'/tmp/my repo'" and _shell_path("~/my repo") == "~/'my repo'"
    assert _shell_path("~/code/moe") == "~/code/moe" and _shell_path("/srv/moe") == "/srv/moe"

