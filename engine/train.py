"""Train the MoE GPT: one process or many under torchrun (DDP, gloo on CPU, nccl on GPU).

    python -m engine.train --preset tiny                      # CPU, seconds, built-in byte corpus
    python -m engine.train --preset tiny --out-dir /tmp/run   # + metrics.jsonl (engine.schema lines)
    torchrun --standalone --nproc-per-node 8 -m engine.train --preset d12-moe
    torchrun --standalone --nproc-per-node 1 -m engine.train --preset d12-moe --cap 0 --steps 60
    torchrun --standalone --nproc-per-node 8 -m engine.train --preset d12-moe --ep 4   # experts over 4 ranks

Explicit options override the preset. Exit codes (engine.schema): 0 done, 2 bad options (one
`error: ...` line on stderr), 3 torch.compile failed (rerun with --compile none), 1 anything else,
128+signal when interrupted by SIGINT/SIGTERM (metrics already written stay valid).

Rank 0 prints one nanochat-style line per step and, with --out-dir, writes engine.schema records
to metrics.jsonl: a start record, one step record per optimizer step (flushed), a summary at the end.
A fresh run starts the file anew; --resume into an out-dir that has one keeps its lines for the
steps before the checkpoint and appends, so every step appears once.
The loop reads device values back to the host once per optimizer step, after the step.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import signal
import sys
import tempfile
import time
import traceback
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from engine import checkpoint, data, flops
from engine.ep import ExpertParallel, check_ep
from engine.malloc import keep_freed_memory
from engine.config import (
    COMPILE_MODES, DEFAULTS, EMPTY_DATA, PRESETS, GPTConfig, check_compile_mode,
)
from engine.model import GPT
from engine.schema import (
    EXIT_BAD_OPTIONS,
    EXIT_COMPILE_FAILED,
    EXIT_ERROR,
    EXIT_OK,
    METRICS_FILENAME,
    RunSummary,
    StartInfo,
    StepMetrics,
    to_line,
)

class BadOptions(Exception):
    """Exit 2 with one line."""


class CompileFailed(Exception):
    """Exit 3: torch.compile could not build the model; the caller may retry with --compile none."""


class MetricsFailed(Exception):
    """metrics.jsonl could not be written (a full disk, a read-only directory): one line naming it."""


class Interrupted(BaseException):  # like KeyboardInterrupt: no library "except Exception" swallows it
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print usage + error; we want one line
        raise BadOptions(message)


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: `--out /x` must not quietly mean --out-dir (moectl checks the flags it
    # passes and the ones after `--` by their full names; a record should name what ran).
    p = _Parser(prog="python -m engine.train", description=__doc__.split("\n")[0], allow_abbrev=False,
                epilog="example: python -m engine.train --preset tiny --steps 20 --out-dir /tmp/run")
    a = p.add_argument
    a("--preset", choices=sorted(PRESETS), default="tiny", help="base settings (default tiny); explicit options override")
    g = p.add_argument_group("model")
    g.add_argument("--depth", type=int, help="layers; dim = depth * aspect ratio")
    g.add_argument("--aspect-ratio", type=int, help="model dim per layer of depth")
    g.add_argument("--head-dim", type=int, help="attention head size; n_head = dim // head_dim")
    g.add_argument("--n-experts", type=int, help="experts per MoE layer")
    g.add_argument("--top-k", type=int, help="experts per token")
    g.add_argument("--expert-hidden-mult", type=float, help="expert hidden size = mult * dim")
    g.add_argument("--moe-freq", type=int, help="layer i is MoE when i %% freq == freq-1 (1 = every layer)")
    g.add_argument("--cap", type=float, help="capacity factor; 0 = dropless")
    g.add_argument("--dispatch", choices=["auto", "padded", "grouped", "loop"], help="MoE dispatch (auto: padded for cap>0, grouped for cap 0)")
    g.add_argument("--balance-coeff", type=float, help="Switch load-balancing loss coefficient")
    g.add_argument("--z-coeff", type=float, help="router z-loss coefficient")
    g.add_argument("--balance", choices=["loss", "bias", "none"],
                   help="load balancing: loss (Switch loss, --balance-coeff), bias (aux-loss-free, DeepSeek-V3), none")
    g.add_argument("--balance-rate", type=float, help="--balance bias: bias step per optimizer step (default 1e-3)")
    g.add_argument("--dense", action="store_true", default=None, help="iso-FLOP dense baseline: MLP hidden = top_k * expert hidden")
    g.add_argument("--fp8", action="store_true", default=None, help="float8 expert GEMMs (engine.fp8)")
    g.add_argument("--fp8-dense", action="store_true", default=None, help="float8 for the dense Linear layers too")
    g.add_argument("--compile", choices=["static", "dynamic", "none"], help="torch.compile(dynamic=False/True) or eager")
    g.add_argument("--compile-mode", choices=list(COMPILE_MODES),
                   help="torch.compile's mode: default, or reduce-overhead (CUDA graphs: one launch a graph, for a "
                        "GPU step bound by kernel launches; one process), max-autotune, max-autotune-no-cudagraphs")
    t = p.add_argument_group("training")
    t.add_argument("--seq-len", type=int, help="tokens per sequence")
    t.add_argument("--device-batch-size", type=int, help="sequences per micro-batch per rank")
    t.add_argument("--ep", type=int, help="expert parallelism: each group of N ranks splits the experts (E/N per rank); "
                   "N divides the world size and --n-experts (default 1: every rank holds every expert)")
    t.add_argument("--total-batch-size", type=int, help="tokens per optimizer step, all ranks (default: one micro-batch per rank)")
    t.add_argument("--steps", type=int, help="optimizer steps")
    t.add_argument("--lr", type=float, help="AdamW learning rate (peak)")
    t.add_argument("--warmdown-frac", type=float, help="fraction of steps over which lr decays linearly to 0")
    t.add_argument("--grad-clip", type=float, help="clip the global grad norm (0 = off)")
    t.add_argument("--seed", type=int, help="seed for init and synthetic data")
    t.add_argument("--data", help="'default' (stdlib sources as bytes), 'synthetic', a directory of text files, a "
                   "uint16 .bin, or a directory of .bin shards")
    t.add_argument("--vocab-size", type=int, help="vocabulary (synthetic data; default: implied by the data)")
    t.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda if available")
    t.add_argument("--dtype", choices=["bf16", "fp32"], help="autocast dtype (default bf16 on cuda, fp32 on cpu)")
    o = p.add_argument_group("output")
    o.add_argument("--out-dir", help="write metrics.jsonl here (default: print only); one that holds a run's "
                   "metrics.jsonl is refused unless --resume continues that run")
    o.add_argument("--ckpt-dir", help="write model_{step:06d}.pt + meta_{step:06d}.json here")
    o.add_argument("--save-every", type=int, help="checkpoint every N steps (0: only at the end); needs --ckpt-dir")
    o.add_argument("--resume", help="checkpoint path, its directory, or 'latest' (in --ckpt-dir); without "
                   "--ckpt-dir the run saves on into the checkpoint's directory")
    o.add_argument("--peak-flops", type=float, help="peak FLOP/s per device for MFU, for devices not in the table")
    o.add_argument("--eval-every", type=int, help="validation loss every N steps (0: only at the end, -1: never)")
    o.add_argument("--eval-batches", type=int, help="micro-batches per rank in one validation pass")
    o.add_argument("--log-every", type=int, help="print a step line every N steps (metrics.jsonl gets every step)")
    return p


def resolve_options(argv) -> argparse.Namespace:
    """Parse argv, fill from preset then DEFAULTS, validate. Raises BadOptions (one line)."""
    args = build_parser().parse_args(argv)
    given = {name for name, value in vars(args).items() if value is not None}
    preset = PRESETS[args.preset]
    for key, default in DEFAULTS.items():
        if getattr(args, key, None) is None:
            setattr(args, key, preset.get(key, default))
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise BadOptions("--device cuda: no CUDA device is available (use --device cpu)")
    if args.dtype is None:
        args.dtype = "bf16" if args.device == "cuda" else "fp32"
    for name in ("steps", "seq_len", "device_batch_size", "eval_batches", "log_every"):
        if getattr(args, name) < 1:
            raise BadOptions(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.save_every < 0:
        raise BadOptions("--save-every must be >= 0")
    if args.eval_every < -1:  # (-5 silently meant "never": only -1 says so)
        raise BadOptions(f"--eval-every must be -1 (never), 0 (at the end) or a step count, got {args.eval_every}")
    if args.vocab_size is not None and args.vocab_size < 2:  # (0 silently meant "the default")
        raise BadOptions(f"--vocab-size must be >= 2, got {args.vocab_size}")
    try:
        check_compile_mode(args.compile, args.compile_mode)
    except ValueError as exc:
        raise BadOptions(str(exc)) from None
    if args.save_every and not args.ckpt_dir:
        raise BadOptions("--save-every needs --ckpt-dir")
    if not 0.0 <= args.warmdown_frac <= 1.0:
        raise BadOptions(f"--warmdown-frac must be in [0, 1], got {args.warmdown_frac}")
    for name, value in vars(args).items():  # nan/inf pass every `< 0` check below, and poison a run
        if isinstance(value, float) and not math.isfinite(value):
            raise BadOptions(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    if not -(2**63) <= args.seed < 2**63:  # torch.manual_seed's range (a traceback at step 0 otherwise)
        raise BadOptions(f"--seed must fit in 64 bits, got {args.seed}")
    if args.data == "":
        raise BadOptions(EMPTY_DATA)
    if args.lr <= 0:
        raise BadOptions(f"--lr must be > 0, got {args.lr}")
    if args.peak_flops is not None and args.peak_flops <= 0:
        raise BadOptions("--peak-flops must be > 0")
    if args.total_batch_size is not None and args.total_batch_size <= 0:
        # -1024 is a multiple of 1024: zero micro-steps a step, an optimizer stepping on nothing
        raise BadOptions(f"--total-batch-size must be > 0, got {args.total_batch_size}")
    if args.grad_clip < 0:
        raise BadOptions(f"--grad-clip must be >= 0 (0 = off), got {args.grad_clip}")
    for flag, value in (("--resume", args.resume), ("--out-dir", args.out_dir), ("--ckpt-dir", args.ckpt_dir)):
        if value is not None and not value.strip():  # (was: silently no resume, no metrics, no checkpoints)
            raise BadOptions(f"{flag} is empty: give a path (a shell variable that expanded to nothing?)")
    for name in ("out_dir", "ckpt_dir"):  # `--out-dir=~/x` (no shell expands that `~`): home, not ./~/x
        if getattr(args, name):
            setattr(args, name, os.path.expanduser(getattr(args, name)))
    if args.resume and args.resume != "latest" and args.ckpt_dir:
        # Branched into a directory of its choice: that directory must not hold another run's
        # checkpoints, nor, when it is the resumed one's own, a later one this run's saves overwrite.
        resume_path = Path(args.resume).expanduser()
        held = checkpoint.latest(args.ckpt_dir)
        if resume_path.is_file() and held is not None and held.resolve() != resume_path.resolve():
            if Path(args.ckpt_dir).resolve() == resume_path.parent.resolve():
                raise BadOptions(f"--resume {args.resume}: --ckpt-dir {args.ckpt_dir} holds a later checkpoint "
                                 f"({held.name}) that this run's saves would overwrite; give it a --ckpt-dir of its own")
            raise BadOptions(f"--ckpt-dir {args.ckpt_dir} already holds a run's checkpoints ({held.name}): a run "
                             f"resumed from {args.resume} saves into a fresh directory (or its own)")
    if args.resume and args.resume != "latest" and not args.ckpt_dir:
        # The run goes on where its checkpoints are (without a --ckpt-dir it used to save nothing
        # at all, and the steps it trained were lost with it) - unless it branches off an earlier
        # checkpoint there, whose later ones its saves would overwrite.
        resume_path = Path(args.resume).expanduser()
        if resume_path.exists():  # (a missing one is checkpoint.resolve's to name)
            held = resume_path if resume_path.is_dir() else resume_path.parent
            newest = checkpoint.latest(held)
            if resume_path.is_file() and newest is not None and newest.resolve() != resume_path.resolve():
                raise BadOptions(f"--resume {args.resume}: {held} holds a later checkpoint ({newest.name}) that "
                                 "this run's saves would overwrite; give it a --ckpt-dir of its own")
            args.ckpt_dir = str(held)
    for flag, where in (("--out-dir", args.out_dir), ("--ckpt-dir", args.ckpt_dir)):
        problem = _directory_problem(where)
        if problem is not None:  # found now, not by the checkpoint save at the end of the run
            raise BadOptions(f"{flag} {where}: {problem}")
    if args.out_dir:
        metrics_path = Path(args.out_dir) / METRICS_FILENAME
        if metrics_path.is_dir() or (metrics_path.is_symlink() and not metrics_path.exists()) \
                or (metrics_path.exists() and not metrics_path.is_file()):  # a FIFO: opening it blocked forever
            what = ("a directory" if metrics_path.is_dir() else "a dangling link" if not metrics_path.exists()
                    else "a special file (a FIFO, socket or device)")
            raise BadOptions(f"--out-dir {args.out_dir}: {metrics_path} is {what}, not a metrics file")
        if not args.resume and metrics_path.is_file() and metrics_path.stat().st_size:
            # (a report's recorded command pasted again wrote over the run it reports)
            raise BadOptions(f"--out-dir {args.out_dir} already holds a run's {METRICS_FILENAME}: a new run "
                             "goes into a fresh directory (--resume continues that one)")
    if args.ckpt_dir and not args.resume:
        held = checkpoint.latest(args.ckpt_dir)
        if held is not None:  # a new run's saves would overwrite them, and a later --resume latest mix the two
            raise BadOptions(f"--ckpt-dir {args.ckpt_dir} already holds a run's checkpoints ({held.name}): a new run "
                             "saves into a fresh directory (--resume latest continues that one)")
    try:
        cfg = model_config(args, vocab_size=args.vocab_size or 256)  # (the data's vocabulary comes later)
        cfg.validate()
    except (ValueError, OverflowError) as exc:
        raise BadOptions(str(exc)) from None
    if args.ep != 1:
        try:
            check_ep(args.ep, args.n_experts)
        except ValueError as exc:
            raise BadOptions(str(exc)) from None
        if args.dense or args.fp8 or args.dispatch == "loop":
            raise BadOptions("--ep > 1 needs MoE layers with the padded or grouped dispatch (not --dense, --fp8, --dispatch loop)")
    if args.fp8 or args.fp8_dense:
        flag = "--fp8" if args.fp8 else "--fp8-dense"
        try:
            from engine.fp8 import fp8_supported
        except ImportError as exc:
            raise BadOptions(f"{flag}: float8 support (engine.fp8) is not available: {exc}") from None
        ok, reason = fp8_supported(torch.device(args.device))
        if not ok:
            raise BadOptions(f"{flag} is not supported here: {reason}")
    try:  # the layers' own rules (dispatch vs cap, torch._scaled_mm's shapes): built on meta, free
        with torch.device("meta"):
            GPT(cfg)
    except (ValueError, OverflowError) as exc:
        fp8 = "--fp8" if args.fp8 else "--fp8-dense"
        raise BadOptions(f"{fp8}: {exc}" if str(exc).startswith("fp8 ") else str(exc)) from None  # (engine.fp8's)
    except TypeError as exc:  # torch's "Overflow when unpacking long long": a size past any tensor's
        raise BadOptions(f"the model cannot be built with these sizes: {_first_line(exc)}") from None
    # Said, not refused: a sweep grid of dense x cap has dense legs with a --cap, and that is fine.
    args.no_effect = sorted(MOE_ONLY & given) if args.dense else []
    return args


# Options that only shape MoE layers: under --dense there is none. (--top-k, --expert-hidden-mult
# and --moe-freq do count: they size and place the iso-FLOP dense MLP.)
MOE_ONLY = {"n_experts", "cap", "dispatch", "balance_coeff", "z_coeff", "balance", "balance_rate", "fp8"}


# Said, not refused: it trains correctly, only not the way SPEC §10 wants the hot path (no host sync).
DROPLESS_FP8_NOTE = ("note: --cap 0 --fp8: dropless float8 runs one float8 GEMM per expert, eagerly (a graph break "
                     "under --compile), reading the group sizes on the host once per MoE layer; --cap F --fp8 (padded) "
                     "is the static-shape float8 path")


def slow_cpu_fp8_note(flag: str, fp8_gflops: float, fp32_gflops: float) -> str | None:
    """The start note of a CPU run whose float8 GEMMs are far slower than fp32 (torch's CPU
    _scaled_mm can be a reference kernel: 0.06-0.09 GFLOP/s on a Sapphire Rapids Xeon, where a
    1-step tiny --fp8 run took 50 s and looked hung). None when float8 is within 4x of fp32."""
    if fp8_gflops >= fp32_gflops / 4:
        return None
    return (f"note: {flag} on CPU: torch._scaled_mm runs at {fp8_gflops:.2g} GFLOP/s here against {fp32_gflops:.3g} "
            f"for fp32, {fp32_gflops / max(fp8_gflops, 1e-9):.0f}x slower: float8 pays on Ada/Hopper GPUs, and on "
            f"this CPU a run only exercises the float8 path")


def no_effect_warning(names) -> str:
    flags = ", ".join("--" + n.replace("_", "-") for n in names)
    hint = " (--fp8-dense puts the dense layers in float8)" if "fp8" in names else ""
    return f"warning: --dense has no MoE layers, so {flags} {'has' if len(names) == 1 else 'have'} no effect{hint}"


def _warn_if_resumed_differently(resume_path: Path, step: int, args, world: int) -> None:
    """A resume under another --steps changes the lr schedule from here on, and under another world
    size the data order (each rank reads its own share of the chunks): allowed, and said."""
    meta_path = Path(resume_path).with_name(f"meta_{step:06d}.json")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return  # no meta beside it (a copied .pt): nothing to compare with
    if not isinstance(meta, dict) or not isinstance(meta.get("options") or {}, dict):
        return  # not a meta of ours (edited, or another tool's file of that name): nothing to compare with
    planned = (meta.get("options") or {}).get("steps")
    if planned is not None and planned != args.steps:
        print(f"warning: resuming a run planned for {planned} steps with --steps {args.steps}: "
              "the lr schedule from here on differs from the original's", file=sys.stderr, flush=True)
    if meta.get("world_size") not in (None, world):
        print(f"warning: resuming a run of world size {meta['world_size']} with {world} processes: the batch "
              "per rank and the order of the data differ from the original's", file=sys.stderr, flush=True)
    before = meta.get("options") or {}
    for what, keys, why in RESUME_CHANGES:
        changed = [f"--{k.replace('_', '-')} {before[k]} -> {getattr(args, k)}" for k in keys
                   if k in before and before[k] != getattr(args, k)]
        if changed:
            print(f"warning: resuming with other {what} options ({', '.join(changed)}): {why}", file=sys.stderr,
                  flush=True)


# Options a resume may change, said when it does: (kind, options, what that does).
RESUME_CHANGES = (
    # The loader resumes at its chunk index: chunks of another shape, corpus or seed are other tokens.
    ("data", ("device_batch_size", "seq_len", "data", "seed"),
     "the data position saved is in the original's chunks, so some tokens are seen twice and some never"),
    # The weights load under these unchanged (those of the model's shape fail at load_state_dict):
    # a change of plan is allowed, but the run's metrics would read as one run's.
    ("training", ("top_k", "cap", "dispatch", "balance", "balance_coeff", "balance_rate", "z_coeff", "fp8",
                  "fp8_dense", "dtype", "total_batch_size", "lr", "warmdown_frac", "grad_clip"),
     "the steps from here on train differently from the original run's"),
)


def _directory_problem(directory) -> Optional[str]:
    """Why `directory` cannot hold our files, if it cannot: a file stands where it (or a parent)
    must be a directory, or nothing can be created in it (or in the nearest parent that exists,
    where it would be made). Nothing is created here, so options refused later leave nothing."""
    if not directory:
        return None
    existing = next((p for p in [Path(directory), *Path(directory).parents] if p.exists()), Path("."))
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        return f"cannot write in {existing}: {exc.strerror or exc}"
    return None


def model_config(args, vocab_size: int) -> GPTConfig:
    return GPTConfig(
        depth=args.depth, aspect_ratio=args.aspect_ratio, head_dim=args.head_dim, seq_len=args.seq_len,
        vocab_size=vocab_size, n_experts=args.n_experts, top_k=args.top_k,
        expert_hidden_mult=args.expert_hidden_mult, moe_freq=args.moe_freq, cap=args.cap,
        dispatch=args.dispatch, balance_coeff=args.balance_coeff, z_coeff=args.z_coeff,
        balance=args.balance, balance_rate=args.balance_rate,
        dense=bool(args.dense), fp8=bool(args.fp8), fp8_dense=bool(args.fp8_dense),
    )


_COMPILER_MODULES = ("torch._dynamo", "torch._inductor", "torch.fx.experimental")


def _is_compile_error(exc: BaseException) -> bool:
    """An exception raised by torch.compile's machinery: its type lives there, or (for plain
    AssertionErrors and the like raised while tracing) the innermost frame of its traceback does."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if type(exc).__module__.startswith(_COMPILER_MODULES):
            return True
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        module = tb.tb_frame.f_globals.get("__name__", "") if tb is not None else ""
        if module.startswith(_COMPILER_MODULES):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


