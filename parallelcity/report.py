"""What a run leaves behind: a summary, the time series as CSV, a plot, and metrics.

Comfort violation is the time integral of the distance outside the band, in
kelvin-hours, measured from the mirror's values at the cycle instants.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .model import Panel
from .runner import CycleRecord, RunResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger("parallelcity.report")


@dataclass(frozen=True)
class Summary:
    cycles: int
    comfort_violation_kh: float
    comfort_violation_kh_by_output: dict[str, float]
    energy_kwh: float
    sent: int
    acked: int
    refused: int
    undelivered: int
    fallbacks: int
    holds: int
    stale: int
    deadline_missed: int
    cycle_wall_p50_ms: float
    cycle_wall_p99_ms: float
    solve_p50_ms: float
    solve_p99_ms: float

    def lines(self) -> list[str]:
        by = ", ".join(f"{k} {v:.2f}" for k, v in self.comfort_violation_kh_by_output.items())
        return [
            f"cycles            {self.cycles}",
            f"comfort violation {self.comfort_violation_kh:.2f} K·h  ({by})",
            f"energy            {self.energy_kwh:.0f} kWh",
            f"commands          {self.sent} sent, {self.acked} acked, {self.refused} refused, "
            f"{self.undelivered} undelivered",
            f"fallbacks         {self.fallbacks}   holds {self.holds}   stale {self.stale}   "
            f"deadline missed {self.deadline_missed}",
            f"cycle time        p50 {self.cycle_wall_p50_ms:.1f} ms   "
            f"p99 {self.cycle_wall_p99_ms:.1f} ms",
            f"solve time        p50 {self.solve_p50_ms:.1f} ms   p99 {self.solve_p99_ms:.1f} ms",
        ]


def band_violation(value: float | None, band: tuple[float, float]) -> float:
    """Kelvin outside ``band``; a missing value counts as no information, not zero."""
    if value is None or not math.isfinite(value):
        return math.nan
    lo, hi = band
    return max(0.0, lo - value, value - hi)


def comfort_kh(records: Sequence[CycleRecord], dt_s: float) -> dict[str, float]:
    out: dict[str, float] = {}
    for rec in records:
        for name, band in rec.bands.items():
            v = band_violation(rec.values.get(name), band)
            if math.isfinite(v):
                out[name] = out.get(name, 0.0) + v * dt_s / 3600.0
            else:
                out.setdefault(name, 0.0)
    return out


def _pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000.0 if values else math.nan


def summarize(result: RunResult, energy_point: str | None = None) -> Summary:
    """``energy_point``: the output integrated as energy (default: the model kind's)."""
    energy_point = energy_point or result.scenario.model.report.energy_point
    recs = result.records
    dt_s = result.scenario.meta.cycle_s
    by = comfort_kh(recs, dt_s)
    energy = 0.0
    for r in recs:
        v = r.values.get(energy_point) if energy_point else None
        if v is not None and math.isfinite(v):
            energy += v * dt_s / 3600.0
    solves = [r.solve_time_s for r in recs if r.solve_time_s > 0]
    c = result.counts
    return Summary(
        cycles=len(recs),
        comfort_violation_kh=sum(by.values()),
        comfort_violation_kh_by_output=by,
        energy_kwh=energy,
        sent=c.get("sent", 0),
        acked=c.get("acked", 0),
        refused=c.get("refused", 0),
        undelivered=c.get("undelivered", 0),
        fallbacks=c.get("fallback", 0),
        holds=c.get("hold", 0),
        stale=c.get("stale", 0),
        deadline_missed=c.get("deadline", 0),
        cycle_wall_p50_ms=_pct([r.wall_s for r in recs], 50),
        cycle_wall_p99_ms=_pct([r.wall_s for r in recs], 99),
        solve_p50_ms=_pct(solves, 50),
        solve_p99_ms=_pct(solves, 99),
    )


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_csv(records: Sequence[CycleRecord], path: Path) -> None:
    if not records:
        path.write_text("")
        return
    points = list(records[0].values)
    bands = list(records[0].bands)
    inputs = list(records[0].applied)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            ["time", "cycle", "outcome", "source", "ack"]
            + points
            + [f"{b}.low" for b in bands]
            + [f"{b}.high" for b in bands]
            + [f"{i}.applied" for i in inputs]
            + ["solve_time_s", "cycle_wall_s", "reason"]
        )
        for r in records:
            w.writerow(
                [_iso(r.t), r.k, r.outcome, r.source, r.ack]
                + ["" if r.values.get(p) is None else f"{r.values[p]:.4f}" for p in points]
                + [r.bands[b][0] for b in bands]
                + [r.bands[b][1] for b in bands]
                + [f"{r.applied[i]:.4f}" for i in inputs]
                + [f"{r.solve_time_s:.4f}", f"{r.wall_s:.4f}", r.reason]
            )


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
    if rec.outcome in ("hold", "stale"):
        out.add(rec.outcome)
    if rec.outcome in ("deadline", "busy"):
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


