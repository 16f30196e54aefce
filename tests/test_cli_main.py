"""The console script's own error path: click's usage errors are one line, exit 2 (SPEC §4, §8)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import catches


def moectl(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "moectl", *args], capture_output=True, text=True, cwd=cwd, timeout=60)


@pytest.mark.parametrize("args", [
    ("run", "--cap", "abc"),
    ("run", "--no-such-option"),
    ("compare",),
    ("runs", "--limit", "many"),
    ("no-such-command",),
    ("run", "--repeat", "99999999999", "--dry-run"),  # each repeat is a run: a huge N is a typo, not 40 GB of plans
])
def test_usage_errors_are_one_line_with_exit_2(args, tmp_path):
    r = moectl(*args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "--help" in lines[0] and "Traceback" not in r.stderr and "╭" not in r.stderr


@pytest.mark.parametrize("args, code, keys", [
    (("show", "nope", "--json"), 2, {"ok", "error", "exit_code"}),  # moectl's own error
    (("compare", "a", "b", "--json"), 2, {"ok", "error", "exit_code"}),
    (("runs", "--json", "--limit", "many"), 2, {"ok", "error", "exit_code"}),  # click's, before any command code
    (("check", "--json", "--cap", "abc"), 2, {"ok", "guards", "error", "exit_code"}),  # check's contract keys
    (("run", "--cap", "abc", "--json", "--dry-run"), 2, {"ok", "guards", "error", "exit_code"}),
    (("wait", "nope", "--json"), 2, {"ok", "error", "exit_code"}),
])
def test_with_json_an_error_still_prints_one_json_document(args, code, keys, tmp_path):
    # A caller parsing stdout gets a document on every exit; the human line stays on stderr.
    r = moectl(*args, cwd=tmp_path)
    assert r.returncode == code, r.stderr
    data = json.loads(r.stdout)
    assert set(data) == keys and data["ok"] is False and data["exit_code"] == code
    assert data["error"] and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert moectl("show", "nope", cwd=tmp_path).stdout == ""  # without --json: nothing on stdout


@pytest.mark.parametrize("args", [
    ("export", "some-run", "--csv", ""),
    ("plot", "some-run", "-o", " "),
    ("import", "", "--name", "x"),
    ("init", ""),
    ("sweep", ""),
    ("summary", "-o", ""),
    ("status", "--config", ""),
    ("show", ""),  # not "every run" by prefix, nor the default run directory
    ("compare", "", "x"),
    ("sweep", "--resume", ""),
    ("run", "--exp-dir", "", "--dry-run"),  # was quietly the default directory
])
def test_an_empty_path_is_refused_not_taken_for_the_current_directory(args, tmp_path):
    # Path("") is ".": `export --csv ""` wrote both CSVs into the working directory.
    r = moectl(*args, cwd=tmp_path)
    said = "an empty RUN" if args[0] in ("show", "compare") else "an empty SWEEP" if "--resume" in args else "an empty path"
    assert r.returncode == 2 and said in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_file_where_a_directory_must_be_is_named_not_an_errno(tmp_path):
    from moectl.atomic import ensure_dir
    from moectl.errors import UsageError

    (tmp_path / "afile").write_text("x")
    with pytest.raises(UsageError, match=f"cannot make directory {tmp_path}/afile/sub/d: {tmp_path}/afile is a file"):
        ensure_dir(tmp_path / "afile" / "sub" / "d")
    ensure_dir(tmp_path / "new" / "dir")
    assert (tmp_path / "new" / "dir").is_dir()
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")  # not "a file": a link to nothing
    with pytest.raises(UsageError, match=f"{tmp_path}/dangling is a link to {tmp_path}/gone, which does not exist"):
        ensure_dir(tmp_path / "dangling" / "out")
    r = moectl("import", str(tmp_path), "--format", "csv", "--name", "x", cwd=tmp_path)
    assert r.returncode == 2 and f"{tmp_path} is a directory; give the log file in it" in r.stderr


def test_a_trainers_escape_sequences_do_not_reach_the_terminal_through_a_log_tail():
    from moectl.cli.common import printable

    assert printable("\x1b[31mCUDA error\x1b[0m at \x1b]0;pwned\x07step 3\x08\r\tdone") == "CUDA error at step 3\tdone"


def test_an_error_naming_a_files_content_prints_no_escape_sequence(tmp_path, monkeypatch):
    # An imported csv's header (or a run name in it) reached the terminal raw in the error line.
    from typer.testing import CliRunner

    from moectl.cli import app

    log = tmp_path / "esc.csv"
    log.write_text("\x1b[31mred\x1b[0m,x\nstep\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MOECTL_ARTIFACT_ROOT", str(tmp_path / "store"))
    r = CliRunner().invoke(app, ["import", str(log), "--format", "csv", "--name", "e"])
    assert r.exit_code == 2 and "\x1b" not in r.stderr and "(header: red,x)" in r.stderr, repr(r.stderr)


@pytest.mark.parametrize("args", [("status",), ("runs",), ("check", "--device", "cpu")])
def test_a_reader_that_left_ends_the_command_quietly_and_never_as_success(args):
    # `moectl status | head -1`: the pipe closes under moectl. One quiet exit 1 for every command -
    # no "error: [Errno 32] Broken pipe", and never 0 (a `check | head && launch` would launch).
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before moectl writes a byte: every write is EPIPE
    try:
        r = subprocess.run([sys.executable, "-m", "moectl", *args], stdout=write_end, stderr=subprocess.PIPE,
                           text=True, cwd=Path(__file__).resolve().parents[1], timeout=60)  # this repo: a project
    finally:
        os.close(write_end)
    assert r.returncode == 1 and r.stderr == "", (args, r.returncode, r.stderr)


def test_a_working_directory_deleted_under_the_shell_is_named_and_status_still_answers(tmp_path):
    def in_gone(*args):  # the shell's cwd removed before moectl starts, as `rm -rf` from elsewhere does
        gone = tmp_path / f"gone-{args[0]}"
        gone.mkdir()
        script = f'cd "{gone}" && rmdir "{gone}" && exec "$0" -m moectl "$@"'
        return subprocess.run(["sh", "-c", script, sys.executable, *args], capture_output=True, text=True, timeout=60)

    status = in_gone("status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["config_error"].startswith("the current directory no longer exists")
    for args in (("runs",), ("init",), ("check",)):
        r = in_gone(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.strip() == ("error: the current directory no longer exists (deleted or moved): "
                                    "cd into the repository, or pass --config"), (args, r.stderr)


def test_bare_moectl_prints_the_command_list(tmp_path):
    r = moectl(cwd=tmp_path)
    text = r.stdout + r.stderr
    for command in ("run", "status", "check", "compare", "sweep", "summary"):
        assert command in text
    assert "Traceback" not in text


def test_every_command_has_help_with_an_example():
    from typer.testing import CliRunner

    from moectl.cli import app

    names = [c.name or c.callback.__name__ for c in app.registered_commands]
    assert {"init", "status", "check", "run", "runs", "show", "compare", "import", "sweep", "summary",
            "plot", "export"} <= set(names)
    runner = CliRunner()
    for name in names:
        r = runner.invoke(app, [name, "--help"])
        assert r.exit_code == 0, (name, r.output)
        assert "Example" in r.output, f"`moectl {name} --help` has no example"


def test_a_config_table_named_in_help_is_shown_not_eaten_as_rich_markup():
    # Help is rendered as rich markup: an unescaped `[cluster]` vanishes ("( backend = ...").
    import re

    import typer.main
    from typer.testing import CliRunner

    from moectl.cli import app

    group = typer.main.get_command(app)
    runner = CliRunner()
    for name, command in group.commands.items():
        texts = [p.help or "" for p in command.params] + [command.help or ""]
        # every `[table]` / `[[legs]]` / `[launch.options]` written in a help text (rich's own tags aside)
        tables = {m for t in texts for m in re.findall(r"\[\[?([a-z_]+)[].]", t)} - {"bold", "dim", "red", "green", "yellow"}
        if not tables:
            continue
        shown = runner.invoke(app, [name, "--help"], env={"COLUMNS": "400"}).output
        for table in tables:
            assert f"[{table}]" in shown or f"[{table}." in shown, f"`moectl {name} --help` lost [{table}]"
        # Each option's help is one line at this width: shown whole, its brackets included.
        lines = [" ".join(line.split()) for line in shown.splitlines()]
        for param in command.params:
            if param.help and "[" in param.help:
                want = " ".join(re.sub(r"(?<!\\)\[/?(bold|dim)\]", "", param.help).replace("\\[", "[").split())
                assert any(want in line for line in lines), f"`moectl {name} --help` mangles {param.name}'s help: {want!r}"


def test_help_lists_each_command_with_its_whole_summary_on_one_line(tmp_path):
    """The command list shows each docstring's first paragraph as one sentence: hard line breaks
    in the docstring must not break it (they did, mid-sentence, under typer's rich mode), and the
    top-level help is plain text that fills the terminal (COLUMNS) rather than click's 80."""
    import os
    import re

    from moectl.cli import app

    r = subprocess.run([sys.executable, "-m", "moectl", "--help"], capture_output=True, text=True, cwd=tmp_path,
                       timeout=60, env={**os.environ, "COLUMNS": "400", "NO_COLOR": "1"})
    assert r.returncode == 0, r.stderr
    commands = r.stdout.split("\nCommands:\n", 1)[1]
    rows = dict(ln.strip().split(None, 1) for ln in commands.splitlines() if ln.strip())
    for info in app.registered_commands:
        name = info.name or info.callback.__name__.replace("_cmd", "").replace("_", "-")
        first_paragraph = " ".join(info.callback.__doc__.strip().split("\n\n")[0].split())
        # Markup taken out: style tags dropped, escaped brackets printed as brackets.
        shown = re.sub(r"\[/?(?:bold|italic|dim|red|green|yellow|cyan)\]", "", first_paragraph).replace("\\[", "[")
        assert rows.get(name) == shown, (name, rows.get(name))


def test_a_command_ending_on_its_own_nonzero_exit_still_prints_its_json_error(capsys):
    # Ctrl-C while following a Slurm job under --json: the command says "detached: ..." and exits
    # 130 itself - stdout was empty; it gets the error document like every other exit.
    import typer

    from moectl.cli.common import error, handle_errors, print_json

    @handle_errors
    def detaches(json_out: bool = False):
        error("detached: the job keeps running")
        raise typer.Exit(130)

    @handle_errors
    def reports_then_fails(json_out: bool = False):
        print_json({"id": "x", "status": "failed"})
        raise typer.Exit(4)

    with pytest.raises(typer.Exit):
        detaches(json_out=True)
    assert json.loads(capsys.readouterr().out) == {"ok": False, "error": "detached: the job keeps running", "exit_code": 130}
    with pytest.raises(typer.Exit):
        reports_then_fails(json_out=True)
    assert json.loads(capsys.readouterr().out) == {"id": "x", "status": "failed"}  # its own document, once
    with pytest.raises(typer.Exit):
        detaches(json_out=False)
    assert capsys.readouterr().out == ""


# Ctrl-C a moment after Enter lands while the CLI's modules are still being imported: this import
# hook raises the KeyboardInterrupt at that very point (where a real SIGINT landed in an audit), so
# the window is hit every time rather than by a timed signal.
INTERRUPT_ON_IMPORT = """
import sys
class Interrupting:
    def find_spec(self, name, path=None, target=None):
        if name == {module!r}:
            raise KeyboardInterrupt
        return None
sys.meta_path.insert(0, Interrupting())
sys.argv = ["moectl", *{args!r}]
from moectl.entry import main
main()
"""


@pytest.mark.parametrize("module", ["moectl.cli.common", "moectl.cli.runs"])
@pytest.mark.parametrize("args", [("check",), ("status", "--json")])
def test_ctrl_c_while_the_cli_is_imported_is_one_line_and_exit_130(module, args, tmp_path):
    code = INTERRUPT_ON_IMPORT.format(module=module, args=list(args))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert r.returncode == 130, r.stderr
    assert r.stderr.strip().splitlines() == ["error: interrupted"], r.stderr
    if "--json" in args:
        assert json.loads(r.stdout) == {"ok": False, "error": "interrupted", "exit_code": 130}
    else:
        assert r.stdout == ""


# A stop signal landing once the command is over, while the interpreter shuts down: an exit handler
# sends it at that very point (an audit hit it 50 ms after a run's last line: -15 / -2, not the code).
SIGNAL_AT_EXIT = """
import atexit, os, signal, sys, time
import moectl.cli
def command_that_ends(code={code}):
    atexit.register(lambda: (os.kill(os.getpid(), signal.{sig}), time.sleep(0.3)))
    sys.exit(code)
moectl.cli.main = command_that_ends
from moectl.entry import main
main()
"""


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM", "SIGHUP"])
@pytest.mark.parametrize("code", [0, 4, 130])
def test_a_stop_signal_after_the_command_ended_leaves_its_exit_code(sig, code, tmp_path):
    r = subprocess.run([sys.executable, "-c", SIGNAL_AT_EXIT.format(code=code, sig=sig)], capture_output=True,
                       text=True, cwd=tmp_path, timeout=60)
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and "KeyboardInterrupt" not in r.stderr, r.stderr


def test_an_error_caused_by_ctrl_c_is_an_interrupt_not_an_internal_error(capsys):
    """pydantic builds a model class's validator on first use; Ctrl-C inside that comes out as its
    SchemaError, raised from the KeyboardInterrupt: exit 130 and 'interrupted', not exit 1."""
    import typer

    from moectl.cli.common import handle_errors

    @handle_errors
    def command(json_out: bool = False):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as exc:
            raise RuntimeError('Error building "function-after" validator:') from exc

    with pytest.raises(typer.Exit) as exc:
        command(json_out=True)
    assert exc.value.exit_code == 130
    out, err = capsys.readouterr()
    assert err.strip() == "error: interrupted" and json.loads(out)["exit_code"] == 130

    @handle_errors
    def buggy(json_out: bool = False):
        raise RuntimeError("a real bug")

    with pytest.raises(typer.Exit) as exc:
        buggy()
    assert exc.value.exit_code == 1 and "internal error: RuntimeError: a real bug" in capsys.readouterr().err


def test_sigterm_stops_any_command_as_ctrl_c_does_exit_130_and_nothing_half_made(tmp_path):
    """`timeout`, `kill` or a scheduler's SIGTERM during a long import: was Python's default, a
    silent death (143) that left an empty run directory in the store. Now it is Ctrl-C's one line
    and exit 130, with the half-made run removed."""
    import os
    import signal
    import time

    log = tmp_path / "big.jsonl"  # seconds of parsing: the signal lands inside the import
    log.write_text("".join(json.dumps({"type": "step", "step": i, "loss": 5.0, "dt_ms": 100.0}) + "\n"
                           for i in range(100_000)))
    store = tmp_path / "store"
    proc = subprocess.Popen([sys.executable, "-m", "moectl", "import", str(log), "--name", "big", "--json"],
                            cwd=tmp_path, env={**os.environ, "MOECTL_ARTIFACT_ROOT": str(store)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not catches(proc.pid, signal.SIGTERM):  # moectl's handler is in: past Python's start-up
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["error: interrupted"]
    assert json.loads(out) == {"ok": False, "error": "interrupted", "exit_code": 130}
    assert not store.exists() or [p for p in store.rglob("*") if p.is_file()] == []


@pytest.mark.parametrize("env", [{"PYTHONIOENCODING": "ascii"}, {"LC_ALL": "C", "PYTHONUTF8": "0"}])
def test_a_stdout_that_cannot_encode_moectls_characters_gets_them_replaced_not_an_error(env, tmp_path):
    # `—`, `·` and `±` in tables and help: exit 2 half-way through `show`/`compare`, a traceback for --help.
    import os

    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONIOENCODING", "PYTHONUTF8", "LC_ALL", "LANG")}
    log = Path(__file__).parent / "fixtures" / "nanochat_small.log"
    store = {"MOECTL_ARTIFACT_ROOT": str(tmp_path / "root")}
    for args in (("run", "--help"), ("import", str(log), "--name", "a", "--format", "nanochat"),
                 ("import", str(log), "--name", "b", "--format", "nanochat"), ("show", "a"), ("compare", "a", "b"),
                 ("runs",)):
        r = subprocess.run([sys.executable, "-m", "moectl", *args], capture_output=True, cwd=tmp_path, timeout=60,
                           env={**base, **store, **env})
        assert r.returncode == 0 and b"Traceback" not in r.stderr and b"codec" not in r.stderr, (args, r.stderr)
        assert r.stdout.isascii() and r.stdout.strip(), args


@pytest.mark.parametrize("args", [("runs", "--json"), ("status", "--json")])
def test_json_to_a_closed_stdout_is_not_an_internal_error(args, tmp_path):
    # `moectl runs --json >&-`: print_json wrote to a sys.stdout of None (exit 1, "internal error")
    r = subprocess.run(["sh", "-c", 'exec "$0" -m moectl "$@" >&-', sys.executable, *args], capture_output=True,
                       text=True, cwd=tmp_path, timeout=60, env={**__import__("os").environ,
                                                                 "MOECTL_ARTIFACT_ROOT": str(tmp_path / "root")})
    assert r.returncode == 0 and "internal error" not in r.stderr, r.stderr


def test_a_machine_without_git_is_named_so(tmp_path):
    # `moectl summary` with no git on PATH said "error: git: No such file or directory".
    import os
    import shutil

    (tmp_path / ".moectl.toml").write_text('[project]\nvenv = ""\n')
    empty = tmp_path / "bin"
    empty.mkdir()
    assert shutil.which("git", path=str(empty)) is None
    r = subprocess.run([sys.executable, "-m", "moectl", "summary", "--no-commit"], capture_output=True, text=True,
                       cwd=tmp_path, timeout=60,
                       env={**os.environ, "PATH": str(empty), "MOECTL_ARTIFACT_ROOT": str(tmp_path / "root")})
    assert r.returncode == 2 and r.stderr == "error: git is not installed (no `git` on PATH)\n", r.stderr
