"""What a run leaves behind: a summary, the time series as CSV, a plot, and metrics.

The KPIs are the model kind's (``SubsystemModel.report``): the band KPI is the time
integral of the distance outside the bands, in the banded outputs' unit times hours,
measured from the mirror's values at the cycle instants; each total integrates an output.
Each cycle's value stands for its cycle's interval, so the end state (``EndState``, the
field at the run's end) enters no KPI: it ends the CSV and the plot only.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from parallelcity.decide.cycle import Outcome
from parallelcity.record.records import CycleRecord, EndState, RunResult
from parallelcity.twin.model import ReportSpec

EXIT_OK, EXIT_NO_CONTROL = 0, 6
EXIT_SIGNAL = {"SIGINT": 130, "SIGTERM": 143}


@dataclass(frozen=True)
class Summary:
    cycles: int
    planned_cycles: int
    end: str  # "completed" | "interrupted" | "error" (or no run-end record in the journal)
    signal: str | None
    first_cycle: str | None  # ISO time of the first cycle (simulated)
    abandoned: str  # what the end left unfinished (a solve still running), if anything
    band_kpi: str  # what the model kind calls the band KPI, and its unit
    band_unit: str
    band_violation: float
    band_violation_by_output: dict[str, float]
    totals: dict[str, float]  # the model kind's totals by label
    total_units: dict[str, str]
    sent: int
    acked: int
    refused: int
    undelivered: int
    fallbacks: int
    holds: int  # cycles that sent nothing: hold, deadline and busy
    stale: int
    deadline_missed: int
    busy: int
    cycle_wall_p50_ms: float
    cycle_wall_p99_ms: float
    solve_p50_ms: float
    solve_p99_ms: float
    acked_share: float
    min_acked_share: float
    success: bool
    verdict: str
    # diagnosis: its alarms, and the faults the rig planted in the field (ground truth);
    # times are seconds after the scenario's start, as [[rig.faults]] start_s
    alarms: list[dict[str, Any]] = field(default_factory=list)
    faults_injected: list[dict[str, Any]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0 success, 6 ran without achieving control, 130 / 143 interrupted."""
        if self.end == "interrupted":
            return EXIT_SIGNAL.get(self.signal or "", 130)
        return EXIT_OK if self.success else EXIT_NO_CONTROL

    def lines(self) -> list[str]:
        by = ", ".join(f"{k} {v:.2f}" for k, v in self.band_violation_by_output.items())
        if self.end == "interrupted":
            run = f"interrupted by {self.signal} at cycle {self.cycles} of {self.planned_cycles}"
        elif self.end == "error":
            run = f"did not complete: {self.cycles} of {self.planned_cycles} cycles"
        else:
            run = f"completed {self.cycles} of {self.planned_cycles} cycles"
        if self.first_cycle:
            run += f", first cycle at {self.first_cycle}"
        if self.abandoned:
            run += f"; abandoned {self.abandoned}"
        return [
            f"run               {run}",
            f"{self.band_kpi:<17} {self.band_violation:.2f} {self.band_unit}  ({by})",
            *(
                f"{label:<17} {v:.0f} {self.total_units.get(label, '')}".rstrip()
                for label, v in self.totals.items()
            ),
            f"commands          {self.sent} sent, {self.acked} acked, {self.refused} refused, "
            f"{self.undelivered} undelivered",
            f"fallbacks         {self.fallbacks}   holds {self.holds} "
            f"({self.deadline_missed} deadline missed, {self.busy} busy)   stale {self.stale}",
            f"cycle time        p50 {_ms(self.cycle_wall_p50_ms)}   "
            f"p99 {_ms(self.cycle_wall_p99_ms)}",
            f"solve time        p50 {_ms(self.solve_p50_ms)}   p99 {_ms(self.solve_p99_ms)}",
            *(
                f"fault alarm       {a['kind']} on {a['component']} at "
                f"{_hours(a['raised_s'])} (started about {_hours(a['start_s'])})"
                for a in self.alarms
            ),
            f"result            {self.verdict}",
        ]


