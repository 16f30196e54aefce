"""The moectl command line: parse -> call a library function -> render. No logic lives here.

Each command group sits in its own small module and registers itself on `app`.
"""
from __future__ import annotations

from moectl.cli.common import app

# Importing a module registers its commands on `app` (order = order in `moectl --help`).
from moectl.cli import env as _env  # noqa: E402,F401  init, status, check
from moectl.cli import run as _run  # noqa: E402,F401  run
from moectl.cli import sweep as _sweep  # noqa: E402,F401  sweep, summary
from moectl.cli import runs as _runs  # noqa: E402,F401  runs, show, compare, import
from moectl.cli import artifacts as _artifacts  # noqa: E402,F401  plot, export
from moectl.cli import commit as _commit  # noqa: E402,F401  commit
from moectl.cli import tracking as _tracking  # noqa: E402,F401  sync
from moectl.cli import cluster as _cluster  # noqa: E402,F401  wait, cancel


def _reflowed_help() -> None:
    """typer's rich mode keeps a paragraph's hard line breaks, so help written at 100 columns broke
    mid-sentence: in `moectl --help`'s one-line summaries, and in each command's `--help` on an
    80-column terminal ("Ctrl-C / and crashes"). Prose paragraphs are joined into one line each, for
    the terminal to wrap; indented blocks (spec and command examples) and lists keep their lines;
    the first paragraph is the command's summary."""
    import inspect

    for info in app.registered_commands:
        doc = info.help or (info.callback.__doc__ if info.callback else None)
        if not doc:
            continue
        paragraphs = inspect.cleandoc(doc).split("\n\n")
        for i, para in enumerate(paragraphs):
            lines = para.split("\n")
            if not any(line[:1].isspace() or line.startswith(("- ", "* ", "Example")) for line in lines):
                paragraphs[i] = " ".join(line.strip() for line in lines)
        info.help = "\n\n".join(paragraphs)
        if info.short_help is None:
            info.short_help = " ".join(paragraphs[0].split())


_reflowed_help()


def main() -> None:
    """The console script. Click's own usage errors (an unknown option, `--cap abc`) become the
    same one-line `error: ...` as ours, with exit code 2, instead of a multi-line panel."""
    import sys

    from moectl.cli.common import error
    from moectl.entry import json_requested, take_back_sigint

    take_back_sigint()  # (moectl.entry did, before this module was imported; here for other callers)

    try:
        code = app(standalone_mode=False)
    except Exception as exc:
        if not any(c.__name__ == "ClickException" for c in type(exc).__mro__):
            raise
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `moectl`: the help text
            exc.show()
            sys.exit(exc.exit_code)
        ctx = getattr(exc, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        error(exc.format_message() + hint)
        args = sys.argv[1:]
        if json_requested(args):  # one JSON document on stdout
            from moectl.cli.common import error_json, print_json

            data = error_json(exc.format_message(), exc.exit_code)
            if args[:1] == ["check"] or (args[:1] == ["run"] and "--dry-run" in args):
                data = {"ok": False, "guards": [], **data}  # their contract's keys: nothing judged
            print_json(data)
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


__all__ = ["app", "main"]
