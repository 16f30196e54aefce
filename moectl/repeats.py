"""Repeat groups: one configuration run N times with seeds seed, seed+1, ... (issue 10).

    group, requests = repeat_requests(cfg, request, 3)   # `moectl run --repeat 3`
    members = group_members(runs, record)               # a recorded run's whole group, in order

Each repeat is an ordinary run (same guards, record, report, commit) whose record carries
`group` (shared by the N runs) and `repeat` (1..N), and whose id ends in `-r<k>` so N runs
started within one second still get N fresh directories. The seed goes through the run's `seed`
option, so a foreign trainer receives it through its `[launch.options] seed` mapping, and one
without that mapping is refused before the first repeat (exit 2): repeats that all ran the same
seed would measure nothing.

Which runs a RUN argument means (SPEC §4, issue 10): a group's id, or a tag (or a prefix of one)
whose most recent run belongs to a group, means the group's completed runs; a run id, its prefix
or its directory means that one run.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable, Optional, Sequence

from moectl.config import Config
from moectl.errors import UsageError
from moectl.plan import RunRequest, plan_run
from moectl.records import RUN_RECORD, RunRecord


def base_seed(cfg: Config, request: RunRequest) -> int:
    """The first repeat's seed: --seed, else [defaults] seed, else 0 (the engine's own default)."""
    if request.seed is not None:
        return request.seed
    return cfg.defaults.seed if cfg.defaults.seed is not None else 0


def repeat_requests(cfg: Config, request: RunRequest, n: int, now: Optional[datetime] = None) -> tuple[str, list[RunRequest]]:
    """(the group id, the N requests). The group id names the configuration and the time:
    `<YYYYmmdd_HHMMSS>_<project>-<tag>-x<N>`."""
    if request.exp_dir is not None:
        raise UsageError(f"--exp-dir names one directory; --repeat {n} makes {n} runs (leave --exp-dir out)")
    tag = plan_run(cfg, request, now or datetime.now(), gpus_available=None, nodes=None)  # only the tag and id
    group = f"{tag.run_id}-x{n}"
    seed = base_seed(cfg, request)
    return group, [
        request.model_copy(update={"seed": seed + k, "group": group, "repeat": k + 1, "tag": tag.tag})
        for k in range(n)
    ]


def group_members(runs: Sequence[RunRecord], record: RunRecord) -> list[RunRecord]:
    """The completed runs of `record`'s group in repeat order (one completed run alone when only
    one did: an interrupted last repeat does not stand for a group that has a measured one), or
    [record] when it has no group or none of its repeats completed."""
    if record.group is None:
        return [record]
    done = sorted((r for r in runs if r.group == record.group and r.status == "completed"),
                  key=lambda r: (r.repeat or 0, r.id))
    return done or [record]


def means_group(ref: str, record: RunRecord) -> bool:
    """Whether a RUN argument that resolved to `record` names its group: it was the tag (or a tag
    prefix), not the run id, a prefix of the id, or a directory."""
    if record.group is None or os.sep in ref or (Path(ref).expanduser() / RUN_RECORD).is_file():
        return False
    if record.id.startswith(ref):
        return False
    return bool(record.tag) and record.tag.startswith(ref)


@dataclass
class Entry:
    """What one RUN argument means: `runs` behind its figures (the run, or its group's completed
    runs); `group` when the argument named a group (its id, or a tag whose newest run is in one),
    even when a single run of it stands for it; `left_out`: the group's repeats not in `runs`, and why."""

    runs: list[RunRecord]
    group: Optional[str] = None
    left_out: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.runs[0].group if len(self.runs) > 1 else self.runs[0].id


def planned_repeats(group: str) -> Optional[int]:
    """N of a group id `...-x<N>` (`run --repeat N`, a sweep's `repeats = N`); None for another id
    (a `..._fallback_none` group holds only the repeats whose compile failed: no N is planned)."""
    m = re.search(r"-x(\d+)$", group)
    return int(m.group(1)) if m else None


