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


def main() -> None:
    app()


__all__ = ["app", "main"]
