"""A trainer's printed progress -> the engine's metrics schema: one parser, live and for imports.

    fmt = StdoutFormat.from_config(cfg.metrics)          # [metrics] source = "stdout"
    parser = StdoutParser(fmt, planned_steps=40, world_size=1, device="cpu")
    for line in lines_with_newlines:
        records = parser.feed(line)    # a StartInfo before the first step, then StepMetrics
    parser.finish()                    # the RunSummary (None when no step line was seen)
    parser.warnings()                  # patterns that never matched a step line

`moectl run` feeds every line the tee reads (LiveMetricsWriter appends the records to the run's
metrics.jsonl, so progress, summaries, compare, plot and export read a foreign trainer exactly
like the engine); `moectl import --format nanochat|regex` feeds a log file's lines through the
same parser, so an old log imports exactly as a live run of it would have parsed.

Lines are split where a terminal would start over: at a newline, and at a carriage return that
redraws the line (`\r`, as tqdm and Lightning progress bars print one bar per step and a newline
only at the end). Each redrawn bar is a line of its own, read as it arrives, and a bar redrawn
without a new step number (a refresh) is the same step, not another.

What is never a step, whatever the patterns say:
- a partial line (no newline or redraw yet: the trainer died mid-print, or is still printing it;
  or a rank-0 line that another rank's output cut in torchrun's tee);
- a line from a rank other than 0 (torchrun's `[default1]:` / `[rank1]:` prefixes; a rank 0
  prefix is stripped, so a `--tee`d log parses like a plain one);
- torchrun's and torch.distributed's own log lines (`W1127 12:00:00.123 4242 torch/...`,
  `WARNING:torch.distributed...`, the `*****` OMP banner);
- a Python traceback, from `Traceback (most recent call last):` to its exception line;
- an evaluation in a nanochat step line's format (`step 00100 | validation loss: 3.2`).

Numbers may carry thousands separators (`16,384`) and a `%` or unit the pattern leaves outside its
group. Torch-free: this module runs in the moectl process.

A loss printed as `nan` / `inf` (the run diverged) is a step with a non-finite loss, as in the
engine's own metrics (engine.schema: null on the wire, NaN when read), never a skipped line. Most
loss patterns only take digits (`loss ([\\d.]+)`): when one does not match a step line holding such
a word, each `nan`/`inf` is read as a number of the same length (`0.0`) and the pattern tried once
more; if its group lands on that word, the word is the loss. Any other field must be a finite number.

Training time, when the trainer does not print its own (nanochat's `total time`, `Total training
time`), is the sum of the printed step times. A trainer that prints every Nth step (nanoGPT's
`log_interval`) is timed as dt x the steps since the previous printed line: each printed dt stands
for the unprinted steps before it. That is an estimate, and a warning says so, with how many steps
were never printed (the tail means are over the printed steps only). Summing the printed dt alone
would count a tenth of the time of a run printed every 10th step; the wall clock between lines would
count evals and checkpoint saves, and an imported log has no wall clock.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import IO, Callable, Optional

from engine.schema import RunSummary, StartInfo, StepMetrics, to_line
from moectl.atomic import write_bytes_atomic
from moectl.text import ANSI

# One line of output: up to a newline (`\n`, `\r\n`) or a carriage return that redraws the line. A
# `\r` as the last character may be the first half of `\r\n`: it ends a line only once the next
# character is there (or the output has ended).
_LINE_BYTES = re.compile(rb"[^\r\n]*(?:\r\n|\r(?=[^\n])|\n)")
_LINE_TEXT = re.compile(r"[^\r\n]*(?:\r\n|\r(?=[^\n])|\n)")


def split_lines(buffer, *, ended: bool = False):
    """(the complete lines of `buffer` (bytes or str), each with its `\n` / `\r\n` / `\r`; the rest).
    `ended`: nothing follows, so a last `\r` ends its line (the rest is then a line cut mid-print)."""
    pattern = _LINE_BYTES if isinstance(buffer, bytes) else _LINE_TEXT
    lines, end = [], 0
    while end < len(buffer):
        # Anchored at `end`: a failed match scans the unterminated rest once. (finditer would retry
        # from every position of it, each scan to the end: quadratic in a long line.)
        m = pattern.match(buffer, end)
        if m is None:
            break
        lines.append(m.group())
        end = m.end()
    rest = buffer[end:]
    if ended and rest.endswith(b"\r" if isinstance(rest, bytes) else "\r"):
        lines.append(rest)
        rest = rest[:0]
    return lines, rest


def line_ended(raw: str) -> bool:
    """Whether a line of `split_lines` is whole (a newline or a redraw ends it)."""
    return raw.endswith(("\n", "\r"))


# The schema fields a pattern may fill (everything a step line can carry but its number).
PATTERN_FIELDS = tuple(f.name for f in fields(StepMetrics) if f.name not in ("step", "type"))

# Prefixes torchrun (`--tee`, `log_line_prefix_template`) and torch's own errors put on a rank's line:
# the word and the colon both, so a trainer's own `[3] iter 5 ...` (an epoch, a worker) is its line.
_RANK_PREFIX = re.compile(r"^\[(?:default|rank)(\d+)\]:[ ]?")
_RANK0_SPLICE = re.compile(r"\[rank0\]:")  # moectl's own template (moectl.trainer.RANK_PREFIX_TEMPLATE), mid-line
_OTHER_RANK_SPLICE = re.compile(r"\[rank[1-9]\d*\]:")
_NOISE = (
    re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d(?:\.\d+)? +\d+ "),  # glog-style: torch.distributed C++/python
    re.compile(r"^(?:DEBUG|INFO|WARNING|ERROR|CRITICAL):torch\."),  # python logging of torch.*
    re.compile(r"^\*{5,}"),  # torchrun's OMP_NUM_THREADS banner
)

# nanochat's base_train step line: `step 00012/00040 (30.00%) | loss: 3.72 | dt: 637.19ms | ...`.
_STEP_NUMBER = r"(\d{1,3}(?:,\d{3})+|\d+)"  # 12, 01200, or with separators: 1,200 (never read as 1)
_NANOCHAT_STEP = re.compile(rf"^\s*step\s+{_STEP_NUMBER}(?:\s*/\s*{_STEP_NUMBER})?\b(.*)$")
_PEAK = re.compile(r"Peak memory usage:\s*([\d,]+(?:\.\d+)?)\s*MiB", re.IGNORECASE)
_TOTAL = re.compile(r"Total training time:\s*([\d,]+(?:\.\d+)?)\s*(ms|s|m|min|h)\b", re.IGNORECASE)
_UNIT_S = {"ms": 1e-3, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
_UNIT_MS = {"ms": 1.0, "s": 1e3, "m": 6e4, "min": 6e4, "h": 3.6e6}
# nanochat key -> schema field. `bal` is the raw balance loss (the engine's aux_loss); `total time`
# is cumulative training time (the engine's elapsed_s). `aux` and `load_max` are what engine.train
# prints in the same line format, so its train.log reads back as its own metrics.jsonl.
_NANOCHAT_FIELDS = {
    "loss": "loss", "bal": "aux_loss", "aux": "aux_loss", "aux_loss": "aux_loss", "lr": "lr", "dt": "dt_ms",
    "tok/sec": "tok_per_sec", "bf16_mfu": "mfu", "mfu": "mfu", "drop": "drop_frac",
    "drop_frac": "drop_frac", "load_max": "expert_load_max", "total time": "elapsed_s",
}
# An evaluation printed as a step line (engine.train's `step 00100 | validation loss: 3.2`): not a
# training step, and not a step line that could not be read either.
_EVAL_KEY = re.compile(r"^(?:val|validation|eval)\b", re.IGNORECASE)


# Figures that are never below zero: a negative one printed is a placeholder (nanoGPT's mfu
# -100%, a -1 for "unknown") or garbage, and is left out of its step, which keeps its loss.
NON_NEGATIVE = frozenset({"dt_ms", "tok_per_sec", "mfu", "peak_mem_mib", "drop_frac", "expert_load_max", "elapsed_s"})


def number(text: str) -> float:
    """'822,814' -> 822814.0. Finite only (ValueError otherwise)."""
    value = float(text.strip().replace(",", "").replace("_", "").rstrip("%"))
    if not math.isfinite(value):
        raise ValueError(f"not finite: {text}")
    return value


def loss_number(text: str) -> float:
    """A loss: a number as `number` reads it, or `nan` / `inf` / `-inf` / `Infinity` (any case),
    which a diverged run prints: math.nan or +-math.inf then (engine.schema writes either as null)."""
    word = text.strip()
    if _NON_FINITE.fullmatch(word):
        return float(word)
    return number(word)


# `nan`, `inf`, `-inf`, `infinity`, any case, as a word of its own (not `nanochat`, `inference`).
_NON_FINITE = re.compile(r"(?<![\w.])[+-]?(?:nan|inf(?:inity)?)(?![\w.])", re.IGNORECASE)
# A whole field's text that is no finite figure: `inf`, `nan`, `-inf`, with a unit glued on (`infms`).
_NON_FINITE_FIGURE = re.compile(r"[+-]?(?:nan|inf(?:inity)?)\s*(?:[a-z/]+|%)?", re.IGNORECASE)


def _masked_loss(pattern: re.Pattern, line: str) -> Optional[float]:
    """The loss of a line printing it as nan/inf to a pattern whose group takes digits only (see
    the module docstring): None when the pattern's group does not land on such a word."""
    words = list(_NON_FINITE.finditer(line))
    if not words:
        return None
    masked = line
    for w in words:  # `0.0`, `0.00` (-inf), ...: the same length, so a span of the masked line is the line's
        masked = masked[:w.start()] + "0." + "0" * (w.end() - w.start() - 2) + masked[w.end():]
    m = pattern.search(masked)
    if m is None:
        return None
    for w in words:
        if m.start(1) < w.end() and w.start() < m.end(1):
            return float(w.group())
    return None


