"""`moectl run --slurm`, `wait`, `cancel` on the local 2-node Slurm cluster (issue 9): real sbatch,
scontrol, squeue, scancel; real torchrun inside the jobs. Most jobs run tests.fixtures.fake_engine
(steps of milliseconds); the snapshot test runs the real engine's tiny preset.

The CLI runs in-process (CliRunner) with this session's SLURM_CONF in the environment, so every
Slurm command moectl runs, and every job it submits (sbatch exports the environment), talks to the
session's own cluster and sees this test's artifact root and fake NVML reading."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.schema import StepMetrics, parse_line
from moectl.cli import app
from moectl.config import load_config
from tests.conftest import git, gpu, steps_written, wait_for
from tests.slurm_fixtures import SLURM_TESTS, free_port, free_ports
from tests.test_run import FAKE, commit_config, commit_files, head, record, run_dirs, write_config

REPO = Path(__file__).resolve().parents[1]
pytestmark = [*SLURM_TESTS, pytest.mark.slow]
runner = CliRunner()
FAST = ["--", "--sleep-per-step", "0.01"]
JOB_TIMEOUT_S = 240  # a job's whole life on a loaded 2-core machine, queueing included


@pytest.fixture
def on_cluster(slurm_env, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", slurm_env["SLURM_CONF"])
    monkeypatch.setenv("PATH", slurm_env["PATH"])
    return slurm_env


def slurm_project(repo: Path, monkeypatch, cluster: str = "", module: str = FAKE, launch: str = "") -> Path:
    write_config(repo, module=module, launch=launch)
    if cluster:
        with open(repo / ".moectl.toml", "a") as fh:
            fh.write(f"\n[cluster]\n{cluster}\n")
    return commit_config(repo, monkeypatch)


def moectl(*args: str):
    return runner.invoke(app, list(args))


def only_run(root: Path) -> Path:
    dirs = run_dirs(root)
    assert len(dirs) == 1, dirs
    return dirs[0]


def steps_of(run_dir: Path) -> list[StepMetrics]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(parse_line, lines) if isinstance(r, StepMetrics)]


def resumes_logged(run_dir: Path) -> list[int]:
    """The steps the engine said it resumed at, from the complete lines of a train.log still being
    written (a line cut after "resumed at step 1" must not read as step 1 of 15)."""
    text = (run_dir / "train.log").read_text()
    return [int(m) for m in re.findall(r"resumed at step (\d+) from ", text[: text.rfind("\n") + 1])]


def user_work_in_progress(proj: Path) -> dict[str, bytes]:
    """A modified tracked file, a staged file and an untracked one, as a person leaves them while a
    job runs; their bytes, to compare after moectl committed."""
    (proj / "README.md").write_text("edited, not staged\n")
    (proj / "staged.txt").write_text("staged\n")
    git(proj, "add", "staged.txt")
    (proj / "untracked.txt").write_text("mine\n")
    return {p: (proj / p).read_bytes() for p in ("README.md", "staged.txt", "untracked.txt")}


def test_run_slurm_follows_its_job_to_the_end_and_the_job_commits_only_its_report(on_cluster, git_repo, monkeypatch,
                                                                                   artifact_root):
    proj = slurm_project(git_repo, monkeypatch)
    before = user_work_in_progress(proj)

    r = moectl("run", "--slurm", "--steps", "5", "--tag", "onslurm", *FAST)

    assert r.exit_code == 0, r.output
    run_dir = only_run(artifact_root)
    rec = record(run_dir)
    assert rec["status"] == "completed" and rec["backend"] == "slurm" and rec["nodes"] == 1
    assert rec["job_id"].isdigit() and f"Slurm job {rec['job_id']}" in r.output
    assert rec["summary"]["steps"] == 5 and rec["exit_code"] == 0
    guards = {g["name"]: g for g in rec["guards"]}
    assert guards["no_other_training"]["ok"] and "Slurm job" in guards["no_other_training"]["message"]
    assert guards["gpus_idle"]["skipped"]  # a cpu run, judged inside the job
    # The job wrote the report and committed it (nobody need wait at a terminal for that).
    assert rec["commit"] == head(proj) and Path(rec["report"]).is_file()
    assert commit_files(proj) == {f"reports/{Path(rec['report']).name}", "EXPERIMENTS.md"}
    # ... and the follower names what that commit holds, as a local run does
    assert f"committed {rec['commit'][:10]} ({Path(rec['report']).name}, EXPERIMENTS.md; nothing else)" in r.output
    assert {p: (proj / p).read_bytes() for p in before} == before
    assert set(git(proj, "diff", "--cached", "--name-only").split()) == {"staged.txt"}

    # --baseline reaches the job's report and commit message, as it does a local run's.
    second = moectl("run", "--slurm", "--steps", "5", "--tag", "second", "--baseline", "onslurm", *FAST)
    assert second.exit_code == 0, second.output
    assert "vs onslurm)" in git(proj, "log", "-1", "--format=%s")


def test_status_with_slurm_tools_but_no_cluster_is_quiet_for_a_local_backend_and_says_why_for_slurm(
        slurm_env, git_repo, monkeypatch, artifact_root, tmp_path):
    """Slurm's client installed, no cluster: a workstation, a CI box, a stopped local cluster whose
    SLURM_CONF is still exported (the real squeue would retry reading it for 60 s)."""
    monkeypatch.setenv("PATH", slurm_env["PATH"])
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "no-such-slurm.conf"))
    slurm_project(git_repo, monkeypatch)
    local = json.loads(moectl("status", "--json").output)
    assert (local["slurm_jobs"], local["slurm_error"]) == (None, None)
    assert not any(line.startswith("slurm") for line in moectl("status").output.splitlines())
    slurm_project(git_repo, monkeypatch, cluster='backend = "slurm"')
    started = time.monotonic()
    on_slurm = json.loads(moectl("status", "--json").output)
    assert on_slurm["slurm_jobs"] is None and "no-such-slurm.conf does not exist" in on_slurm["slurm_error"]
    assert time.monotonic() - started < 30  # not Slurm's 60 s of retries
    refused = moectl("run", "--slurm", "--steps", "2")
    assert refused.exit_code == 2 and "does not exist" in refused.output and run_dirs(artifact_root) == []


def test_status_of_a_local_backend_says_why_slurm_cannot_be_asked_while_a_run_of_its_is_in_the_queue(
        on_cluster, git_repo, monkeypatch, artifact_root, tmp_path):
    """`run --slurm` with the default local backend: its job is as much ours as a slurm backend's,
    and a status that cannot list it must say why (it said nothing: the backend was local)."""
    slurm_project(git_repo, monkeypatch)
    r = moectl("run", "--slurm", "--detach", "--steps", "100000", "--no-commit", "--", "--sleep-per-step", "0.05")
    assert r.exit_code == 0, r.output
    rec = record(only_run(artifact_root))
    try:
        monkeypatch.setenv("SLURM_CONF", str(tmp_path / "no-such-slurm.conf"))
        status = json.loads(moectl("status", "--json").output)
        assert status["recent_runs"][0]["status"] in ("queued", "running")
        assert status["slurm_jobs"] is None and "no-such-slurm.conf does not exist" in status["slurm_error"]
        shown = [line for line in moectl("status").output.splitlines() if line.startswith("slurm")]
        assert len(shown) == 1 and "no-such-slurm.conf does not exist" in shown[0]
    finally:
        monkeypatch.setenv("SLURM_CONF", on_cluster["SLURM_CONF"])
        cancelled = moectl("cancel", rec["id"])
    assert cancelled.exit_code == 0, cancelled.output


@pytest.mark.parametrize("cluster_state", ["controller down", "no configuration"])
def test_a_cluster_that_does_not_answer_refuses_check_and_run_before_anything_is_written(
        cluster_state, slurm_env, git_repo, monkeypatch, artifact_root, tmp_path):
    """Slurm's tools work, its controller does not answer: a slurmctld that is down (this cluster's
    configuration at a port nobody listens on), or a machine with Slurm's client and no cluster
    configured at all. `check --slurm` passed there and `run --slurm` made a failed run directory."""
    monkeypatch.setenv("PATH", slurm_env["PATH"])
    if cluster_state == "controller down":
        conf = tmp_path / "slurm.conf"
        conf.write_text(re.sub(r"(?m)^SlurmctldPort=\d+$", f"SlurmctldPort={free_port()}",
                               Path(slurm_env["SLURM_CONF"]).read_text()))
        monkeypatch.setenv("SLURM_CONF", str(conf))
        said = "Slurmctld(primary) at "
    else:
        if Path("/etc/slurm/slurm.conf").exists():
            pytest.skip("this machine has a Slurm configuration of its own")
        monkeypatch.delenv("SLURM_CONF", raising=False)
        said = "Could not establish a configuration source"
    slurm_project(git_repo, monkeypatch)
    for args in (["check", "--slurm"], ["run", "--slurm", "--steps", "2"], ["run", "--slurm", "--dry-run"]):
        r = moectl(*args)
        assert r.exit_code == 2, (args, r.output)
        assert r.output.startswith("error: --slurm: Slurm's controller does not answer: ") and said in r.output
        assert len(r.output.strip().splitlines()) == 1, r.output
    assert run_dirs(artifact_root) == []


def test_wait_keeps_its_timeout_while_the_controller_does_not_answer(on_cluster, git_repo, monkeypatch,
                                                                   artifact_root, tmp_path):
    """A slurmctld that is down (its configuration at a port nobody listens on): each scontrol
    retries for 18 s before it gives up, and `wait --timeout 2s` waited for each of them."""
    slurm_project(git_repo, monkeypatch)
    r = moectl("run", "--slurm", "--detach", "--steps", "100000", "--no-commit", "--", "--sleep-per-step", "0.05")
    assert r.exit_code == 0, r.output
    rec = record(only_run(artifact_root))
    down = tmp_path / "slurm.conf"
    down.write_text(re.sub(r"(?m)^SlurmctldPort=\d+$", f"SlurmctldPort={free_port()}",
                           Path(on_cluster["SLURM_CONF"]).read_text()))
    try:
        monkeypatch.setenv("SLURM_CONF", str(down))
        started = time.monotonic()
        waited = moectl("wait", rec["id"], "--timeout", "2s")
        took = time.monotonic() - started
    finally:
        monkeypatch.setenv("SLURM_CONF", on_cluster["SLURM_CONF"])
        cancelled = moectl("cancel", rec["id"])
    assert waited.exit_code == 130 and f"--timeout 2s passed; still going: {rec['id']}" in waited.output, waited.output
    assert took < 10, f"wait --timeout 2s took {took:.1f} s"  # one scontrol alone takes 18 s
    assert record(only_run(artifact_root))["status"] == "interrupted" and cancelled.exit_code == 0, cancelled.output


def test_runs_asks_a_controller_that_does_not_answer_once_not_once_per_queued_run(on_cluster, git_repo, monkeypatch,
                                                                                   artifact_root, tmp_path):
    """Listing runs asks Slurm whether each queued or running Slurm run's job still lives. With the
    controller down every scontrol waits out its retries: one silence now stands for all of them."""
    slurm_project(git_repo, monkeypatch)
    ids = []
    for tag in ("a", "b", "c"):
        r = moectl("run", "--slurm", "--detach", "--tag", tag, "--steps", "100000", "--no-commit", "--",
                   "--sleep-per-step", "0.05")
        assert r.exit_code == 0, r.output
        [run_dir] = [d for d in run_dirs(artifact_root) if d.name.endswith(f"-{tag}")]
        ids.append(run_dir.name)
    down = tmp_path / "slurm.conf"  # its retries cut to seconds: MessageTimeout
    down.write_text(re.sub(r"(?m)^SlurmctldPort=\d+$", f"SlurmctldPort={free_port()}",
                           Path(on_cluster["SLURM_CONF"]).read_text()) + "MessageTimeout=3\n")
    try:
        monkeypatch.setenv("SLURM_CONF", str(down))
        started = time.monotonic()
        one = subprocess.run(["scontrol", "show", "job", "-o", "1"], capture_output=True, text=True, timeout=120)
        one_s = time.monotonic() - started
        assert one.returncode != 0 and "Unable to contact slurm controller" in one.stderr
        started = time.monotonic()
        listed = moectl("runs", "--json")
        took = time.monotonic() - started
        started = time.monotonic()
        status = moectl("status", "--json")  # its queue listing too: not squeue's retries
        status_took = time.monotonic() - started
    finally:
        monkeypatch.setenv("SLURM_CONF", on_cluster["SLURM_CONF"])
        cancelled = moectl("cancel", *ids)
    assert listed.exit_code == 0, listed.output
    assert {r["id"]: r["status"] for r in json.loads(listed.output)}.keys() == set(ids)
    assert all(r["status"] in ("queued", "running") for r in json.loads(listed.output))  # taken at their word
    # `scontrol ping` first (milliseconds, down or up): not even one query's retries are waited out
    assert took < one_s / 2, f"runs took {took:.1f} s; one unanswered scontrol takes {one_s:.1f} s"
    assert status.exit_code == 0 and status_took < one_s / 2, (status_took, one_s)
    assert json.loads(status.output)["slurm_error"].startswith("Slurm's controller does not answer: ")
    assert cancelled.exit_code == 0, cancelled.output


def test_a_jobs_stopped_commit_is_recorded_shown_and_moectl_commit_lands_it_later(on_cluster, git_repo, monkeypatch,
                                                                                  artifact_root, tmp_path):
    """The person switched branches while the job trained: the job must not commit onto that
    branch. The record says why (commit_error), the follower shows it, and `moectl commit RUN`
    back on the expected branch commits the report and sets the record straight."""
    proj = slurm_project(git_repo, monkeypatch)
    gate = tmp_path / "go"
    r = moectl("run", "--slurm", "--detach", "--steps", "6", "--tag", "stopped", "--",
               "--sleep-per-step", "0.01", "--hold-at-step", "3", "--hold-until", str(gate))
    assert r.exit_code == 0, r.output
    run_dir = only_run(artifact_root)
    wait_for(lambda: Path(f"{gate}.waiting").exists(), "the job's trainer holding at step 3", timeout=JOB_TIMEOUT_S)
    git(proj, "checkout", "-q", "-b", "elsewhere")
    gate.touch()
    followed = moectl("wait", "stopped", "--json")
    assert followed.exit_code == 0, followed.output  # the training completed; only the commit was stopped
    rec = record(run_dir)
    assert rec["status"] == "completed" and rec["commit"] is None
    assert rec["commit_error"] and "moectl commit" in rec["commit_error"] and rec["notes"] is None
    assert git(proj, "log", "--all", "--format=%s").count("report:") == 0

    git(proj, "checkout", "-q", "main")
    landed = moectl("commit", "stopped")
    assert landed.exit_code == 0, landed.output
    rec = record(run_dir)
    assert rec["commit"] == head(proj) and rec["commit_error"] is None
    assert f"reports/{Path(rec['report']).name}" in commit_files(proj)


def test_the_job_trains_the_code_snapshot_taken_at_submit_not_the_edited_working_tree(on_cluster, git_repo,
                                                                                       monkeypatch, artifact_root,
                                                                                       tmp_path):
    shutil.copytree(REPO / "engine", git_repo / "engine", ignore=shutil.ignore_patterns("__pycache__"))
    git(git_repo, "add", "engine")
    # The job may start no sooner than 5 s after submission: time to break the tree first.
    (git_repo / ".moectl.toml").write_text(
        '[project]\nname = "moe"\nbranch = "main"\nvenv = ""\n[launch]\nmodule = "engine.train"\n'
        '[defaults]\npreset = "tiny"\n[cluster]\nextra_sbatch = ["--begin=now+5"]\n')
    proj = commit_config(git_repo, monkeypatch)
    engine_args = ["--seed", "7", "--eval-batches", "1"]

    r = moectl("run", "--slurm", "--detach", "--device", "cpu", "--steps", "6", "--no-commit", "--", *engine_args)
    assert r.exit_code == 0, r.output
    run_dir = only_run(artifact_root)
    rec = record(run_dir)
    assert rec["status"] == "queued" and rec["job_id"] in r.output and rec["id"] in r.output
    model = proj / "engine" / "model.py"
    model.write_text(model.read_text() + "\nraise RuntimeError('the working tree is broken')\n")
    broken_at = time.time()
    broken = subprocess.run([sys.executable, "-c", "import engine.model"], cwd=proj, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": str(proj)})
    assert broken.returncode != 0 and "the working tree is broken" in broken.stderr

    waited = moectl("wait", rec["id"], "--timeout", f"{JOB_TIMEOUT_S}s")
    assert waited.exit_code == 0, waited.output
    rec = record(run_dir)
    assert rec["status"] == "completed", rec.get("error")
    from moectl.store import parse_time

    assert parse_time(rec["started_at"]) > broken_at, "the job started before the tree was broken: proves nothing"
    # The original code's losses: the engine of this checkout, same options, run directly.
    ref = tmp_path / "reference"
    direct = subprocess.run([sys.executable, "-m", "engine.train", "--preset", "tiny", "--device", "cpu", "--steps", "6",
                             *engine_args, "--out-dir", str(ref)], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert direct.returncode == 0, direct.stderr[-2000:]
    job_losses = [s.loss for s in steps_of(run_dir)]
    assert len(job_losses) == 6
    assert job_losses == pytest.approx([s.loss for s in steps_of(ref)], abs=1e-6)


def test_a_project_with_modules_named_like_moectls_own_still_runs_as_a_job(on_cluster, git_repo, monkeypatch,
                                                                          artifact_root):
    # The snapshot came first on moectl.job's own path: a project's engine/ package (or a queue.py)
    # stood in for the one moectl imports, and every --slurm run failed before moectl started in it.
    (git_repo / "engine").mkdir()
    (git_repo / "engine" / "__init__.py").write_text("")
    (git_repo / "engine" / "schema.py").write_text("TABLES = ['users']  # this project's own, not moectl's\n")
    (git_repo / "queue.py").write_text("raise ImportError('the project\\'s queue.py, not the standard library\\'s')\n")
    (git_repo / "train.py").write_text(
        "import argparse\np = argparse.ArgumentParser()\np.add_argument('--steps', type=int)\n"
        "for i in range(p.parse_args().steps):\n    print(f'step {i} loss {3 - i / 10:.4f} time 50.0ms', flush=True)\n")
    (git_repo / ".moectl.toml").write_text(
        '[project]\nname = "own"\nbranch = "main"\nvenv = ""\n[launch]\nscript = "train.py"\nlauncher = "python"\n'
        '[launch.options]\nsteps = "--steps={}"\n[metrics]\nsource = "stdout"\nformat = "regex"\n'
        "step = 'step (\\d+)'\n[metrics.patterns]\nloss = 'loss ([\\d.]+)'\ndt_ms = 'time ([\\d.]+)ms'\n")
    git(git_repo, "add", "engine", "queue.py", "train.py")
    commit_config(git_repo, monkeypatch)
    r = moectl("run", "--slurm", "--steps", "6", "--tag", "own", "--device", "cpu")
    assert r.exit_code == 0, r.output
    rec = record(only_run(artifact_root))
    assert rec["status"] == "completed" and rec["summary"]["run_steps"] == 6, rec.get("error")
    assert rec["commit"] == head(git_repo)


def test_a_busy_gpu_on_the_node_refuses_inside_the_job_with_exit_3_and_a_refused_record(on_cluster, git_repo,
                                                                                        monkeypatch, artifact_root,
                                                                                        fake_nvml):
    proj = slurm_project(git_repo, monkeypatch)
    # The zombie of an earlier job holding memory on the node's GPU (the job reads the same fake NVML).
    fake_nvml(gpus=[gpu(0, mem_used_mib=30000, processes=[{"pid": 4242, "name": "python", "used_mib": 30000}])])

    r = moectl("run", "--slurm", "--device", "cuda", "--steps", "5", *FAST)

    assert r.exit_code == 3, r.output
    rec = record(only_run(artifact_root))
    assert rec["status"] == "refused" and rec["exit_code"] == 3
    assert f"inside Slurm job {rec['job_id']}" in rec["error"] and "GPU 0" in rec["error"]
    assert "GPU 0" in r.output
    assert not (Path(rec["exp_dir"]) / "metrics.jsonl").exists()  # torchrun never started
    gpus_idle = next(g for g in rec["guards"] if g["name"] == "gpus_idle")
    assert not gpus_idle["ok"] and not gpus_idle["skipped"]
    assert git(proj, "log", "-1", "--format=%s").strip() == "moectl config"  # no report of a refusal


def test_cancel_ends_a_running_job_interrupted_with_its_metrics_summarised(on_cluster, git_repo, monkeypatch,
                                                                          artifact_root):
    slurm_project(git_repo, monkeypatch)
    r = moectl("run", "--slurm", "--detach", "--steps", "5000", "--no-commit", "--", "--sleep-per-step", "0.05")
    assert r.exit_code == 0, r.output
    run_dir = only_run(artifact_root)
    wait_for(lambda: len(steps_written(run_dir / "metrics.jsonl")) >= 3,
             "the job's first 3 steps in metrics.jsonl", timeout=JOB_TIMEOUT_S)

    cancelled = moectl("cancel", record(run_dir)["id"])

    assert cancelled.exit_code == 0, cancelled.output
    rec = record(run_dir)
    assert rec["status"] == "interrupted" and "SIGTERM" in rec["error"]
    assert rec["summary"]["steps"] >= 3 and rec["summary"]["steps"] < 5000
    waited = moectl("wait", rec["id"], "--json")
    assert waited.exit_code == 130 and json.loads(waited.output)[0]["status"] == "interrupted"
    squeue = subprocess.run(["squeue", "-h", "-j", rec["job_id"]], capture_output=True, text=True, timeout=60)
    assert rec["job_id"] not in squeue.stdout


def test_two_nodes_train_the_same_losses_as_one_node_with_two_processes(on_cluster, git_repo, monkeypatch,
                                                                         artifact_root, tmp_path):
    # Free rendezvous ports: other suites on this machine may hold 29500.
    base = free_ports(1000)
    slurm_project(git_repo, monkeypatch, module="engine.train", cluster=f"rdzv_port = {base}")
    engine_args = ["--seed", "5", "--eval-batches", "1"]
    # The one-node twin trains meanwhile, beside the job (at a port of its own).
    local = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                              "-m", "engine.train", "--preset", "tiny", "--device", "cpu", "--steps", "6", *engine_args,
                              "--out-dir", str(tmp_path / "one-node")], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        r = moectl("run", "--slurm", "--nodes", "2", "--nproc", "1", "--device", "cpu", "--steps", "6", "--no-commit",
                   "--", *engine_args)
        _, local_err = local.communicate(timeout=300)
    finally:
        if local.poll() is None:
            local.kill()
            local.wait()
    assert r.exit_code == 0, r.output
    run_dir = only_run(artifact_root)
    rec = record(run_dir)
    assert rec["status"] == "completed" and rec["nodes"] == 2
    start = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert start["world_size"] == 2  # two agents of one process each formed one world
    # The record and command.txt hold the command that ran: srun, an agent per node, c10d at the first
    argv = rec["argv"]
    assert argv[:4] == ["srun", "--ntasks-per-node=1", "--nodes=2", "--kill-on-bad-exit=1"] and "--standalone" not in argv
    assert argv[argv.index("--nnodes") + 1] == "2" and argv[argv.index("--rdzv-id") + 1] == rec["job_id"]
    assert argv[argv.index("--rdzv-endpoint") + 1].endswith(f":{base + int(rec['job_id']) % 1000}")  # its own port
    assert shlex.join(argv) in (run_dir / "command.txt").read_text()

    assert local.returncode == 0, local_err[-2000:]
    two, one = steps_of(run_dir), steps_of(tmp_path / "one-node")
    assert [s.step for s in two] == [s.step for s in one] == list(range(6))
    for a, b in zip(two, one):
        assert abs(a.loss - b.loss) <= 1e-5, f"step {a.step}: 2 nodes {a.loss} vs 1 node {b.loss}"


def test_two_multi_node_jobs_on_one_first_node_each_meet_at_a_port_of_their_own(on_cluster, git_repo, monkeypatch,
                                                                                 artifact_root, tmp_path):
    # `--repeat 2 --nodes 2` on the 2-node cluster: both jobs start their c10d rendezvous on the same
    # first node. At one port the second job's agents joined the first's store, and failed when the
    # first ended; each at its own port, ending the first leaves the second training to its end.
    slurm_project(git_repo, monkeypatch, cluster=f"rdzv_port = {free_ports(1000)}")
    gate = tmp_path / "gate"
    r = moectl("run", "--slurm", "--nodes", "2", "--nproc", "1", "--repeat", "2", "--detach", "--steps", "4",
               "--no-commit", "--tag", "pair", "--", "--hold-at-step", "2", "--hold-until", str(gate))
    assert r.exit_code == 0, r.output
    dirs = sorted(run_dirs(artifact_root), key=lambda d: record(d)["repeat"])
    for d in dirs:  # both jobs in their rendezvous and training at once, held at step 2
        wait_for(lambda d=d: record(d)["status"] == "running" and len(steps_written(d / "metrics.jsonl")) >= 2,
                 f"{d.name} running, held at step 2", timeout=JOB_TIMEOUT_S)
    first, second = (record(d) for d in dirs)
    assert first["nodes"] == second["nodes"] == 2
    endpoints = [rec["argv"][rec["argv"].index("--rdzv-endpoint") + 1] for rec in (first, second)]
    assert endpoints[0].split(":")[0] == endpoints[1].split(":")[0] and endpoints[0] != endpoints[1], endpoints

    cancelled = moectl("cancel", first["id"])  # the first job ends: its c10d store with it
    assert cancelled.exit_code == 0, cancelled.output
    time.sleep(5)  # were the second job's agents in the first's store, they would be failing now
    gate.touch()
    waited = moectl("wait", second["id"], "--json", "--timeout", f"{JOB_TIMEOUT_S}s")
    assert waited.exit_code == 0, (waited.output, (dirs[1] / f"slurm-{second['job_id']}.out").read_text()[-3000:])
    assert json.loads(waited.output)[0]["status"] == "completed"
    assert [s.step for s in steps_written(dirs[1] / "metrics.jsonl")] == [0, 1, 2, 3]


# --- bad input: one line, the right exit code, no run left `queued` --------------------------------


def test_nodes_zero_is_a_usage_error_and_submits_nothing(on_cluster, git_repo, monkeypatch, artifact_root):
    slurm_project(git_repo, monkeypatch)
    r = moectl("run", "--slurm", "--nodes", "0", *FAST)
    assert r.exit_code == 2 and "--nodes" in r.output and len(r.output.strip().splitlines()) == 1
    assert run_dirs(artifact_root) == []


def test_a_job_slurm_rejects_shows_slurms_message_and_the_run_is_failed_not_queued(on_cluster, git_repo,
                                                                                   monkeypatch, artifact_root):
    slurm_project(git_repo, monkeypatch, cluster='partition = "nosuchpartition"')
    r = moectl("run", "--slurm", *FAST)
    assert r.exit_code == 2, r.output
    assert "Slurm rejected the job" in r.output and "partition" in r.output.lower()
    assert len(r.output.strip().splitlines()) == 1
    rec = record(only_run(artifact_root))
    assert rec["status"] == "failed" and "Slurm rejected the job" in rec["error"] and rec["job_id"] is None


def test_a_bad_sbatch_option_shows_the_line_that_names_it(on_cluster, git_repo, monkeypatch, artifact_root):
    slurm_project(git_repo, monkeypatch, cluster='extra_sbatch = ["--bogus-flag"]')
    r = moectl("run", "--slurm", *FAST)
    assert r.exit_code == 2 and "--bogus-flag" in r.output and 'Try "sbatch --help"' not in r.output, r.output


def test_a_job_slurm_accepts_but_will_never_start_is_cancelled_and_failed_not_waited_on(on_cluster, git_repo,
                                                                                       monkeypatch, artifact_root):
    # Three nodes on the two-node cluster: sbatch takes it and it pends for ever (PartitionNodeLimit).
    # The follower says so, cancels it and exits 2 (what was asked cannot be had), no run left queued.
    slurm_project(git_repo, monkeypatch)
    r = moectl("run", "--slurm", "--nodes", "3", *FAST)
    assert r.exit_code == 2, r.output
    rec = record(only_run(artifact_root))
    assert rec["status"] == "failed", rec
    assert rec["error"].startswith(f"Slurm will never start job {rec['job_id']} as asked: PartitionNodeLimit "
                                   "(more nodes than the partition allows); it was cancelled"), rec["error"]
    gone = subprocess.run(["squeue", "-h", "-j", rec["job_id"], "-o", "%T"], capture_output=True, text=True, timeout=60)
    assert gone.stdout.strip() in ("", "CANCELLED", "COMPLETING"), gone.stdout
    assert moectl("wait", rec["id"]).exit_code == 2


def test_a_pending_job_cancelled_outside_moectl_ends_interrupted_not_failed(on_cluster, git_repo, monkeypatch,
                                                                           artifact_root):
    # `scancel JOBID` of a job still waiting (here: for its begin time): a cancelled run, exit 130.
    slurm_project(git_repo, monkeypatch, cluster='extra_sbatch = ["--begin=now+1hour"]')
    r = moectl("run", "--slurm", "--detach", *FAST)
    assert r.exit_code == 0, r.output
    rec = record(only_run(artifact_root))
    assert rec["status"] == "queued"
    subprocess.run(["scancel", rec["job_id"]], check=True, timeout=60)

    waited = moectl("wait", rec["id"], "--timeout", f"{JOB_TIMEOUT_S}s")

    assert waited.exit_code == 130, waited.output
    final = record(only_run(artifact_root))
    assert final["status"] == "interrupted", final
    assert final["error"].startswith(f"Slurm job {rec['job_id']} was cancelled (CANCELLED, exit 0:0) before moectl "
                                     "started in it"), final["error"]


def test_a_job_whose_submitter_was_killed_before_releasing_it_is_cancelled_and_settled_not_held_for_ever(
        on_cluster, git_repo, monkeypatch, artifact_root, tmp_path):
    # moectl SIGKILLed between `sbatch --hold` and `scontrol release`: the job stayed held in the
    # queue for ever, and runs/show/wait said `queued` (wait: until its timeout). The kill comes from
    # an scontrol on PATH that, asked to release, kills the moectl that asked (its parent) instead.
    slurm_project(git_repo, monkeypatch)
    real = shutil.which("scontrol")
    killer = tmp_path / "bin"
    killer.mkdir()
    (killer / "scontrol").write_text(f'#!/bin/sh\nif [ "$1" = release ]; then kill -9 $PPID; exit 1; fi\n'
                                     f'exec {shlex.quote(real)} "$@"\n')
    (killer / "scontrol").chmod(0o755)
    env = {**os.environ, "PATH": f"{killer}:{os.environ['PATH']}", "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "moectl", "run", "--slurm", "--detach", "--no-commit", *FAST],
                       cwd=git_repo, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr
    run_dir = only_run(artifact_root)
    rec = record(run_dir)
    assert rec["status"] == "queued" and rec["released"] is False and rec["job_id"], rec

    def held() -> str:
        return subprocess.run(["squeue", "-h", "-j", rec["job_id"], "-o", "%T %r"], capture_output=True, text=True,
                              timeout=60).stdout.strip()

    assert held() == "PENDING JobHeldUser"
    # Listing it says its owner is gone (as for a vanished job) ...
    listed = json.loads(moectl("runs", "--json").output)
    assert listed[0]["status"] == "stale" and listed[0]["recorded_status"] == "queued", listed[0]
    # ... and `wait` ends it: the job cancelled, the run interrupted (exit 130), saying why.
    waited = moectl("wait", rec["id"], "--timeout", "60s")
    assert waited.exit_code == 130, waited.output
    final = record(run_dir)
    assert final["status"] == "interrupted" and final["finished_at"], final
    assert final["error"] == (f"interrupted while it was submitted: the moectl that submitted it (pid {rec['pid']} "
                              f"on {rec['host']}) was gone before it released Slurm job {rec['job_id']}, held since "
                              "sbatch; the job was cancelled before it started"), final["error"]
    assert "--timeout" not in waited.output
    wait_for(lambda: held() == "", "the held job leaving the queue", timeout=JOB_TIMEOUT_S)


def test_a_run_submitted_whole_records_its_job_released_and_a_job_held_later_on_purpose_is_left_alone(
        on_cluster, git_repo, monkeypatch, artifact_root):
    # `scontrol hold` of a queued job by its owner, after moectl (--detach) has exited: not abandoned.
    slurm_project(git_repo, monkeypatch, cluster='extra_sbatch = ["--begin=now+1hour"]')
    r = moectl("run", "--slurm", "--detach", *FAST)
    assert r.exit_code == 0, r.output
    run_dir = only_run(artifact_root)
    rec = record(run_dir)
    assert rec["status"] == "queued" and rec["released"] is True, rec
    subprocess.run(["scontrol", "hold", rec["job_id"]], check=True, timeout=60)
    rec["pid"] = 2**22 + 11  # a submitter long gone (the CLI ran in this process)
    (run_dir / "run.json").write_text(json.dumps(rec))
    assert json.loads(moectl("runs", "--json").output)[0]["status"] == "queued"
    waited = moectl("wait", rec["id"], "--timeout", "3s")
    assert waited.exit_code == 130 and "--timeout 3s passed" in waited.output, waited.output
    assert record(run_dir)["status"] == "queued"
    assert moectl("cancel", rec["id"]).exit_code == 0


def test_a_run_settled_by_a_reader_while_its_job_ran_on_ends_as_the_job_recorded_it_saying_so(
        on_cluster, git_repo, monkeypatch, artifact_root):
    # Slurm says NODE_FAIL of a node that trains on: a `wait` settles the run `interrupted` from that
    # word, then the job's moectl finishes it. Its end was written over the settled record without
    # a trace (two answers, the first gone). Here the reader is execution.settle_gone_job itself,
    # called as `wait` calls it once Slurm says the job ended.
    from moectl.execution import read_record, settle_gone_job

    slurm_project(git_repo, monkeypatch)
    r = moectl("run", "--slurm", "--detach", "--steps", "40", "--no-commit", "--", "--sleep-per-step", "0.1")
    assert r.exit_code == 0, r.output
    run_dir = only_run(artifact_root)
    wait_for(lambda: len(steps_written(run_dir / "metrics.jsonl")) >= 3, "3 steps trained", timeout=JOB_TIMEOUT_S)
    settled = settle_gone_job(read_record(run_dir))
    assert settled.status == "interrupted" and record(run_dir)["status"] == "interrupted"
    job = settled.job_id

    wait_for(lambda: subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True,
                                    timeout=60).stdout.strip() == "", "the job's end", timeout=JOB_TIMEOUT_S)
    final = record(run_dir)
    # The job's end stands (its 40 steps, its exit 0) ...
    assert final["status"] == "completed" and final["exit_code"] == 0 and final["summary"]["steps"], final
    assert len(steps_of(run_dir)) == 40
    # ... and says what was settled before it, when and why.
    [note] = [w for w in final["warnings"] if w.startswith("settled `interrupted` at ")]
    assert note == (f"settled `interrupted` at {settled.finished_at} before this job's moectl recorded the run's end "
                    f"({settled.error.splitlines()[0]}); that moectl ran on and its end stands"), note
    assert settled.error.startswith(f"Slurm job {job} ended (RUNNING")
    assert note in moectl("show", final["id"]).output
    # A reader coming after the end leaves it as it is.
    assert settle_gone_job(read_record(run_dir)).status == "completed" and record(run_dir) == final


def test_a_job_that_fails_to_start_ends_failed_with_exit_4(on_cluster, git_repo, monkeypatch, artifact_root):
    # slurmstepd cannot open the job's output file: the batch script never runs, moectl never starts.
    slurm_project(git_repo, monkeypatch, cluster='extra_sbatch = ["--output=/nonexistent/moectl/out.txt"]')
    r = moectl("run", "--slurm", *FAST)
    assert r.exit_code == 4, r.output
    rec = record(only_run(artifact_root))
    assert rec["status"] == "failed" and "before moectl started in it" in rec["error"]
    assert f"Slurm job {rec['job_id']} ended (FAILED" in rec["error"]


# The commonest end of a cluster job, a run stopped at its time limit, takes 60-90 s of waiting:
# Slurm's shortest limit is a minute and its controller looks at limits every 30 s. So its job is
# submitted once the other Slurm tests are done (tests/conftest.py orders the two tests below) and
# checked at the end of the session, while the rest of the suite runs. Its trainer is a plain
# `python time_limit_trainer.py` (launcher "python"): no torchrun, no engine module, nothing the
# no_other_training guard of those other tests' runs counts as training.
TIME_LIMIT_TRAINER = """import time
step = 0
while True:  # until Slurm's time limit stops it
    print(f"step {step:05d}/99999 ({step / 999.99:.2f}%) | loss: 2.000000 | dt: 50.00ms | tok/sec: 1,000", flush=True)
    step += 1
    time.sleep(0.05)
