"""`.moectl.toml`'s schema (SPEC §3): the pydantic models and their one-line-per-field errors.

Only what validates a config file lives here, so that reading a config that was validated before
(moectl/config.py's `read_config`, used by `status` and `runs`) never imports pydantic.
"""
from __future__ import annotations

import math
import shlex
import sys
from types import SimpleNamespace
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from engine.config import COMPILE_MODES
from engine.schema import ENGINE_MODULE, ENGINE_OPTIONS
from moectl.config import CONFIG_NAME, DEFAULT_ARTIFACT_ROOT, launch_target
from moectl.errors import UsageError
from moectl.metrics import DEFAULT_WARMUP_STEPS
from moectl.plan import sanitize_tag
from moectl.trainer import MAPPABLE, follows_engine_contract

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib


class _Strict(BaseModel):
    # strict: TOML already gives real types, so a value of the wrong type is an error, never
    # coerced (`require_no_processes = "off"` would otherwise be False: a guard weakened by a
    # string). A float field still takes an int (`max_util_pct = 5`); nothing else converts.
    # TOML has nan and inf: no threshold means anything as either (`min_free_gib = inf` refuses
    # every run, nan compares false with everything).
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class ProjectSection(_Strict):
    name: str = Field("moe", min_length=1)
    branch: str = Field("main", min_length=1)  # "*" disables the branch check
    venv: str = ".venv"  # "" = the interpreter running moectl

    @field_validator("name")
    @classmethod
    def _one_path_component(cls, v):
        # The name is part of every run id and so of a directory name (moectl/plan.py): the rule
        # of run tags and sweep names, or `team/moe` would nest runs where `runs` never looks.
        if sanitize_tag(v) != v:
            raise ValueError(f"{v!r} is not usable in a directory name (use letters, digits, . _ -)")
        return v


class PathsSection(_Strict):
    artifact_root: str = Field(DEFAULT_ARTIFACT_ROOT, min_length=1)
    report_dir: str = Field("reports", min_length=1)
    read_only: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)  # "" would be the whole repository
    min_free_gib: float = Field(1.0, ge=0)  # the disk guard's threshold


class GpuSection(_Strict):
    max_util_pct: float = Field(5, ge=0, le=100)
    max_mem_mib: float = Field(1024, ge=0)
    require_no_processes: bool = True
    devices: Union[Literal["all"], list[int]] = "all"

    @field_validator("devices", mode="plain")
    @classmethod
    def _indices(cls, v):
        # plain: one message for the field (a Union would report each of its members apart).
        if v == "all":
            return v
        if not isinstance(v, list) or not all(type(i) is int for i in v):
            raise ValueError(f"must be \"all\" or a list of integer indices, not {v!r}")
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

    @field_validator("module")
    @classmethod
    def _not_a_file_name(cls, v):
        if v is not None and v.endswith(".py"):  # `train.py` names a file: `python -m train.py` fails
            raise ValueError(f"{v!r} is a file name, not a module: use script = {v!r} (or module = {v[:-3]!r})")
        return v

    @model_validator(mode="before")
    @classmethod
    def _module_or_script(cls, data):
        if isinstance(data, dict) and data.get("script") is not None:
            if data.get("module") is not None:
                raise ValueError("give exactly one of module and script, not both")
            data = {**data, "module": None}
        return data

    @field_validator("env")
    @classmethod
    def _environment(cls, v):
        # What the kernel takes: a name without "=" or NUL, a value without NUL (else the launch
        # fails after the run directory exists: "illegal environment variable name").
        for name, value in v.items():
            if not name or "=" in name or "\0" in name:
                raise ValueError(f"{name!r} is not an environment variable name (no '=', no NUL, not empty)")
            if "\0" in value:
                raise ValueError(f"{name}: the value holds a NUL byte, which no environment variable can")
        return v

    @field_validator("nproc_per_node", mode="plain")
    @classmethod
    def _positive(cls, v):
        # plain: one message for the field (a Union would report each of its members apart).
        if v != "auto" and (type(v) is not int or not 1 <= v <= 1024):  # moectl.plan.MAX_NPROC
            raise ValueError(f"must be \"auto\" or an integer from 1 to 1024, not {v!r}")
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

    @model_validator(mode="after")
    def _one_python_process(self):
        if self.launcher == "python" and self.nproc_per_node not in ("auto", 1):
            raise ValueError(f'nproc_per_node = {self.nproc_per_node}: launcher = "python" runs one process '
                             '(use launcher = "torchrun" for more)')
        return self

    @property
    def target(self) -> str:
        """What runs: the module name or the script path (process detection, messages)."""
        return launch_target(self.module, self.script)


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
            check_patterns(self.step, self.tokens_per_step, self.patterns, sep="\n")  # one line each
            return self
        if self.format is None:
            raise ValueError('source = "stdout" needs format = "nanochat" or "regex"')
        if self.format == "regex" and self.step is None:
            raise ValueError('format = "regex" needs step = \'<regex whose group is the step number>\'')
        if self.format == "nanochat" and self.step is not None:
            raise ValueError('step is only for format = "regex" (nanochat\'s step line is built in)')
        check_patterns(self.step, self.tokens_per_step, self.patterns, sep="\n")
        return self


