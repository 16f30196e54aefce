"""What a run will do, decided before anything happens (pure: no I/O, no clock, no probes).

    request = RunRequest(cap=1.0, compile="static", device="cpu")
    plan = plan_run(cfg, request, now=datetime.now(), gpus_available=None)
    plan.argv            # [python, -m, torch.distributed.run, --standalone, --nproc-per-node, 1,
                         #  -m, engine.train, --preset, tiny, --cap, 1.0, ..., --out-dir, <exp_dir>, ...]
    command_text(plan)   # the same, as one copy-pasteable shell line

Engine options: config `[defaults]` < explicit flags. The guards judge the plan; launch runs it.
"""
from __future__ import annotations

import math
import os
import re
import shlex
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from engine.schema import DEFAULT_PRESET, ENGINE_MODULE, ENGINE_OPTIONS, PRESET_EXPERTS, PRESET_NAMES
from moectl.config import CONFIG_NAME, Config, current_dir
from moectl.errors import UsageError
from moectl.trainer import (RANK_PREFIX_ENV, RANK_PREFIX_TEMPLATE, RUN_OPTIONS, fold_engine_args,
                            follows_engine_contract, ranks_prefixed, trainer_argv)

# Only these guards may be skipped knowingly (SPEC §5); the path guard never.
OVERRIDABLE = ("gpus_idle", "no_other_training")
GUARD_NAMES = ("config", "git", "venv", "paths", "fresh_dir", "gpus_idle", "no_other_training", "disk")

RUN_FILES = ("run.json", "command.txt", "git.diff", "train.log", "metrics.jsonl")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, option: str = "--wait-gpus") -> float:
    """`30m`, `90s`, `2h`, `1.5h`, `45` (seconds) -> seconds. UsageError naming `option` otherwise."""
    m = _DURATION.match(str(text))
    if not m:
        raise UsageError(f"{option}: cannot read duration {text!r}; use e.g. 90s, 30m, 2h")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


NAME_MAX = 255  # bytes in one path component on Linux filesystems


def sanitize_tag(tag: str) -> str:
    """Keep a tag usable in a directory name: [A-Za-z0-9._-], runs of anything else -> '_'."""
    clean = re.sub(r"[^A-Za-z0-9._-]+", "_", tag)
    clean = re.sub(r"\.{2,}", "_", clean)  # no `..` in a name that becomes a path component
    clean = re.sub(r"_{2,}", "_", clean).strip("_")
    return clean.lstrip(".-") or "run"  # nor a leading `-`: `moectl show -x` would read it as an option


def _fmt_num(x: float) -> str:
    return repr(float(x)).replace(".", "p").replace("-", "m")


# Processes per node. More than any node has GPUs or cores for; a typo of more would fork that many.
MAX_NPROC = 1024


