"""Pump scheduling MILP (Pyomo + HiGHS) built from the model: known optima, switching
limits, bands, every status as a value, warm starts, with the real solver."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from parallelcity.controllers import milp

from benchmarks.milp_cycle import HEAD_A, HEAD_B, two_tanks
from parallelcity import plugins
from parallelcity.decide.control import ControlInput, ControlProblem, SolveStatus
from parallelcity.models import pump_tank
from parallelcity.twin.model import ModelForm, SubsystemModel


def tank(area: float, flow: float, kw: float, step_s: float, level0: float = 2.0) -> SubsystemModel:
    return pump_tank.build(
        pump_tank.Config(
            step_s=step_s,
            tank=pump_tank.Tank(area_m2=area, initial_level_m=level0),
            pump=pump_tank.Pump(flow_m3_per_h=flow, power_kw=kw),
        )
    )


def problem_of(model: SubsystemModel, dt: float, n: int, banded: tuple[int, ...]) -> ControlProblem:
    return ControlProblem(
        model=model,
        dt=dt,
        horizon=n,
        u_min=np.zeros(model.nu),
        u_max=np.ones(model.nu),
        du_max=np.full(model.nu, np.inf),
        banded_outputs=banded,
    )


def moved(inp: ControlInput, **changes: object) -> ControlInput:
    fields = {k: getattr(inp, k) for k in ControlInput.__dataclass_fields__}
    return ControlInput(**{**fields, **changes})  # type: ignore[arg-type]


def small(
    n: int = 8, level0: float = 2.0, lo: float = 1.0, hi: float = 3.0
) -> tuple[ControlProblem, ControlInput, np.ndarray]:
    """Hourly periods; the pump adds 2 m3/h net of a 1 m/h draw on a 10 m2 tank."""
    problem = problem_of(tank(10.0, 20.0, 10.0, 3600.0, level0), 3600.0, n, (0,))
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
    r = scheduler(problem, bands="hard").step(inp)
    assert r.status is SolveStatus.SOLVED and r.extra["milp_status"] == "optimal"
    assert r.extra["linearisation"] == "affine"
    assert r.cost == pytest.approx(4 * 0.1 * 10.0, abs=1e-9)
    np.testing.assert_array_equal(r.u_plan[:, 0], [0, 1, 0, 1, 1, 0, 0, 1])


@pytest.mark.parametrize(("min_up", "min_down"), [(1, 1), (2, 1), (3, 2), (2, 3)])
def test_objective_equals_the_brute_force_optimum(min_up: int, min_down: int) -> None:
    n = 12
    problem, inp, price = small(n=n, lo=0.0, hi=5.0)
    r = scheduler(problem, min_up=min_up, min_down=min_down, bands="hard").step(inp)
    best = brute_force(n, price, min_up, min_down, 2.0, 0.0, 5.0)
    assert r.status is SolveStatus.SOLVED, r.message
    assert r.cost == pytest.approx(best, abs=1e-9)
    # the plan keeps the level in its band on the model's own simulation
    assert np.all(r.y_pred[:, 0] >= -1e-9) and np.all(r.y_pred[:, 0] <= 5.0 + 1e-9)
    on = r.u_plan[:, 0].astype(int).tolist()
    runs = [(v, len(list(g))) for v, g in itertools.groupby(on)]
    for i, (v, length) in enumerate(runs[:-1]):
        assert length >= (min_up if v else (min_down if i else 1)), runs


def day_instance() -> tuple[ControlProblem, ControlInput]:
    """A day in quarter hours with random tariffs: hard enough to need branching."""
    n = 96
    problem = problem_of(tank(40.0, 60.0, 30.0, 900.0), 900.0, n, (0,))
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


def test_a_time_limit_of_almost_nothing_is_a_value_never_an_exception() -> None:
    problem, inp = day_instance()
    r = scheduler(problem, min_up=4, min_down=4, time_limit_s=1e-3).step(inp)
    assert r.extra["milp_status"] in ("timeout", "feasible_gap")
    if r.status is SolveStatus.TIMEOUT:
        assert np.all(np.isnan(r.u_plan))
    else:
        assert r.status is SolveStatus.ACCEPTABLE and np.all(np.isfinite(r.u_plan))
    # a deadline already passed limits the solver the same way
    late = scheduler(problem, min_up=4, min_down=4).step(moved(inp, deadline_s=1e-9))
    assert late.status is SolveStatus.TIMEOUT and late.extra["milp_status"] == "timeout"


def test_a_warm_start_is_a_plan_at_once_when_the_time_is_too_short_to_search() -> None:
    problem, inp = day_instance()
    s = scheduler(problem, min_up=4, min_down=4, mip_rel_gap=0.05)
    first = s.step(inp)
    assert first.status.usable, first.message
    s.config = s.config.model_copy(update={"time_limit_s": 1e-3})
    nxt = moved(inp, t0=900.0, x0=first.x_pred[1], u_prev=first.u_first)
    nxt = moved(nxt, disturbances=np.roll(inp.disturbances, -1, axis=0))
    r = s.step(nxt)
    assert r.extra["warm_start"] and r.extra["warm_start_accepted"]
    assert r.status.usable and r.extra["milp_status"] in ("feasible_gap", "optimal"), r.message
    # no time to search: the plan is the previous one, one period on
    np.testing.assert_array_equal(r.u_plan[:-1], first.u_plan[1:])


def test_a_loose_gap_is_reported_as_feasible_with_gap() -> None:
    problem, inp = day_instance()
    r = scheduler(problem, min_up=4, min_down=4, mip_rel_gap=0.2, bands="hard").step(inp)
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
        dist = np.column_stack([np.zeros(8), np.full(8, 0.5)])  # no draw, all dear
        return moved(inp, t0=k * 3600.0, u_prev=np.array([on]), disturbances=dist)

    r = s.step(cycle(1, 1.0))  # the pump has run one period: two more to go
    np.testing.assert_array_equal(r.u_plan[:, 0], [1, 1, 0, 0, 0, 0, 0, 0])
    r = s.step(cycle(2, 1.0))  # two periods: one more
    np.testing.assert_array_equal(r.u_plan[:, 0], [1, 0, 0, 0, 0, 0, 0, 0])
    r = s.step(cycle(3, 1.0))  # three: free to stop
    np.testing.assert_array_equal(r.u_plan[:, 0], np.zeros(8))


def test_rebuilding_and_cold_starts_give_the_same_schedule_as_reuse_and_warm_starts() -> None:
    problem, inp = day_instance()
    n = 24
    problem = problem_of(problem.model, 900.0, n, (0,))
    variants = {
        "warm": scheduler(problem, min_up=2, mip_rel_gap=0.0),
        "cold": scheduler(problem, min_up=2, mip_rel_gap=0.0, warm_start=False),
        "rebuild": scheduler(problem, min_up=2, mip_rel_gap=0.0, reuse=False),
    }
    x0, u = inp.x0, inp.u_prev
    accepted = []
    for k in range(4):  # rolling, with changing prices
        step = moved(
            inp,
            t0=k * 900.0,
            x0=x0,
            u_prev=u,
            disturbances=inp.disturbances[k : k + n],
            y_low=inp.y_low[: n + 1],
            y_high=inp.y_high[: n + 1],
        )
        res = {name: s.step(step) for name, s in variants.items()}
        assert all(r.status is SolveStatus.SOLVED for r in res.values()), res
        costs = [r.cost for r in res.values()]
        assert max(costs) - min(costs) <= 1e-6 * max(1.0, abs(costs[0]))
        assert res["warm"].extra["warm_start"] is (k > 0)
        assert res["cold"].extra["warm_start"] is False
        accepted.append(res["warm"].extra["warm_start_accepted"])
        x0, u = res["warm"].x_pred[1], res["warm"].u_first
    assert accepted[0] is None and all(accepted[1:]), accepted


# ------------------------------------------------ a two-tank, two-pump network model
# (benchmarks/milp_cycle.py's: a linear balance, a node pressure a + b * level of t1)


def two_tank_case(
    n: int = 16, lo: float = 1.0, p_min: float = 7.2, t0: float = 0.0, **model: bool
) -> tuple[ControlProblem, ControlInput]:
    """Quarter hours from ``t0``; bands on both levels and the node's minimum pressure."""
    m = two_tanks(**model)
    problem = problem_of(m, 900.0, n, (0, 1, 2))
    low = np.tile([lo, lo, p_min], (n + 1, 1))
    high = np.tile([4.0, 4.0, np.inf], (n + 1, 1))
    inp = ControlInput(
        t0=t0,
        x0=m.x0,
        u_prev=np.zeros(2),
        disturbances=m.forecast(t0, n, 900.0),
        y_low=low,
        y_high=high,
    )
    return problem, inp


