"""One run of an experiment: the closed loop on the rig's field plant, with no field I/O.

Per cycle it does what ``run`` does minus the protocols and the clock: read the plant's
outputs into a snapshot (the mirror's plausibility and freshness rules), plan with the
runner's pure logic (``decide.cycle``: twin and estimator, controller, verified fallback,
simplex gate, ``finish_cycle``), apply the chosen inputs to the plant and advance it one
cycle of simulated time, as fast as it computes.  There is no wall-clock deadline: the
controllers solve to completion and the solve time is reported instead.  After the last
cycle the plant's outputs at the run's end are read once more (``EndState``), so the
series ends at the run's end as ``run``'s does.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from parallelcity import plugins
from parallelcity.decide.assemble import cycle_logic, divergence_monitor
from parallelcity.decide.cycle import Decision, Outcome, finish_cycle
from parallelcity.diagnose.runtime import diagnoser_for, planted_visibility, report_events
from parallelcity.experiment.plan import RunSpec, controller_none
from parallelcity.experiment.table import finite_or_null
from parallelcity.field.config import FieldConfig
from parallelcity.field.protocol import Plant
from parallelcity.field.snapshot import Snapshot, assess
from parallelcity.record.records import (
    CycleRecord,
    RunResult,
    count_cycle,
    end_state,
    new_counts,
)
from parallelcity.record.report import Summary, summarize, write_csv, write_plot
from parallelcity.scenario.definition import Scenario
from parallelcity.specs import SafetySpecs
from parallelcity.toml_file import parse_toml
from parallelcity.twin.divergence import fresh_readings
from parallelcity.twin.model import Array, KpiSource
from parallelcity.verify.rig import PlantRigKind
from parallelcity.verify.verifier import Judgement, SampleRun, Trial

SUMMARY = "summary.json"
SERIES = "series.csv"
PLOT = "plot.png"
NONE_REASON = "controller none: the field runs on its own"


class NoRollout:
    """Sample runner of an experiment with ``verify = false``: the plan's input specs are
    still screened in the twin, but it is not rolled out on the rig."""

    def run(self, samples: Sequence[int], trial: Trial, deadline: float | None) -> SampleRun:
        empty = np.empty((0, 0))
        return SampleRun(traces={0: empty}, judgements={0: Judgement((), ())})


@dataclass(frozen=True)
class RunOutcome:
    """What one run gives the experiment: its KPIs (name -> value) and their units."""

    kpis: dict[str, float]
    units: dict[str, str]
    wall_s: float
    plant_kpis: tuple[str, ...] = ()  # which KPIs the plant measured (shown first)


class _Readings:
    """The plant's outputs as the mirror would see them: plausibility and freshness."""

    def __init__(self, field: FieldConfig, model_outputs: Sequence[str]) -> None:
        self.points = [(p.name, model_outputs.index(p.name), p.type) for p in field.points]
        self.specs = field.point_specs()
        self.table = field.point_table()

    def snapshot(self, y: Array, t: float) -> Snapshot:
        for name, i, kind in self.points:
            v = float(y[i])
            raw: object = v
            if kind == "int" and math.isfinite(v):
                raw = round(v)
            elif kind == "bool" and math.isfinite(v):
                raw = bool(round(v))
            self.table.offer(name, raw, t, 0, t)
        self.table.take_events()
        return assess(self.specs, self.table.readings, t, refused=self.table.refused)


def scenario_of(spec: RunSpec) -> Scenario:
    from parallelcity.experiment.definition import effective_scenario

    tables = parse_toml(spec.scenario_toml)
    return effective_scenario(tables, Path(spec.scenario_path))


def _make_plant(scenario: Scenario, seed: int) -> Plant:
    kind = plugins.rig_kind(scenario.file.rig.kind)
    if not isinstance(kind, PlantRigKind):
        raise TypeError(f"rig kind {scenario.file.rig.kind!r} has no field_plant")
    plant: Plant = kind.field_plant(scenario.rig_config, scenario, seed)(scenario.meta.start_epoch)
    return plant


def _rejected(d: Decision) -> int:
    return sum(1 for a in d.attempts if a.verdict is not None and not a.verdict.approved)


def _check(specs: SafetySpecs, u_prev: Array, dt: float, action: Array) -> str | None:
    broken = specs.check_dispatch(u_prev, action, dt)
    return broken[0].describe() if broken else None


