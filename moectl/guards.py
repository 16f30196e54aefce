"""The eight guards of SPEC §5: pure functions (config, plan, observed) -> GuardResult.

All are evaluated and all are reported, so a person sees every problem at once, each with a
message that says what to do. Only `gpus_idle` and `no_other_training` can be overridden
(`--override NAME`); an overridden guard stays ok=False with overridden=True and counts as a pass.
`check_request()` at the bottom is the one impure helper: probe, plan, evaluate.
"""
from __future__ import annotations

import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Callable, Optional

from moectl.config import SUMMARY_NAME, Config
from moectl.lock import held_for
from moectl.plan import OVERRIDABLE, RunPlan, RunRequest, plan_run
from moectl.probes import FAKE_NVML_ENV, NVML_LIBRARY_NOT_FOUND, Observed
from moectl.records import GuardResult


def _ok(name: str, message: str, **kw) -> GuardResult:
    return GuardResult(name=name, ok=True, message=message, overridable=name in OVERRIDABLE, **kw)


def _fail(name: str, message: str) -> GuardResult:
    return GuardResult(name=name, ok=False, message=message, overridable=name in OVERRIDABLE)


def _inside(path: str, root: str) -> bool:
    return Path(path).is_relative_to(root)


def guard_config(cfg: Config, plan: RunPlan, obs: Observed) -> GuardResult:
    if cfg.path is None:
        return _fail("config", "no .moectl.toml: run `moectl init` and commit it")
    return _ok("config", f"{cfg.path} is valid")


# probe_git's in_progress -> (what to call it, the command that ends it without finishing it)
_GIT_OPERATIONS = {"am": ("git am", "git am --abort"), "bisect": ("bisect", "git bisect reset")}


def guard_git(cfg: Config, plan: RunPlan, obs: Observed) -> GuardResult:
    g, want = obs.git, cfg.project.branch
    if not g.is_repo or g.error:
        return _fail("git", g.error or f"{cfg.root} is not a git repository")
    # Before the detached-HEAD check: a stopped rebase or bisect detaches HEAD, and "detached" would
    # hide what the person has to finish.
    if g.in_progress:
        name, way_out = _GIT_OPERATIONS.get(g.in_progress, (g.in_progress, f"git {g.in_progress} --abort"))
        return _fail("git", f"a {name} is in progress; finish it or `{way_out}`")
    if g.detached:
        return _fail("git", f"HEAD is detached at {(g.head or '?')[:10]}; `git switch {want if want != '*' else '<branch>'}` first")
    if want != "*" and g.branch != want:
        return _fail("git", f"on branch {g.branch!r}, expected {want!r} (project.branch); `git switch {want}`")
    lock_problem = _index_lock_problem(g, plan)
    if lock_problem:
        return _fail("git", lock_problem)
    counts = f"{g.modified} modified, {g.staged} staged, {g.untracked} untracked (left untouched)"
    return _ok("git", f"on {g.branch} @ {(g.head or 'no commits')[:10]}; {counts}")


# A git command holds index.lock for milliseconds; one there this long is a `git commit` waiting
# for its editor, or a crashed git's leftover.
INDEX_LOCK_STALE_S = 5.0


def _index_lock_problem(g, plan: RunPlan) -> Optional[str]:
    """Why a run that commits its report must not start under this index.lock: the commit at the
    end would wait MOECTL_GIT_LOCK_WAIT for it and give up, after the whole run. A killed moectl's
    lock is no problem (the run recovers it before it starts), nor is any for `--no-commit`."""
    if g.index_lock is None or plan.no_commit or g.index_lock[0] == "dead-moectl":
        return None
    if (g.index_lock_age_s or 0.0) < INDEX_LOCK_STALE_S:  # a git command at work: gone in a moment
        return None
    return (f"{g.index_lock[1]}; it has been there {_age(g.index_lock_age_s)}, and the report commit at the end "
            "of the run would fail on it — end that git command or remove the lock, or run with --no-commit")


def _age(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.0f} h"


