"""The ``linear_mpc`` kind on the district-heating scenario, with the real QP solvers and the
hil simulated plant (no mocks)."""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pytest
from parallelcity.controllers import linear_mpc_kind as lk
from parallelcity.controllers import nmpc
from parallelcity.hil.simulated import KIND as SIMULATED
from pydantic import ValidationError

from parallelcity import plugins
from parallelcity.decide.control import ControlInput, ControlProblem, SolveStatus
from parallelcity.errors import ScenarioError
from parallelcity.scenario.definition import Scenario, parse_scenario
from parallelcity.specs import SafetySpecs
from parallelcity.verify.campaign import run_campaign

from .conftest import lab_text
from .test_controllers import assert_plan_consistent, assert_unusable, make_input
from .test_controllers_nmpc import pendulum_config, pendulum_problem

# the shipped NMPC's economics, as a linear_mpc table
LINEAR_TABLE = """[controller]
kind = "linear_mpc"
output_costs = { "plant.fuel_kw" = 0.08, "plant.pump_kw" = 0.25 }
comfort_weight = 50.0
move_weights = { "plant.T_supply_set" = 0.01, {flows} }
band_tightening_k = 0.3
{extra}
"""


def with_controller(extra: str = "") -> str:
    """The lab scenario with its [controller] table replaced by a linear_mpc one."""
    text = lab_text()
    table = LINEAR_TABLE
    for line in extra.splitlines():  # a key set in ``extra`` replaces the table's own
        key = line.split("=")[0].strip()
        table = re.sub(rf"^{re.escape(key)} = .*\n", "", table, flags=re.M)
    flows = ", ".join(f'"{z}.m_flow" = 1.0' for z in ("apartment", "office", "school"))
    table = table.replace("{extra}", extra).replace("{flows}", flows)
    new, count = re.subn(r"\[controller\]\n.*?(?=\n\[fallback\])", table, text, flags=re.S)
    assert count == 1
    return new


@pytest.fixture(scope="module")
def lin_scenario() -> Scenario:
    return parse_scenario(with_controller(), "linear.toml")


def new_linear(scenario: Scenario, problem: ControlProblem, **changes: object):
    config = scenario.controller_config.model_copy(update=changes)
    controller = lk.KIND.create(config)
    controller.setup(problem)
    return controller


def start_input(scenario: Scenario, problem: ControlProblem, specs: SafetySpecs, **kw: object):
    m = scenario.model
    return make_input(problem, specs, scenario.meta.start_epoch, m.x0, m.u0, **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- loading and configs


def test_the_kind_loads_from_a_scenario_through_the_entry_point(
    lin_scenario: Scenario, problem: ControlProblem, specs: SafetySpecs
) -> None:
    assert plugins.controller_kind("linear_mpc") is lk.KIND
    cfg = lin_scenario.controller_config
    assert isinstance(cfg, lk.Config)
    assert cfg.output_costs["plant.fuel_kw"] == 0.08 and cfg.band_tightening_k == 0.3
    assert cfg.solver == "daqp" and cfg.linearisation == "trajectory"
    # the runner builds a default config when the kind is picked on the command line
    lk.Config()
    lk.Config(kind="whatever-the-loader-passes")
    controller = new_linear(lin_scenario, problem)
    inp = start_input(lin_scenario, problem, specs)
    r = controller.step(inp)
    assert r.status is SolveStatus.SOLVED, r.message
    assert_plan_consistent(problem, inp, r)  # predictions: the nonlinear model's simulation
    assert np.all(r.u_plan >= problem.u_min - 1e-9) and np.all(r.u_plan <= problem.u_max + 1e-9)
    moves = np.abs(np.diff(np.vstack([inp.u_prev, r.u_plan]), axis=0))
    assert np.all(moves <= problem.du_max + 1e-6)
    assert r.extra["qp_solver"] in ("daqp", "none") and r.extra["qp_rounds"] == 1
    assert math.isfinite(r.cost) and r.iterations >= 0


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ("no_such_key = 1", "controller.no_such_key"),
        ("comfort_weight = -1.0", "controller.comfort_weight"),
        ('solver = "gurobi"', "controller.solver"),
        ('linearisation = "secant"', "controller.linearisation"),
        ("sqp_iterations = 0", "controller.sqp_iterations"),
        ("regularisation = 0.0", "controller.regularisation"),
        ('linearisation = "point"\nsqp_iterations = 3', "needs linearisation"),
        ('tracking = { "office.T_zone" = { weight = 1.0 } }', "target"),
    ],
)
def test_invalid_configs_are_refused_at_load_with_the_key_path(extra: str, needle: str) -> None:
    with pytest.raises(ScenarioError) as err:
        parse_scenario(with_controller(extra), "bad.toml")
    assert needle in str(err.value), str(err.value)


