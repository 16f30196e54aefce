"""Which trainer a run launches, and its exact command (SPEC §11, issue 10). Pure: no I/O.

    argv = trainer_argv(cfg.launch, cfg.metrics, options, device="cpu", exp_dir=..., ckpt_dir=...,
                        nproc=1, python="/repo/.venv/bin/python", extra=["--foo"])

Two contracts, decided by `.moectl.toml` alone:
- the engine's: a `launch.module` with no `[launch.options]` table whose metrics come from its own
  metrics.jsonl (`engine.train`, or a stand-in honouring the same flags). Every option goes as
  `--key value`, plus `--device`, `--out-dir`, `--ckpt-dir`.
- a mapped trainer: a `launch.script`, or any trainer with an `[launch.options]` table or metrics
  parsed from its stdout. It gets `launch.args`, then each option through its template
  (`steps = "--max_iters={}"`); an option it has no template for is refused before anything is
  launched (UsageError: exit 2, naming the option and the table to add it to), because a flag the
  trainer does not know would either crash it after the run directory exists or - worse - be
  silently ignored and recorded as if it had applied. `device`, `out_dir` and `ckpt_dir` are
  moectl's own and go only where mapped. Extra arguments after `--` are passed through as given.

The launcher wraps it: `torchrun` (`python -m torch.distributed.run --standalone --nproc-per-node N`)
or `python` (one plain process, for trainers that cannot run under torchrun on CPU).
"""
from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any, Optional

from engine.schema import ENGINE_OPTIONS
from moectl.errors import UsageError

# The engine options `moectl run` has flags for (config `[defaults]` < these flags; moectl/plan.py).
RUN_OPTIONS = ("preset", "cap", "compile", "fp8", "dispatch", "balance", "balance_rate", "ep", "steps", "seed")
# Options moectl itself decides; a mapped trainer gets them only through its own template.
MOECTL_OWN = ("device", "out_dir", "ckpt_dir")
# What `[launch.options]` may map: every option moectl can hand a trainer (a `[defaults]` key too).
MAPPABLE = RUN_OPTIONS + MOECTL_OWN


def script_path(launch, root: Path) -> Optional[Path]:
    """`[launch] script` as a path: `~` expanded, relative to the repository root (where the
    trainer is launched); None for a module trainer."""
    if launch.script is None:
        return None
    path = Path(os.path.expanduser(launch.script))
    return path if path.is_absolute() else Path(root) / path


def follows_engine_contract(launch, metrics) -> bool:
    return launch.script is None and launch.options is None and metrics.source == "jsonl"


def option_flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def engine_flags(options: dict[str, Any]) -> list[str]:
    argv: list[str] = []
    for key, value in options.items():
        flag = option_flag(key)
        if isinstance(value, bool):
            if value:
                argv.append(flag)  # engine flags are store_true; False = leave the default
        elif isinstance(value, (list, tuple)):
            argv += [flag, *(str(v) for v in value)]
        else:
            argv += [flag, str(value)]
    return argv


# Why an engine flag after `--` may not set what moectl sets itself: the guards judged moectl's own
# values (the path guard the run directory, gpus_idle the device), so a later flag that wins in
# the engine's argparse would run something the guards never saw.
_OWN_WHY = {
    "out_dir": "the run directory is moectl's (a fresh one inside artifact_root, checked by the path guard; "
               "`moectl run --exp-dir` names it)",
    "ckpt_dir": "checkpoints go to <run directory>/ckpt_root, inside artifact_root (the path guard)",
    "device": "the device is moectl's, checked by the guards (`moectl run --device`)",
}


def fold_engine_args(extra: list[str], options: dict[str, Any], explicit: set[str],
                     known: dict[str, type] | None = None) -> tuple[list[str], dict[str, Any]]:
    """Engine flags after `--` that set an option moectl already passes (from [defaults], say
    `-- --lr 0.02` beside `lr = 0.01`) become that option, so the command carries it once and the
    record's options say what ran. With `known` (the engine's own options, when the trainer is
    the engine) every flag it names becomes an option too (`-- --ep 2` is checked, tagged and
    recorded as `--ep 2` would be) and anything else is refused; without it the rest pass through
    as given (another trainer's flags are its own business). UsageError for a flag of
    moectl's own (`MOECTL_OWN`), for one also given as a `moectl run` option (`explicit`), and for
    a value that is not of the option's type. Pure: returns (the extra arguments left, the options)."""
    options, left, i = dict(options), [], 0
    known = known or {}
    folded: set[str] = set()
    while i < len(extra):
        token = extra[i]
        name, eq, value = token.partition("=")
        key = name[2:].replace("-", "_") if name.startswith("--") else None
        if key in MOECTL_OWN:
            raise UsageError(f"-- {name}: not a trainer argument moectl can pass on: {_OWN_WHY[key]}")
        if known and (key is None or (key not in options and key not in known)):
            # the engine's argparse would refuse it, but only once the run directory exists
            raise UsageError(f"-- {token}: not an option of the engine (`python -m engine.train --help` lists them)")
        if key is None or (key not in options and key not in known) or isinstance(options.get(key), (list, tuple)):
            left.append(token)
            i += 1
            continue
        if key in explicit:
            raise UsageError(f"-- {name}: moectl already sets {name} for this run (a `moectl run {name}` option, "
                             "--repeat's seeds or a sweep leg's option); give it there, once")
        if key in folded:  # the engine's argparse would take the last one without a word
            raise UsageError(f"-- {name}: given twice after --; give it once")
        folded.add(key)
        current = options[key] if key in options else (False if known[key] is bool else None)
        if isinstance(current, bool):
            if eq:
                raise UsageError(f"-- {token}: {name} is an on/off flag of the engine; it takes no value")
            options[key], i = True, i + 1
            continue
        if not eq:
            if i + 1 >= len(extra) or extra[i + 1].startswith("--"):
                raise UsageError(f"-- {name}: needs a value" + (f", not the flag {extra[i + 1]}" if i + 1 < len(extra) else ""))
            value, i = extra[i + 1], i + 1
        i += 1
        # The option's own type where the engine names it (`grad_clip = 1` in [defaults] is a float
        # option written as an integer), else the type of the value it replaces.
        kind = known.get(key) or ENGINE_OPTIONS.get(key) or (type(current) if isinstance(current, (int, float)) else str)
        try:
            options[key] = kind(value)
        except ValueError:
            raise UsageError(f"-- {name} {value}: not {'an integer' if kind is int else 'a number'}") from None
    return left, options