"""


@pytest.fixture(scope="session")
def time_limited_job(slurm_env, tmp_path_factory) -> dict:
    """A detached run with `[cluster] time = "1"`, submitted with the real CLI (a subprocess: no
    test's monkeypatched environment reaches it); its repository, artifact root and run directory."""
    base = tmp_path_factory.mktemp("time-limit")
    repo, root = base / "repo", base / "artifacts"
    repo.mkdir()
    for args in (["init", "-q", "-b", "main"], ["config", "user.name", "Test User"],
                 ["config", "user.email", "test@example.com"], ["config", "commit.gpgsign", "false"]):
        git(repo, *args)
    (repo / "time_limit_trainer.py").write_text(TIME_LIMIT_TRAINER)
    (repo / ".moectl.toml").write_text(
        '[project]\nname = "tl"\nbranch = "main"\nvenv = ""\n\n'
        '[launch]\nscript = "time_limit_trainer.py"\nlauncher = "python"\n\n'
        '[metrics]\nsource = "stdout"\nformat = "nanochat"\n\n[cluster]\ntime = "1"\n')
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "a trainer that never ends")
    env = {**os.environ, "PATH": slurm_env["PATH"], "SLURM_CONF": slurm_env["SLURM_CONF"],
           "MOECTL_ARTIFACT_ROOT": str(root), "MOECTL_CACHE_DIR": str(base / "cache"), "PYTHONPATH": str(REPO)}
    env.pop("MOECTL_FAKE_NVML", None)
    r = subprocess.run([sys.executable, "-m", "moectl", "run", "--slurm", "--detach", "--no-commit", "--device", "cpu"],
                       cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return {"repo": repo, "artifact_root": root, "run_dir": only_run(root), "submitted": r.stdout}


def test_a_time_limited_job_is_submitted_to_run_beside_the_rest_of_the_suite(time_limited_job):
    run_dir = time_limited_job["run_dir"]
    assert "#SBATCH --time=1" in (run_dir / "job.sh").read_text()
    assert record(run_dir)["status"] in ("queued", "running")
    assert f"as Slurm job {record(run_dir)['job_id']}" in time_limited_job["submitted"]


def test_a_run_stopped_at_its_slurm_time_limit_is_recorded_as_such_with_what_it_trained(time_limited_job,
                                                                                        on_cluster, monkeypatch):
    monkeypatch.setenv("MOECTL_ARTIFACT_ROOT", str(time_limited_job["artifact_root"]))
    monkeypatch.chdir(time_limited_job["repo"])
    run_dir = time_limited_job["run_dir"]
    waited = moectl("wait", record(run_dir)["id"], "--timeout", f"{60 + 30 + JOB_TIMEOUT_S}s")
    assert waited.exit_code == 130, waited.output
    final = record(run_dir)
    assert final["status"] == "interrupted", final
    assert final["error"].splitlines()[0] == ("stopped by Slurm at the job's time limit (00:01:00) with SIGTERM; "
                                              "`run --requeue` resumes such a run from its last checkpoint")
    assert final["summary"]["steps"] == 50 and len(steps_of(run_dir)) > 50  # what it trained is summarised
    assert "time limit" in moectl("show", final["id"]).output


def test_status_lists_the_job_runs_shows_it_queued_or_running_and_a_vanished_job_is_stale(on_cluster, git_repo,
                                                                                          monkeypatch, artifact_root):
    slurm_project(git_repo, monkeypatch)
    r = moectl("run", "--slurm", "--detach", "--steps", "5000", "--no-commit", "--", "--sleep-per-step", "0.05")
    assert r.exit_code == 0, r.output
    run_dir = only_run(artifact_root)
    rec = record(run_dir)
    listed = json.loads(moectl("runs", "--json").output)
    assert listed[0]["status"] in ("queued", "running") and listed[0]["job_id"] == rec["job_id"]
    wait_for(lambda: record(run_dir)["status"] == "running", "the job's run.json saying running", timeout=JOB_TIMEOUT_S)
    status = json.loads(moectl("status", "--json").output)
    (job,) = [j for j in status["slurm_jobs"] if j["job_id"] == rec["job_id"]]
    assert job["run_id"] == rec["id"] and job["state"] == "RUNNING" and job["nodes"] == 1

    # The OOM killer takes moectl inside the job (the batch script itself): nothing is left to write the end.
    wait_for(lambda: len(steps_written(run_dir / "metrics.jsonl")) >= 3, "3 steps trained", timeout=JOB_TIMEOUT_S)
    os.kill(record(run_dir)["pid"], signal.SIGKILL)
    wait_for(lambda: rec["job_id"] not in subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True,
                                                         timeout=60).stdout, "the killed job leaving the queue",
             timeout=JOB_TIMEOUT_S)
    assert record(run_dir)["status"] == "running"
    shown = json.loads(moectl("show", rec["id"], "--json").output)
    assert shown["status"] == "stale" and shown["recorded_status"] == "running"
    assert json.loads(moectl("runs", "--json").output)[0]["status"] == "stale"

    waited = moectl("wait", rec["id"])
    assert waited.exit_code == 130, waited.output
    final = record(run_dir)
    assert final["status"] == "interrupted" and f"Slurm job {rec['job_id']} ended" in final["error"]
    assert final["summary"]["steps"] >= 3  # what it trained before the kill is summarised (SPEC §6)


