"""milp_pump's end-of-run target: the run's start levels at the stage where the run ends,
and the per-state correction of the model's one-cycle error that makes it hold on a plant
that differs from the model (a pump-and-tank model, the real HiGHS)."""

from __future__ import annotations

from pathlib import Path

import casadi as ca
import numpy as np
from parallelcity.controllers import milp

from parallelcity.decide.assemble import cycle_logic
from parallelcity.decide.control import ControlInput, ControlProblem
from parallelcity.models import pump_tank
from parallelcity.scenario.definition import load_scenario
from parallelcity.twin.model import ModelForm, SubsystemModel

H = 3600.0
PRICE = np.array([0.3, 0.1, 0.3, 0.1, 0.1, 0.3, 0.3, 0.1])


def problem(end_t: float | None, n: int = 8) -> ControlProblem:
    """A 10 m2 tank: one metre up per hour with the pump on, one down with it off."""
    model = pump_tank.build(
        pump_tank.Config(
            step_s=H,
            tank=pump_tank.Tank(area_m2=10.0, initial_level_m=2.0),
            pump=pump_tank.Pump(flow_m3_per_h=20.0, power_kw=10.0),
        )
    )
    return ControlProblem(
        model=model,
        dt=H,
        horizon=n,
        u_min=np.zeros(1),
        u_max=np.ones(1),
        du_max=np.full(1, np.inf),
        banded_outputs=(0,),
        end_t=end_t,
    )


def cycle(t0: float, level: float, on: float, n: int = 8) -> ControlInput:
    k = round(t0 / H)
    price = np.roll(PRICE, -k)[:n]
    return ControlInput(
        t0=t0,
        x0=np.array([level]),
        u_prev=np.array([on]),
        disturbances=np.column_stack([np.full(n, 10.0), price]),
        y_low=np.full((n + 1, 1), 0.0),
        y_high=np.full((n + 1, 1), 5.0),
    )


def scheduler(p: ControlProblem, **config: object) -> milp.PumpScheduler:
    s = milp.KIND.create(milp.Config(**config))  # type: ignore[arg-type]
    s.setup(p)
    return s


def test_the_run_end_holds_the_start_level_at_the_stage_where_the_run_ends() -> None:
    s = scheduler(problem(end_t=4 * H), terminal_at="run_end")
    first = s.step(cycle(0.0, 2.0, 0.0))
    assert first.status.usable, first.message
    assert first.extra["terminal_stage"] == 4
    assert first.x_pred[4, 0] >= 2.0 - 1e-6
    # an hour on, the tank is lower than at the start: the target stays the start level,
    # two stages ahead now, and nothing holds the levels after the run's end
    later = s.step(cycle(2 * H, 1.0, 0.0))
    assert later.status.usable, later.message
    assert later.extra["terminal_stage"] == 2 and later.extra["terminal_slack"] == 0.0
    assert later.x_pred[2, 0] >= 2.0 - 1e-6
    assert later.x_pred[-1, 0] < 2.0  # after the end, the cheapest is not to refill
    assert later.extra["terminal_run_end"]
    # before the run's end is in view, each horizon ends at least at the level now
    far = scheduler(problem(end_t=20 * H), terminal_at="run_end")
    far.step(cycle(0.0, 2.0, 0.0))
    early = far.step(cycle(H, 1.0, 0.0))
    assert early.extra["terminal_stage"] == 8 and not early.extra["terminal_run_end"]
    assert 1.0 - 1e-6 <= early.x_pred[-1, 0] < 2.0
    # and never above the run's start level: a tank fuller than at the start may come down
    full = far.step(cycle(2 * H, 4.0, 0.0))
    assert 2.0 - 1e-6 <= full.x_pred[-1, 0] < 4.0
    done = s.step(cycle(4 * H, 2.0, 0.0))
    assert done.status.usable and done.extra["terminal_stage"] == 0


