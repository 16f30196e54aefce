"""The Slurm path's pure parts and its refusals that need no cluster (issue 9): the sbatch script,
the multi-node torchrun argv, parsing scontrol/squeue output, the guard split, the code snapshot.
The cluster itself is exercised in tests/test_slurm_run.py and tests/test_slurm_sweep.py."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from moectl import gitops, slurm
from moectl.config import ClusterSection
from moectl.execution import deferred_to_job, gone_job_end
from moectl.records import GuardResult
from tests.conftest import git, gpu
from tests.test_run import run_dirs
from tests.test_slurm_run import FAST, moectl, slurm_project

SHOW_JOB = ("JobId=42 JobName=moectl:20260101_000000_moe-x UserId=root(0) JobState=RUNNING Reason=None "
            "Requeue=1 Restarts=2 BatchFlag=1 ExitCode=0:0 RunTime=00:01:05 TimeLimit=01:00:00 TimeMin=N/A "
            "NodeList=n[1-2] NumNodes=2 NumCPUs=2")


def test_batch_script_asks_slurm_for_exactly_the_cluster_table():
    cluster = ClusterSection(partition="gpu", account="team", time="01:00:00", gpus_per_node=8, cpus_per_task=16,
                             extra_sbatch=["--qos=high"])
    text = slurm.batch_script(run_id="r1", run_dir=Path("/art/r1"), code_dir=Path("/art/r1/code"), python="/v/bin/python",
                              cluster=cluster, nodes=2, requeue=True)
    sbatch = [line.removeprefix("#SBATCH ") for line in text.splitlines() if line.startswith("#SBATCH")]
    assert sbatch == ["--job-name=moectl:r1", "--nodes=2", "--ntasks-per-node=1", "--output=/art/r1/slurm-%j.out",
                      "--chdir=/art/r1/code", "--partition=gpu", "--account=team", "--time=01:00:00",
                      "--gpus-per-node=8", "--cpus-per-task=16", "--requeue", "--signal=B:USR1@120", "--qos=high"]
    assert text.splitlines()[-1] == "exec /v/bin/python -m moectl.job /art/r1"
    plain = slurm.batch_script(run_id="r1", run_dir=Path("/art/r1"), code_dir=Path("/art/r1/code"), python="py",
                               cluster=ClusterSection(), nodes=1, requeue=False)
    assert "#SBATCH --no-requeue" in plain and "--partition" not in plain


def test_the_requeue_signal_comes_at_most_a_quarter_of_the_time_limit_before_it():
    # A 2-minute margin on a limit of 2 minutes or less came as the job started: it requeued itself
    # for ever without training a step.
    def signal_of(**cluster):
        text = slurm.batch_script(run_id="r1", run_dir=Path("/art/r1"), code_dir=Path("/art/r1/code"), python="py",
                                  cluster=ClusterSection(**cluster), nodes=1, requeue=True)
        return next(line.removeprefix("#SBATCH ") for line in text.splitlines() if "--signal=" in line)

    assert signal_of(time="1") == "--signal=B:USR1@15"
    assert signal_of(time="2") == signal_of(time="01:30") == "--signal=B:USR1@30"  # Slurm keeps whole minutes
    assert signal_of(time="00:04:00") == "--signal=B:USR1@60"
    assert signal_of(time="02:00:00") == signal_of(time="1-00") == signal_of() == "--signal=B:USR1@120"
    assert signal_of(time="02:00:00", extra_sbatch=["--time=1"]) == "--signal=B:USR1@15"  # its line comes later
    assert signal_of(extra_sbatch=["-t 2"]) == "--signal=B:USR1@30"
    assert signal_of(time="0") == "--signal=B:USR1@120"  # no limit: the margin as ever
    assert [slurm.parse_time_limit_s(t) for t in ("5", "5:30", "1:00:00", "2-3", "2-3:04", "2-3:04:05", "UNLIMITED")] == [
        300, 360, 3600, 183600, 183840, 183900, None]


def test_multinode_argv_replaces_standalone_with_a_c10d_rendezvous_at_the_first_node():
    argv = ["py", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "8", "-m", "engine.train", "--steps", "3"]
    out = slurm.multinode_argv(argv, nnodes=2, head="10.0.0.7", port=29500, job_id="42")
    assert out[:4] == ["srun", "--ntasks-per-node=1", "--nodes=2", "--kill-on-bad-exit=1"]
    assert out[4:] == ["py", "-m", "torch.distributed.run", "--nnodes", "2", "--rdzv-backend", "c10d",
                       "--rdzv-endpoint", "10.0.0.7:29500", "--rdzv-id", "42", "--nproc-per-node", "8",
                       "-m", "engine.train", "--steps", "3"]


def test_each_job_meets_at_a_rendezvous_port_of_its_own_from_the_base_and_its_job_id():
    # Two multi-node jobs whose first node is one machine (a --repeat group, sweep legs) must not
    # share a c10d store: the second would join the first's and fail when the first ends.
    assert slurm.rendezvous_port(29500, "4") == 29504 and slurm.rendezvous_port(29500, "5") == 29505
    assert slurm.rendezvous_port(29500, "1999") == 30499 and slurm.rendezvous_port(29500, "2000") == 29500
    ports = {slurm.rendezvous_port(29500, str(job)) for job in range(123456, 123456 + slurm.RDZV_PORT_SPAN)}
    assert len(ports) == slurm.RDZV_PORT_SPAN and min(ports) == 29500 and max(ports) == 29500 + 999
    # the largest base the config allows keeps the whole span within the ports there are
    top = ClusterSection(rdzv_port=65535 - 999).rdzv_port
    assert slurm.rendezvous_port(top, "999") == 65535
    assert slurm.rendezvous_port(29500, "77_3") == 29577  # an array task: its job id


def test_only_the_pending_reasons_that_mean_never_make_a_job_unstartable():
    pending = slurm.parse_show_job(SHOW_JOB.replace("JobState=RUNNING Reason=None", "JobState=PENDING Reason=PartitionNodeLimit"))
    assert slurm.never_starts(pending) == "PartitionNodeLimit (more nodes than the partition allows)"
    for later in ("Resources", "Priority", "Dependency", "JobHeldUser", "None"):
        assert slurm.never_starts(slurm.parse_show_job(SHOW_JOB.replace(
            "JobState=RUNNING Reason=None", f"JobState=PENDING Reason={later}"))) is None, later
    assert slurm.never_starts(slurm.parse_show_job(SHOW_JOB.replace("Reason=None", "Reason=BadConstraints"))) is None  # running


def test_scontrol_and_squeue_output_parse_into_what_moectl_needs():
    info = slurm.parse_show_job(SHOW_JOB)
    assert (info.job_id, info.state, info.restarts, info.num_nodes, info.nodes, info.live, info.time_limit) == \
        ("42", "RUNNING", 2, 2, "n[1-2]", True, "01:00:00")
    assert not slurm.parse_show_job(SHOW_JOB.replace("RUNNING", "COMPLETED")).live
    assert slurm.parse_show_job("") is None
    jobs = slurm.parse_squeue("7|moectl:20260101_000000_moe-a|PENDING|1|0:00|(Dependency)\n8|other|RUNNING|1|1:00|n1\n"
                              "9|moectl:20260101_000001_moe-b|PENDING|1|0:00|(None)\n10|moectl:20260101_000002_moe-c|RUNNING|2|0:05|n[1-2]\n")
    assert [j.to_dict() for j in jobs] == [{"job_id": "7", "run_id": "20260101_000000_moe-a", "state": "PENDING",
                                            "nodes": 1, "elapsed": "0:00", "where": "pending: Dependency"},
                                           {"job_id": "9", "run_id": "20260101_000001_moe-b", "state": "PENDING",
                                            "nodes": 1, "elapsed": "0:00", "where": ""},
                                           {"job_id": "10", "run_id": "20260101_000002_moe-c", "state": "RUNNING",
                                            "nodes": 2, "elapsed": "0:05", "where": "n[1-2]"}]


def test_a_job_gone_before_moectl_started_in_it_failed_to_start_unless_slurm_says_it_was_cancelled():
    # scancel of a pending job (or `moectl cancel SWEEP`, whose report job settles the pending legs
    # first) is a cancelled run: `interrupted`, as README says of every cancelled run, not `failed`.
    cancelled = slurm.parse_show_job(SHOW_JOB.replace("JobState=RUNNING", "JobState=CANCELLED"))
    broken = slurm.parse_show_job(SHOW_JOB.replace("JobState=RUNNING", "JobState=FAILED").replace("ExitCode=0:0", "ExitCode=1:0"))
    assert gone_job_end("queued", "42", cancelled) == (
        "interrupted", "Slurm job 42 was cancelled (CANCELLED, exit 0:0) before moectl started in it")
    assert gone_job_end("queued", "42", broken) == ("failed", "Slurm job 42 ended (FAILED, exit 1:0) before moectl started in it")
    # forgotten by the controller (past MinJobAge) and no accounting: what is not known is said
    assert gone_job_end("queued", "42", None) == ("failed", "Slurm job 42 ended before moectl started in it, and "
                                                  "Slurm no longer knows how (cancelled, or failed to start; it keeps "
                                                  "a finished job MinJobAge seconds)")
    assert gone_job_end("running", "42", cancelled) == (
        "interrupted", "Slurm job 42 ended (CANCELLED, exit 0:0) without moectl recording its end")
    assert gone_job_end("running", "42", None)[0] == "interrupted"


def test_allocated_gpus_come_from_slurms_environment():
    assert slurm.allocated_gpus({"SLURM_JOB_GPUS": "2,3"}) == [2, 3]
    assert slurm.allocated_gpus({"SLURM_STEP_GPUS": "1", "SLURM_JOB_GPUS": "0,1"}) == [1]
    assert slurm.allocated_gpus({}) is None


def test_the_node_guards_are_deferred_to_the_job_and_the_others_stand():
    results = [GuardResult(name="git", ok=False, message="wrong branch"),
               GuardResult(name="gpus_idle", ok=False, message="GPU 0 busy", overridable=True),
               GuardResult(name="no_other_training", ok=False, message="pid 1", overridable=True)]
    out = deferred_to_job(results)
    assert [(r.name, r.ok, r.skipped) for r in out] == [("git", False, False), ("gpus_idle", True, True),
                                                        ("no_other_training", True, True)]


def test_the_code_snapshot_is_head_plus_every_uncommitted_change(git_repo, tmp_path):
    (git_repo / "README.md").write_text("changed, unstaged\n")
    (git_repo / "staged.py").write_text("x = 1\n")
    git(git_repo, "add", "staged.py")
    (git_repo / "new.py").write_text("y = 2\n")
    diff = tmp_path / "git.diff"
    diff.write_bytes(gitops.git_diff(git_repo))
    gitops.snapshot_code(git_repo, git(git_repo, "rev-parse", "HEAD").strip(), diff, tmp_path / "code")
    got = {p.name: p.read_text() for p in (tmp_path / "code").iterdir()}
    assert got == {"README.md": "changed, unstaged\n", "staged.py": "x = 1\n", "new.py": "y = 2\n"}
    assert git(git_repo, "status", "--porcelain").splitlines() == [" M README.md", "A  staged.py", "?? new.py"]


def test_a_diff_of_moectls_notes_alone_makes_a_snapshot_of_head(git_repo, tmp_path):
    """A clean tree whose git.diff holds only moectl's note lines (a big untracked file left out, a
    trainer script outside git): `git apply` said "No valid patches" and every submission failed."""
    head = git(git_repo, "rev-parse", "HEAD").strip()
    diff = tmp_path / "git.diff"
    diff.write_bytes(b"# moectl: the trainer script /x/train.py is outside the repository, so no diff holds it: "
                     b"its copy is trainer_script/train.py\n")
    gitops.snapshot_code(git_repo, head, diff, tmp_path / "code")
    assert {p.name for p in (tmp_path / "code").iterdir()} == set(git(git_repo, "ls-files").split())


def test_a_git_ignored_trainer_script_is_put_into_the_jobs_code_snapshot(git_repo, tmp_path, monkeypatch):
    """The job runs from its snapshot (HEAD plus git.diff): a git-ignored script is in neither, so
    the job found no trainer. It is copied to its place in the snapshot."""
    from moectl.config import load_config
    from moectl.execution import _ignored_script_into

    (git_repo / ".gitignore").write_text("scratch/\n")
    (git_repo / "scratch").mkdir()
    (git_repo / "scratch" / "train.py").write_text("print('hi')\n")
    (git_repo / ".moectl.toml").write_text('[project]\nvenv = ""\n[launch]\nscript = "scratch/train.py"\nlauncher = "python"\n'
                                          '[launch.options]\n[metrics]\nsource = "stdout"\nformat = "nanochat"\n')
    git(git_repo, "add", ".gitignore", ".moectl.toml")
    git(git_repo, "commit", "-qm", "config")
    monkeypatch.chdir(git_repo)
    diff = tmp_path / "git.diff"
    diff.write_bytes(gitops.git_diff(git_repo))
    gitops.snapshot_code(git_repo, git(git_repo, "rev-parse", "HEAD").strip(), diff, tmp_path / "code")
    assert not (tmp_path / "code" / "scratch").exists()
    _ignored_script_into(load_config(), tmp_path / "code")
    assert (tmp_path / "code" / "scratch" / "train.py").read_text() == "print('hi')\n"


def test_nodes_without_slurm_is_a_usage_error(git_repo, monkeypatch, artifact_root):
    slurm_project(git_repo, monkeypatch)
    r = moectl("run", "--nodes", "2", *FAST)
    assert r.exit_code == 2 and "--nodes needs --slurm" in r.output
    assert run_dirs(artifact_root) == []


def test_slurm_without_sbatch_on_path_is_one_line_and_exit_2(git_repo, monkeypatch, artifact_root, tmp_path):
    slurm_project(git_repo, monkeypatch)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "git").symlink_to(shutil.which("git"))
    monkeypatch.setenv("PATH", str(bin_dir))
    r = moectl("run", "--slurm", *FAST)
    assert r.exit_code == 2 and "no sbatch on PATH" in r.output and len(r.output.strip().splitlines()) == 1
    assert run_dirs(artifact_root) == []



def test_check_with_the_slurm_backend_leaves_the_node_guards_to_the_job(git_repo, monkeypatch, fake_nvml, fake_training,
                                                                         slurm_answers):
    # No GPU idle here and another training running: the submitting machine's business is neither.
    slurm_project(git_repo, monkeypatch, cluster='backend = "slurm"')
    fake_nvml(gpus=[gpu(0, util_pct=99)])
    r = moectl("check", "--device", "cuda", "--json")
    assert r.exit_code == 0, r.output
    guards = {g["name"]: g for g in json.loads(r.output)["guards"]}
    assert guards["gpus_idle"]["skipped"] and guards["no_other_training"]["skipped"]
    assert "inside the Slurm job" in guards["gpus_idle"]["message"]


def test_a_controller_that_does_not_answer_refuses_check_dry_run_and_run_with_nothing_written(
        git_repo, monkeypatch, artifact_root, slurm_answers):
    # slurmctld down: `scontrol ping` says so (exit 1, under its banner). check --slurm passed here,
    # and run --slurm wrote a run directory before sbatch failed.
    (slurm_answers / "scontrol").write_text(
        '#!/bin/sh\nif [ "$1" = ping ]; then echo "Slurmctld(primary) at head1 is DOWN"; '
        'echo "*****************************************"; exit 1; fi\nexit 0\n')
    slurm_project(git_repo, monkeypatch, cluster='backend = "slurm"')
    for args in (["check"], ["check", "--json"], ["run", "--dry-run"], ["run", "--steps", "2"], ["run", "--slurm", "--detach"]):
        r = moectl(*args)
        assert r.exit_code == 2, (args, r.output)
        assert "--slurm: Slurm's controller does not answer: Slurmctld(primary) at head1 is DOWN (is slurmctld up" in r.output
        assert "*****" not in r.output
    assert run_dirs(artifact_root) == []


def test_wait_on_a_finished_local_run_exits_with_its_outcome(git_repo, monkeypatch, artifact_root):
    slurm_project(git_repo, monkeypatch)
    ran = moectl("run", "--steps", "3", "--no-commit", "--override", "no_other_training", *FAST)
    assert ran.exit_code == 0, ran.output
    (run_dir,) = run_dirs(artifact_root)
    waited = moectl("wait", run_dir.name, "--json")
    assert waited.exit_code == 0 and json.loads(waited.output)[0]["status"] == "completed"
    failing = moectl("run", "--steps", "5", "--no-commit", "--tag", "bad", "--override", "no_other_training",
                     "--", "--fail-at-step", "2")
    assert failing.exit_code == 4, failing.output
    assert moectl("wait", "bad", run_dir.name).exit_code == 4
    # an imported run is settled and measured: waiting on it (and a finished run) is 0, not "training failed"
    log = git_repo.parent / "old.log"
    log.write_text("".join(f"step {i:05d}/00003 (0.00%) | loss: 2.0 | dt: 10.00ms | tok/sec: 1,000\n" for i in range(3)))
    assert moectl("import", str(log), "--name", "old").exit_code == 0
    waited = moectl("wait", "old", run_dir.name, "--json")
    assert waited.exit_code == 0 and [x["status"] for x in json.loads(waited.output)] == ["imported", "completed"]
    # bad arguments: one line naming what is wrong, exit 2
    bad_timeout = moectl("wait", run_dir.name, "--timeout", "soon")
    assert bad_timeout.exit_code == 2 and "--timeout: cannot read duration 'soon'" in bad_timeout.output
    unknown = moectl("wait", "no-such-run")
    assert unknown.exit_code == 2 and "no run matches 'no-such-run'" in unknown.output
    # Reading the store needs no config file (as show and export): from outside the repository too
    monkeypatch.chdir(git_repo.parent)
    waited = moectl("wait", run_dir.name, "--json")
    assert waited.exit_code == 0 and json.loads(waited.output)[0]["status"] == "completed", waited.output
    assert moectl("cancel", run_dir.name, "--json").output.strip() == "[]"  # a finished local run: nothing to cancel


def test_repeat_with_slurm_dry_run_shows_the_first_repeats_job_and_submits_nothing(git_repo, monkeypatch, artifact_root,
                                                                                   slurm_answers):
    slurm_project(git_repo, monkeypatch)
    r = moectl("run", "--slurm", "--repeat", "2", "--seed", "4", "--dry-run", "--json", *FAST)
    assert r.exit_code == 0, r.output
    argv = json.loads(r.output)["argv"]
    assert argv[argv.index("--seed") + 1] == "4"
    assert run_dirs(artifact_root) == []


def test_a_sweep_dry_run_refuses_the_max_parallel_and_detach_the_sweep_itself_refuses(git_repo, monkeypatch,
                                                                                      artifact_root, tmp_path):
    slurm_project(git_repo, monkeypatch)
    spec = tmp_path / "duo.toml"
    spec.write_text('name = "duo"\n[[legs]]\ntag = "x"\n[[legs]]\ntag = "y"\n')
    refused = {("--slurm", "--max-parallel", "0"): "--max-parallel: must be at least 1 (got 0)",
               ("--slurm", "--max-parallel", "-1"): "--max-parallel: must be at least 1 (got -1)",
               ("--max-parallel", "2"): "--max-parallel needs --slurm",
               ("--detach",): "--detach needs --slurm"}
    for args, said in refused.items():
        for dry in ((), ("--dry-run",)):
            r = moectl("sweep", str(spec), *args, *dry)
            assert r.exit_code == 2 and said in r.output, (args, dry, r.output)
    assert not artifact_root.exists()
    r = moectl("sweep", str(spec), "--slurm", "--max-parallel", "5", "--dry-run")
    assert r.exit_code == 0 and "sweep duo: 2 leg(s) to run" in r.output, r.output


def test_cancel_follows_a_run_to_its_compile_fallback_and_a_requeued_run_is_said_to_have_started(
        project, artifact_root, slurm_answers, tmp_path):
    # `moectl cancel RUN` (what --detach prints) said "nothing to cancel" once the job had gone on
    # to the run's --compile none re-run; a run queued again after a requeue was "cancelled before
    # it started" with its trained steps left unsummarised.
    from engine.schema import StepMetrics, to_line
    from moectl.records import GitInfo, RunRecord
    from moectl.store import save_run

    def run(rid, status, job, **kw):
        d = artifact_root / rid
        d.mkdir(parents=True)
        (d / "metrics.jsonl").write_text("".join(to_line(StepMetrics(step=i, loss=2.0, dt_ms=10.0, tok_per_sec=100.0))
                                                 + "\n" for i in range(5)))
        save_run(RunRecord(id=rid, tag=rid.rsplit("-", 1)[1], status=status, created_at="2026-01-02T10:00:00+00:00",
                           backend="slurm", job_id=job, git=GitInfo(branch="main"), exp_dir=str(d), **kw))
        return d

    run("20260102_100000_moe-cf", "failed", "101", exit_code=3, fallback_run="20260102_100010_moe-cfnone")
    fallback = run("20260102_100010_moe-cfnone", "running", "101")
    requeued = run("20260102_100000_moe-rq", "queued", "102", restarts=1)
    r = moectl("cancel", "20260102_100000_moe-cf", "20260102_100000_moe-rq", "--json")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "scancel.log").read_text().split() == ["101", "102"]
    ended = {x["id"]: x for x in json.loads(r.stdout)}
    assert ended.keys() == {fallback.name, requeued.name}
    assert ended[fallback.name]["status"] == "interrupted" and ended[fallback.name]["error"] == "cancelled (scancel 101)"
    assert ended[requeued.name]["error"] == "cancelled (scancel 102)"  # not "before it started": it had trained
    assert ended[requeued.name]["summary"]["steps"] == 5


def test_a_requeued_job_says_whether_its_restart_resumes_or_starts_over():
    # It said "resumes from its last checkpoint" when none had been saved, and trained from step 0.
    from moectl.job import requeue_note

    assert requeue_note("SIGTERM", 1, True) == "requeued by Slurm after SIGTERM (restart 1 resumes from its last checkpoint)"
    assert requeue_note("SIGUSR1", 2, False) == ("requeued by Slurm after SIGUSR1 (restart 2 starts again from step 0: "
                                                 "no checkpoint was saved (-- --save-every N saves them))")


def test_a_job_the_controller_forgot_is_settled_by_what_the_accounting_says(tmp_path, monkeypatch):
    # scancel of a pending job, read more than MinJobAge later: the controller knows nothing of it and
    # the run was settled `failed` (exit 4) for good; sacct still says CANCELLED on a cluster with accounting.
    from moectl.execution import _job_info_or_none

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/sh\necho "slurm_load_jobs error: Invalid job id specified" >&2\nexit 1\n')
    (bin_dir / "sacct").write_text('#!/bin/sh\necho "77|CANCELLED by 0|0:0"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    info = _job_info_or_none("77")
    assert (info.state, info.exit_code) == ("CANCELLED", "0:0")
    assert gone_job_end("queued", "77", info) == (
        "interrupted", "Slurm job 77 was cancelled (CANCELLED, exit 0:0) before moectl started in it")
    (bin_dir / "sacct").write_text('#!/bin/sh\necho "sacct: error: Slurm accounting storage is disabled" >&2\nexit 1\n')
    assert _job_info_or_none("77") is None
