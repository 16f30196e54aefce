"""Exit codes (SPEC §8) and the one exception type the CLI turns into a one-line error."""
from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2  # usage or config error
EXIT_GUARD = 3  # a guard refused
EXIT_TRAINING = 4  # training failed
EXIT_INTERRUPTED = 130


class MoectlError(Exception):
    """An error a person can act on. The CLI prints `error: <message>` (one line per entry in
    `lines`, if given) on stderr and exits with `exit_code`; never a traceback."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE, lines: list[str] | None = None):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.lines = lines or []


class UsageError(MoectlError):
    def __init__(self, message: str, lines: list[str] | None = None):
        super().__init__(message, EXIT_USAGE, lines)


class ConfigError(UsageError):
    """The configuration cannot be found, read or validated (SPEC §5's first guard, exit 2)."""


class GuardRefused(MoectlError):
    def __init__(self, message: str, lines: list[str] | None = None):
        super().__init__(message, EXIT_GUARD, lines)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C / SIGTERM with something to say: what was left undone and how to finish it. Still a
    KeyboardInterrupt, so every `except KeyboardInterrupt` (a sweep settling its legs) acts alike;
    the CLI prints the message instead of a bare `interrupted`, exit 130."""

    def __init__(self, message: str, outcome: object = None):
        super().__init__(message)
        self.message = message
        self.outcome = outcome  # a run's outcome when only what followed it was cut short (its trackers' copy)