def test_a_compile_failure_in_the_job_is_re_run_with_compile_none_as_its_own_job(on_cluster, git_repo, monkeypatch,
                                                                                    artifact_root):
    # launch.compile_fallback holds for Slurm runs too: the follower submits the --compile none re-run,
    # of the failed run's code snapshot - not of the working tree as it is by then.
    import threading

    proj = slurm_project(git_repo, monkeypatch)

    def edit_once_submitted():
        def submitted():
            return any((d / "run.json").is_file() and record(d).get("job_id") for d in run_dirs(artifact_root))

        wait_for(submitted, "the first job submitted", timeout=JOB_TIMEOUT_S, poll_s=0.02)
        (proj / "README.md").write_text("edited after the submission\n")

    editor = threading.Thread(target=edit_once_submitted, daemon=True)
    editor.start()
    r = moectl("run", "--slurm", "--json", "--compile", "static", "--steps", "3", "--tag", "cf",
               "--", "--compile-fails", "--sleep-per-step", "0.01")
    editor.join(timeout=60)
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)  # one document: the re-run, the failed attempt inside it
    assert (data["tag"], data["status"], data["options"]["compile"], data["backend"]) == (
        "cf_fallback_none", "completed", "none", "slurm")
    [first] = data["previous_attempts"]
    assert (first["tag"], first["status"], first["exit_code"]) == ("cf", "failed", 3)
    assert first["job_id"] != data["job_id"] and first["id"] in data["notes"]
    assert {d.name for d in run_dirs(artifact_root)} == {first["id"], data["id"]}
    assert len(list((proj / "reports").glob("*.md"))) == 2  # each job wrote and committed its own report
    assert "cf_fallback_none" in git(proj, "log", "-1", "--format=%s")
    failed_dir, final_dir = Path(first["exp_dir"]), Path(data["exp_dir"])
    assert (final_dir / "git.diff").read_bytes() == (failed_dir / "git.diff").read_bytes()
    assert b"edited after the submission" not in (final_dir / "git.diff").read_bytes()
    assert not (final_dir / "code" / "README.md").exists() or b"edited after" not in (
        final_dir / "code" / "README.md").read_bytes()
    assert data["git"] == first["git"]