def test_non_finite_and_negative_weights_are_refused() -> None:
    with pytest.raises(ValidationError, match="finite"):
        lk.Config(move_weights={"office.m_flow": math.inf})
    with pytest.raises(ValidationError, match=">= 0"):
        lk.Config(move_weights={"office.m_flow": -1.0})
    with pytest.raises(ValidationError, match="finite"):
        lk.Config(output_costs={"plant.fuel_kw": math.nan})


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"output_costs": {"plant.no_such_kw": 1.0}}, "'plant.no_such_kw'"),
        ({"move_weights": {"plant.no_such_set": 1.0}}, "'plant.no_such_set'"),
        ({"tracking": {"nope": lk.Tracking(target=1.0)}}, "'nope'"),
    ],
)
def test_setup_names_unknown_signals(
    lin_scenario: Scenario, problem: ControlProblem, changes: dict[str, object], needle: str
) -> None:
    controller = lk.KIND.create(lin_scenario.controller_config.model_copy(update=changes))
    with pytest.raises(ValueError, match=re.escape(needle)):
        controller.setup(problem)


# -------------------------------------------------------------------------- linearisation


def test_the_linearisation_is_the_rk4_step_to_first_order(
    lin_scenario: Scenario, problem: ControlProblem
) -> None:
    m = lin_scenario.model
    controller = new_linear(lin_scenario, problem)
    step = m.step_function(problem.dt)
    x, u = m.x0, np.array([75.0, 0.5, 0.4, 0.6])
    d = m.forecast(lin_scenario.meta.start_epoch + 8 * 3600, 1, problem.dt)[0]
    lin = controller.linearise(x, u, d)
    np.testing.assert_allclose(lin["F"], np.asarray(step(x, u, d, problem.p)).ravel(), rtol=1e-14)
    rng = np.random.default_rng(3)
    dx, du = rng.normal(size=m.nx), rng.normal(size=m.nu) * np.array([5.0, 0.1, 0.1, 0.1])
    errors = []
    for eps in (1e-1, 1e-2, 1e-3):
        exact = np.asarray(step(x + eps * dx, u + eps * du, d, problem.p)).ravel()
        first = lin["F"] + lin["A"] @ (eps * dx) + lin["B"] @ (eps * du)
        errors.append(float(np.max(np.abs(exact - first))))
        y_exact = np.asarray(m.h(x + eps * dx, u + eps * du, d, problem.p)).ravel()
        y_first = lin["y"] + lin["C"] @ (eps * dx) + lin["D"] @ (eps * du)
        errors[-1] = max(errors[-1], float(np.max(np.abs(y_exact - y_first))))
    assert errors[0] > 1e-8  # the model is nonlinear here, so the check can fail
    # second order: ten times smaller a perturbation, a hundred times smaller the error
    for big, small in itertools.pairwise(errors):
        assert 50.0 < big / small < 200.0, errors


def test_the_condensed_prediction_is_the_nonlinear_rollout_to_first_order(
    lin_scenario: Scenario, problem: ControlProblem, specs: SafetySpecs
) -> None:
    """Over the whole horizon: the QP's outputs for ``ref + eps * dU`` against the nonlinear
    simulation of the same plan (``_condense`` is what every step builds its QP from)."""
    m, n = lin_scenario.model, problem.horizon
    controller = new_linear(lin_scenario, problem)
    inp = start_input(lin_scenario, problem, specs)
    dist = inp.disturbances[:n]
    d_ext = np.vstack([dist, dist[-1:]])
    ref = np.tile([72.0, 0.4, 0.35, 0.45], (n, 1))
    xb, _ = m.simulate(inp.x0, ref, dist, problem.p, problem.dt)
    M, y_off, _, _ = controller._condense(inp.x0, xb, np.vstack([ref, ref[-1:]]), d_ext)
    rng = np.random.default_rng(5)
    dU = rng.normal(size=(n, m.nu)) * np.array([3.0, 0.05, 0.05, 0.05])
    errors = []
    for eps in (1.0, 0.1, 0.01):
        U = ref + eps * dU
        _, ys = m.simulate(inp.x0, U, dist, problem.p, problem.dt)
        lin = y_off + np.einsum("kyv,v->ky", M, U.ravel())
        errors.append(float(np.max(np.abs(lin - ys))))
    _, y_ref = m.simulate(inp.x0, ref, dist, problem.p, problem.dt)
    np.testing.assert_allclose(y_off + np.einsum("kyv,v->ky", M, ref.ravel()), y_ref, atol=1e-9)
    for big, small in itertools.pairwise(errors):
        assert 50.0 < big / small < 200.0, errors


