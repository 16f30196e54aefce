"""The console script's first code: nothing heavy is imported before Ctrl-C is handled.

`moectl` and `python -m moectl` start here. Ctrl-C (or `kill -INT`) a fraction of a second after
Enter - a typo noticed - lands while the CLI's modules are still being imported or typer builds
its commands, outside any command's own error handling: Python then printed a traceback. Here it
is the same one line and exit 130 as anywhere else (SPEC §8). The few helpers below are the CLI's
too (moectl.cli imports them from here), so this module stays free of heavy imports.
"""
from __future__ import annotations

import os
import signal
import sys

EXIT_INTERRUPTED = 130  # (moectl.errors' value: that module is not imported yet when this runs)


def take_back_sigint() -> None:
    """A script's `moectl run ... &` starts moectl with SIGINT ignored (POSIX, for a non-interactive
    shell's background jobs), and Python then never raises KeyboardInterrupt: `kill -INT` would do
    nothing at all. moectl stops cleanly on SIGINT (exit 130, the run recorded `interrupted`), so
    it takes SIGINT back."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def hung_up(signum: int) -> None:
    """For a stop signal's handler: when it is SIGHUP (the terminal is gone), what moectl still
    prints while it stops and records goes to /dev/null instead of failing on a dead tty (EIO)
    half-way through. Other signals: nothing."""
    if signum != signal.SIGHUP:
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in (1, 2):
            if os.isatty(fd):
                os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def stop_signals() -> tuple[int, ...]:
    """The signals that stop moectl as Ctrl-C does: SIGINT, SIGTERM, and SIGHUP (the terminal was
    closed) unless it is ignored - `nohup moectl run ...` asked to outlive the terminal."""
    hup = (signal.SIGHUP,) if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN else ()
    return (signal.SIGINT, signal.SIGTERM, *hup)


def interrupt_on_stop(signum, frame) -> None:
    """The handler of SIGTERM/SIGHUP for a command: what Ctrl-C does (KeyboardInterrupt)."""
    hung_up(signum)
    raise KeyboardInterrupt


def stop_signals_interrupt() -> dict[int, object]:
    """SIGTERM (`kill`, `timeout`, a scheduler) and SIGHUP (the terminal closed) stop any command as
    Ctrl-C does: exit 130, its temp files and half-made run directory removed. Python's default
    for them is to die at once (143, 129) with nothing cleaned up. `launch` and a sweep install
    their own around the training; `nohup`'s ignored SIGHUP stays ignored. Returns the handlers
    it replaced (an in-process caller puts them back: moectl.cli.common.stops_like_ctrl_c)."""
    return {sig: signal.signal(sig, interrupt_on_stop) for sig in stop_signals() if sig != signal.SIGINT}


def interrupted_inside(exc: BaseException) -> bool:
    """Whether a KeyboardInterrupt is among the exceptions that led to `exc` (click's Abort, or
    pydantic's SchemaError when Ctrl-C came while it built a model class)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def json_requested(args: list[str]) -> bool:
    """`--json` among moectl's own arguments (not a trainer's, after `--`)."""
    return "--json" in (args[:args.index("--")] if "--" in args else args)


def error_json(message: str, exit_code: int) -> dict:
    """What `--json` prints when a command ends in an error before its own document: a caller
    parsing stdout gets one JSON document either way (the message is on stderr too)."""
    return {"ok": False, "error": message, "exit_code": exit_code}


def main() -> None:
    take_back_sigint()  # before anything else
    stop_signals_interrupt()
    _printable_streams()
    try:
        from moectl.cli import main as cli_main

        cli_main()
    except SystemExit:  # the command is over, and its exit code says how it went
        _command_over()
        raise
    except KeyboardInterrupt as exc:  # commands say their own; this is before or around them
        _interrupted(getattr(exc, "message", None) or "interrupted")
    except Exception as exc:  # click's Abort, raised from a KeyboardInterrupt while it parsed
        if not interrupted_inside(exc):
            raise
        _interrupted("interrupted")


def _printable_streams() -> None:
    """A stdout or stderr that cannot encode moectl's own characters (— · … ±, a run's non-ASCII
    tag or path) writes them as `?` rather than failing: `PYTHONIOENCODING=ascii`, or a C locale
    with UTF-8 mode off, made `runs`, `show` and `compare` stop half-way with exit 2 and `--help`
    with a traceback. JSON is unaffected (json.dumps escapes to ASCII)."""
    import codecs

    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None and codecs.lookup(stream.encoding).name != "utf-8" and stream.errors != "replace":
                stream.reconfigure(errors="replace")  # (a C locale's surrogateescape fails on `—` too)
        except (AttributeError, LookupError, OSError, TypeError, ValueError):  # not a TextIOWrapper over a file
            pass


def _command_over() -> None:
    """Once the command has ended, a stop signal stops nothing: what it did is done and recorded,
    and its exit code says so. Left to its handler, one landing while the interpreter shuts down
    (flushing, exit handlers: tens of milliseconds) killed moectl by that signal (-15, -2 to a
    caller) instead of the exit code (0, or 130 for a run it stopped)."""
    for sig in stop_signals():
        signal.signal(sig, signal.SIG_IGN)


def _interrupted(message: str) -> None:
    sys.stderr.write(f"error: {message}\n")
    if json_requested(sys.argv[1:]):  # one JSON document on stdout
        import json

        sys.stdout.write(json.dumps(error_json(message, EXIT_INTERRUPTED)) + "\n")
    # Not sys.exit: a KeyboardInterrupt that passed through code a C extension ran while it was
    # imported (PyRun_String) leaves CPython's "unhandled Ctrl-C" flag set, and the interpreter
    # then ends by killing itself with SIGINT (-2 to a parent, not 130) whatever was caught since.
    # Nothing has started here that an exit handler would have to end.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader gone, a stream closed: the exit code still says it
            pass
    os._exit(EXIT_INTERRUPTED)
