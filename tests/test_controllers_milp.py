"""Pump scheduling MILP (Pyomo + HiGHS): known optima and every status, with the real solver."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from parallelcity.controllers import milp

from parallelcity import plugins
from parallelcity.decide.control import ControlInput, ControlProblem, SolveStatus


def small(
    n: int = 8, level0: float = 2.0, lo: float = 1.0, hi: float = 3.0
) -> tuple[ControlProblem, ControlInput, np.ndarray]:
    """Hourly periods; the pump adds 2 m3/h net of a 1 m/h draw on a 10 m2 tank."""
    model = milp.tank_model(area_m2=10.0, pump_m3_per_h=20.0, pump_kw=10.0, level0_m=level0)
    problem = ControlProblem(
        model=model,
        dt=3600.0,
        horizon=n,
        u_min=np.array([0.0]),
        u_max=np.array([1.0]),
        du_max=np.array([np.inf]),
        banded_outputs=(0,),
    )
    price = np.array([0.3, 0.1, 0.3, 0.1, 0.1, 0.3, 0.3, 0.1, 0.2, 0.1, 0.3, 0.2])[:n]
    dist = np.column_stack([np.full(n, 10.0), price])
    inp = ControlInput(
        t0=0.0,
        x0=np.array([level0]),
        u_prev=np.array([0.0]),
        disturbances=dist,
        y_low=np.full((n + 1, 1), lo),
        y_high=np.full((n + 1, 1), hi),
    )
    return problem, inp, price


def brute_force(
    n: int, price: np.ndarray, min_up: int, min_down: int, level0: float, lo: float, hi: float
) -> float:
    """Every on/off sequence, checked against the rules directly: the known optimum."""
    best = np.inf
    for on in itertools.product((0, 1), repeat=n):
        level = level0
        ok = True
        for k in range(n):
            level += (20.0 * on[k] - 10.0) / 10.0
            ok = ok and lo - 1e-9 <= level <= hi + 1e-9
        runs = [(v, len(list(g))) for v, g in itertools.groupby(on)]
        for i, (v, length) in enumerate(runs):
            last = i == len(runs) - 1
            if v == 1 and length < min_up and not last:
                ok = False
            # a rest before the first start is the pump's past: unconstrained (it was off
            # before the horizon for long enough)
            if v == 0 and length < min_down and i > 0 and not last:
                ok = False
        if ok:
            best = min(best, sum(price[k] * 10.0 * on[k] for k in range(n)))
    return float(best)


def scheduler(problem: ControlProblem, **config: object) -> milp.PumpScheduler:
    s = milp.KIND.create(milp.Config(**config))  # type: ignore[arg-type]
    s.setup(problem)
    return s


def test_entry_point_resolves() -> None:
    assert plugins.controller_kind("milp_pump") is milp.KIND


def test_a_hand_checked_optimum() -> None:
    # level 2 in [1, 3], one metre down per hour off, one up per hour on: the pump must run
    # 4 of the 8 hours and the 4 cheap hours (0.1) are reachable without leaving the band
    problem, inp, _ = small()
    r = scheduler(problem).step(inp)
    assert r.status is SolveStatus.SOLVED and r.extra["milp_status"] == "optimal"
    assert r.cost == pytest.approx(4 * 0.1 * 10.0, abs=1e-9)
    np.testing.assert_array_equal(r.u_plan[:, 0], [0, 1, 0, 1, 1, 0, 0, 1])


@pytest.mark.parametrize(("min_up", "min_down"), [(1, 1), (2, 1), (3, 2), (2, 3)])
def test_objective_equals_the_brute_force_optimum(min_up: int, min_down: int) -> None:
    n = 12
    problem, inp, price = small(n=n, lo=0.0, hi=5.0)
    r = scheduler(problem, min_up=min_up, min_down=min_down).step(inp)
    best = brute_force(n, price, min_up, min_down, 2.0, 0.0, 5.0)
    assert r.status is SolveStatus.SOLVED, r.message
    assert r.cost == pytest.approx(best, abs=1e-9)
    # the plan keeps the level in its band on the model's own simulation
    assert np.all(r.y_pred[:, 0] >= -1e-9) and np.all(r.y_pred[:, 0] <= 5.0 + 1e-9)
    on = r.u_plan[:, 0].astype(int).tolist()
    runs = [(v, len(list(g))) for v, g in itertools.groupby(on)]
    for i, (v, length) in enumerate(runs[:-1]):
        assert length >= (min_up if v else (min_down if i else 1)), runs


def test_an_impossible_band_is_infeasible() -> None:
    problem, inp, _ = small(lo=2.5)  # the level is 2 now and must be >= 2.5 in one hour
    inp = ControlInput(
        t0=inp.t0,
        x0=inp.x0,
        u_prev=inp.u_prev,
        disturbances=inp.disturbances * np.array([3.0, 1.0]),  # a draw the pump cannot meet
        y_low=inp.y_low,
        y_high=inp.y_high,
    )
    r = scheduler(problem).step(inp)
    assert r.status is SolveStatus.INFEASIBLE and r.extra["milp_status"] == "infeasible"
    assert np.all(np.isnan(r.u_plan))


def day_instance() -> tuple[ControlProblem, ControlInput]:
    """A day in quarter hours with random tariffs: hard enough to need branching."""
    n = 96
    model = milp.tank_model(area_m2=40.0, pump_m3_per_h=60.0, pump_kw=30.0)
    problem = ControlProblem(
        model=model,
        dt=900.0,
        horizon=n,
        u_min=np.array([0.0]),
        u_max=np.array([1.0]),
        du_max=np.array([np.inf]),
        banded_outputs=(0,),
    )
    rng = np.random.default_rng(0)
    dist = np.column_stack([20.0 + 30.0 * rng.random(n), 0.1 + 0.3 * rng.random(n)])
    inp = ControlInput(
        t0=0.0,
        x0=np.array([2.0]),
        u_prev=np.array([0.0]),
        disturbances=dist,
        y_low=np.full((n + 1, 1), 0.5),
        y_high=np.full((n + 1, 1), 4.0),
    )
    return problem, inp


def test_a_time_limit_without_a_plan_is_a_timeout() -> None:
    problem, inp = day_instance()
    r = scheduler(problem, min_up=4, min_down=4, time_limit_s=1e-3).step(inp)
    assert r.status is SolveStatus.TIMEOUT and r.extra["milp_status"] == "timeout"
    assert np.all(np.isnan(r.u_plan))
    # the cycle's deadline limits the solver the same way
    tight = ControlInput(
        t0=inp.t0,
        x0=inp.x0,
        u_prev=inp.u_prev,
        disturbances=inp.disturbances,
        y_low=inp.y_low,
        y_high=inp.y_high,
        deadline_s=1e-9,
    )
    assert scheduler(problem, min_up=4, min_down=4).step(tight).status is SolveStatus.TIMEOUT


def test_a_loose_gap_is_reported_as_feasible_with_gap() -> None:
    problem, inp = day_instance()
    r = scheduler(problem, min_up=4, min_down=4, mip_rel_gap=0.2).step(inp)
    assert r.status is SolveStatus.ACCEPTABLE and r.extra["milp_status"] == "feasible_gap"
    assert milp.OPTIMAL_GAP < r.extra["gap"] <= 0.2
    assert r.extra["bound"] <= r.cost
    assert np.all(r.y_pred[:, 0] >= 0.5 - 1e-9) and np.all(r.y_pred[:, 0] <= 4.0 + 1e-9)


def test_minimum_up_time_carries_over_between_cycles() -> None:
    """A pump started in the last period must keep running, even through expensive hours."""
    problem, inp, _ = small(lo=0.5, hi=10.0)
    s = scheduler(problem, min_up=3)
    first = s.step(inp)
    assert first.status is SolveStatus.SOLVED

    def cycle(k: int, on: float) -> ControlInput:
        return ControlInput(
            t0=k * 3600.0,
            x0=np.array([2.0]),
            u_prev=np.array([on]),
            disturbances=np.column_stack([np.zeros(8), np.full(8, 0.5)]),  # no draw, all dear
            y_low=inp.y_low,
            y_high=inp.y_high,
        )

    r = s.step(cycle(1, 1.0))  # the pump has run one period: two more to go
    np.testing.assert_array_equal(r.u_plan[:, 0], [1, 1, 0, 0, 0, 0, 0, 0])
    r = s.step(cycle(2, 1.0))  # two periods: one more
    np.testing.assert_array_equal(r.u_plan[:, 0], [1, 0, 0, 0, 0, 0, 0, 0])
    r = s.step(cycle(3, 1.0))  # three: free to stop
    np.testing.assert_array_equal(r.u_plan[:, 0], np.zeros(8))


def test_rebuilding_gives_the_same_schedule_as_reuse() -> None:
    problem, inp, _ = small(n=12, lo=0.5, hi=3.5)
    a = scheduler(problem, min_up=2, reuse=True)
    b = scheduler(problem, min_up=2, reuse=False)
    for k in range(3):  # rolling, with changing prices
        step = ControlInput(
            t0=k * 3600.0,
            x0=inp.x0,
            u_prev=inp.u_prev,
            disturbances=np.roll(inp.disturbances, -k, axis=0),
            y_low=inp.y_low,
            y_high=inp.y_high,
        )
        ra, rb = a.step(step), b.step(step)
        assert ra.status is SolveStatus.SOLVED and rb.status is SolveStatus.SOLVED
        assert ra.cost == pytest.approx(rb.cost, abs=1e-9)