class ReportSection(_Strict):
    summary: bool = True  # run/sweep refresh EXPERIMENTS.md


class DefaultsSection(BaseModel):
    """Options applied to every run. The options moectl itself understands are type-checked here;
    any other key is checked by `defaults_problems` (below), which knows the trainer: for the
    engine, one of its options (engine.schema.ENGINE_OPTIONS) of the right type; for any trainer,
    one value (a string, number or boolean) that becomes one flag."""

    # (no nan or inf for the fields here either: `cap = inf` passed `check` and failed the run)
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    preset: Optional[str] = None
    cap: Optional[float] = Field(None, ge=0)
    steps: Optional[int] = Field(None, gt=0)
    compile: Optional[Literal["static", "dynamic", "none"]] = None
    fp8: Optional[bool] = None
    dispatch: Optional[Literal["auto", "padded", "grouped", "loop"]] = None
    device: Optional[Literal["auto", "cuda", "cpu"]] = None
    dense: Optional[bool] = None
    balance: Optional[Literal["loss", "bias", "none"]] = None
    balance_rate: Optional[float] = Field(None, gt=0)
    ep: Optional[int] = Field(None, ge=1)
    seed: Optional[int] = None
    # The engine's own options (depth, n_experts, dtype, ...) are not fields: for engine.train
    # `defaults_problems` checks them (ENGINE_OPTIONS and ENGINE_LIMITS), while for another
    # trainer the same names are that trainer's flags, with its values (nanoGPT's dtype = "bfloat16").

    @model_validator(mode="before")
    @classmethod
    def _underscores(cls, data):
        # TOML may spell engine options as on the command line (n-experts); validate one spelling,
        # and say so when both are there (one would silently win).
        if isinstance(data, dict):
            out: dict = {}
            for k, v in data.items():
                key = str(k).replace("-", "_")
                if key in out:
                    raise ValueError(f"{key} is given twice ({key} and {key.replace('_', '-')}); keep one")
                out[key] = v
            return out
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

    @field_validator("mlflow_uri", "mlflow_experiment", "wandb_project", "wandb_entity")
    @classmethod
    def _not_blank(cls, v):
        if v is not None and (not v.strip() or v != v.strip()):
            raise ValueError(f"{v!r}: blank, or with spaces around it (a directory named '   ' is no store)")
        return v

    @field_validator("mlflow_uri")
    @classmethod
    def _uri(cls, v):
        from urllib.parse import urlsplit

        scheme = v.split("://", 1)[0].lower() if "://" in v else None
        if v.startswith("file:"):  # a directory: relative to this file, ~ expanded, like every path here
            where = urlsplit(v)
            if where.netloc not in ("", "localhost"):
                raise ValueError(f"{v!r} names the host {where.netloc!r}: a file: store is file:///ABS/DIR, "
                                 "file:DIR (relative to this file) or file:~/DIR")
            if not where.path:
                raise ValueError(f"{v!r} names no directory")
        if scheme in ("http", "https") and not urlsplit(v).hostname:
            raise ValueError(f"{v!r} names no host (e.g. http://127.0.0.1:5000)")
        # What MLflow's tracking client stores into; anything else would fail at every mirror, and
        # `moectl sync` could never retry it into success.
        known = ("http", "https", "file", "sqlite", "postgresql", "mysql", "mssql", "databricks", "databricks-uc")
        base = scheme.split("+", 1)[0] if scheme else None
        if base is not None and base not in known:
            raise ValueError(f"{v!r}: MLflow cannot track to {scheme}:// (use http(s)://, sqlite:///FILE, "
                             "a database URL, file:// or a directory)")
        if base == "sqlite" and not v.split("://", 1)[1].lstrip("/"):
            raise ValueError(f"{v!r} names no database file (sqlite:///FILE)")
        if base == "sqlite" and not v.split("://", 1)[1].startswith("/"):
            raise ValueError(f"{v!r}: a sqlite store is sqlite:///FILE (relative to this file) or sqlite:////ABS/FILE")
        # (Databricks' `databricks://SCOPE:PREFIX` names a secret scope, not a host and port.)
        if base is not None and base not in ("sqlite", "file", "databricks", "databricks-uc"):
            try:
                port = urlsplit(v).port
            except ValueError:
                port = 0
            if port == 0:
                raise ValueError(f"{v!r}: the port is not a number from 1 to 65535")
        if base is None and not v.startswith("file:"):
            # A directory store, then - unless it reads as something else that was meant.
            first = v.split("/", 1)[0]
            if ":" in first:
                prefix = first.split(":", 1)[0].lower()
                if prefix.split("+", 1)[0] in known:
                    raise ValueError(f"{v!r}: {prefix}: without // (e.g. http://HOST:PORT, sqlite:///FILE); "
                                     f"for a directory named so write ./{v}")
                raise ValueError(f"{v!r} reads as a server without its scheme: write http://{v} for a tracking "
                                 f"server, or ./{v} for a directory")
            if v.lower() in ("databricks", "databricks-uc"):
                raise ValueError(f"{v!r} is Databricks to MLflow but would be a directory here: write "
                                 f"{v}://PROFILE for Databricks, or ./{v} for a directory")
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