def left_out(runs: Sequence[RunRecord], group: str, used: Sequence[RunRecord]) -> list[str]:
    """The repeats of `group` that are not behind its figures (`used`), and why: `repeat 2 failed`
    (the newest run of that repeat, when none of its runs is used), `repeat 3 never ran`."""
    used_ids = {r.id for r in used}
    used_repeats = {r.repeat for r in used}
    newest: dict[int, RunRecord] = {}
    for r in runs:  # newest first (list_runs): the first seen of a repeat is its newest run
        if r.group == group and r.id not in used_ids and r.repeat is not None and r.repeat not in used_repeats:
            newest.setdefault(r.repeat, r)
    n = planned_repeats(group)
    numbers = sorted(set(newest) | (set(range(1, n + 1)) - used_repeats if n else set()))
    out = []
    for k in numbers:
        if k in newest:
            out.append(f"repeat {k} {getattr(newest[k], 'display_status', newest[k].status)}")
        else:
            out.append(f"repeat {k} never ran")
    return out


def resolve_entries(root: Path, refs: Sequence[str], runs: Optional[Sequence[RunRecord]] = None,
                    ours: Optional[Callable[[Optional[str]], bool]] = None) -> list[Entry]:
    """Each RUN argument -> the Entry it means (see `Entry`); `ours` as moectl.store.resolve_run takes it."""
    from moectl.store import list_runs, resolve_run

    runs = list_runs(root) if runs is None else runs
    out = []
    for ref in refs:
        # A group's own id (`run --repeat` prints it, `compare --json` names it as the baseline).
        members = sorted((r for r in runs if r.group == ref), key=lambda r: (r.repeat or 0, r.id))
        if members:
            group, used = ref, group_members(runs, members[-1])
        else:
            rec = resolve_run(root, ref, runs, ours)
            if not means_group(ref, rec):
                out.append(Entry([rec]))
                continue
            group, used = rec.group, group_members(runs, rec)
        out.append(Entry(used, group, left_out(runs, group, used)))
    return out


def resolve_baseline(root: Path, ref: str, runs: Optional[Sequence[RunRecord]] = None,
                     ours: Optional[Callable[[Optional[str]], bool]] = None) -> list[RunRecord]:
    """A --baseline as `compare --baseline` reads it: [the run], or a group's completed runs (a group
    id, or a tag whose newest run is in a group)."""
    return resolve_entries(root, [ref], runs, ours)[0].runs


def resolve_grouped(root: Path, refs: Sequence[str], runs: Optional[Sequence[RunRecord]] = None,
                    ours: Optional[Callable[[Optional[str]], bool]] = None) -> list[list[RunRecord]]:
    """Each RUN argument -> the runs it means: [the run], or its group's completed runs."""
    return [e.runs for e in resolve_entries(root, refs, runs, ours)]


def entry_metrics(entry: "Entry | Sequence[RunRecord]", window: int):
    """One `compare` input (moectl.metrics.RunMetrics): a run, or a repeat group (its id, every
    repeat's metrics, each repeat's recorded summary standing in for a metrics.jsonl that is gone).
    A repeat with neither steps nor a recorded summary has no figure to give: it is left out, said so."""
    from engine.schema import METRICS_FILENAME
    from moectl.metrics import RunMetrics, read_metrics

    if not isinstance(entry, Entry):
        entry = Entry(list(entry))
    records, dropped = list(entry.runs), []
    files = [read_metrics(Path(r.exp_dir) / METRICS_FILENAME, tail=window) for r in records]
    if len(records) > 1:
        keep = [i for i, (r, f) in enumerate(zip(records, files)) if f.steps or r.summary is not None]
        if keep:  # (none left: shown as they are, with their empty figures and the notes that say so)
            dropped = [f"repeat {records[i].repeat or i + 1} has no metrics.jsonl and no recorded summary"
                       for i in range(len(records)) if i not in keep]
            records, files = [records[i] for i in keep], [files[i] for i in keep]
    last = records[-1]
    unfinished = any(getattr(r, "display_status", r.status) in ("created", "queued", "running") for r in records)
    if len(records) == 1:
        status = getattr(last, "display_status", last.status)
        return RunMetrics(id=last.id, tag=last.tag, metrics=files[0], options=last.options, fallback=last.summary,
                          unfinished=unfinished, stopped=status if status in ("failed", "interrupted", "stale") else None,
                          left_out=[*entry.left_out, *dropped])
    return RunMetrics(id=last.group, tag=last.tag, metrics=files[-1], options=last.options, fallback=last.summary,
                      members=files, member_ids=[r.id for r in records], member_fallbacks=[r.summary for r in records],
                      unfinished=unfinished, left_out=[*entry.left_out, *dropped])