def test_a_detached_run_that_fails_to_compile_is_re_run_by_its_own_job_and_wait_ends_with_the_re_run(
        on_cluster, git_repo, monkeypatch, artifact_root):
    # Nobody follows a --detach run: its job makes the --compile none re-run itself (moectl.job).
    proj = slurm_project(git_repo, monkeypatch)
    r = moectl("run", "--slurm", "--detach", "--json", "--compile", "static", "--steps", "3", "--tag", "cfd",
               "--", "--compile-fails", "--sleep-per-step", "0.01")
    assert r.exit_code == 0, r.output
    first = json.loads(r.stdout)
    (proj / "README.md").write_text("edited after the submission\n")  # the job must not diff this in
    waited = moectl("wait", first["id"], "--json", "--timeout", f"{JOB_TIMEOUT_S}s")
    assert waited.exit_code == 0, waited.output
    [final] = json.loads(waited.output)
    failed = record(Path(first["exp_dir"]))
    assert (failed["status"], failed["exit_code"], failed["fallback_run"]) == ("failed", 3, final["id"])
    assert (final["tag"], final["status"], final["options"]["compile"]) == ("cfd_fallback_none", "completed", "none")
    assert final["job_id"] == failed["job_id"] and failed["id"] in final["notes"] and final["sweep"] is None
    assert {d.name for d in run_dirs(artifact_root)} == {failed["id"], final["id"]}
    # the re-run trains the failed run's code snapshot: its git.diff is the one made at submission
    failed_dir, final_dir = Path(failed["exp_dir"]), Path(final["exp_dir"])
    assert (final_dir / "git.diff").read_bytes() == (failed_dir / "git.diff").read_bytes()
    assert b"edited after the submission" not in (final_dir / "git.diff").read_bytes()
    assert (final["git"], final["guards"]) == (failed["git"], failed["guards"])
    assert "--compile none" in (final_dir / "command.txt").read_text()
    # each run has its report committed by the job, the re-run's last
    assert len(list((proj / "reports").glob("*.md"))) == 2
    said = moectl("wait", first["id"])  # settled now: the text names the re-run and whose it is
    assert said.exit_code == 0 and f"completed: {final['id']}" in said.output and f"compile fallback of {failed['id']}" in said.output
    assert "cfd_fallback_none" in git(proj, "log", "-1", "--format=%s")