def closed_loop(gain: float, cycles: int = 6, extra_draw: float = 0.4) -> tuple[float, list[float]]:
    """The plan's first move applied to a plant that loses ``extra_draw`` m per hour more
    than the model; the plant's level after the last cycle, and the bias estimates."""
    s = scheduler(problem(end_t=cycles * H), terminal_at="run_end", bias_gain=gain)
    level, on = 2.0, 0.0
    bias = []
    for k in range(cycles):
        r = s.step(cycle(k * H, level, on))
        assert r.status.usable, r.message
        on = float(r.u_plan[0, 0])
        level += (2.0 * on - 1.0) - extra_draw  # the plant: 20 m3/h in, 10 + 4 m3/h out
        bias.append(r.extra["bias"][0])
    return level, bias


def test_the_bias_correction_makes_the_end_level_hold_on_the_plant() -> None:
    uncorrected, _ = closed_loop(gain=0.0)
    corrected, bias = closed_loop(gain=1.0)
    assert uncorrected < 2.0 - 0.1  # the model's promise, broken by the plant
    assert corrected >= 2.0 - 1e-6
    assert bias[0] == 0.0 and abs(bias[-1] + 0.4) < 1e-6


def test_the_run_end_reaches_the_controller_through_the_cycle_logic() -> None:
    sc = load_scenario(Path(__file__).resolve().parents[1] / "scenarios" / "pump_tank.toml")
    end = sc.meta.start_epoch + 10 * sc.meta.cycle_s
    _, logic = cycle_logic(sc, end_t=end)
    assert logic.problem.end_t == end


def interacting_pumps() -> ControlProblem:
    """Two pumps into one 10 m2 tank: 20 m3/h each alone, 30 together (a shared main), a
    draw of 15 m3/h: not affine in the pumps, as a network's blended fits are not."""
    x, u = ca.SX.sym("x", 1), ca.SX.sym("u", 2)
    d, p = ca.SX.sym("d", 2), ca.SX.sym("p", 1)
    inflow = 20.0 * u[0] + 20.0 * u[1] - 10.0 * u[0] * u[1]
    f = ca.Function("F", [x, u, d, p], [x + (inflow - d[0]) / 10.0])
    kw = 10.0 * (u[0] + u[1])
    h = ca.Function("h", [x, u, d, p], [ca.vertcat(x, kw * d[1])])
    model = SubsystemModel(
        name="shared_main",
        states=("t.level",),
        inputs=("a.on", "b.on"),
        disturbances=("t.demand", "tariff.price"),
        outputs=("t.level", "tariff.cost_per_h"),
        parameters=("scale",),
        nominal=np.ones(1),
        f=f,
        h=h,
        forecast=lambda t0, n, dt: np.column_stack([np.full(n, 15.0), np.ones(n)]),
        x0=np.array([2.0]),
        u0=np.zeros(2),
        state_outputs={"t.level": "t.level"},
        form=ModelForm.DISCRETE,
        step_s=H,
    )
    return ControlProblem(model, H, 6, np.zeros(2), np.ones(2), np.full(2, np.inf), (0,))


def test_on_off_combinations_are_exact_where_a_linearisation_is_not() -> None:
    p = interacting_pumps()
    # the cheap hours need both pumps at once to climb: only the exact model knows that
    # together they lift 1.5 m an hour, not 2.5
    price = np.array([1.0, 1.0, 0.1, 0.1, 1.0, 1.0])
    inp = ControlInput(
        t0=0.0,
        x0=np.array([2.0]),
        u_prev=np.zeros(2),
        disturbances=np.column_stack([np.full(6, 15.0), price]),
        y_low=np.full((7, 1), 1.0),
        y_high=np.full((7, 1), 5.0),
    )
    exact = scheduler(p, bands="hard").step(inp)
    assert exact.status.usable, exact.message
    assert exact.extra["linearisation"].startswith("every combination of its 2")
    assert np.all(exact.y_pred[1:, 0] >= 1.0 - 1e-9), exact.y_pred[:, 0]
    linear = scheduler(p, bands="hard", switch_combinations=False).step(inp)
    assert not linear.status.usable or np.any(linear.y_pred[1:, 0] < 1.0 - 1e-6)