def refuse_mapped_repeats(extra: list[str], mapping: dict[str, str], passed: dict[str, Any], config: str) -> None:
    """A mapped trainer's flag after `--` that moectl already passes through [launch.options]
    (`-- --device=cuda` beside `device = "--device={}"`): the trainer would take the later one,
    running what the guards never judged (the device) or what the record does not say (the
    steps). UsageError naming the option to give instead; other arguments pass as given."""
    flags = {}
    for key in passed:
        words = shlex.split(mapping[key]) if key in mapping else []
        if words and words[0].startswith("-"):
            flags[words[0].split("=", 1)[0].replace("{}", "")] = key
    for token in extra:
        flag = token.split("=", 1)[0]
        key = flags.get(flag)
        if key is None and flag.startswith("--") and len(flag) > 2:
            # argparse takes a unique prefix of a long flag (`--num_iter` for `--num_iterations`)
            key = next((k for f, k in flags.items() if f.startswith("--") and f.startswith(flag)), None)
        if key is not None:
            how = (_OWN_WHY[key] if key in MOECTL_OWN
                   else f"moectl passes it already as {option_flag(key)} ([launch.options] {key} in {config}); "
                        f"give that instead, so the record says what ran")
            raise UsageError(f"-- {flag}: not a trainer argument moectl can pass on: {how}")


def mapped_flags(mapping: dict[str, str], options: dict[str, Any], config: str = ".moectl.toml") -> list[str]:
    """Each option through its template; UsageError naming every unmapped option (and `config`,
    the file whose [launch.options] would map it)."""
    missing = [k for k in options if k not in mapping]
    if missing:
        # an on/off option maps to a bare flag (passed when true): `--fp8={}` would pass `--fp8=True`
        lines = [f"{option_flag(k)}: this trainer has no flag for it; add e.g. "
                 + (f"`{k} = \"--{k}\"`" if isinstance(options[k], bool) else f"`{k} = \"--{k}={{}}\"`")
                 + f" under [launch.options] in {config}" for k in missing]
        if len(lines) == 1:
            raise UsageError(lines[0])
        raise UsageError("options this trainer has no flag for ([launch.options])", lines)
    argv: list[str] = []
    for key, value in options.items():
        template = mapping[key]
        if "{}" not in template:
            if value is True:
                argv += shlex.split(template)  # a bare flag: on when true, left out when false
            elif value not in (False, None):
                raise UsageError(f"[launch.options] {key} = {template!r} has no {{}} for the value {value!r}")
            continue
        argv += shlex.split(template.replace("{}", shlex.quote(str(value))))
    return argv


def trainer_argv(launch, metrics, options: dict[str, Any], *, device: str, exp_dir: str, ckpt_dir: str,
                 nproc: int, python: str, extra: list[str], config: str = ".moectl.toml",
                 nodes: Optional[int] = 1) -> tuple[list[str], list[str]]:
    """(the full command, the trainer's own arguments). `config`: the config file, for messages;
    `nodes`: the nodes the run spans (None: not known)."""
    if follows_engine_contract(launch, metrics):
        trainer_args = engine_flags(options) + ["--device", device, "--out-dir", exp_dir, "--ckpt-dir", ckpt_dir]
    else:
        mapping = launch.options or {}
        own = {"device": device, "out_dir": exp_dir, "ckpt_dir": ckpt_dir}
        passed = {**{k: v for k, v in own.items() if k in mapping}, **options}
        refuse_mapped_repeats(extra, mapping, passed, config)
        trainer_args = list(launch.args) + mapped_flags(mapping, options, config)
        trainer_args += mapped_flags(mapping, {k: v for k, v in own.items() if k in mapping}, config)
    trainer_args += list(extra)
    # `~` expanded as the guards' probe_trainer reads it (no shell runs the command to do it).
    target = ["-m", launch.module] if launch.module is not None else [os.path.expanduser(launch.script)]
    if launch.launcher == "python":
        if nproc != 1:
            raise UsageError(f"--nproc {nproc}: launcher = \"python\" runs one process; "
                             "set launcher = \"torchrun\" in [launch] for more")
        return [python, *target, *trainer_args], trainer_args
    tee = []
    if ranks_prefixed(launch, metrics, nproc, nodes):
        # Every rank's output reaches us: teed through torchrun, each line gets its rank's prefix
        # (RANK_PREFIX_TEMPLATE) so the parser keeps rank 0's steps only; without it, a trainer
        # printing on every rank had its steps counted once per rank. The per-rank logs stay in the run.
        tee = ["--tee", "3", "--log-dir", str(Path(exp_dir) / "torchrun_logs")]
    return [python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *tee,
            *target, *trainer_args], trainer_args