def _duration_s(text: str) -> float:
    return _duration(text, _UNIT_S, "s")


def _duration_ms(text: str) -> float:
    """A step time in ms, as printed (`642.32ms` is 642.32, not 642.3200000000002 by way of seconds)."""
    return _duration(text, _UNIT_MS, "ms")


def _duration(text: str, units: dict[str, float], default: str) -> float:
    m = re.fullmatch(r"((?:[\d,]+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*(ms|s|m|min|h)?", text.strip())
    if not m:
        raise ValueError(f"bad duration {text!r}")
    return number(m.group(1)) * units[(m.group(2) or default).lower()]


def _compile(name: str, regex: str, groups: int) -> re.Pattern:
    try:
        pattern = re.compile(regex)
    except re.error as exc:
        raise ValueError(f"{name}: not a regular expression ({exc}): {_shown(regex)}") from None
    if pattern.groups < groups:
        raise ValueError(f"{name}: {_shown(regex)} needs a (group) around the number it reads")
    return pattern


def _shown(regex: str) -> str:
    """A regex as the config holds it (a TOML literal string), not with repr's doubled backslashes."""
    return f"'{regex}'" if "'" not in regex else repr(regex)


def check_patterns(step: Optional[str], tokens_per_step: Optional[str], patterns: dict[str, str],
                   sep: str = "; ") -> None:
    """ValueError naming every bad key, `sep`-separated (fixed in one go, not one per attempt): an
    unknown field, a regex that does not compile or has no group, a step pattern without a loss."""
    problems = []
    for name, regex in patterns.items():
        if name not in PATTERN_FIELDS:
            problems.append(f"patterns.{name}: not a field of the metrics schema ({', '.join(PATTERN_FIELDS)})")
            continue
        problems += _problem(f"patterns.{name}", regex)
    if step is not None:
        problems += _problem("step", step)
        if "loss" not in patterns:
            problems.append("patterns.loss is required with format = \"regex\": every step of the schema has a loss")
    if tokens_per_step is not None:
        problems += _problem("tokens_per_step", tokens_per_step)
    if problems:
        raise ValueError(sep.join(problems))