def _hours(s: float | None) -> str:
    return "?" if s is None else f"{s / 3600:.2f} h"


def _ms(v: float) -> str:
    return f"{v:.1f} ms" if math.isfinite(v) else "n/a"


def verdict(result: RunResult, acked_share: float, min_share: float) -> tuple[bool, str]:
    """Whether the run achieved control, and the line that says why (or why not).

    Success: the run completed and commands were acked on at least ``min_share`` of its
    cycles ([scenario] min_acked_share).
    """
    c, n = result.counts, len(result.records)
    if result.end == "interrupted":
        return False, (f"interrupted by {result.signal} at cycle {n} of {result.planned_cycles}")
    if result.end == "error":
        return False, (
            f"NO CONTROL (exit {EXIT_NO_CONTROL}): the run did not complete (an error, a crash, "
            f"or still running) after {n} of {result.planned_cycles} cycles"
        )
    acked = c.get("acked", 0)
    need = f"at least {min_share:.0%} needed"
    if n > 0 and acked_share >= min_share:
        return True, f"ok: commands acked on {acked} of {n} cycles ({acked_share:.0%}, {need})"
    if n == 0:
        why = "no cycle ran"
    elif c.get("sent", 0) == 0:
        why = (
            f"no command was sent: {c.get('hold', 0)} holds "
            f"({c.get('deadline', 0)} deadline missed, {c.get('busy', 0)} busy), "
            f"{c.get('stale', 0)} stale"
        )
    elif acked == 0 and c.get("refused", 0) > 0:
        codes = Counter(
            r.ack.split(":", 1)[1] for r in result.records if r.ack.startswith("refused:")
        )
        listed = ", ".join(f"{code} ({k})" for code, k in codes.most_common())
        every = "every command" if c.get("refused", 0) == c.get("sent", 0) else "commands"
        why = f"no command was acked: the gateway refused {every} with {listed}"
    elif acked == 0:
        why = f"no command was acked: {c.get('undelivered', 0)} undelivered"
    else:
        why = f"commands acked on only {acked} of {n} cycles ({acked_share:.0%}, {need})"
    return False, f"NO CONTROL (exit {EXIT_NO_CONTROL}): {why}"


def band_violation(value: float | None, band: tuple[float, float]) -> float:
    """Distance outside ``band``; a missing value counts as no information, not zero."""
    if value is None or not math.isfinite(value):
        return math.nan
    lo, hi = band
    return max(0.0, lo - value, value - hi)


def band_hours(records: Sequence[CycleRecord], dt_s: float) -> dict[str, float]:
    """Per banded output: the time integral (hours) of its distance outside its band."""
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


def totals(records: Sequence[CycleRecord], dt_s: float, spec: ReportSpec) -> dict[str, float]:
    """The model kind's totals: each output integrated over the cycles it was measured in."""
    out: dict[str, float] = {}
    for total in spec.totals:
        scale = dt_s / 3600.0 if total.per_hour else dt_s
        v = (r.values.get(total.output) for r in records)
        out[total.label] = sum(x * scale for x in v if x is not None and math.isfinite(x))
    return out


def alarm_summary(alarm: dict[str, Any], start: float) -> dict[str, Any]:
    """An alarm as summary.json carries it: what, where, how large, when (seconds after the
    scenario's start) and how sure; the full evidence stays in the journal."""
    ev = alarm.get("evidence", {})
    runner = ev.get("runner_up", {})
    return {
        "kind": alarm.get("kind"),
        "component": alarm.get("component"),
        "size": alarm.get("size"),
        "unit": alarm.get("unit", ""),
        "start_s": _since(alarm.get("start"), start),
        "detected_s": _since(alarm.get("detected_at"), start),
        "raised_s": _since(alarm.get("raised_at"), start),
        "channel": alarm.get("channel"),
        "explained": ev.get("explained"),
        "margin": ev.get("margin"),
        "runner_up": {"kind": runner.get("kind"), "component": runner.get("component")},
        "alike": list(ev.get("alike", [])),
    }


