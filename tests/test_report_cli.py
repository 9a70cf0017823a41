"""`parallelcity report JOURNAL` as a user runs it: a real run's outputs rebuilt from its
journal alone, older and interrupted journals, and files that are not journals."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from parallelcity.record.journal import Journal
from parallelcity.record.journal_read import NO_END, read_journal, run_result, scenario_of
from parallelcity.record.report import write_all
from parallelcity.run.runner import RunOptions, run
from parallelcity.scenario.definition import parse_scenario
from parallelcity.scenario.text import scenario_toml

OUTPUTS = ("summary.json", "timeseries.csv", "plot.png", "metrics.prom")
CLI_TIMEOUT_S = 60


def _report(*args: str | Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "parallelcity", "report", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(p: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=CLI_TIMEOUT_S)
    assert "Traceback" not in err, err
    return p.returncode, out, err


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def test_scenario_text_round_trips(dh) -> None:
    """The copy a journal holds parses back to the scenario the run used (here a lab copy
    that differs from the file at its path)."""
    again = parse_scenario(scenario_toml(dh), dh.path)
    assert again.file == dh.file and again.model_config == dh.model_config
    assert again.insecure_lab and again.model.outputs == dh.model.outputs


@pytest.mark.slow
def test_report_rebuilds_a_runs_outputs_from_its_journal(dh, tmp_path) -> None:
    result = asyncio.run(run(dh, RunOptions(cycles=5, speed=3600, out_dir=tmp_path / "runs")))
    _, paths = write_all(result)
    folder = result.journal_path.parent
    original = {name: (folder / name).read_bytes() for name in OUTPUTS}
    for name in OUTPUTS:
        (folder / name).unlink()

    # an interrupted copy (the run-end event as a run ending on SIGINT journals it)
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copy(result.journal_path, cut / "journal.sqlite")
    j = Journal(cut / "journal.sqlite")
    j.run_id = 1
    j.record_event(
        3, 0.0, "run", "end", "SIGINT", {"cause": "interrupted", "signal": "SIGINT", "cycles": 4}
    )
    j.close()
    # an older journal: no per-cycle results, no scenario copy (its file is named instead)
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(result.journal_path, old / "journal.sqlite")
    db = sqlite3.connect(old / "journal.sqlite")
    info = json.loads(db.execute("SELECT info FROM run").fetchone()[0])
    del info["scenario_toml"]
    db.execute("UPDATE run SET info = ?", (json.dumps(info),))
    db.execute("DROP TABLE cycle_result")
    db.commit()
    db.close()

    code, out, _ = _finish(_report(folder))  # a run's folder names its journal
    assert code == 0
    assert out.splitlines()[0] in (
        f"{dh.meta.name}: completed after 5 cycles",
        f"{dh.meta.name}: {NO_END}",
    )
    assert str(paths["summary"]) in out and str(paths["plot"]) in out
    rebuilt = json.loads((folder / "summary.json").read_text())
    assert _same(rebuilt, json.loads(original["summary.json"])), (rebuilt, original)
    assert (folder / "timeseries.csv").read_bytes() == original["timeseries.csv"]
    assert (folder / "metrics.prom").read_bytes() == original["metrics.prom"]
    assert (folder / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the interrupted copy says so; the older journal gives the same cycles, only what it
    # never held differs (cycle wall time then ends before dispatch, applied inputs from acks)
    assert read_journal(cut / "journal.sqlite").describe_end() == (
        "interrupted by SIGINT at cycle 3 (4 cycles run)"
    )
    old_run = read_journal(old / "journal.sqlite")
    assert "scenario_toml" not in old_run.info and not old_run.results
    rebuilt_old = run_result(old_run, scenario_of(old_run), old / "report")
    new_recs = {r.k: r for r in result.records}
    assert [r.k for r in rebuilt_old.records] == sorted(new_recs)
    for r in rebuilt_old.records:
        want = new_recs[r.k]
        assert (r.t, r.outcome, r.source, r.reason, r.ack) == (
            want.t,
            want.outcome,
            want.source,
            want.reason,
            want.ack,
        )
        assert r.values == want.values and r.bands == want.bands
        assert r.solve_time_s == pytest.approx(want.solve_time_s, abs=1e-9)
        if want.ack in ("applied", "duplicate"):
            assert r.applied == want.applied
    assert rebuilt_old.counts == result.counts


def test_report_refuses_what_is_not_a_readable_journal(tmp_path) -> None:
    text = tmp_path / "notes.sqlite"
    text.write_text("not a database at all\n" * 100)
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
    no_run = tmp_path / "no_run" / "journal.sqlite"
    Journal(no_run).close()
    locked = tmp_path / "locked" / "journal.sqlite"
    j = Journal(locked)
    j.start_run("x", 0.0, {})
    j.close()
    holder = sqlite3.connect(locked, isolation_level=None)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("INSERT INTO event VALUES (1, 0, 0, 'test', 'lock', '', '{}')")
    unloadable = tmp_path / "unloadable" / "journal.sqlite"
    j = Journal(unloadable)
    j.start_run("x", 0.0, {"path": "gone.toml", "scenario_toml": "[scenario]\nname = 1\n"})
    j.close()
    cases = {
        tmp_path / "missing.sqlite": "no such file",
        tmp_path: "not a file, nor a run folder",
        text: "not a journal",
        other: "not a parallelcity journal",
        no_run: "holds no run",
        locked: "locked",
        unloadable: "--scenario FILE",
    }
    try:
        procs = {path: _report(path) for path in cases}
        results = {path: _finish(p) for path, p in procs.items()}
    finally:
        holder.close()
    for path, why in cases.items():
        code, _, err = results[path]
        assert code == 2 and why in err, (path, code, err)