_signalled: list[int] = []


def _on_signal(signum, frame):
    # Once: a second Ctrl-C/SIGTERM would land in the cleanup of the first (closing metrics,
    # tearing down the process group) and end the run with a traceback and exit 1, not 130/143.
    if _signalled:
        return
    _signalled.append(signum)
    raise Interrupted(signum)


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _stop_with_torchrun() -> None:
    """Under torchrun, have Linux send this worker SIGTERM when torchrun dies. torchrun starts each
    worker in a session of its own, so a torchrun that is SIGKILLed (the OOM killer, kill -9) would
    otherwise leave it training on, unrecorded; SIGTERM stops it like Ctrl-C, metrics intact.
    Not for a plain `python -m engine.train`: a shell's exit must not stop a nohup'd run. A no-op
    where prctl is missing (not Linux)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return
    parent = os.getppid()
    if prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        return
    # torchrun died while we asked (we were adopted meanwhile): the signal will never come. (Not
    # `parent == 1`: in a container torchrun may well be pid 1.)
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


def main(argv=None) -> int:
    rank0 = os.environ.get("RANK", "0") == "0"
    previous = {}
    _signalled.clear()  # main() may run more than once in a process (tests)
    try:
        args = resolve_options(argv)
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, _on_signal)
        _stop_with_torchrun()
        return train(args)
    except BadOptions as exc:
        if rank0:
            print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_OPTIONS
    except CompileFailed as exc:
        print(f"error: torch.compile failed: {exc}; rerun with --compile none", file=sys.stderr)
        return EXIT_COMPILE_FAILED
    except (checkpoint.CheckpointFailed, MetricsFailed) as exc:  # said in a line a person can act on (a full disk)
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except Interrupted as exc:
        if rank0:
            print(f"interrupted by {exc}", file=sys.stderr, flush=True)
        return 128 + exc.signum
    except Exception as exc:  # anything else: keep the traceback, end with one summary line
        traceback.print_exc()
        print(f"error: {type(exc).__name__}: {_first_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        if dist.is_initialized():
            # Free what still holds the process group (DDP's reducer sits in reference cycles)
            # while the interpreter is whole: left to interpreter shutdown, gloo's threads die
            # mid-teardown and a worker that finished its run aborts ("terminate called without
            # an active exception", SIGABRT) - 2 of 15 two-rank tiny runs here before this.
            gc.collect()
            dist.destroy_process_group()
        # Last: a signal during the teardown above still meets our handler (ignored after the first).
        for sig, handler in previous.items():  # main() may run in-process (tests): leave signals as found
            signal.signal(sig, handler)


def eager_forward_error(model, x_BT, y_BT, autocast) -> str | None:
    """The first line of what one eager no-grad forward raises (the pass validation runs), or
    None when it runs. The model is left in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast:
            model(x_BT, y_BT)
    except RuntimeError as exc:  # CUDA/cuBLAS errors are RuntimeErrors (torch.AcceleratorError too)
        return _first_line(exc)
    finally:
        model.train(was_training)
    return None