@pytest.mark.slow
def test_relinearising_reaches_the_nmpc_optimum(
    scenario: Scenario, lin_scenario: Scenario, problem: ControlProblem, specs: SafetySpecs
) -> None:
    """Linear MPC re-linearised along its own plan until it stops moving is an SQP method
    on the NMPC's own problem (same RK4 step, same cost): it must reach the same optimum."""
    inp = make_input(
        problem,
        specs,
        scenario.meta.start_epoch + 6 * 3600,  # the office and school bands rise at 07:00
        scenario.model.x0,
        scenario.model.u0,
    )
    reference = nmpc.KIND.create(
        scenario.controller_config.model_copy(update={"solver": "ipopt", "tol": 1e-10})
    )
    reference.setup(problem)
    ref = reference.step(inp)
    assert ref.status is SolveStatus.SOLVED, ref.message
    controller = new_linear(lin_scenario, problem, sqp_iterations=50, sqp_tol=1e-9)
    r = controller.step(inp)
    assert r.status is SolveStatus.SOLVED, r.message
    assert 1 < r.extra["qp_rounds"] < 50
    assert r.cost == pytest.approx(ref.cost, rel=1e-6)
    np.testing.assert_allclose(r.u_plan[0], ref.u_plan[0], atol=1e-3)
    # one round only (the default) is a cheaper, different plan: the test can tell them apart
    one = new_linear(lin_scenario, problem).step(inp)
    assert one.extra["qp_rounds"] == 1 and one.cost > ref.cost * (1 + 1e-6)
    assert one.status is SolveStatus.SOLVED  # one round is the design, not a shortfall
    # rounds asked for that do not settle: usable, but said so
    two = new_linear(lin_scenario, problem, sqp_iterations=2, sqp_tol=1e-12).step(inp)
    assert two.status is SolveStatus.ACCEPTABLE and not two.extra["sqp_converged"]
    assert "2 QP round(s)" in two.message


@pytest.mark.parametrize("solver", ["daqp", "qpoases", "osqp"])
def test_the_qp_solvers_agree(
    lin_scenario: Scenario, problem: ControlProblem, specs: SafetySpecs, solver: str
) -> None:
    inp = start_input(lin_scenario, problem, specs)
    base = new_linear(lin_scenario, problem, shortcut=False).step(inp)
    r = new_linear(lin_scenario, problem, solver=solver, shortcut=False).step(inp)
    assert r.status is SolveStatus.SOLVED, r.message
    assert r.extra["qp_solver"] == solver
    np.testing.assert_allclose(r.u_plan, base.u_plan, atol=1e-4)
    assert r.cost == pytest.approx(base.cost, rel=1e-6)


# ----------------------------------------------------------------------------- statuses


def test_soft_bands_keep_a_far_state_feasible(
    lin_scenario: Scenario, problem: ControlProblem, specs: SafetySpecs
) -> None:
    """A zone far below its band (a disturbance the forecast never saw) is a costly plan,
    not an infeasible problem; the plan heats at the allowed rate."""
    m = lin_scenario.model
    x0 = np.array(m.x0, dtype=float)
    x0[m.index("states", "apartment.T_zone")] = 10.0
    controller = new_linear(lin_scenario, problem)
    inp = make_input(problem, specs, lin_scenario.meta.start_epoch, x0, m.u0)
    r = controller.step(inp)
    assert r.status is SolveStatus.SOLVED, r.message
    j = m.index("outputs", "apartment.T_zone")
    assert r.y_pred[1, j] < 18.0  # below the night band: the band is soft
    assert r.u_plan[0, m.index("inputs", "apartment.m_flow")] > m.u0[1]
    assert r.cost > 1000.0


def test_bounds_and_rate_limits_that_cannot_both_hold_are_infeasible(
    lin_scenario: Scenario, problem: ControlProblem, specs: SafetySpecs
) -> None:
    m = lin_scenario.model
    u_prev = np.array(m.u0, dtype=float)
    u_prev[0] = 40.0  # 20 K below the supply minimum, with a 2.5 K rate limit per cycle
    controller = new_linear(lin_scenario, problem)
    r = controller.step(make_input(problem, specs, lin_scenario.meta.start_epoch, m.x0, u_prev))
    assert r.status is SolveStatus.INFEASIBLE, r.message
    assert_unusable(problem, r)
    # and the next feasible problem solves again
    assert controller.step(start_input(lin_scenario, problem, specs)).status is SolveStatus.SOLVED


