"""The eight guards as pure functions: hand-built Observed values in, verdicts out (no mocks)."""
from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from pathlib import Path

import pytest

from moectl.config import MoectlFile, from_file_model
from moectl.guards import GUARDS, evaluate, passed, refusals, summary_line
from moectl.plan import RunRequest, plan_run
from moectl.probes import DiskState, GitState, GpuInfo, GpuProcess, NvmlReading, Observed, PathsState, TrainingProcess, VenvState

NOW = datetime(2025, 1, 2, 3, 4, 5)
ROOT = Path("/repo")
ART = "/art"


def cfg(**sections):
    file = MoectlFile.model_validate(sections)
    c = from_file_model(file, ROOT / ".moectl.toml", ROOT)
    c.artifact_root = Path(ART)  # pure tests: fixed paths, independent of the env override
    return c


def plan_for(c, **req):
    gpus = req.pop("gpus_available", None)
    return plan_run(c, RunRequest(**req), NOW, gpus)


def good(plan, **changes) -> Observed:
    """An observed world in which every guard passes; `changes` replace parts of it."""
    base = dict(
        git=GitState(is_repo=True, branch="main", head="a" * 40, modified=1, staged=2, untracked=3),
        nvml=NvmlReading(gpus=[GpuInfo(index=0, name="H100", util_pct=0, mem_used_mib=0, mem_total_mib=81559)]),
        processes=[],
        lock=None,
        venv=VenvState(python="/repo/.venv/bin/python", exists=True, in_venv=True, has_torch=True),
        disk=DiskState(path=ART, free_gib=100.0),
        paths=PathsState(artifact_root=ART, report_dir="/repo/reports",
                         writes={p: p for p in [plan.exp_dir, plan.ckpt_dir, *plan.files.values()]}),
    )
    base.update(changes)
    return Observed(**base)


def verdict(results, name):
    return next(r for r in results if r.name == name)


def test_all_pass_in_a_good_world_in_spec_order():
    c = cfg()
    p = plan_for(c, device="cuda", gpus_available=1)
    results = evaluate(c, p, good(p))
    assert [r.name for r in results] == ["config", "git", "venv", "paths", "fresh_dir", "gpus_idle", "no_other_training", "disk"]
    assert passed(results) and all(r.ok and not r.skipped for r in results)
    assert "1 modified, 2 staged, 3 untracked" in verdict(results, "git").message
    assert len(GUARDS) == 8