def _not_an_engine_checkpoint(state) -> str | None:
    """What a loaded --resume file lacks of this engine's checkpoints (engine.checkpoint.save), or None."""
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not a checkpoint's dict"
    for key, kind in (("model", dict), ("optimizer", dict), ("loader", dict), ("rng", dict), ("step", int)):
        if key not in state:
            return f"no {key!r} in it"
        if not isinstance(state[key], kind):
            return f"its {key!r} is a {type(state[key]).__name__}, not a {kind.__name__}"
    return None


def graph_break_warning(breaks: dict) -> str | None:
    """One warning line for torch.compile's graph breaks (dynamo's counters["graph_break"]:
    reason -> count), None when there were none. A break splits the compiled model into pieces
    that run one after another with the activations between them kept whole: slower and bigger,
    and silent otherwise (torch 2.11 broke every padded MoE layer this way, 0.58x the tok/s)."""
    # Our own torch.compiler.disable (EP's exchange, whose row counts change every step) is a
    # break by design: not worth a warning.
    breaks = {reason: n for reason, n in breaks.items() if "compiler.disable" not in str(reason)}
    if not breaks:
        return None
    total = sum(breaks.values())
    reason, count = max(breaks.items(), key=lambda kv: kv[1])
    lines = [ln.strip() for ln in str(reason).splitlines() if ln.strip()]
    # torch >= 2.10 puts the op in a "Developer debug context" line below a generic first line.
    detail = next((ln for ln in lines[1:] if "debug context" in ln.lower()), "")
    shown = (lines[0] if lines else "?") + (f" ({detail})" if detail else "")
    return (f"warning: torch.compile split the model at {total} graph break(s), {len(breaks)} reason(s) "
            f"(slower, more memory); most frequent, x{count}: {shown[:300]}")


