"""The NMPC's solver paths, discretisations, time limits and statuses, with real solvers."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import casadi as ca
import numpy as np
import pytest
from parallelcity.controllers import nmpc

from parallelcity.decide.control import ControlInput, ControlProblem, SolveStatus
from parallelcity.scenario.definition import Scenario
from parallelcity.specs import SafetySpecs
from parallelcity.twin.model import SubsystemModel

from .test_controllers import assert_plan_consistent, assert_unusable, make_input, new_nmpc

SCENARIO = Path(__file__).parents[1] / "scenarios" / "district_heating.toml"


@pytest.fixture(scope="module")
def morning(scenario: Scenario, problem: ControlProblem, specs: SafetySpecs) -> ControlInput:
    """06:00: every band is about to step up, so the soft bands and rate limits are active."""
    m = scenario.model
    t = scenario.meta.start_epoch + 6 * 3600.0
    return make_input(problem, specs, t, m.x0, m.u0)


@pytest.fixture(scope="module")
def references(
    scenario: Scenario, problem: ControlProblem, morning: ControlInput
) -> dict[str, float]:
    """IPOPT converged to 1e-10, cold, per discretisation: the optimum to reach."""
    out = {}
    for method in ("multiple_shooting", "collocation"):
        ref = new_nmpc(
            scenario, problem, solver="ipopt", tol=1e-10, warm_start=False, method=method
        ).step(morning)
        assert ref.status is SolveStatus.SOLVED, ref.message
        out[method] = ref.cost
    return out


# the solver of a cold start and of a warm start, per path
COLD = {"sqp_fatrop": "fatrop"}
WARM = {"sqp_fatrop": "sqp"}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("solver", "method"),
    [
        ("sqp_fatrop", "multiple_shooting"),
        ("sqp_fatrop", "collocation"),
        ("fatrop", "multiple_shooting"),
        ("ipopt", "multiple_shooting"),
        ("fatrop", "collocation"),
        ("ipopt", "collocation"),
    ],
)
def test_each_path_reaches_the_tight_reference_optimum(
    scenario: Scenario,
    problem: ControlProblem,
    specs: SafetySpecs,
    morning: ControlInput,
    references: dict[str, float],
    solver: str,
    method: str,
) -> None:
    controller = new_nmpc(scenario, problem, solver=solver, method=method)
    r = controller.step(morning)
    assert r.status is SolveStatus.SOLVED, r.message
    assert r.extra["solver"] == COLD.get(solver, solver) and r.extra["second_opinion"] is False
    assert abs(r.cost - references[method]) <= 1e-6 * abs(references[method])
    assert_plan_consistent(problem, morning, r)
    assert specs.check_inputs(morning.u_prev, r.u_plan, problem.dt) == []
    # and again, warm-started, one cycle on: still the optimum of that cycle
    nxt = make_input(problem, specs, morning.t0 + problem.dt, r.x_pred[1], r.u_first)
    warm = controller.step(nxt)
    ref = new_nmpc(
        scenario, problem, solver="ipopt", tol=1e-10, warm_start=False, method=method
    ).step(nxt)
    assert warm.status is SolveStatus.SOLVED and warm.extra["warm_start"] is True
    assert warm.extra["solver"] == WARM.get(solver, solver) and warm.extra["retried"] is False
    assert abs(warm.cost - ref.cost) <= 1e-6 * abs(ref.cost)
    assert_plan_consistent(problem, nxt, warm)


def test_config_default_is_the_sqp_fatrop_path() -> None:
    config = nmpc.Config()
    assert config.solver == "sqp_fatrop" and config.qp_solver == "qrqp"


@pytest.mark.slow
def test_sqp_warm_start_after_an_interior_point_starts_on_the_active_set(
    scenario: Scenario, problem: ControlProblem, specs: SafetySpecs, morning: ControlInput
) -> None:
    """fatrop's cold solution hands over to the SQP method: its multipliers of inactive
    bounds are zeroed, so the first warm SQP takes a few iterations, not hundreds."""
    controller = new_nmpc(scenario, problem, solver="sqp_fatrop")
    r = controller.step(morning)
    assert r.extra["solver"] == "fatrop"
    last = controller._last
    assert last is not None
    active = np.count_nonzero(last["lam_x"]) + np.count_nonzero(last["lam_g"])
    equalities = int(np.sum(controller._lbg == controller._ubg))
    assert active < equalities + 0.5 * last["lam_x"].size  # many bounds are inactive
    nxt = make_input(problem, specs, morning.t0 + problem.dt, r.x_pred[1], r.u_first)
    warm = controller.step(nxt)
    assert warm.status is SolveStatus.SOLVED and warm.extra["solver"] == "sqp"
    assert warm.iterations <= 6, warm.iterations


def test_active_only_keeps_equalities_and_active_bounds() -> None:
    low = np.array([0.0, 0.0, 1.0, -np.inf, 2.0])
    high = np.array([1.0, 1.0, 1.0, 5.0, 3.0])
    value = np.array([0.0, 0.5, 1.0, 5.0, 2.5])
    lam = np.array([-2.0, 1e-9, 0.3, 4.0, -1e-8])
    kept = nmpc._active_only(lam, value, low, high)
    # lower bound active, inactive, equality, upper bound active, inactive
    np.testing.assert_array_equal(kept, [-2.0, 0.0, 0.3, 4.0, 0.0])
    # a multiplier of the wrong sign for the bound it sits on is not kept
    assert nmpc._active_only(np.array([1.0]), np.array([0.0]), np.zeros(1), np.ones(1))[0] == 0
    # nor one of a row without bounds
    free = nmpc._active_only(
        np.array([-1e-9]), np.array([3.0]), -np.full(1, np.inf), np.ones(1) * np.inf
    )
    assert free[0] == 0


# from a cold start; qrqp is for warm starts (sqp_fatrop), cold it often fails
@pytest.mark.slow
@pytest.mark.parametrize("qp_solver", ["osqp"])
def test_sqp_path_reaches_the_tight_reference_optimum(
    scenario: Scenario,
    problem: ControlProblem,
    morning: ControlInput,
    references: dict[str, float],
    qp_solver: str,
) -> None:
    r = new_nmpc(scenario, problem, solver="sqp", qp_solver=qp_solver).step(morning)
    assert r.status is SolveStatus.SOLVED, r.message
    assert r.extra["solver"] == "sqp"
    assert abs(r.cost - references["multiple_shooting"]) <= 1e-6 * references["multiple_shooting"]


def test_collocation_coefficients_integrate_polynomials_exactly() -> None:
    for scheme, exact_degree in (("radau", 2 * 3 - 2), ("legendre", 2 * 3 - 1)):
        tau, C, D = nmpc.collocation_coefficients(3, scheme)
        assert tau[0] == 0.0 and len(tau) == 4
        # x(t) = t^q on [0, 1]: the derivative matrix reproduces q t^(q-1) at the points,
        # and the end-point weights give x(1) = 1
        for q in range(4):
            x = np.array([t**q for t in tau])
            slope = C.T @ x
            want = np.array([q * t ** (q - 1) if q else 0.0 for t in tau])
            np.testing.assert_allclose(slope, want, atol=1e-10)
            assert D @ x == pytest.approx(1.0)
        assert exact_degree >= 3


@pytest.mark.slow
def test_a_hard_state_bound_that_cannot_hold_is_infeasible(
    scenario: Scenario, problem: ControlProblem, morning: ControlInput
) -> None:
    # the apartment cannot be 25 C one period from now when it is 20.5 C now
    for solver in ("ipopt", "fatrop", "sqp_fatrop"):
        r = new_nmpc(
            scenario, problem, solver=solver, state_bounds={"apartment.T_zone": (25.0, 30.0)}
        ).step(morning)
        assert r.status is SolveStatus.INFEASIBLE, (solver, r.message)
        assert_unusable(problem, r)
        if solver != "ipopt":  # fatrop cannot tell; IPOPT's second opinion can
            assert r.message == "nmpc: ipopt Infeasible_Problem_Detected", r.message


@pytest.mark.slow
def test_a_warm_start_into_an_infeasible_state_falls_back_to_the_ipopt_verdict(
    scenario: Scenario, problem: ControlProblem, specs: SafetySpecs, morning: ControlInput
) -> None:
    """sqp_fatrop: the warm SQP fails, fatrop from cold fails, IPOPT says infeasible."""
    zone = scenario.model.index("states", "apartment.T_zone")
    controller = new_nmpc(
        scenario, problem, solver="sqp_fatrop", state_bounds={"apartment.T_zone": (19.0, 30.0)}
    )
    r = controller.step(morning)
    assert r.status is SolveStatus.SOLVED, r.message
    x0 = r.x_pred[1].copy()
    x0[zone] = 14.0  # 5 K below a hard bound that must hold one period from now
    bad = controller.step(make_input(problem, specs, morning.t0 + problem.dt, x0, r.u_first))
    assert bad.status is SolveStatus.INFEASIBLE, bad.message
    assert bad.message == "nmpc: ipopt Infeasible_Problem_Detected", bad.message
    assert_unusable(problem, bad)


@pytest.mark.slow
def test_sqp_fatrop_warm_step_times_out(
    scenario: Scenario, problem: ControlProblem, specs: SafetySpecs, morning: ControlInput
) -> None:
    controller = new_nmpc(scenario, problem, solver="sqp_fatrop")
    r = controller.step(morning)
    assert r.status is SolveStatus.SOLVED
    x0 = r.x_pred[1].copy()
    x0[: len(problem.banded_outputs)] -= 3.0  # a surprise: several SQP iterations
    t1 = morning.t0 + problem.dt
    late = controller.step(make_input(problem, specs, t1, x0, r.u_first, deadline_s=3e-4))
    assert late.status is SolveStatus.TIMEOUT, late.message
    assert_unusable(problem, late)
    again = controller.step(make_input(problem, specs, t1, x0, r.u_first))
    assert again.status is SolveStatus.SOLVED, again.message


@pytest.mark.slow
def test_a_disturbance_outside_the_forecast_stays_feasible(
    scenario: Scenario, problem: ControlProblem, specs: SafetySpecs, morning: ControlInput
) -> None:
    """Soft bands: a zone already 6 K below its band is a cost, not an infeasible problem."""
    x0 = morning.x0.copy()
    x0[: len(problem.banded_outputs)] -= 6.0
    inp = make_input(problem, specs, morning.t0, x0, morning.u_prev)
    r = new_nmpc(scenario, problem).step(inp)
    assert r.status is SolveStatus.SOLVED, r.message
    assert specs.check_inputs(inp.u_prev, r.u_plan, problem.dt) == []


@pytest.mark.slow
def test_fatrop_converts_the_deadline_into_an_iteration_cap(
    scenario: Scenario, problem: ControlProblem, morning: ControlInput, specs: SafetySpecs
) -> None:
    controller = new_nmpc(scenario, problem, solver="fatrop", warm_start=False)
    first = controller.step(morning)  # measures fatrop's time per iteration
    assert first.status is SolveStatus.SOLVED and first.iterations > 6
    per_iter = controller._s_per_iter
    assert per_iter > 0
    # room for two or three iterations of a cold solve that needs many more
    inp = make_input(
        problem, specs, morning.t0, morning.x0, morning.u_prev, deadline_s=2.5 * per_iter
    )
    r = controller.step(inp)
    assert r.status is SolveStatus.TIMEOUT, r.message
    assert_unusable(problem, r)
    assert r.iterations <= 3
    tiny = controller.step(
        make_input(problem, specs, morning.t0, morning.x0, morning.u_prev, deadline_s=1e-7)
    )
    assert tiny.status is SolveStatus.TIMEOUT
    assert controller.step(morning).status is SolveStatus.SOLVED


@pytest.mark.slow
def test_sqp_stops_at_the_deadline(
    scenario: Scenario, problem: ControlProblem, morning: ControlInput, specs: SafetySpecs
) -> None:
    controller = new_nmpc(scenario, problem, solver="sqp", qp_solver="osqp", warm_start=False)
    inp = make_input(problem, specs, morning.t0, morning.x0, morning.u_prev, deadline_s=2e-3)
    r = controller.step(inp)
    assert r.status is SolveStatus.TIMEOUT, r.message
    assert_unusable(problem, r)


# ------------------------------------------------------------- compiled C, on a small model


def pendulum() -> SubsystemModel:
    """A damped pendulum driven by a torque: small enough to compile in about a second."""
    x, u, d, p = ca.SX.sym("x", 2), ca.SX.sym("u", 1), ca.SX.sym("d", 0), ca.SX.sym("p", 1)
    xdot = ca.vertcat(x[1], -p[0] * ca.sin(x[0]) - 0.2 * x[1] + u[0])
    f = ca.Function("f", [x, u, d, p], [xdot], ["x", "u", "d", "p"], ["xdot"])
    h = ca.Function("h", [x, u, d, p], [ca.vertcat(x, u[0] ** 2)], ["x", "u", "d", "p"], ["y"])
    return SubsystemModel(
        name="pendulum",
        states=("angle", "rate"),
        inputs=("torque",),
        disturbances=(),
        outputs=("angle", "rate", "effort"),
        parameters=("g_over_l",),
        nominal=np.array([9.81]),
        f=f,
        h=h,
        forecast=lambda t0, n, dt: np.zeros((n, 0)),
        x0=np.array([1.0, 0.0]),
        u0=np.array([0.0]),
    )


def pendulum_problem() -> tuple[ControlProblem, ControlInput]:
    n = 8
    problem = ControlProblem(
        model=pendulum(),
        dt=0.1,
        horizon=n,
        u_min=np.array([-2.0]),
        u_max=np.array([2.0]),
        du_max=np.array([1.0]),
        banded_outputs=(0,),
    )
    inp = ControlInput(
        t0=0.0,
        x0=np.array([1.0, 0.0]),
        u_prev=np.array([0.0]),
        disturbances=np.zeros((n, 0)),
        y_low=np.full((n + 1, 1), -0.8),
        y_high=np.full((n + 1, 1), 0.8),
    )
    return problem, inp


def pendulum_config(**changes: object) -> nmpc.Config:
    config = nmpc.Config(
        tracking={"angle": nmpc.Tracking(target=0.0, weight=10.0, terminal_weight=50.0)},
        output_costs={"effort": 3600.0 / 0.1},  # one unit per unit of effort per step
        move_weights={"torque": 0.1},
        comfort_weight=100.0,
        comfort_weight_l1=10.0,
        scales={"rate": 2.0},
    )
    return config.model_copy(update=changes)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None, reason="no C compiler")
@pytest.mark.parametrize("solver", ["fatrop", "ipopt", "sqp_fatrop"])
def test_compiled_nlp_gives_the_same_plan_and_is_cached_on_disk(
    tmp_path: Path, solver: str
) -> None:
    problem, inp = pendulum_problem()
    plain = nmpc.NmpcController(pendulum_config(solver=solver))
    plain.setup(problem)
    compiled = nmpc.NmpcController(
        pendulum_config(solver=solver, compile=True, cache_dir=str(tmp_path))
    )
    compiled.setup(problem)
    libraries = sorted(tmp_path.glob("*.so"))
    assert len(libraries) == (2 if solver == "sqp_fatrop" else 1)  # one per plugin
    r_plain, r_comp = plain.step(inp), compiled.step(inp)
    assert r_plain.status is SolveStatus.SOLVED and r_comp.status is SolveStatus.SOLVED
    np.testing.assert_allclose(r_comp.u_plan, r_plain.u_plan, atol=1e-8)
    assert r_comp.cost == pytest.approx(r_plain.cost, rel=1e-9)
    if solver == "sqp_fatrop":  # and the warm SQP on compiled C, one period on
        nxt = ControlInput(
            t0=inp.t0 + problem.dt,
            x0=r_plain.x_pred[1],
            u_prev=r_plain.u_first,
            disturbances=inp.disturbances,
            y_low=inp.y_low,
            y_high=inp.y_high,
        )
        w_plain, w_comp = plain.step(nxt), compiled.step(nxt)
        assert w_plain.extra["solver"] == w_comp.extra["solver"] == "sqp"
        np.testing.assert_allclose(w_comp.u_plan, w_plain.u_plan, atol=1e-8)
    # a second controller for the same problem loads the cached library, compiles nothing
    stamp = libraries[0].stat().st_mtime_ns
    again = nmpc.NmpcController(
        pendulum_config(solver=solver, compile=True, cache_dir=str(tmp_path))
    )
    again.setup(problem)
    assert sorted(tmp_path.glob("*.so")) == libraries
    assert libraries[0].stat().st_mtime_ns == stamp
    assert again.step(inp).cost == pytest.approx(r_comp.cost, rel=1e-9)


def test_a_problem_without_bands_solves_cold_and_warm() -> None:
    problem, inp = pendulum_problem()
    problem = ControlProblem(
        model=problem.model,
        dt=problem.dt,
        horizon=problem.horizon,
        u_min=problem.u_min,
        u_max=problem.u_max,
        du_max=problem.du_max,
        banded_outputs=(),
    )
    inp = ControlInput(
        t0=inp.t0,
        x0=inp.x0,
        u_prev=inp.u_prev,
        disturbances=inp.disturbances,
        y_low=np.zeros((problem.horizon + 1, 0)),
        y_high=np.zeros((problem.horizon + 1, 0)),
    )
    controller = nmpc.NmpcController(pendulum_config())
    controller.setup(problem)
    first = controller.step(inp)
    assert first.status is SolveStatus.SOLVED, first.message
    assert_plan_consistent(problem, inp, first)
    nxt = ControlInput(
        t0=inp.t0 + problem.dt,
        x0=first.x_pred[1],
        u_prev=first.u_first,
        disturbances=inp.disturbances,
        y_low=inp.y_low,
        y_high=inp.y_high,
    )
    warm = controller.step(nxt)
    assert warm.status is SolveStatus.SOLVED and warm.extra["solver"] == "sqp", warm.message
    assert_plan_consistent(problem, nxt, warm)


def test_tracking_l1_slack_and_scaling_are_what_the_cost_says(tmp_path: Path) -> None:
    """The optimal cost is the objective of the plan, recomputed here from its definition."""
    problem, inp = pendulum_problem()
    config = pendulum_config(solver="ipopt", tol=1e-10)
    controller = nmpc.NmpcController(config)
    controller.setup(problem)
    r = controller.step(inp)
    assert r.status is SolveStatus.SOLVED
    ys = r.y_pred  # the RK4 prediction is the multiple-shooting model itself
    angle, effort = ys[:, 0], ys[:, 2]
    n, dt = problem.horizon, problem.dt
    slack = np.maximum(0.0, np.maximum(inp.y_low[:, 0] - angle, angle - inp.y_high[:, 0]))
    moves = np.diff(np.concatenate([inp.u_prev, r.u_plan[:, 0]]))
    cost = (
        10.0 * np.sum(angle[:n] ** 2)
        + 50.0 * angle[n] ** 2
        + np.sum(effort[:n]) * 3600.0 / 0.1 * dt / 3600.0
        + 0.1 * np.sum(moves**2)
        + 100.0 * np.sum(slack**2)
        + 10.0 * np.sum(slack)
    )
    assert r.cost == pytest.approx(cost, rel=1e-6, abs=1e-7)
    assert math.isfinite(r.cost) and np.all(np.abs(moves) <= 1.0 + 1e-6)