# (guard, config sections, request, observed changes, expected fragment of the message)
REFUSALS = [
    ("config", {}, {}, "no-file", "moectl init"),
    ("git", {}, {}, {"git": GitState(is_repo=False, error="/repo is not inside a git repository")}, "not inside a git"),
    ("git", {}, {}, {"git": GitState(is_repo=True, branch="feature", head="b" * 40)}, "expected 'main'"),
    ("git", {}, {}, {"git": GitState(is_repo=True, detached=True, head="c" * 40)}, "detached"),
    ("git", {}, {}, {"git": GitState(is_repo=True, branch="main", head="d" * 40, in_progress="rebase")}, "rebase is in progress"),
    ("git", {}, {}, {"git": GitState(is_repo=False, error="git cannot read the repository at /repo: fatal: detected "
                                     "dubious ownership")}, "dubious ownership"),
    # an index.lock older than a git command lasts: the report commit after the run would fail on it
    ("git", {}, {}, {"git": GitState(is_repo=True, branch="main", head="d" * 40, index_lock_age_s=600.0,
                                     index_lock=("other", "/repo/.git/index.lock exists: another git process"))},
     "/repo/.git/index.lock exists: another git process; it has been there 10 min, and the report commit"),
    ("venv", {}, {}, {"venv": VenvState(python="/x/bin/python", exists=False, in_venv=True)}, "not found"),
    ("venv", {}, {}, {"venv": VenvState(python="/usr/bin/python3", exists=True, in_venv=False, has_torch=True)}, "not inside a virtual environment"),
    ("venv", {}, {}, {"venv": VenvState(python="/x/bin/python", exists=True, in_venv=True, has_torch=False)}, "torch is not installed"),
    ("fresh_dir", {}, {}, "exists", "already exists"),
    ("gpus_idle", {}, {"device": "cuda"}, {"nvml": NvmlReading(error="NVML Shared Library Not Found")}, "NVML unavailable (NVML Shared Library Not Found)"),
    ("gpus_idle", {}, {"device": "cuda"}, {"nvml": NvmlReading(gpus=[])}, "no GPUs visible"),
    ("gpus_idle", {}, {"device": "cuda"}, {"nvml": NvmlReading(gpus=[GpuInfo(index=0, util_pct=87, mem_used_mib=0)])}, "GPU 0: util 87% > 5%"),
    ("gpus_idle", {}, {"device": "cuda"}, {"nvml": NvmlReading(gpus=[GpuInfo(index=0, util_pct=0, mem_used_mib=40000)])}, "GPU 0: 40000 MiB used > 1024 MiB"),
    ("gpus_idle", {}, {"device": "cuda"},
     {"nvml": NvmlReading(gpus=[GpuInfo(index=0, util_pct=0, mem_used_mib=0, processes=[GpuProcess(pid=42, name="python", used_mib=10)])])},
     "GPU 0: 1 compute process(es): pid 42 python"),
    ("gpus_idle", {}, {"device": "cuda"}, {"nvml": NvmlReading(gpus=[GpuInfo(index=0, error="Unknown Error")])}, "GPU 0: NVML error: Unknown Error"),
    ("gpus_idle", {"gpu": {"devices": [0, 3]}}, {"device": "cuda"}, {}, "GPU(s) [3] from gpu.devices not found"),
    # every selected GPU missing (a typo'd index): named, not "no GPUs visible"
    ("gpus_idle", {"gpu": {"devices": [5]}}, {"device": "cuda"}, {"nvml": NvmlReading(gpus=[])},
     "GPU(s) [5] from gpu.devices not found by NVML; fix gpu.devices or use --device cpu"),
    ("no_other_training", {}, {}, {"processes": [TrainingProcess(pid=77, age_s=120, cmdline="torchrun ...", run_dir="/art/x")]}, "pid 77 (2.0 min old, run dir /art/x)"),
    ("no_other_training", {}, {}, {"processes": [  # one run's torchrun and workers: one entry
        TrainingProcess(pid=77, age_s=120, cmdline="torchrun ...", run_dir="/art/x"),
        TrainingProcess(pid=78, age_s=110, cmdline="python -m engine.train", run_dir="/art/x"),
        TrainingProcess(pid=90, age_s=30, cmdline="torchrun ...")]},
     "training already running: pids 77, 78 (2.0 min old, run dir /art/x); pid 90 (0.5 min old): torchrun ... — wait"),
    ("no_other_training", {}, {}, {"lock": {"pid": 99, "host": "h", "run_id": "r1", "stale": False}}, "moectl pid 99 on h holds the run lock for r1"),
    ("disk", {"paths": {"min_free_gib": 5}}, {}, {"disk": DiskState(path=ART, free_gib=0.5)}, "0.50 GiB free under /art < 5 GiB"),
    ("disk", {}, {}, {"disk": DiskState(path=ART, error="permission denied")}, "permission denied"),
]


@pytest.mark.parametrize("name, sections, req, changes, fragment", REFUSALS)
def test_each_guard_refuses_with_an_actionable_message(name, sections, req, changes, fragment):
    c = cfg(**sections)
    p = plan_for(c, **req)
    if changes == "no-file":
        c.path, changes = None, {}
    elif changes == "exists":
        changes = {"paths": replace(good(p).paths, exp_dir_exists=True)}
    results = evaluate(c, p, good(p, **changes))
    r = verdict(results, name)
    assert not r.ok and fragment in r.message, r.message
    # Every other guard still ran and passed: all problems are reported, not just the first.
    assert [x.name for x in results if not x.ok] == [name]
    assert not passed(results) and refusals(results)[0].startswith(f"{name}: ")


