"""A completed run's time series ends at the run's end: after the last cycle the runner
reads the field once more, and the CSV, the plot and the journal keep that end state
beside the cycles, never as one (counters and KPIs stay the cycles').

A real run of the pump-and-tank scenario (embedded OPC UA stand-in, gateway and ZeroMQ
on loopback), its journal read back, and an experiment run on the rig's plant.
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import datetime as dt
import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from parallelcity.record.journal_read import read_journal, run_result, scenario_of
from parallelcity.record.records import RunResult
from parallelcity.record.report import END_OUTCOME, summarize, write_all, write_csv
from parallelcity.run.runner import RunOptions, run
from parallelcity.scenario.definition import Scenario, parse_scenario

from .conftest import DH, ROOT

PUMP_TANK = ROOT / "scenarios" / "pump_tank.toml"
CYCLES = 4


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def done(tmp_path_factory: pytest.TempPathFactory) -> tuple[Scenario, RunResult]:
    text = PUMP_TANK.read_text()
    assert "insecure_lab = false" in text
    sc = parse_scenario(text.replace("insecure_lab = false", "insecure_lab = true"), PUMP_TANK)
    out = tmp_path_factory.mktemp("runs")
    result = asyncio.run(run(sc, RunOptions(cycles=CYCLES, out_dir=out)))
    write_all(result)
    return sc, result


@pytest.mark.slow
def test_the_series_ends_with_the_field_read_at_the_runs_end(
    done: tuple[Scenario, RunResult],
) -> None:
    sc, result = done
    t_last = sc.meta.start_epoch + (CYCLES - 1) * sc.meta.cycle_s
    t_end = t_last + sc.meta.cycle_s
    assert result.end == "completed" and result.end_state is not None
    assert result.end_state.t == t_end
    *cycles, last = _rows(result.out_dir / "timeseries.csv")
    assert [r["cycle"] for r in cycles] == [str(k) for k in range(CYCLES)]
    assert (last["time"], last["cycle"], last["outcome"], last["source"], last["ack"]) == (
        _iso(t_end),
        "",
        END_OUTCOME,
        "",
        "",
    )
    assert (last["solve_time_s"], last["cycle_wall_s"]) == ("", "")
    assert last["tank.level"] == f"{result.end_state.values['tank.level']:.4f}"
    assert last["pump.on.applied"] == cycles[-1]["pump.on.applied"]  # the inputs in force
    assert (last["tank.level.low"], last["tank.level.high"]) == ("1.0", "4.5")

    # read from the field after the last cycle: a reading the stand-in made after its start
    db = sqlite3.connect(result.journal_path)
    (data,) = db.execute("SELECT data FROM event WHERE kind = 'end_state'").fetchone()
    db.close()
    assert json.loads(data)["snapshot"]["tank.level"]["source_time"] > t_last
    # with one pump state in force the whole last cycle, the tank moved the way it drives it
    on = float(last["pump.on.applied"])
    if cycles[-2]["pump.on.applied"] == last["pump.on.applied"]:
        rise = float(last["tank.level"]) - float(cycles[-1]["tank.level"])
        assert rise > 0 if on >= 0.5 else rise < 0, (on, rise)


@pytest.mark.slow
def test_the_end_state_is_no_cycle_in_counters_or_kpis(done: tuple[Scenario, RunResult]) -> None:
    _, result = done
    assert len(result.records) == CYCLES and result.counts["cycles"] == CYCLES
    summary = json.loads((result.out_dir / "summary.json").read_text())
    assert summary["cycles"] == CYCLES
    assert summarize(result) == summarize(dataclasses.replace(result, end_state=None))
    metrics = (result.out_dir / "metrics.prom").read_text()
    assert f'parallelcity_cycles_total{{scenario="pump-tank"}} {CYCLES}' in metrics


@pytest.mark.slow
def test_the_journal_gives_the_same_series_end_row_included(
    done: tuple[Scenario, RunResult], tmp_path: Path
) -> None:
    _, result = done
    journal = read_journal(result.out_dir)
    again = run_result(journal, scenario_of(journal), tmp_path)
    assert again.end_state == result.end_state
    write_csv(again.records, tmp_path / "again.csv", again.end_state)
    original = (result.out_dir / "timeseries.csv").read_bytes()
    assert (tmp_path / "again.csv").read_bytes() == original


@pytest.mark.slow
def test_a_journal_without_the_end_state_still_reads(
    done: tuple[Scenario, RunResult], tmp_path: Path
) -> None:
    """Journals from before the end state, as read since: the cycles, and no end row."""
    _, result = done
    old = tmp_path / "journal.sqlite"
    shutil.copy(result.journal_path, old)
    db = sqlite3.connect(old)
    db.execute("DELETE FROM event WHERE kind = 'end_state'")
    db.commit()
    db.close()
    journal = read_journal(old)
    assert journal.describe_end() == f"completed after {CYCLES} cycles"
    again = run_result(journal, scenario_of(journal), tmp_path)
    assert again.end_state is None and again.counts == result.counts
    write_csv(again.records, tmp_path / "old.csv", again.end_state)
    lines = (result.out_dir / "timeseries.csv").read_text().splitlines(keepends=True)
    assert (tmp_path / "old.csv").read_text() == "".join(lines[:-1])


def test_an_experiment_run_ends_with_the_plants_state_at_its_end(tmp_path: Path) -> None:
    """The experiment loop reads its plant after the last cycle too: the same outputs as
    the same plant (same seed) driven by the series' inputs and advanced to the end."""
    from parallelcity.experiment import loop
    from parallelcity.experiment.plan import RunSpec, apply_overrides
    from parallelcity.scenario.text import tables_toml
    from parallelcity.toml_file import parse_toml

    base = parse_toml(DH.read_text())
    tables, _ = apply_overrides(base, {"controller": base["fallback"]})
    spec = RunSpec("pi", 3, 3, False, tables_toml(tables), str(DH), "k")
    sc = loop.scenario_of(spec)
    result, _, _ = loop.closed_loop(spec, sc)
    t_end = sc.meta.start_epoch + 3 * sc.meta.cycle_s
    end = result.end_state
    assert end is not None and end.t == t_end and len(result.records) == 3

    replay = loop._make_plant(sc, spec.seed)
    for rec in result.records:
        replay.advance(rec.t)
        for name, v in rec.applied.items():
            replay.set_input(name, v)
    replay.advance(t_end)
    y = replay.outputs()
    signals = sc.model.point_signals
    assert end.values == {p.name: float(y[signals.index(p.name)]) for p in sc.field.points}
    assert end.applied == result.records[-1].applied

    loop.run_one(spec, tmp_path)
    *cycles, last = _rows(tmp_path / loop.SERIES)
    assert len(cycles) == 3 and (last["time"], last["outcome"]) == (_iso(t_end), END_OUTCOME)
