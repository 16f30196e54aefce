"""The run store (moectl/store.py): directories, atomic records, listing, stale detection, lookup."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from moectl.errors import EXIT_USAGE, UsageError
from moectl.metrics import read_metrics
from moectl.records import RUN_RECORD, RunRecord, SweepLeg, SweepRecord, save_model
from moectl.store import (
    StoredRun,
    create_run_dir,
    import_run,
    is_stale,
    list_runs,
    load_run,
    resolve_run,
    run_id,
    run_json,
    save_run,
    scan_runs,
)
from engine.schema import StepMetrics


def make_run(root: Path, id_: str, tag: str | None, created: str, status="completed", **kw) -> RunRecord:
    d = create_run_dir(root / id_)
    rec = RunRecord(id=id_, tag=tag, status=status, created_at=created, exp_dir=str(d), **kw)
    save_run(rec)
    return rec


def leftovers(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]


def test_run_id_format():
    assert run_id("moe", "bufreuse", datetime(2026, 2, 24, 18, 24, 27)) == "20260224_182427_moe-bufreuse"


def test_create_run_dir_is_fresh_and_never_reused(tmp_path):
    d = create_run_dir(tmp_path / "a" / "b" / "run1")  # parents created
    assert d.is_dir()
    with pytest.raises(UsageError, match="already exists") as info:
        create_run_dir(d)
    assert info.value.exit_code == EXIT_USAGE


def test_save_and_load_roundtrip_atomic_no_temp_files(tmp_path):
    rec = make_run(tmp_path, "r1", "t", "2026-01-01T10:00:00+00:00", options={"cap": 1.0})
    back = load_run(tmp_path / "r1")
    assert back.id == "r1" and back.options == {"cap": 1.0} and not back.stale
    assert json.loads((tmp_path / "r1" / RUN_RECORD).read_text())["id"] == "r1"
    rec.status = "failed"
    save_run(rec)
    assert load_run(tmp_path / "r1").status == "failed"
    assert leftovers(tmp_path) == []


def test_an_atomic_write_that_cannot_start_names_the_file_asked_for(tmp_path):
    from moectl.atomic import write_text_atomic

    target = tmp_path / "missing-dir" / "report.md"
    with pytest.raises(OSError) as info:
        write_text_atomic(target, "x")
    assert info.value.filename == str(target) and ".tmp" not in str(info.value)


def test_temp_files_a_killed_moectl_left_are_removed_and_a_live_writers_kept(tmp_path):
    # SIGKILL skips atomic_file's cleanup: `.x.md.moectl-<pid>.abcd1234.tmp` stayed in reports/ (and
    # beside EXPERIMENTS.md), in `git status`, for a `git add -A` to sweep in. Their pid says whose.
    from moectl.atomic import atomic_file, remove_dead_temp_files
    from moectl.report import write_report

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    reports = tmp_path / "reports"
    reports.mkdir()
    hour_ago = datetime.now().timestamp() - 3600
    left = reports / f".20260101_0000_a.md.moectl-{dead.pid}.k2j4h6g8.tmp"
    left.write_text("half a report")
    os.utime(left, (hour_ago, hour_ago))
    alive = reports / f".20260101_0000_b.md.moectl-{os.getpid()}.a1b2c3d4.tmp"
    alive.write_text("being written")
    os.utime(alive, (hour_ago, hour_ago))
    # a fresh one of a pid unknown here: a Slurm job on another node writing the shared reports/
    elsewhere = reports / f".20260101_0000_d.md.moectl-{dead.pid}.zzzz1234.tmp"
    elsewhere.write_text("being written on a compute node")
    theirs = reports / ".notes.md.swp"
    theirs.write_text("an editor's")
    write_report(reports, "c", "- run: `c`\n")
    assert not left.exists() and alive.exists() and elsewhere.exists() and theirs.exists()
    assert remove_dead_temp_files(reports) == []  # nothing more of a dead writer's
    with atomic_file(tmp_path / "x.json") as fh:  # the name it writes under says whose it is
        [tmp] = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        assert tmp.name.startswith(f".x.json.moectl-{os.getpid()}.")
        fh.write("{}")


def test_atomic_writes_get_a_plain_files_permissions_or_keep_the_replaced_files(tmp_path):
    # mkstemp makes 0600 files: records and reports on a shared node would be the writer's alone.
    import subprocess
    import sys

    code = ("import os, sys; from pathlib import Path; from moectl.atomic import write_text_atomic, create_new_file\n"
            "d = Path(sys.argv[1]); os.umask(int(sys.argv[2], 8))\n"
            "write_text_atomic(d / 'new.json', '{}'); create_new_file(d / 'report.md', 'r')\n"
            "(d / 'kept.md').write_text('old'); os.chmod(d / 'kept.md', 0o640); write_text_atomic(d / 'kept.md', 'new')\n"
            "print(*(oct(os.stat(d / n).st_mode & 0o777) for n in ('new.json', 'report.md', 'kept.md')))")
    for umask, new in (("022", "0o644"), ("002", "0o664"), ("077", "0o600")):
        d = tmp_path / umask
        d.mkdir()
        out = subprocess.run([sys.executable, "-c", code, str(d), umask], capture_output=True, text=True, check=True)
        assert out.stdout.split() == [new, new, "0o640"], (umask, out.stdout)


def test_corrupt_and_half_written_records_are_reported_and_skipped(tmp_path):
    make_run(tmp_path, "good", "g", "2026-01-01T10:00:00+00:00")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / RUN_RECORD).write_text('{"id": "half", "status": "runn')  # cut mid-write
    (tmp_path / "wrong").mkdir()
    (tmp_path / "wrong" / RUN_RECORD).write_text('{"id": "wrong", "status": "bogus"}')
    (tmp_path / "binary").mkdir()
    (tmp_path / "binary" / RUN_RECORD).write_bytes(b'{"id": "r\xff\xfe", "status": "completed"}')  # not UTF-8
    (tmp_path / "not-a-run").mkdir()  # no run.json: not listed, not an error
    scan = scan_runs(tmp_path)
    assert [r.id for r in scan.runs] == ["good"]
    assert len(scan.corrupt) == 3 and any("half" in m for m in scan.corrupt)
    assert any("binary" in m and "not UTF-8" in m for m in scan.corrupt)
    assert [r.id for r in list_runs(tmp_path)] == ["good"]
    # Named by its exact directory name, a run whose record cannot be read says why, not "no run matches"
    with pytest.raises(UsageError, match=r"corrupt .*half/run\.json"):
        resolve_run(tmp_path, "half")
    with pytest.raises(UsageError, match="no run matches 'not-a-run'"):
        resolve_run(tmp_path, "not-a-run")


def test_a_symlink_loop_or_a_fifo_in_the_store_does_not_stop_or_hang_a_listing(tmp_path):
    # A stray link loop made every store-reading command (and the report step of a finished run)
    # exit 2; a FIFO in place of run.json hung them for good.
    import os

    from moectl.runindex import scan_run_json

    make_run(tmp_path, "good", "g", "2026-01-01T10:00:00+00:00")
    (tmp_path / "loopA").symlink_to("loopB")
    (tmp_path / "loopB").symlink_to("loopA")
    (tmp_path / "fifo").mkdir()
    os.mkfifo(tmp_path / "fifo" / RUN_RECORD)
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / RUN_RECORD).mkdir()  # a directory where the record should be
    scan = scan_runs(tmp_path)
    assert [r.id for r in scan.runs] == ["good"]
    assert sorted(m.split(RUN_RECORD)[0].rsplit("/", 2)[-2] for m in scan.corrupt) == ["dir", "fifo"]
    assert all("not a regular file" in m for m in scan.corrupt), scan.corrupt
    listed, unreadable = scan_run_json(tmp_path)
    assert [x["id"] for x in listed] == ["good"] and len(unreadable) == 2
    assert resolve_run(tmp_path, "g").id == "good"


def test_list_runs_newest_first_including_sweep_legs(tmp_path):
    make_run(tmp_path, "old", "a", "2026-01-01T10:00:00+00:00")
    make_run(tmp_path, "new", "b", "2026-01-03T10:00:00+00:00")
    sweep = create_run_dir(tmp_path / "sw")
    save_model(sweep / "sweep.json", SweepRecord(id="sw", name="cap", spec={}, legs=[SweepLeg(tag="l1")],
                                                   created_at="2026-01-02T00:00:00+00:00", exp_dir=str(sweep)))
    make_run(sweep, "leg1", "l1", "2026-01-02T10:00:00+00:00", sweep="sw")
    assert [r.id for r in list_runs(tmp_path)] == ["new", "leg1", "old"]
    assert list_runs(tmp_path / "missing") == []


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the pid is gone
    return proc.pid


def test_a_dead_owners_run_is_settled_on_read(tmp_path):
    host = socket.gethostname()
    now = datetime.now().astimezone().isoformat()
    make_run(tmp_path, "dead", "d", now, status="running", pid=_dead_pid(), host=host, started_at=now)
    [rec] = list_runs(tmp_path)  # test_sigkill.py has the details: summary, lock, sweep leg, races
    assert not rec.stale and rec.status == "interrupted" and rec.error == "interrupted (moectl was killed)"
    assert json.loads((tmp_path / "dead" / RUN_RECORD).read_text())["status"] == "interrupted"


def test_a_stale_run_shows_as_stale_and_saves_as_recorded(tmp_path):
    # What a reader holds when it could not settle the run (training still stopping, read-only store).
    now = datetime.now().astimezone().isoformat()
    make_run(tmp_path, "dead", "d", now, status="running", started_at=now)
    rec = StoredRun.model_validate_json((tmp_path / "dead" / RUN_RECORD).read_text())
    rec.stale = True
    assert rec.display_status == "stale" and rec.status == "running"
    data = run_json(rec)
    assert data["status"] == "stale" and data["recorded_status"] == "running"
    save_run(rec)  # saving what we read writes the record back, never the display status
    assert json.loads((tmp_path / "dead" / RUN_RECORD).read_text())["status"] == "running"


def test_stale_when_pid_was_reused(tmp_path):
    # Our own pid is alive, but this process started long after the recorded run started.
    long_ago = (datetime.now().astimezone() - timedelta(days=2)).isoformat()
    rec = RunRecord(id="x", status="running", created_at=long_ago, started_at=long_ago, exp_dir=str(tmp_path),
                    pid=os.getpid(), host=socket.gethostname())
    assert is_stale(rec)


def test_not_stale_when_owner_alive_or_unknowable(tmp_path):
    now = datetime.now().astimezone().isoformat()
    host = socket.gethostname()
    alive = RunRecord(id="x", status="running", created_at=now, started_at=now, exp_dir=".", pid=os.getpid(), host=host)
    assert not is_stale(alive)
    elsewhere = alive.model_copy(update={"pid": _dead_pid(), "host": host + "-other"})
    assert not is_stale(elsewhere)  # another machine's pid means nothing here
    done = alive.model_copy(update={"pid": _dead_pid(), "status": "completed"})
    assert not is_stale(done)
    created = alive.model_copy(update={"pid": _dead_pid(), "status": "created"})
    assert is_stale(created)


@pytest.fixture
def store(tmp_path):
    root = tmp_path / "store"
    make_run(root, "20260101_100000_moe-alpha", "alpha", "2026-01-01T10:00:00+00:00")
    make_run(root, "20260102_100000_moe-alpha", "alpha", "2026-01-02T10:00:00+00:00")  # same tag, newer
    make_run(root, "20260103_100000_moe-alphabet", "alphabet", "2026-01-03T10:00:00+00:00")
    make_run(root, "20260104_100000_moe-beta", "beta", "2026-01-04T10:00:00+00:00")
    make_run(root, "20260104_110000_moe-be", "be", "2026-01-04T11:00:00+00:00")
    return root


def test_resolve_exact_id(store):
    assert resolve_run(store, "20260101_100000_moe-alpha").id == "20260101_100000_moe-alpha"


def test_resolve_shared_tag_means_most_recent(store):
    assert resolve_run(store, "alpha").id == "20260102_100000_moe-alpha"


def test_resolve_exact_tag_beats_prefix(store):
    # "be" is an exact tag, and also a prefix of "beta": the exact match wins
    assert resolve_run(store, "be").id == "20260104_110000_moe-be"


def test_resolve_unique_prefix_of_tag_and_of_id(store):
    assert resolve_run(store, "bet").tag == "beta"
    assert resolve_run(store, "alphab").tag == "alphabet"
    assert resolve_run(store, "20260103").tag == "alphabet"


def test_resolve_prefix_of_one_shared_tag_is_its_most_recent_run(tmp_path):
    make_run(tmp_path, "r1", "bufreuse", "2026-01-01T10:00:00+00:00")
    make_run(tmp_path, "r2", "bufreuse", "2026-01-02T10:00:00+00:00")
    assert resolve_run(tmp_path, "bufr").id == "r2"


def test_resolve_ambiguous_prefix_lists_candidates(store):
    with pytest.raises(UsageError, match="ambiguous") as info:
        resolve_run(store, "2026010")
    assert info.value.exit_code == EXIT_USAGE
    assert len(info.value.lines) == 5 and "20260104_100000_moe-beta" in info.value.lines
    with pytest.raises(UsageError, match="ambiguous"):
        resolve_run(store, "al")  # tags alpha (x2) and alphabet


def test_a_ref_to_a_run_whose_record_is_unreadable_names_it(store):
    # `runs` warns of an unreadable record; `show corrupt` said "no run matches", pointing away from it.
    bad = store / "20260105_000000_moe-corrupt"
    bad.mkdir()
    (bad / RUN_RECORD).write_text('{"id": "20260105_000000_moe-corrupt", "stat')
    with pytest.raises(UsageError, match="no readable run matches 'corrupt'") as info:
        resolve_run(store, "corrupt")
    assert info.value.lines == [str(bad)]
    with pytest.raises(UsageError, match="corrupt"):
        resolve_run(store, str(bad))  # its directory says what is wrong with it
    with pytest.raises(UsageError, match="^no run matches 'gamma'"):
        resolve_run(store, "gamma")


def test_an_id_two_runs_share_is_ambiguous_and_their_directories_are_listed(tmp_path):
    # Two sweeps' legs with one tag started in the same second: one name, two runs in two sweep
    # directories. `show ID` must not pick one silently; the directory names the one meant.
    a = RunRecord(id="20260105_000000_moe-x", tag="x", status="completed", created_at="2026-01-05T00:00:01+00:00",
                  exp_dir=str(tmp_path / "sweep-b" / "20260105_000000_moe-x"))
    b = a.model_copy(update={"exp_dir": str(tmp_path / "sweep-a" / "20260105_000000_moe-x")})
    with pytest.raises(UsageError, match="2 runs have this id; give its directory") as info:
        resolve_run(tmp_path, a.id, [a, b])
    assert info.value.exit_code == EXIT_USAGE and info.value.lines == [a.exp_dir, b.exp_dir]
    assert resolve_run(tmp_path, a.id, [a]) is a


def test_resolve_path_and_not_found(store, tmp_path):
    path = store / "20260104_100000_moe-beta"
    assert resolve_run(tmp_path / "elsewhere", str(path)).tag == "beta"
    with pytest.raises(UsageError, match="no run matches 'gamma'"):
        resolve_run(store, "gamma")
    with pytest.raises(UsageError, match="not a run directory"):
        resolve_run(store, str(tmp_path / "nope" / "x"))


def test_import_run_writes_engine_schema_and_fresh_dirs(tmp_path):
    steps = [StepMetrics(step=i, loss=3.0 - i * 0.1, tok_per_sec=100.0 + i, dt_ms=10.0) for i in range(5)]
    extras = {"format": "csv", "peak_mem_mib": 77.0, "total_time_s": 120.0, "skipped": 2}
    rec = import_run(tmp_path, "moe", "old", steps, extras, source="/x/log.csv", window=3)
    assert rec.status == "imported" and rec.tag == "old" and rec.id.endswith("_moe-old")
    assert rec.summary.steps == 3 and rec.summary.tok_per_sec == pytest.approx(103.0)  # (102+103+104)/3
    assert rec.summary.peak_mem_mib == 77.0 and rec.summary.total_time_min == pytest.approx(2.0)
    m = read_metrics(Path(rec.exp_dir) / "metrics.jsonl")
    assert m.skipped == 0 and [s.step for s in m.steps] == list(range(5)) and m.summary.total_time_s == 120.0
    assert load_run(Path(rec.exp_dir)).source == "/x/log.csv"
    again = import_run(tmp_path, "moe", "old", steps, extras)  # same second, same name: a new dir
    assert again.id != rec.id and Path(again.exp_dir).is_dir()
    assert leftovers(tmp_path) == []
    with pytest.raises(UsageError):
        import_run(tmp_path, "moe", "empty", [], {})


def test_an_imported_diverged_run_carries_the_warning_a_live_one_does(tmp_path):
    nan = float("nan")
    steps = [StepMetrics(step=i, loss=nan if i >= 3 else 2.0, dt_ms=10.0) for i in range(5)]
    rec = import_run(tmp_path, "moe", "blew", steps, {"format": "csv"}, window=5)
    [warning] = rec.warnings
    assert warning.startswith("loss not finite from step 3 (diverged): 2 of 5 steps")
    assert load_run(Path(rec.exp_dir)).warnings == [warning]  # on disk: `runs` marks it, `show` prints it


def test_a_run_without_a_step_still_has_its_summary_object(tmp_path):
    # SPEC §7a: run.json's summary is an object with its keys; a consumer reading
    # r["summary"]["tok_per_sec"] of a run that failed before its first step gets null, not a crash.
    from moectl.metrics import MetricsFile
    from moectl.store import apply_metrics

    rec = RunRecord(id="x", created_at="2026-01-01T00:00:00+00:00", status="failed", exp_dir=str(tmp_path))
    apply_metrics(rec, MetricsFile(), window=50, warmup_steps=10)
    assert rec.summary is not None and (rec.summary.window, rec.summary.steps) == (50, 0)
    assert rec.summary.tok_per_sec is None and rec.summary.final_loss is None


def test_import_run_failing_midway_leaves_nothing(tmp_path):
    bad = [StepMetrics(step=0, loss=1.0, lr=object())]  # not JSON-serialisable: fails while writing
    with pytest.raises(TypeError):
        import_run(tmp_path, "moe", "bad", bad, {})
    assert list(tmp_path.iterdir()) == []


def test_the_log_tail_of_a_settled_run_is_text_of_bounded_lines(tmp_path):
    """A killed moectl's run is settled from its train.log: its tail goes into the record as a
    live run's does (no escapes or NULs, each line cut at TAIL_LINE_CHARS)."""
    from moectl.store import log_tail
    from moectl.text import TAIL_LINE_CHARS

    log = tmp_path / "train.log"
    log.write_bytes(b"\x1b[31mboom\x1b[0m\x00 here\n" + b"y" * 5000 + b"\nlast\n")
    first, long, last = log_tail(log).splitlines()
    assert (first, last) == ("boom here", "last")
    assert long == "y" * TAIL_LINE_CHARS + f" … ({5000 - TAIL_LINE_CHARS:,} more characters)"

