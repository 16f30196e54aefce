"""The only I/O that observes the world: git, GPUs (NVML), processes, the lock, the venv, disk, paths.

Each probe returns plain data (dataclasses) and never raises for a state of the world:
a missing NVML library, a driver that is not loaded, a failing device, a directory that is not a
git repository are all *readings*, so `status` can show them and the guards can judge them.
`observe()` gathers everything into one `Observed` value, which the pure guards consume.

The one fake (tests, CI without GPUs): when the environment variable MOECTL_FAKE_NVML names a
JSON file, the NVML reading comes from that file instead of the driver:

    {"gpus": [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "util_pct": 0, "mem_used_mib": 0,
               "mem_total_mib": 81559, "processes": [{"pid": 123, "name": "python", "used_mib": 500}]}],
     "driver": "580.1"}
    {"error": "NVML Shared Library Not Found"}

Nothing here imports torch: whether the venv has torch is asked of the venv's own interpreter.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional


from moectl.config import UNRESOLVABLE, Config, why_unresolved
from moectl.lock import LockHolder, read_holder

if TYPE_CHECKING:
    from moectl.plan import RunPlan

FAKE_NVML_ENV = "MOECTL_FAKE_NVML"


# ---------------------------------------------------------------------------------------------- git


@dataclass
class GitState:
    is_repo: bool
    error: Optional[str] = None
    branch: Optional[str] = None  # None when detached
    detached: bool = False
    head: Optional[str] = None  # None in a repo without commits
    in_progress: Optional[str] = None  # merge | rebase | am | cherry-pick | revert | bisect
    modified: int = 0  # tracked files changed in the worktree
    staged: int = 0  # files with changes in the index
    untracked: int = 0
    # .git/index.lock, when there is one: who holds it ("other", "moectl", "dead-moectl"; see
    # gitops._lock_holder), the line that says so, and how long it has been there
    index_lock: Optional[tuple[str, str]] = None
    index_lock_age_s: Optional[float] = None

    @property
    def dirty(self) -> bool:
        return bool(self.modified or self.staged or self.untracked)


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess:
    """git's output as text, decoded losslessly: a file name that is not UTF-8 (`git status` lists
    it) keeps its bytes as surrogates (os.fsdecode) instead of failing the whole reading;
    git's messages are for people, so undecodable bytes there become U+FFFD."""
    # --no-optional-locks: `git status` would otherwise refresh the index under .git/index.lock,
    # and a `watch moectl status` would then fail the user's own `git add` now and again.
    r = subprocess.run(["git", "--no-optional-locks", "-C", str(repo), *args], capture_output=True)
    return subprocess.CompletedProcess(r.args, r.returncode, os.fsdecode(r.stdout), r.stderr.decode("utf-8", "replace"))


def probe_git(repo: Path) -> GitState:
    """Branch, HEAD, operation in progress and change counts, from `git status --porcelain=v2`."""
    from moectl import gitops

    try:
        gd = _git(repo, "rev-parse", "--absolute-git-dir", "--path-format=absolute", "--git-path", "index")
    except FileNotFoundError:
        return GitState(is_repo=False, error="git is not installed")
    if gd.returncode != 0:
        said = gitops.said_text(gd.stderr)
        if not said or "not a git repository" in said:
            return GitState(is_repo=False, error=f"{repo} is not inside a git repository")
        # A repository git will not read (a broken .git/config, another user's repository that
        # safe.directory does not list) is not "no repository": git's own words say what to fix.
        return GitState(is_repo=False, error=f"git cannot read the repository at {repo}: {said}")
    git_dir, index = map(Path, gd.stdout.splitlines()[:2])
    st = _git(repo, "status", "--porcelain=v2", "--branch", "-z", "--untracked-files=all")
    if st.returncode != 0:
        return GitState(is_repo=True, error=st.stderr.strip() or "git status failed")
    state = GitState(is_repo=True)
    # -z: records are NUL-separated; a rename record ("2 ...") is followed by its original path.
    records = iter(st.stdout.split("\0"))
    for rec in records:
        if rec.startswith("# branch.oid "):
            oid = rec.split(" ", 2)[2]
            state.head = None if oid == "(initial)" else oid
        elif rec.startswith("# branch.head "):
            head = rec.split(" ", 2)[2]
            state.detached = head == "(detached)"
            state.branch = None if state.detached else head
        elif rec[:2] in ("1 ", "2 ", "u "):
            xy = rec[2:4]
            state.staged += xy[0] not in ".?"
            state.modified += xy[1] not in ".?" or rec[0] == "u"
            if rec[0] == "2":
                next(records, None)
        elif rec.startswith("? "):
            state.untracked += 1
    state.in_progress = _operation_in_progress(git_dir)
    try:
        changed = index.with_name(index.name + ".lock").stat().st_mtime
    except OSError:
        return state
    state.index_lock = gitops.index_lock_holder(git_dir, index)  # (gone meanwhile: None)
    state.index_lock_age_s = max(0.0, time.time() - changed) if state.index_lock else None
    return state


