"""`.moectl.toml`: the pydantic model (SPEC §3), discovery, and one-line-per-field errors.

    cfg = load_config()                 # walk up from cwd; UsageError if none / invalid
    cfg = load_config(Path("x.toml"))   # --config PATH
    cfg.project.name, cfg.artifact_root, cfg.python

The repository root is the directory holding the config file. Paths are resolved once, here:
`~` is expanded and relative paths are taken relative to the config file. The environment
variable MOECTL_ARTIFACT_ROOT overrides `paths.artifact_root` (a relocatable state directory for
tests and CI, so they never touch the real one).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from moectl.errors import UsageError
from engine.schema import ENGINE_MODULE
from moectl.metrics import DEFAULT_WARMUP_STEPS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

CONFIG_NAME = ".moectl.toml"
ARTIFACT_ROOT_ENV = "MOECTL_ARTIFACT_ROOT"
DEFAULT_ARTIFACT_ROOT = "~/.cache/moectl/tmp_exp"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ProjectSection(_Strict):
    name: str = Field("moe", min_length=1)
    branch: str = Field("main", min_length=1)  # "*" disables the branch check
    venv: str = ".venv"  # "" = the interpreter running moectl


class PathsSection(_Strict):
    artifact_root: str = Field(DEFAULT_ARTIFACT_ROOT, min_length=1)
    report_dir: str = Field("reports", min_length=1)
    read_only: list[str] = Field(default_factory=list)
    min_free_gib: float = Field(1.0, ge=0)  # the disk guard's threshold


class GpuSection(_Strict):
    max_util_pct: float = Field(5, ge=0, le=100)
    max_mem_mib: float = Field(1024, ge=0)
    require_no_processes: bool = True
    devices: Union[Literal["all"], list[int]] = "all"

    @field_validator("devices")
    @classmethod
    def _indices(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("an empty device list selects nothing; use \"all\" or indices")
            if any(i < 0 for i in v) or len(set(v)) != len(v):
                raise ValueError("device indices must be distinct and >= 0")
        return v


class LaunchSection(_Strict):
    """Which trainer runs and how (issue 10). Exactly one of `module` / `script`; with neither, the
    engine (`module = "engine.train"`). A trainer with an `[launch.options]` table, a `script`, or
    metrics parsed from stdout gets only the flags that table maps (moectl/trainer.py); a module
    without any of those follows the engine's own contract (`--key value`, `--out-dir`)."""

    module: Optional[str] = Field(ENGINE_MODULE, pattern=r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")
    script: Optional[str] = Field(None, min_length=1)  # relative to the repository root
    launcher: Literal["torchrun", "python"] = "torchrun"
    args: list[str] = Field(default_factory=list)  # always passed, before the mapped options
    options: Optional[dict[str, str]] = None  # moectl option -> trainer flag ("{}" is the value)
    nproc_per_node: Union[Literal["auto"], int] = "auto"
    env: dict[str, str] = Field(default_factory=lambda: {"OMP_NUM_THREADS": "1"})
    compile_fallback: bool = True

    @model_validator(mode="before")
    @classmethod
    def _module_or_script(cls, data):
        if isinstance(data, dict) and data.get("script") is not None:
            if data.get("module") is not None:
                raise ValueError("give exactly one of module and script, not both")
            data = {**data, "module": None}
        return data

    @field_validator("nproc_per_node")
    @classmethod
    def _positive(cls, v):
        if isinstance(v, int) and v < 1:
            raise ValueError("must be \"auto\" or an integer >= 1")
        return v

    @field_validator("options")
    @classmethod
    def _templates(cls, v):
        if v is None:
            return v
        out = {}
        for key, template in v.items():
            if not template.strip():
                raise ValueError(f"{key}: an empty flag; map it to e.g. \"--{key}={{}}\"")
            out[key.replace("-", "_")] = template
        return out

    @property
    def target(self) -> str:
        """What runs: the module name or the script path (process detection, messages)."""
        return self.module if self.module is not None else str(self.script)


class MetricsSection(_Strict):
    window: int = Field(50, ge=1)
    # Steps 0 .. warmup_steps-1 (compile, warm-up) never enter a tail window (moectl.metrics).
    warmup_steps: int = Field(DEFAULT_WARMUP_STEPS, ge=0)
    # Where a run's per-step metrics come from (issue 10): the engine's metrics.jsonl, or the
    # trainer's own output, parsed by moectl/stdout_metrics.py into the same metrics.jsonl.
    source: Literal["jsonl", "stdout"] = "jsonl"
    format: Optional[Literal["nanochat", "regex"]] = None
    step: Optional[str] = None  # format = "regex": a step line matches this; group 1 is the step
    tokens_per_step: Optional[str] = None  # matched once; tok/sec = tokens_per_step / dt
    patterns: dict[str, str] = Field(default_factory=dict)  # schema field -> regex with one group

    @model_validator(mode="after")
    def _stdout_keys(self):
        from moectl.stdout_metrics import check_patterns

        if self.source == "jsonl":
            # step/tokens_per_step/patterns still serve `moectl import --format regex`; a format
            # would only say how to parse a live run's output, which jsonl never does.
            if self.format is not None:
                raise ValueError('format is set but source is "jsonl" (set source = "stdout")')
            check_patterns(self.step, self.tokens_per_step, self.patterns)
            return self
        if self.format is None:
            raise ValueError('source = "stdout" needs format = "nanochat" or "regex"')
        if self.format == "regex" and self.step is None:
            raise ValueError('format = "regex" needs step = \'<regex whose group is the step number>\'')
        if self.format == "nanochat" and self.step is not None:
            raise ValueError('step is only for format = "regex" (nanochat\'s step line is built in)')
        check_patterns(self.step, self.tokens_per_step, self.patterns)
        return self


class ReportSection(_Strict):
    summary: bool = True  # run/sweep refresh EXPERIMENTS.md


class DefaultsSection(BaseModel):
    """Engine options applied to every run. Free-form (any engine option may appear, passed as
    `--key value`), but the options moectl itself understands are type-checked here."""

    model_config = ConfigDict(extra="allow")

    preset: Optional[str] = None
    cap: Optional[float] = Field(None, ge=0)
    steps: Optional[int] = Field(None, gt=0)
    compile: Optional[Literal["static", "dynamic", "none"]] = None
    fp8: Optional[bool] = None
    dispatch: Optional[Literal["auto", "padded", "grouped", "loop"]] = None
    device: Optional[Literal["auto", "cuda", "cpu"]] = None
    dense: Optional[bool] = None
    depth: Optional[int] = Field(None, gt=0)
    n_experts: Optional[int] = Field(None, gt=0)
    top_k: Optional[int] = Field(None, gt=0)
    moe_freq: Optional[int] = Field(None, gt=0)
    seq_len: Optional[int] = Field(None, gt=0)
    device_batch_size: Optional[int] = Field(None, gt=0)
    total_batch_size: Optional[int] = Field(None, gt=0)
    balance_coeff: Optional[float] = Field(None, ge=0)
    seed: Optional[int] = None
    dtype: Optional[Literal["bf16", "fp32"]] = None

    @model_validator(mode="before")
    @classmethod
    def _underscores(cls, data):
        # TOML may spell engine options as on the command line (n-experts); validate one spelling.
        if isinstance(data, dict):
            return {str(k).replace("-", "_"): v for k, v in data.items()}
        return data

    def options(self) -> dict[str, Any]:
        """The options that are set (keys with underscores)."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


class TrackingSection(_Strict):
    """Trackers every finished run is mirrored into (moectl/tracking.py). A tracker is on when its
    first key is set: `mlflow_uri` for MLflow, `wandb_project` for Weights & Biases."""

    mlflow_uri: Optional[str] = Field(None, min_length=1)  # a server URL, sqlite:///FILE, or a directory
    mlflow_experiment: Optional[str] = Field(None, min_length=1)  # default: project.name
    wandb_project: Optional[str] = Field(None, min_length=1, max_length=128)
    wandb_entity: Optional[str] = Field(None, min_length=1)
    wandb_mode: Literal["online", "offline"] = "online"  # offline: a run directory `wandb sync` uploads

    @field_validator("mlflow_uri")
    @classmethod
    def _uri(cls, v):
        from urllib.parse import urlsplit

        if v.split("://", 1)[0] in ("http", "https") and not urlsplit(v).hostname:
            raise ValueError(f"{v!r} names no host (e.g. http://127.0.0.1:5000)")
        return v

    @field_validator("wandb_project", "wandb_entity")
    @classmethod
    def _wandb_name(cls, v):
        bad = sorted(set(v) & set("/\\#?%:"))
        if bad:
            raise ValueError(f"must not contain {' '.join(bad)}")
        return v

    @model_validator(mode="after")
    def _needs_first_key(self):
        # A key that cannot take effect is an error, like an unknown key: never silently nothing.
        if self.mlflow_experiment is not None and self.mlflow_uri is None:
            raise ValueError("mlflow_experiment is set but mlflow_uri is not (MLflow is off)")
        idle = [k for k in ("wandb_entity", "wandb_mode") if k in self.model_fields_set]
        if idle and self.wandb_project is None:
            raise ValueError(f"{idle[0]} is set but wandb_project is not (W&B is off)")
        return self


# Slurm's --time formats: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
_SLURM_TIME = r"^(\d+-\d{1,2}(:\d{1,2}){0,2}|\d+(:\d{1,2}){0,2})$"


class ClusterSection(_Strict):
    """Where runs execute (moectl/execution.py): this machine, or Slurm jobs (moectl/slurm.py)."""

    backend: Literal["local", "slurm"] = "local"
    partition: Optional[str] = Field(None, min_length=1, pattern=r"^[^\s,]+$")
    account: Optional[str] = Field(None, min_length=1, pattern=r"^\S+$")
    time: Optional[str] = None  # sbatch --time, e.g. "02:00:00"
    nodes: int = Field(1, ge=1)
    gpus_per_node: Optional[int] = Field(None, ge=0)
    cpus_per_task: Optional[int] = Field(None, ge=1)
    max_parallel: Optional[int] = Field(None, ge=1)  # sweep legs in flight at once; None = all
    rdzv_port: int = Field(29500, ge=1024, le=65535)  # torchrun's c10d rendezvous on the first node
    extra_sbatch: list[str] = Field(default_factory=list)  # raw #SBATCH options, e.g. "--qos=high"

    @field_validator("time")
    @classmethod
    def _slurm_time(cls, v):
        import re

        if v is not None and not re.match(_SLURM_TIME, v):
            raise ValueError(f"{v!r} is not a Slurm time limit (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM:SS)")
        return v

    @field_validator("extra_sbatch")
    @classmethod
    def _options(cls, v):
        out = []
        for opt in v:
            opt = opt.strip().removeprefix("#SBATCH").strip()
            if not opt.startswith("-") or "\n" in opt or "\r" in opt:
                raise ValueError(f"{opt!r} is not one sbatch option (e.g. \"--qos=high\")")
            out.append(opt)
        return out


class MoectlFile(_Strict):
    project: ProjectSection = Field(default_factory=ProjectSection)
    paths: PathsSection = Field(default_factory=PathsSection)
    gpu: GpuSection = Field(default_factory=GpuSection)
    launch: LaunchSection = Field(default_factory=LaunchSection)
    metrics: MetricsSection = Field(default_factory=MetricsSection)
    report: ReportSection = Field(default_factory=ReportSection)
    defaults: DefaultsSection = Field(default_factory=DefaultsSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    cluster: ClusterSection = Field(default_factory=ClusterSection)


@dataclass
class Config:
    """A validated config plus the paths it implies, resolved against the config file."""

    file: MoectlFile
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


def find_config(start: Optional[Path] = None) -> Optional[Path]:
    """The nearest `.moectl.toml` in `start` (default cwd) or any parent, or None."""
    here = Path(start or Path.cwd()).absolute()
    for d in (here, *here.parents):
        candidate = d / CONFIG_NAME
        if candidate.is_file():
            return candidate
    return None


def _resolve(base: Path, p: str) -> Path:
    """`~` expanded, relative to `base`, symlinks and `..` resolved (the path need not exist)."""
    q = Path(os.path.expanduser(p))
    return (q if q.is_absolute() else base / q).resolve()


def from_file_model(file: MoectlFile, path: Optional[Path], root: Path) -> Config:
    root = root.absolute()
    env_root = os.environ.get(ARTIFACT_ROOT_ENV)
    artifact_root = _resolve(Path.cwd(), env_root) if env_root else _resolve(root, file.paths.artifact_root)
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
        report_dir=_resolve(root, file.paths.report_dir),
        read_only=[_resolve(root, p) for p in file.paths.read_only],
        python=python,
    )


def _field_lines(name: str, exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        # A section's own check names the key it is about (`patterns.loss: ...`): one dotted path.
        head, sep, rest = msg.partition(": ")
        if sep and loc and " " not in head and head.replace(".", "").replace("_", "").isalnum():
            loc, msg = f"{loc}.{head}", rest
        lines.append(f"{name}: {loc}: {msg}")
    return lines


def parse_config_text(text: str, name: str = CONFIG_NAME) -> MoectlFile:
    """Validate TOML text; UsageError with one line per bad field (or the TOML line number)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{name}: malformed TOML: {exc}") from None
    try:
        return MoectlFile.model_validate(data)
    except ValidationError as exc:
        lines = _field_lines(name, exc)
        raise UsageError(f"invalid config {name} ({len(lines)} problem(s))", lines=lines) from None


def load_config(path: Optional[Path] = None, cwd: Optional[Path] = None) -> Config:
    """Load `path` (--config) or the nearest `.moectl.toml` above `cwd`."""
    if path is None:
        path = find_config(cwd)
        if path is None:
            where = Path(cwd or Path.cwd()).absolute()
            raise UsageError(f"no {CONFIG_NAME} found in {where} or any parent; run `moectl init` to create one")
    path = Path(os.path.expanduser(str(path))).absolute()
    if not path.is_file():
        raise UsageError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None
    return from_file_model(parse_config_text(text, path.name), path, path.parent)


def default_config(root: Optional[Path] = None) -> Config:
    """The built-in defaults rooted at `root` (cwd): what `status` shows when no config exists."""
    return from_file_model(MoectlFile(), None, Path(root or Path.cwd()))


TEMPLATE = """\
# moectl configuration (SPEC §3). Every value below is the default; edit what you need.
# Unknown keys are errors, so a typo never silently does nothing.

[project]
name = "moe"                 # prefix of experiment directory names: <YYYYmmdd_HHMMSS>_<name>-<tag>
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
# args = []                  # always passed to the trainer, before the mapped options
nproc_per_node = "auto"      # auto = number of selected GPUs (cuda) or 1 (cpu)
env = { OMP_NUM_THREADS = "1" }
compile_fallback = true      # a compile failure re-runs the leg with --compile none
# [launch.options]           # another trainer: moectl run option -> its flag ("{}" is the value)
# steps = "--max_iters={}"   # (`moectl init --trainer nanochat|nanogpt` writes a starting point)

[metrics]
window = 50                  # the tail window of every summary: its last `window` steps ...
warmup_steps = 10            # ... after steps 0-9 (compile / warm-up), which no summary counts
# source = "jsonl"           # "jsonl": the engine's metrics.jsonl | "stdout": parse the trainer's output

[report]
summary = true               # run/sweep refresh EXPERIMENTS.md

[defaults]                   # engine options for every run unless given on the command line
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
rdzv_port = 29500            # the rendezvous port on the first node
# partition = "gpu"
# account = "my-team"
# time = "02:00:00"          # sbatch --time
# gpus_per_node = 8
# cpus_per_task = 16
# max_parallel = 4           # sweep legs in flight at once (default: all)
# extra_sbatch = ["--qos=high"]   # raw #SBATCH options
"""


TRAINERS = ("engine", "nanochat", "nanogpt")


def template_for(trainer: str = "engine") -> str:
    """TEMPLATE with the `[launch]`/`[metrics]` tables of a known trainer (moectl.trainer.TABLES)."""
    if trainer not in TRAINERS:
        raise UsageError(f"--trainer: unknown trainer {trainer!r} (known: {', '.join(TRAINERS)})")
    if trainer == "engine":
        return TEMPLATE
    from moectl.trainer import TABLES

    start, end = TEMPLATE.index("[launch]\n"), TEMPLATE.index("[report]\n")
    return TEMPLATE[:start] + TABLES[trainer] + "\n" + TEMPLATE[end:]


def write_template(directory: Path, trainer: str = "engine") -> Path:
    """`moectl init`: write the commented template; refuse (exit 2) if a config already exists."""
    text = template_for(trainer)
    target = Path(directory) / CONFIG_NAME
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise UsageError(f"{target} already exists; not overwriting it "
                         f"(`moectl init --force` replaces it and keeps the old one as {CONFIG_NAME}.bak)") from None
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    return target


def overwrite_template(directory: Path, trainer: str = "engine") -> tuple[Path, Optional[Path]]:
    """`moectl init --force`: write the template over an existing config, first copying the old
    one byte for byte to `.moectl.toml.bak` - or `.bak.1`, `.bak.2`, ... when that exists, so no
    earlier backup is ever overwritten. The new file replaces the old one in one rename: a reader
    sees the old config or the new one, never a missing or half-written file. Returns (config
    written, backup or None when there was nothing to back up)."""
    import stat

    from moectl.records import atomic_file

    text = template_for(trainer)
    target = Path(directory) / CONFIG_NAME
    try:
        old = target.read_bytes()
        mode = stat.S_IMODE(target.stat().st_mode)
    except FileNotFoundError:
        return write_template(directory, trainer), None
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