def _since(t: Any, start: float) -> float | None:
    return float(t) - start if isinstance(t, int | float) else None


def injected_faults(result: RunResult) -> list[dict[str, Any]]:
    """The faults the rig planted in the field's plant (``[[rig.faults]]``), if any."""
    faults = getattr(result.scenario.rig_config, "faults", None) or []
    out = [
        {"kind": f.kind, "component": f.component, "size": f.size, "start_s": f.start_s}
        for f in faults
    ]
    for f, n in zip(out, result.fault_visible_cycles, strict=False):
        f["visible_cycles"] = n
    return out


def summarize(result: RunResult) -> Summary:
    spec = result.scenario.model.report
    recs = result.records
    dt_s = result.scenario.meta.cycle_s
    by = band_hours(recs, dt_s)
    solves = [r.solve_time_s for r in recs if r.solve_time_s > 0]
    c = result.counts
    share = c.get("acked", 0) / len(recs) if recs else 0.0
    min_share = result.scenario.meta.min_acked_share
    ok, why = verdict(result, share, min_share)
    return Summary(
        cycles=len(recs),
        planned_cycles=result.planned_cycles or len(recs),
        end=result.end,
        signal=result.signal,
        first_cycle=None if result.first_cycle_t is None else _iso(result.first_cycle_t),
        abandoned=result.abandoned,
        band_kpi=spec.band_kpi,
        band_unit=spec.band_unit,
        band_violation=sum(by.values()),
        band_violation_by_output=by,
        totals=totals(recs, dt_s, spec),
        total_units={t.label: t.unit for t in spec.totals},
        sent=c.get("sent", 0),
        acked=c.get("acked", 0),
        refused=c.get("refused", 0),
        undelivered=c.get("undelivered", 0),
        fallbacks=c.get("fallback", 0),
        holds=c.get(Outcome.HOLD, 0),
        stale=c.get(Outcome.STALE, 0),
        deadline_missed=c.get(Outcome.DEADLINE, 0),
        busy=c.get(Outcome.BUSY, 0),
        cycle_wall_p50_ms=_pct([r.wall_s for r in recs], 50),
        cycle_wall_p99_ms=_pct([r.wall_s for r in recs], 99),
        solve_p50_ms=_pct(solves, 50),
        solve_p99_ms=_pct(solves, 99),
        acked_share=share,
        min_acked_share=min_share,
        success=ok,
        verdict=why,
        alarms=[alarm_summary(a, result.scenario.meta.start_epoch) for a in result.alarms],
        faults_injected=injected_faults(result),
    )


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


END_OUTCOME = "end"
"""The outcome column of the CSV's last row when the run completed: the field at the
run's end, not a cycle (no cycle number, no command, no solve)."""


def end_reason(end: EndState) -> str:
    """The reason column of the end row: what it is, and which readings were stale."""
    why = "the field at the run's end, after the last cycle; nothing sent"
    return why + (f"; stale: {', '.join(end.stale)}" if end.stale else "")


def write_csv(records: Sequence[CycleRecord], path: Path, end: EndState | None = None) -> None:
    """One row per cycle, then (``end``) one row for the field at the run's end."""
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
                [_iso(r.t), r.k, Outcome(r.outcome).value, r.source, r.ack]
                + _state_cells(r.values, r.bands, r.applied, points, bands, inputs)
                + [f"{r.solve_time_s:.4f}", f"{r.wall_s:.4f}", r.reason]
            )
        if end is not None:
            w.writerow(
                [_iso(end.t), "", END_OUTCOME, "", ""]
                + _state_cells(end.values, end.bands, end.applied, points, bands, inputs)
                + ["", "", end_reason(end)]
            )


def _state_cells(
    values: dict[str, float | None],
    band: dict[str, tuple[float, float]],
    applied: dict[str, float],
    points: list[str],
    bands: list[str],
    inputs: list[str],
) -> list[Any]:
    return (
        ["" if values.get(p) is None else f"{values[p]:.4f}" for p in points]
        + [band[b][0] for b in bands]
        + [band[b][1] for b in bands]
        + [f"{applied[i]:.4f}" for i in inputs]
    )