def starts(on: np.ndarray, before: float = 0.0) -> np.ndarray:
    return np.diff(np.concatenate([[before], on])) > 0.5


def test_two_pumps_respect_run_rest_and_starts_per_hour_in_the_plan() -> None:
    problem, inp = two_tank_case(n=24)
    r = scheduler(problem, min_up=3, min_down=2, max_starts_per_hour=1, start_cost=0.01).step(inp)
    assert r.status is SolveStatus.SOLVED, r.message
    assert set(np.unique(r.u_plan)) <= {0.0, 1.0}
    for i in range(2):
        on = r.u_plan[:, i].astype(int)
        runs = [(v, len(list(g))) for v, g in itertools.groupby(on.tolist())]
        for j, (v, length) in enumerate(runs[:-1]):
            if v:
                assert length >= 3, (i, runs)
            elif j:
                assert length >= 2, (i, runs)
        s = starts(on)
        assert all(s[k : k + 4].sum() <= 1 for k in range(len(s))), (i, on)  # 4 x 15 min
    # levels and the minimum pressure hold on the model's own simulation
    assert np.all(r.y_pred[1:, :2] >= 1.0 - 1e-6) and np.all(r.y_pred[1:, :2] <= 4.0 + 1e-6)
    assert np.all(r.y_pred[1:, 2] >= 7.2 - 1e-6)
    assert r.extra["band_slack"] == 0.0


