"""Baselines: PI anti-windup and rate limiting, hysteresis on a tank and on a building."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from parallelcity.controllers import baseline

from parallelcity import plugins
from parallelcity.decide.control import ControlInput, ControlProblem, SolveStatus
from parallelcity.models import pump_tank
from parallelcity.scenario.definition import Scenario
from parallelcity.specs import SafetySpecs

from .test_controllers import make_input

SCENARIO = Path(__file__).parents[1] / "scenarios" / "district_heating.toml"


def test_hysteresis_entry_point() -> None:
    assert plugins.controller_kind("hysteresis") is baseline.HYSTERESIS_KIND


def tank_problem(n: int = 24) -> ControlProblem:
    return ControlProblem(
        model=pump_tank.build(
            pump_tank.Config(
                step_s=900.0,
                tank=pump_tank.Tank(area_m2=10.0),
                pump=pump_tank.Pump(flow_m3_per_h=20.0, power_kw=10.0),
            )
        ),
        dt=900.0,
        horizon=n,
        u_min=np.array([0.0]),
        u_max=np.array([1.0]),
        du_max=np.array([np.inf]),
        banded_outputs=(0,),
    )


def test_hysteresis_keeps_a_tank_in_its_band_with_few_switches() -> None:
    problem = tank_problem()
    ctrl = baseline.HYSTERESIS_KIND.create(
        baseline.HysteresisConfig(
            loops=[
                baseline.OnOffLoop(
                    output="tank.level", input="pump.on", on_value=1.0, off_value=0.0, margin=0.2
                )
            ]
        )
    )
    ctrl.setup(problem)
    n = problem.horizon
    inp = ControlInput(
        t0=0.0,
        x0=np.array([2.0]),
        u_prev=np.array([0.0]),
        disturbances=np.column_stack([np.full(n, 10.0), np.full(n, 0.2)]),
        y_low=np.full((n + 1, 1), 1.0),
        y_high=np.full((n + 1, 1), 3.0),
    )
    r = ctrl.step(inp)
    assert r.status is SolveStatus.SOLVED
    level, pump = r.y_pred[:, 0], r.u_plan[:, 0]
    # down 0.25 m per quarter hour off, up 0.25 on: switches at 1.2 and 2.8
    assert np.all(level >= 1.0 - 1e-9) and np.all(level <= 3.0 + 1e-9)
    assert set(np.unique(pump)) == {0.0, 1.0}
    switches = int(np.sum(pump[1:] != pump[:-1]))
    assert 1 <= switches <= 5  # a dead band, not chattering every period
    on_at = np.flatnonzero(np.diff(pump) > 0) + 1
    assert all(level[k] < 1.2 + 1e-9 for k in on_at)  # switched on at the low edge
    # inside the dead band it holds what is applied
    inp_on = ControlInput(
        t0=0.0,
        x0=np.array([2.0]),
        u_prev=np.array([1.0]),
        disturbances=inp.disturbances,
        y_low=inp.y_low,
        y_high=inp.y_high,
    )
    assert ctrl.step(inp_on).u_plan[0, 0] == 1.0


def test_hysteresis_thermostat_on_a_building(
    scenario: Scenario, problem: ControlProblem, specs: SafetySpecs
) -> None:
    """Office flow switched between a trickle and full flow: a thermostat within rate limits."""
    ctrl = baseline.HYSTERESIS_KIND.create(
        baseline.HysteresisConfig(
            loops=[
                baseline.OnOffLoop(
                    output="office.T_zone",
                    input="office.m_flow",
                    on_value=1.5,
                    off_value=0.02,
                    margin=0.5,
                )
            ]
        )
    )
    ctrl.setup(problem)
    m = scenario.model
    x0 = m.x0.copy()
    x0[m.index("states", "office.T_zone")] = 15.0  # below the night band's low edge (16)
    inp = make_input(problem, specs, scenario.meta.start_epoch, x0, m.u0)
    r = ctrl.step(inp)
    assert r.status is SolveStatus.SOLVED
    i = m.index("inputs", "office.m_flow")
    assert r.u_plan[0, i] == 1.5
    assert specs.check_inputs(inp.u_prev, r.u_plan, problem.dt) == []


def test_hysteresis_setup_rejects_bad_wiring(problem: ControlProblem) -> None:
    for loop, needle in [
        (dict(output="plant.heat_kw", input="office.m_flow"), "has no band"),
        (dict(output="office.T_zone", input="office.nope"), "office.nope"),
    ]:
        cfg = baseline.HysteresisConfig(
            loops=[baseline.OnOffLoop(**loop, on_value=1.0, off_value=0.0)]  # type: ignore[arg-type]
        )
        with pytest.raises(ValueError, match=needle):
            baseline.HYSTERESIS_KIND.create(cfg).setup(problem)


def test_pi_does_not_wind_up(
    scenario: Scenario, problem: ControlProblem, specs: SafetySpecs
) -> None:
    """Velocity form: held at its bound for hours, the loop leaves the bound on the very
    cycle its error changes sign, instead of first unwinding an integral."""
    m = scenario.model
    config = baseline.PIConfig(
        loops=[baseline.Loop(output="office.T_zone", input="office.m_flow", kp=0.3, ki_per_h=0.5)]
    )
    ctrl = baseline.PI_KIND.create(config)
    ctrl.setup(problem)
    i = m.index("inputs", "office.m_flow")
    j = m.index("states", "office.T_zone")
    t0 = scenario.meta.start_epoch + 8 * 3600.0  # office band 20-24
    x = m.x0.copy()
    x[j] = 10.0  # far too cold: saturates
    u = m.u0.copy()
    for k in range(12):  # three hours at the bound
        r = ctrl.step(make_input(problem, specs, t0 + k * problem.dt, x, u))
        assert r.status is SolveStatus.SOLVED
        u = r.u_first
        assert u[i] == pytest.approx(problem.u_max[i])
    x[j] = 23.0  # now above the setpoint (20): the error turns negative
    r = ctrl.step(make_input(problem, specs, t0 + 12 * problem.dt, x, u))
    assert r.u_first[i] < problem.u_max[i] - 0.5  # left the bound at once
    assert specs.check_inputs(u, r.u_plan, problem.dt) == []


def test_pi_curve_respects_the_rate_limit(
    scenario: Scenario, problem: ControlProblem, specs: SafetySpecs
) -> None:
    m = scenario.model
    ctrl = baseline.PI_KIND.create(scenario.fallback_config)
    ctrl.setup(problem)
    u = m.u0.copy()
    i = m.index("inputs", "plant.T_supply_set")
    u[i] = 60.0  # the curve wants ~80 C at -2 C outside: a 20 K step
    r = ctrl.step(make_input(problem, specs, scenario.meta.start_epoch, m.x0, u))
    steps = np.diff(np.concatenate([[60.0], r.u_plan[:, i]]))
    assert np.all(np.abs(steps) <= problem.du_max[i] + 1e-9)
    assert steps[0] == pytest.approx(problem.du_max[i])