@pytest.mark.parametrize("holder, age, no_commit", [
    ("other", 1.0, False),  # a git command at work this moment: gone before the run ends
    ("other", 600.0, True),  # --no-commit: the run never takes the lock
    ("dead-moectl", 600.0, False),  # a killed moectl's: the run recovers it before it starts
])
def test_an_index_lock_that_cannot_hurt_the_run_passes(holder, age, no_commit):
    c = cfg()
    p = plan_for(c, no_commit=no_commit)
    lock = GitState(is_repo=True, branch="main", head="a" * 40, index_lock=(holder, "..."), index_lock_age_s=age)
    assert verdict(evaluate(c, p, good(p, git=lock)), "git").ok


def test_branch_star_disables_the_branch_check():
    c = cfg(project={"branch": "*"})
    p = plan_for(c)
    assert verdict(evaluate(c, p, good(p, git=GitState(is_repo=True, branch="anything", head="e" * 40))), "git").ok


def test_cpu_run_skips_the_gpu_guard_and_says_so():
    c = cfg()
    p = plan_for(c, device="cpu")
    r = verdict(evaluate(c, p, good(p, nvml=NvmlReading(error="NVML Shared Library Not Found"))), "gpus_idle")
    assert r.ok and r.skipped and "cpu run" in r.message


BUSY_GPU = NvmlReading(gpus=[GpuInfo(index=0, name="H100", util_pct=93, mem_used_mib=0, mem_total_mib=81559)])
TRAINING = [TrainingProcess(pid=77, age_s=120, cmdline="torchrun ...")]


@pytest.mark.parametrize("device, overrides, world, line", [
    ("cuda", [], {}, "guards: 8 passed"),
    ("cpu", [], {"nvml": NvmlReading(error="NVML Shared Library Not Found")},
     "guards: 7 passed, gpus_idle skipped (cpu run: GPU idleness not checked)"),
    ("cuda", ["gpus_idle"], {"nvml": BUSY_GPU}, "guards: 7 passed, gpus_idle overridden"),
    ("cpu", ["no_other_training"], {"processes": TRAINING},
     "guards: 6 passed, gpus_idle skipped (cpu run: GPU idleness not checked), no_other_training overridden"),
    # --override of a guard that passes anyway overrides nothing, and the line does not claim it
    ("cuda", ["gpus_idle", "no_other_training"], {"processes": TRAINING},
     "guards: 7 passed, no_other_training overridden"),
    ("cuda", [], {"nvml": BUSY_GPU, "git": GitState(is_repo=True, branch="feature", head="b" * 40)},
     "guards: 6 passed, git FAILED, gpus_idle FAILED"),
])
def test_summary_line_names_what_was_skipped_why_and_what_was_overridden(device, overrides, world, line):
    c = cfg()
    p = plan_for(c, device=device, gpus_available=1, overrides=overrides)
    assert summary_line(evaluate(c, p, good(p, **world), overrides)) == line


def test_gpu_limits_come_from_config_and_processes_can_be_allowed():
    c = cfg(gpu={"max_util_pct": 50, "max_mem_mib": 50000, "require_no_processes": False})
    p = plan_for(c, device="cuda", gpus_available=1)
    busyish = NvmlReading(gpus=[GpuInfo(index=0, util_pct=40, mem_used_mib=40000, processes=[GpuProcess(pid=1)])])
    assert verdict(evaluate(c, p, good(p, nvml=busyish)), "gpus_idle").ok


def test_stale_lock_does_not_block():
    c = cfg()
    p = plan_for(c)
    r = verdict(evaluate(c, p, good(p, lock={"pid": 5, "host": "h", "run_id": "old", "stale": True})), "no_other_training")
    assert r.ok and "stale lock of pid 5 will be taken over" in r.message