def closed_loop(spec: RunSpec, scenario: Scenario) -> tuple[RunResult, int, dict[str, float]]:
    """Run the loop; the records as ``run`` keeps them, rejected plans, the plant's KPIs."""
    meta, model = scenario.meta, scenario.model
    specs = scenario.safety_specs()
    plant = _make_plant(scenario, spec.seed)
    readings = _Readings(scenario.field, model.point_signals)
    none = controller_none(parse_toml(spec.scenario_toml))
    logic = None
    monitor = None
    kind = "none"
    if not none:
        kind, logic = cycle_logic(
            scenario,
            runner=None if spec.verify else NoRollout(),
            end_t=meta.start_epoch + spec.cycles * meta.cycle_s,
        )
        monitor = divergence_monitor(scenario)
    diagnoser = diagnoser_for(scenario)
    alarms: list[dict[str, Any]] = []
    counts = new_counts()
    records: list[CycleRecord] = []
    rejected = 0
    u_prev = np.asarray(plant.input_vector, dtype=float)
    bands = specs.bands
    banded = frozenset(b.output for b in bands)
    try:
        for k in range(spec.cycles):
            wall0 = time.perf_counter()
            t_k = meta.start_epoch + k * meta.cycle_s
            plant.advance(t_k)
            snap = readings.snapshot(plant.outputs(), t_k)
            if logic is None:
                outcome, source, reason, solve = Outcome.HOLD, "", NONE_REASON, 0.0
                ack = ""
            else:
                diverged = monitor.reason if monitor is not None and monitor.alarm else None
                d = logic.plan(t_k, snap, u_prev, gate=logic.gate.state, fallback_reason=diverged)
                step = finish_cycle(
                    d,
                    decided_at=t_k,
                    deadline_at=t_k + meta.deadline,
                    check_dispatch=partial(_check, specs, u_prev, meta.cycle_s),
                )
                if step.adopt and step.decision.gate is not None:
                    logic.gate.adopt(step.decision.gate, step.decision.switches)
                if step.trip is not None:
                    logic.gate.trip(t_k, step.trip)
                rejected += _rejected(d)
                ack = ""
                if step.action is not None:
                    for name, v in zip(model.inputs, step.action, strict=True):
                        plant.set_input(name, float(v))
                    u_prev = np.asarray(step.action, dtype=float)
                    counts["sent"] += 1
                    counts["acked"] += 1
                    ack = "applied"
                x = d.x0 if snap.link_up else None
                if monitor is not None:
                    monitor.observe(t_k, snap, x, u_prev)
                if diagnoser is not None:
                    events = diagnoser.observe(t_k, fresh_readings(snap), x, u_prev)
                    alarms += report_events(diagnoser, events, k, banded)
                outcome, source, reason = step.outcome, step.decision.source, step.reason
                solve = sum(a.result.solve_time_s for a in step.decision.attempts)
            count_cycle(counts, outcome, source)
            records.append(
                CycleRecord(
                    k=k,
                    t=t_k,
                    outcome=outcome,
                    source=source,
                    reason=reason,
                    values=snap.values(),
                    bands={b.output: b.limits(t_k) for b in bands},
                    applied={n: float(v) for n, v in zip(model.inputs, u_prev, strict=True)},
                    ack=ack,
                    solve_time_s=solve,
                    wall_s=time.perf_counter() - wall0,
                )
            )
        t_end = meta.start_epoch + spec.cycles * meta.cycle_s
        plant.advance(t_end)  # the last cycle's effect
        end = None
        if records:
            snap = readings.snapshot(plant.outputs(), t_end)
            end = end_state(t_end, snap, bands, model.inputs, u_prev)
        plant_kpis = plant.kpis() if isinstance(plant, KpiSource) else {}
    finally:
        close = getattr(plant, "close", None)
        if callable(close):
            close()
    result = RunResult(
        scenario,
        records,
        journal_path=Path(),
        out_dir=Path(),
        stand_in=None,
        counts=counts,
        controller_kind=kind,
        planned_cycles=spec.cycles,
        first_cycle_t=meta.start_epoch,
        alarms=alarms,
        fault_visible_cycles=planted_visibility(diagnoser, scenario),
        end_state=end,
    )
    return result, rejected, {str(k): float(v) for k, v in plant_kpis.items()}


def snake(label: str) -> str:
    return "_".join(label.lower().split())


def kpis_of(
    summary: Summary, rejected: int, plant: dict[str, float], wall_s: float
) -> tuple[dict[str, float], dict[str, str]]:
    """A run's KPIs, flat: the model's (band KPI and totals, as ``run`` reports them), the
    loop's, then the plant's own."""
    kpis: dict[str, float] = {snake(summary.band_kpi): summary.band_violation}
    units = {snake(summary.band_kpi): summary.band_unit}
    for label, v in summary.totals.items():
        kpis[snake(label)] = v
        units[snake(label)] = summary.total_units.get(label, "")
    loop = {
        "cycles": float(summary.cycles),
        "fallbacks": float(summary.fallbacks),
        "holds": float(summary.holds),
        "rejected_plans": float(rejected),
        "solve_p50_ms": summary.solve_p50_ms,
        "solve_p99_ms": summary.solve_p99_ms,
        "wall_s": wall_s,
    }
    kpis |= loop
    units |= {"solve_p50_ms": "ms", "solve_p99_ms": "ms", "wall_s": "s"}
    for name, v in plant.items():
        kpis.setdefault(name, v)
    return kpis, units


def run_one(spec: RunSpec, out_dir: Path) -> RunOutcome:
    """Run ``spec`` and write its summary.json and series.csv (and plot.png if it is the
    experiment's series run) into ``out_dir``; summary.json is written last, so its
    presence means the run finished."""
    started = time.perf_counter()
    scenario = scenario_of(spec)
    result, rejected, plant_kpis = closed_loop(spec, scenario)
    wall_s = time.perf_counter() - started
    summary = summarize(result)
    kpis, units = kpis_of(summary, rejected, plant_kpis, wall_s)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(result.records, out_dir / SERIES, result.end_state)
    if spec.series:
        write_plot(result, out_dir / PLOT)
    data = {
        "run": {"variant": spec.variant, "seed": spec.seed, "key": spec.key},
        "cycles": spec.cycles,
        "verify": spec.verify,
        "kpis": finite_or_null(kpis),
        "units": units,
        "plant_kpis": sorted(plant_kpis),
        "summary": finite_or_null(asdict(summary)),
    }
    tmp = out_dir / (SUMMARY + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    tmp.replace(out_dir / SUMMARY)
    return RunOutcome(kpis, units, wall_s, tuple(plant_kpis))


def read_summary(path: Path) -> dict[str, Any] | None:
    """A finished run's summary.json, or None if absent or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def kpis_from_summary(data: dict[str, Any]) -> dict[str, float]:
    return {k: (math.nan if v is None else float(v)) for k, v in data.get("kpis", {}).items()}