def _operation_in_progress(git_dir: Path) -> Optional[str]:
    """The operation a repository is stopped in, from the state files git itself reads."""
    for marker, op in (
        ("MERGE_HEAD", "merge"),
        ("rebase-merge", "rebase"),
        ("rebase-apply/applying", "am"),  # `git am` and `rebase --apply` share rebase-apply/
        ("rebase-apply", "rebase"),
        ("CHERRY_PICK_HEAD", "cherry-pick"),
        ("REVERT_HEAD", "revert"),
        ("BISECT_LOG", "bisect"),
    ):
        if (git_dir / marker).exists():
            return op
    # A multi-commit pick or revert between two commits: the conflict was committed (no *_HEAD
    # file), the sequencer still holds the rest.
    try:
        todo = (git_dir / "sequencer" / "todo").read_text(encoding="utf-8", errors="replace").split()
    except OSError:
        return None
    if todo:
        return "revert" if todo[0] in ("revert", "r") else "cherry-pick"
    return None


# --------------------------------------------------------------------------------------------- NVML


@dataclass
class GpuProcess:
    pid: int
    name: str = ""
    used_mib: Optional[float] = None


@dataclass
class GpuInfo:
    index: int
    name: str = ""
    util_pct: Optional[float] = None
    mem_used_mib: Optional[float] = None
    mem_total_mib: Optional[float] = None
    processes: list[GpuProcess] = field(default_factory=list)
    error: Optional[str] = None  # a per-device NVML failure


@dataclass
class NvmlReading:
    gpus: Optional[list[GpuInfo]] = None  # None when NVML itself is unavailable
    error: Optional[str] = None
    driver: Optional[str] = None
    fake: Optional[str] = None  # the MOECTL_FAKE_NVML file this reading came from (tests, CI): said wherever it is shown


def _select(gpus: list[GpuInfo], devices) -> list[GpuInfo]:
    if devices == "all":
        return gpus
    return [g for g in gpus if g.index in set(devices)]


def _opt_float(value) -> Optional[float]:
    """A reading's number: a finite one >= 0 (a NaN or negative load would pass the idle check)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"not a number: {value!r}")
    number = float(value)  # (OverflowError for a 400-digit integer)
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"not a finite number >= 0: {value!r}")
    return number


def _nvml_from_dict(data: dict) -> NvmlReading:
    """The fake file's JSON as a reading; a missing or mistyped field raises ValueError."""
    try:
        gpus = None
        if data.get("gpus") is not None:
            gpus = [GpuInfo(index=int(g["index"]), name=str(g.get("name", "")),
                            util_pct=_opt_float(g.get("util_pct")), mem_used_mib=_opt_float(g.get("mem_used_mib")),
                            mem_total_mib=_opt_float(g.get("mem_total_mib")), error=g.get("error"),
                            processes=[GpuProcess(pid=int(p["pid"]), name=str(p.get("name", "")),
                                                  used_mib=_opt_float(p.get("used_mib")))
                                       for p in g.get("processes") or []])
                    for g in data["gpus"]]
        return NvmlReading(gpus=gpus, error=data.get("error"), driver=data.get("driver"))
    except (KeyError, TypeError, AttributeError, OverflowError) as exc:
        raise ValueError(f"bad field: {type(exc).__name__}: {exc}") from None


