"""What a run leaves behind: a summary, the time series as CSV, a plot, and metrics.

Comfort violation is the time integral of the distance outside the band, in
kelvin-hours, measured from the mirror's values at the cycle instants.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .runner import CycleRecord, RunResult


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


def write_plot(result: RunResult, path: Path) -> None:
    """The run's plot (``plot.plot_figure``) as a PNG."""
    from .plot import plot_figure

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
