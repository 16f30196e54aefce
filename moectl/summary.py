"""EXPERIMENTS.md: the living handoff summary (SPEC §2, issue 4), from the run store and git alone.

    path = write_summary(cfg)          # <repo>/EXPERIMENTS.md; `moectl summary`, and run/sweep after each report
    text = render_summary(cfg, now)    # the markdown, pure apart from the probes and the store

The document answers what a person (or agent) picking the work up needs, in the order of the seed
study's progress summary: what is running now, what every sweep measured and concluded, which legs
are unfinished (with the exact resume command), standalone runs, the latest report commits, and
the constraints in force. Everything but the snapshot of the moment (the `Generated at` line, the
status line and the Runtime Status section) is a function of the store and git, so regenerating
without new runs or commits changes only that snapshot - and then the file is left alone, so no
commit churns on a timestamp or on a process starting elsewhere on a shared machine.
"""
from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import Optional

from moectl import gitops, store
from moectl.config import CONFIG_NAME, SUMMARY_NAME, Config
from moectl.errors import GuardRefused, MoectlError, UsageError
from moectl.atomic import remove_dead_temp_files, write_bytes_atomic
from moectl.records import RunRecord, SweepRecord, write_text_atomic
from moectl.report import COLUMNS, fmt, marked_footnote, summary_cell
from moectl.sweep.report import completed_comparison, legs_table, recommendation
from moectl.sweep.store import (
    final_report_owed, leg_status, owner_alive, previous_sweep, scan_sweeps, settled, sweep_chain, sweep_runs,
)

TIMESTAMP_PREFIX = "- Generated at: "
STATUS_PREFIX = "- Status: "
STANDALONE_LIMIT = 10
# Sweeps shown with their tables and conclusions (the newest); older ones get a line each, up to
# OLDER_SWEEP_LIMIT: a handoff after a hundred sweeps is still a page, not a thousand lines.
SWEEP_LIMIT = 5
OLDER_SWEEP_LIMIT = 20
COMMIT_LIMIT = 10


def resume_command(sweep, root: Optional[Path] = None) -> str:
    """The exact command that resumes a sweep: on Slurm again when it ran there (its final report
    was a job), so the unfinished legs go back to the cluster, not to this machine; with the
    guards it overrode (a shared box's other training is likely still there); with the
    `--config` it ran with, unless that is the repository's own .moectl.toml (found anyway).
    `root`: the repository, for a config path relative to it (EXPERIMENTS.md); else absolute."""
    import shlex

    command = f"moectl sweep --resume {sweep.id}" + (" --slurm" if sweep.report_job else "")
    command += "".join(f" --override {name}" for name in getattr(sweep, "overrides", None) or [])
    config = Path(sweep.config) if sweep.config else None
    if config is not None and not (config.name == CONFIG_NAME and (config.parent / ".git").exists()):
        command += f" --config {shlex.quote(_shown(config, root) if root is not None else str(config))}"
    return command

def _cannot_write(path: Path, exc: OSError, out, said: Optional[str] = None) -> MoectlError:
    """The repository's own EXPERIMENTS.md that cannot be written is a refusal (exit 3, as the paths
    guard's) - unless the disk is full: exit 2, as a commit on a full disk (gitops.RepositoryUnwritable)
    and any other write of moectl's there, since a full disk is no guard's verdict; a `-o` file the
    person named where nothing can be written, a usage error (exit 2, as `plot -o` and `export --csv`
    there). `said`: what went wrong, when not the file's own write (default its OSError's reason)."""
    said = f"cannot write {path}: {said or exc.strerror or exc}"
    if out is not None:
        return UsageError(f"-o {out}: {said}")
    return UsageError(said) if exc.errno in gitops.FULL_ERRNOS else GuardRefused(said)


def summary_path(cfg: Config) -> Path:
    return cfg.root / SUMMARY_NAME