def _problem(name: str, regex: str) -> list[str]:
    try:
        _compile(name, regex, 1)
    except ValueError as exc:
        return [str(exc)]
    return []


@dataclass
class StdoutFormat:
    """How to read one trainer's output: nanochat's built-in step line, or regexes."""

    kind: str  # "nanochat" | "regex"
    step: Optional[re.Pattern] = None
    tokens_per_step: Optional[re.Pattern] = None
    patterns: dict[str, re.Pattern] = field(default_factory=dict)

    @classmethod
    def build(cls, kind: str, step: Optional[str] = None, tokens_per_step: Optional[str] = None,
              patterns: Optional[dict[str, str]] = None) -> "StdoutFormat":
        """Validated (ValueError naming the bad key)."""
        patterns = dict(patterns or {})
        if kind not in ("nanochat", "regex"):
            raise ValueError(f"unknown stdout format {kind!r} (nanochat | regex)")
        if kind == "regex" and step is None:
            raise ValueError("format regex needs a step pattern")
        check_patterns(step, tokens_per_step, patterns)
        return cls(
            kind=kind,
            step=re.compile(step) if step is not None else None,
            tokens_per_step=re.compile(tokens_per_step) if tokens_per_step is not None else None,
            patterns={k: re.compile(v) for k, v in patterns.items()},
        )

    @classmethod
    def from_config(cls, metrics) -> "StdoutFormat":
        """From a validated `[metrics]` section with source = "stdout"."""
        return cls.build(metrics.format, metrics.step, metrics.tokens_per_step, metrics.patterns)

    def describe(self) -> str:
        return "nanochat step lines" if self.kind == "nanochat" else f"step pattern {self.step.pattern!r}"


