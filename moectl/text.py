"""A trainer's output as moectl keeps and shows it: the text a terminal would show, without the
escape sequences and control bytes that repaint a screen, garble a report or make git take a
markdown file for a binary one. One definition for the tee, the stdout parser, the store and the CLI."""
from __future__ import annotations

import re

# Terminal escape sequences: CSI (`\x1b[32m`, colours and cursor moves), OSC (`\x1b]0;title\x07`),
# the ones with intermediate bytes (`\x1b(B`, a character set: what `tput sgr0` and curses put
# before `\x1b[m`), and the two-byte ones (`\x1bM`, `\x1b7`, `\x1b=`, `\x1bc`).
ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[ -/]+[0-~]|[0-~])")
# C0 control bytes but tab and newline, and DEL.
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")

TAIL_LINE_CHARS = 1000  # a record's error tail keeps this much of each line (a 2 MB line went whole into run.json and the report)


def printable(text: str) -> str:
    """`text` without escape sequences and control bytes (tabs and newlines kept)."""
    return CONTROL.sub("", ANSI.sub("", text))


def tail_line(text: str) -> str:
    """One line of output as a failed run's record (and its report) keeps it: without its line end,
    printable, cut at TAIL_LINE_CHARS with what was left out said."""
    line = printable(text.rstrip("\r\n"))
    if len(line) > TAIL_LINE_CHARS:
        line = f"{line[:TAIL_LINE_CHARS]} … ({len(line) - TAIL_LINE_CHARS:,} more characters)"
    return line


# The exceptions a stop raises on its way through torch: torchrun answers moectl's SIGTERM with
# `torch.distributed.elastic.multiprocessing.api.SignalException: Process 12 got signal: 15`, a
# Python trainer a Ctrl-C with KeyboardInterrupt.
STOP_EXCEPTIONS = ("SignalException", "KeyboardInterrupt")


def without_stop_tracebacks(tail: str) -> str:
    """A stopped run's output tail without the tracebacks the stop itself caused (~30 lines of
    torchrun's frames per Ctrl-C, in every interrupted run's record and committed report). They say
    how the signal went through torch, not why the run ended - its record's first line says that.
    Any other traceback (an error on the way down) is kept, and so is a block cut off at the top of
    the tail, as long as it does not end in a stop exception."""
    lines = tail.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        starts = lines[i].startswith("Traceback (most recent call last):") or (
            i == 0 and lines[i].startswith("  File "))  # the tail begins inside a traceback
        if starts:
            j = i + 1
            while j < len(lines) and lines[j].startswith((" ", "\t")):
                j += 1
            if j < len(lines) and any(name in lines[j] for name in STOP_EXCEPTIONS):
                i = j + 1
                continue
        out.append(lines[i])
        i += 1
    return "\n".join(out).strip("\n")