def test_starts_per_hour_count_the_starts_of_earlier_cycles() -> None:
    problem, inp = two_tank_case(n=8)
    s = scheduler(problem, max_starts_per_hour=1, min_up=1, min_down=1)
    s.step(moved(inp, u_prev=np.zeros(2)))
    # pump 1 started in the period that just ended: no second start within the hour
    r = s.step(moved(inp, t0=900.0, u_prev=np.array([1.0, 0.0])))
    assert r.status.usable, r.message
    on = r.u_plan[:, 0]
    first_start = np.flatnonzero(starts(on, before=1.0))
    assert first_start.size == 0 or first_start[0] >= 3, on


def test_the_end_volume_holds_with_terminal_slack() -> None:
    # a morning at day prices: without the end constraint the tanks are run down
    problem, inp = two_tank_case(n=16, t0=7 * 3600.0)
    free = scheduler(problem).step(inp)
    held = scheduler(problem, terminal_slack_m=0.1).step(inp)
    assert free.status.usable and held.status.usable, (free.message, held.message)
    assert np.any(free.x_pred[-1] < inp.x0 - 0.1 - 1e-6), free.x_pred[-1]
    assert np.all(held.x_pred[-1] >= inp.x0 - 0.1 - 1e-6), held.x_pred[-1]
    assert held.cost > free.cost
    assert free.extra["band_slack"] == held.extra["band_slack"] == 0.0
    assert held.extra["terminal_slack"] == 0.0


def test_soft_bands_report_the_violation_and_hard_bands_are_infeasible() -> None:
    # a minimum pressure that needs t1 at 4.5 m, above its own 4 m limit: no pump holds it
    problem, inp = two_tank_case(n=8, p_min=14.0)
    soft = scheduler(problem).step(inp)
    assert soft.status is SolveStatus.SOLVED, soft.message
    # the pumps lift t1 as far as pays: past its own limit, so both bands give
    assert 14.0 - (HEAD_A + HEAD_B * 4.0) < soft.extra["band_slack"] < 14.0 - HEAD_A - HEAD_B * 2
    assert np.all(np.isfinite(soft.u_plan))
    hard = scheduler(problem, bands="hard").step(inp)
    assert hard.status is SolveStatus.INFEASIBLE and hard.extra["milp_status"] == "infeasible"
    assert np.all(np.isnan(hard.u_plan))


def test_a_model_that_is_not_affine_is_re_linearised_every_step() -> None:
    problem, inp = two_tank_case(n=8, square=True)
    s = scheduler(problem)
    r = s.step(inp)
    assert r.status.usable, r.message
    assert r.extra["linearisation"].startswith("every combination of its 2 on/off inputs")
    r = scheduler(problem, switch_combinations=False).step(inp)
    assert r.status.usable, r.message
    assert r.extra["linearisation"].startswith("re-linearised every step")
    assert milp.KIND.check(milp.Config(require_affine=True), problem)[0].startswith(
        "require_affine: model 'two_tanks' is not affine"
    )


def test_check_names_each_problem_by_its_key() -> None:
    problem, _ = two_tank_case(n=4)
    assert milp.KIND.check(milp.Config(), problem) == []
    lines = milp.KIND.check(
        milp.Config(binary=["p1.on", "p9.on"], terminal_slack_m=0.1, terminal_states=["t3"]),
        problem,
    )
    assert lines[0].startswith("binary[1]: 'p9.on' is not an input of model 'two_tanks'")
    assert lines[1].startswith("terminal_states[0]: 't3' is not a state")
    assert milp.KIND.check(milp.Config(output_costs={"gas": 1.0}), problem)[0].startswith(
        "output_costs['gas']"
    )
    continuous = two_tanks()
    ode = SubsystemModel(
        **{
            **{k: getattr(continuous, k) for k in SubsystemModel.__dataclass_fields__},
            "form": ModelForm.CONTINUOUS,
        }
    )
    (line,) = milp.KIND.check(milp.Config(), problem_of(ode, 900.0, 4, (0,)))
    assert line.startswith("kind: 'milp_pump' schedules a discrete-time model")