class StdoutParser:
    """Feeds lines, returns records. Keeps what the run summary and the warnings need."""

    def __init__(self, fmt: StdoutFormat, planned_steps: Optional[int] = None, world_size: int = 1,
                 device: str = "cpu"):
        self.fmt = fmt
        self.planned_steps = planned_steps
        self.world_size = world_size
        self.device = device
        self.tokens_per_step: Optional[float] = None
        self.steps_seen = 0  # step lines turned into records
        self.unprinted = 0  # steps between two printed step lines (a trainer printing every Nth step)
        self.time_estimated = False  # training time includes dt x unprinted steps (see the module docstring)
        self.printed_elapsed = False  # a step line printed its own training time (nanochat's `total time`)
        self.skipped = 0  # lines that matched the step pattern but could not be read
        self.partial = 0  # lines without their newline (never steps)
        self.matched = {name: 0 for name in fmt.patterns}  # step lines each pattern matched
        # step lines whose figure of this field was no number (`tok/sec: 1.2M`): the field is left
        # out of the step, which keeps its loss; {field: (count, the first such text)}
        self.unread_fields: dict[str, tuple[int, str]] = {}
        self.last: Optional[StepMetrics] = None
        self.peak_mem_mib: Optional[float] = None
        self.total_time_s: Optional[float] = None
        self._started = False
        self._elapsed_s = 0.0
        self._in_traceback = False
        self.notes: list[str] = []  # what a reader of the numbers should know, said by whoever fed the lines
        self._redrawn = False  # the last step line ended in `\r`: a bar that the next line redraws
        self.went_back = 0  # step lines numbered below the line before them (a restarted trainer)
        self._first_went_back: Optional[tuple[int, int]] = None  # (from step, to step), the first time
        self._highest = -1  # the highest step number seen
        self.repeated = 0  # step lines numbered as the line before them (not a redrawn bar)
        self._last_partial: Optional[str] = None  # the output's last line, when it had no newline

    # --- one line ---------------------------------------------------------------------------------

    def feed(self, raw: str) -> list:
        """The records this line yields: [] for anything that is not a step, else [step] (preceded
        by the run's StartInfo the first time). `raw` is one line of `split_lines`, its `\n` or `\r`
        kept; without one it is partial."""
        if not line_ended(raw):
            if raw.strip():
                self.partial += 1
                self._last_partial = raw
            return []
        self._last_partial = None
        line = raw.rstrip("\r\n").rsplit("\r", 1)[-1]  # (a caller's own line with `\r`s: what a terminal shows last)
        if "\x1b" in line:  # a logger's colours: read as a terminal shows the line
            line = ANSI.sub("", line)
        m = _RANK_PREFIX.match(line)
        if m:
            if int(m.group(1)) != 0:
                return []
            # torchrun's tee prefixes each piece it reads: a line printed in parts carries rank 0's
            # prefix again where a part began (`loss: [rank0]:2.0`), mended here. Where another
            # rank's output landed in the middle, rank 0's part was cut there (its rest, if any,
            # comes on a line of its own): a partial line, never a step.
            line = _RANK0_SPLICE.sub("", line[m.end():])
            if _OTHER_RANK_SPLICE.search(line):
                self.partial += 1
                return []
        if self._traceback(line) or any(p.match(line) for p in _NOISE):
            return []
        rec = self._step(line)
        if rec is None:
            self._run_line(line)
            return []
        if self.last is not None and rec.step == self.last.step and self._redrawn:
            self._redrawn = raw.endswith("\r")
            return []  # a progress bar refreshed without a new step: the step it showed already
        self._redrawn = raw.endswith("\r")
        if self.last is not None and rec.step == self.last.step:
            self.repeated += 1  # (not a redrawn bar: that returned above)
        if self.last is not None and rec.step < self.last.step:
            # The numbering went back: a trainer restarted (from a checkpoint, or from scratch), or
            # several processes print their steps. Each step number keeps its latest line, as the
            # engine's resumed runs do; what is left of the earlier numbering is said, not hidden.
            self.went_back += 1
            self._first_went_back = self._first_went_back or (self.last.step, rec.step)
        self._highest = max(self._highest, rec.step)
        out: list = []
        if not self._started:
            self._started = True
            out.append(StartInfo(steps=self.planned_steps or 0, world_size=self.world_size,
                                 tokens_per_step=int(self.tokens_per_step or 0), device=self.device))
        self.steps_seen += 1
        self.last = rec
        out.append(rec)
        return out

    def _traceback(self, line: str) -> bool:
        if line.startswith("Traceback (most recent call last)"):
            self._in_traceback = True
            return True
        if self._in_traceback:
            # Indented frames belong to it; the first unindented line is the exception and ends it.
            if not line[:1].isspace() and line.strip():
                self._in_traceback = False
            return True
        return False

    def _step(self, line: str) -> Optional[StepMetrics]:
        if self.fmt.kind == "nanochat":
            m = _NANOCHAT_STEP.match(line)
            if m is None:
                return None
            try:
                kwargs = _nanochat_fields(m.group(3), self._unread)
                if "loss" not in kwargs and _is_eval_line(m.group(3)):
                    return None
                kwargs.update(self._pattern_fields(line))
                if m.group(2):
                    self.planned_steps = int(number(m.group(2)))
                return self._make(int(number(m.group(1))), kwargs)
            except (ValueError, TypeError):
                self.skipped += 1
                return None
        m = self.fmt.step.search(line)
        if m is None or m.group(1) is None:  # (an optional group that took no part: no step number here)
            return None
        try:
            return self._make(int(number(m.group(1))), self._pattern_fields(line))
        except (ValueError, TypeError):
            self.skipped += 1
            return None

    def _pattern_fields(self, line: str) -> dict[str, float]:
        kwargs = {}
        for name, pattern in self.fmt.patterns.items():
            pm = pattern.search(line)
            if pm is not None and pm.group(1) is None:
                pm = None  # an optional group that took no part in the match: not on this line
            if pm is not None:
                self.matched[name] += 1
                if name != "loss" and _NON_FINITE_FIGURE.fullmatch(pm.group(1).strip()):
                    continue  # `dt inf`: that figure is missing from the step, the step is not
                if name == "loss":
                    kwargs[name] = loss_number(pm.group(1))  # (no loss that reads: no step)
                    continue
                try:
                    kwargs[name] = number(pm.group(1))
                except ValueError:
                    self._unread(name, pm.group(1))
            elif name == "loss" and (loss := _masked_loss(pattern, line)) is not None:
                kwargs[name] = loss  # `loss nan` to a `loss ([\d.]+)` pattern
                self.matched[name] += 1
        return kwargs

    def _unread(self, name: str, text: str) -> None:
        count, first = self.unread_fields.get(name, (0, text.strip()))
        self.unread_fields[name] = (count + 1, first)

    def _make(self, step: int, kwargs: dict[str, float]) -> StepMetrics:
        if "loss" not in kwargs:
            raise ValueError("no loss")
        for name in NON_NEGATIVE.intersection(kwargs):
            if kwargs[name] < 0:  # nanoGPT prints mfu -100.00% until it has an estimate: not a figure
                del kwargs[name]
        dt_ms = kwargs.get("dt_ms")
        if "tok_per_sec" not in kwargs and self.tokens_per_step and dt_ms:
            kwargs["tok_per_sec"] = self.tokens_per_step / (dt_ms / 1000.0)
        # Steps the trainer ran but did not print since its previous step line (none before the
        # first line, or when the numbering restarts: a resumed run, a second phase).
        gap = step - self.last.step - 1 if self.last is not None and step > self.last.step else 0
        self.unprinted += gap
        if "elapsed_s" in kwargs:
            self._elapsed_s = kwargs["elapsed_s"]  # where the sum goes on from, should the trainer stop printing it
            self.printed_elapsed = True
        elif dt_ms is not None:
            # Training time so far as the sum of step times, the trainer not printing its own; this
            # line's dt stands for the unprinted steps before it too (see the module docstring).
            self._elapsed_s += dt_ms / 1000.0 * (1 + gap)
            self.time_estimated = self.time_estimated or gap > 0
            kwargs["elapsed_s"] = self._elapsed_s
        return StepMetrics(step=step, **kwargs)

    def in_step_order(self, steps: list[StepMetrics]) -> list[StepMetrics]:
        """A whole log's steps (as `feed` returned them) by number, each number's latest line, for
        `moectl import`. Fed in file order, a log whose step lines are out of order (two processes'
        lines interleaved, a resumed run's log pasted before the first's) had each step that came
        early count the ones it skipped as never printed, and a summed training time counted those
        again when they came; so for such a log the unprinted steps and the summed time are taken
        again over the steps in number order, as a csv's are (moectl.importers). A trainer's own
        printed times stay as printed. A log in order, nearly every one, is only deduplicated.
        `steps` must be this parser's own records (their summed times are set again in place)."""
        by_step = {s.step: s for s in steps}  # a repeated step number: the last occurrence wins
        ordered = [by_step[k] for k in sorted(by_step)]
        if not self.went_back:
            return ordered
        self.unprinted, elapsed, previous = 0, 0.0, None
        if not self.printed_elapsed:
            self.time_estimated = False
        for s in ordered:
            gap = s.step - previous - 1 if previous is not None else 0
            previous = s.step
            self.unprinted += gap
            if not self.printed_elapsed and s.dt_ms is not None:
                elapsed += s.dt_ms / 1000.0 * (1 + gap)
                self.time_estimated = self.time_estimated or gap > 0
                s.elapsed_s = elapsed  # (in place: the records are this parser's own, and a copy of each cost 9 us)
        return ordered

    def _run_line(self, line: str) -> None:
        """Run-level facts printed outside the step lines."""
        if self.fmt.tokens_per_step is not None and self.tokens_per_step is None:
            tm = self.fmt.tokens_per_step.search(line)
            if tm is not None and tm.group(1) is not None:
                try:
                    self.tokens_per_step = number(tm.group(1))
                except ValueError:
                    pass
                return
        if (pm := _PEAK.search(line)) is not None:
            self.peak_mem_mib = number(pm.group(1))
        elif (tm := _TOTAL.search(line)) is not None:
            self.total_time_s = number(tm.group(1)) * _UNIT_S[tm.group(2).lower()]

    # --- the end ----------------------------------------------------------------------------------

    def finish(self) -> Optional[RunSummary]:
        """The run's summary record, or None when no step line was ever seen."""
        if self.last is None:
            return None
        total = self.total_time_s if self.total_time_s is not None else self.last.elapsed_s
        return RunSummary(steps=self.steps_seen, world_size=self.world_size, device_name=self.device,
                          peak_mem_mib=self.peak_mem_mib, total_time_s=total, final_loss=self.last.loss)

    def cut_step(self) -> Optional[int]:
        """The step number of the output's last line when it had no newline and would otherwise
        read as a step (a trainer's `print(..., end="")` before it exits, or a line cut mid-write by
        a kill: the two look the same, so it is not read, but said), else None."""
        if not self._last_partial:
            return None
        cut = [rec for rec in StdoutParser(self.fmt).feed(self._last_partial + "\n") if isinstance(rec, StepMetrics)]
        return cut[-1].step if cut else None

    def warnings(self) -> list[str]:
        """One line per pattern that never matched (a typo'd regex reads as missing data, not a crash)."""
        out = list(self.notes)
        cut = self.cut_step()
        if cut is not None:
            out.append(f"the trainer's last line has no newline, so its step {cut} was not read (a line cut "
                       "mid-write looks the same): end it with a newline (print's default)")
        if self.steps_seen:
            for name, count in self.matched.items():
                if count == 0:
                    out.append(f"metrics pattern {name} = {self.fmt.patterns[name].pattern!r} never matched "
                               f"any of {self.steps_seen} step lines: {name} is missing from this run")
        if self.fmt.tokens_per_step is not None and self.tokens_per_step is None:
            out.append(f"metrics pattern tokens_per_step = {self.fmt.tokens_per_step.pattern!r} never matched: "
                       "no tok/sec unless the step lines print it")
        if self.went_back:
            before, after = self._first_went_back
            last = self.last.step
            stale = (f"; steps {last + 1}-{self._highest} were not reached again and are from before it"
                     if last < self._highest else "")
            out.append(f"the step numbers went back {self.went_back} time(s), first from step {before} to {after} "
                       "(a restarted trainer, or several processes printing steps): each step number keeps its "
                       f"latest line{stale}")
        if self.repeated:
            out.append(f"{self.repeated} of {self.steps_seen} step lines repeated the step number of the line before "
                       "them: each number keeps its latest line (does the step pattern take the whole number?)")
        if self.skipped:
            out.append(f"{self.skipped} step line(s) could not be read (no loss, or not a number) and were skipped")
        for name, (count, first) in self.unread_fields.items():
            out.append(f"{name}: {count} step line(s) printed no number there (first: {first[:40]!r}); "
                       f"{name} is left out of those steps, which keep their loss")
        if self.unprinted and (self.partial or self.skipped):
            # Lines cut mid-print were seen (another rank's output spliced into a rank-0 progress
            # bar, say): the missing steps may have been printed and lost there, not skipped.
            why = "; ".join(said for said, n in (
                (f"{self.partial} line(s) were cut mid-print, by another rank's output or the end of the log", self.partial),
                (f"{self.skipped} step line(s) could not be read", self.skipped)) if n)
            out.append(f"{self.unprinted} steps were not read ({self.steps_seen} step lines were; {why}, and may have "
                       "held them): the tail means are over the steps read only"
                       + ("; training time counts each read dt for the steps missing before it "
                          "(dt x steps since the previous line: an estimate)" if self.time_estimated else ""))
        elif self.unprinted:
            out.append(f"{self.unprinted} steps were never printed (the trainer printed {self.steps_seen} step lines): "
                       "the tail means are over the printed steps only"
                       + ("; training time counts each printed dt for the unprinted steps before it "
                          "(dt x steps since the previous line: an estimate)" if self.time_estimated else ""))
        return out

    def no_steps_reason(self) -> str:
        if self.skipped:  # the step pattern matched; what failed is reading the line's loss
            loss = self.fmt.patterns.get("loss")
            said = (f"a loss matched by the loss pattern {loss.pattern!r} that is a number" if loss is not None
                    else "a 'loss:' field holding a number")
            return (f"no step could be read from the trainer's output: {self.skipped} line(s) matched the "
                    f"{'step pattern' if loss is not None else 'step line'}, but none had {said} ({self.fmt.describe()})")
        return f"no step line in the trainer's output matched ({self.fmt.describe()})"