def _nvml_from_fake(path: str) -> NvmlReading:
    try:
        reading = _nvml_from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        reading.fake = path
        return reading
    except (OSError, ValueError) as exc:
        return NvmlReading(error=f"fake NVML reading {path} unreadable: {exc}")


def _decode(s) -> str:
    return s.decode() if isinstance(s, bytes) else str(s)


# pynvml's own words for a machine without the driver's library (NVMLError_LibraryNotFound).
NVML_LIBRARY_NOT_FOUND = "NVML Shared Library Not Found"


def _nvml_library_present() -> bool:
    """Can the NVML library be loaded? Asked before importing pynvml (~10 ms of start-up, a quarter
    of `status`'s own work) so that a machine without GPUs, a Slurm login node or a laptop, does
    not pay for it. Linux loads the same soname pynvml does; elsewhere pynvml itself decides."""
    if not sys.platform.startswith("linux"):
        return True
    import ctypes

    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


def _nvml_from_driver() -> NvmlReading:
    if not _nvml_library_present():
        return NvmlReading(error=NVML_LIBRARY_NOT_FOUND)
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        return NvmlReading(error="pynvml (nvidia-ml-py) is not installed")
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return NvmlReading(error=str(exc) or type(exc).__name__)
    try:
        try:
            driver = _decode(pynvml.nvmlSystemGetDriverVersion())
        except Exception:
            driver = None
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            g = GpuInfo(index=i)
            try:
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                g.name = _decode(pynvml.nvmlDeviceGetName(h))
                try:
                    g.util_pct = float(pynvml.nvmlDeviceGetUtilizationRates(h).gpu)
                except pynvml.NVMLError_NotSupported:
                    g.util_pct = None  # a MIG instance: memory and processes still tell
                mem = pynvml.nvmlDeviceGetMemoryInfo(h)
                g.mem_used_mib, g.mem_total_mib = mem.used / 2**20, mem.total / 2**20
                for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h):
                    used = getattr(p, "usedGpuMemory", None)
                    g.processes.append(
                        GpuProcess(pid=p.pid, name=_process_name(p.pid), used_mib=used / 2**20 if used else None)
                    )
            except Exception as exc:
                g.error = str(exc) or type(exc).__name__
            gpus.append(g)
        return NvmlReading(gpus=gpus, driver=driver)
    except Exception as exc:
        return NvmlReading(error=str(exc) or type(exc).__name__)
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def _process_name(pid: int) -> str:
    import psutil

    try:
        return psutil.Process(pid).name()
    except Exception:
        return ""


def read_nvml(devices="all") -> NvmlReading:
    """GPUs selected by `devices` ("all" or indices), from the driver or the MOECTL_FAKE_NVML file."""
    fake = os.environ.get(FAKE_NVML_ENV)
    reading = _nvml_from_fake(fake) if fake else _nvml_from_driver()
    if reading.gpus is not None:
        reading.gpus = _select(reading.gpus, devices)
    return reading


# ----------------------------------------------------------------------------------------- processes


@dataclass
class TrainingProcess:
    pid: int
    age_s: float
    cmdline: str
    run_dir: Optional[str] = None


def _is_training(argv: list[str], module: str) -> bool:
    """`module` is launch.target: a module name, or a script path (`python train.py` counts too)."""
    # The program that runs, not any word of the command line: `pgrep -f torchrun`, `less
    # /usr/bin/torchrun` or a shell loop mentioning it is no training.
    program = os.path.basename(argv[0])
    if program == "torchrun":
        return True
    if "python" not in program:
        return False
    script = os.path.basename(module) if module.endswith(".py") else None
    ran = _python_runs(argv)  # `python train.py`, torchrun's workers (`python -u train.py`), `python .../torchrun`
    if ran is None:
        return False
    kind, target = ran
    if kind == "module":
        return target in ("torch.distributed.run", module)
    return os.path.basename(target) in {"torchrun", script}


# Options of CPython's command line whose value follows (in the same word or the next one); the
# rest are flags, which combine in one word (`-um engine.train` is `-u -m engine.train`).
_PYTHON_VALUE_OPTIONS = "cmWX"