@pytest.mark.parametrize(
    "writes, read_only, fragment",
    [
        ({"/art/x/../../etc/run.json": "/etc/run.json"}, [], "/art/x/../../etc/run.json (resolves to /etc/run.json) is outside artifact_root /art"),
        ({"/art/link/run.json": "/elsewhere/run.json"}, [], "resolves to /elsewhere/run.json"),
        ({"/art/keep/run.json": "/art/keep/run.json"}, ["/art/keep"], "inside read-only tree /art/keep"),
        # a name this locale could not decode (C locale, PYTHONUTF8=0): its records would hold lone
        # surrogates that every later read calls corrupt (the run failed after writing one)
        ({"/art/pr \udcc3\udcb8j/run.json": "/art/pr \udcc3\udcb8j/run.json"}, [],
         "holds bytes this locale (utf-8) cannot decode; run moectl under a UTF-8 locale"),
    ],
)
def test_paths_guard_refuses_and_is_never_overridable(writes, read_only, fragment):
    c = cfg()
    p = plan_for(c, device="cpu")
    paths = PathsState(artifact_root=ART, report_dir="/repo/reports", read_only=read_only, writes=writes)
    results = evaluate(c, p, good(p, paths=paths), overrides=["paths"])
    r = verdict(results, "paths")
    assert not r.ok and fragment in r.message and not r.overridable and not r.overridden
    assert not passed(results)


def planned_paths(**fields):
    """A default config, its plan, and the paths probe's reading of it: every planned write where it
    is planned (inside ART), report_dir inside /repo; `fields` change the reading."""
    c = cfg()
    p = plan_for(c)
    w = {x: x for x in [p.exp_dir, *p.files.values()]}
    return c, p, PathsState(**{"artifact_root": ART, "report_dir": "/repo/reports", "writes": w, **fields})


def paths_verdict(c, p, paths: PathsState):
    return verdict(evaluate(c, p, good(p, paths=paths)), "paths")


def test_artifact_root_inside_a_read_only_tree_is_allowed():
    c, p, ok = planned_paths(read_only=["/"])
    assert paths_verdict(c, p, replace(ok, read_only=["/art"])).ok
    # ...but the report dir may not sit in a read-only tree, nor outside the repo.
    bad = replace(ok, read_only=["/repo"])
    assert "report_dir /repo/reports is inside read-only tree /repo" in paths_verdict(c, p, bad).message
    out = replace(ok, report_dir="/tmp/reports")
    assert "outside the repository" in paths_verdict(c, p, out).message


def test_an_artifact_root_that_git_status_would_show_is_refused():
    c, p, ok = planned_paths()
    assert paths_verdict(c, p, ok).ok
    r = paths_verdict(c, p, replace(ok, root_in_work_tree=True))
    assert not r.ok and f"artifact_root {ART} is inside the repository and not git-ignored" in r.message
    assert "--exp-dir" not in r.message  # advice that fits: no run directory is misplaced here


def test_a_report_dir_inside_the_git_directory_is_refused():
    # report_dir = ".git": inside the repository, yet git commits nothing there; found after training.
    c, p, ok = planned_paths(git_dir="/repo/.git")
    assert paths_verdict(c, p, ok).ok
    for inside in ("/repo/.git", "/repo/.git/reports"):
        r = paths_verdict(c, p, replace(ok, report_dir=inside))
        assert not r.ok and f"report_dir {inside} is inside the git directory /repo/.git" in r.message


def test_a_report_dir_inside_a_submodule_is_refused():
    # Its files are the submodule's: `git update-index` in the outer repository fails after training.
    c, p, ok = planned_paths(report_dir="/repo/subm/reports", git_dir="/repo/.git")
    assert paths_verdict(c, p, ok).ok
    r = paths_verdict(c, p, replace(ok, report_dir_repo="/repo/subm"))
    assert not r.ok and "report_dir /repo/subm/reports is inside /repo/subm, a repository of its own" in r.message