def test_repeat_on_slurm_submits_the_group_side_by_side_and_follows_every_job(on_cluster, git_repo, monkeypatch,
                                                                               artifact_root):
    proj = slurm_project(git_repo, monkeypatch)
    r = moectl("run", "--slurm", "--repeat", "2", "--seed", "3", "--steps", "5", "--tag", "grp", *FAST)
    assert r.exit_code == 0, r.output
    runs = sorted((record(d) for d in run_dirs(artifact_root)), key=lambda rec: rec["repeat"])
    assert [(x["status"], x["options"]["seed"], x["backend"]) for x in runs] == [("completed", 3, "slurm"),
                                                                              ("completed", 4, "slurm")]
    assert runs[0]["group"] == runs[1]["group"] and runs[0]["job_id"] != runs[1]["job_id"]
    assert all(f"Slurm job {x['job_id']}" in r.output for x in runs) and f"repeat group {runs[0]['group']}" in r.output
    # each job committed its own report: both landed, nothing lost between two jobs' commits
    assert len({x["report"] for x in runs}) == 2
    for x in runs:
        assert f"reports/{Path(x['report']).name}" in commit_files(proj, x["commit"])
        assert git(proj, "merge-base", "--is-ancestor", x["commit"], "HEAD") == ""  # on the branch, not lost
    # The group is one entry for compare, and one target for wait (its id or its tag).
    entry = json.loads(moectl("compare", "grp", runs[0]["id"], "--json").output)["runs"][0]
    assert entry["n_repeats"] == 2 and entry["noise"] == "between-runs"
    # ... and the command ended with that entry's mean and between-runs error, as a local --repeat does
    tps = entry["metrics"]["tok_per_sec"]
    assert (f"group {runs[0]['group']}: mean of 2 tail means (± between-runs standard error): "
            f"tok/sec {tps['value']:,.2f} ±{tps['stderr']:,.2f}") in r.output
    waited = moectl("wait", runs[0]["group"], "--json")
    assert waited.exit_code == 0 and sorted(x["id"] for x in json.loads(waited.output)) == sorted(x["id"] for x in runs)
    assert len(json.loads(moectl("wait", "grp", "--json").output)) == 2


