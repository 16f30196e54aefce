"""Shared CLI plumbing: the typer app, error rendering, JSON output."""
from __future__ import annotations

import functools
import json
import sys
from typing import Any, Callable

import typer

from moectl.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USAGE, MoectlError

app = typer.Typer(
    name="moectl",
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

    def __getattr__(self, name: str) -> Any:
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._kwargs)
        return getattr(self._console, name)


stdout = _LazyConsole(highlight=False, soft_wrap=True)
stderr = _LazyConsole(stderr=True, highlight=False, soft_wrap=True)


def print_json(data: Any) -> None:
    """--json output: plain JSON on stdout, no colour, stable keys."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def error(message: str, lines: list[str] | None = None) -> None:
    from rich.markup import escape

    # The message is text, not markup: "[plot]" in a pip hint or a path must print as written.
    stderr.print(f"[red]error:[/red] {escape(message)}", markup=True)
    for line in lines or []:
        stderr.print(f"  {line}", markup=False)


def handle_errors(fn: Callable) -> Callable:
    """Turn library errors into one readable message and the SPEC §8 exit code, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except MoectlError as exc:
            error(exc.message, exc.lines)
            raise typer.Exit(exc.exit_code)
        except KeyboardInterrupt:
            error("interrupted")
            raise typer.Exit(EXIT_INTERRUPTED)
        except (OSError, ValueError) as exc:  # bad paths, unreadable files: the user's to fix
            error(str(exc))
            raise typer.Exit(EXIT_USAGE)
        except Exception as exc:  # a bug in moectl: still one line, exit 1
            error(f"internal error: {type(exc).__name__}: {exc}")
            raise typer.Exit(EXIT_INTERNAL)

    return wrapper