def test_the_paths_probe_finds_a_repository_nested_in_the_project(tmp_path):
    from moectl.probes import nested_work_tree

    repo = tmp_path / "repo"
    (repo / "subm" / "deep").mkdir(parents=True)
    (repo / ".git").mkdir()
    assert nested_work_tree(repo / "subm" / "deep" / "reports", repo) is None  # no .git below the root
    assert nested_work_tree(repo, repo) is None and nested_work_tree(tmp_path / "elsewhere", repo) is None
    (repo / "subm" / ".git").write_text("gitdir: ../.git/modules/subm\n")  # a submodule's .git is a file
    assert nested_work_tree(repo / "subm" / "deep" / "reports", repo) == str(repo / "subm")
    assert nested_work_tree(repo / "subm", repo) == str(repo / "subm")
    (repo / "subm" / "deep" / ".git").mkdir()  # a clone inside it: the innermost one holds the files
    assert nested_work_tree(repo / "subm" / "deep" / "reports", repo) == str(repo / "subm" / "deep")


def test_the_paths_probe_finds_the_git_directory_of_a_repository_and_of_a_worktree(git_repo, tmp_path):
    from moectl.probes import _git_dir
    from tests.conftest import git

    assert _git_dir(git_repo) == str((git_repo / ".git").resolve())
    linked = tmp_path / "linked"
    git(git_repo, "worktree", "add", "-q", str(linked), "-b", "side")
    assert _git_dir(linked) == str((git_repo / ".git" / "worktrees" / "linked").resolve())
    assert _git_dir(tmp_path / "nowhere") is None


def test_tracked_area_is_git_status_s_view(git_repo):
    from moectl.gitops import tracked_area

    assert tracked_area(git_repo, git_repo / "runs")  # not there yet: still what git status would show
    (git_repo / ".gitignore").write_text("runs/\n")
    assert not tracked_area(git_repo, git_repo / "runs") and tracked_area(git_repo, git_repo / "other")
    assert not tracked_area(git_repo, git_repo.parent / "elsewhere") and not tracked_area(git_repo, git_repo / ".git" / "x")


def test_a_local_mlflow_store_in_a_read_only_tree_is_refused():
    c, p, ok = planned_paths(read_only=["/srv/shared"], tracker_store="/home/me/.cache/moectl")
    assert paths_verdict(c, p, ok).ok
    bad = replace(ok, tracker_store="/srv/shared/mlruns")
    r = paths_verdict(c, p, bad)
    assert not r.ok and "[tracking] mlflow_uri writes /srv/shared/mlruns, inside read-only tree /srv/shared" in r.message
    # inside the artifact root that the read-only tree holds: allowed, as the runs themselves
    assert paths_verdict(c, p, replace(bad, read_only=["/art"], tracker_store=ART + "/mlruns")).ok


def test_experiments_md_in_a_read_only_tree_is_refused_while_the_summary_is_refreshed():
    # read_only = ["EXPERIMENTS.md"] means nothing may write it; the run would rewrite and commit it.
    c, p, paths = planned_paths(read_only=["/repo/EXPERIMENTS.md"])
    r = paths_verdict(c, p, paths)
    assert not r.ok and "EXPERIMENTS.md (refreshed with every report) is inside read-only tree /repo/EXPERIMENTS.md" in r.message
    quiet = cfg(report={"summary": False})  # the summary left alone: nothing to refuse
    assert verdict(evaluate(quiet, p, good(p, paths=paths)), "paths").ok