def _runtime(cfg: Config) -> tuple[str, list[str]]:
    """(one-line status, the Runtime Status bullets). Process ages are left out on purpose: they
    change every second and would make the document differ on every regeneration."""
    from moectl.probes import find_training_processes, lock_holder, read_nvml

    everyone = find_training_processes(cfg.launch.target)
    # A committed handoff names this project's training (runs under its artifact root) one line a
    # run; another user's processes on a shared node are counted, not listed (`moectl status` does).
    root = cfg.artifact_root.resolve()
    procs = [p for p in everyone if p.run_dir and Path(p.run_dir).resolve().is_relative_to(root)]
    others = len(everyone) - len(procs)
    holder = lock_holder(cfg)
    lines = []
    if procs:
        by_run: dict[str, list] = {}
        for p in procs:
            by_run.setdefault(p.run_dir, []).append(p.pid)
        lines.append(f"- {len(by_run)} run(s) training:")
        lines += [f"  - `{run_dir}` (pid {', '.join(map(str, pids))})" for run_dir, pids in by_run.items()]
    else:
        lines.append(f"- No run of this project is training (no `torchrun` or `{cfg.launch.target}` under "
                     f"`{_shown(cfg.artifact_root)}`).")
    if others:
        lines.append(f"- {others} other training process(es) on this machine, not this project's runs "
                     "(`moectl status` lists them).")
    if holder is not None and not holder.own:  # (a sweep's own, committed with its report, would outlive it)
        lines.append(f"- Run lock: {holder.describe()}")
    nvml = read_nvml(cfg.gpu.devices)
    if nvml.gpus is None:
        lines.append(f"- NVML unavailable: {nvml.error}")
    elif not nvml.gpus:
        lines.append("- NVML sees no GPUs.")
    else:
        busy = [g for g in nvml.gpus if g.error or g.processes or (g.util_pct or 0) > cfg.gpu.max_util_pct
                or (g.mem_used_mib or 0) > cfg.gpu.max_mem_mib]
        lines.append(f"- {len(nvml.gpus)} GPU(s), {len(nvml.gpus) - len(busy)} idle "
                     f"(limits: util ≤ {cfg.gpu.max_util_pct:g}%, mem ≤ {cfg.gpu.max_mem_mib:g} MiB):")
        for g in nvml.gpus:
            if g.error:
                lines.append(f"  - GPU{g.index}: NVML error: {g.error}")
                continue
            procs_txt = f", {len(g.processes)} compute process(es)" if g.processes else ""
            lines.append(f"  - GPU{g.index} {g.name}: `{fmt(g.util_pct, 0)}% util`, "
                         f"`{fmt(g.mem_used_mib, 0)} MiB / {fmt(g.mem_total_mib, 0)} MiB`{procs_txt}")
    status = "training active" if procs or (holder is not None and not holder.stale) else "no active run"
    return status, lines


def _all_settled(chain: list[SweepRecord], runs: dict[str, RunRecord]) -> bool:
    legs = chain[-1].legs
    return all(settled(leg.model_copy(update={"state": leg_status(leg, runs)}), legs) for leg in legs)


