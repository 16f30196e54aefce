"""`.moectl.toml`: discovery, the resolved `Config`, and reading it with or without pydantic (SPEC §3).

    cfg = load_config()                 # walk up from cwd; UsageError if none / invalid
    cfg = load_config(Path("x.toml"))   # --config PATH
    cfg = read_config()                 # the same, for commands that only read (status, runs)
    cfg.project.name, cfg.artifact_root, cfg.python

The schema itself (pydantic models, one-line-per-field errors) is moectl/config_schema.py, imported
only when a file is validated. `load_config` always validates; `read_config` reads back the
validated values of a file it has validated before (moectl/validated.py) and so never imports
pydantic for an unchanged config: `moectl status` in a loop pays for validation once.

The repository root is the directory holding the config file. Paths are resolved once, here:
`~` is expanded and relative paths are taken relative to the config file. The environment
variable MOECTL_ARTIFACT_ROOT overrides `paths.artifact_root` (a relocatable state directory for
tests and CI, so they never touch the real one); a relative one is taken relative to the config
file too, so every subdirectory of the repository sees one run store and one run lock.
"""
from __future__ import annotations

import copy
import errno
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

from moectl.errors import ConfigError, UsageError

if TYPE_CHECKING:
    from moectl.config_schema import MoectlFile

CONFIG_NAME = ".moectl.toml"
SUMMARY_NAME = "EXPERIMENTS.md"  # the handoff document at the repository root (moectl/summary.py)
ARTIFACT_ROOT_ENV = "MOECTL_ARTIFACT_ROOT"
DEFAULT_ARTIFACT_ROOT = "~/.cache/moectl/tmp_exp"

# The schema's names, importable from here as before (`from moectl.config import MoectlFile`): loaded
# from moectl/config_schema.py on first use, so importing this module never imports pydantic.
_SCHEMA_NAMES = {
    "MoectlFile", "ProjectSection", "PathsSection", "GpuSection", "LaunchSection", "MetricsSection",
    "ReportSection", "DefaultsSection", "TrackingSection", "ClusterSection", "parse_config_text",
}


def __getattr__(name: str) -> Any:
    if name in _SCHEMA_NAMES:
        from moectl import config_schema

        return getattr(config_schema, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def launch_target(module: Optional[str], script: Optional[str]) -> str:
    """What runs: the module name or the script path (process detection, messages)."""
    return module if module is not None else str(script)


class SectionView:
    """One validated section read back from the memo: its values as read-only attributes, in the
    model's field order. Stands in for the pydantic section wherever a config is only read."""

    def __init__(self, values: dict[str, Any]) -> None:
        object.__setattr__(self, "_values", values)

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is read-only (a config read back without validation)")

    def model_dump(self, **_: Any) -> dict[str, Any]:
        return copy.deepcopy(self._values)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._values!r})"


class LaunchView(SectionView):
    @property
    def target(self) -> str:
        return launch_target(self.module, self.script)