def guard_venv(cfg: Config, plan: RunPlan, obs: Observed) -> GuardResult:
    v = obs.venv
    if v is None:
        return _fail("venv", "the interpreter was not probed")
    if not v.exists:
        venv = Path(v.python).parent.parent
        return _fail("venv", f"{v.python} not found; create the venv (`python3 -m venv {venv}`, then install torch "
                             "into it) or set project.venv")
    if not v.in_venv:
        return _fail("venv", f"{v.python} is not inside a virtual environment (no pyvenv.cfg next to its bin/); fix project.venv")
    if v.has_torch is None:
        return _fail("venv", v.error or f"could not ask {v.python} whether it has torch")
    if not v.has_torch:
        return _fail("venv", f"torch is not installed for {v.python}; `{v.python} -m pip install torch`")
    if v.trainer_missing:
        return _fail("venv", f"{v.trainer_missing}; fix [launch] in {cfg.path.name if cfg.path else '.moectl.toml'}")
    return _ok("venv", f"{v.python} has torch")


def guard_paths(cfg: Config, plan: RunPlan, obs: Observed) -> GuardResult:
    """Resolved write paths inside artifact_root, none in a read-only tree (unless that tree holds
    the artifact root and the path is inside the root), report_dir inside the repo. Never overridable."""
    p = obs.paths
    if p is None:
        return _fail("paths", "planned paths were not observed")
    root = p.artifact_root
    problems = [f"{name}: {why}" for name, why in p.unwritable.items()]
    for given, real in p.writes.items():
        if not _inside(real, root):
            shown = given if given == real else f"{given} (resolves to {real})"
            problems.append(f"{shown} is outside artifact_root {root}")
            continue
        for ro in p.read_only:
            if _inside(real, ro) and not _inside(root, ro):
                problems.append(f"{real} is inside read-only tree {ro}")
    if plan.explicit_exp_dir and p.exp_dir and _inside(p.exp_dir, root) and os.path.dirname(p.exp_dir) != root:
        # The run store is artifact_root's children: a run deeper down (in another run's directory,
        # say) would be missing from runs/show/compare, and the root itself is no run directory.
        where = "is artifact_root itself" if p.exp_dir == root else "is not directly in artifact_root"
        problems.append(f"--exp-dir {plan.exp_dir} {where} {root} (the run store lists its children)")
    repo = str(cfg.root.resolve())
    undecodable = [x for x in (repo, root, *p.writes.values()) if not _utf8(x)]
    if undecodable:
        # A name whose bytes this locale cannot decode (a C locale with UTF-8 mode off by hand,
        # PYTHONUTF8=0): its records would hold lone surrogates, which every later read calls corrupt.
        problems.append(f"{undecodable[0]!r} holds bytes this locale ({sys.getfilesystemencoding()}) cannot "
                        "decode; run moectl under a UTF-8 locale (LC_ALL=C.UTF-8, or PYTHONUTF8=1)")
    if p.root_in_work_tree:
        # Every run's files would be untracked changes: the next run recorded `dirty`, its git.diff
        # carrying the last run's logs and checkpoints metadata, and `git add -A` sweeping them in.
        problems.append(_root_in_work_tree(root))
    problems += report_dir_problems(p.report_dir, repo, p.git_dir, p.read_only, p.report_dir_repo)
    problems += tracker_store_problems(p.tracker_store, root, p.read_only, p.tracker_in_work_tree, p.wandb_dir)
    for ro in p.read_only:
        if cfg.report.summary and _inside(str((cfg.root / SUMMARY_NAME).resolve()), ro):
            problems.append(f"{SUMMARY_NAME} (refreshed with every report) is inside read-only tree {ro}; "
                            "set [report] summary = false to leave it alone")
    if problems:
        # The advice that fits: a run directory elsewhere is fixed by --exp-dir; the rest by the config.
        where = any("outside artifact_root" in x or x.startswith("--exp-dir") for x in problems)
        hint = " — choose an --exp-dir inside artifact_root or fix [paths]" if where else " — fix [paths] in the config"
        return _fail("paths", "; ".join(dict.fromkeys(problems)) + hint)
    return _ok("paths", f"all {len(p.writes)} write paths inside {root}")