def test_overrides_mark_only_overridable_failed_guards():
    c = cfg()
    p = plan_for(c, device="cuda", gpus_available=1)
    obs = good(p, nvml=NvmlReading(gpus=[GpuInfo(index=0, util_pct=99)]),
               processes=[TrainingProcess(pid=1, age_s=1, cmdline="torchrun")],
               disk=DiskState(path=ART, free_gib=0.0))
    results = evaluate(c, p, obs, overrides=["gpus_idle", "no_other_training"])
    assert [(r.name, r.ok, r.overridden) for r in results if not r.ok] == [
        ("gpus_idle", False, True), ("no_other_training", False, True), ("disk", False, False)]
    assert not passed(results)  # disk still refuses
    obs2 = replace(obs, disk=DiskState(path=ART, free_gib=10.0))
    assert passed(evaluate(c, p, obs2, overrides=["gpus_idle", "no_other_training"]))
    # An override of a guard that passes changes nothing.
    assert not any(r.overridden for r in evaluate(c, p, good(p), overrides=["gpus_idle"]))


# ------------------------------------------------------------------------------- planning (pure)

import shlex  # noqa: E402
import sys  # noqa: E402

from moectl.errors import UsageError  # noqa: E402
from moectl.plan import command_text, make_request, parse_duration, planned_write_paths  # noqa: E402


def test_plan_merges_defaults_under_flags_and_builds_the_exact_command():
    c = cfg(project={"venv": ".venv", "name": "moe"}, defaults={"preset": "d12-moe", "cap": 1.25, "compile": "static", "save-every": 50})
    with pytest.raises(UsageError, match=r"--tag 'buf reuse/v2!': not usable in a directory name .* e\.g\. --tag buf_reuse_v2"):
        plan_run(c, make_request(cap=1.0, tag="buf reuse/v2!"), NOW, None)  # said, never silently rewritten
    p = plan_run(c, make_request(cap=1.0, tag="buf_reuse_v2", extra_args=["--seed", "3"]), NOW, None)
    assert p.run_id == "20250102_030405_moe-buf_reuse_v2" and p.tag == "buf_reuse_v2"
    assert p.exp_dir == "/art/20250102_030405_moe-buf_reuse_v2" and p.ckpt_dir == p.exp_dir + "/ckpt_root"
    assert p.device == "cpu" and p.nproc == 1  # no NVML reading -> cpu, one process
    assert p.python == "/repo/.venv/bin/python"
    assert p.argv == [
        "/repo/.venv/bin/python", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
        "-m", "engine.train", "--preset", "d12-moe", "--cap", "1.0", "--compile", "static", "--save-every", "50",
        "--seed", "3", "--device", "cpu", "--out-dir", p.exp_dir, "--ckpt-dir", p.ckpt_dir,
    ]  # `-- --seed 3` is an engine option: recorded with the others
    assert shlex.split(command_text(p)) == ["OMP_NUM_THREADS=1", "CUDA_VISIBLE_DEVICES=", *p.argv]  # a cpu run sees no GPU
    assert set(planned_write_paths(p)) >= {p.exp_dir, p.ckpt_dir, p.exp_dir + "/run.json", p.exp_dir + "/metrics.jsonl",
                                          p.exp_dir + "/train.log", p.exp_dir + "/command.txt", p.exp_dir + "/git.diff"}


def test_plan_default_tag_auto_device_and_gpu_selection():
    c = cfg(defaults={"preset": "tiny"})
    p = plan_run(c, make_request(cap=1.0, compile="static", fp8=True), NOW, 8)
    assert p.tag == "tiny_cap1p0_static_fp8" and p.device == "cuda" and p.nproc == 8
    assert "CUDA_VISIBLE_DEVICES" not in p.env
    c2 = cfg(gpu={"devices": [2, 5]}, project={"venv": ""})
    p2 = plan_run(c2, make_request(device="cuda"), NOW, 8)
    assert p2.nproc == 2 and p2.env["CUDA_VISIBLE_DEVICES"] == "2,5" and p2.python == sys.executable
    assert plan_run(c2, make_request(device="cuda", nproc=1), NOW, 8).nproc == 1
    # more engine ranks than selected GPUs: the third rank had no GPU to take (was let through to torchrun)
    with pytest.raises(UsageError) as e:
        plan_run(c2, make_request(device="cuda", nproc=3), NOW, 8)
    assert e.value.message == ("--nproc 3: [gpu] devices selects 2 GPU(s) ([2, 5]), and the engine runs one process "
                               "per GPU; give --nproc at most that, or select more devices")
    assert plan_run(c2, make_request(device="cpu", nproc=3), NOW, 8).nproc == 3  # (a cpu run uses no GPU)