class DefaultsView(SectionView):
    def options(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class FileView(SectionView):
    """A whole validated `.moectl.toml` (MoectlFile.model_dump) as nested read-only sections."""

    def __init__(self, dump: dict[str, Any]) -> None:
        views = {"launch": LaunchView, "defaults": DefaultsView}
        super().__init__({name: views.get(name, SectionView)(values) for name, values in dump.items()})

    def model_dump(self, **_: Any) -> dict[str, Any]:
        return {name: section.model_dump() for name, section in self._values.items()}


@dataclass
class Config:
    """A validated config plus the paths it implies, resolved against the config file."""

    file: Union[MoectlFile, FileView]  # FileView: read back by read_config, read-only
    path: Optional[Path]  # the .moectl.toml it came from; None = built-in defaults (no file)
    root: Path  # repository root = the config file's directory
    artifact_root: Path
    report_dir: Path
    read_only: list[Path] = field(default_factory=list)
    python: Path = field(default_factory=lambda: Path(sys.executable))

    # Section shortcuts: cfg.project.name rather than cfg.file.project.name.
    project = property(lambda self: self.file.project)
    paths = property(lambda self: self.file.paths)
    gpu = property(lambda self: self.file.gpu)
    launch = property(lambda self: self.file.launch)
    metrics = property(lambda self: self.file.metrics)
    report = property(lambda self: self.file.report)
    defaults = property(lambda self: self.file.defaults)
    cluster = property(lambda self: self.file.cluster)


def current_dir() -> Path:
    """The working directory; a one-line UsageError when it was deleted or moved under the shell
    (os.getcwd() then fails with a bare `[Errno 2]` that names nothing)."""
    try:
        return Path.cwd()
    except FileNotFoundError:
        raise UsageError("the current directory no longer exists (deleted or moved): cd into the repository, "
                         "or pass --config") from None


def find_config(start: Optional[Path] = None) -> Optional[Path]:
    """The nearest `.moectl.toml` in `start` (default cwd) or any parent, or None."""
    here = Path(start or current_dir()).absolute()
    for d in (here, *here.parents):
        candidate = d / CONFIG_NAME
        if candidate.is_file() or os.path.lexists(candidate):
            return candidate  # a directory or dangling link named .moectl.toml is said, not walked past
    return None


def _resolve(base: Path, p: str, name: str) -> Path:
    """`~` expanded, relative to `base`, symlinks and `..` resolved (the path need not exist).
    UsageError naming `name` (where the path came from) when it cannot be (UNRESOLVABLE)."""
    q = Path(os.path.expanduser(p))
    try:
        return (q if q.is_absolute() else base / q).resolve()
    except UNRESOLVABLE as exc:
        raise UsageError(f"{name} {p!r} cannot be resolved: {why_unresolved(exc, 'a symbolic link loop on it')}") from None


# What Path.resolve() raises for a path it cannot resolve: a symlink loop on it (RuntimeError before
# Python 3.13, OSError ELOOP since), a NUL byte (ValueError).
UNRESOLVABLE = (RuntimeError, OSError, ValueError)


def why_unresolved(exc: BaseException, loop: str) -> str:
    """One of UNRESOLVABLE in words: `loop` for a symlink loop, else the error's own."""
    if isinstance(exc, RuntimeError) or getattr(exc, "errno", None) == errno.ELOOP:
        return loop
    return getattr(exc, "strerror", None) or str(exc)


def from_file_model(file: Union[MoectlFile, FileView], path: Optional[Path], root: Path, use_env: bool = True) -> Config:
    root = root.absolute()
    env_root = os.environ.get(ARTIFACT_ROOT_ENV) if use_env else None
    artifact_root = _resolve(root, env_root if env_root else file.paths.artifact_root,
                             ARTIFACT_ROOT_ENV if env_root else "[paths] artifact_root")
    if file.project.venv == "":
        python = Path(sys.executable)
    else:
        # Not resolved: a venv's python is a symlink out of the venv, and "inside the venv" is
        # exactly what the venv guard checks.
        venv = Path(os.path.expanduser(file.project.venv))
        python = Path(os.path.abspath(venv if venv.is_absolute() else root / venv)) / "bin" / "python"
    return Config(
        file=file,
        path=path,
        root=root,
        artifact_root=artifact_root,
        report_dir=_resolve(root, file.paths.report_dir, "[paths] report_dir"),
        read_only=[_resolve(root, p, "[paths] read_only") for p in file.paths.read_only],
        python=python,
    )


def _locate(path: Optional[Path], cwd: Optional[Path]) -> tuple[Path, str]:
    """`path` (--config) or the nearest `.moectl.toml` above `cwd`, and its text."""
    if path is None:
        path = find_config(cwd)
        if path is None:
            where = Path(cwd or current_dir()).absolute()
            raise UsageError(f"no {CONFIG_NAME} found in {where} or any parent; run `moectl init` to create one")
    path = Path(os.path.expanduser(str(path))).absolute()
    if path.is_dir():
        raise UsageError(f"config {path} is a directory, not a file")
    if not path.is_file():
        if os.path.islink(path):
            try:
                os.stat(path)
                why = f"a link to {os.readlink(path)}, which is not a file"  # (/dev/zero, a FIFO)
            except FileNotFoundError:
                why = "a link to nothing"
            except OSError as exc:  # a loop
                why = f"a link that cannot be followed ({exc.strerror or exc})"
        else:
            why = "not a file" if os.path.lexists(path) else None
        raise UsageError(f"config {path} is {why}" if why else f"config file not found: {path}")
    try:
        return path, path.read_text(encoding="utf-8-sig")  # -sig: a BOM some editors write is not TOML
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"cannot read {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def load_config(path: Optional[Path] = None, cwd: Optional[Path] = None) -> Config:
    """Load and validate `path` (--config) or the nearest `.moectl.toml` above `cwd`."""
    from moectl.config_schema import parse_config_text

    try:
        path, text = _locate(path, cwd)
        return from_file_model(parse_config_text(text, path.name), path, path.parent)
    except ConfigError:
        raise
    except UsageError as exc:
        raise ConfigError(exc.message, exc.lines) from None


def default_config(root: Optional[Path] = None) -> Config:
    """The built-in defaults rooted at `root` (cwd): what `status` shows when no config exists."""
    from moectl.config_schema import MoectlFile

    return from_file_model(MoectlFile(), None, Path(root or current_dir()))


def _read(text: str, scope: str, name: str) -> Union[MoectlFile, FileView]:
    """The validated sections of `text`: read back from the memo when this text was validated
    before, else validated now (pydantic; an invalid file raises and is not remembered)."""
    from moectl.validated import Memo

    memo = Memo(scope)
    dump = memo.get(text)
    if dump is not None:
        return FileView(dump)
    from moectl.config_schema import parse_config_text

    model = parse_config_text(text, name)
    memo.put(text, model.model_dump(mode="json"))
    memo.save()
    return model


def read_config(path: Optional[Path] = None, cwd: Optional[Path] = None) -> Config:
    """`load_config` for commands that only read (status, runs): the same values and the same
    errors, but an unchanged file validated before is not validated again (its sections come
    back as read-only views), so these commands never import pydantic for it."""
    from moectl.validated import digest

    path, text = _locate(path, cwd)
    return from_file_model(_read(text, f"config-{digest(str(path))}", path.name), path, path.parent)


def read_default_config(root: Optional[Path] = None, use_env: bool = True) -> Config:
    """`default_config` for commands that only read: the built-in defaults, remembered like a file.
    `use_env=False`: without MOECTL_ARTIFACT_ROOT (`status` when that variable is what is wrong)."""
    return from_file_model(_read("", "config-defaults", CONFIG_NAME), None, Path(root or current_dir()), use_env)


TEMPLATE = """\
# moectl configuration (SPEC §3). Every value below is the default; edit what you need.
# Unknown keys are errors, so a typo never silently does nothing; so is a value of the wrong type
# (true for a number, "4" for an integer, "off" for true/false): nothing is converted.

[project]
name = "moe"                 # prefix of experiment directory names: <YYYYmmdd_HHMMSS>_<name>-<tag>
                             # (letters, digits, . _ - only: it is part of a directory name)
branch = "main"              # run/sweep refuse on any other branch; "*" disables the check
venv = ".venv"               # environment whose python runs torchrun; "" = the current interpreter

[paths]
artifact_root = "~/.cache/moectl/tmp_exp"   # the ONLY place runs write; created if missing
                                            # (env MOECTL_ARTIFACT_ROOT overrides it)
report_dir = "reports"                      # inside the repo; the only files moectl commits
read_only = []                              # trees nothing may be written into
min_free_gib = 1.0                          # the disk guard: free space needed under artifact_root

[gpu]
max_util_pct = 5             # a GPU busier than this is not idle
max_mem_mib = 1024           # ... or with more memory in use than this
require_no_processes = true  # ... or with any compute process on it
devices = "all"              # or a list of indices, e.g. [0, 1] (sets CUDA_VISIBLE_DEVICES)

[launch]
module = "engine.train"      # run as: python -m torch.distributed.run ... -m <module>
# script = "train.py"        # ... or a script (relative to this file): exactly one of the two
# launcher = "torchrun"      # "torchrun" | "python" (one plain process)
# args = []                  # always passed to the trainer, before the mapped options (the engine's
                             # are its options: checked and recorded, [defaults] < args < the command line)
nproc_per_node = "auto"      # auto = number of selected GPUs (cuda) or 1 (cpu)
env = { OMP_NUM_THREADS = "1" }
compile_fallback = true      # a compile failure re-runs the leg with --compile none
# [launch.options]           # another trainer: moectl run option -> its flag ("{}" is the value)
# steps = "--max_iters={}"   # (`moectl init --trainer nanochat|nanogpt` writes a starting point)
#                            # keys: preset cap compile fp8 dispatch balance balance_rate ep steps
#                            # seed device out_dir ckpt_dir, or a key of [defaults]

[metrics]
window = 50                  # the tail window of every summary: its last `window` steps ...
warmup_steps = 10            # ... after steps 0-9 (compile / warm-up), which no summary counts
# source = "jsonl"           # "jsonl": the engine's metrics.jsonl | "stdout": parse the trainer's output

[report]
summary = true               # run/sweep refresh EXPERIMENTS.md

[defaults]                   # engine options for every run unless given on the command line:
                             # engine.train's own (`python -m engine.train --help`; n-experts or
                             # n_experts), one value each; another trainer: keys it maps in [launch.options]
# preset = "tiny"
# cap = 1.0
# compile = "static"

[tracking]                   # mirror every finished run into a tracker; `moectl sync` retries
# mlflow_uri = "http://127.0.0.1:5000"   # or "sqlite:///~/.cache/moectl/mlflow.db", or a directory
#                                        # (needs: pip install 'moectl[mlflow]')
# mlflow_experiment = "moe"              # default: project.name
# wandb_project = "moe"                  # (needs: pip install 'moectl[wandb]')
# wandb_entity = "my-team"
# wandb_mode = "online"                  # "offline": a run directory that `wandb sync` uploads later

[cluster]                    # where runs execute; `moectl run --slurm` picks slurm for one run
backend = "local"            # "local": this machine; "slurm": each run is a Slurm job (sbatch)
nodes = 1                    # --nodes: torchrun on every node, c10d rendezvous at the first one
rdzv_port = 29500            # c10d rendezvous on the first node, each job at a port of its own:
                             # rdzv_port + (job id mod 1000), so rdzv_port is at most 64536
# partition = "gpu"
# account = "my-team"
# time = "02:00:00"          # sbatch --time
# gpus_per_node = 8
# cpus_per_task = 16
# max_parallel = 4           # sweep legs in flight at once (default: all)
# extra_sbatch = ["--qos=high"]   # raw #SBATCH options
"""


TRAINERS = ("engine", "nanochat", "nanogpt")


_BRANCH_LINE = 'branch = "main"              # run/sweep refuse on any other branch; "*" disables the check\n'


def template_for(trainer: str = "engine", branch: Optional[str] = None) -> str:
    """TEMPLATE with the `[launch]`/`[metrics]` tables of a known trainer (moectl.trainer.TABLES);
    `branch`: the repository's own branch where it is not the default `main` (what `init` found)."""
    if trainer not in TRAINERS:
        raise UsageError(f"--trainer: unknown trainer {trainer!r} (known: {', '.join(TRAINERS)})")
    text = TEMPLATE
    if branch and branch != "main":
        quoted = json.dumps(branch)  # a TOML basic string: a `"` or `\\` in a branch name is escaped
        text = text.replace(_BRANCH_LINE, f'branch = {quoted}{" " * max(1, 20 - len(quoted))}'
                            f'# the branch this repository was on at `moectl init` (default "main");\n'
                            f'                             # run/sweep refuse on any other branch; "*" disables the check\n')
    if trainer == "engine":
        return text
    from moectl.trainer import TABLES

    start, end = text.index("[launch]\n"), text.index("[report]\n")
    return text[:start] + TABLES[trainer] + "\n" + text[end:]


def _config_in(directory: Path) -> Path:
    """`<directory>/.moectl.toml`; a relative `directory` in a deleted working directory is one line
    naming that, not `[Errno 2] ... '.moectl.toml'`."""
    if not Path(directory).is_absolute():
        current_dir()
    return Path(directory) / CONFIG_NAME


def write_template(directory: Path, trainer: str = "engine", branch: Optional[str] = None) -> Path:
    """`moectl init`: write the commented template; refuse (exit 2) if a config already exists."""
    from moectl.atomic import create_new_file

    text = template_for(trainer, branch)
    target = _config_in(directory)
    # Written beside it and linked into place: a full disk leaves no empty config that would then
    # make the next `init` refuse, and of two `init`s exactly one writes it.
    if os.path.lexists(target) or not create_new_file(target, text):
        raise UsageError(f"{target} already exists; not overwriting it "
                         f"(`moectl init --force` replaces it and keeps the old one as {CONFIG_NAME}.bak)")
    return target


def overwrite_template(directory: Path, trainer: str = "engine", branch: Optional[str] = None) -> tuple[Path, Optional[Path]]:
    """`moectl init --force`: write the template over an existing config, first copying the old
    one byte for byte to `.moectl.toml.bak` - or `.bak.1`, `.bak.2`, ... when that exists, so no
    earlier backup is ever overwritten. The new file replaces the old one in one rename: a reader
    sees the old config or the new one, never a missing or half-written file. Returns (config
    written, backup or None when there was nothing to back up)."""
    import stat

    from moectl.records import atomic_file

    text = template_for(trainer, branch)
    target = _config_in(directory)
    try:
        old = target.read_bytes()
        mode = stat.S_IMODE(target.stat().st_mode)
    except FileNotFoundError:
        if not target.is_symlink():
            return write_template(directory, trainer, branch), None
        # A symlink to nothing: there is no old config to keep, and --force replaces the link itself
        # (writing through it could put the file anywhere the link happens to point).
        with atomic_file(target, "w") as fh:
            fh.write(text)
        return target, None
    except IsADirectoryError:
        raise UsageError(f"{target} is a directory; not replacing it") from None
    backup = _write_backup(target, old, mode)
    with atomic_file(target, "w") as fh:
        os.fchmod(fh.fileno(), mode)  # the config keeps the old file's permissions
        fh.write(text)
    return target, backup


def _write_backup(target: Path, data: bytes, mode: int) -> Path:
    """`data` in the first of `<target>.bak`, `<target>.bak.1`, ... that does not exist yet
    (created exclusively: two `init --force` at once never share a backup)."""
    n = 0
    while True:
        backup = target.with_name(f"{target.name}.bak" + (f".{n}" if n else ""))
        try:
            fd = os.open(backup, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            break
        except FileExistsError:
            n += 1
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        backup.unlink(missing_ok=True)  # ours, and incomplete: a partial backup would mislead
        raise
    return backup