def _sweep_section(cfg: Config, chain: list[SweepRecord], runs: dict[str, RunRecord]) -> list[str]:
    latest = chain[-1]
    window = cfg.metrics.window
    states = [leg_status(leg, runs) for leg in latest.legs]
    n_done = states.count("completed")
    lines = [f"### {latest.name} ({n_done}/{len(latest.legs)} legs completed)", ""]
    for i, s in enumerate(chain):
        role = "original" if i == 0 else "resumed"
        lines.append(f"- {role} directory: `{s.exp_dir}`")
    lines += ["", *legs_table(latest.legs, runs, window), ""]
    comparison = completed_comparison(latest, runs, window, latest.baseline, warmup_steps=cfg.metrics.warmup_steps)
    rec = recommendation(comparison)
    lines.append(f"Conclusion: {rec}" if rec else "Conclusion: no leg has completed yet.")
    unfinished = [leg.tag for leg in latest.legs if not settled(leg.model_copy(update={"state": leg_status(leg, runs)}),
                                                                   latest.legs)]
    if unfinished:
        lines += ["", f"Unfinished legs: {', '.join(f'`{t}`' for t in unfinished)} — resume with "
                      f"`{resume_command(latest, cfg.root)}`"]
    elif final_report_owed(latest, [leg.model_copy(update={"state": st}) for leg, st in zip(latest.legs, states)]) \
            and owner_alive(latest) is False and latest.pid != os.getpid():  # not while it writes this file
        lines += ["", f"Final report not written (its moectl ended first) — write it with "
                      f"`{resume_command(latest, cfg.root)}`"]
    return lines + [""]


def _run_row(r: store.StoredRun) -> str:
    vals = [summary_cell(r.summary, m, COLUMNS[m][1])
            for m in ("tok_per_sec", "dt_ms", "mfu", "peak_mem_mib", "total_time_min", "final_loss")]
    # Each run's own tail (its record's window, the steps it had): runs of other windows sit in one table.
    tail = f"{r.summary.steps}/{r.summary.window}" if r.summary is not None else "—"
    status = r.display_status + (" !" if r.warnings else "")  # a warning (a diverged loss...): `moectl show`
    return "| " + " | ".join([f"`{r.id}`", status, r.tag or "—", tail, *vals]) + " |"


def _shell_path(shown: str) -> str:
    """A shown path as a shell word: quoted when it needs it, its leading `~/` left for the shell."""
    import shlex

    if shown.startswith("~/"):
        return "~/" + shlex.quote(shown[2:]) if shlex.quote(shown[2:]) != shown[2:] else shown
    return shlex.quote(shown)


def _group_rows(runs: list) -> list[str]:
    """One row per repeat group among these runs, newest first: completed / planned repeats, and the
    mean ± between-runs error of their recorded tail means (no metrics file read: a page of records)."""
    from moectl.noise import between_runs_stderr
    from moectl.repeats import planned_repeats

    by_group: dict[str, list] = {}
    for r in runs:
        if r.group:
            by_group.setdefault(r.group, []).append(r)
    rows = []
    for group, members in by_group.items():
        done = [r for r in members if r.display_status == "completed" and r.summary is not None]
        n = planned_repeats(group)

        def cell(metric: str, decimals: int) -> str:
            xs = [getattr(r.summary, metric) for r in done]
            if not xs or any(x is None for x in xs):
                return "—"
            se = between_runs_stderr(xs)
            return f"{sum(xs) / len(xs):,.{decimals}f}" + (f" ± {se:,.{decimals}f}" if se is not None else "")

        tag = members[0].tag or "—"
        rows.append(f"| `{group}` | {tag} | {len(done)}/{n or len(members)} | {cell('tok_per_sec', 2)} | {cell('mfu', 2)} |")
    return rows


def _shown(path, root: Optional[Path] = None) -> str:
    """A path as the document shows it: relative to the repository when inside it, with `~` for
    the home directory otherwise, so the file reads the same on every machine with that layout
    (the shipped EXPERIMENTS.md of a fresh clone included)."""
    p = Path(path)
    if root is not None:
        try:
            return p.resolve().relative_to(root.resolve()).as_posix() or "."
        except ValueError:
            pass
    home = Path.home()
    try:
        return "~/" + p.relative_to(home).as_posix() if p != home else "~"
    except ValueError:
        return str(p)