def test_a_repeat_group_whose_compile_fails_ends_with_each_jobs_re_run_in_a_group_of_their_own(
        on_cluster, git_repo, monkeypatch, artifact_root):
    slurm_project(git_repo, monkeypatch)
    r = moectl("run", "--slurm", "--repeat", "2", "--json", "--compile", "static", "--steps", "3", "--tag", "cfr",
               "--", "--compile-fails", "--sleep-per-step", "0.01")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    group = data["group"]
    assert [(x["tag"], x["status"], x["repeat"], x["group"], x["options"]["compile"]) for x in data["runs"]] == [
        ("cfr_fallback_none", "completed", 1, f"{group}_fallback_none", "none"),
        ("cfr_fallback_none", "completed", 2, f"{group}_fallback_none", "none")]
    failed = sorted((record(d) for d in run_dirs(artifact_root) if record(d)["tag"] == "cfr"), key=lambda x: x["repeat"])
    assert [(x["status"], x["exit_code"], x["group"]) for x in failed] == [("failed", 3, group), ("failed", 3, group)]
    assert [x["fallback_run"] for x in failed] == [x["id"] for x in data["runs"]]
    assert [x["options"]["seed"] for x in data["runs"]] == [x["options"]["seed"] for x in failed]
    assert data["summary"] is None  # the re-runs measure another configuration: no mean of the group


