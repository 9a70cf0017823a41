"""The run's plot: what was drawn, checked through matplotlib's objects."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from matplotlib.colors import to_rgba

from parallelcity.record.plot import plot_figure
from parallelcity.record.records import CycleRecord, RunResult
from parallelcity.record.report import write_plot
from parallelcity.twin.model import Panel, ReportSpec

ZONES = ("apartment.T_zone", "office.T_zone", "school.T_zone")
INPUTS = ("plant.T_supply_set", "apartment.m_flow", "office.m_flow", "school.m_flow")


def _rec(k: int, t: float, **kw: object) -> CycleRecord:
    base: dict[str, object] = {
        "outcome": "dispatch",
        "source": "controller",
        "reason": "",
        "ack": "applied",
    }
    base.update(kw)
    values: dict[str, float | None] = {z: 20.0 + 0.1 * k for z in ZONES}
    values |= {"plant.T_supply": 70.0, "plant.fuel_kw": 150.0, "weather.T_out": -3.0}
    if base["outcome"] == "stale":
        values["office.T_zone"] = None
    return CycleRecord(
        k=k,
        t=t,
        outcome=str(base["outcome"]),
        source=str(base["source"]),
        reason=str(base["reason"]),
        values=values,
        bands=dict.fromkeys(ZONES, (19.0, 23.0)),
        applied=dict(zip(INPUTS, (70.0, 0.3, 0.3, 0.3), strict=True)),
        ack=str(base["ack"]),
        solve_time_s=0.01,
        wall_s=0.02,
    )


@pytest.fixture
def result(dh, tmp_path) -> RunResult:
    t0, dt_s = dh.meta.start_epoch, dh.meta.cycle_s
    kinds = [
        {},
        {"source": "fallback"},
        {"outcome": "hold", "ack": ""},
        {"outcome": "stale", "ack": ""},
        {"ack": "refused:watchdog_tripped"},
        {"outcome": "deadline", "ack": ""},
        {"source": "fallback", "ack": "undelivered"},
        {},
    ]
    recs = [_rec(k, t0 + k * dt_s, **kw) for k, kw in enumerate(kinds)]
    folder = tmp_path / "district-heating-20260112-000000"
    return RunResult(dh, recs, folder / "journal.sqlite", folder, None, {}, "pi")


def _labels(ax) -> list[str]:
    legend = ax.get_legend()
    return [t.get_text() for t in legend.get_texts()] if legend else []


def test_plot_tells_the_runs_story(result: RunResult, tmp_path: Path) -> None:
    fig = plot_figure(result)
    axes = fig.axes
    title = fig.get_suptitle()
    for part in ("district-heating", "Mon 2026-01-12 00:00 UTC", "controller pi"):
        assert part in title
    assert "run district-heating-20260112-000000" in title

    # one panel per zone, its band filled in its line's colour, with a legend
    for ax, zone in zip(axes[:3], ZONES, strict=True):
        assert _labels(ax) == ["comfort band", zone]
        (line,) = ax.get_lines()
        (band,) = ax.collections
        assert to_rgba(line.get_color())[:3] == tuple(band.get_facecolor()[0][:3])
    colours = {to_rgba(ax.get_lines()[0].get_color()) for ax in axes[:3]}
    assert len(colours) == 3, "each zone has its own colour"

    # the model kind's panels: supply, outdoor temperature, power (measured only), flows
    assert [ax.get_ylabel() for ax in axes[3:-1]] == [
        "supply temperature [°C]",
        "outdoor temperature [°C]",
        "power [kW]",
        "flow [kg/s]",
    ]
    assert _labels(axes[3]) == ["plant.T_supply_set (applied)", "plant.T_supply"]
    assert _labels(axes[4]) == ["weather.T_out"]
    assert _labels(axes[5]) == ["plant.fuel_kw"]

    # the event strip: every kind of cycle the operator must see, counted
    strip = _labels(axes[-1])
    for label in (
        "fallback (2)",
        "hold (1)",
        "stale (1)",
        "deadline/busy (1)",
        "refused (1)",
        "undelivered (1)",
    ):
        assert label in strip
    marks = {
        label: len(c.get_offsets()) for label, c in zip(strip, axes[-1].collections, strict=True)
    }
    assert marks["fallback (2)"] == 2 and marks["refused (1)"] == 1

    write_plot(result, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_another_model_kind_plots_its_own_panels(result: RunResult) -> None:
    """The panels come from the model kind's declaration, not from district heating."""
    spec = ReportSpec(
        banded_label="room [°C]",
        panels=(Panel("sun", ("weather.I_sol",), "W/m²"), Panel("nothing", ("plant.heat_kw",))),
    )
    model = dataclasses.replace(result.scenario.model, report=spec)
    other = dataclasses.replace(result, scenario=dataclasses.replace(result.scenario, model=model))
    axes = plot_figure(other).axes
    assert [ax.get_ylabel() for ax in axes[:3]] == ["room [°C]"] * 3
    # an unmeasured disturbance is drawn from the forecast; a panel with nothing to draw is left out
    assert [ax.get_ylabel() for ax in axes[3:-1]] == ["sun [W/m²]"]
    assert _labels(axes[3]) == ["weather.I_sol (forecast)"]

    bare = dataclasses.replace(model, report=ReportSpec())
    axes = plot_figure(
        dataclasses.replace(result, scenario=dataclasses.replace(result.scenario, model=bare))
    ).axes
    assert _labels(axes[3]) == [f"{n} (applied)" for n in INPUTS]


def test_an_empty_run_still_plots(result: RunResult, tmp_path: Path) -> None:
    write_plot(dataclasses.replace(result, records=[]), tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_the_title_and_time_axis_use_the_scenarios_time_zone(result: RunResult) -> None:
    """With a time zone the simulated start is local time (Berlin is UTC+1 in January)."""
    sc = result.scenario
    meta = sc.meta.model_copy(update={"time_zone": "Europe/Berlin"})
    file = sc.file.model_copy(update={"scenario": meta})
    local = dataclasses.replace(result, scenario=dataclasses.replace(sc, file=file))
    fig = plot_figure(local)
    assert "Mon 2026-01-12 01:00 CET" in fig.get_suptitle()
    assert fig.axes[-1].get_xlabel() == "simulated time (Europe/Berlin)"