def _utf8(path: str) -> bool:
    try:
        path.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def run_store_problems(cfg: Config) -> list[str]:
    """What the paths guard says of where artifact_root is, for a command that adds a run to the
    store without `moectl run`'s guards (`moectl import`): inside the repository and not
    git-ignored, every file of the run would be an untracked change (the next run `dirty`). (A
    root that cannot be written is the store's own one-line error, exit 2.)"""
    from moectl import gitops
    from moectl.probes import _real

    root = Path(_real(cfg.artifact_root))
    try:
        in_tree = gitops.tracked_area(cfg.root, root)
    except OSError:
        in_tree = False
    return [_root_in_work_tree(str(root))] if in_tree else []


def _root_in_work_tree(root: str) -> str:
    return f"artifact_root {root} is inside the repository and not git-ignored: add it to .gitignore or move it out"


def report_dir_problems(report_dir: str, repo: str, git_dir: Optional[str], read_only: list[str],
                        nested_repo: Optional[str] = None) -> list[str]:
    """Why reports cannot go into `report_dir` (all paths resolved): outside the repository, inside
    its git directory, inside another repository's work tree within it (`nested_repo`: a submodule),
    inside a read-only tree. The paths guard's checks on it, and those `compare --write-report`
    makes before it writes (moectl.compare_report)."""
    problems = []
    if not _inside(report_dir, repo):
        problems.append(f"report_dir {report_dir} is outside the repository {repo}")
    elif git_dir and _inside(report_dir, git_dir):
        problems.append(f"report_dir {report_dir} is inside the git directory {git_dir} (git tracks no file there)")
    elif nested_repo:
        problems.append(f"report_dir {report_dir} is inside {nested_repo}, a repository of its own (a submodule?): "
                        f"moectl commits reports into {repo} only")
    return problems + [f"report_dir {report_dir} is inside read-only tree {ro}" for ro in read_only
                       if _inside(report_dir, ro)]


def tracker_store_problems(store: Optional[str], artifact_root: str, read_only: list[str],
                           in_work_tree: list[tuple[str, str]], wandb_dir: Optional[str] = None) -> list[str]:
    """Why a tracker's local files may not be written (all paths resolved) - a local MLflow store,
    W&B's $WANDB_DIR: inside a read-only tree - unless that tree holds the artifact root and they
    are inside the root, as the runs are - or inside the repository's work tree, not git-ignored
    (`in_work_tree`: (what sets it, the path)). The paths guard and `moectl sync` alike."""
    problems = []
    for label, where in (("[tracking] mlflow_uri", store), ("$WANDB_DIR", wandb_dir)):
        for ro in read_only:
            if where and _inside(where, ro) and not (_inside(artifact_root, ro) and _inside(where, artifact_root)):
                problems.append(f"{label} writes {where}, inside read-only tree {ro}")
    for label, path in in_work_tree:
        # Untracked files of every later run: its git.diff would carry the store, growing each run.
        problems.append(f"{label} writes {path}, inside the repository and not git-ignored: "
                        "add it to .gitignore or move it out")
    return problems


def guard_fresh_dir(cfg: Config, plan: RunPlan, obs: Observed) -> GuardResult:
    if obs.paths is None:
        return _fail("fresh_dir", "planned paths were not observed")
    if obs.paths.exp_dir_exists:
        return _fail("fresh_dir", f"{plan.exp_dir} already exists; runs never reuse a directory: pick another --exp-dir or --tag")
    return _ok("fresh_dir", f"{plan.exp_dir} is new")


def _gpu_problems(cfg: Config, obs: Observed) -> list[str]:
    g = cfg.gpu
    gpus = obs.nvml.gpus or []
    problems = []
    if isinstance(g.devices, list):
        missing = sorted(set(g.devices) - {x.index for x in gpus})
        if missing:
            problems.append(f"GPU(s) {missing} from gpu.devices not found")
    for x in gpus:
        if x.error:
            problems.append(f"GPU {x.index}: NVML error: {x.error}")
            continue
        if x.mem_used_mib is None:  # idle cannot be shown, so it is not assumed
            problems.append(f"GPU {x.index}: its memory use is unknown")
        # (No utilization - NVML reports none for a MIG instance - leaves memory and processes to judge.)
        if x.util_pct is not None and x.util_pct > g.max_util_pct:
            problems.append(f"GPU {x.index}: util {x.util_pct:g}% > {g.max_util_pct:g}%")
        if x.mem_used_mib is not None and x.mem_used_mib > g.max_mem_mib:
            problems.append(f"GPU {x.index}: {x.mem_used_mib:.0f} MiB used > {g.max_mem_mib:g} MiB")
        if g.require_no_processes and x.processes:
            procs = ", ".join(f"pid {p.pid} {p.name}".strip() for p in x.processes)
            problems.append(f"GPU {x.index}: {len(x.processes)} compute process(es): {procs}")
    return problems


