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
from datetime import datetime
from pathlib import Path
from typing import Optional, Sequence

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


def resolve_grouped(root: Path, refs: Sequence[str], runs: Optional[Sequence[RunRecord]] = None) -> list[list[RunRecord]]:
    """Each RUN argument -> the runs it means: [the run], or its group's completed runs."""
    from moectl.store import list_runs, resolve_run

    runs = list_runs(root) if runs is None else runs
    out = []
    for ref in refs:
        # A group's own id (`run --repeat` prints it, `compare --json` names it as the baseline).
        members = sorted((r for r in runs if r.group == ref), key=lambda r: (r.repeat or 0, r.id))
        if members:
            out.append(group_members(runs, members[-1]))
            continue
        rec = resolve_run(root, ref, runs)
        out.append(group_members(runs, rec) if means_group(ref, rec) else [rec])
    return out