def _python_runs(argv: list[str]) -> Optional[tuple[str, str]]:
    """What a `python [options] ...` command line runs, parsed as CPython parses it: ("module",
    NAME) for `-m NAME` (also `-mNAME`, `-um NAME`), ("script", PATH) for a script; None for `-c`,
    stdin (`-`) or nothing."""
    i = 1
    while i < len(argv):
        word = argv[i]
        if word == "--":  # options end: the script follows
            return ("script", argv[i + 1]) if i + 1 < len(argv) else None
        if word == "-":  # the program comes from stdin
            return None
        if not word.startswith("-"):
            return ("script", word)
        if word.startswith("--"):  # --check-hash-based-pycs MODE; --help, --version... stand alone
            i += 2 if word == "--check-hash-based-pycs" else 1
            continue
        i += 1
        for j, letter in enumerate(word[1:], start=1):
            if letter not in _PYTHON_VALUE_OPTIONS:
                continue
            value = word[j + 1:]
            if not value:  # the value is the next word
                value = argv[i] if i < len(argv) else None
                i += 1
            if letter == "c":
                return None
            if letter == "m":
                return ("module", value) if value else None
            break  # -W / -X: the rest of the word was its value
    return None


def _out_dir(argv: list[str]) -> Optional[str]:
    for i, a in enumerate(argv):
        if a == "--out-dir" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--out-dir="):
            return a.split("=", 1)[1]
    return None


def find_training_processes(module: str = "engine.train") -> list[TrainingProcess]:
    """torchrun / `-m <module>` processes on this host, excluding this process and its ancestors
    (moectl itself may have been started from a shell whose argv mentions torchrun)."""
    import psutil

    me = psutil.Process()
    skip = {me.pid} | {p.pid for p in me.parents()}
    now = time.time()
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "create_time"]):
        info = proc.info
        argv = info.get("cmdline") or []
        if info["pid"] in skip or not argv or not _is_training(argv, module):
            continue
        found.append(
            TrainingProcess(
                pid=info["pid"],
                age_s=round(now - (info.get("create_time") or now), 1),
                cmdline=" ".join(argv),
                run_dir=_out_dir(argv) or _run_dir_of(proc),
            )
        )
    return found


def _run_dir_of(proc) -> Optional[str]:
    """A foreign trainer takes no --out-dir: moectl hands it the run directory as $MOECTL_RUN_DIR."""
    import psutil

    try:
        return proc.environ().get("MOECTL_RUN_DIR") or None
    except (psutil.Error, OSError):
        return None  # another user's process, or gone


# ----------------------------------------------------------------------------------------- venv, disk


@dataclass
class VenvState:
    python: str
    exists: bool
    in_venv: bool
    has_torch: Optional[bool] = None  # None when it could not be asked
    error: Optional[str] = None
    trainer_missing: Optional[str] = None  # why [launch] script / module cannot be found (runs only)


_HAS_TORCH = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('torch') else 1)"


def probe_venv(cfg: Config) -> VenvState:
    """Does the interpreter that will run torchrun exist, sit in the configured venv, have torch?
    torch is looked up by that interpreter (find_spec, no import), never imported here."""
    py = cfg.python
    exists = py.is_file() and os.access(py, os.X_OK)
    if cfg.project.venv == "":
        in_venv = True  # "" means: the interpreter running moectl, by definition
    else:
        venv_dir = py.parent.parent
        in_venv = (venv_dir / "pyvenv.cfg").is_file()
    state = VenvState(python=str(py), exists=exists, in_venv=in_venv)
    if not exists:
        state.error = f"{py} does not exist or is not executable"
        return state
    # Fast path (status must stay quick): torch sitting in the venv's own site-packages. Otherwise
    # (e.g. a --system-site-packages venv) ask the interpreter itself; both only locate the package.
    if state.in_venv and any(py.parent.parent.glob("lib/python3*/site-packages/torch/__init__.py")):
        state.has_torch = True
        return state
    try:
        r = subprocess.run([str(py), "-c", _HAS_TORCH], capture_output=True, timeout=30)
        state.has_torch = r.returncode == 0
    except (OSError, subprocess.TimeoutExpired) as exc:
        state.error = f"could not run {py}: {exc}"
    return state


