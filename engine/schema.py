"""The metrics line: the one contract between the engine and moectl.

The engine (rank 0) appends one JSON object per line to `<out-dir>/metrics.jsonl`:

    {"type": "start",   ...}   once, before the first step (planned steps, world size, config)
    {"type": "step",    ...}   once per optimizer step, flushed every step
    {"type": "summary", ...}   once, after the last step

This module imports neither torch nor pydantic, so the CLI process (which must never import
torch) reads exactly what the engine writes. Both sides go through `StepMetrics` / `RunSummary`.

A non-finite loss (NaN or +-inf: the run diverged) is a measurement, not a malformed line: the step
ran, and its time, throughput and memory are real. JSON has no NaN, so on the wire a step's loss
is then `"loss": null`, and `parse_record` reads that back as `math.nan` (test it with
`loss_is_finite`). The key must be present: a step line without a loss is still malformed. Files
written before this rule read the same way, since the engine only ever wrote a null loss for a
non-finite one. Every other null field means "not measured" (None), as always.

A trainer of the user's own may write its metrics with Python's default json.dumps, which puts
`NaN` and `Infinity` on the wire (a tok/s of a step timed at 0 ms, say). They are read as the
engine would have written them: a non-finite loss as NaN, any other non-finite number as None.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Union

from engine.config import PRESETS

METRICS_FILENAME = "metrics.jsonl"

# Engine exit codes (SPEC §10 / issue 2). moectl keys its compile fallback on EXIT_COMPILE_FAILED.
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_BAD_OPTIONS = 2
EXIT_COMPILE_FAILED = 3

# The names of engine.train's presets (engine/config.py, torch-free like this module), so
# `moectl run --preset typo` is a usage error before anything is launched.
PRESET_NAMES = tuple(sorted(PRESETS))
DEFAULT_PRESET = "tiny"  # what engine.train runs with no --preset
# Their expert counts, so `moectl run --ep N` that cannot split them is refused before launch.
PRESET_EXPERTS = {name: preset["n_experts"] for name, preset in PRESETS.items()}
ENGINE_MODULE = "engine.train"  # the module these presets belong to (launch.module may name another)

# engine.train's options (its build_parser; a test keeps the two in step) and the TOML type of
# each value: bool = a store_true flag. Here so `[defaults]` of `.moectl.toml` is checked against
# them before anything is launched (moectl/config_schema.py), without importing torch.
ENGINE_OPTIONS: dict[str, type] = {
    "preset": str,
    # model
    "depth": int, "aspect_ratio": int, "head_dim": int, "n_experts": int, "top_k": int,
    "expert_hidden_mult": float, "moe_freq": int, "cap": float, "dispatch": str, "balance_coeff": float,
    "z_coeff": float, "balance": str, "balance_rate": float, "dense": bool, "fp8": bool, "fp8_dense": bool,
    "compile": str, "compile_mode": str,
    # training
    "seq_len": int, "device_batch_size": int, "ep": int, "total_batch_size": int, "steps": int, "lr": float,
    "warmdown_frac": float, "grad_clip": float, "seed": int, "data": str, "vocab_size": int, "device": str,
    "dtype": str,
    # output
    "out_dir": str, "ckpt_dir": str, "save_every": int, "resume": str, "peak_flops": float, "eval_every": int,
    "eval_batches": int, "log_every": int,
}

# The bf16 dense peak per device (FLOP/s), by a substring of torch.cuda.get_device_name().
# Order matters: the first match wins (H200 before H100 so "H100" does not shadow anything odd).
PEAK_BF16_FLOPS = (  # first match wins: a PCIe or NVL card (lower clocks, less power) before its family's SXM
    ("H100 PCIe", 756e12),
    ("H800 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H200 NVL", 835e12),
    ("H200", 989e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("H20", 148e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 125e12),
    ("4090", 165e12),
)


def peak_flops_for(device_name: str) -> Optional[float]:
    """bf16 dense peak of one device, or None when the device is not in the table (CPU, unknown)."""
    for key, flops in PEAK_BF16_FLOPS:
        if key in device_name:
            return flops
    return None


@dataclass
class StepMetrics:
    """One optimizer step, as rank 0 saw it. tok_per_sec is global (all ranks)."""

    step: int
    loss: float  # math.nan when the loss was not finite (null on the wire; see the module docstring)
    aux_loss: Optional[float] = None
    lr: Optional[float] = None
    dt_ms: Optional[float] = None
    tok_per_sec: Optional[float] = None
    mfu: Optional[float] = None  # percent of (peak bf16 FLOP/s x world size); None when peak unknown
    peak_mem_mib: Optional[float] = None
    drop_frac: Optional[float] = None  # fraction of token->expert assignments dropped by capacity
    expert_load_max: Optional[float] = None  # max over experts of (tokens routed / mean tokens)
    elapsed_s: Optional[float] = None  # training time so far, seconds (all steps, compile included)
    type: str = field(default="step", repr=False)


@dataclass
class StartInfo:
    """Written once before the first step: what the run plans to do (moectl uses it for progress)."""

    steps: int
    world_size: int
    tokens_per_step: int
    device: str
    config: dict = field(default_factory=dict)
    start_step: int = 0  # > 0 when resumed from a checkpoint
    type: str = field(default="start", repr=False)


@dataclass
class RunSummary:
    """Written once after the last step."""

    steps: int
    world_size: int
    flops_per_token: Optional[float] = None
    peak_flops: Optional[float] = None  # per device
    device_name: Optional[str] = None
    peak_mem_mib: Optional[float] = None
    total_time_s: Optional[float] = None
    final_loss: Optional[float] = None
    val_loss: Optional[float] = None
    type: str = field(default="summary", repr=False)


Record = Union[StartInfo, StepMetrics, RunSummary]
_BY_TYPE = {"start": StartInfo, "step": StepMetrics, "summary": RunSummary}
# Field names per record type, computed once: dataclasses.fields() per line dominated the cost of
# reading a store's metrics (`moectl compare` over 100 runs parses ~30k lines).
_KNOWN = {kind: frozenset(f.name for f in fields(cls)) for kind, cls in _BY_TYPE.items()}
_FIELDS = {cls: tuple(f.name for f in fields(cls)) for cls in _BY_TYPE.values()}  # in declaration order
# The number fields of each type: a string where a number goes ("dt_ms": "12") made every reader of
# the file fail (an internal error), not skip that line. `type(v) in` is the per-line-cheap test (a
# bool is not a number here, and its type is neither int nor float).
_INTEGERS = {kind: frozenset(f.name for f in fields(cls) if f.type in ("int", "Optional[int]"))
             for kind, cls in _BY_TYPE.items()}
_FLOATS = {kind: frozenset(f.name for f in fields(cls) if f.type in ("float", "Optional[float]"))
           for kind, cls in _BY_TYPE.items()}
_NULLABLE = {kind: frozenset(f.name for f in fields(cls) if f.type.startswith("Optional["))
             for kind, cls in _BY_TYPE.items()}
_INT, _NUMBER = frozenset({int}), frozenset({int, float})


def to_line(record: Record) -> str:
    """Serialise one record as a single JSON line (no trailing newline). NaN/inf become null
    (a step's null loss reads back as NaN: see the module docstring)."""
    # (fields by name, not dataclasses.asdict: its deep copy of every value was two thirds of the
    # time of importing a long log; the records are flat but for StartInfo.config, dumped as it is)
    data = {k: _finite(getattr(record, k)) for k in _FIELDS[type(record)]}
    return json.dumps(data, separators=(",", ":"), allow_nan=False)


def _null(name: str) -> None:
    return None


def decode(text: str) -> Any:
    """json.loads for metrics text: NaN and +-Infinity (Python's json.dumps writes them) decode as
    null, which parse_record reads as the engine writes them (see the module docstring). The hook
    runs only where such a token is, so a well-formed file decodes at json.loads's own speed."""
    return json.loads(text, parse_constant=_null)


def parse_line(line: str) -> Record:
    """Parse one metrics line. Raises ValueError for anything that is not a well-formed record.

    Unknown keys are ignored (newer engines may add fields); a missing required key is an error.
    """
    try:
        data = decode(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc.msg}") from None
    except RecursionError:  # thousands of nested brackets: the decoder recurses once per bracket
        raise ValueError("not JSON: nested too deeply") from None
    return parse_record(data)


def parse_record(data: Any) -> Record:
    """Validate one already-decoded metrics object (what `parse_line` does after json.loads).

    Readers of many lines may decode a whole file in one json call and validate each object here.
    """
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    kind = data.get("type", "step")
    cls = _BY_TYPE.get(kind)
    if cls is None:
        raise ValueError(f"unknown record type {kind!r}")
    known = _KNOWN[kind]
    # Copy-filter only when the line carries keys this version does not know (the common case,
    # an exact match, skips the copy: it is most of the per-line cost).
    kwargs: dict[str, Any] = data if known.issuperset(data) else {k: v for k, v in data.items() if k in known}
    try:
        record = cls(**kwargs)
    except TypeError as exc:
        raise ValueError(f"bad {kind} record: {exc}") from None
    if isinstance(record, StepMetrics) and record.loss is None:
        record.loss = math.nan  # the loss key is there, null: the step's loss was not finite
    integers, floats = _INTEGERS[kind], _FLOATS[kind]
    for name, value in kwargs.items():
        if name in floats:
            if type(value) not in _NUMBER and not (value is None and (name in _NULLABLE[kind] or name == "loss")):
                raise ValueError(f"{name} is not a number: {value!r}")
        elif name in integers and type(value) not in _INT and not (value is None and name in _NULLABLE[kind]):
            raise ValueError(f"{name} is not an integer: {value!r}")
    if isinstance(record, StepMetrics) and not 0 <= record.step < 2**53:
        # steps count from 0 (and fit a JSON number exactly): a -1 or 1e300 step is no step
        raise ValueError(f"step out of range: {record.step}")
    return record


def loss_is_finite(step: StepMetrics) -> bool:
    """False for a step whose loss was NaN or +-inf (read back from null, see the module docstring)."""
    return math.isfinite(step.loss)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    return value