# torchrun's prefix for a teed line (TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE): the GLOBAL rank, so on
# several nodes only rank 0 is rank 0 (its default, `[default<local rank>]:`, repeats per node).
RANK_PREFIX_ENV = "TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE"
RANK_PREFIX_TEMPLATE = "[rank${rank}]:"


def ranks_prefixed(launch, metrics, nproc: int, nodes: Optional[int]) -> bool:
    """Whether a run's output is teed with rank prefixes: a stdout-parsed trainer under torchrun
    with more than one rank (or nodes not known yet). One rank needs no prefix, and goes without
    the tee's cost: torchrun tails each rank's file and prefixes every piece it reads, so a line
    printed in parts (`end=""`) comes out with a prefix in its middle (the parser mends rank 0's)."""
    return launch.launcher == "torchrun" and metrics.source == "stdout" and (nodes is None or nproc * nodes > 1)


# `moectl init --trainer NAME`: the [launch]/[metrics] tables of known trainers, a starting point
# (check the flags against your fork: a mapped flag the trainer does not know fails at launch).
TABLES = {
    "nanochat": """\
[launch]                     # nanochat (karpathy/nanochat): its base_train under torchrun
module = "scripts.base_train"
launcher = "torchrun"        # "python" runs it as one plain process (no torchrun)
args = []                    # always passed first, e.g. ["--depth=12"]
nproc_per_node = "auto"      # auto = number of selected GPUs (cuda) or 1 (cpu)
env = { OMP_NUM_THREADS = "1" }   # nanochat writes checkpoints under $NANOCHAT_BASE_DIR (default
                             # ~/.cache/nanochat): set it here to a directory inside artifact_root
compile_fallback = true

[launch.options]             # moectl run option -> nanochat's flag ("{}" is the value); any other
steps = "--num_iterations={}"    # option given to `moectl run` is refused until it is mapped here
# seed = "--seed={}"             # if your fork takes one (needed by `moectl run --repeat N`)
# cap = "--capacity_factor={}"   # a MoE fork's capacity factor
# device = "--device_type={}"    # moectl's --device (cuda | cpu)

[metrics]
window = 50                  # the tail window of every summary: its last `window` steps ...
warmup_steps = 10            # ... after steps 0-9 (compile / warm-up), which no summary counts
source = "stdout"            # parse the trainer's output into metrics.jsonl
format = "nanochat"          # `step 00012/00040 (30.00%) | loss: ... | dt: ...ms | tok/sec: ... | bf16_mfu: ...`
""",
    "nanogpt": """\
[launch]                     # nanoGPT (karpathy/nanoGPT): train.py with a config file
script = "train.py"          # relative to this file
launcher = "torchrun"        # "python": `python train.py ...`, one process (e.g. on a laptop CPU)
args = ["config/train_shakespeare_char.py"]   # always passed first
nproc_per_node = "auto"      # auto = number of selected GPUs (cuda) or 1 (cpu)
env = { OMP_NUM_THREADS = "1" }
compile_fallback = true

[launch.options]             # moectl run option -> nanoGPT's configurator flag ("{}" is the value)
steps = "--max_iters={}"
device = "--device={}"
out_dir = "--out_dir={}"     # its checkpoints go into the run directory, inside artifact_root
# seed = "--seed={}"         # nanoGPT seeds 1337 + rank and has no flag; add one to use --repeat N

[metrics]
window = 50                  # the tail window of every summary: its last `window` steps ...
warmup_steps = 10            # ... after steps 0-9 (compile / warm-up), which no summary counts
source = "stdout"            # parse the trainer's output into metrics.jsonl
format = "regex"             # `iter N: loss X, time Yms, mfu Z%`
step = 'iter (\\d+):'        # a step line matches this; its group is the step number
tokens_per_step = 'tokens per iteration will be: ([\\d,]+)'   # then tok/sec = tokens / dt

[metrics.patterns]           # metrics field -> a regex with one group
loss = 'loss (-?[\\d.]+)'      # a signed number: some objectives go below zero
dt_ms = 'time ([\\d.]+)ms'
mfu = 'mfu (-?[\\d.]+)%'
""",
}
