"""`moectl commit RUN`: commit a run's report (and EXPERIMENTS.md) after its own commit was stopped.

    result = commit_run_report(cfg, store.resolve_run(cfg.artifact_root, "bufreuse"))
    result.commit, result.created        # the commit holding the report; False: it already did

A run commits its report when it ends, and a failed commit never costs the run: the wrong branch
checked out at the end of a long run, or an editor's git holding .git/index.lock past the wait,
leaves the report on disk and an error naming this command. Once that is fixed, this commits the
report and a refreshed EXPERIMENTS.md - through the same `gitops.commit_paths`, so nothing else.
Nothing is written before the branch check passes; a report already committed is a no-op; a run
of another repository sharing the artifact root is refused (its report is its repository's).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from moectl import gitops
from moectl.config import Config
from moectl.errors import GuardRefused, MoectlError, UsageError
from moectl.records import RunRecord
from moectl.report import commit_message, find_run_report, not_committed, run_report, write_report


def _held_by_head(cfg: Config, report: Path) -> Optional[str]:
    """The commit that holds `report` in HEAD, whatever is on disk now; None if HEAD has none."""
    try:
        return gitops.committed_in(cfg.root, report, as_on_disk=False)
    except MoectlError:  # outside the repository, or no HEAD yet
        return None


def refuse_other_project(cfg: Config, record: RunRecord) -> None:
    """UsageError (exit 2) when `record` ran from another repository (run.json `repo`): a shared
    artifact root (the default ~/.cache one) holds other projects' runs too, and a run's report
    belongs in the history of the commit it cites. `moectl summary`'s rule decides which runs are
    this project's: a record without `repo` (older, or imported outside a project) still is."""
    from moectl.gitops import same_repository

    if not same_repository(cfg.root)(record.repo):
        raise UsageError(f"run {record.id} belongs to another repository, {record.repo}: commit its report there "
                         f"(`moectl commit {record.id}` in {record.repo}); nothing written or committed here")


@dataclass
class ReportCommit:
    run_id: str
    report: Path
    paths: list[Path]  # what was committed (or, when already committed, the report alone)
    commit: str  # the commit that holds the report
    created: bool  # False: it was already committed, nothing was done
    warnings: list[str]