def write_plot(result: RunResult, path: Path) -> None:
    """The run's plot (``plot.plot_figure``) as a PNG."""
    from parallelcity.record.plot import plot_figure

    plot_figure(result).savefig(path, dpi=110)


def _finite_or_null(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_null(v) for v in value]
    return value


def summary_json(summary: Summary) -> str:
    """The summary as strict JSON: a value without a number (no solve ran) is null."""
    data = _finite_or_null(asdict(summary))
    data["exit_code"] = summary.exit_code
    return json.dumps(data, indent=2, allow_nan=False) + "\n"


def _prom(value: float) -> str:
    """A sample value as the Prometheus text format spells it."""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def metrics_text(summary: Summary, scenario: str) -> str:
    """The run's counters in the Prometheus text exposition format."""
    lab = f'scenario="{scenario}"'
    rows: list[tuple[str, str, str, float]] = [
        ("parallelcity_cycles_total", "counter", "Control cycles run", summary.cycles),
        ("parallelcity_commands_sent_total", "counter", "Commands sent", summary.sent),
        ("parallelcity_commands_acked_total", "counter", "Commands acknowledged", summary.acked),
        ("parallelcity_commands_refused_total", "counter", "Commands refused", summary.refused),
        (
            "parallelcity_commands_undelivered_total",
            "counter",
            "Commands not delivered",
            summary.undelivered,
        ),
        ("parallelcity_fallbacks_total", "counter", "Cycles on the fallback", summary.fallbacks),
        ("parallelcity_holds_total", "counter", "Cycles that sent nothing", summary.holds),
        (
            "parallelcity_deadline_missed_total",
            "counter",
            "Cycles that missed their deadline (also holds)",
            summary.deadline_missed,
        ),
        ("parallelcity_stale_cycles_total", "counter", "Cycles with stale data", summary.stale),
        (
            "parallelcity_band_violation",
            "gauge",
            f"{summary.band_kpi} [{summary.band_unit}] (the model kind's band KPI)",
            summary.band_violation,
        ),
        ("parallelcity_solve_p99_ms", "gauge", "Solve time, 99th percentile", summary.solve_p99_ms),
        (
            "parallelcity_acked_share",
            "gauge",
            "Share of cycles with an acked command",
            summary.acked_share,
        ),
        ("parallelcity_run_success", "gauge", "1 if the run achieved control", summary.success),
    ]
    out = []
    for name, kind, help_text, value in rows:
        out += [
            f"# HELP {name} {help_text}",
            f"# TYPE {name} {kind}",
            f"{name}{{{lab}}} {_prom(value)}",
        ]
    out += [
        "# HELP parallelcity_alarms_total Fault alarms raised by the diagnosis",
        "# TYPE parallelcity_alarms_total counter",
    ]
    for kind, n in sorted(Counter(str(a["kind"]) for a in summary.alarms).items()):
        out.append(f'parallelcity_alarms_total{{{lab},kind="{_label_value(kind)}"}} {n}')
    if summary.totals:
        out += [
            "# HELP parallelcity_total The model kind's totals",
            "# TYPE parallelcity_total gauge",
        ]
        for label, value in summary.totals.items():
            unit = summary.total_units.get(label, "")
            kpi = f'kpi="{_label_value(label)}",unit="{_label_value(unit)}"'
            out.append(f"parallelcity_total{{{lab},{kpi}}} {_prom(value)}")
    return "\n".join(out) + "\n"


def _label_value(text: str) -> str:
    """``text`` escaped as a Prometheus label value."""
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def write_all(result: RunResult) -> tuple[Summary, dict[str, Path]]:
    """Write everything a run leaves behind (also for an interrupted run)."""
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
    write_csv(result.records, paths["csv"], result.end_state)
    write_plot(result, paths["plot"])
    paths["summary"].write_text(summary_json(summary))
    paths["metrics"].write_text(metrics_text(summary, result.scenario.meta.name))
    return summary, paths