# Slurm's --time formats: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS, and no limit at all.
_SLURM_TIME = r"^(\d+-\d{1,2}(:\d{1,2}){0,2}|\d+(:\d{1,2}){0,2}|(?i:unlimited|infinite))$"


class ClusterSection(_Strict):
    """Where runs execute (moectl/execution.py): this machine, or Slurm jobs (moectl/slurm.py)."""

    backend: Literal["local", "slurm"] = "local"
    # one partition, or several (Slurm starts the job in whichever can run it first)
    partition: Optional[str] = Field(None, min_length=1, pattern=r"^[^\s,]+(,[^\s,]+)*$")
    account: Optional[str] = Field(None, min_length=1, pattern=r"^\S+$")
    time: Optional[str] = None  # sbatch --time, e.g. "02:00:00"
    nodes: int = Field(1, ge=1)
    gpus_per_node: Optional[int] = Field(None, ge=0)
    cpus_per_task: Optional[int] = Field(None, ge=1)
    max_parallel: Optional[int] = Field(None, ge=1)  # sweep legs in flight at once; None = all
    # torchrun's c10d rendezvous on the first node: a job meets at rdzv_port + (job id mod 1000)
    # (slurm.rendezvous_port), so the whole span must be ports.
    rdzv_port: int = Field(29500, ge=1024, le=65535 - 999)
    extra_sbatch: list[str] = Field(default_factory=list)  # raw #SBATCH options, e.g. "--qos=high"

    @field_validator("time")
    @classmethod
    def _slurm_time(cls, v):
        import re

        if v is not None and not re.match(_SLURM_TIME, v):
            raise ValueError(f"{v!r} is not a Slurm time limit (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM:SS, UNLIMITED)")
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


