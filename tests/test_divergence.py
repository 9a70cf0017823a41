"""The divergence monitor against the pure plant simulator (no wall clock).

The twin's state is read from the measuring points, as ``Twin.estimate`` does;
the monitor predicts one hour ahead with the nominal model and compares.  The
plant differs from the twin (parameters within +-15 %, forecast errors), so a
clean week tests the thresholds against honest model mismatch.
"""

from __future__ import annotations

import numpy as np
import pytest

from parallelcity.scenario.definition import Scenario
from parallelcity.twin.divergence import Check, DivergenceMonitor, DivergenceSettings

from .test_estimate import DAY, Sim

SETTINGS = DivergenceSettings(
    thresholds={
        "apartment.T_zone": 0.6,
        "office.T_zone": 0.6,
        "school.T_zone": 0.6,
        "plant.T_supply": 2.0,
    },
    window=4,
    persist=3,
    clear=4,
)
DETECT_WITHIN = 8  # cycles from the fault to the alarm (2 simulated hours)


def twin_state(sim: Sim, snap: object) -> np.ndarray | None:
    from parallelcity.field.snapshot import Snapshot

    assert isinstance(snap, Snapshot)
    try:
        return np.array([snap.value(s) for s in sim.model.states])
    except KeyError:
        return None


def run_monitored(sim: Sim, cycles: int, on_cycle: object = None) -> list[Check]:
    monitor = DivergenceMonitor(sim.model, sim.dt, SETTINGS)
    checks = []
    for k in range(cycles):
        if callable(on_cycle):
            on_cycle(k, sim)
        snap = sim.snapshot()
        u = sim.control(snap)
        checks.append(monitor.observe(sim.t, snap, twin_state(sim, snap), u))
        sim.advance(u)
    return checks


@pytest.mark.slow
def test_no_alarm_on_a_clean_simulated_week(dh: Scenario) -> None:
    checks = run_monitored(Sim(dh, seed=21), 7 * DAY)
    alarms = [c for c in checks if c.change == "alarm"]
    assert alarms == [], alarms[0].reason
    # the monitor was really comparing, and the residuals were not all tiny
    compared = [c for c in checks if c.residuals]
    assert len(compared) >= 7 * DAY - SETTINGS.window
    worst = max(abs(r) for c in compared for r in c.residuals.values())
    assert worst > 0.05


def test_a_stuck_sensor_raises_the_alarm_and_clears_after_repair(dh: Scenario) -> None:
    """The apartment's sensor freezes at 03:00 on day two; the 06:00 warm-up moves the
    zone while the reading stays put.  Alarm within DETECT_WITHIN cycles of 06:00."""
    freeze_at, warmup_at = DAY + 12, DAY + 20  # 03:00 and 05:00 (the heating law leads by 1 h)
    repair_at = DAY + 48
    stuck: dict[str, float] = {}

    def stuck_sensor(t: float, v: float) -> float:
        k = round((t - dh.meta.start_epoch) / dh.meta.cycle_s)
        if freeze_at <= k < repair_at:
            return stuck.setdefault("value", v)
        return v

    sim = Sim(dh)
    sim.faults["apartment.T_zone"] = stuck_sensor
    checks = run_monitored(sim, DAY + 72)
    raised = [k for k, c in enumerate(checks) if c.change == "alarm"]
    assert raised, "no alarm"
    assert warmup_at <= raised[0] <= warmup_at + DETECT_WITHIN, raised
    assert "apartment.T_zone" in checks[raised[0]].reason
    assert all(not c.alarm for c in checks[:freeze_at])
    cleared = [k for k, c in enumerate(checks) if c.change == "clear"]
    assert cleared and repair_at < cleared[-1] <= repair_at + SETTINGS.window + 2 * SETTINGS.clear
    assert not checks[-1].alarm


def test_a_parameter_step_raises_the_alarm(dh: Scenario) -> None:
    """At noon on day two the apartment's heat loss doubles (a window left open)."""
    step_at = DAY + 48
    ua = dh.model.index("parameters", "apartment.ua_kw_per_k")

    def open_window(k: int, sim: Sim) -> None:
        if k == step_at:
            sim.plant.params[ua] *= 2.0

    checks = run_monitored(Sim(dh), step_at + 24, open_window)
    raised = [k for k, c in enumerate(checks) if c.change == "alarm"]
    assert raised and step_at < raised[0] <= step_at + DETECT_WITHIN, raised
    assert "apartment.T_zone" in checks[raised[0]].reason


def test_persistence_and_clearing_are_counted_in_cycles(dh: Scenario) -> None:
    """The alarm logic on a hand-made residual sequence."""
    settings = DivergenceSettings({"school.T_zone": 0.5}, window=1, persist=2, clear=2)
    monitor = DivergenceMonitor(dh.model, 900.0, settings)
    changes = []
    for k, r in enumerate([0.1, 0.9, 0.1, -0.9, -0.8, 0.7, 0.1, 0.2, 0.1]):
        changes.append(monitor._judge(900.0 * k, {"school.T_zone": r}).change)
    assert changes == [None, None, None, None, "alarm", None, None, "clear", None]
    # no comparison possible (stale point): neither counts towards raising nor clearing
    monitor._judge(0.0, {"school.T_zone": 0.9})
    monitor._judge(0.0, {"school.T_zone": 0.9})
    assert monitor.alarm
    assert monitor._judge(0.0, {}).alarm and monitor._judge(0.0, {}).alarm
    with pytest.raises(ValueError, match="unknown outputs"):
        DivergenceMonitor(dh.model, 900.0, DivergenceSettings({"nope": 1.0}))
    with pytest.raises(ValueError, match="positive"):
        DivergenceSettings({"school.T_zone": 0.0})
