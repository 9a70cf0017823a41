"""Diagnosis on the district-heating model: planted faults in a simulated plant that differs
from the twin (the scenario's field parameter draw and weather error), found, named and
sized from the residuals alone; and a fault-free week without an alarm.

The plant is the field stand-in's (``hil.plant.PlantSimulator`` with ``ActiveFault``), the
inputs an open-loop schedule that moves the flows and the supply temperature the way a
controller does over a day, the readings carry sensor noise of a third of the declared
residual noise (a frozen sensor repeats its value, noise included)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
from parallelcity.hil.plant import PlantSimulator, forecast_truth, perturbed_params

from parallelcity.diagnose.config import DiagnosisConfig, settings
from parallelcity.diagnose.diagnoser import Alarm, Diagnoser
from parallelcity.diagnose.faults import ActiveFault, FaultSpec

DT = 900.0
NOISE = {
    "apartment.T_zone": 0.15,
    "office.T_zone": 0.15,
    "school.T_zone": 0.15,
    "plant.T_supply": 0.2,
    "apartment.Q_heat": 2.0,
    "office.Q_heat": 2.0,
    "school.Q_heat": 2.0,
    "plant.fuel_kw": 4.0,
}
SENSOR_NOISE = 1 / 3  # of the declared residual noise; the rest is model mismatch


@dataclass
class Outcome:
    alarms: list[Alarm]
    truth_at_start: dict[str, float]  # readings and inputs when the fault began


def schedule(t: float, k: int, t0: float) -> np.ndarray:
    """Supply setpoint and flows moving over the day and from cycle to cycle."""
    day = 2 * math.pi * ((t - t0) / 86400.0)
    flows = [
        0.35 + 0.2 * math.sin(day + ph) + 0.1 * math.sin(2 * math.pi * k / 7 + ph)
        for ph in (0, 1, 2)
    ]
    return np.array([70.0 + 8.0 * math.sin(day), *flows])


def diagnose(dh, fault: FaultSpec | None, hours: float, seed: int = 1) -> Outcome:
    m, rig = dh.model, dh.rig_config
    t0 = dh.meta.start_epoch
    params = perturbed_params(m, rig.parameter_spread, rig.spread_parameters, rig.field_seed)
    truth = forecast_truth(m, rig.forecast_error, rig.field_seed)
    faults = [ActiveFault(m, fault)] if fault else []
    plant = PlantSimulator(m, params, truth, m.x0, m.u0, t0, max_step_s=300.0, faults=faults)
    bounds = {s.name: (s.min, s.max) for s in dh.specs.inputs}
    cfg = DiagnosisConfig(noise=NOISE)
    diag = Diagnoser(m, DT, settings(cfg, m, DT, bounds))
    rng = np.random.default_rng(seed)
    at_start: dict[str, float] = {}
    for k in range(int(hours * 3600 / DT)):
        t = t0 + k * DT
        plant.advance(t)
        y = dict(zip(m.outputs, plant.outputs(), strict=True))
        faulty = fault is not None and t >= fault.start
        if faulty and not at_start:
            at_start = {**y, **plant.inputs}
        frozen = faulty and fault is not None and fault.kind == "sensor_stuck"
        readings = {
            n: v
            + (
                0.0
                if n not in NOISE or (frozen and n == fault.component)
                else rng.normal(0.0, SENSOR_NOISE * NOISE[n])
            )
            for n, v in y.items()
        }
        x = np.array([readings[m.state_outputs[s]] for s in m.states])
        u = schedule(t, k, t0)
        diag.observe(t, readings, x, u)
        plant.set_inputs(dict(zip(m.inputs, u, strict=True)))
    return Outcome(diag.alarms, at_start)


CASES = [
    # kind, component, size, start (h), what the estimate is checked against, tolerance
    ("fouled_exchanger", "apartment", 0.85, 12.0, "size", 0.05),
    ("fouled_exchanger", "office", 0.7, 24.0, "size", 0.05),
    ("valve_stuck", "school", None, 8.0, "school.m_flow", 0.02),
    ("sensor_drift", "plant.fuel_kw", 40.0, 9.0, "size", 0.2 * 40.0),
    ("sensor_drift", "school.T_zone", 1.5, 24.0, "size", 0.2 * 1.5),
    ("sensor_drift", "plant.T_supply", 3.0, 20.0, "size", 0.2 * 3.0),
    ("sensor_stuck", "office.Q_heat", None, 11.0, "office.Q_heat", 0.5),
    ("sensor_stuck", "school.T_zone", None, 30.0, "school.T_zone", 0.1),
]


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "component", "size", "start_h", "against", "tol"), CASES)
def test_a_planted_fault_is_detected_isolated_and_sized(
    dh, kind: str, component: str, size: float | None, start_h: float, against: str, tol: float
) -> None:
    t0 = dh.meta.start_epoch
    spec = FaultSpec(kind, component, size, t0 + start_h * 3600)
    fk = dh.model.fault_kind(kind)
    per_cycle = NOISE.get(component, 1.0) / (DT / 3600) if fk.relative_to_noise else 1.0
    assert size is None or size >= fk.min_size * per_cycle, "a case above the minimum size"
    out = diagnose(dh, spec, start_h + 7)
    assert out.alarms, "no alarm for a planted fault"
    first = out.alarms[0]
    assert (first.kind, first.component) == (kind, component), first.describe()
    assert first.raised_at >= spec.start, "an alarm before the fault is a false alarm"
    assert first.raised_at - spec.start <= 6 * 3600, "detected and isolated within 6 h"
    assert abs(first.start - spec.start) <= 2 * DT, "the start is dated within two cycles"
    expected = size if against == "size" else out.truth_at_start[against]
    assert first.size is not None and abs(first.size - expected) <= tol, first.describe()


@pytest.mark.slow
def test_a_fault_free_week_raises_no_alarm(dh) -> None:
    """The target is at most one false alarm per simulated week; this plant's draw, weather
    error and sensor noise raise none."""
    assert diagnose(dh, None, 7 * 24).alarms == []
