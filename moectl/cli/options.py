"""The run options, defined once: `moectl check` uses them now, `moectl run` and `sweep` reuse them.

    @app.command()
    def check(cap: CapOpt = None, tag: TagOpt = None, ..., extra: ExtraArgs = None): ...
        request = make_request(cap=cap, tag=tag, ...)      # moectl.plan.make_request validates

Values are validated by `moectl.plan.RunRequest` (one line per bad option, exit 2), not by click,
so every surface (CLI, sweep specs) reports bad values the same way.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

MAX_REPEATS = 1000  # more is a typo (--repeat 100000): each repeat is a whole run, report and commit


def path(value: str) -> Path:
    """Every path argument's parser (typer names its type after this function: `<path>`): an
    empty path is refused (exit 2), where `Path("")` would quietly mean the current directory
    (`export --csv ""` writing into the cwd)."""
    if isinstance(value, Path):
        return value
    if not str(value).strip():
        raise typer.BadParameter("an empty path; give a name")
    return Path(value)


PATH = path  # as the other modules import it: `parser=PATH`


def path_text(value: str) -> str:
    """`path`'s refusals, keeping the text as given: its trailing `/`, which `Path` drops, says the
    name is a directory (as `cp` and `mkdir -p` read it) even before the directory exists."""
    path(value)
    return str(value)


CapOpt = Annotated[Optional[float], typer.Option("--cap", help="Capacity factor (0 = dropless).", show_default=False)]
TagOpt = Annotated[Optional[str], typer.Option("--tag", help="Run tag: letters, digits, . _ - (default: derived from the options, e.g. tiny_cap1p0_static).", show_default=False)]
CompileOpt = Annotated[Optional[str], typer.Option("--compile", help="static | dynamic | none.", show_default=False)]
Fp8Opt = Annotated[Optional[bool], typer.Option("--fp8/--no-fp8", help="float8 expert GEMMs.", show_default=False)]
DispatchOpt = Annotated[Optional[str], typer.Option("--dispatch", help="auto | padded | grouped | loop.", show_default=False)]
BalanceOpt = Annotated[Optional[str], typer.Option("--balance", help="Load balancing: loss | bias (aux-loss-free, DeepSeek-V3) | none.", show_default=False)]
BalanceRateOpt = Annotated[Optional[float], typer.Option("--balance-rate", help="--balance bias: bias step per optimizer step.", show_default=False)]
EpOpt = Annotated[Optional[int], typer.Option("--ep", help="Expert parallelism: each group of N ranks splits the experts (N divides --nproc and the expert count).", show_default=False)]
StepsOpt = Annotated[Optional[int], typer.Option("--steps", help="Optimizer steps.", show_default=False)]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Seed (another trainer needs `seed` in \\[launch.options]); with --repeat N: seed, seed+1, ...", show_default=False)]
PresetOpt = Annotated[Optional[str], typer.Option("--preset", help="Engine preset, e.g. tiny or d12-moe.", show_default=False)]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="auto | cuda | cpu (auto = cuda when NVML sees GPUs).", show_default=False)]
NprocOpt = Annotated[Optional[int], typer.Option("--nproc", help="Processes per node (default: launch.nproc_per_node).", show_default=False)]
ExpDirOpt = Annotated[Optional[str], typer.Option("--exp-dir", help="Explicit experiment directory: must be new and directly in artifact_root; its name is the run id.", show_default=False)]
WaitGpusOpt = Annotated[Optional[str], typer.Option("--wait-gpus", help="Poll the GPU/training guards up to this long, e.g. 30m, 90s, 2h.", show_default=False)]
OverrideOpt = Annotated[Optional[list[str]], typer.Option("--override", help="Skip a guard knowingly (gpus_idle, no_other_training); repeatable, recorded.", show_default=False)]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", parser=PATH, help="Path to .moectl.toml (default: nearest one above the cwd).", show_default=False)]
SlurmOpt = Annotated[bool, typer.Option("--slurm", help="Run as a Slurm job (\\[cluster] backend = \"slurm\" does the same).")]
NodesOpt = Annotated[Optional[int], typer.Option("--nodes", help="Slurm: nodes, torchrun on each (default: \\[cluster] nodes).", show_default=False)]
DetachOpt = Annotated[bool, typer.Option("--detach", help="Slurm: return after submitting (prints the run id and job id).")]
RequeueOpt = Annotated[bool, typer.Option("--requeue", help="Slurm: requeue a preempted or timed-out job; it resumes from its last checkpoint.")]
NoCommitOpt = Annotated[bool, typer.Option("--no-commit", help="Write the report but do not commit it.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print the guard table and the exact command; write nothing.")]
BaselineOpt = Annotated[Optional[str], typer.Option("--baseline", help="A run to compare against in the report and commit message; a repeat group (its id, or a tag of one) compares as its mean ± between-runs error, as compare --baseline does.", show_default=False)]
NotesOpt = Annotated[Optional[str], typer.Option("--notes", help="Hypothesis / notes for the report.", show_default=False)]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No live progress.")]
RepeatOpt = Annotated[int, typer.Option("--repeat", min=1, max=MAX_REPEATS, help="Run the same configuration N times with seeds seed, seed+1, ... (through \\[launch.options] seed for another trainer), as one group that compare/show/plot/export take by its tag.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output (stable keys).")]
ExtraArgs = Annotated[Optional[list[str]], typer.Argument(help="Engine (or trainer) arguments, after `--`. The engine's become options of the run (checked, recorded, replacing a \\[defaults] value); --out-dir, --ckpt-dir, --device are refused. Another trainer's pass as given.", metavar="-- ENGINE_ARGS", show_default=False)]


def request_kwargs(*, cap, tag, compile, fp8, dispatch, steps, preset, device, nproc, exp_dir,
                   wait_gpus, override, extra, no_commit: bool = False, notes=None, seed=None,
                   balance=None, balance_rate=None, ep=None) -> dict:
    """The CLI values as `moectl.plan.make_request(**kwargs)` keywords."""
    return dict(
        cap=cap, tag=tag, compile=compile, fp8=fp8, dispatch=dispatch, steps=steps, preset=preset,
        device=device, nproc=nproc, exp_dir=exp_dir, wait_gpus=wait_gpus, overrides=list(override or []),
        extra_args=list(extra or []), no_commit=no_commit, notes=notes, seed=seed,
        balance=balance, balance_rate=balance_rate, ep=ep,
    )

# One run named on the command line (`show`, `commit`); moectl.store.resolve_run reads it.
RunArg = Annotated[str, typer.Argument(help="Run id, tag, unique prefix of either, or a run directory.")]