def _is_eval_line(rest: str) -> bool:
    return any(_EVAL_KEY.match(part.partition(":")[0].strip()) for part in rest.split("|") if ":" in part)


def _nanochat_fields(rest: str, unread: Callable[[str, str], None] = lambda name, text: None) -> dict[str, float]:
    """A nanochat step line's fields after its step number. A loss that is no number raises
    ValueError (no step without its loss); any other field that is no number is left out, and
    `unread(field, text)` told."""
    kwargs: dict[str, float] = {}
    for part in rest.split("|"):
        key, sep, raw = part.partition(":")
        key = key.strip().lower()
        if not sep or key not in _NANOCHAT_FIELDS:
            continue  # "(99.64%)", "lrm", "epoch", "eta", anything new: not ours
        name = _NANOCHAT_FIELDS[key]
        raw = raw.strip()
        if name != "loss" and (raw in ("-", "—", "n/a", "N/A") or _NON_FINITE_FIGURE.fullmatch(raw)):
            # Not known for this step (the engine's `mfu: -` on CPU), or not a figure (`dt: infms`,
            # `tok/sec: nan` of a step timed at 0): that field is missing, the step and its loss are not.
            continue
        if name == "loss":
            kwargs[name] = loss_number(raw)
            continue
        try:
            if name == "dt_ms":
                kwargs[name] = _duration_ms(raw)
            elif name == "elapsed_s":
                kwargs[name] = _duration_s(raw)
            else:
                kwargs[name] = number(raw)
        except ValueError:
            unread(name, raw)
    return kwargs