def commit_run_report(
    cfg: Config, record: RunRecord, *, on_wait: Optional[Callable[[Path], None]] = None
) -> ReportCommit:
    """Commit `record`'s report and EXPERIMENTS.md (when `report.summary` is on); a run that ended
    without its report (its moectl killed first) gets it written from its record. Raises UsageError
    (exit 2) when the run has none and cannot have one now (imported, still running, its report
    deleted), GuardRefused (exit 3) on the wrong branch, a detached HEAD, a repository busy past
    the lock wait, or the run's own moectl still writing or committing its report (alive, its
    record naming no report yet), gitops.SigningFailed (exit 2)
    when commit.gpgSign is on and git cannot sign, gitops.IdentityUnknown (exit 2) when git has no
    user.name/user.email, or UsageError when the run is another repository's."""
    refuse_other_project(cfg, record)  # before anything: not even this repository's index lock
    # A killed moectl's index.lock, finished or undone first: also when nothing is left to commit.
    recovered = gitops.recover_dead_index_lock(cfg.root)
    notes = [recovered] if recovered else []  # said first, as warnings
    report = find_run_report(cfg.report_dir, record.id)
    written_now = False
    if report is None:
        if record.report:  # written once, gone since
            earlier = _held_by_head(cfg, Path(record.report))
            if earlier is not None:  # committed, then deleted: the deletion is the user's, and stays theirs
                _record_commit(record, earlier, Path(record.report))
                return ReportCommit(record.id, Path(record.report), [Path(record.report)], earlier, created=False,
                                    warnings=[*notes, f"{Path(record.report).name} was committed in {earlier[:10]} and "
                                              "deleted since; the deletion is not moectl's, so it is left as it is, "
                                              "uncommitted"])
            raise UsageError(f"run {record.id}'s report {record.report} is gone (deleted or moved); nothing to commit")
        if record.status not in ("completed", "failed", "interrupted"):
            why = ("an imported run gets none" if record.status == "imported"
                   else f"reports are written when a run ends; the run is {record.status}")
            raise UsageError(f"run {record.id} has no report in {cfg.report_dir} ({why})")
    _refuse_while_its_moectl_commits(record)
    # The branch the run was guarded on holds its report (as the run itself commits it): with
    # `branch = "*"` that is the run's own, not whichever branch is checked out now.
    branch = record.git.branch if cfg.project.branch == "*" and record.git and record.git.branch else cfg.project.branch
    try:
        gitops.check_branch(cfg.root, branch)  # (the wrong branch writes no report either)
    except GuardRefused as exc:
        raise type(exc)(not_committed(exc.message, record.id)) from None
    if report is None:
        # The run ended but its moectl never wrote the report (killed after training, or while
        # writing it): the report is the record's, so write it now (without a baseline comparison,
        # which was never recorded) and commit it as the run would have.
        name = (record.tag or record.id) + (f"-r{record.repeat}" if record.repeat else "")
        text = run_report(record)
        report = write_report(cfg.report_dir, name, text)
        record.report, record.report_blob = str(report), gitops.blob_id(cfg.root, report, text)
        written_now = True
    done = None if written_now else gitops.committed_in(cfg.root, report)
    if done is not None:
        _record_commit(record, done, report)
        return ReportCommit(record.id, report, [report], done, created=False, warnings=notes)
    earlier = None if written_now else gitops.committed_in(cfg.root, report, as_on_disk=False)
    if earlier is not None:
        # Committed before, and changed since: moectl never rewrites a committed report, so the
        # change is the user's (an edit in progress, staged or not) and stays theirs, uncommitted.
        _record_commit(record, earlier, report)
        return ReportCommit(record.id, report, [report], earlier, created=False, warnings=[*notes,
            f"{report.name} was committed in {earlier[:10]}; the changes to it since are not moectl's, "
            "so they are left as they are, uncommitted"])
    if not written_now and record.report_blob:
        # Never committed, and moectl knows what it wrote there: anything else in the file or its
        # index entry is the user's (an edit, staged or not) and stays theirs, out of any commit -
        # as EXPERIMENTS.md's is (`moectl summary` refuses alike).
        from moectl.summary import users_changes

        why = users_changes(cfg.root, report, ours={record.report_blob})
        if why == "is an untracked file of yours":  # the report is untracked, and edited since
            why = "has uncommitted changes"
        if why is not None:
            raise GuardRefused(f"{report.name} {why} (not what moectl wrote there): left exactly as it is, nothing "
                               f"committed (commit it yourself, or undo those changes and run `moectl commit "
                               f"{record.id}` again)")
    paths, warnings = [report], notes
    if written_now:
        # (a commit_error without a report: its moectl could not write it - runner.report_and_commit)
        why = "it could not be written then" if record.commit_error else "its moectl was stopped first"
        warnings.append(f"{record.id} ended without its report ({why}): {report.name} was written now, from its record")
    if cfg.report.summary:
        from moectl.summary import summary_path, write_summary

        real = summary_path(cfg).resolve()
        tree = next((ro for ro in cfg.read_only if real.is_relative_to(Path(ro).resolve())), None)
        if tree is not None:  # `[paths] read_only` holds here too (a run would have been refused)
            warnings.append(f"EXPERIMENTS.md not refreshed: it is inside read-only tree {tree} ([paths] read_only)")
        else:
            try:
                paths.append(write_summary(cfg))
            except MoectlError as exc:  # the summary is a convenience: the report still goes in
                warnings.append(f"EXPERIMENTS.md not refreshed: {exc.message}")
    try:
        sha = gitops.commit_paths(cfg.root, paths, commit_message(record), branch=branch, on_wait=on_wait,
                                  unless_committed=report)
    except BaseException as exc:
        from moectl.summary import put_back

        put_back(cfg, paths)  # EXPERIMENTS.md as it was before this command: nothing half-done
        if isinstance(exc, (GuardRefused, gitops.SigningFailed, gitops.IdentityUnknown)):  # busy, the
            # branch switched meanwhile, git could not sign or has no identity: nothing moved
            raise type(exc)(not_committed(exc.message, record.id)) from None
        raise
    if sha is None:  # the report equals HEAD's after all (committed by someone meanwhile)
        sha = gitops.committed_in(cfg.root, report) or ""
        _record_commit(record, sha, report)
        return ReportCommit(record.id, report, [report], sha, False, warnings)
    _record_commit(record, sha, report)
    # What the commit holds, read back (EXPERIMENTS.md as HEAD had it is not in it).
    return ReportCommit(record.id, report, gitops.paths_in_commit(cfg.root, sha, paths), sha, created=True,
                        warnings=warnings)


def _refuse_while_its_moectl_commits(record: RunRecord) -> None:
    """GuardRefused while the run's own moectl is alive between saving its final record and saving
    its report's commit (its record names no report yet): writing and committing that report is its
    own, and a second commit of it here would race that one (a pid reused since is not it). Not when
    the record has a commit_error: that moectl could not write or commit the report and said so."""
    from moectl.lock import owner_alive
    from moectl.runindex import parse_time

    if record.report is None and record.commit_error is None \
            and owner_alive(record.pid, record.host, parse_time(record.created_at)):
        raise GuardRefused(f"run {record.id} has just ended and its moectl (pid {record.pid}) is writing its "
                           "report and committing it; let it finish (it commits the report itself)")


def _record_commit(record: RunRecord, sha: str, report: Optional[Path] = None) -> None:
    """The record names its report and the report's commit (runner.report_and_commit writes them,
    and `commit_error` when it was stopped; a moectl killed first wrote neither): it says the truth
    once the report is in."""
    report_text = str(report) if report is not None else record.report
    if sha and (record.commit != sha or record.commit_error is not None or record.report != report_text):
        from moectl import store

        blob = record.report_blob

        def committed(rec: RunRecord) -> None:
            rec.commit, rec.commit_error, rec.report = sha, None, report_text
            rec.report_blob = blob or rec.report_blob

        store.update_run(record, committed)  # (a `moectl sync` may have recorded its trackers meanwhile)