def _first_line(exc: BaseException) -> str:
    """The line that says what went wrong: torch's load_state_dict opens with a header that ends in
    a colon ("Error(s) in loading state_dict for GPT:"), the reason is on the next line."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    line = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return line[:400]


def train(args) -> int:
    open_files: list = []
    try:
        return _train(args, open_files)
    finally:  # metrics.jsonl is flushed per line; closing here covers every exit path
        for f in open_files:
            try:
                f.close()
            except OSError:  # its last flush failed (a full disk), and emit has said so already
                pass


def _train(args, open_files: list) -> int:
    # ---- distributed + device --------------------------------------------------------------
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.device == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        torch.set_float32_matmul_precision("high")
    else:
        device = torch.device("cpu")
        keep_freed_memory()  # no re-faulting of every step's activations (engine.malloc)
    tokens_per_micro = args.device_batch_size * args.seq_len * world
    total_batch = args.total_batch_size or tokens_per_micro
    if total_batch % tokens_per_micro:
        raise BadOptions(
            f"--total-batch-size {total_batch} is not a multiple of device batch x seq len x world "
            f"({args.device_batch_size} x {args.seq_len} x {world} = {tokens_per_micro})"
        )
    accum = total_batch // tokens_per_micro
    cuda_graphs = device.type == "cuda" and args.compile != "none" and COMPILE_MODES[args.compile_mode]
    if cuda_graphs and world > 1:
        # DDP's gradient hooks and EP's collectives run inside the backward a CUDA graph would replay.
        raise BadOptions(f"--compile-mode {args.compile_mode} (CUDA graphs) runs one process only; "
                         f"this run has {world} (use default or max-autotune-no-cudagraphs)")
    if world % args.ep:
        raise BadOptions(f"--ep {args.ep} does not divide the world size {world} (torchrun --nproc-per-node x nodes)")

    # ---- data (before the process group: a bad --data is exit 2 on every rank) ------------
    B, T = args.device_batch_size, args.seq_len
    try:
        if args.data == "synthetic":
            vocab = args.vocab_size or 32768
            loader = data.SyntheticLoader(vocab, B, T, args.seed, rank, world, device)
            make_val = lambda: data.SyntheticLoader(vocab, B, T, args.seed + 1, rank, world, device)  # noqa: E731
        else:
            tokens, data_vocab = data.load_tokens(args.data)
            if args.vocab_size and args.vocab_size < data_vocab:
                raise BadOptions(f"--vocab-size {args.vocab_size} is smaller than the data's ({data_vocab})")
            vocab = args.vocab_size or data_vocab
            train_tok, val_tok = data.split(tokens)
            try:
                loader = data.TokenLoader(train_tok, B, T, rank, world, device)
            except ValueError as exc:  # its count is the training split's: say where the rest went
                raise ValueError(f"{exc} (the data's {tokens.numel()} tokens less the {val_tok.numel()} held out "
                                 "for validation)") from None
            make_val = lambda: data.TokenLoader(val_tok, B, T, rank, world, device)  # noqa: E731
            try:
                make_val()
            except ValueError:
                make_val = None  # held-out tail too small for one batch per rank: no validation
        resume_path = checkpoint.resolve(args.resume, args.ckpt_dir) if args.resume else None
    except ValueError as exc:
        raise BadOptions(str(exc)) from None

    if ddp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    master = rank == 0
    if master and args.no_effect:
        print(no_effect_warning(args.no_effect), flush=True)
    if master and args.fp8 and not args.dense and args.cap == 0 and args.dispatch in ("auto", "grouped"):
        print(DROPLESS_FP8_NOTE, flush=True)
    if master and device.type == "cpu" and ((args.fp8 and not args.dense) or args.fp8_dense):
        from engine.fp8 import cpu_gemm_speeds

        note = slow_cpu_fp8_note("--fp8-dense" if args.fp8_dense else "--fp8", *cpu_gemm_speeds())
        if note:
            print(note, flush=True)

    # ---- model, optimizer ---------------------------------------------------------------
    # Under --ep every rank builds (and loads) the full model, then keeps its experts: each shard is
    # a slice of the same weights a DDP run starts from, and checkpoints hold all experts (engine.ep).
    torch.manual_seed(args.seed)
    cfg = model_config(args, vocab)
    try:
        model = GPT(cfg).to(device)
    except (MemoryError, RuntimeError) as exc:  # --n-experts 1e9, --expert-hidden-mult 1e15: the allocator's words
        raise BadOptions(f"the model does not fit in this {device.type} memory: {_first_line(exc)}") from None
    n_params = sum(p.numel() for p in model.parameters())
    expert_names = model.expert_param_names()
    is_expert = set(expert_names).__contains__
    expert_numel = sum(p.numel() for n, p in model.named_parameters() if is_expert(n))
    try:
        state = checkpoint.load(resume_path) if resume_path is not None else None
    except Exception as exc:  # cut short, copied half-way, not ours: a one-line refusal, not a traceback
        raise BadOptions(f"--resume {resume_path}: cannot read this checkpoint: {_first_line(exc)}") from None
    if state is not None:
        missing = _not_an_engine_checkpoint(state)
        if missing:  # a torch file of another trainer's (nanochat's model_*.pt holds the weights alone)
            raise BadOptions(f"--resume {resume_path}: not a checkpoint of this engine ({missing})")
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as exc:
            raise BadOptions(f"--resume {resume_path}: checkpoint does not match this model: {_first_line(exc)}") from None
    ep = ExpertParallel.setup(args.ep) if args.ep > 1 else None
    if ep is not None:
        model.shard_experts(ep)
    named = list(model.named_parameters())  # the optimizer's order: its state is keyed by index
    expert_params = [p for n, p in named if is_expert(n)]
    expert_idx = [i for i, (n, _) in enumerate(named) if is_expert(n)]
    dense_params = [p for n, p in named if not is_expert(n)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    for group in optimizer.param_groups:
        group["initial_lr"] = args.lr
    start_step, elapsed_s = 0, 0.0
    if state is not None:
        try:  # the same on every rank (one file), so a refusal leaves no rank waiting in a collective
            optimizer.load_state_dict(ep.shard_optimizer_state(state["optimizer"], expert_idx) if ep else state["optimizer"])
            loader.load_state_dict(state["loader"])
            torch.set_rng_state(state["rng"]["cpu"])
            if device.type == "cuda" and state["rng"].get("cuda") is not None:
                torch.cuda.set_rng_state(state["rng"]["cuda"])
            start_step, elapsed_s = int(state["step"]), float(state.get("elapsed_s", 0.0))
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
            raise BadOptions(f"--resume {resume_path}: checkpoint does not match this run: "
                             f"{type(exc).__name__}: {_first_line(exc)}") from None
        if start_step >= args.steps:
            raise BadOptions(f"--resume {resume_path}: the checkpoint is at step {start_step}; --steps {args.steps} "
                             "leaves nothing to train")
        if master:
            _warn_if_resumed_differently(resume_path, start_step, args, world)
    if ddp and args.compile == "dynamic":
        # Dynamo's DDP optimizer splits the graph at DDP's buckets; with symbolic shapes its
        # splitter fails ("'float' object has no attribute 'target'") on every multi-rank dynamic
        # run. Without the split, DDP's hooks still all-reduce each bucket as its grads are ready.
        torch._dynamo.config.optimize_ddp = False
    step_model = model if args.compile == "none" else torch.compile(
        model, dynamic=args.compile == "dynamic", mode=None if args.compile_mode == "default" else args.compile_mode)
    if ddp:  # DDP around the compiled module: DDP's own hooks do the all-reduce, no_sync works as usual
        if ep is not None:  # expert grads are reduced by ep.reduce_grads, over ranks holding the same experts
            ids = {id(p) for p in expert_params}
            torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                step_model, [n for n, p in step_model.named_parameters() if id(p) in ids])
        step_model = torch.nn.parallel.DistributedDataParallel(step_model, device_ids=[local_rank] if device.type == "cuda" else None)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    if device.type == "cuda" and (args.fp8 or args.fp8_dense) and make_val is not None and args.eval_every >= 0:
        # Validation runs the model eagerly, training compiled: on an H200 the compiled float8
        # steps trained and the eager float8 GEMM then failed in cuBLASLt, after the whole run.
        # One eager forward now says so before any step (and before any metrics are written).
        why = eager_forward_error(model, *make_val().next_batch(), autocast)
        if why:
            flag = "--fp8" if args.fp8 else "--fp8-dense"
            raise BadOptions(f"{flag}: the eager float8 forward that validation runs fails on "
                             f"{torch.cuda.get_device_name(device)}: {why} (--eval-every -1 trains without "
                             "validation)")

    flops_tok = flops.flops_per_token(cfg)
    peak, device_name = flops.peak_flops(device.type, args.peak_flops)
    experts_per_rank = expert_numel // args.ep

    # ---- metrics sink -------------------------------------------------------------------
    sink = None
    metrics_path = Path(args.out_dir or ".") / METRICS_FILENAME

    def metrics_failed(exc: OSError, what: str) -> MetricsFailed:
        # A full disk said as a person can act on it (`checkpoint._why`), naming the file: not a
        # traceback ending in "OSError: [Errno 28] No space left on device".
        return MetricsFailed(f"{metrics_path} {what}: {checkpoint._why(exc, metrics_path.parent)}")

    if master and args.out_dir:
        try:
            metrics_path.parent.mkdir(parents=True, exist_ok=True)
            if resume_path is not None:
                dropped = _keep_steps_before(metrics_path, start_step)
                if dropped:
                    print(f"resume: {METRICS_FILENAME} keeps steps < {start_step}; dropped {dropped} line(s) "
                          "of the steps that run again and of the earlier summary", flush=True)
            # Unbuffered bytes: each line goes out whole or is taken back (emit), none left in a buffer.
            sink = open(metrics_path, "ab" if resume_path else "wb", buffering=0)
        except OSError as exc:
            raise metrics_failed(exc, "cannot be written") from exc
        open_files.append(sink)

    def emit(record):
        if sink is not None:
            line, end = memoryview((to_line(record) + "\n").encode()), sink.tell()
            try:
                while line:  # (a raw write may take part of it: the rest goes next)
                    line = line[sink.write(line):]
            except OSError as exc:
                # Cut back to the last whole line: half a line at the end (a full disk) would be a
                # malformed line that readers skip, and warm-up-only figures from what is left.
                try:
                    os.ftruncate(sink.fileno(), end)
                except OSError:
                    pass
                at = f" at step {record.step}" if isinstance(record, StepMetrics) else ""
                raise metrics_failed(exc, f"not written{at}") from exc

    config = {**vars(args), **cfg.to_dict(), "grad_accum": accum,
              "total_batch_size": total_batch, "n_params": n_params, "flops_per_token": flops_tok,
              "expert_params_per_rank": experts_per_rank, "expert_params_ddp": expert_numel,
              "torch_version": torch.__version__}  # moectl records it in run.json
    emit(StartInfo(steps=args.steps, world_size=world, tokens_per_step=total_batch, device=device_name,
                   config=config, start_step=start_step))
    if master:
        print(f"model: {cfg.n_layer} layers, dim {cfg.dim}, {cfg.n_head} heads, "
              f"{'dense (iso-FLOP)' if cfg.dense else f'{model.n_moe_layers} MoE layers x {cfg.n_experts} experts top-{cfg.top_k}'}, "
              f"{n_params:,} params, {flops_tok:.4e} FLOPs/token")
        print(f"batch: {total_batch:,} tokens/step = {B} x {T} x {world} rank(s) x {accum} accum | "
              f"device {device_name} | dtype {args.dtype} | compile {args.compile}"
              + (f" ({args.compile_mode})" if args.compile_mode != "default" else "")
              + (f" | resumed at step {start_step} from {resume_path}" if resume_path else ""), flush=True)
        if ep is not None:
            print(f"experts: --ep {args.ep}, {cfg.n_experts // args.ep} of {cfg.n_experts} per rank per layer | "
                  f"expert params per rank {experts_per_rank:,} = 1/{args.ep} of DDP's {expert_numel:,}", flush=True)

    def evaluate() -> float | None:
        if make_val is None:
            return None
        val = make_val()
        model.eval()
        total = torch.zeros((), device=device)
        with torch.no_grad(), autocast:
            for _ in range(args.eval_batches):
                x_BT, y_BT = val.next_batch()
                total += model(x_BT, y_BT)["loss"].float()
        model.train()
        if ddp:
            dist.all_reduce(total)
        return total.item() / (args.eval_batches * world)

    def save(step: int, val_loss):
        if not args.ckpt_dir:
            return
        model_state, optim_state = model.state_dict(), optimizer.state_dict()
        if ep is not None:  # collective over EP group 0: its ranks send their experts to rank 0, which writes
            model_state, optim_state = ep.full_state(model_state, expert_names, optim_state, expert_idx)
        if master:
            payload = {
                "model": model_state, "optimizer": optim_state, "loader": loader.state_dict(),
                "rng": {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None},
                "step": step, "elapsed_s": elapsed_s,
            }
            meta = {"config": cfg.to_dict(), "options": vars(args), "loader": loader.state_dict(),
                    "world_size": world, "elapsed_s": elapsed_s, "val_loss": val_loss}
            checkpoint.save(args.ckpt_dir, step, payload, meta)
        if ddp:
            dist.barrier()

    def lr_mult(step: int) -> float:
        warmdown = round(args.warmdown_frac * args.steps)
        if warmdown == 0 or step < args.steps - warmdown:
            return 1.0
        return (args.steps - step) / warmdown  # linear to 0 at the end (nanochat's final_lr_frac=0)

    # ---- the loop -----------------------------------------------------------------------
    assignments = model.assignments(B * T) * accum * world
    last_loss, val_loss, peak_mem = None, None, None
    for step in range(start_step, args.steps):
        t0 = time.perf_counter()
        lr = args.lr * lr_mult(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_acc = torch.zeros((), device=device)
        aux_acc = torch.zeros((), device=device)
        dropped_acc = torch.zeros((), device=device)
        counts_LE = torch.zeros((model.n_moe_layers, cfg.n_experts), device=device)
        try:
            for micro in range(accum):
                if cuda_graphs:  # each micro-step is a new replay: outputs of the last may be reused
                    torch.compiler.cudagraph_mark_step_begin()
                x_BT, y_BT = loader.next_batch()
                # Gradients all-reduce only on the last micro-step.
                sync_ctx = step_model.no_sync() if ddp and micro < accum - 1 else nullcontext()
                with sync_ctx:
                    with autocast:
                        out = step_model(x_BT, y_BT)
                    ((out["loss"] + out["aux_loss"]) / accum).backward()
                loss_acc += out["loss"].detach().float()
                aux_acc += out["aux_loss"].detach().float()
                dropped_acc += out["dropped"].detach().float()
                counts_LE += out["tokens_per_expert_LE"].detach().float()
        except Exception as exc:  # (Interrupted is a BaseException: it passes straight through)
            if args.compile != "none" and _is_compile_error(exc):
                raise CompileFailed(f"{type(exc).__name__}: {_first_line(exc)}") from exc
            raise
        if ep is not None:
            ep.reduce_grads(expert_params)
        if args.grad_clip > 0 and ep is not None:
            ep.clip_grad_norm(dense_params, expert_params, args.grad_clip)
        elif args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # The one host sync of the step: every logged scalar travels in one tensor.
        stats = torch.cat([torch.stack([loss_acc / accum, aux_acc / accum, dropped_acc]), counts_LE.flatten()])
        if ddp:
            dist.all_reduce(stats)
        if cfg.balance == "bias" and model.n_moe_layers:  # counts of the whole step, all ranks: biases agree
            model.update_expert_bias(stats[3:].view(model.n_moe_layers, cfg.n_experts))
        vals = stats.tolist()
        dt = time.perf_counter() - t0
        elapsed_s += dt
        loss, aux = vals[0] / world, vals[1] / world
        drop_frac = expert_load_max = None
        if model.n_moe_layers:
            drop_frac = vals[2] / assignments
            loads_LE = torch.tensor(vals[3:]).view(model.n_moe_layers, cfg.n_experts)
            expert_load_max = (loads_LE.max(dim=1).values / loads_LE.mean(dim=1).clamp_min(1e-9)).max().item()
        tok_per_sec = total_batch / dt
        mfu = flops.mfu_pct(flops_tok, tok_per_sec, peak, world)
        peak_mem = _peak_mem_mib(device)
        last_loss = loss
        emit(StepMetrics(step=step, loss=loss, aux_loss=aux, lr=lr, dt_ms=dt * 1000, tok_per_sec=tok_per_sec,
                         mfu=mfu, peak_mem_mib=peak_mem, drop_frac=drop_frac, expert_load_max=expert_load_max,
                         elapsed_s=elapsed_s))
        if master and step == start_step and args.compile != "none":  # the step that compiled
            from torch._dynamo.utils import counters  # dynamo's own tally, kept per process

            warning = graph_break_warning(dict(counters["graph_break"]))
            if warning:
                print(warning, file=sys.stderr, flush=True)
        if master and (step % args.log_every == 0 or step == args.steps - 1):
            pct = 100 * (step + 1) / args.steps
            line = (f"step {step:05d}/{args.steps:05d} ({pct:.2f}%) | loss: {loss:.6f} | aux: {aux:.4f} | "
                    f"lr: {lr:.2e} | dt: {dt * 1000:.2f}ms | tok/sec: {tok_per_sec:,.0f} | "
                    f"mfu: {'-' if mfu is None else f'{mfu:.2f}'}")
            if drop_frac is not None:
                line += f" | drop: {drop_frac:.3f} | load_max: {expert_load_max:.2f}"
            print(line + f" | total time: {elapsed_s / 60:.2f}m", flush=True)

        done = step + 1
        if args.eval_every > 0 and done % args.eval_every == 0 and done < args.steps:
            val_loss = evaluate()
            if master and val_loss is not None:
                print(f"step {done:05d} | validation loss: {val_loss:.6f}", flush=True)
        if args.save_every and done % args.save_every == 0 and done < args.steps:
            save(done, val_loss)

    if args.eval_every >= 0:
        val_loss = evaluate()
        if master and val_loss is not None:
            print(f"validation loss: {val_loss:.6f}", flush=True)
    save(max(args.steps, start_step), val_loss)
    peak_mem = _peak_mem_mib(device)
    emit(RunSummary(steps=args.steps, world_size=world, flops_per_token=flops_tok, peak_flops=peak,
                    device_name=device_name, peak_mem_mib=peak_mem, total_time_s=elapsed_s,
                    final_loss=last_loss, val_loss=val_loss))
    if master:
        print(f"Peak memory usage: {peak_mem:.2f}MiB")
        print(f"Total training time: {elapsed_s / 60:.2f}m", flush=True)
    return EXIT_OK


def _keep_steps_before(path: Path, start_step: int) -> int:
    """Resuming into an out-dir that already has metrics: keep what the earlier attempt wrote for
    the steps before the checkpoint, drop its lines for the steps that are about to run again and
    its summary, so the file holds every step once. Atomic; returns the number of lines dropped."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return 0
    lines = text.splitlines()
    kept = []
    for i, line in enumerate(lines):
        try:
            rec = json.loads(line)
        except ValueError:
            if i == len(lines) - 1 and not text.endswith("\n"):
                continue  # torn by a killed write (a step the checkpoint lacks): appended to, it stayed unreadable
            rec = None  # not ours to judge: kept as it was
        if isinstance(rec, dict):
            kind = rec.get("type", "step")
            if kind == "summary" or (kind == "step" and isinstance(rec.get("step"), int) and rec["step"] >= start_step):
                continue
        kept.append(line)
    new_text = "".join(line + "\n" for line in kept)
    if new_text != text:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(new_text, encoding="utf-8")
        os.replace(tmp, path)
    return len(lines) - len(kept)


def _peak_mem_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # CPU: the process's max resident set size (Linux reports KiB): weights, activations, allocator slack.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
    sys.exit(main())