def parse_text(text: str, fmt: StdoutFormat, *, finished: bool = False) -> tuple[StdoutParser, list[StepMetrics]]:
    """A whole log through the live parser, split where the tee splits (`split_lines`), so a
    last line without its newline is partial exactly as it would be live: a line cut mid-write
    (a killed trainer) looks the same as a file saved without its last newline, and only the first
    is common in training logs. `finished` (`moectl import`): such a line that would read as a step
    is said in the warnings, so the step is not lost without a word."""
    parser = StdoutParser(fmt)
    complete, last = split_lines(text, ended=True)
    steps = []
    for line in complete + [last]:
        steps += [rec for rec in parser.feed(line) if isinstance(rec, StepMetrics)]
    cut = parser.cut_step() if finished else None
    parser._last_partial = None  # said here, in a log's words (or not at all: a live tail's last line)
    if cut is not None:
        parser.notes.append(f"the log's last line has no newline, so its step {cut} was not read (a line cut "
                            "mid-write looks the same); if it is whole, end the file with a newline and import again")
    return parser, steps


# What LiveMetricsWriter keeps of its own lines to put metrics.jsonl back (see there): far more
# than the metrics of any run moectl is for (a line is ~250 bytes), and a bound on its memory.
KEEP_BYTES = 64 << 20