class RunRequest(BaseModel):
    """The options of `moectl run` / `check` (None = not given: config defaults apply)."""

    # inf passes every `ge=0`: `--cap inf` reached the engine, which refused it after the run's
    # directory existed (and a sweep's leg was left `running`).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    tag: Optional[str] = None
    cap: Optional[float] = Field(None, ge=0)
    compile: Optional[Literal["static", "dynamic", "none"]] = None
    fp8: Optional[bool] = None
    dispatch: Optional[Literal["auto", "padded", "grouped", "loop"]] = None
    balance: Optional[Literal["loss", "bias", "none"]] = None
    balance_rate: Optional[float] = Field(None, gt=0)
    ep: Optional[int] = Field(None, ge=1)
    steps: Optional[int] = Field(None, gt=0)
    seed: Optional[int] = None
    preset: Optional[str] = None
    device: Optional[Literal["auto", "cuda", "cpu"]] = None
    nproc: Optional[int] = Field(None, ge=1, le=MAX_NPROC)
    exp_dir: Optional[str] = None
    no_commit: bool = False
    wait_gpus: Optional[str] = None
    overrides: list[str] = Field(default_factory=list)
    extra_args: list[str] = Field(default_factory=list)
    notes: Optional[str] = None
    parent_dir: Optional[str] = None  # sweep legs: the run directory goes inside this one
    group: Optional[str] = None  # a repeat group's id (moectl.repeats) ...
    repeat: Optional[int] = Field(None, ge=1)  # ... and this run's place in it (1..N)

    @field_validator("overrides")
    @classmethod
    def _overridable(cls, names: list[str]) -> list[str]:
        for n in names:
            if n not in GUARD_NAMES:
                raise ValueError(f"unknown guard {n!r}; overridable guards: {', '.join(OVERRIDABLE)}")
            if n not in OVERRIDABLE:
                raise ValueError(f"guard {n!r} cannot be overridden; only {', '.join(OVERRIDABLE)}")
        return list(dict.fromkeys(names))

    @field_validator("exp_dir")
    @classmethod
    def _exp_dir(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not v.strip():
            raise ValueError("an empty path; give a new directory inside artifact_root, or leave it out")
        return v

    @field_validator("wait_gpus")
    @classmethod
    def _duration(cls, v: Optional[str]) -> Optional[str]:
        if v is not None:
            try:
                parse_duration(v)
            except UsageError as exc:
                raise ValueError(exc.message.split(": ", 1)[1]) from None
        return v

    @property
    def wait_gpus_s(self) -> Optional[float]:
        return parse_duration(self.wait_gpus) if self.wait_gpus is not None else None


def make_request(**kwargs: Any) -> RunRequest:
    """RunRequest from CLI values; bad values -> UsageError, one line per option (`--cap: ...`)."""
    try:
        return RunRequest(**kwargs)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            opt = "--" + str(err["loc"][0]).replace("_", "-") if err["loc"] else "option"
            opt = {"--overrides": "--override", "--extra-args": "engine args"}.get(opt, opt)
            lines.append(f"{opt}: {err['msg'].removeprefix('Value error, ')}")
        if len(lines) == 1:
            raise UsageError(lines[0]) from None
        raise UsageError("invalid options", lines) from None


class RunPlan(BaseModel):
    run_id: str
    tag: str
    created_at: str  # ISO time the id was made from
    exp_dir: str
    explicit_exp_dir: bool = False  # named by --exp-dir (the path guard wants it directly in artifact_root)
    ckpt_dir: str
    files: dict[str, str]  # run.json, command.txt, git.diff, train.log, metrics.jsonl -> path
    options: dict[str, Any]  # engine options after merging defaults and flags
    engine_argv: list[str]
    python: str
    nproc: int
    device: Literal["cuda", "cpu"]
    argv: list[str]  # the full command
    env: dict[str, str]  # additions to the environment
    selected_gpus: Optional[list[int]] = None  # None = all visible
    overrides: list[str] = Field(default_factory=list)
    wait_gpus_s: Optional[float] = None
    no_commit: bool = False
    notes: Optional[str] = None
    window: int = 50
    warmup_steps: int = 0  # steps 0 .. warmup_steps-1 stay out of the summary (config metrics)
    group: Optional[str] = None
    repeat: Optional[int] = None


def default_tag(options: dict[str, Any]) -> str:
    """A tag that says what differs: tiny_cap1p0_static, d12-moe_cap0p0_none_fp8, ..."""
    parts = [str(options.get("preset", "run"))]
    if options.get("cap") is not None:
        parts.append("cap" + _fmt_num(options["cap"]))
    if options.get("compile"):
        parts.append(str(options["compile"]))
    if options.get("fp8"):
        parts.append("fp8")
    if options.get("dispatch") not in (None, "auto"):
        parts.append(str(options["dispatch"]))
    if options.get("dense"):
        parts.append("dense")
    if options.get("balance") not in (None, "loss"):
        parts.append("bal" + str(options["balance"]))
    if options.get("ep") not in (None, 1):
        parts.append(f"ep{options['ep']}")
    return "_".join(parts)


def _check_folded(folded: dict[str, Any]) -> None:
    """Values that came from after `--` into the options get the checks they would have had as
    `moectl run` options or [defaults] keys (the engine would refuse them only after the run
    directory exists): `-- --cap=-1` is as wrong as `--cap -1`."""
    from moectl.config_schema import ENGINE_LIMITS

    own = {k: v for k, v in folded.items() if k in RUN_OPTIONS}
    if own:
        try:
            make_request(**own)
        except UsageError as exc:
            raise UsageError(f"-- {exc.message}", exc.lines) from None
    for key, value in folded.items():
        flag = f"-- --{key.replace('_', '-')}"
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"{flag}: must be a finite number, not {value!r}")
        if key not in own and key in ENGINE_LIMITS and not ENGINE_LIMITS[key][1](value):
            raise UsageError(f"{flag}: must be {ENGINE_LIMITS[key][0]}, not {value!r}")
        if key == "resume" and value == "latest":
            raise UsageError(f"{flag} latest: this run's checkpoint directory is new and empty; give the checkpoint "
                             "file (or directory) of the run to continue")
        if key == "resume" and not Path(os.path.expanduser(str(value))).exists():
            raise UsageError(f"{flag} {value}: no such checkpoint")


