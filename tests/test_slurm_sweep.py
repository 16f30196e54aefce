"""`moectl sweep --slurm` on the local 2-node Slurm cluster (issue 9): legs as jobs side by side,
sweep.json and the report commits true when legs finish together, --max-parallel, --resume.

Each leg runs tests.fixtures.fake_engine held at a step by its own gate file (`--hold-at-step N
--hold-until GATE`; it touches GATE.waiting once there): the test knows when every leg is inside
its run, and opening the gates releases them together, however slow the machine."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moectl.cli import app
from moectl.store import parse_time
from tests.conftest import git, wait_for
from tests.slurm_fixtures import SLURM_TESTS
from tests.test_run import record
from tests.test_slurm_run import (  # noqa: F401  (on_cluster: a fixture)
    JOB_TIMEOUT_S, REPO, on_cluster, slurm_project, user_work_in_progress,
)

pytestmark = [*SLURM_TESTS, pytest.mark.slow]
runner = CliRunner()


def moectl(*args: str):
    return runner.invoke(app, list(args))


def gated_spec(path: Path, gates: dict[str, Path], steps: int = 4) -> Path:
    legs = "".join(f'[[legs]]\ntag = "{tag}"\nargs = ["--hold-at-step", "2", "--hold-until", "{gate}"]\n'
                   for tag, gate in gates.items())
    path.write_text(f'name = "trio"\n[common]\nsteps = {steps}\n{legs}')
    return path


def the_sweep(artifact_root: Path, suffix: str = "trio") -> Path:
    (found,) = [p.parent for p in artifact_root.glob(f"*_moe-{suffix}/sweep.json")]
    return found


def sweep_json(sweep_dir: Path) -> dict:
    return json.loads((sweep_dir / "sweep.json").read_text())


def test_three_legs_finishing_together_keep_every_update_and_every_report_commit(on_cluster, git_repo, monkeypatch,
                                                                                 artifact_root, tmp_path):
    proj = slurm_project(git_repo, monkeypatch)
    before = user_work_in_progress(proj)
    base = git(proj, "rev-parse", "HEAD").strip()
    gates = {tag: tmp_path / f"gate-{tag}" for tag in ("a", "b", "c")}

    # --max-parallel above the legs: all three at once, and said so (not "at most 5")
    r = moectl("sweep", str(gated_spec(tmp_path / "trio.toml", gates)), "--slurm", "--detach", "--max-parallel", "5")

    assert r.exit_code == 0, r.output
    assert "(3 of 3 legs to submit, at most 3 at once)" in r.output, r.output
    sweep_dir = the_sweep(artifact_root)
    for tag, gate in gates.items():
        wait_for(lambda gate=gate: Path(f"{gate}.waiting").exists(), f"leg {tag} held at step 2", timeout=JOB_TIMEOUT_S)
    assert {leg["state"] for leg in sweep_json(sweep_dir)["legs"]} == {"running"}
    for gate in gates.values():  # released within microseconds of each other
        gate.touch()

    waited = moectl("wait", sweep_json(sweep_dir)["id"], "--timeout", f"{JOB_TIMEOUT_S}s")
    assert waited.exit_code == 0, waited.output
    legs = sweep_json(sweep_dir)["legs"]
    assert [(leg["tag"], leg["state"]) for leg in legs] == [("a", "completed"), ("b", "completed"), ("c", "completed")]
    runs = [record(sweep_dir / leg["run_id"]) for leg in legs]
    finished = [parse_time(run["finished_at"]) for run in runs]
    assert max(finished) - min(finished) < 5, f"the legs did not finish together: {finished}"
    # Every leg's report commit landed (none lost to another's compare-and-swap), then the sweep's:
    # `wait` on a sweep returns once its report job has written and committed the sweep report.
    assert sweep_json(sweep_dir)["report"], "wait returned before the report job wrote the sweep report"
    assert "report: sweep trio" in git(proj, "log", "-1", "--format=%s")
    subjects = git(proj, "log", "--format=%s", f"{base}..HEAD").splitlines()
    assert sorted(s.split(" — ")[0] for s in subjects[1:]) == ["report: a", "report: b", "report: c"], subjects
    assert {run["commit"] for run in runs} <= set(git(proj, "log", "--format=%H", f"{base}..HEAD").split())
    assert {p: (proj / p).read_bytes() for p in before} == before
    assert set(git(proj, "diff", "--cached", "--name-only").split()) == {"staged.txt"}
    assert set(git(proj, "ls-files", "--others", "--exclude-standard").split()) >= {"untracked.txt"}


def test_max_parallel_holds_the_third_leg_and_resume_resubmits_only_the_unfinished_one(on_cluster, git_repo,
                                                                                       monkeypatch, artifact_root,
                                                                                       tmp_path):
    slurm_project(git_repo, monkeypatch)
    gates = {tag: tmp_path / f"gate-{tag}" for tag in ("a", "b", "c")}
    gates["a"].touch()
    gates["b"].touch()  # a and b run through; c holds until cancelled
    r = moectl("sweep", str(gated_spec(tmp_path / "trio.toml", gates)), "--slurm", "--max-parallel", "2",
               "--detach", "--no-commit")
    assert r.exit_code == 0, r.output
    sweep_dir = the_sweep(artifact_root)
    wait_for(lambda: Path(f"{gates['c']}.waiting").exists(), "leg c held at step 2", timeout=JOB_TIMEOUT_S)
    runs = {leg["tag"]: record(sweep_dir / leg["run_id"]) for leg in sweep_json(sweep_dir)["legs"]}
    # Leg c waited for leg a's job (afterany): never three legs in flight.
    assert parse_time(runs["c"]["started_at"]) >= parse_time(runs["a"]["finished_at"]), runs

    cancelled = moectl("cancel", runs["c"]["id"])
    assert cancelled.exit_code == 0, cancelled.output
    waited = moectl("wait", "trio", "--timeout", f"{JOB_TIMEOUT_S}s")
    assert waited.exit_code == 130, waited.output  # one leg interrupted
    wait_for(lambda: sweep_json(sweep_dir).get("report"), "the report job's sweep report", timeout=JOB_TIMEOUT_S)
    assert [leg["state"] for leg in sweep_json(sweep_dir)["legs"]] == ["completed", "completed", "interrupted"]

    gates["c"].touch()
    resumed = moectl("sweep", "--resume", sweep_json(sweep_dir)["id"], "--slurm", "--no-commit")

    assert resumed.exit_code == 0, resumed.output
    assert "1 of 3 legs to submit" in resumed.output
    new = the_sweep(artifact_root, "trio-resume")
    data = sweep_json(new)
    assert data["resumed_from"] == sweep_json(sweep_dir)["id"]
    assert [(leg["tag"], leg["state"]) for leg in data["legs"]] == [("a", "completed"), ("b", "completed"),
                                                                     ("c", "completed")]
    assert data["legs"][0]["run_id"] == runs["a"]["id"] and data["legs"][2]["run_id"] != runs["c"]["id"]
    assert (new / data["legs"][2]["run_id"] / "run.json").is_file()


def test_a_leg_that_fails_to_compile_is_re_run_by_its_own_job_as_a_fallback_leg(on_cluster, git_repo, monkeypatch,
                                                                                artifact_root, tmp_path):
    # launch.compile_fallback, as a local sweep: nobody follows a Slurm sweep's legs, so the leg's
    # own job re-runs it with --compile none, recorded as its own leg, before the report job reads it.
    proj = slurm_project(git_repo, monkeypatch)
    base = git(proj, "rev-parse", "HEAD").strip()
    spec = tmp_path / "cf.toml"
    # --compile-fails: the stand-in engine exits 3 (EXIT_COMPILE_FAILED) unless --compile none.
    spec.write_text('name = "cf"\n[common]\nsteps = 3\nargs = ["--compile-fails", "--sleep-per-step", "0.01"]\n'
                    '[[legs]]\ntag = "eager"\ncompile = "none"\n[[legs]]\ntag = "static"\ncompile = "static"\n')
    r = moectl("sweep", str(spec), "--slurm", "--detach")
    assert r.exit_code == 0, r.output
    sweep_dir = the_sweep(artifact_root, "cf")

    waited = moectl("wait", "cf", "--json", "--timeout", f"{JOB_TIMEOUT_S}s")
    assert waited.exit_code == 0, waited.output  # the failed leg ends as its completed fallback
    assert [(x["tag"], x["status"]) for x in json.loads(waited.output)] == [
        ("eager", "completed"), ("static_fallback_none", "completed")]
    legs = sweep_json(sweep_dir)["legs"]
    assert [(leg["tag"], leg["state"], leg["fallback_of"]) for leg in legs] == [
        ("eager", "completed", None), ("static", "failed", None), ("static_fallback_none", "completed", "static")]
    failed, fallback = (record(sweep_dir / leg["run_id"]) for leg in legs[1:])
    assert (failed["exit_code"], failed["fallback_run"]) == (3, fallback["id"])
    assert fallback["job_id"] == failed["job_id"] and failed["id"] in fallback["notes"]
    assert fallback["options"]["compile"] == "none" and fallback["summary"]["steps"] == 3
    assert fallback["argv"][fallback["argv"].index("--compile") + 1] == "none" and "--compile-fails" in fallback["argv"]
    assert (sweep_dir / fallback["id"] / "job.json").is_file() and (sweep_dir / fallback["id"] / "code").is_dir()
    shown = moectl("show", failed["id"])
    assert f"fallback   {fallback['id']} (the --compile none re-run)" in shown.output

    wait_for(lambda: sweep_json(sweep_dir).get("report"), "the report job's sweep report", timeout=JOB_TIMEOUT_S)
    text = Path(sweep_json(sweep_dir)["report"]).read_text()
    assert "`static_fallback_none` re-runs `static` with `--compile none`" in text
    wait_for(lambda: "report: sweep cf" in git(proj, "log", "-1", "--format=%s"), "the sweep report commit",
             timeout=JOB_TIMEOUT_S)
    subjects = git(proj, "log", "--format=%s", f"{base}..HEAD").splitlines()
    assert subjects[0].startswith("report: sweep cf — completed (1 through its --compile none fallback)"), subjects
    assert sorted(s.split(" — ")[0] for s in subjects[1:]) == [
        "report: none eager", "report: none static_fallback_none", "report: static"], subjects


def test_a_leg_whose_job_dies_before_moectl_starts_in_it_is_settled_by_the_report_job(on_cluster, git_repo,
                                                                                       monkeypatch, artifact_root,
                                                                                       tmp_path):
    # scancel of a leg still waiting for its turn: nothing of moectl ever ran in it. The final report
    # job settles that leg (`interrupted`: cancelled before it started) while it holds the sweep lock
    # - which once waited for itself forever, leaving the report job running and the leg `queued`
    # (and `moectl cancel` behind it).
    import subprocess

    slurm_project(git_repo, monkeypatch)
    gate = tmp_path / "gate-x"
    spec = tmp_path / "duo.toml"
    spec.write_text(f'name = "duo"\n[common]\nsteps = 3\n[[legs]]\ntag = "x"\nargs = ["--hold-at-step", "1", '
                    f'"--hold-until", "{gate}"]\n[[legs]]\ntag = "y"\n')
    r = moectl("sweep", str(spec), "--slurm", "--detach", "--max-parallel", "1")
    assert r.exit_code == 0, r.output
    sweep_dir = the_sweep(artifact_root, "duo")
    wait_for(lambda: Path(f"{gate}.waiting").exists(), "leg x held at step 1", timeout=JOB_TIMEOUT_S)
    y = record(sweep_dir / sweep_json(sweep_dir)["legs"][1]["run_id"])
    assert y["status"] == "queued"
    subprocess.run(["scancel", y["job_id"]], check=True, timeout=60)  # y never starts
    gate.touch()

    waited = moectl("wait", "duo", "--timeout", f"{JOB_TIMEOUT_S}s")
    assert waited.exit_code == 130, waited.output  # y interrupted (cancelled before moectl started in it)
    wait_for(lambda: sweep_json(sweep_dir).get("report"), "the report job's sweep report", timeout=JOB_TIMEOUT_S)
    assert [(leg["tag"], leg["state"]) for leg in sweep_json(sweep_dir)["legs"]] == [("x", "completed"),
                                                                                     ("y", "interrupted")]
    assert f"Slurm job {y['job_id']} was cancelled (CANCELLED" in record(sweep_dir / y["id"])["error"]
    assert "before moectl started in it" in record(sweep_dir / y["id"])["error"]


def test_a_followed_slurm_sweep_that_did_not_complete_ends_with_its_resume_command(on_cluster, git_repo, monkeypatch,
                                                                                   artifact_root, tmp_path):
    # As a local sweep ends: the next command where the person is looking, back to the cluster.
    slurm_project(git_repo, monkeypatch)
    spec = tmp_path / "half.toml"
    spec.write_text('name = "half"\n[common]\nsteps = 3\n[[legs]]\ntag = "ok"\n'
                    '[[legs]]\ntag = "bad"\nargs = ["--fail-at-step", "1"]\n')
    r = moectl("sweep", str(spec), "--slurm", "--no-commit")
    assert r.exit_code == 4, r.output
    sweep_id = sweep_json(the_sweep(artifact_root, "half"))["id"]
    assert f"1 leg(s) did not complete; resume them in a fresh directory: moectl sweep --resume {sweep_id} --slurm" \
        in r.output, r.output


def test_a_sweep_stopped_while_it_submits_a_leg_names_that_legs_run(on_cluster, git_repo, monkeypatch,
                                                                     artifact_root, tmp_path):
    # Ctrl-C between a leg's run directory and its sbatch: the run said `interrupted` ("before it was
    # submitted"), sweep.json still said pending with no run - a run directory the sweep did not know.
    import moectl.slurm as slurm_mod

    slurm_project(git_repo, monkeypatch)

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(slurm_mod, "submit", stopped)
    spec = tmp_path / "two.toml"
    spec.write_text('name = "two"\n[common]\nsteps = 3\n[[legs]]\ntag = "a"\n[[legs]]\ntag = "b"\n')
    r = moectl("sweep", str(spec), "--slurm", "--no-commit")
    assert r.exit_code == 130, r.output
    legs = sweep_json(the_sweep(artifact_root, "two"))["legs"]
    assert [(leg["tag"], leg["state"]) for leg in legs] == [("a", "interrupted"), ("b", "pending")]
    run = record(the_sweep(artifact_root, "two") / legs[0]["run_id"])
    assert run["status"] == "interrupted" and run["error"] == "interrupted before it was submitted"


def test_cancel_of_a_sweep_ends_its_running_and_its_pending_legs_interrupted(on_cluster, git_repo, monkeypatch,
                                                                            artifact_root, tmp_path):
    # `moectl cancel SWEEP` with leg x running and leg y waiting for its turn: y's job is cancelled
    # pending, the report job (afterany) starts and settles it before cancel_runs gets to it - as
    # `interrupted`, cancelled before it started, never `failed`.
    slurm_project(git_repo, monkeypatch)
    gate = tmp_path / "gate-x"
    spec = tmp_path / "duo.toml"
    spec.write_text(f'name = "duo"\n[common]\nsteps = 3\n[[legs]]\ntag = "x"\nargs = ["--hold-at-step", "1", '
                    f'"--hold-until", "{gate}"]\n[[legs]]\ntag = "y"\n')
    r = moectl("sweep", str(spec), "--slurm", "--detach", "--max-parallel", "1", "--no-commit")
    assert r.exit_code == 0, r.output
    sweep_dir = the_sweep(artifact_root, "duo")
    wait_for(lambda: Path(f"{gate}.waiting").exists(), "leg x held at step 1", timeout=JOB_TIMEOUT_S)

    cancelled = moectl("cancel", "duo", "--json")

    assert cancelled.exit_code == 0, cancelled.output
    assert [x["status"] for x in json.loads(cancelled.output)] == ["interrupted", "interrupted"], cancelled.output
    waited = moectl("wait", "duo", "--timeout", f"{JOB_TIMEOUT_S}s")
    assert waited.exit_code == 130, waited.output
    wait_for(lambda: sweep_json(sweep_dir).get("report"), "the report job's sweep report", timeout=JOB_TIMEOUT_S)
    legs = sweep_json(sweep_dir)["legs"]
    assert [(leg["tag"], leg["state"]) for leg in legs] == [("x", "interrupted"), ("y", "interrupted")]
    y = record(sweep_dir / legs[1]["run_id"])
    assert y["status"] == "interrupted" and "before" in y["error"] and "started" in y["error"], y["error"]


def killing(tmp_path: Path, command: str, nth: int, asked: str = "true") -> Path:
    """A PATH directory whose `command` is Slurm's own, except that the `nth` time it is asked
    (`asked`: a shell test of its arguments) it SIGKILLs the moectl that ran it (its parent)."""
    bin_dir, count = tmp_path / "bin", tmp_path / f"{command}-asked"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / command).write_text(
        f'#!/bin/sh\nif {asked}; then echo x >> {count}; if [ "$(wc -l < {count})" -eq {nth} ]; then kill -9 $PPID; '
        f'exit 1; fi; fi\nexec {shlex.quote(shutil.which(command))} "$@"\n')
    (bin_dir / command).chmod(0o755)
    return bin_dir


def killed_while_submitting(repo: Path, spec: Path, bin_dir: Path, *args: str) -> None:
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "moectl", "sweep", str(spec), "--slurm", "--detach", *args], cwd=repo,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr


def queued(job_id: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T %r"], capture_output=True, text=True,
                          timeout=60).stdout.strip()


def test_a_sweep_whose_submitter_is_killed_between_legs_leaves_them_held_and_its_resume_runs_every_leg(
        on_cluster, git_repo, monkeypatch, artifact_root, tmp_path):
    # moectl SIGKILLed as it submits leg c (its third sbatch): legs a and b were released at once and
    # ran on, with no report job after them - no sweep report, no commit of it, and a resume refused
    # while they ran. Now the legs wait held until the report job is queued: a kill before that leaves
    # only held jobs, which the resume cancels (`interrupted`) and runs again, with the sweep's report.
    proj = slurm_project(git_repo, monkeypatch)
    spec = tmp_path / "trio.toml"
    spec.write_text('name = "trio"\n[common]\nsteps = 3\nargs = ["--sleep-per-step", "0.01"]\n'
                    + "".join(f'[[legs]]\ntag = "{tag}"\n' for tag in "abc"))
    killed_while_submitting(git_repo, spec, killing(tmp_path, "sbatch", 3), "--max-parallel", "1")
    sweep_dir = the_sweep(artifact_root)
    old = sweep_json(sweep_dir)
    assert [(leg["tag"], leg["state"]) for leg in old["legs"]] == [("a", "queued"), ("b", "queued"), ("c", "pending")]
    assert old["report_job"] is None
    a, b = (record(sweep_dir / leg["run_id"]) for leg in old["legs"][:2])
    assert (a["released"], b["released"]) == (False, False), (a, b)
    assert (queued(a["job_id"]), queued(b["job_id"])) == ("PENDING JobHeldUser", "PENDING JobHeldUser")
    listed = {r["id"]: r for r in json.loads(moectl("runs", "--json").output)}
    assert [listed[r["id"]]["status"] for r in (a, b)] == ["stale", "stale"], listed

    resumed = moectl("sweep", "--resume", old["id"], "--slurm")

    assert resumed.exit_code == 0, resumed.output
    assert "(3 of 3 legs to submit" in resumed.output, resumed.output
    assert [(leg["tag"], leg["state"]) for leg in sweep_json(sweep_dir)["legs"]] == [
        ("a", "interrupted"), ("b", "interrupted"), ("c", "pending")]
    for run in (a, b):
        final = record(sweep_dir / run["id"])
        assert final["status"] == "interrupted" and "was gone before it released" in final["error"], final
        assert queued(run["job_id"]) == ""  # cancelled, not held for ever
    new = the_sweep(artifact_root, "trio-resume")
    data = sweep_json(new)
    assert [(leg["tag"], leg["state"]) for leg in data["legs"]] == [("a", "completed"), ("b", "completed"),
                                                                     ("c", "completed")]
    assert data["report"] and Path(data["report"]).is_file()
    assert "report: sweep trio" in git(proj, "log", "-1", "--format=%s")


def test_a_sweep_whose_submitter_is_killed_while_it_releases_its_legs_still_gets_its_report(
        on_cluster, git_repo, monkeypatch, artifact_root, tmp_path):
    # moectl SIGKILLed at its second `scontrol release`: leg a runs, leg b stays held. The report job,
    # queued before any leg was let go, writes the sweep report once `wait` has cancelled b.
    proj = slurm_project(git_repo, monkeypatch)
    spec = tmp_path / "duo.toml"
    spec.write_text('name = "duo"\n[common]\nsteps = 3\nargs = ["--sleep-per-step", "0.01"]\n'
                    '[[legs]]\ntag = "a"\n[[legs]]\ntag = "b"\n')
    killed_while_submitting(git_repo, spec, killing(tmp_path, "scontrol", 2, asked='[ "$1" = release ]'))
    sweep_dir = the_sweep(artifact_root, "duo")
    b = record(sweep_dir / sweep_json(sweep_dir)["legs"][1]["run_id"])
    assert b["released"] is False and queued(b["job_id"]) == "PENDING JobHeldUser", b

    waited = moectl("wait", "duo", "--timeout", f"{JOB_TIMEOUT_S}s")

    assert waited.exit_code == 130, waited.output  # b interrupted
    data = sweep_json(sweep_dir)
    assert [(leg["tag"], leg["state"]) for leg in data["legs"]] == [("a", "completed"), ("b", "interrupted")]
    assert data["report"] and Path(data["report"]).is_file(), data
    assert "report: sweep duo" in git(proj, "log", "-1", "--format=%s")