# Where the interpreter, from the repository root, finds a module's top-level package - without
# importing anything of the user's (find_spec of a dotted `a.b` would run `a/__init__.py`; a
# top-level name is only looked up, editable installs' finders included): is it there, and which
# directories hold its submodules.
_FIND_TOP = ("import importlib.util, json, sys\n"
             "try:\n    spec = importlib.util.find_spec(sys.argv[1])\nexcept Exception:\n    spec = None\n"
             "print(json.dumps(None if spec is None else list(spec.submodule_search_locations or [])))")


def probe_trainer(cfg: Config, python: Path) -> Optional[str]:
    """Why the configured trainer cannot be launched, or None: a `script` that is no file, a
    `module` that `python -m` would not find from the repository root (its launch directory, with
    [launch] env's PYTHONPATH). A typo there passed every guard, made a run directory, failed, and
    committed a `failed` report. The module is looked for as files first (no subprocess for the
    usual case: a package in the repository), then asked of the interpreter itself."""
    launch = cfg.launch
    if launch.script is not None:
        from moectl.trainer import script_path

        path = script_path(launch, cfg.root)
        return None if path.is_file() else f"[launch] script {launch.script}: no such file ({path})"
    module = launch.module
    if not module:
        return None
    rel = Path(*module.split("."))

    def found_in_package(locations, rest) -> bool:
        sub = Path(*rest)
        return any((Path(d) / sub).with_suffix(".py").is_file() or (Path(d) / sub / "__init__.py").is_file()
                   or (Path(d) / sub.parent).is_dir() and any((Path(d) / sub.parent).glob(f"{sub.name}.*.so"))
                   for d in locations)

    def found_in(bases) -> bool:
        for base in bases:
            base = Path(base) if Path(base).is_absolute() else cfg.root / base
            if (base / rel).with_suffix(".py").is_file() or (base / rel / "__init__.py").is_file():
                return True
            parent = base / rel.parent
            if parent.is_dir() and any(parent.glob(f"{rel.name}.*.so")):  # a compiled module
                return True
        return False

    extra = [p for p in launch.env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if found_in([cfg.root, *extra]):
        return None
    top, *rest = module.split(".")
    env = {**os.environ, **launch.env}
    try:
        r = subprocess.run([str(python), "-c", _FIND_TOP, top], cwd=cfg.root, env=env, capture_output=True, timeout=30)
        if r.returncode != 0:
            return None  # cannot ask: the venv guard says why, if anything is wrong with the interpreter
        locations = json.loads(r.stdout)
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return None
    if locations is not None and (not rest or found_in_package(locations, rest)):
        return None
    return f"[launch] module {module}: {python} -m {module} would not find it"


@dataclass
class DiskState:
    path: str  # the nearest existing ancestor of artifact_root that was measured
    free_gib: Optional[float] = None
    error: Optional[str] = None


def probe_disk(artifact_root: Path) -> DiskState:
    p = Path(artifact_root)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return DiskState(path=str(p), free_gib=shutil.disk_usage(p).free / 2**30)
    except OSError as exc:
        return DiskState(path=str(p), error=str(exc))


# --------------------------------------------------------------------------------------------- paths


@dataclass
class PathsState:
    """Every planned write path as given and as resolved (symlinks, `..`, `~`)."""

    artifact_root: str
    report_dir: str
    read_only: list[str] = field(default_factory=list)
    writes: dict[str, str] = field(default_factory=dict)  # planned path -> resolved path
    exp_dir_exists: bool = False
    exp_dir: str = ""  # resolved
    # Why a directory moectl will create files in cannot take them (not a directory, no write
    # permission, a read-only or immutable filesystem entry), found before training, not after.
    unwritable: dict[str, str] = field(default_factory=dict)  # "artifact_root" / "report_dir" -> why
    tracker_store: Optional[str] = None  # resolved: where a local MLflow store writes ([tracking] mlflow_uri)
    # resolved: what that store creates inside the repository's work tree, not git-ignored
    tracker_in_work_tree: list[tuple[str, str]] = field(default_factory=list)  # (what sets it, the path)
    wandb_dir: Optional[str] = None  # resolved: $WANDB_DIR, where W&B writes when it is set
    root_in_work_tree: bool = False  # artifact_root inside the repository and not git-ignored
    git_dir: Optional[str] = None  # resolved: the repository's .git (git keeps nothing of ours there)
    # resolved: a git work tree of its own (a submodule, a nested clone) that report_dir lies in
    report_dir_repo: Optional[str] = None


def _real(p) -> str:
    """`p` with `~` expanded, symlinks and `..` resolved; where that cannot be done (a symlink loop
    on it: `_unresolvable` says so), made absolute as written, so the guards still judge it."""
    q = Path(os.path.expanduser(str(p)))
    try:
        return str(q.resolve())
    except UNRESOLVABLE:
        return os.path.abspath(q)


def _unresolvable(p) -> Optional[str]:
    """Why `p` cannot be resolved (a symlink loop on it), or None."""
    try:
        Path(os.path.expanduser(str(p))).resolve()
    except UNRESOLVABLE as exc:
        return why_unresolved(exc, "a symbolic link loop on its path")
    return None


def probe_paths(cfg: Config, plan: "RunPlan") -> PathsState:
    from moectl.plan import planned_write_paths
    from moectl.tracking import mlflow_local_store, wandb_local_dir

    from moectl import gitops

    store = mlflow_local_store(cfg)
    try:
        in_tree = gitops.tracked_area(cfg.root, Path(_real(cfg.artifact_root)))
    except OSError:
        in_tree = False
    return PathsState(
        tracker_store=_real(store) if store is not None else None,
        tracker_in_work_tree=tracker_in_work_tree(cfg),
        wandb_dir=_real(wandb_dir) if (wandb_dir := wandb_local_dir(cfg)) is not None else None,
        root_in_work_tree=in_tree,
        git_dir=_git_dir(cfg.root),
        report_dir_repo=nested_work_tree(Path(_real(cfg.report_dir)), cfg.root.resolve()),
        artifact_root=_real(cfg.artifact_root),
        report_dir=_real(cfg.report_dir),
        read_only=[_real(p) for p in cfg.read_only],
        writes={str(p): _real(p) for p in planned_write_paths(plan)},
        # As given (a dangling link there is taken) or resolved: `art/missing/../y` names `art/y` to
        # the mkdir that makes it, though the kernel finds no such path while `missing` is not there.
        exp_dir_exists=os.path.lexists(os.path.expanduser(plan.exp_dir)) or os.path.lexists(_real(plan.exp_dir)),
        exp_dir=_real(plan.exp_dir),
        unwritable=_unwritable({"artifact_root": cfg.artifact_root, "report_dir": cfg.report_dir,
                                "exp_dir": plan.exp_dir}),
    )


def _unwritable(paths: dict[str, Any]) -> dict[str, str]:
    """name -> why files cannot be created there: a path that cannot be resolved, or a directory
    that cannot take them (not asked of exp_dir, which is made new: fresh_dir and the paths guard judge it)."""
    out = {}
    for name, path in paths.items():
        why = _unresolvable(path)
        if why is None and name != "exp_dir":
            why = why_unwritable(Path(_real(path)))
        if why is not None:
            out[name] = why
    return out


def tracker_in_work_tree(cfg: Config) -> list[tuple[str, str]]:
    """The files and directories a tracker writes (a local MLflow store, $WANDB_DIR) that would be
    untracked changes of the repository (inside its work tree, not git-ignored): (what sets it,
    the path resolved)."""
    from moectl import gitops
    from moectl.tracking import tracker_local_files

    out = []
    for label, p in tracker_local_files(cfg):
        try:
            if gitops.tracked_area(cfg.root, Path(_real(p))):
                out.append((label, _real(p)))
        except OSError:
            pass
    return out


def _git_dir(root: Path) -> Optional[str]:
    """`<root>/.git` resolved, or where a linked worktree's `.git` file points; None when neither
    (read from the file system: no git process on the path guard's way)."""
    dot_git = Path(root) / ".git"
    if dot_git.is_file():
        try:
            first = dot_git.read_text(encoding="utf-8", errors="replace").splitlines()[0]
        except (OSError, IndexError):
            return None
        if first.startswith("gitdir:"):
            return _real(Path(root) / first[len("gitdir:"):].strip())
        return None
    return _real(dot_git) if dot_git.is_dir() else None


def nested_work_tree(path: Path, repo: Path) -> Optional[str]:
    """The innermost directory between `repo` (excluded) and `path` (included, both resolved) that
    holds a `.git` of its own - a submodule or a clone inside the repository - or None. Files there
    belong to that repository: the outer one can neither stage nor commit them."""
    if not path.is_relative_to(repo) or path == repo:
        return None
    for d in [path, *path.parents]:
        if d == repo:
            return None
        if os.path.lexists(d / ".git"):
            return str(d)
    return None


def why_unwritable(directory: Path) -> Optional[str]:
    """Why files cannot be created in `directory` (made first when missing), or None. Asks the
    kernel (access(2): permissions, a read-only mount, an immutable directory) about the directory,
    or about the nearest existing one above it, which the missing ones would be made in."""
    p = directory  # lexists: a dangling symlink in the way is named, not walked past
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    if not p.is_dir():
        return f"{p} is not a directory" if p == directory else f"{p} (on its path) is not a directory"
    if not os.access(p, os.W_OK | os.X_OK):
        return f"{p} is not writable" + ("" if p == directory else " (it would be made there)")
    return None


# ------------------------------------------------------------------------------------------ observed


@dataclass
class Observed:
    git: GitState
    nvml: NvmlReading
    processes: list[TrainingProcess] = field(default_factory=list)
    lock: Optional[dict] = None  # LockHolder as a dict (pid, host, run_id, started_at, cmd, stale, ...)
    venv: Optional[VenvState] = None
    disk: Optional[DiskState] = None
    paths: Optional[PathsState] = None  # only when observing for a planned run
    config_path: Optional[str] = None


def _venv_and_trainer(cfg: Config, plan: Optional["RunPlan"]) -> VenvState:
    state = probe_venv(cfg)
    if plan is not None and state.exists:  # a run: the trainer it will launch must be there
        state.trainer_missing = probe_trainer(cfg, Path(plan.python))
    return state


def lock_holder(cfg: Config) -> Optional[LockHolder]:
    return read_holder(cfg.artifact_root)


def observe(cfg: Config, plan: Optional["RunPlan"] = None, nvml: Optional[NvmlReading] = None) -> Observed:
    """Everything the guards (and `status`) look at, in one value. Pass `nvml` to reuse a reading
    already taken (the plan needs the GPU count before the paths can be observed)."""
    holder = lock_holder(cfg)
    return Observed(
        git=probe_git(cfg.root),
        nvml=nvml if nvml is not None else read_nvml(cfg.gpu.devices),
        processes=find_training_processes(cfg.launch.target),
        lock=holder.to_dict() if holder else None,
        venv=_venv_and_trainer(cfg, plan),
        disk=probe_disk(cfg.artifact_root),
        paths=probe_paths(cfg, plan) if plan is not None else None,
        config_path=str(cfg.path) if cfg.path else None,
    )


# ------------------------------------------------------------------------------------------- status


def _recent_runs(cfg: Config, n: int = 5) -> tuple[Optional[list[dict]], Optional[str], list[str]]:
    """(the newest runs from the run store, as `runs --json` prints them, or None when the store
    cannot be read; why not; one message per run record that cannot be read)."""
    from moectl.runindex import scan_run_json  # pydantic-free for records validated before

    root = Path(cfg.artifact_root)
    if root.exists() and not root.is_dir():
        return None, f"artifact_root {root} is a file, not a directory", []
    try:
        runs, corrupt = scan_run_json(root)
    except Exception as exc:  # a broken store must not break `status`
        return None, f"{type(exc).__name__}: {exc}", []
    return runs[:n], None, corrupt


def collect_status(config_path: Optional[Path] = None, cwd: Optional[Path] = None) -> dict:
    """Everything `moectl status` shows, as the SPEC §7a JSON (plus `config`, `config_error`,
    `artifact_root`). Never raises for a missing or invalid config: it is part of the status."""
    from moectl.config import read_config, read_default_config
    from moectl.errors import UsageError

    config_error = None
    try:
        cfg = read_config(config_path, cwd)  # a config validated before is read back without pydantic
    except UsageError as exc:
        config_error = " ".join([exc.message, *exc.lines])
        try:
            cfg = read_default_config(cwd)
        except UsageError:  # no working directory at all (deleted under the shell), or an unusable
            # MOECTL_ARTIFACT_ROOT (config_error names it): the rest still answers
            try:
                cfg = read_default_config(cwd, use_env=False)
            except UsageError:
                cfg = read_default_config(Path.home(), use_env=False)
    # First: reading settles a killed moectl's run and removes its lock.
    recent_runs, runs_error, unreadable = _recent_runs(cfg)
    from moectl import gitops

    # Before git's state is read: a killed moectl's index.lock is finished or undone (its staged
    # index, once in, is what `git status` must count); anyone else's is named, not touched.
    index_lock = gitops.index_lock_state(cfg.root) if cfg.path is not None else None
    obs = observe(cfg)
    git = obs.git
    return {
        "config": str(cfg.path) if cfg.path else None,
        "config_error": config_error,
        "artifact_root": str(cfg.artifact_root),
        "gpus": [asdict(g) for g in obs.nvml.gpus] if obs.nvml.gpus is not None else None,
        "nvml_error": obs.nvml.error,
        "driver": obs.nvml.driver,
        "nvml_fake": obs.nvml.fake,  # the MOECTL_FAKE_NVML file the GPU figures came from, else null
        "training_processes": [asdict(p) for p in obs.processes],
        "lock": obs.lock,
        "git": {
            "branch": git.branch,
            "expected_branch": cfg.project.branch if cfg.path else None,
            "dirty": git.modified,
            "staged": git.staged,
            "untracked": git.untracked,
            "head": git.head,
            "detached": git.detached,
            "in_progress": git.in_progress,
            "error": git.error,
            "index_lock": index_lock,  # a line about .git/index.lock (a killed moectl's: recovered), else null
        },
        "venv": asdict(obs.venv) if obs.venv else None,
        "recent_runs": recent_runs,
        "recent_runs_error": runs_error,  # why recent_runs is null
        "unreadable_runs": unreadable,  # run records that cannot be read (`moectl runs` names them too)
        **slurm_queue(cfg, jobs_of_ours=any(r.get("backend") == "slurm" and r.get("status") in ("queued", "running")
                                            for r in recent_runs or [])),
    }


def slurm_queue(cfg: Config, jobs_of_ours: bool = False) -> dict:
    """moectl's jobs in the Slurm queue (`slurm_jobs`: job id, run id, state, nodes, elapsed), or
    why they cannot be listed (`slurm_error`); both null on a machine without Slurm and a local
    backend. `jobs_of_ours`: the recent runs include a queued or running Slurm run (`run --slurm`
    with a local backend), whose jobs cannot be shown either."""
    from moectl import slurm
    from moectl.errors import MoectlError

    # Slurm's tools missing, or installed with no cluster configured (a workstation, a CI box), is
    # no problem for a local backend: nothing to show. With backend = "slurm", or runs of ours in
    # Slurm's queue, it is the problem.
    matters = cfg.cluster.backend == "slurm" or jobs_of_ours
    why = slurm.available()
    if why is not None:
        return {"slurm_jobs": None, "slurm_error": why if matters else None}
    down = slurm.controller_problem()  # milliseconds: squeue to a controller that is down retries for 18 s
    if down is not None:
        return {"slurm_jobs": None,
                "slurm_error": f"Slurm's controller does not answer: {down}" if matters else None}
    try:
        return {"slurm_jobs": [job.to_dict() for job in slurm.queue()], "slurm_error": None}
    except MoectlError as exc:
        return {"slurm_jobs": None, "slurm_error": exc.message if matters else None}