def test_a_cpu_run_on_a_node_whose_nvml_fails_says_so():
    """`--device auto` with a driver that fails picks the CPU; the guard line says why, so a GPU
    experiment does not become a CPU run without a word. No NVML library at all: nothing to say."""
    from moectl.guards import guard_gpus_idle

    c = cfg()
    p = plan_for(c, device="cpu")
    failing = guard_gpus_idle(c, p, good(p, nvml=NvmlReading(error="Driver Not Loaded")))
    assert failing.skipped and failing.message == ("cpu run: GPU idleness not checked; NVML failed here (Driver Not "
                                                   "Loaded), so a cuda run would be refused")
    absent = guard_gpus_idle(c, p, good(p, nvml=NvmlReading(error="NVML Shared Library Not Found")))
    assert absent.message == "cpu run: GPU idleness not checked"
    unread = guard_gpus_idle(c, p, good(p, nvml=None))  # a cpu job's node: NVML not read at all
    assert unread.skipped and unread.message == "cpu run: GPU idleness not checked"


def test_a_run_directory_name_too_long_for_the_filesystem_names_what_made_it_long():
    c = cfg(project={"name": "p" * 300})
    with pytest.raises(UsageError) as exc:
        plan_run(c, make_request(), NOW, None)  # no --tag given: it was the project's name
    assert exc.value.message.startswith("[project] name: the run directory name would be ")
    assert exc.value.message.endswith("over the filesystem's 255; use a shorter project name")
    with pytest.raises(UsageError) as exc:
        plan_run(cfg(), make_request(tag="t" * 300), NOW, None)
    assert exc.value.message.startswith("--tag: ") and exc.value.message.endswith("use a shorter tag")


def test_explicit_exp_dir_is_kept_as_given_for_the_guard():
    c = cfg()
    p = plan_run(c, make_request(exp_dir="/art/x/../../etc/evil"), NOW, None)
    assert p.exp_dir == "/art/x/../../etc/evil"


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("30m", 1800), ("2h", 7200), ("1.5h", 5400), ("45", 45)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "kwargs, line",
    [
        ({"wait_gpus": "soon"}, "--wait-gpus: cannot read duration 'soon'"),
        ({"overrides": ["paths"]}, "--override: guard 'paths' cannot be overridden"),
        ({"overrides": ["gpu"]}, "--override: unknown guard 'gpu'"),
        ({"cap": -1.0}, "--cap: Input should be greater than or equal to 0"),
        ({"cap": float("inf")}, "--cap: Input should be a finite number"),  # passed `>= 0` and reached the engine
        ({"balance_rate": float("inf")}, "--balance-rate: Input should be a finite number"),
        ({"compile": "fast"}, "--compile: Input should be 'static', 'dynamic' or 'none'"),
        ({"device": "tpu"}, "--device: Input should be 'auto', 'cuda' or 'cpu'"),
        ({"steps": 0}, "--steps: Input should be greater than 0"),
    ],
)
def test_bad_run_options_are_one_line_usage_errors(kwargs, line):
    with pytest.raises(UsageError) as e:
        make_request(**kwargs)
    assert e.value.message.startswith(line) and e.value.exit_code == 2


@pytest.mark.parametrize("tag,expected", [
    ("bufreuse", "bufreuse"),
    ("static cap1.0", "static_cap1.0"),
    ("odd tag/../x", "odd_tag_x"),
    ("../../etc", "etc"),
    ("...", "run"),
    ("ünïcode!", "n_code"),
    ("-x", "x"),  # `moectl show -x` would be an option
])
def test_tags_become_safe_directory_names(tag, expected):
    from moectl.plan import sanitize_tag

    assert sanitize_tag(tag) == expected