def guard_gpus_idle(cfg: Config, plan: RunPlan, obs: Observed) -> GuardResult:
    if plan.device == "cpu":
        # `--device auto` on a GPU node whose driver fails picks the CPU: say why, not just "cpu".
        error = obs.nvml.error if obs.nvml is not None else None  # (not read at all: a cpu job's node)
        failing = error is not None and error != NVML_LIBRARY_NOT_FOUND
        why = f"; NVML failed here ({error}), so a cuda run would be refused" if failing else ""
        return _ok("gpus_idle", f"cpu run: GPU idleness not checked{why}", skipped=True)
    if obs.nvml.gpus is None:
        return _fail("gpus_idle", f"NVML unavailable ({obs.nvml.error}): cannot verify the GPUs are idle; use --device cpu or fix the driver")
    if not obs.nvml.gpus:
        if isinstance(cfg.gpu.devices, list) and cfg.gpu.devices:  # NVML sees GPUs, none of those selected
            return _fail("gpus_idle", f"GPU(s) {sorted(cfg.gpu.devices)} from gpu.devices not found by NVML; "
                                      "fix gpu.devices or use --device cpu")
        return _fail("gpus_idle", "no GPUs visible to NVML for a cuda run; use --device cpu")
    problems = _gpu_problems(cfg, obs)
    # A leftover MOECTL_FAKE_NVML in a shell would make this guard judge a file, not the GPUs: say so.
    fake = f" (a fake reading: {FAKE_NVML_ENV}={obs.nvml.fake})" if obs.nvml.fake else ""
    if problems:
        return _fail("gpus_idle", "; ".join(problems) + fake + " — wait (--wait-gpus 30m) or --override gpus_idle")
    return _ok("gpus_idle", f"{len(obs.nvml.gpus)} GPU(s) idle{fake}")


def _shortened(cmdline: str, limit: int = 120) -> str:
    return cmdline if len(cmdline) <= limit else cmdline[: limit - 1] + "…"


def guard_no_other_training(cfg: Config, plan: RunPlan, obs: Observed) -> GuardResult:
    # One entry per run: torchrun, its agent and every worker share a run dir, and a list of each
    # would bury the one thing to know (which run) under pids.
    by_run: dict = {}
    for p in obs.processes:
        by_run.setdefault(p.run_dir or f"pid {p.pid}", []).append(p)
    problems = []
    for procs in by_run.values():
        pids, oldest, run_dir = [p.pid for p in procs], max(p.age_s for p in procs), procs[0].run_dir
        who = f"pid {pids[0]}" if len(pids) == 1 else "pids " + ", ".join(map(str, pids))
        # Without a run dir, the command line is all that says what it is (and how to find it).
        what = f", run dir {run_dir})" if run_dir else f"): {_shortened(procs[0].cmdline)}"
        problems.append(f"{who} ({oldest / 60:.1f} min old{what}")
    lock = obs.lock
    note = ""
    held = held_for(lock.get("run_id"), lock.get("sweep"), lock.get("leg")) if lock and lock.get("sweep") else None
    if lock and not lock.get("stale") and lock.get("pid") is None and lock.get("run_id") is None:
        problems.append(f"the run lock {lock.get('path')} is {lock.get('reason') or 'there'}; another moectl may hold it")
    elif lock and not lock.get("stale") and lock.get("own"):
        # This moectl's own: a sweep holds it from its first leg to its end, and each leg runs under it.
        note = f"; the run lock is this moectl's own, for {held or held_for(lock.get('run_id'))}"
    elif lock and not lock.get("stale"):
        problems.append(f"moectl pid {lock.get('pid')} on {lock.get('host')} holds the run lock for "
                        f"{held or lock.get('run_id')}")
    elif lock:
        note = f"; stale lock of pid {lock.get('pid')} will be taken over"
    if problems:
        return _fail("no_other_training", "training already running: " + "; ".join(problems) + " — wait for it or --override no_other_training")
    return _ok("no_other_training", "no other training process or run lock" + note)


