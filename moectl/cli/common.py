"""Shared CLI plumbing: the typer app, error rendering, JSON output."""
from __future__ import annotations

import functools
import inspect
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable

import typer
from typer.core import TyperGroup

from moectl.entry import error_json, interrupted_inside  # noqa: F401  (error_json: moectl.cli's too)
from moectl.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USAGE, GuardRefused, MoectlError
from moectl.text import printable  # noqa: F401  (the CLI modules take it from here)

# Rich markup in help texts ([bold]...[/bold], [red]...[/], and \\[ for a literal bracket).
_MARKUP = re.compile(r"(?<!\\)\[/?[a-z][a-z ]*\]|(?<!\\)\[/\]")


def plain_text(text: str) -> str:
    """A help text with its rich markup taken out, as a terminal without rich would show it."""
    return _MARKUP.sub("", text).replace("\\[", "[")


class TopLevelGroup(TyperGroup):
    """The `moectl` group. Its own help (`moectl --help`, a bare `moectl`) is plain text in click's
    layout: it is what people type first and often, and typer's rich help imports ~65 ms of rich
    (markdown, tracebacks, syntax) before printing a line, which doubled its start-up next to
    gpustat (docs/benchmarks.md). Each command's `--help` keeps typer's rich option panels."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        self.format_usage(ctx, formatter)
        if self.help:
            formatter.write_paragraph()
            with formatter.indentation():
                for i, paragraph in enumerate(plain_text(inspect.cleandoc(self.help)).split("\n\n")):
                    if i:
                        formatter.write_paragraph()
                    formatter.write_text(paragraph)
        options = [rec for rec in (p.get_help_record(ctx) for p in self.get_params(ctx)) if rec]
        if options:
            with formatter.section("Options"):
                formatter.write_dl(options)
        commands = [(name, plain_text(cmd.get_short_help_str(limit=200)))
                    for name in self.list_commands(ctx)
                    if (cmd := self.get_command(ctx, name)) is not None and not cmd.hidden]
        with formatter.section("Commands"):
            formatter.write_dl(commands)


app = typer.Typer(
    name="moectl",
    cls=TopLevelGroup,
    # Plain help fills the terminal, as typer's rich help did (click's own default stops at 80).
    context_settings={"max_content_width": 10_000},
    rich_markup_mode="rich",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help=(
        "Guarded experiment manager for short MoE training runs.\n\n"
        "Example:  [bold]moectl run --cap 1.0 --tag bufreuse[/bold]"
    ),
)

class _LazyConsole:
    """A rich Console built on first use: `--json` output and most exits never print through rich,
    and importing it costs ~30 ms of every start-up (`moectl status --json` in a loop pays that)."""

    def __init__(self, **kwargs: Any) -> None:
        self._kwargs = kwargs
        self._console = None

    def get(self) -> Any:
        """The Console itself (to set what a proxy cannot, e.g. its width)."""
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._kwargs)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.get(), name)


stdout = _LazyConsole(highlight=False, soft_wrap=True)
stderr = _LazyConsole(stderr=True, highlight=False, soft_wrap=True)


_json_printed = False  # whether this command has printed its JSON document (see handle_errors)


def print_json(data: Any) -> None:
    """--json output: plain JSON on stdout, no colour, stable keys; a figure that is not finite
    (a mean that overflowed, a hand-edited NaN) is null, as JSON has no NaN or Infinity."""
    from moectl.atomic import json_ready

    global _json_printed
    _json_printed = True
    if sys.stdout is None:  # stdout closed (`>&-`): nobody to read it, as a table printed there goes nowhere
        return
    sys.stdout.write(json.dumps(json_ready(data), indent=2, default=str, allow_nan=False) + "\n")
    sys.stdout.flush()






def refuse_read_only(cfg: Any, path: Path, what: str) -> None:
    """`[paths] read_only` holds for every file moectl writes, figures and CSVs too (SPEC §3)."""
    real = path.expanduser().resolve()
    for tree in cfg.read_only:
        if real.is_relative_to(Path(tree).resolve()):
            raise GuardRefused(f"{what} {path} is inside read-only tree {tree} ([paths] read_only); write it elsewhere")


def stops_like_ctrl_c(ctx: typer.Context) -> None:
    """SIGTERM (and SIGHUP) means what Ctrl-C means for the whole command - `run` waiting for GPUs or
    between the guards and the launch, `sweep` between legs or submitting them, `wait` following
    jobs - so a stopped command exits 130 and cleans up as after Ctrl-C, instead of dying silently
    (143) with a job held or a record half-settled. launch() installs its own handlers for the
    training itself and restores this one afterwards."""
    import signal
    import threading

    from moectl.entry import stop_signals_interrupt

    if threading.current_thread() is not threading.main_thread():
        return
    # (The console script installed these already; CliRunner, in-process, did not.) SIGHUP too,
    # unless ignored (`nohup`): launch() says so in the record.
    previous = stop_signals_interrupt()
    # In-process callers (CliRunner) get their handlers back when the command returns.
    ctx.call_on_close(lambda: [signal.signal(sig, handler) for sig, handler in previous.items()])


def one_line(exc: BaseException) -> str:
    """An OSError as `path: reason` (not `[Errno 17] File exists: '...'`); any other message with
    its line breaks folded (matplotlib's math-text errors draw a caret under the bad spot)."""
    if isinstance(exc, OSError) and exc.strerror:
        if exc.filename is None:
            return exc.strerror
        if isinstance(exc, FileNotFoundError) and exc.filename == "git":  # (subprocess's word for no git on PATH)
            return "git is not installed (no `git` on PATH)"
        return f"{exc.filename}" + (f" -> {exc.filename2}" if exc.filename2 else "") + f": {exc.strerror}"
    return " ".join(str(exc).split()) or type(exc).__name__


_last_error: str | None = None  # the last error line said: an exit with no JSON document yet carries it


def error(message: str, lines: list[str] | None = None) -> None:
    global _last_error
    from rich.markup import escape

    from moectl.text import printable

    _last_error = message
    # The message is text, not markup: "[plot]" in a pip hint or a path must print as written. Nor
    # does a control byte of a file's name or header (an escape sequence) reach the terminal.
    stderr.print(f"[red]error:[/red] {escape(printable(message))}", markup=True)
    for line in lines or []:
        stderr.print(f"  {printable(line)}", markup=False)


def handle_errors(fn: Callable) -> Callable:
    """Turn library errors into one readable message and the SPEC §8 exit code, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        global _json_printed, _last_error
        _json_printed, _last_error = False, None

        def as_json_too(message: str, code: int) -> None:
            # --json: stdout is one JSON document on every exit, an error's too.
            if kwargs.get("json_out") and not _json_printed:
                print_json(error_json(message, code))

        try:
            return fn(*args, **kwargs)
        except typer.Exit as exc:
            if exc.exit_code:  # ended on a non-zero code it chose (a detach on Ctrl-C, say): said in JSON too
                as_json_too(_last_error or f"exit {exc.exit_code}", exc.exit_code)
            raise
        except MoectlError as exc:
            error(exc.message, exc.lines)
            as_json_too("; ".join([exc.message, *exc.lines]), exc.exit_code)
            raise typer.Exit(exc.exit_code)
        except KeyboardInterrupt as exc:
            message = getattr(exc, "message", None) or "interrupted"  # moectl.errors.Interrupted has more to say
            error(message)
            as_json_too(message, EXIT_INTERRUPTED)
            raise typer.Exit(EXIT_INTERRUPTED)
        except BrokenPipeError:
            # The reader left (`moectl status | head -1`): click ends every command alike, quietly,
            # exit 1 - not 0, which a `check | head && launch` would take for a pass.
            raise
        except Exception as exc:
            if interrupted_inside(exc):
                # Ctrl-C while pydantic built a model class (a command's first use of it) comes out
                # wrapped in its SchemaError: an interrupt all the same, not a moectl bug.
                error("interrupted")
                as_json_too("interrupted", EXIT_INTERRUPTED)
                raise typer.Exit(EXIT_INTERRUPTED)
            if isinstance(exc, (OSError, ValueError)):  # bad paths, unreadable files: the user's to fix
                message = one_line(exc)
                error(message)
                as_json_too(message, EXIT_USAGE)
                raise typer.Exit(EXIT_USAGE)
            # a bug in moectl: still one line, exit 1
            error(f"internal error: {type(exc).__name__}: {exc}")
            as_json_too(f"internal error: {type(exc).__name__}: {exc}", EXIT_INTERNAL)
            raise typer.Exit(EXIT_INTERNAL)

    return wrapper


def recover_dead_index_lock(cfg) -> None:
    """Before a command writes to git (run, sweep, summary): a killed moectl's .git/index.lock
    finished or undone now, said in one line, so the guards, a run's git.diff and the user's git
    see the repository as it is, not at a commit's half-way point."""
    from moectl import gitops

    recovered = gitops.recover_dead_index_lock(cfg.root)
    if recovered:
        stderr.print(f"note: {recovered}", markup=False)

