"""`moectl compare --write-report`: a comparison's markdown as a report, committed on its own.

    path, sha = write_compare_report(cfg, comparison, records, compare_markdown(comparison))

Everything that can refuse is checked before the file is written - the branch, and report_dir as
`run`'s paths guard checks it (inside the repository, symlinks and `..` resolved; not in its git
directory; in no `[paths] read_only` tree; able to take files) - exit 3, nothing written. A commit
that fails after that (git busy, a hook refusing the branch update, no signing key, no identity)
takes the report back out: a report moectl could not commit is not left untracked in the user's
tree (SPEC §9), and the error line says it was removed. Running the compare again writes it anew.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from moectl import gitops
from moectl.config import Config
from moectl.errors import GuardRefused, MoectlError
from moectl.metrics import Comparison
from moectl.records import RunRecord


def report_dir_refusal(cfg: Config) -> Optional[str]:
    """Why a report cannot be written into `cfg.report_dir` (the paths guard's words), or None."""
    from moectl.guards import report_dir_problems
    from moectl.probes import _git_dir, _real, nested_work_tree, why_unwritable

    report_dir = _real(cfg.report_dir)
    problems = report_dir_problems(report_dir, str(cfg.root.resolve()), _git_dir(cfg.root),
                                   [_real(p) for p in cfg.read_only],
                                   nested_work_tree(Path(report_dir), cfg.root.resolve()))
    why = why_unwritable(Path(report_dir))
    if why is not None:
        problems.insert(0, f"report_dir: {why}")
    return "; ".join(problems) + " — fix [paths] in the config" if problems else None


def compare_report_name(comparison: Comparison) -> str:
    base = next(r for r in comparison.runs if r.id == comparison.baseline)
    others = [r.tag or r.id for r in comparison.runs if r.id != base.id]
    name = "compare_" + "_".join(others[:3]) + ("_etc" if len(others) > 3 else "") + f"_vs_{base.tag or base.id}"
    return name[:80]


def compare_report_text(comparison: Comparison, records: Sequence[RunRecord], table_md: str) -> str:
    base = next(r for r in comparison.runs if r.id == comparison.baseline)
    return f"# Comparison vs {base.tag or base.id}\n\n" + table_md + "\n## Runs\n\n" + "".join(
        f"- `{r.id}` ({r.status}): [`{r.exp_dir}`]({Path(r.exp_dir).as_uri()})\n" for r in records
    )


def write_compare_report(cfg: Config, comparison: Comparison, records: Sequence[RunRecord],
                         table_md: str) -> tuple[Path, Optional[str]]:
    """Write the comparison's report into report_dir and commit it alone; (path, commit sha).
    GuardRefused (exit 3), nothing written: the wrong branch or a detached HEAD, or a report_dir
    the paths guard refuses. A failed commit removes the report again (and the directories made
    for it) and re-raises gitops' error, its message saying so."""
    from moectl.report import compare_commit_message, write_report

    branch = gitops.current_branch(cfg.root)
    if branch is None:  # detached, or no repository at all: check_branch tells which
        why = gitops.off_branch(cfg.root, cfg.project.branch) or "HEAD is detached"
        raise GuardRefused("refusing to write a report: " + why.removeprefix("refusing to commit: "))
    if cfg.project.branch not in ("*", branch):
        raise GuardRefused(f"refusing to write a report: on {branch}, expected branch {cfg.project.branch!r}")
    why = report_dir_refusal(cfg)
    if why is not None:
        raise GuardRefused(f"refusing to write a report: {why}")
    report_dir = Path(cfg.report_dir)
    made = []  # the directories write_report will create, deepest first: removed with the report
    d = report_dir
    while not d.exists() and d != d.parent:
        made.append(d)
        d = d.parent
    path = write_report(report_dir, compare_report_name(comparison), compare_report_text(comparison, records, table_md))
    try:
        sha = gitops.commit_paths(cfg.root, [path], compare_commit_message(comparison), branch=cfg.project.branch)
    except BaseException as exc:  # Ctrl-C too: the report goes unless the commit holding it was made
        if _committed(cfg.root, path):
            raise
        path.unlink(missing_ok=True)
        for directory in made:
            try:
                directory.rmdir()
            except OSError:  # something else was put there meanwhile: it stays
                break
        if isinstance(exc, MoectlError):
            exc.message = f"report not committed: {exc.message}; {_shown(cfg, path)} was removed again, " \
                          "nothing is left behind (run the compare again once that is fixed)"
            exc.args = (exc.message,)
        raise
    return path, sha


def _committed(root: Path, path: Path) -> bool:
    try:
        return gitops.committed_in(root, path) is not None
    except MoectlError:
        return False


def _shown(cfg: Config, path: Path) -> str:
    try:
        return path.resolve().relative_to(cfg.root.resolve()).as_posix()
    except ValueError:
        return str(path)