def _values(recs: Sequence[CycleRecord], name: str) -> list[float]:
    return [math.nan if (v := r.values.get(name)) is None else v for r in recs]


def _series(result: RunResult, name: str) -> tuple[list[float], str] | None:
    """A panel signal's values per cycle and how it was obtained, or None if unknown."""
    recs = result.records
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
    refused and undelivered cycles."""
    from matplotlib.figure import Figure

    recs = result.records
    model = result.scenario.model
    spec = model.report
    tz = _zone(result)
    times = [dt.datetime.fromtimestamp(r.t, tz) for r in recs]
    banded = list(recs[0].bands) if recs else []
    panels = list(spec.panels) or [Panel("inputs", model.inputs)]
    panels = [p for p in panels if any(_series(result, n) for n in p.signals)]
    heights = [1.6] * len(banded) + [1.8] * len(panels) + [1.1]
    fig = Figure(figsize=(11, sum(heights) + 1.0))
    axes = fig.subplots(len(heights), 1, sharex=True, height_ratios=heights, squeeze=False)[:, 0]
    for i, name in enumerate(banded):
        ax, colour = axes[i], f"C{i}"
        vals = _values(recs, name)
        lo = [r.bands[name][0] for r in recs]
        hi = [r.bands[name][1] for r in recs]
        ax.fill_between(times, lo, hi, color=colour, alpha=0.18, step="post", label="comfort band")
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
    for row, (what, marker, colour) in enumerate(MARKERS):
        at = [tm for tm, r in zip(times, recs, strict=True) if what in cycle_events(r)]
        ax.scatter(
            at, [row] * len(at), marker=marker, color=colour, s=25, label=f"{what} ({len(at)})"
        )
    ax.set_yticks(range(len(MARKERS)), [m[0] for m in MARKERS], fontsize=7)
    ax.set_ylim(-0.7, len(MARKERS) - 0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)
    from matplotlib.dates import DateFormatter

    ax.xaxis.set_major_formatter(DateFormatter("%H:%M", tz=tz))  # type: ignore[no-untyped-call]
    ax.set_xlabel(f"simulated time ({getattr(tz, 'key', 'UTC')})")
    fig.suptitle(plot_title(result), fontsize=10)
    fig.tight_layout()
    return fig


def write_plot(result: RunResult, path: Path) -> None:
    """Draw ``plot_figure`` into ``path`` (PNG)."""
    plot_figure(result).savefig(path, dpi=110)


def metrics_text(summary: Summary, scenario: str) -> str:
    """The run's counters in the Prometheus text exposition format."""
    lab = f'scenario="{scenario}"'
    rows = [
        ("parallelcity_cycles_total", "counter", "Control cycles run", summary.cycles),
        ("parallelcity_commands_sent_total", "counter", "Commands sent", summary.sent),
        ("parallelcity_commands_acked_total", "counter", "Commands acknowledged", summary.acked),
        ("parallelcity_commands_refused_total", "counter", "Commands refused", summary.refused),
        ("parallelcity_fallbacks_total", "counter", "Cycles on the fallback", summary.fallbacks),
        ("parallelcity_holds_total", "counter", "Cycles that sent nothing", summary.holds),
        ("parallelcity_stale_cycles_total", "counter", "Cycles with stale data", summary.stale),
        (
            "parallelcity_comfort_violation_kelvin_hours",
            "gauge",
            "Comfort violation",
            summary.comfort_violation_kh,
        ),
        ("parallelcity_energy_kwh", "gauge", "Energy used", summary.energy_kwh),
    ]
    out = []
    for name, kind, help_text, value in rows:
        out += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name}{{{lab}}} {value}"]
    return "\n".join(out) + "\n"


def write_all(result: RunResult) -> tuple[Summary, dict[str, Path]]:
    out = result.out_dir
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(result)
    paths = {
        "journal": result.journal_path,
        "csv": out / "timeseries.csv",
        "plot": out / "plot.png",
        "summary": out / "summary.json",
        "metrics": out / "metrics.prom",
    }
    write_csv(result.records, paths["csv"])
    write_plot(result, paths["plot"])
    paths["summary"].write_text(json.dumps(asdict(summary), indent=2) + "\n")
    paths["metrics"].write_text(metrics_text(summary, result.scenario.meta.name))
    return summary, paths