def _field_lines(name: str, exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        said = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        for msg in said.split("\n"):  # a section's check of several keys: one line each
            # A section's own check names the key it is about (`patterns.loss: ...`): one dotted path.
            loc = where
            head, sep, rest = msg.partition(": ")
            if sep and loc and " " not in head and head.replace(".", "").replace("_", "").isalnum():
                loc, msg = f"{loc}.{head}", rest
            lines.append(f"{name}: {loc}: {msg}")
    return lines


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
# Engine options moectl sets for every run itself: a default for them would be overridden unseen.
_SET_BY_MOECTL = ("out_dir", "ckpt_dir")
# Values engine.train refuses at launch (after the run directory exists), checked before it. The
# options `moectl run` has flags for (cap, steps, ...) are DefaultsSection fields, checked there.
ENGINE_LIMITS: dict[str, tuple[str, Any]] = {
    **{k: ("greater than 0", lambda v: v > 0) for k in (
        "depth", "aspect_ratio", "head_dim", "n_experts", "top_k", "moe_freq", "seq_len", "device_batch_size",
        "total_batch_size")},
    "vocab_size": ("2 or more", lambda v: v >= 2),
    "eval_every": ("-1 (never), 0 (at the end) or more", lambda v: v >= -1),
    **{k: ("0 or more", lambda v: v >= 0) for k in ("balance_coeff", "z_coeff", "grad_clip", "warmdown_frac")},
    "dtype": ("one of bf16, fp32", lambda v: v in ("bf16", "fp32")),
    "compile_mode": (f"one of {', '.join(COMPILE_MODES)}", lambda v: v in COMPILE_MODES),
}


def _is(value: Any, kind: type) -> bool:
    """`value` is a TOML value of `kind`, by the schema's strict rule (a float may be an int)."""
    if kind is float:
        return type(value) in (int, float)
    return type(value) is kind


def _table(data: Any, key: str) -> dict:
    value = data.get(key, {}) if isinstance(data, dict) else {}
    return value if isinstance(value, dict) else {}


def _trains_the_engine(data: dict) -> bool:
    """The raw file's trainer is engine.train under its own contract (moectl/trainer.py)."""
    launch, metrics = _table(data, "launch"), _table(data, "metrics")
    script = launch.get("script")
    module = None if script is not None else launch.get("module", ENGINE_MODULE)
    contract = SimpleNamespace(script=script, options=launch.get("options"))
    return module == ENGINE_MODULE and follows_engine_contract(contract, SimpleNamespace(
        source=metrics.get("source", "jsonl")))


def defaults_problems(data: dict) -> dict[str, str]:
    """`[defaults]` keys the models leave open, checked against the trainer (the launch table of
    the same file): {dotted key: why}. Each becomes `--key value` or a mapped flag, so it must be
    one value; for engine.train it must also be one of its options, of that option's type - else
    the engine would refuse it only after the run directory exists. Another trainer's keys are
    its own (each must be mapped in [launch.options]; moectl/trainer.py refuses one that is not)."""
    engine = _trains_the_engine(data)
    problems = {}
    for raw_key, value in _table(data, "defaults").items():
        key = str(raw_key).replace("-", "_")
        if key in DefaultsSection.model_fields:
            continue  # typed: pydantic has judged it
        if key in _SET_BY_MOECTL:
            why = "set by moectl for every run (the run directory); not a default"
        elif engine and key not in ENGINE_OPTIONS:
            why = f"unknown engine option (known: {', '.join(k for k in ENGINE_OPTIONS if k not in _SET_BY_MOECTL)})"
        elif not any(_is(value, kind) for kind in (bool, int, float, str)):
            why = f"must be one string, number or true/false (one flag's value), not {type(value).__name__} {value!r}"
        elif engine and not _is(value, ENGINE_OPTIONS[key]):
            why = f"must be {_TYPE_WORDS[ENGINE_OPTIONS[key]]} (engine option --{key.replace('_', '-')}), not {value!r}"
        elif engine and key in ENGINE_LIMITS and not ENGINE_LIMITS[key][1](value):
            why = f"must be {ENGINE_LIMITS[key][0]} (engine option --{key.replace('_', '-')}), not {value!r}"
        elif engine and isinstance(value, float) and not math.isfinite(value):  # TOML has nan and inf
            why = f"must be a finite number (engine option --{key.replace('_', '-')}), not {value!r}"
        else:
            continue
        problems[f"defaults.{key}"] = why
    return problems


def launch_option_problems(data: dict) -> dict[str, str]:
    """`[launch.options]` keys that no option moectl hands a trainer could ever use: a typo
    (`stesp`) would otherwise map nothing while `--steps` is refused as unmapped."""
    options = _table(_table(data, "launch"), "options")
    known = {*MAPPABLE, *(str(k).replace("-", "_") for k in _table(data, "defaults"))}
    problems = {}
    for raw_key, template in options.items():
        key = str(raw_key).replace("-", "_")
        if key not in known:
            problems[f"launch.options.{key}"] = (f"unknown option (known: {', '.join(MAPPABLE)}, "
                                                 "or a key of [defaults])")
        elif isinstance(template, str):
            try:  # split as a run splits it, so a stray quote is this key's problem now, not a run's
                shlex.split(template.replace("{}", "x"))
            except ValueError as exc:
                problems[f"launch.options.{key}"] = f"{template!r} cannot be split into arguments: {exc}"
    return problems


def parse_config_text(text: str, name: str = CONFIG_NAME) -> MoectlFile:
    """Validate TOML text; UsageError with one line per bad field (or the TOML line number).
    The models judge each section alone; the keys whose meaning depends on another section
    (`[defaults]` on the trainer, `[launch.options]` on `[defaults]`) are judged after, and a
    field the models already reported is not reported twice."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{name}: malformed TOML: {exc}") from None
    model, lines = None, []
    try:
        model = MoectlFile.model_validate(data)
    except ValidationError as exc:
        lines = _field_lines(name, exc)
    reported = {line.split(": ")[1] for line in lines}
    for key, why in {**launch_option_problems(data), **defaults_problems(data)}.items():
        if key not in reported:
            lines.append(f"{name}: {key}: {why}")
    if lines:
        raise UsageError(f"invalid config {name} ({len(lines)} problem(s))", lines=lines)
    return model