def test_the_deadline_is_a_timeout(
    lin_scenario: Scenario, problem: ControlProblem, specs: SafetySpecs
) -> None:
    controller = new_linear(lin_scenario, problem)
    for deadline in (0.0, 1e-9):
        r = controller.step(start_input(lin_scenario, problem, specs, deadline_s=deadline))
        assert r.status is SolveStatus.TIMEOUT, r.message
        assert_unusable(problem, r)
    assert controller.step(start_input(lin_scenario, problem, specs)).status.usable


def test_bad_inputs_and_unknown_applied_inputs(
    lin_scenario: Scenario, problem: ControlProblem, specs: SafetySpecs
) -> None:
    m = lin_scenario.model
    controller = new_linear(lin_scenario, problem)
    good = start_input(lin_scenario, problem, specs)
    bad = ControlInput(
        good.t0, np.full(m.nx, np.nan), good.u_prev, good.disturbances, good.y_low, good.y_high
    )
    r = controller.step(bad)
    assert r.status is SolveStatus.FAILED and "x0" in r.message
    assert_unusable(problem, r)
    # an applied input nobody knows: no rate limit and no move cost on the first move
    u_prev = np.array(m.u0, dtype=float)
    u_prev[0] = np.nan
    r = controller.step(make_input(problem, specs, good.t0, m.x0, u_prev))
    assert r.status is SolveStatus.SOLVED, r.message
    assert np.all(np.isfinite(r.u_plan))


def test_step_before_setup_is_a_programming_error() -> None:
    with pytest.raises(RuntimeError, match="before setup"):
        lk.LinearMpcController(lk.Config()).step(None)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- closed loop (hil)


@pytest.mark.slow
def test_closed_loop_on_the_hil_plant_holds_the_bands_like_the_nmpc(
    scenario: Scenario, lin_scenario: Scenario
) -> None:
    """A simulated day against the hil simulated plant (its own parameter draw and weather
    truth), linear MPC and the shipped NMPC on the same run."""
    runs = {}
    for name, sc in (("linear_mpc", lin_scenario), ("nmpc", scenario)):
        kind = plugins.controller_kind(sc.file.controller.kind)
        rig = SIMULATED.verification_rig(scenario.rig_config, scenario.model)
        try:
            runs[name] = run_campaign(
                sc,
                rig,
                kind.create(sc.controller_config),
                name,
                cycles=scenario.meta.cycles,
                samples=[0],
            )
        finally:
            rig.close()
    lin, ref = runs["linear_mpc"], runs["nmpc"]
    lin_kh, ref_kh = lin.band_violation()[0], ref.band_violation()[0]
    lin_fuel = lin.totals()["energy"][0]
    ref_fuel = ref.totals()["energy"][0]
    print(
        f"\nlinear_mpc: {lin_kh:.4f} Kh outside the bands, fuel {lin_fuel:.1f} kWh, "
        f"solve p50 {np.median(lin.solve_s) * 1e3:.1f} ms; "
        f"nmpc: {ref_kh:.4f} Kh, fuel {ref_fuel:.1f} kWh, "
        f"solve p50 {np.median(ref.solve_s) * 1e3:.1f} ms"
    )
    assert lin.failures == 0
    assert lin.passed, [r for r in lin.results if not r.passed]
    assert lin_kh <= ref_kh + 0.05
    assert lin_fuel == pytest.approx(ref_fuel, rel=0.02)


def test_relinearising_reaches_the_nmpc_optimum_on_a_pendulum() -> None:
    """A second model: no disturbances, tracking, a soft band with an l1 slack and a priced
    output that is quadratic in the input (its curvature enters the QP)."""
    problem, inp = pendulum_problem()
    reference = nmpc.NmpcController(pendulum_config(solver="ipopt", tol=1e-10, scales={}))
    reference.setup(problem)
    ref = reference.step(inp)
    assert ref.status is SolveStatus.SOLVED, ref.message
    config = lk.Config(
        tracking={"angle": lk.Tracking(target=0.0, weight=10.0, terminal_weight=50.0)},
        output_costs={"effort": 3600.0 / 0.1},
        move_weights={"torque": 0.1},
        comfort_weight=100.0,
        comfort_weight_l1=10.0,
        sqp_iterations=50,
        sqp_tol=1e-9,
    )
    controller = lk.KIND.create(config)
    controller.setup(problem)
    r = controller.step(inp)
    assert r.status is SolveStatus.SOLVED, r.message
    assert r.extra["qp_rounds"] < 50
    assert r.cost == pytest.approx(ref.cost, rel=1e-6)
    np.testing.assert_allclose(r.u_plan, ref.u_plan, atol=1e-5)