def guard_disk(cfg: Config, plan: RunPlan, obs: Observed) -> GuardResult:
    d, need = obs.disk, cfg.paths.min_free_gib
    if d is None or d.free_gib is None:
        return _fail("disk", f"cannot measure free space under {cfg.artifact_root}: {d.error if d else 'not probed'}")
    if d.free_gib < need:
        return _fail("disk", f"{d.free_gib:.2f} GiB free under {d.path} < {need:g} GiB (paths.min_free_gib); free some space")
    return _ok("disk", f"{d.free_gib:.1f} GiB free under {d.path}")


GUARDS: list[Callable[[Config, RunPlan, Observed], GuardResult]] = [
    guard_config,
    guard_git,
    guard_venv,
    guard_paths,
    guard_fresh_dir,
    guard_gpus_idle,
    guard_no_other_training,
    guard_disk,
]


def evaluate(cfg: Config, plan: RunPlan, obs: Observed, overrides: list[str] = ()) -> list[GuardResult]:
    """Every guard, in SPEC order; failed overridable guards named in `overrides` are marked."""
    results = [g(cfg, plan, obs) for g in GUARDS]
    for r in results:
        if not r.ok and r.overridable and r.name in overrides:
            r.overridden = True
    return results


def passed(results: list[GuardResult]) -> bool:
    return all(r.ok or r.overridden for r in results)


def refusals(results: list[GuardResult]) -> list[str]:
    return [f"{r.name}: {r.message}" for r in results if not (r.ok or r.overridden)]


def summary_line(results: list[GuardResult]) -> str:
    """The guards in one line, what `run` prints when they let it start:
    `guards: 7 passed, gpus_idle skipped (cpu run: GPU idleness not checked)`.

    A skipped guard's message is why it was skipped; an overridden or failed one is only named
    (its message is advice for a refusal; the full table, `check` and `show` have it)."""
    parts = [f"{sum(r.ok and not r.skipped for r in results)} passed"]
    parts += [f"{r.name} skipped ({r.message})" for r in results if r.ok and r.skipped]
    parts += [f"{r.name} overridden" for r in results if r.overridden]
    parts += [f"{r.name} FAILED" for r in results if not (r.ok or r.overridden)]
    return "guards: " + ", ".join(parts)


def check_request(cfg: Config, request: RunRequest, now: Optional[datetime] = None, nodes: int = 1,
                  data_here: bool = True):
    """Probe, plan and evaluate (what `check`, `run` and each sweep leg do before launching).
    `nodes`: the nodes a Slurm run spans; `data_here`: False for a Slurm job, whose --data is on
    its nodes. Returns (plan, observed, results)."""
    from moectl.probes import observe, read_nvml

    nvml = read_nvml(cfg.gpu.devices)
    plan = plan_run(cfg, request, now or datetime.now(), len(nvml.gpus) if nvml.gpus is not None else None,
                    nodes=nodes, data_here=data_here)
    obs = observe(cfg, plan, nvml=nvml)
    return plan, obs, evaluate(cfg, plan, obs, request.overrides)


WAITABLE = ("gpus_idle", "no_other_training")  # guards that can clear by themselves (SPEC §5)


def wait_until_clear(cfg: Config, request: RunRequest, timeout_s: float, poll_s: float = 10.0,
                     on_wait: Optional[Callable[[list[GuardResult], float], None]] = None):
    """`--wait-gpus`: re-check until every guard passes, or only guards 6-7 fail and `timeout_s`
    has passed. Any other failing guard returns at once (waiting cannot fix a wrong branch).
    `on_wait(results, waited_s)` is called before each sleep (progress line). Returns the last
    (plan, observed, results): the plan is re-made each time, so its id is the launch time."""
    import time

    start = time.monotonic()
    while True:
        plan, obs, results = check_request(cfg, request)
        failing = {r.name for r in results if not (r.ok or r.overridden)}
        waited = time.monotonic() - start
        if not failing or failing - set(WAITABLE) or waited >= timeout_s:
            return plan, obs, results
        if on_wait:
            on_wait(results, waited)
        time.sleep(min(poll_s, max(0.0, timeout_s - waited)))
