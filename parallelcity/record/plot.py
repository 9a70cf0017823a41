"""A run's plot: what happened, cycle by cycle, as an operator reads it.

One panel per banded output with its band in the output's own colour, the
panels the model kind declares (``SubsystemModel.report``), and a strip marking the
cycles that did not go as planned.  The lines end at the run's end when the run read
the field there (``EndState``).  Times are shown in the scenario's time zone.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from parallelcity.decide.cycle import Outcome
from parallelcity.twin.model import Panel

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from parallelcity.record.records import CycleRecord, EndState, RunResult

    Row = CycleRecord | EndState

log = logging.getLogger("parallelcity.record.plot")

MARKERS: tuple[tuple[str, str, str], ...] = (
    ("fallback", "v", "tab:purple"),
    ("hold", "s", "tab:orange"),
    ("stale", "x", "tab:gray"),
    ("deadline/busy", "D", "tab:brown"),
    ("refused", "X", "tab:red"),
    ("undelivered", "o", "black"),
)
"""The event strip's rows: (what, marker, colour)."""


def cycle_events(rec: CycleRecord) -> set[str]:
    """Which of the event strip's rows cycle ``rec`` belongs to."""
    out = set()
    if rec.source == "fallback":
        out.add("fallback")
    outcome = Outcome(rec.outcome)
    if outcome in (Outcome.HOLD, Outcome.STALE):
        out.add(outcome.value)
    if outcome.sends_nothing_by_time:
        out.add("deadline/busy")
    if rec.ack.startswith("refused"):
        out.add("refused")
    if rec.ack == "undelivered":
        out.add("undelivered")
    return out


def _zone(result: RunResult) -> dt.tzinfo:
    """The scenario's time zone if it names one (the scenario validates it), else UTC."""
    zone = getattr(result.scenario.meta, "time_zone", None)
    if isinstance(zone, dt.tzinfo):
        return zone
    if zone:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            return ZoneInfo(str(zone))
        except (ZoneInfoNotFoundError, ValueError):
            log.warning("plot: unknown time zone %r, showing UTC", zone)
    return dt.UTC


def plot_title(result: RunResult) -> str:
    """Scenario, simulated start (in the scenario's time zone), controller kind, run folder."""
    tz = _zone(result)
    t0 = result.records[0].t if result.records else result.scenario.meta.start_epoch
    when = dt.datetime.fromtimestamp(t0, tz).strftime("%a %Y-%m-%d %H:%M %Z")
    kind = result.controller_kind or result.scenario.file.controller.kind
    return (
        f"{result.scenario.meta.name} · {when} · controller {kind} · "
        f"run {result.journal_path.parent.name}"
    )


def _rows(result: RunResult) -> list[Row]:
    """The cycles, then the field at the run's end if the run read it."""
    end = [result.end_state] if result.end_state is not None and result.records else []
    return [*result.records, *end]


def _values(recs: Sequence[Row], name: str) -> list[float]:
    return [math.nan if (v := r.values.get(name)) is None else v for r in recs]


def _series(result: RunResult, name: str) -> tuple[list[float], str] | None:
    """A panel signal's values per row (``_rows``) and how it was obtained, or None."""
    recs = _rows(result)
    model = result.scenario.model
    if recs and name in recs[0].values:
        return _values(recs, name), ""
    if name in model.inputs:
        return [r.applied.get(name, math.nan) for r in recs], " (applied)"
    if name in model.disturbances and recs:
        i = model.disturbances.index(name)
        dt_s = result.scenario.meta.cycle_s
        return [float(model.forecast(r.t, 1, dt_s)[0, i]) for r in recs], " (forecast)"
    return None


def plot_figure(result: RunResult) -> Figure:
    """The run's story: each banded output in its own panel with its band, the model kind's
    panels (``SubsystemModel.report``), and a strip marking fallback, hold, stale, deadline,
    refused and undelivered cycles, and the diagnosis's fault alarms."""
    from matplotlib.figure import Figure

    recs = result.records
    rows = _rows(result)
    model = result.scenario.model
    spec = model.report
    tz = _zone(result)
    times = [dt.datetime.fromtimestamp(r.t, tz) for r in rows]
    banded = list(recs[0].bands) if recs else []
    panels = list(spec.panels) or [Panel("inputs", model.inputs)]
    panels = [p for p in panels if any(_series(result, n) for n in p.signals)]
    heights = [1.6] * len(banded) + [1.8] * len(panels) + [1.1]
    fig = Figure(figsize=(11, sum(heights) + 1.0))
    axes = fig.subplots(len(heights), 1, sharex=True, height_ratios=heights, squeeze=False)[:, 0]
    for ax in axes:  # a near-constant series reads as its value, not '1e-8 + 3e1'
        ax.ticklabel_format(axis="y", useOffset=False)
    for i, name in enumerate(banded):
        ax, colour = axes[i], f"C{i}"
        vals = _values(rows, name)
        lo = [r.bands[name][0] for r in rows]
        hi = [r.bands[name][1] for r in rows]
        ax.fill_between(times, lo, hi, color=colour, alpha=0.18, step="post", label=spec.band_name)
        ax.plot(times, vals, color=colour, marker=".", label=name)
        ax.set_ylabel(spec.banded_label, fontsize=8)
        ax.legend(loc="upper left", fontsize=8)
    for j, panel in enumerate(panels):
        ax = axes[len(banded) + j]
        for name in panel.signals:
            got = _series(result, name)
            if got is None:
                continue
            vals, how = got
            if how == " (applied)":
                ax.step(times, vals, where="post", label=name + how)
            else:
                ax.plot(times, vals, label=name + how)
        unit = f" [{panel.unit}]" if panel.unit else ""
        ax.set_ylabel(f"{panel.title}{unit}", fontsize=8)
        ax.legend(loc="upper left", fontsize=8)
    ax = axes[-1]
    for row, (what, marker, colour) in enumerate(MARKERS):  # cycles only: zip drops the end
        at = [tm for tm, r in zip(times, recs, strict=False) if what in cycle_events(r)]
        ax.scatter(
            at, [row] * len(at), marker=marker, color=colour, s=25, label=f"{what} ({len(at)})"
        )
    alarm_row = len(MARKERS)
    for a in result.alarms:  # a fault alarm, at the cycle that raised it
        when = dt.datetime.fromtimestamp(float(a["raised_at"]), tz)
        ax.scatter([when], [alarm_row], marker="*", color="crimson", s=60)
        ax.annotate(f"{a['kind']} {a['component']}", (when, alarm_row), fontsize=6, va="bottom")
    ax.set_yticks(range(len(MARKERS) + 1), [m[0] for m in MARKERS] + ["fault alarm"], fontsize=7)
    ax.set_ylim(-0.7, len(MARKERS) + 1.2)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)
    from matplotlib.dates import DateFormatter

    ax.xaxis.set_major_formatter(DateFormatter("%H:%M", tz=tz))  # type: ignore[no-untyped-call]
    ax.set_xlabel(f"simulated time ({getattr(tz, 'key', 'UTC')})")
    fig.suptitle(plot_title(result), fontsize=10)
    fig.tight_layout()
    return fig