def render_summary(cfg: Config, now: Optional[datetime] = None) -> str:
    now = now or datetime.now().astimezone()
    scan = store.scan_runs(cfg.artifact_root)
    # This repository's handoff: another project's runs and sweeps in a shared artifact root (the
    # default ~/.cache one) are left out; records older than `repo` are kept, as before.
    ours = gitops.same_repository(cfg.root)
    scan.runs = [r for r in scan.runs if ours(r.repo)]
    sweeps, corrupt_sweeps = scan_sweeps(cfg.artifact_root)
    sweeps = [s for s in sweeps if ours(getattr(s, "repo", None))]
    by_id = {s.id: s for s in sweeps}
    resumed = {previous_sweep(s) for s in sweeps if previous_sweep(s)}
    chains = [sweep_chain(s, by_id) for s in sweeps if s.id not in resumed]  # one per latest sweep
    git_branch = gitops.current_branch(cfg.root)
    status, runtime = _runtime(cfg)

    lines = [f"# {cfg.project.name} — experiments progress summary", ""]
    lines += [
        f"{TIMESTAMP_PREFIX}{now.strftime('%Y-%m-%d %H:%M %z')}",
        f"- Repo: `{_shown(cfg.root)}`",
        f"- Branch: `{git_branch or 'detached HEAD'}`"
        + ("" if cfg.project.branch in ("*", git_branch) else f" (expected `{cfg.project.branch}`!)"),
        f"{STATUS_PREFIX}{status}",
        "",
        "## Runtime Status",
        "",
        *runtime,
        "",
        "## Sweeps",
        "",
    ]
    if not chains:
        lines += ["No sweeps yet.", ""]
    chains.sort(key=lambda c: (c[-1].created_at or "", c[-1].id), reverse=True)  # the newest first
    legs_runs = {c[-1].id: sweep_runs(c, scan.runs) for c in chains}  # each chain's legs' runs, found once
    for chain in chains[:SWEEP_LIMIT]:
        lines += _sweep_section(cfg, chain, legs_runs[chain[-1].id])
    older = chains[SWEEP_LIMIT:]
    if older:
        lines += [f"Older sweeps ({len(older)}), newest first:", ""]
        for chain in older[:OLDER_SWEEP_LIMIT]:
            latest = chain[-1]
            n_done = sum(1 for leg in latest.legs if leg_status(leg, legs_runs[latest.id]) == "completed")
            lines.append(f"- {latest.name}: {n_done}/{len(latest.legs)} legs completed — `{latest.exp_dir}`")
        if len(older) > OLDER_SWEEP_LIMIT:
            lines.append(f"- … and {len(older) - OLDER_SWEEP_LIMIT} older ones under `{_shown(cfg.artifact_root)}`")
        lines.append("")

    unfinished = [c[-1] for c in chains if not _all_settled(c, legs_runs[c[-1].id])]
    lines += ["## Unfinished Sweeps", ""]
    if unfinished:
        lines += ["Resume each in a fresh `-resume` directory (only the legs that did not complete run):", "", "```bash"]
        lines += [f"cd {_shell_path(_shown(cfg.root))}"] + [resume_command(s, cfg.root) for s in unfinished]
        lines += ["```", ""]
    else:
        lines += ["None.", ""]

    standalone = [r for r in scan.runs if not r.sweep and not (Path(r.exp_dir).parent / "sweep.json").exists()]
    lines += ["## Standalone Runs", ""]
    if standalone:
        lines += ["| run | status | tag | tail steps/window | tail tok/sec | tail dt (ms) | tail MFU % | peak mem (MiB) "
                  "| total (min) | final loss |",
                  "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        lines += [_run_row(r) for r in standalone[:STANDALONE_LIMIT]]
        lines += marked_footnote([r.summary for r in standalone[:STANDALONE_LIMIT]])
        if len(standalone) > STANDALONE_LIMIT:
            lines.append(f"\n{len(standalone) - STANDALONE_LIMIT} older run(s) not shown: `moectl runs`.")
        lines.append("")
    else:
        lines += ["None.", ""]
    groups = _group_rows(standalone)
    if groups:
        lines += ["## Repeat Groups", "",
                  "Each `run --repeat N`: the mean of its completed repeats' tail means ± the between-runs "
                  "standard error (`moectl compare <tag>` compares the group).", "",
                  "| group | tag | completed | tail tok/sec | tail MFU % |", "| --- | --- | ---: | ---: | ---: |"]
        lines += groups + [""]
    if scan.corrupt or corrupt_sweeps:
        lines += [f"- unreadable record: {m}" for m in [*scan.corrupt, *corrupt_sweeps]] + [""]

    lines += ["## Latest Report Commits", ""]
    try:
        rel = cfg.report_dir.relative_to(cfg.root.resolve()).as_posix()
    except ValueError:
        rel = None
    commits = gitops.recent_commits(cfg.root, [rel], COMMIT_LIMIT, subject_prefix="report: ") if rel else []
    lines += [f"- `{c.hash[:7]}` {c.subject}" for c in commits] or ["None yet."]

    ro = ", ".join(f"`{_shown(p)}`" for p in cfg.read_only) or "none"
    lines += [
        "",
        "## Next Steps",
        "",
        "```bash",
        f"cd {_shell_path(_shown(cfg.root))}",
        f"git checkout {cfg.project.branch}" if cfg.project.branch != "*" else "git status --short --branch",
        "moectl status            # GPUs idle? nothing else training?",
        "moectl run --tag <tag>   # a fresh, timestamped experiment directory every time",
        "```",
        "",
        "## Constraints Reminder",
        "",
        f"- Keep branch at `{cfg.project.branch}`." if cfg.project.branch != "*" else "- Branch check disabled (`*`).",
        f"- Write checkpoints/artifacts only under `{_shown(cfg.artifact_root)}` (fresh directory per run).",
        f"- Read-only trees: {ro}.",
        f"- Reports go to `{_shown(cfg.report_dir, cfg.root)}/`; moectl commits only the files it wrote.",
        f"- Launch from the venv `{cfg.project.venv or '(current interpreter)'}`; GPUs idle "
        f"(util ≤ {cfg.gpu.max_util_pct:g}%, mem ≤ {cfg.gpu.max_mem_mib:g} MiB) and no other training run.",
        "- Preserve unrelated user files and dirty/untracked content.",
    ]
    return "\n".join(lines) + "\n"


def _body(text: str) -> list[str]:
    """What decides whether the document changed: everything but the snapshot of the moment - the
    timestamp, the one-line status and the Runtime Status section. Processes come and go on a
    shared machine (other people's torchruns included); a file committed on each of those changes
    would churn, and the snapshot is dated by its `Generated at` line anyway."""
    lines, in_runtime = [], False
    for line in text.splitlines():
        if line.startswith("## "):
            in_runtime = line == "## Runtime Status"
        if not in_runtime and not line.startswith((TIMESTAMP_PREFIX, STATUS_PREFIX)):
            lines.append(line)
    return lines


def refresh_summary(cfg: Config, out: Optional[Path] = None) -> tuple[Path, bool]:
    """Regenerate EXPERIMENTS.md (or `out`); returns (path, whether it was rewritten). When only
    the snapshot of the moment (timestamp, runtime status) would change, the file is left as it
    is, so it never shows up as a change. Raises GuardRefused, writing nothing, when the
    repository's EXPERIMENTS.md holds uncommitted work of someone else's (`users_changes`)."""
    path = Path(out).expanduser() if out is not None else summary_path(cfg)
    if out is None and path.is_symlink():
        # Written with a rename, the link would become a file of its own, and that type change be
        # committed; written through, the commit would miss the file it changed.
        raise GuardRefused(f"{path} is a symbolic link (to {os.readlink(path)}): moectl does not replace it; remove "
                           "the link, or set [report] summary = false")
    if out is None:
        why = users_changes(cfg.root, path)
        if why is not None:
            raise GuardRefused(f"{path.name} {why}: left exactly as it is (commit or discard that, then `moectl summary`)")
    elif path.resolve() == summary_path(cfg).resolve():
        raise UsageError(f"-o {out} is the repository's own {SUMMARY_NAME}: run `moectl summary` without -o "
                         "(it leaves anyone else's edits there alone)")
    elif path.is_dir():
        raise UsageError(f"-o {out} is a directory; give a file name")
    text = render_summary(cfg)
    try:
        raw, st = path.read_bytes(), path.stat()  # (its bytes and times also for `put_back`)
    except FileNotFoundError:
        raw, st = None, None
    except OSError as exc:  # a directory in the way, no permission
        raise _cannot_write(path, exc, out) from None
    try:  # as read_text reads it: universal newlines
        old = raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n") if raw is not None else None
    except UnicodeDecodeError:
        old = None
    if out is not None and path.exists() and not _a_summary(old):
        # -o replaces its own earlier output only: not a README, notes, or anything else of anyone's.
        raise UsageError(f"-o {out} exists and is not a summary moectl wrote; not replacing it (choose a new file)")
    if old is not None and _body(old) == _body(text):
        return path, False
    if out is None:
        # Noted before it is written: a moectl killed in between leaves a note of a file that never
        # was (harmless), never moectl's own file read as the user's edit (refresh refused for good).
        # A note that cannot be saved (a read-only or full .git) leaves the file unwritten, for the
        # same reason: written without it, it would read as the user's edit until committed.
        try:
            remember_written(cfg.root, path, text)
        except OSError as exc:
            raise _cannot_write(path, exc, out, f"the note that moectl wrote it cannot be saved "
                                f"({exc.filename}: {exc.strerror or exc})") from None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_temp_files(path.parent)  # a killed moectl's half-written copy, beside the file
        write_text_atomic(path, text)
    except OSError as exc:  # immutable, a read-only mount, a directory in the way: said, not a traceback
        raise _cannot_write(path, exc, out) from None
    if out is None:
        _rewritten[path.resolve()] = (raw, st, text.encode("utf-8"))
    return path, True


# EXPERIMENTS.md as this process found it before rewriting it (its bytes, or None: there was no
# file; its stat) and what it wrote, for `put_back`.
_rewritten: dict[Path, tuple[Optional[bytes], Optional[os.stat_result], bytes]] = {}


def put_back(cfg: Config, paths) -> list[Path]:
    """After a commit that failed: each of `paths` that this process refreshed goes back to what it
    was (removed, when there was none), so nothing is left changed in the user's tree for the next
    run's `git diff` - unless HEAD holds it now or another moectl rewrote it since (then it is theirs).
    Other paths (reports, figures) are left alone. Returns those put back."""
    done = []
    for p in map(Path, paths):
        entry = _rewritten.pop(p.resolve(), None)
        if entry is None:
            continue
        old, st, new = entry
        try:
            if p.read_bytes() != new or gitops.committed_in(cfg.root, p) is not None:
                continue
            if old is None:
                p.unlink()
            else:
                write_bytes_atomic(p, old)
                if st is not None:  # an editor holding the file sees no change
                    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
        except (OSError, MoectlError):
            continue
        done.append(p)
    return done


def _a_summary(text: Optional[str]) -> bool:
    """Whether `text` is a document `render_summary` wrote (its title line and its timestamp line)."""
    lines = (text or "").splitlines()
    return bool(lines) and lines[0].endswith(" — experiments progress summary") and any(
        line.startswith(TIMESTAMP_PREFIX) for line in lines[:12])


# EXPERIMENTS.md and a sweep's report are files moectl rewrites and commits, in the user's own
# repository. An edit of theirs, staged or not, must survive that (SPEC §9), so before rewriting one
# moectl compares the file and its index entry with HEAD's and with the versions moectl itself wrote
# (their blob ids, kept in the git dir - one log for both kinds of file, under its first name: a
# `--no-commit` run's refresh is not the user's work). Anything else is theirs.
WRITTEN_LOG = "moectl-summary-written"
WRITTEN_KEEP = 50


# git's id of an empty file, in sha1 and in sha256 repositories
EMPTY_BLOBS = ("e69de29bb2d1d6434b8b29ae775ad8c2e48c5391",
               "473a0f4c3be8a93681a267e3b1e9a7dcda1185436fe141f7749120a303721813")


def users_changes(repo: Path, path: Path, ours: Optional[set[str]] = None) -> Optional[str]:
    """How `path` holds uncommitted work that moectl did not write ("has changes staged in the
    index", "has uncommitted changes", "is staged for deletion", ...), or None when it is as HEAD
    has it or as moectl last wrote it. None outside a git repository (nothing to lose to a commit).
    `ours`: the blob ids moectl wrote there (default: the ones `remember_written` noted)."""
    try:
        repo = gitops.repo_root(repo)
    except gitops.GitError:
        return None
    rel = path.resolve().relative_to(repo).as_posix() if path.resolve().is_relative_to(repo) else None
    if rel is None:
        return None
    head = gitops._git(repo, "rev-parse", "-q", "--verify", f"HEAD:{rel}", check=False) or None
    staged = gitops._git(repo, "ls-files", "--stage", "--", rel, check=False).split()
    index = staged[1] if len(staged) >= 2 else None
    if index in EMPTY_BLOBS and not gitops._git(repo, "diff", "--cached", "--name-only", "--", rel, check=False,
                                               env={"GIT_LITERAL_PATHSPECS": "1"}):
        index = head  # `git add -N` (intent to add): an empty-blob placeholder that stages nothing
    work = gitops._git(repo, "hash-object", f"--path={rel}", "--", rel) if path.is_file() else None
    ours = _written(repo) if ours is None else ours
    if index != head and index not in ours:
        return "is staged for deletion" if index is None else "has changes staged in the index"
    if work is not None and work != index and work != head and work not in ours:
        return "has uncommitted changes" if (head or index) else "is an untracked file of yours"
    if work is None and index is not None and not os.path.lexists(path):
        return "is deleted in the working tree (not staged)"  # `rm EXPERIMENTS.md`: theirs too
    return None


def _written_log(repo: Path) -> Path:
    return Path(gitops._git(repo, "rev-parse", "--path-format=absolute", "--git-path", WRITTEN_LOG))


def _written(repo: Path) -> set[str]:
    try:
        return set(_written_log(repo).read_text().split())
    except (OSError, gitops.GitError):
        return set()


def remember_written(repo: Path, path: Path, text: str) -> None:
    """Note the blob of `text`, which moectl is about to write to `path` (as git would store it
    there: `--path` applies the file's clean filters). Raises OSError, naming the log, when the note
    cannot be saved (a read-only or full .git): the caller then leaves `path` unwritten, since
    without the note the file reads as the user's until it is committed, and every refresh until
    then is refused. Outside a git repository there is nothing to note (nothing reads it there)."""
    blob = gitops.blob_id(repo, path, text)
    if blob is None:
        return
    try:
        log = _written_log(repo)
    except gitops.GitError:
        return
    try:
        kept = log.read_text().split() if log.is_file() else []
    except ValueError:  # not text: started afresh (what moectl writes now is what matters)
        kept = []
    kept = [b for b in kept if b != blob][-(WRITTEN_KEEP - 1):]
    try:
        write_text_atomic(log, "\n".join([*kept, blob]) + "\n")
    except OSError as exc:  # (a write error of the atomic file may come without the file's name)
        raise OSError(exc.errno, exc.strerror, str(log)) from None


def write_summary(cfg: Config, out: Optional[Path] = None) -> Path:
    """`refresh_summary` for the runner and sweeps: the path to commit with their reports."""
    return refresh_summary(cfg, out)[0]
