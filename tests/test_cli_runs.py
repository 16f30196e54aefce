"""`moectl runs / show / compare / import` through typer's CliRunner, in a real git repository with
a real .moectl.toml (conftest `project`) and an isolated artifact root (MOECTL_ARTIFACT_ROOT)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moectl.cli import app
from moectl.records import RUN_RECORD, RunRecord
from moectl.store import create_run_dir, save_run

FIXTURES = Path(__file__).parent / "fixtures"
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def imported(name: str, fixture: str, fmt: str, *extra: str) -> dict:
    r = invoke("import", str(FIXTURES / fixture), "--format", fmt, "--name", name, "--json", *extra)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


@pytest.mark.parametrize("command", ["runs", "show", "compare", "import"])
def test_help_has_an_example(command):
    r = invoke(command, "--help")
    assert r.exit_code == 0 and "Example" in r.stdout and f"moectl {command}" in r.stdout


def test_import_nanochat_uses_config_window(project, artifact_root):
    # window 4 from .moectl.toml: steps 4..7 of the fixture
    with open(project / ".moectl.toml", "a") as fh:
        fh.write("\n[metrics]\nwindow = 4\n")
    rec = imported("nano", "nanochat_small.log", "nanochat")
    assert rec["status"] == "imported" and rec["tag"] == "nano" and rec["skipped"] == 1
    s = rec["summary"]
    assert s["window"] == 4 and s["steps"] == 4
    # tok/sec (12000+13000+14000+15000)/4, dt (600+620+640+660)/4, MFU (1.2+1.3+1.4+1.5)/4
    assert s["tok_per_sec"] == pytest.approx(13500.0)
    assert s["dt_ms"] == pytest.approx(630.0)
    assert s["mfu"] == pytest.approx(1.35)
    assert s["peak_mem_mib"] == 1234.5 and s["total_time_min"] == pytest.approx(0.5) and s["final_loss"] == 5.5
    run_dir = Path(rec["exp_dir"])
    assert run_dir.parent == artifact_root.resolve() and (run_dir / "metrics.jsonl").is_file()
    assert [p.name for p in artifact_root.iterdir()] == [run_dir.name]  # no temp dirs left behind


def test_import_leaves_the_configured_warmup_steps_out(project, artifact_root):
    # warmup_steps 2: steps 0 (the 9 s compile step) and 1 stay out; the window of 50 holds 2..7.
    with open(project / ".moectl.toml", "a") as fh:
        fh.write("\n[metrics]\nwarmup_steps = 2\n")
    s = imported("nano", "nanochat_small.log", "nanochat")["summary"]
    assert (s["window"], s["warmup_steps"], s["steps"], s["clean"]) == (50, 2, 6, True)
    assert s["note"] == "6 clean steps (< window 50) after 2 warm-up steps"
    # tok/sec (11000+11500+12000+13000+14000+15000)/6, dt (650+640+600+620+640+660)/6
    assert s["tok_per_sec"] == pytest.approx(76500 / 6)
    assert s["dt_ms"] == pytest.approx(3810 / 6)
    # whole-run figures are unaffected: peak, total time, final loss
    assert s["peak_mem_mib"] == 1234.5 and s["total_time_min"] == pytest.approx(0.5) and s["final_loss"] == 5.5


def test_import_text_output_and_all_formats(project):
    r = invoke("import", str(FIXTURES / "steps_seed_style.csv"), "-f", "csv", "--name", "seedlike")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].endswith("_moe-seedlike") and "1 malformed" in r.stdout
    # all 5 steps (window 50): tok/sec (58000+700000+800000+820000+790000)/5
    assert "633,600.00" in r.stdout
    js = imported("js", "metrics_small.jsonl", "jsonl")
    # all 6 steps, after the resumed step 3 replaced its first line: (1000+2000+1900+2100+2000+1950)/6
    assert js["summary"]["tok_per_sec"] == pytest.approx(10950 / 6)
    alpha = imported("alpha", "steps_engine_style.csv", "csv", "--run", "alpha")
    assert alpha["summary"]["peak_mem_mib"] == 210.0 and alpha["summary"]["mfu"] is None
    assert "earlier run" not in r.stderr
    # the same name again: the tag now names the new run, and the import says so
    again = invoke("import", str(FIXTURES / "steps_seed_style.csv"), "-f", "csv", "--name", "seedlike")
    assert again.exit_code == 0, again.output
    assert (f"warning: 1 earlier run(s) tagged seedlike ({lines[0]}): `show seedlike` and `compare seedlike` now "
            "mean this one; an id names an earlier one") in again.stderr


def test_import_without_format_reads_the_file_by_its_suffix(project, tmp_path):
    # A seed-style step table or the engine's metrics.jsonl, named as such, imports without
    # --format; a log of another name is read as nanochat's, and when that finds no step the
    # one-line error names the formats to try.
    csv = invoke("import", str(FIXTURES / "steps_seed_style.csv"), "--name", "bysuffix", "--json")
    assert csv.exit_code == 0, csv.output
    assert json.loads(csv.stdout)["summary"]["tok_per_sec"] == pytest.approx(633600.0)
    upper = tmp_path / "METRICS.JSONL"
    upper.write_bytes((FIXTURES / "metrics_small.jsonl").read_bytes())
    js = invoke("import", str(upper), "--name", "js", "--json")
    assert js.exit_code == 0 and json.loads(js.stdout)["summary"]["tok_per_sec"] == pytest.approx(10950 / 6)
    nano = invoke("import", str(FIXTURES / "nanochat_small.log"), "--name", "nano", "--json")
    assert nano.exit_code == 0 and json.loads(nano.stdout)["summary"]["steps"] > 0
    table = tmp_path / "steps.txt"
    table.write_bytes((FIXTURES / "steps_seed_style.csv").read_bytes())
    r = invoke("import", str(table), "--name", "txt")
    assert r.exit_code == 2 and r.stderr.strip().splitlines() == [
        f"error: no step lines in {table} as nanochat; another format? --format regex|jsonl|csv"]


def test_import_reads_utf16_logs_and_pandas_float_steps_and_names_a_pipe(project, tmp_path):
    import os

    # PowerShell's `>` and Excel's "Unicode text" write UTF-16 (with a BOM)
    utf16 = tmp_path / "steps16.csv"
    utf16.write_bytes((FIXTURES / "steps_seed_style.csv").read_text().encode("utf-16"))
    r = invoke("import", str(utf16), "--name", "wide", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["summary"]["tok_per_sec"] == pytest.approx(633600.0)
    nano16 = tmp_path / "train16.log"
    nano16.write_bytes((FIXTURES / "nanochat_small.log").read_text().encode("utf-16-be").join([b"\xfe\xff", b""]))
    assert invoke("import", str(nano16), "--name", "nano16").exit_code == 0
    # pandas writes an integer column holding a gap as floats: 0.0, 1.0, ...; 2.5 is no step
    floats = tmp_path / "floats.csv"
    floats.write_text(",step,loss,tok_per_sec\n0,0.0,5.0,1000\n1,1.0,4.9,1100\n2,,4.8,1200\n3,2.5,4.7,1300\n")
    r = invoke("import", str(floats), "--name", "pandas", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["skipped"] == 2 and data["summary"]["tok_per_sec"] == pytest.approx(1050.0)
    # a figure that cannot be negative (a -1 placeholder) is missing from its step, not averaged in
    negative = tmp_path / "negative.csv"
    negative.write_text("step,loss,dt_ms,tok_per_sec\n0,5.0,100,1000\n1,4.9,-5,-1\n2,4.8,120,1200\n")
    r = invoke("import", str(negative), "--name", "neg", "--json")
    summary = json.loads(r.stdout)["summary"]
    assert (summary["steps"], summary["tok_per_sec"], summary["dt_ms"]) == (3, 1100.0, 110.0)
    # two tables concatenated (`cat a.csv b.csv`): the second header is no run of its own
    both = tmp_path / "both.csv"
    both.write_text("run,step,loss\na,0,5.0\na,1,4.9\nrun,step,loss\nb,0,6.0\n")
    r = invoke("import", str(both), "--name", "both")
    assert r.exit_code == 2 and r.stderr.strip() == "error: csv holds 2 runs, pick one with --run: a, b"
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)  # never opened: reading it would wait for a writer
    r = invoke("import", str(fifo), "--name", "piped")
    assert r.exit_code == 2 and r.stderr.strip() == (
        f"error: {fifo} is not a regular file (a pipe or device?): save the log to a file and import that")
    r = invoke("import", "-", "--name", "stdin")  # was "log file not found: -"
    assert r.exit_code == 2 and r.stderr.strip() == (
        "error: LOG -: a log is read from a file, not from stdin (a pipe is gone for a retry); save it to a file "
        "and import that")


def test_import_names_a_store_path_or_name_it_cannot_use_before_reading_the_log(project, artifact_root,
                                                                               monkeypatch, tmp_path):
    log = str(FIXTURES / "nanochat_small.log")
    r = invoke("import", log, "--name", "x" * 300)  # was `[Errno 36] File name too long`, after the whole parse
    assert r.exit_code == 2 and r.stderr.strip() == (
        "error: --name: the run directory name would be up to 323 bytes, over the filesystem's 255; use a shorter name")
    first = json.loads(invoke("import", log, "--name", "base", "--json").stdout)["id"]
    r = invoke("import", log, "--name", first)  # a tag equal to an id: `show ID` could never reach this run
    assert r.exit_code == 2 and r.stderr.strip() == (
        f"error: --name {first!r} is the id of a run already in the store; pick another name")
    blocker = tmp_path / "afile"
    blocker.write_text("")
    monkeypatch.setenv("MOECTL_ARTIFACT_ROOT", str(blocker))
    r = invoke("import", log, "--name", "x")  # was `[Errno 17] File exists: '...'`
    assert r.exit_code == 2 and r.stderr.strip() == (
        f"error: artifact_root {blocker} is not a directory (MOECTL_ARTIFACT_ROOT or [paths] artifact_root)")
    monkeypatch.setenv("MOECTL_ARTIFACT_ROOT", str(blocker / "store"))
    r = invoke("import", log, "--name", "x")
    assert r.exit_code == 2 and r.stderr.strip().splitlines() == [
        f"error: artifact_root {blocker / 'store'} is not a directory (MOECTL_ARTIFACT_ROOT or [paths] artifact_root)"]


def test_an_os_error_is_its_path_and_reason_and_any_message_one_line():
    from moectl.cli.common import one_line

    assert one_line(FileExistsError(17, "File exists", "/tmp/x")) == "/tmp/x: File exists"
    assert one_line(OSError(28, "No space left on device")) == "No space left on device"
    assert one_line(OSError(18, "Invalid cross-device link", "/a", None, "/b")) == "/a -> /b: Invalid cross-device link"
    assert one_line(ValueError("\n\\frac\n     ^\nParseSyntaxException: Expected")) == "\\frac ^ ParseSyntaxException: Expected"


@pytest.mark.parametrize(
    "content, fmt",
    [(None, "nanochat"), ("", "nanochat"), ("nothing here\n", "nanochat"), ("{bad\n", "jsonl"), ("a,b\n1,2\n", "csv")],
)
def test_import_bad_file_exit_2_one_line_nothing_written(project, artifact_root, tmp_path, content, fmt):
    log = tmp_path / "bad.log"
    if content is not None:
        log.write_text(content)
    r = invoke("import", str(log), "--format", fmt, "--name", "bad")
    assert r.exit_code == 2
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.output
    assert not artifact_root.exists() or list(artifact_root.iterdir()) == []


def test_import_rejects_bad_name_and_format(project):
    assert invoke("import", str(FIXTURES / "nanochat_small.log"), "--name", "../evil").exit_code == 2
    assert invoke("import", str(FIXTURES / "nanochat_small.log"), "--name", "x", "-f", "yaml").exit_code == 2
    # an option that only one format reads is refused for another, not silently ignored
    r = invoke("import", str(FIXTURES / "nanochat_small.log"), "--name", "x", "--run", "foo")
    assert r.exit_code == 2 and "--run is for --format csv" in r.stderr
    r = invoke("import", str(FIXTURES / "nanochat_small.log"), "--name", "-x")
    assert r.exit_code == 2 and "(not first)" in r.stderr


def test_runs_json_table_filters(project, artifact_root):
    a = imported("first", "metrics_small.jsonl", "jsonl")
    b = imported("second", "nanochat_small.log", "nanochat")
    r = invoke("runs", "--json")
    assert r.exit_code == 0
    data = json.loads(r.stdout)
    assert [d["id"] for d in data] == [b["id"], a["id"]]  # newest first
    for key in ("id", "tag", "status", "created_at", "started_at", "finished_at", "exit_code", "argv", "options",
                "git", "guards", "overrides", "exp_dir", "summary", "error"):
        assert key in data[0]
    assert [d["id"] for d in json.loads(invoke("runs", "--json", "--limit", "1").stdout)] == [b["id"]]
    assert json.loads(invoke("runs", "--json", "--status", "failed").stdout) == []
    table = invoke("runs")
    assert table.exit_code == 0 and a["id"] in table.stdout and "imported" in table.stdout
    assert "10,938" in table.stdout  # nano tail tok/sec 87500/8 = 10937.5, shown without decimals
    assert invoke("runs", "--status", "nope").exit_code == 2


def test_runs_skips_corrupt_record_and_settles_a_dead_owners_run(project, artifact_root):
    good = imported("good", "metrics_small.jsonl", "jsonl")
    broken = artifact_root / "20260101_000000_moe-broken"
    broken.mkdir()
    (broken / RUN_RECORD).write_text('{"id": "20260101_000000_moe-bro')  # half-written
    # A record someone edited its status out of: unreadable too, never a made-up `interrupted`.
    statusless = create_run_dir(artifact_root / "20260101_000001_moe-nostatus")
    save_run(RunRecord(id=statusless.name, tag="nostatus", status="completed", created_at="2026-01-01T00:00:01+00:00",
                       exp_dir=str(statusless)))
    text = json.loads((statusless / RUN_RECORD).read_text())
    del text["status"]
    (statusless / RUN_RECORD).write_text(json.dumps(text))
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # a pid that is certainly gone
    d = create_run_dir(artifact_root / "20260102_000000_moe-ghost")
    now = datetime.now().astimezone().isoformat()
    save_run(RunRecord(id=d.name, tag="ghost", status="running", created_at=now, started_at=now,
                       exp_dir=str(d), pid=proc.pid, host=socket.gethostname()))
    r = invoke("runs", "--json")
    assert r.exit_code == 0
    data = {x["tag"]: x for x in json.loads(r.stdout)}
    assert set(data) == {"good", "ghost"} and data["good"]["id"] == good["id"]
    # Its moectl is dead: the listing settled it (test_sigkill.py has the details).
    assert data["ghost"]["status"] == "interrupted" and "recorded_status" not in data["ghost"]
    assert "skipped 2 unreadable run record" in r.stderr and "broken" in r.stderr
    assert "nostatus/run.json: record: Value error, status: Field required" in r.stderr
    assert json.loads(invoke("runs", "--json", "--status", "stale").stdout) == []
    assert [x["tag"] for x in json.loads(invoke("runs", "--json", "--status", "interrupted").stdout)] == ["ghost"]
    assert json.loads((d / RUN_RECORD).read_text())["status"] == "interrupted"  # rewritten on read
    shown = invoke("show", "ghost")
    assert shown.exit_code == 0 and "status: interrupted" in shown.stdout and "interrupted (moectl was killed)" in shown.stdout


def test_compare_and_show_say_when_a_metrics_file_was_damaged_since_its_run(project, artifact_root):
    # compare recomputes from metrics.jsonl; cut or garbled since, its figures silently differed from
    # the record's (`runs`, `show`) - and a FIFO or a directory in its place hung or failed them all.
    import os

    imported("whole", "nanochat_small.log", "nanochat")
    cut = imported("cut", "nanochat_small.log", "nanochat")
    metrics = Path(cut["exp_dir"]) / "metrics.jsonl"
    text = metrics.read_text()
    at = text.index('"step": 4') if '"step": 4' in text else text.index('"step":4')
    metrics.write_text(text[:at + 20])  # cut mid-line at step 4: steps 0-3 and a broken line are left
    r = invoke("compare", "whole", "cut", "--json")
    assert r.exit_code == 0, r.output
    notes = json.loads(r.stdout)["notes"]
    assert "damaged: 1 line(s) of cut's metrics.jsonl cannot be read and are left out" in notes
    assert "damaged: cut's metrics.jsonl holds 4 steps, its record 8 (cut since it was recorded?): its figures " \
           "here are of the steps the file holds" in notes
    assert not any("whole" in n for n in notes if n.startswith("damaged"))

    metrics.unlink()
    metrics.mkdir()  # a directory where the file was
    shown = invoke("show", "cut")
    assert shown.exit_code == 0, shown.output
    assert "note: metrics.jsonl cannot be read (" in shown.stdout and "not a regular file" in shown.stdout
    r = invoke("compare", "whole", "cut", "--json")
    assert r.exit_code == 0 and any("cut's metrics.jsonl cannot be read" in n for n in json.loads(r.stdout)["notes"])
    metrics.rmdir()
    os.mkfifo(metrics)  # nobody writes it: a plain open() waits for a writer for ever
    for args in (["show", "cut", "--json"], ["compare", "whole", "cut", "--json"], ["runs", "--json"]):
        r = invoke(*args)
        assert r.exit_code == 0, (args, r.output)
    assert "not a regular file" in json.loads(invoke("show", "cut", "--json").stdout)["metrics_unreadable"]


def test_show_json_and_text(project):
    rec = imported("nano", "nanochat_small.log", "nanochat")
    r = invoke("show", "nano", "--json")
    assert r.exit_code == 0
    data = json.loads(r.stdout)
    assert data["id"] == rec["id"] and data["metrics_steps"] == 8
    assert {f["name"] for f in data["files"]} == {"run.json", "metrics.jsonl"}
    text = invoke("show", rec["id"][:12])  # a unique id prefix
    assert text.exit_code == 0 and rec["id"] in text.stdout
    assert "10.5000 → 5.5000" in text.stdout and any(c in text.stdout for c in "▁▂▃▄▅▆▇█")


def test_unknown_and_ambiguous_refs_exit_2(project):
    imported("alpha", "metrics_small.jsonl", "jsonl")
    imported("alpine", "metrics_small.jsonl", "jsonl")
    r = invoke("show", "gamma")
    assert r.exit_code == 2
    assert r.stderr.startswith("error: no run matches 'gamma' under ") and len(r.stderr.strip().splitlines()) == 1
    amb = invoke("compare", "alp", "alpha")
    assert amb.exit_code == 2 and "ambiguous" in amb.stderr
    assert "moe-alpha (tag alpha)" in amb.stderr and "moe-alpine (tag alpine)" in amb.stderr


def test_compare_json_contract_and_baseline(project):
    base = imported("base", "nanochat_small.log", "nanochat")
    other = imported("other", "metrics_small.jsonl", "jsonl")
    r = invoke("compare", "base", "other", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["baseline"] == base["id"] and data["window"] == 50
    assert [x["id"] for x in data["runs"]] == [base["id"], other["id"]]
    names = {"tok_per_sec", "dt_ms", "mfu", "peak_mem_mib", "total_time_min", "final_loss", "drop_frac", "expert_load_max"}
    for run in data["runs"]:
        assert {"id", "tag", "steps", "metrics"} <= set(run) and set(run["metrics"]) == names
        assert all({"value", "delta_pct", "stderr"} <= set(v) for v in run["metrics"].values())
    tps = data["runs"][1]["metrics"]["tok_per_sec"]
    # 10950/6 vs 87500/8, both hand-derived from the fixture rows
    assert tps["delta_pct"] == pytest.approx((10950 / 6 - 87500 / 8) / (87500 / 8) * 100)
    assert data["runs"][1]["metrics"]["mfu"] == {"value": None, "delta_pct": None, "stderr": None, "beyond_noise": None,
                                                 "marked": False, "not_finite": False}
    # Both fixtures are shorter than the default 10 warm-up steps: their tail means are kept and
    # shown, marked, and no noise verdict is given on them.
    assert data["warmup_steps"] == 10 and [x["clean"] for x in data["runs"]] == [False, False]
    assert tps["marked"] is True and tps["beyond_noise"] is None and "warm-up only" in data["runs"][1]["note"]
    # --baseline: the other run, by tag; --window 3
    r2 = json.loads(invoke("compare", "base", "other", "--baseline", "other", "--window", "3", "--json").stdout)
    assert r2["baseline"] == other["id"] and r2["window"] == 3
    assert r2["runs"][1]["metrics"]["tok_per_sec"]["delta_pct"] == 0.0
    # a baseline not among the runs is added in front
    r3 = json.loads(invoke("compare", "other", "--baseline", "base", "--json").stdout)
    assert [x["id"] for x in r3["runs"]] == [base["id"], other["id"]]


def test_compare_markdown_and_table(project):
    imported("base", "nanochat_small.log", "nanochat")
    imported("other", "metrics_small.jsonl", "jsonl")
    md = invoke("compare", "base", "other", "--markdown")
    assert md.exit_code == 0
    assert md.stdout.startswith("| run | steps | tok/sec |") and "base (baseline)" in md.stdout
    assert "standard error" in md.stdout and "still comparable" in md.stdout
    table = invoke("compare", "base", "other")
    assert table.exit_code == 0 and "(base)" in table.stdout and "beyond noise" in table.stdout
    assert invoke("compare", "base").exit_code == 2  # one run only


def compare_table_rows(text: str) -> tuple[list[str], list[list[str]]]:
    """The rendered compare table read back: (header, rows), each row its cells stripped; the
    section lines between runs are dropped."""
    header = next([c.strip() for c in line.split("┃")[1:-1]] for line in text.splitlines() if line.startswith("┃"))
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in text.splitlines() if line.startswith("│")]
    return header, rows


def number(text: str) -> float:
    return float(text.replace(",", "").replace("±", "").rstrip("%*†"))


@pytest.mark.parametrize("warmup_steps", [0, 10])
def test_compare_table_puts_value_then_error_then_delta_in_every_column(project, warmup_steps):
    """Every run is the same rows for every metric: value, ±, Δ% (none for the baseline). A metric
    with no error (peak mem, total, final loss) leaves its ± cell empty; its Δ% stays in the Δ% row."""
    with (project / ".moectl.toml").open("a") as fh:
        fh.write(f"\n[metrics]\nwarmup_steps = {warmup_steps}\n")
    imported("base", "nanochat_small.log", "nanochat")
    imported("other", "metrics_small.jsonl", "jsonl")
    data = json.loads(invoke("compare", "base", "other", "--json").stdout)
    r = invoke("compare", "base", "other")
    assert r.exit_code == 0, r.output
    header, rows = compare_table_rows(r.stdout)
    assert header[:3] == ["run", "steps", ""]
    titles = {"tok/sec": "tok_per_sec", "dt (ms)": "dt_ms", "MFU %": "mfu", "peak mem (MiB)": "peak_mem_mib",
              "total (min)": "total_time_min", "final loss": "final_loss", "drop frac": "drop_frac",
              "max expert load": "expert_load_max"}
    metrics = [titles[h] for h in header[3:]]
    # Both fixtures lack MFU in one run, so it is shown; the other six too.
    assert set(metrics) == set(titles.values())
    assert [row[2] for row in rows] == ["", "±", "", "±", "Δ%"]  # base: value, ±; other: value, ±, Δ%
    # The ± row says which error it shows (issue 10): one run each, so within-run.
    assert [row[0] for row in rows] == ["base (base)", "within-run", "other", "within-run", ""]
    assert [(x["n_repeats"], x["noise"]) for x in data["runs"]] == [(1, "within-run"), (1, "within-run")]
    base, other = data["runs"]
    for run, (value_row, error_row, *delta_row) in ((base, rows[0:2]), (other, rows[2:5])):
        assert value_row[1] == str(run["steps"]) and error_row[1] == ""
        for i, name in enumerate(metrics, start=3):
            mv = run["metrics"][name]
            tol = 1 if name in ("tok_per_sec", "peak_mem_mib") else 0.01
            if mv["value"] is None:
                assert value_row[i] == "—"
            else:
                assert number(value_row[i]) == pytest.approx(mv["value"], abs=tol)
                assert value_row[i].endswith("†") == mv["marked"]
            if mv["stderr"] is None:
                assert error_row[i] == ""
            else:
                assert error_row[i].startswith("±") and number(error_row[i]) == pytest.approx(mv["stderr"], abs=tol)
            if run is base:
                continue
            cell = delta_row[0][i]
            if mv["delta_pct"] is None:
                assert cell == ""
            else:
                assert cell.rstrip("*").endswith("%") and number(cell) == pytest.approx(mv["delta_pct"], abs=0.005)
                assert cell.endswith("*") == bool(mv["beyond_noise"])
    # The figures the layout is about: peak mem has no error, yet its delta is in the Δ% row,
    # beside tok/sec's; tok/sec's error is in the ± row.
    peak, tps = 3 + metrics.index("peak_mem_mib"), 3 + metrics.index("tok_per_sec")
    assert rows[3][peak] == "" and rows[4][peak].endswith("%") and rows[3][tps].startswith("±")
    if warmup_steps == 0:  # clean windows: tok/sec -83% is beyond noise, hence the mark
        assert rows[4][tps].endswith("%*")
    else:  # warm-up only: marked values, no noise verdict, the footnote
        assert rows[2][tps].endswith("†") and rows[4][tps].endswith("%") and "† warm-up only" in r.stdout
    assert "± standard error of the tail mean · Δ% vs baseline · * beyond noise" in r.stdout
    assert all(note in r.stdout for note in data["notes"])


def test_compare_write_report_commits_only_the_report(project):
    from tests.conftest import git

    imported("base", "nanochat_small.log", "nanochat")
    imported("other", "metrics_small.jsonl", "jsonl")
    (project / "user_staged.txt").write_text("mine\n")
    git(project, "add", "user_staged.txt")
    (project / "README.md").write_text("user edit\n")
    r = invoke("compare", "base", "other", "--write-report", "--json")
    assert r.exit_code == 0, r.output
    report = Path(json.loads(r.stdout)["report"])
    assert report.parent == (project / "reports").resolve() and report.name.endswith("_compare_other_vs_base.md")
    assert "| run | steps |" in report.read_text()
    subject = git(project, "log", "-1", "--format=%s").strip()
    assert subject.startswith("report: compare other vs base — ")
    assert json.loads(r.stdout)["commit"] == git(project, "rev-parse", "HEAD").strip()  # as run --json says its own
    assert git(project, "show", "--name-only", "--format=", "HEAD").split() == [report.relative_to(project.resolve()).as_posix()]
    status = git(project, "status", "--porcelain")
    assert "A  user_staged.txt" in status and " M README.md" in status


def test_compare_and_runs_never_import_torch(project, artifact_root):
    imported("a", "nanochat_small.log", "nanochat")
    imported("b", "metrics_small.jsonl", "jsonl")
    repo_root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    for args in (["compare", "a", "b", "--json"], ["runs", "--json"], ["show", "a", "--json"]):
        r = subprocess.run([sys.executable, "-X", "importtime", "-m", "moectl", *args],
                           capture_output=True, text=True, env=env, cwd=project)
        assert r.returncode == 0, r.stderr[-2000:]
        imported_modules = {line.split("|")[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
        assert "moectl.cli.runs" in imported_modules
        assert not {m for m in imported_modules if m == "torch" or m.startswith("torch.")}, args


def test_compare_write_report_refuses_on_wrong_branch_and_writes_nothing(project):
    from tests.conftest import git

    imported("base", "nanochat_small.log", "nanochat")
    imported("other", "metrics_small.jsonl", "jsonl")
    git(project, "checkout", "-q", "-b", "elsewhere")
    head = git(project, "rev-parse", "HEAD")
    r = invoke("compare", "base", "other", "--write-report")
    assert r.exit_code == 3 and "expected branch 'main'" in r.stderr
    assert not (project / "reports").exists() and git(project, "rev-parse", "HEAD") == head
    git(project, "checkout", "-q", "--detach")
    r = invoke("compare", "base", "other", "--write-report")
    assert r.exit_code == 3 and "error: refusing to write a report: HEAD is detached" in r.stderr
    # A config outside any repository is not "a detached HEAD" (and no report is written)
    elsewhere = project.parent / "no_repo"
    elsewhere.mkdir()
    (elsewhere / ".moectl.toml").write_text((project / ".moectl.toml").read_text())
    r = invoke("compare", "base", "other", "--write-report", "--config", str(elsewhere / ".moectl.toml"))
    assert r.exit_code == 3, r.output
    assert f"error: refusing to write a report: {elsewhere} is not inside a git repository" in r.stderr
    assert not (elsewhere / "reports").exists() and not (project / "reports").exists()


def _stale_lock(project, monkeypatch):
    (project / ".git" / "index.lock").write_text("")  # an editor's git, alive as far as anyone knows
    monkeypatch.setenv("MOECTL_GIT_LOCK_WAIT", "0.2")


def _rejecting_hook(project, monkeypatch):
    hook = project / ".git" / "hooks" / "reference-transaction"
    hook.write_text('#!/bin/sh\n[ "$1" = prepared ] && exit 1\nexit 0\n')
    hook.chmod(0o755)


def _unusable_signing_key(project, monkeypatch):
    from tests.conftest import git

    git(project, "config", "commit.gpgsign", "true")
    git(project, "config", "gpg.program", str(project / "no-such-gpg"))


def _no_identity(project, monkeypatch):
    from tests.test_gitops import no_identity

    no_identity(project, monkeypatch)


@pytest.mark.parametrize("failure, code", [(_stale_lock, 3), (_rejecting_hook, 3), (_unusable_signing_key, 2),
                                           (_no_identity, 2)])
def test_compare_write_report_whose_commit_fails_leaves_nothing_behind(project, monkeypatch, failure, code):
    # The report is written before the commit can fail: it is removed again (never left untracked in
    # the user's tree, where a retry made `-2.md` beside it) and the error line says so.
    from tests.conftest import git

    imported("base", "nanochat_small.log", "nanochat")
    imported("other", "metrics_small.jsonl", "jsonl")
    (project / "README.md").write_text("user edit\n")
    head, status = git(project, "rev-parse", "HEAD"), git(project, "status", "--porcelain", "--untracked-files=all")
    failure(project, monkeypatch)
    for args in (["compare", "base", "other", "--write-report"], ["compare", "base", "other", "--write-report", "--json"]):
        r = invoke(*args)
        assert r.exit_code == code, r.output
        line = r.stderr.strip()
        assert "\n" not in line and "Traceback" not in r.output
        assert line.startswith("error: report not committed: ") and "nothing was committed" in line
        assert "_compare_other_vs_base.md was removed again, nothing is left behind" in line
        assert not (project / "reports").exists()
        assert git(project, "rev-parse", "HEAD") == head
        assert git(project, "status", "--porcelain", "--untracked-files=all") == status
        if "--json" in args:
            assert json.loads(r.stdout)["exit_code"] == code


@pytest.mark.parametrize("where", ["dotdot", "symlink", "read_only", "git_dir", "submodule"])
def test_compare_write_report_refuses_a_report_dir_the_paths_guard_refuses_before_writing(project, tmp_path, where):
    # As `run`'s paths guard and `summary` (exit 3, one line), and before anything is written: not a
    # file outside the repository and then a refusal to commit it, nor a commit into a read-only tree.
    from tests.conftest import git

    imported("base", "nanochat_small.log", "nanochat")
    imported("other", "metrics_small.jsonl", "jsonl")
    outside = tmp_path / "outside2"
    paths = {"dotdot": 'report_dir = "../outside2"', "symlink": 'report_dir = "reports"',
             "read_only": f'report_dir = "ign reps/ü"\nread_only = ["{project}/ign reps"]',
             "git_dir": 'report_dir = ".git/reps"', "submodule": 'report_dir = "subm/reports"'}[where]
    with open(project / ".moectl.toml", "a") as fh:
        fh.write(f"\n[paths]\n{paths}\n")
    git(project, "commit", "-q", "-am", "report_dir")
    if where == "submodule":  # its files are the submodule's: the project can neither stage nor commit them
        sub = tmp_path / "sub"
        git(tmp_path, "init", "-q", "-b", "main", str(sub))
        git(sub, "commit", "-q", "--allow-empty", "-m", "sub")
        git(project, "-c", "protocol.file.allow=always", "submodule", "add", "-q", str(sub), "subm")
        git(project, "commit", "-q", "-m", "submodule")
    if where == "symlink":
        outside.mkdir()
        (project / "reports").symlink_to(outside)
        git(project, "add", "reports")
        git(project, "commit", "-q", "-m", "reports link")
    head, status = git(project, "rev-parse", "HEAD"), git(project, "status", "--porcelain", "--untracked-files=all")
    r = invoke("compare", "base", "other", "--write-report")
    assert r.exit_code == 3, r.output
    line = r.stderr.strip()
    assert "\n" not in line and line.startswith("error: refusing to write a report: report_dir ")
    assert {"dotdot": "is outside the repository", "symlink": "is outside the repository",
            "read_only": "is inside read-only tree", "git_dir": "is inside the git directory",
            "submodule": f"is inside {project.resolve() / 'subm'}, a repository of its own"}[where] in line
    assert not (outside.exists() and any(outside.iterdir()))
    assert not (project / "ign reps").exists() and not (project / ".git" / "reps").exists()
    assert not (project / "subm" / "reports").exists()
    assert git(project, "rev-parse", "HEAD") == head
    assert git(project, "status", "--porcelain", "--untracked-files=all") == status
    # `moectl check` refuses the same report_dir, in the paths guard
    checked = invoke("check", "--json")
    paths_guard = next(g for g in json.loads(checked.stdout)["guards"] if g["name"] == "paths")
    assert not paths_guard["ok"] and "report_dir" in paths_guard["message"]


def test_runs_and_compare_keep_the_spec_columns_when_no_run_has_the_figure(project, artifact_root):
    # CPU runs have no MFU: SPEC §4's tables still have the column, each cell —.
    imported("cpu_a", "metrics_small.jsonl", "jsonl")
    imported("cpu_b", "metrics_small.jsonl", "jsonl")
    data = json.loads(invoke("compare", "cpu_a", "cpu_b", "--json").stdout)
    assert all(run["metrics"]["mfu"]["value"] is None for run in data["runs"])
    r = CliRunner().invoke(app, ["compare", "cpu_a", "cpu_b"], env={"COLUMNS": "250"})
    header, rows = compare_table_rows(r.stdout)
    assert header[3:10] == ["tok/sec", "dt (ms)", "MFU %", "peak mem (MiB)", "total (min)", "final loss", "drop frac"]
    assert rows[0][3 + 2] == "—" and rows[2][3 + 2] == "—"
    r = CliRunner().invoke(app, ["runs"], env={"COLUMNS": "250"})
    header = next(line for line in r.output.splitlines() if "MFU %" in line)
    assert all(col in header for col in ("id", "status", "tag", "tok/sec", "MFU %", "peak MiB", "min"))
    assert " job " not in header and " ep " not in header  # option columns nobody set are still left out


def test_show_of_a_shared_tag_says_it_is_the_newest_of_several(project, artifact_root):
    first = imported("twice", "metrics_small.jsonl", "jsonl")
    second = imported("twice", "metrics_small.jsonl", "jsonl")
    r = invoke("show", "twice")
    assert r.exit_code == 0 and r.stdout.startswith(second["id"]), r.output
    assert "(the newest of 2 runs tagged twice: `moectl runs` lists them, an id shows another)" in r.stdout
    assert "the newest of" not in invoke("show", first["id"]).stdout  # an id means that run, nothing to say


def test_compare_says_when_a_run_is_still_training(project, artifact_root):
    # Its tail so far is compared (what a person checking on it wants), and said to be unfinished.
    import os
    import shutil
    import socket

    imported("done", "metrics_small.jsonl", "jsonl")
    live = create_run_dir(artifact_root / "20260101_000000_moe-live")
    shutil.copy(FIXTURES / "metrics_small.jsonl", live / "metrics.jsonl")
    now = datetime.now().astimezone().isoformat()  # after this process started: its pid owns the run
    save_run(RunRecord(id=live.name, tag="live", status="running", created_at=now, started_at=now,
                       exp_dir=str(live), pid=os.getpid(), host=socket.gethostname()))
    data = json.loads(invoke("compare", "done", "live", "--json").stdout)
    assert [r["unfinished"] for r in data["runs"]] == [False, True]
    assert "not final: live still training; its figures are its steps so far" in data["notes"]
    r = CliRunner().invoke(app, ["compare", "done", "live"], env={"COLUMNS": "250"})
    assert r.exit_code == 0 and "not final: live still training" in r.stdout, r.output
    # `show` of it: the record has no summary yet; its tail so far is given, said to be so far
    shown = json.loads(invoke("show", "live", "--json").stdout)
    assert shown["summary"] is None and shown["summary_so_far"]["tok_per_sec"] == data["runs"][1]["metrics"]["tok_per_sec"]["value"]
    assert json.loads(invoke("show", "done", "--json").stdout)["summary_so_far"] is None
    text = invoke("show", "live").stdout
    assert "still training: 6 steps so far; the figures below are theirs, not final" in text and "summary (last" in text


def test_runs_table_shows_key_options_the_engine_resolved(project, artifact_root):
    """A run given only `--preset` still shows its cap and compile: the engine's resolved config."""
    exp = create_run_dir(artifact_root / "20260101_000000_moe-preset_only")
    save_run(RunRecord(
        id=exp.name, tag="preset_only", status="completed", created_at="2026-01-01T00:00:00+00:00",
        exp_dir=str(exp), options={"preset": "d12-moe"},
        engine={"preset": "d12-moe", "cap": 1.25, "compile": "dynamic", "fp8": False},
    ))
    r = CliRunner().invoke(app, ["runs"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    row = next(line for line in r.output.splitlines() if "preset_only" in line)
    assert "1.25" in row and "dynamic" in row and "d12-moe" in row
    # cap 0 (dropless) is a value, not an empty cell (0.0 == False in Python)
    exp = create_run_dir(artifact_root / "20260101_000001_moe-dropless")
    save_run(RunRecord(id=exp.name, tag="dropless", status="completed", created_at="2026-01-01T00:00:01+00:00",
                       exp_dir=str(exp), options={"preset": "tiny", "cap": 0.0}))
    r = CliRunner().invoke(app, ["runs"], env={"COLUMNS": "200"})
    header = next(line for line in r.output.splitlines() if " cap " in f" {line} ")
    row = next(line for line in r.output.splitlines() if "dropless" in line)
    assert row[header.index(" cap ") + 1:].split()[0] == "0.0", (header, row)


def test_runs_table_says_which_repeat_of_its_group_a_run_is(project, artifact_root):
    """Three runs tagged `r` looked like three tries of the same thing; they are one group."""
    group = "20260101_000000_moe-r-x3"
    for k in (1, 2):
        exp = create_run_dir(artifact_root / f"20260101_00000{k}_moe-r-r{k}")
        save_run(RunRecord(id=exp.name, tag="r", status="completed", created_at=f"2026-01-01T00:00:0{k}+00:00",
                           exp_dir=str(exp), group=group, repeat=k))
    exp = create_run_dir(artifact_root / "20260101_000009_moe-single")
    save_run(RunRecord(id=exp.name, tag="single", status="completed", created_at="2026-01-01T00:00:09+00:00",
                       exp_dir=str(exp)))
    r = CliRunner().invoke(app, ["runs"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    header = next(line for line in r.output.splitlines() if " repeat " in f" {line} ")
    cell = lambda name: next(l for l in r.output.splitlines() if name in l)[header.index("repeat"):].split()[0]  # noqa: E731
    assert (cell("moe-r-r1"), cell("moe-r-r2")) == ("1/3", "2/3")
    single = next(l for l in r.output.splitlines() if "moe-single" in l)
    assert single[header.index("repeat"):header.index("repeat") + len("repeat")].strip() == ""  # not a repeat
    # `show` of one repeat names its group, and the group's id shows the group
    r = CliRunner().invoke(app, ["show", "20260101_000002_moe-r-r2"])
    assert r.exit_code == 0, r.output
    assert f"  group      {group} (repeat 2 of 3; `moectl show {group}` shows the group)" in r.output
    r = CliRunner().invoke(app, ["show", group])
    assert r.exit_code == 0 and group in r.output, r.output
    assert "group      " not in CliRunner().invoke(app, ["show", "20260101_000009_moe-single"]).output


def test_runs_and_show_mark_a_warmup_only_run(project, artifact_root):
    # The nanochat fixture has 8 steps: all within the default 10 warm-up steps.
    rec = imported("nano", "nanochat_small.log", "nanochat")
    assert rec["summary"]["clean"] is False and rec["summary"]["warmup_steps"] == 10
    assert rec["summary"]["note"].startswith("warm-up only: all 8 steps are among the first 10")
    # 9 s compile step included: (1000+10000+11000+11500+12000+13000+14000+15000)/8
    assert rec["summary"]["tok_per_sec"] == pytest.approx(87500 / 8)

    runs = invoke("runs")
    assert runs.exit_code == 0, runs.output
    row = next(ln for ln in runs.stdout.splitlines() if "nano" in ln)
    assert "10,938†" in row and "1.09†" in row and "1,234" in row and "1,234†" not in row  # peak is not a tail mean
    assert "† warm-up only: the run has no step past its first 10" in runs.stdout

    show = invoke("show", "nano")
    assert show.exit_code == 0, show.output
    line = next(ln for ln in show.stdout.splitlines() if ln.startswith("summary ("))
    assert line.startswith("summary (last 8 of window 50, all warm-up): tok/sec 10,937.50† · dt 1,688.75† ms")
    assert line.endswith("drop —") and "—†" not in line  # no mark on a missing value (no drops in the log)
    assert "note: warm-up only: all 8 steps" in show.stdout


def test_import_says_a_diverged_final_loss_is_nan(project, artifact_root, tmp_path):
    # `show` and `compare` say NaN; import's own line said "final loss —", as for a missing figure.
    log = tmp_path / "diverged.log"
    log.write_text("".join(f"step {i:05d}/00004 ({25 * (i + 1):.2f}%) | loss: {'nan' if i >= 2 else '2.000000'} | "
                           f"dt: 500.00ms | tok/sec: 1,000\n" for i in range(4)))
    r = invoke("import", str(log), "--name", "div", "--format", "nanochat")
    assert r.exit_code == 0, r.output
    assert "final loss NaN (not finite from step 2)" in r.stdout


def strict_json(text: str):
    """json.loads as jq or JavaScript read JSON: a bare NaN or Infinity token is an error."""
    def refuse(token):
        raise ValueError(f"{token} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_json_output_and_records_stay_json_when_a_figure_is_not_finite(project, artifact_root, tmp_path):
    # Every step finite, their tail mean past the largest float: Python's json wrote it as a bare
    # Infinity in run.json and in every --json document that carried it (runs --json of the store).
    log = tmp_path / "huge.jsonl"
    log.write_text("".join(json.dumps({"type": "step", "step": i, "loss": 1.0, "dt_ms": 1e308, "tok_per_sec": 1e308,
                                       "elapsed_s": float(i)}) + "\n" for i in range(80)))
    r = invoke("import", str(log), "--name", "huge", "--json")
    assert r.exit_code == 0, r.output
    assert strict_json(r.stdout)["summary"]["tok_per_sec"] is None
    imported("nano", "nanochat_small.log", "nanochat")
    (run_json,) = artifact_root.glob("*huge/run.json")
    assert strict_json(run_json.read_text())["summary"]["tok_per_sec"] is None
    for args in (["runs", "--json"], ["show", "huge", "--json"], ["compare", "nano", "huge", "--json"]):
        r = invoke(*args)
        assert r.exit_code == 0, (args, r.output)
        strict_json(r.stdout)


def test_show_says_how_many_lines_of_metrics_it_could_not_read(project, artifact_root):
    rec = imported("nano", "nanochat_small.log", "nanochat")
    assert "of metrics.jsonl could not be read" not in invoke("show", "nano").stdout
    with open(Path(rec["exp_dir"]) / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 99, "loss": \n')  # cut mid-line
    r = invoke("show", "nano")
    assert r.exit_code == 0 and "note: 1 line(s) of metrics.jsonl could not be read and are left out" in r.stdout
    assert json.loads(invoke("show", "nano", "--json").stdout)["metrics_skipped"] == 1


def test_import_refuses_a_binary_file_before_reading_it_whole(project, artifact_root, tmp_path):
    # A checkpoint given by mistake (`.pt`: read as a nanochat log by its suffix) was read whole and
    # decoded before "no step lines": gigabytes of memory on a shared node for a big one.
    ckpt = tmp_path / "model_000100.pt"
    ckpt.write_bytes(b"PK\x03\x04\x00\x00" + os.urandom(1 << 16))  # a zip archive, as torch.save writes
    r = invoke("import", str(ckpt), "--name", "oops")
    assert r.exit_code == 2 and r.stderr.strip() == (
        f"error: {ckpt} is not a text log (binary data in its first bytes: a checkpoint or an archive?); "
        "give the training log")
    assert not artifact_root.exists()


def test_import_into_an_artifact_root_inside_the_repository_is_refused_as_run_refuses_it(project, monkeypatch):
    # `moectl run` refuses it (paths guard, exit 3): every run's files would be untracked changes
    # of the repository, the next run `dirty`. An import writes the same files into the same store.
    inside = project / "runs"
    monkeypatch.setenv("MOECTL_ARTIFACT_ROOT", str(inside))
    r = invoke("import", str(FIXTURES / "nanochat_small.log"), "--name", "old")
    assert r.exit_code == 3 and r.stderr.strip() == (
        f"error: artifact_root {inside} is inside the repository and not git-ignored: add it to .gitignore or "
        "move it out — fix [paths] in the config")
    assert not inside.exists() and git_status(project) == ""
    (project / ".gitignore").write_text("runs/\n")  # ignored: the store may live there
    assert invoke("import", str(FIXTURES / "nanochat_small.log"), "--name", "old").exit_code == 0


def git_status(repo: Path) -> str:
    return subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True).stdout


# --- another repository's runs in a shared artifact root -------------------------------------------


def other_repository(tmp_path: Path) -> Path:
    """A second real repository with its own committed .moectl.toml (project "moe" too): it shares
    the artifact root (MOECTL_ARTIFACT_ROOT), as two projects share the default ~/.cache one."""
    from tests.conftest import git

    other = tmp_path / "other"
    other.mkdir()
    git(other, "init", "-q", "-b", "main")
    (other / ".moectl.toml").write_text('[project]\nname = "moe"\nbranch = "main"\nvenv = ""\n')
    git(other, "add", ".moectl.toml")
    git(other, "commit", "-q", "-m", "moectl config")
    return other


def ended_run(repo: Path, rid: str, tag: str, *, repo_recorded: bool = True, with_report: bool = False,
              group: str | None = None, repeat: int | None = None) -> RunRecord:
    """A completed run of `repo` as moectl leaves it when its moectl was killed before the report
    (`with_report`: as `run --no-commit` leaves it, its report in `repo`'s report_dir, uncommitted).
    `repo_recorded=False`: a record older than run.json `repo`."""
    from moectl.config import load_config
    from moectl.records import GitInfo, Summary
    from moectl.report import run_report, write_report
    from tests.conftest import git

    cfg = load_config(repo / ".moectl.toml")
    exp = create_run_dir(cfg.artifact_root / rid)
    rec = RunRecord(id=rid, tag=tag, status="completed", created_at="2025-01-01T12:00:00+00:00",
                    finished_at="2025-01-01T12:05:00+00:00", exit_code=0, options={"cap": 1.0},
                    git=GitInfo(branch="main", commit=git(repo, "rev-parse", "HEAD").strip(), dirty=False),
                    exp_dir=str(exp), summary=Summary(window=50, steps=10, tok_per_sec=806400.06),
                    repo=str(repo.resolve()) if repo_recorded else None, group=group, repeat=repeat)
    if with_report:
        rec.report = str(write_report(cfg.report_dir, tag, run_report(rec)))
    save_run(rec)
    return rec


def test_moectl_commit_refuses_another_repositorys_run_and_writes_nothing_here(project, artifact_root, tmp_path,
                                                                               monkeypatch):
    # Two projects share one artifact root. `moectl commit RUN` of the other's run wrote its report
    # into this repository and committed it here (citing a commit only the other has), exit 0; with
    # the other's report on disk, it said the report was "gone (deleted or moved)".
    from tests.conftest import git

    other = other_repository(tmp_path)
    theirs = str(other.resolve())
    killed = ended_run(other, "20250101_120000_moe-killme", "killme")
    crashed = ended_run(other, "20250101_120100_moe-crash", "crash", with_report=True)
    for i in (1, 2):  # `run --repeat 2 --no-commit` there: its group, by tag and by id
        ended_run(other, f"20250101_12020{i}_moe-grp", "grp", with_report=True, group="20250101_120200_moe-grp",
                  repeat=i)
    head, files = git(project, "rev-parse", "HEAD"), sorted(p.name for p in project.iterdir())
    named = {killed.id: killed.id, "killme": killed.id, "crash": crashed.id, "grp": "20250101_12020",
             "20250101_120200_moe-grp": "20250101_12020"}  # (a group: one of its repeats)
    for ref, rid in named.items():
        r = invoke("commit", ref)
        assert r.exit_code == 2, (ref, r.output)
        [line] = r.stderr.splitlines()
        assert line.startswith(f"error: run {rid}") and f"belongs to another repository, {theirs}: " in line, line
        assert "commit its report there (`moectl commit " in line and line.endswith("nothing written or committed here")
    assert git(project, "rev-parse", "HEAD") == head and git_status(project) == ""
    assert sorted(p.name for p in project.iterdir()) == files  # no reports/, no EXPERIMENTS.md
    assert json.loads((Path(killed.exp_dir) / RUN_RECORD).read_text())["report"] is None
    assert json.loads(invoke("commit", "crash", "--json").stdout)["exit_code"] == 2
    assert Path(crashed.report).is_file() and git(other, "status", "--porcelain").split() == ["??", "reports/"]

    # A record from before run.json `repo` is this repository's, as in EXPERIMENTS.md: committed as before.
    old = ended_run(project, "20250101_120300_moe-old", "old", repo_recorded=False)
    r = invoke("commit", old.id)
    assert r.exit_code == 0, r.output
    assert git(project, "log", "-1", "--format=%s").startswith("report: ")
    # ... and the other repository commits its own runs' reports, the group's too.
    monkeypatch.chdir(other)
    head = git(other, "rev-parse", "HEAD")
    for ref in ("killme", "crash", "grp"):
        r = invoke("commit", ref)
        assert r.exit_code == 0, (ref, r.output)
    assert len(git(other, "log", "--format=%H", f"{head.strip()}..HEAD").split()) == 4


def test_a_tag_both_repositories_use_means_this_projects_run(project, artifact_root, tmp_path, monkeypatch):
    # Two projects share one artifact root (the default ~/.cache one) and both tag a run `base`.
    # `show base` / `commit base` in this one took the other's, being newer: `commit` then refused
    # ("belongs to another repository") a run this project does have.
    from tests.conftest import git

    other = other_repository(tmp_path)
    mine = ended_run(project, "20250101_120000_moe-base", "base")
    older = ended_run(project, "20250101_110000_moe-base", "base")
    theirs = ended_run(other, "20250101_130000_moe-base", "base")  # the newest
    only_theirs = ended_run(other, "20250101_140000_moe-solo", "solo")

    r = invoke("show", "base")
    assert r.exit_code == 0 and r.stdout.startswith(mine.id), r.output
    assert ("(the newest of this project's 2 runs tagged base; 1 more of another repository sharing this "
            "artifact root: `moectl runs` lists them, an id shows another)") in r.stdout
    assert json.loads(invoke("show", "bas", "--json").stdout)["id"] == mine.id  # a prefix of the one tag too
    assert json.loads(invoke("show", theirs.id, "--json").stdout)["id"] == theirs.id  # an id means that run
    assert json.loads(invoke("show", "solo", "--json").stdout)["id"] == only_theirs.id  # none of ours: theirs
    assert [r["id"] for r in json.loads(invoke("compare", "base", "solo", "--json").stdout)["runs"]] == \
        [mine.id, only_theirs.id]
    r = invoke("commit", "base")
    assert r.exit_code == 0, r.output
    assert git(project, "log", "-1", "--format=%s").startswith("report: ")
    assert json.loads((Path(mine.exp_dir) / RUN_RECORD).read_text())["report"] is not None
    assert json.loads((Path(older.exp_dir) / RUN_RECORD).read_text())["report"] is None

    monkeypatch.chdir(other)  # ... and from the other repository, its own
    r = invoke("show", "base")
    assert r.exit_code == 0 and r.stdout.startswith(theirs.id), r.output
    assert "(the newest of 3 runs tagged base" not in r.stdout and "2 more of another repository" in r.stdout


def test_a_table_wider_than_the_terminal_is_drawn_whole_not_cut(monkeypatch):
    # 80 columns (or TERM=dumb, which rich holds at 80): `runs` showed 22,719 tok/s as `22,71` with no
    # mark, and compare's run column shrank to nothing.
    import io

    from rich.console import Console
    from rich.table import Table

    from moectl.cli import common
    from moectl.cli.runs import _print_table

    buf = io.StringIO()
    terminal = Console(file=buf, width=80, force_terminal=True, color_system=None, highlight=False, soft_wrap=True)
    monkeypatch.setattr(common.stdout, "_console", terminal)
    table = Table()
    for header in ("id", "status", "tag", "tok/sec", "MFU %", "peak MiB", "min"):
        table.add_column(header, no_wrap=header != "tag", overflow="fold")
    table.add_row("20261128_181642_moe-static_cap1p0", "completed", "static_cap1p0", "22,719", "9.50", "1,024", "0.01")
    _print_table(table)
    text = buf.getvalue()
    for cell in ("20261128_181642_moe-static_cap1p0", "completed", "static_cap1p0", "22,719", "1,024", "0.01"):
        assert cell in text, (cell, text)
    assert terminal.width == 80  # (the console's width is its own again afterwards)
    small = Table()
    small.add_column("a")
    small.add_row("1")
    buf.seek(0)
    buf.truncate(0)
    _print_table(small)
    assert max(len(line) for line in buf.getvalue().splitlines()) < 80