def plan_run(cfg: Config, request: RunRequest, now: datetime, gpus_available: Optional[int],
             nodes: Optional[int] = 1, data_here: bool = True) -> RunPlan:
    """Decide ids, directories, options and the exact command. `gpus_available`: GPUs in the NVML
    reading (None when NVML is unavailable); device `auto` means cuda only when there are some.
    `nodes`: how many nodes the run spans (its world size is nproc x nodes; None: not known here,
    so `--ep` is not checked against it)."""
    options = cfg.defaults.options()
    device_default = options.pop("device", None)
    is_engine = cfg.launch.module == ENGINE_MODULE and follows_engine_contract(cfg.launch, cfg.metrics)
    launch_args: list[str] = []
    if follows_engine_contract(cfg.launch, cfg.metrics) and cfg.launch.args:
        # `[launch] args` of the engine's contract are its flags: folded into the options above
        # [defaults] and below the command line, so they are checked and recorded (they were dropped).
        try:
            launch_args, options = fold_engine_args(list(cfg.launch.args), options, set(),
                                                    ENGINE_OPTIONS if is_engine else None)
        except UsageError as exc:
            raise UsageError("[launch] args: " + exc.message.removeprefix("-- ")) from None
    explicit = [key for key in RUN_OPTIONS if getattr(request, key) is not None]
    for key in explicit:
        options[key] = getattr(request, key)
    extra, from_extra = launch_args + list(request.extra_args), {}
    if follows_engine_contract(cfg.launch, cfg.metrics):
        before = dict(options)
        extra, options = fold_engine_args(extra, options, set(explicit), ENGINE_OPTIONS if is_engine else None)
        from_extra = {k: v for k, v in options.items() if k not in before or before[k] != v}
        _check_folded(from_extra)

    preset = options.get("preset")
    if is_engine and preset is not None and preset not in PRESET_NAMES:
        # The engine would reject it only after torchrun started and a run directory was made.
        where = "--preset" if request.preset is not None else "-- --preset" if "preset" in from_extra else "defaults.preset"
        raise UsageError(f"{where}: unknown preset {preset!r}; the engine has {', '.join(PRESET_NAMES)}")
    ep = options.get("ep")
    # where the value came from, as a refusal names it (the [defaults] key is no command-line flag)
    ep_said = (f"--ep {ep}" if request.ep is not None or "ep" in from_extra
               else f"[launch] args --ep {ep}" if "--ep" in cfg.launch.args else f"[defaults] ep = {ep}")
    if is_engine and ep and ep > 1:
        # The engine would refuse it too, but only after torchrun started in a new run directory.
        n_experts = options.get("n_experts") or PRESET_EXPERTS[preset or DEFAULT_PRESET]
        if n_experts % ep:
            source = "n_experts" if options.get("n_experts") else f"preset {preset or DEFAULT_PRESET}"
            raise UsageError(f"{ep_said}: does not divide the {n_experts} experts ({source}); "
                             "each rank holds n_experts / ep of them")
    if is_engine:
        # The model the engine would build from these options, checked by the engine's own rules
        # (torch-free) before a run directory exists: `-- --top-k 9` beside 4 experts, a --head-dim
        # that does not divide the width.
        from engine.config import check_data_options, check_model_options

        try:
            check_model_options(options)
            if data_here:  # a Slurm job reads its --data on its node, from its code snapshot: the job's to judge
                check_data_options(options, cfg.root)  # the engine runs from the repository root
        except (ValueError, TypeError, OverflowError) as exc:
            raise UsageError(f"engine options: {exc}") from None

    device = request.device or device_default or "auto"
    if device == "auto":
        device = "cuda" if gpus_available else "cpu"

    devices = cfg.gpu.devices
    selected = list(devices) if isinstance(devices, list) else None
    if request.nproc is not None:
        nproc = request.nproc
    elif isinstance(cfg.launch.nproc_per_node, int):
        nproc = cfg.launch.nproc_per_node
    elif cfg.launch.launcher == "python":
        nproc = 1  # `auto` of a plain python trainer: its one process, however many GPUs are free
    elif device == "cuda":
        nproc = len(selected) if selected is not None else max(1, gpus_available or 0)
    else:
        nproc = 1
    if is_engine and device == "cuda" and selected is not None and nproc > len(selected):
        # Each engine rank takes the GPU of its local rank among those CUDA_VISIBLE_DEVICES shows: a
        # rank past them fails at start ("invalid device ordinal") in a new run directory.
        raise UsageError(f"--nproc {nproc}: [gpu] devices selects {len(selected)} GPU(s) ({selected}), and the engine "
                         "runs one process per GPU; give --nproc at most that, or select more devices")
    if is_engine and ep and ep > 1 and nodes is not None and (nproc * nodes) % ep:
        # The engine would refuse it too, but only after torchrun started in a new run directory.
        ranks = f"--nproc {nproc}" + (f" x {nodes} nodes" if nodes > 1 else "")
        raise UsageError(f"{ep_said}: does not divide the world size {nproc * nodes} ({ranks}); "
                         "each group of ep ranks splits the experts, so give --nproc a multiple of it")

    if request.tag is not None and sanitize_tag(request.tag) != request.tag:
        # Said, not silently rewritten: `show`/`compare` must find the run by the tag that was given
        # (and an empty one is no tag: it was quietly the default).
        rule = ("use letters, digits, . _ -; not first . or -; no `..`" if request.tag.strip()
                else "an empty tag names nothing; leave --tag out for the default")
        raise UsageError(f"--tag {request.tag!r}: not usable in a directory name ({rule}), "
                         f"e.g. --tag {sanitize_tag(request.tag if request.tag.strip() else default_tag(options))}")
    tag = request.tag or sanitize_tag(default_tag(options))
    run_id = f"{now:%Y%m%d_%H%M%S}_{cfg.project.name}-{tag}" + (f"-r{request.repeat}" if request.repeat else "")
    if len(run_id.encode()) > NAME_MAX:
        # the tag given, or else what makes the name long: the project's name (the default tag is short)
        who = "--tag" if request.tag or len(cfg.project.name) <= len(tag) else "[project] name"
        raise UsageError(f"{who}: the run directory name would be {len(run_id.encode())} bytes, over the "
                         f"filesystem's {NAME_MAX}; use a shorter {'tag' if who == '--tag' else 'project name'}")
    if request.exp_dir:
        # Kept as given (only made absolute, `..` and symlinks intact) so the path guard judges it.
        given = Path(os.path.expanduser(request.exp_dir))
        exp_dir = given if given.is_absolute() else current_dir() / given
        run_id = exp_dir.name  # runs/show/compare know a run by its directory's name
        if run_id and run_id not in (".", "..") and sanitize_tag(run_id) != run_id:
            # its name is the run id: the rule of tags (a `.x` is hidden from the store, `a b` needs quoting)
            raise UsageError(f"--exp-dir {request.exp_dir}: its name {run_id!r} becomes the run id; use letters, "
                             f"digits, . _ - (not first), e.g. {sanitize_tag(run_id)}")
        if len(run_id.encode()) > NAME_MAX:
            raise UsageError(f"--exp-dir: its name is {len(run_id.encode())} bytes, over the filesystem's {NAME_MAX}")
    elif request.parent_dir:
        exp_dir = Path(request.parent_dir) / run_id
    else:
        exp_dir = cfg.artifact_root / run_id
    ckpt_dir = exp_dir / "ckpt_root"

    python = str(cfg.python) if cfg.project.venv != "" else sys.executable
    argv, engine_argv = trainer_argv(cfg.launch, cfg.metrics, options, device=device, exp_dir=str(exp_dir),
                                     ckpt_dir=str(ckpt_dir), nproc=nproc, python=python,
                                     extra=extra, config=cfg.path.name if cfg.path else CONFIG_NAME, nodes=nodes)

    env = dict(cfg.launch.env)
    if not follows_engine_contract(cfg.launch, cfg.metrics):
        env["MOECTL_RUN_DIR"] = str(exp_dir)  # where a foreign trainer may write its own files
    if ranks_prefixed(cfg.launch, cfg.metrics, nproc, nodes):
        env[RANK_PREFIX_ENV] = RANK_PREFIX_TEMPLATE  # (the parser reads this prefix: not the user's to change)
    if device == "cpu":
        # No GPU for a cpu run: gpus_idle was not checked for it, and a trainer that picks cuda by
        # itself (nanochat, nanoGPT, where `device` is not mapped) would land on busy, shared GPUs.
        env["CUDA_VISIBLE_DEVICES"] = ""
    elif selected is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in selected)

    return RunPlan(
        run_id=run_id,
        tag=tag,
        created_at=now.isoformat(timespec="seconds"),
        exp_dir=str(exp_dir),
        explicit_exp_dir=bool(request.exp_dir),
        ckpt_dir=str(ckpt_dir),
        files={name: str(exp_dir / name) for name in RUN_FILES},
        options={**options, "device": device, "nproc": nproc},
        engine_argv=engine_argv,
        python=python,
        nproc=nproc,
        device=device,
        argv=argv,
        env=env,
        selected_gpus=selected,
        overrides=list(request.overrides),
        wait_gpus_s=request.wait_gpus_s,
        no_commit=request.no_commit,
        notes=request.notes,
        window=cfg.metrics.window,
        warmup_steps=cfg.metrics.warmup_steps,
        group=request.group,
        repeat=request.repeat,
    )


def command_text(plan: RunPlan) -> str:
    """One copy-pasteable shell line: env additions, then the exact argv."""
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in plan.env.items())
    cmd = " ".join(shlex.quote(a) for a in plan.argv)
    return f"{env} {cmd}" if env else cmd


def command_file_text(plan: RunPlan, cwd) -> str:
    """command.txt: the command from the directory it ran in (the repository root, or a Slurm
    job's code snapshot), so it works pasted from anywhere: a module or a relative script path is
    found from there."""
    return f"cd {shlex.quote(str(cwd))} && {command_text(plan)}\n"


def planned_write_paths(plan: RunPlan) -> list[str]:
    """Every path the run writes into (the path guard checks each one)."""
    return [plan.exp_dir, plan.ckpt_dir, *plan.files.values()]