def start_now_once_requeued(job_id: str) -> None:
    """Slurm holds a requeued job back ~10 s (pending, Reason=BeginTime) before it may start again:
    its policy, not moectl's behaviour, and 20 s of this test. Once the job waits for that, let it
    start at once (`scontrol update StartTime=now`, as an admin may)."""
    def held_back():
        shown = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=60).stdout
        return "JobState=PENDING" in shown and "Reason=BeginTime" in shown

    wait_for(held_back, "the requeued job pending until its begin time", timeout=JOB_TIMEOUT_S, poll_s=0.1)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True, timeout=60,
                   capture_output=True)


def test_a_requeued_job_resumes_from_its_last_checkpoint_in_the_same_run_directory(on_cluster, git_repo, monkeypatch,
                                                                                   artifact_root):
    slurm_project(git_repo, monkeypatch, module="engine.train")
    r = moectl("run", "--slurm", "--detach", "--requeue", "--device", "cpu", "--steps", "100000", "--no-commit",
               "--", "--save-every", "5", "--eval-batches", "1")
    assert r.exit_code == 0, r.output
    run_dir = only_run(artifact_root)
    job_id = record(run_dir)["job_id"]
    assert "#SBATCH --requeue" in (run_dir / "job.sh").read_text()
    ckpts = run_dir / "ckpt_root"
    wait_for(lambda: any(ckpts.glob("model_*.pt")) and len(steps_written(run_dir / "metrics.jsonl")) >= 8,
             "a checkpoint and 8 steps before the requeue", timeout=JOB_TIMEOUT_S)

    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60, capture_output=True)
    start_now_once_requeued(job_id)

    wait_for(lambda: record(run_dir)["restarts"] == 1 and record(run_dir)["status"] == "running",
             "the requeued job running again (restarts 1)", timeout=JOB_TIMEOUT_S)
    assert record(run_dir)["job_id"] == job_id
    [at] = wait_for(lambda: resumes_logged(run_dir), "the engine's 'resumed at step' line", timeout=JOB_TIMEOUT_S)
    assert at >= 5 and at % 5 == 0
    wait_for(lambda: len(steps_written(run_dir / "metrics.jsonl")) >= at + 3, "3 steps trained after the resume", timeout=JOB_TIMEOUT_S)

    # What Slurm sends a little before the time limit (--signal=B:USR1@...): the job requeues itself.
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True, timeout=60, capture_output=True)
    start_now_once_requeued(job_id)
    wait_for(lambda: record(run_dir)["restarts"] == 2 and record(run_dir)["status"] == "running",
             "the job requeued by its own USR1 handler running again (restarts 2)", timeout=JOB_TIMEOUT_S)
    at = wait_for(lambda: resumes_logged(run_dir)[1:], "the second resume", timeout=JOB_TIMEOUT_S)[0]
    wait_for(lambda: len(steps_written(run_dir / "metrics.jsonl")) >= at + 3, "3 steps trained after the second resume", timeout=JOB_TIMEOUT_S)

    cancelled = moectl("cancel", record(run_dir)["id"])
    assert cancelled.exit_code == 0, cancelled.output
    rec = record(run_dir)
    steps = [s.step for s in steps_of(run_dir)]
    assert steps == list(range(len(steps))), "a step trained twice into metrics.jsonl, or one missing"
    assert rec["status"] == "interrupted" and rec["restarts"] == 2
    # The tail covers the final stretch: no step before the last resume (nor its warm-up) is in it.
    # How many steps that is depends on how far the job got before the cancel landed: with none
    # past the stretch's warm-up the window falls back to the run's last steps, marked not clean.
    metrics_cfg = load_config().metrics
    assert rec["summary"]["warmup_steps"] == at + metrics_cfg.warmup_steps
    clean = [s for s in steps if s >= at + metrics_cfg.warmup_steps]
    assert rec["summary"]["clean"] == bool(clean)
    assert rec["summary"]["steps"] == (len(clean[-metrics_cfg.window:]) if clean else min(metrics_cfg.window, len(steps)))