class LiveMetricsWriter:
    """What `moectl run` hangs on the tee for a stdout-parsed trainer: each parsed record appended
    (and flushed) to the run's metrics.jsonl, where the progress follower and every reader find it.

    The trainer is told the run directory ($MOECTL_RUN_DIR, a mapped out_dir), and `metrics.jsonl`
    is a common name for a trainer's own file: one that writes it there truncates or replaces
    moectl's. So the writer keeps what the file should hold, and `close()` checks it is still that
    file at that size; if not, the trainer's file is kept as `metrics.trainer.jsonl`, moectl's is put
    back, and the record says so.

    Called from the tee thread only, then `close()` from the launching thread once the tee is done."""

    def __init__(self, path: Path, parser: StdoutParser):
        self.parser = parser
        self.path = Path(path)
        self._fh: IO[str] = open(path, "a", encoding="utf-8")
        self._stopped = False
        # A requeued job appends to what its earlier attempts wrote: that is moectl's too.
        before = self.path.read_bytes()
        self._kept: Optional[list[bytes]] = [before]
        self._size = len(before)  # what the file holds, all of it moectl's
        self._inode = os.fstat(self._fh.fileno()).st_ino

    def __call__(self, raw: str) -> None:
        if self._stopped:
            return
        try:
            records = self.parser.feed(raw)
        except Exception as exc:  # a parser bug: the run goes on, and its record says what is missing
            self._stopped = True
            self.parser.notes.append(f"the stdout metrics parser stopped after {self.parser.steps_seen} step(s), at the "
                                     f"line {raw.rstrip()[:200]!r} ({type(exc).__name__}: {exc}): later steps are missing")
            return
        for rec in records:
            self._write(to_line(rec) + "\n")

    def _write(self, line: str) -> None:
        data = line.encode()
        self._fh.write(line)
        self._fh.flush()
        self._size += len(data)
        if self._kept is not None:
            self._kept.append(data)
            if self._size > KEEP_BYTES:
                self._kept = None  # past the bound: a clash is still found and said, no longer mended

    def close(self) -> None:
        if self._fh.closed:
            return
        summary = self.parser.finish()
        last = to_line(summary) + "\n" if summary is not None else ""
        try:
            # Checked before the summary goes in: written into a file the trainer took over, it
            # would end the trainer's file kept aside, and be missing from moectl's put back.
            st = os.stat(self.path)
            ours = st.st_ino == self._inode and st.st_size == self._size
        except FileNotFoundError:
            st, ours = None, False
        except OSError as exc:  # (the run's outcome stands; what is wrong with its metrics is said)
            st, ours = None, True
            self.parser.notes.append(f"{self.path.name} could not be checked after the run: {exc}")
        if ours and last:
            self._write(last)
        self._fh.close()
        if not ours:
            try:
                self._put_back(st, last.encode())
            except OSError as exc:
                self.parser.notes.append(f"{self.path.name} could not be put back after the run: {exc}")

    def _put_back(self, st: Optional[os.stat_result], last: bytes) -> None:
        """The trainer wrote, replaced or deleted metrics.jsonl: its file goes aside, moectl's back
        (with the run's summary `last`), and the record says so."""
        aside = self.path.with_name("metrics.trainer.jsonl")
        if st is not None:
            os.replace(self.path, aside)
        kept = f"the trainer's file is kept as {aside.name}" if st is not None else "the trainer deleted it"
        if self._kept is None:
            self.parser.notes.append(
                f"{self.path.name} was written by the trainer too (it writes into the run directory, $MOECTL_RUN_DIR): "
                f"{kept}, and moectl's metrics of this run are lost; have the trainer write its files elsewhere "
                "or under other names")
            return
        write_bytes_atomic(self.path, b"".join(self._kept) + last)
        self.parser.notes.append(
            f"{self.path.name} was written by the trainer too (it writes into the run directory, $MOECTL_RUN_DIR): "
            f"{kept} and moectl's is put back; have the trainer write its files elsewhere or under other names")