def test_ctrl_c_while_following_detaches_and_says_how_to_cancel(on_cluster, git_repo, monkeypatch, artifact_root):
    slurm_project(git_repo, monkeypatch)
    follower = subprocess.Popen([sys.executable, "-m", "moectl", "run", "--slurm", "--steps", "5000", "--no-commit",
                                 "--quiet", "--", "--sleep-per-step", "0.05"],
                                cwd=git_repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        run_dir = wait_for(lambda: next(iter(run_dirs(artifact_root)), None), "the run directory", timeout=JOB_TIMEOUT_S,
                           proc=follower)
        wait_for(lambda: record(run_dir)["status"] == "running", "the job running", timeout=JOB_TIMEOUT_S, proc=follower)
        follower.send_signal(signal.SIGINT)
        out, err = follower.communicate(timeout=60)
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait(timeout=30)
    rec = record(run_dir)
    assert follower.returncode == 130, err
    assert f"Slurm job {rec['job_id']} keeps running" in err and f"moectl cancel {rec['id']}" in err
    assert rec["status"] == "running"  # the job trains on: the follower only detached
    squeue = subprocess.run(["squeue", "-h", "-j", rec["job_id"], "-o", "%T"], capture_output=True, text=True, timeout=60)
    assert squeue.stdout.strip() == "RUNNING"
    cancelled = moectl("cancel", rec["id"])
    assert cancelled.exit_code == 0 and record(run_dir)["status"] == "interrupted", cancelled.output


def test_a_second_job_of_a_live_run_leaves_its_record_alone(on_cluster, git_repo, monkeypatch, artifact_root):
    # `sbatch <run>/job.sh` again while the run's own job trains: the stray job wrote `refused`
    # (exit 3) over the live run's record, for `runs` and the sweep to show until the run ended.
    slurm_project(git_repo, monkeypatch)
    r = moectl("run", "--slurm", "--detach", "--steps", "100000", "--no-commit", "--", "--sleep-per-step", "0.05")
    assert r.exit_code == 0, r.output
    run_dir = only_run(artifact_root)
    wait_for(lambda: record(run_dir)["status"] == "running", "the run's own job running", timeout=JOB_TIMEOUT_S)
    stray = subprocess.run(["sbatch", "--parsable", str(run_dir / "job.sh")], capture_output=True, text=True,
                           timeout=60, check=True).stdout.strip().split(";")[0]

    def stray_done():
        q = subprocess.run(["squeue", "-h", "-j", stray, "-o", "%T"], capture_output=True, text=True, timeout=60)
        return q.stdout.strip() == ""

    wait_for(stray_done, "the stray job's end", timeout=JOB_TIMEOUT_S)
    rec = record(run_dir)
    assert rec["status"] == "running" and rec["job_id"] != stray and rec["error"] is None, rec
    assert moectl("cancel", rec["id"]).exit_code == 0
    assert record(run_dir)["status"] == "interrupted"


def test_a_submission_its_guards_refuse_says_so_in_its_json_with_every_errors_keys(on_cluster, git_repo, monkeypatch,
                                                                                 artifact_root):
    # README: with --json, an error prints {"ok": false, "error": ..., "exit_code": ...}; the refusal
    # printed the guards alone, its reason only on stderr.
    slurm_project(git_repo, monkeypatch)
    git(git_repo, "switch", "-q", "-c", "elsewhere")
    r = moectl("run", "--slurm", "--json", "--steps", "2")
    assert r.exit_code == 3, r.output
    data = json.loads(r.stdout)
    assert data["ok"] is False and data["exit_code"] == 3
    assert data["error"] == "a guard refused the run; nothing was submitted"
    assert [g["name"] for g in data["guards"] if not g["ok"]] == ["git"]
    assert run_dirs(artifact_root) == []
