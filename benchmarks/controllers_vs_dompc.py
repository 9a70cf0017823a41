"""parallelcity's controllers against do-mpc's nominal MPC, same problems, same states.

    .venv/bin/pip install -e '.[bench]'          # do-mpc 5.1.2, benchmark-only
    .venv/bin/python -m benchmarks.controllers_vs_dompc [--steps 50] [--only cstr|masses]

(a) do-mpc's CSTR example (4 states, 2 inputs, horizon 20, Radau collocation of degree
    2, its bounds, soft T_R limit, cost and input scaling; nominal parameters, no
    scenario tree).  The model is written here from do-mpc's documented equations.
    Ours: ``parallelcity.controllers.nmpc`` with the same discretisation and cost, solved by each
    configured NLP path.
(b) do-mpc's oscillating-masses example (discrete, 4 states, 2 inputs, stage and
    terminal cost ``x'x``, ``1e-4`` on input moves, its bounds) at horizons 20 and 50.
    Ours: ``parallelcity.controllers.linear_mpc`` (condensed QP) with each QP solver.

The plant is driven by do-mpc's input; every step both controllers plan from the same
state and the same previously applied input, each warm-started from its own previous
solution.  Reported per step: median and p95 of the wall time of the controller call
(do-mpc's ``make_step``, our ``step``/``solve``), the ratio of do-mpc's to ours, and the
relative difference of the optimal costs, both evaluated as do-mpc defines them.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import casadi as ca
import numpy as np
from parallelcity.controllers.linear_mpc import LinearMpc
from parallelcity.controllers.nmpc import Config as NmpcConfig
from parallelcity.controllers.nmpc import NmpcController

from parallelcity.decide.control import ControlInput, ControlProblem
from parallelcity.twin.model import Array, SubsystemModel

# --------------------------------------------------------------------------- CSTR

CSTR_DT_H = 0.005
CSTR_HORIZON = 20
CSTR_X0 = np.array([0.8, 0.5, 134.14, 130.0])
CSTR_STATES = ("C_a", "C_b", "T_R", "T_K")
CSTR_INPUTS = ("F", "Q_dot")
CSTR_U_MIN = np.array([5.0, -8500.0])
CSTR_U_MAX = np.array([100.0, 0.0])
CSTR_X_BOUNDS = {
    "C_a": (0.1, 2.0),
    "C_b": (0.1, 2.0),
    "T_R": (50.0, math.inf),
    "T_K": (50.0, 140.0),
}
CSTR_T_R_MAX = 140.0  # soft, penalty 100 per K
CSTR_SCALES = {"T_R": 100.0, "T_K": 100.0, "F": 100.0, "Q_dot": 2000.0}
CSTR_RTERM = {"F": 0.1, "Q_dot": 1e-3}  # do-mpc penalises moves of the *scaled* inputs


def cstr_rhs(x: Any, u: Any, p: Any) -> Any:
    """The CSTR of do-mpc's example (Klatt-Engell type reactor), time in hours."""
    k0_ab, k0_bc, k0_ad = 1.287e12, 1.287e12, 9.043e9
    e_ab, e_bc, e_ad = 9758.3, 9758.3, 8560.0
    h_ab, h_bc, h_ad = 4.2, -11.0, -41.85
    rho, cp, cp_k, a_r, v_r, m_k, t_in, k_w = 0.9342, 3.01, 2.0, 0.215, 10.01, 5.0, 130.0, 4032.0
    c_a0 = (5.7 + 4.5) / 2.0
    c_a, c_b, t_r, t_k = x[0], x[1], x[2], x[3]
    f, q = u[0], u[1]
    alpha, beta = p[0], p[1]
    k1 = beta * k0_ab * ca.exp(-e_ab / (t_r + 273.15))
    k2 = k0_bc * ca.exp(-e_bc / (t_r + 273.15))
    k3 = k0_ad * ca.exp(-alpha * e_ad / (t_r + 273.15))
    t_dif = t_r - t_k
    return ca.vertcat(
        f * (c_a0 - c_a) - k1 * c_a - k3 * c_a**2,
        -f * c_b + k1 * c_a - k2 * c_b,
        (k1 * c_a * h_ab + k2 * c_b * h_bc + k3 * c_a**2 * h_ad) / (-rho * cp)
        + f * (t_in - t_r)
        - k_w * a_r * t_dif / (rho * cp * v_r),
        (q + k_w * a_r * t_dif) / (m_k * cp_k),
    )


def cstr_model() -> SubsystemModel:
    x, u = ca.SX.sym("x", 4), ca.SX.sym("u", 2)
    d, p = ca.SX.sym("d", 0), ca.SX.sym("p", 2)
    f = ca.Function("f", [x, u, d, p], [cstr_rhs(x, u, p)], ["x", "u", "d", "p"], ["xdot"])
    h = ca.Function("h", [x, u, d, p], [x], ["x", "u", "d", "p"], ["y"])
    return SubsystemModel(
        name="cstr",
        states=CSTR_STATES,
        inputs=CSTR_INPUTS,
        disturbances=(),
        outputs=CSTR_STATES,
        parameters=("alpha", "beta"),
        nominal=np.array([1.0, 1.0]),
        f=f,
        h=h,
        forecast=lambda t0, n, dt: np.zeros((n, 0)),
        x0=CSTR_X0.copy(),
        u0=np.array([30.0, -6000.0]),
    )


def cstr_problem(model: SubsystemModel) -> ControlProblem:
    return ControlProblem(
        model=model,
        dt=CSTR_DT_H,
        horizon=CSTR_HORIZON,
        u_min=CSTR_U_MIN,
        u_max=CSTR_U_MAX,
        du_max=np.full(2, np.inf),
        banded_outputs=(CSTR_STATES.index("T_R"),),
    )


def cstr_config(**changes: Any) -> NmpcConfig:
    """do-mpc's CSTR objective in our terms (its input scaling folded into the weights)."""
    base = NmpcConfig(
        tracking={"C_b": {"target": 0.6, "weight": 1.0, "terminal_weight": 1.0}},
        move_weights={k: w / CSTR_SCALES[k] ** 2 for k, w in CSTR_RTERM.items()},
        comfort_weight=0.0,
        comfort_weight_l1=100.0,
        band_at_end=False,  # do-mpc's soft constraint holds at k < N
        state_bounds=CSTR_X_BOUNDS,
        scales=CSTR_SCALES,
        method="collocation",
        collocation_degree=2,
        collocation_scheme="radau",
    )
    return base.model_copy(update=changes)


def cstr_input(problem: ControlProblem, k: int, x: Array, u_prev: Array) -> ControlInput:
    n = problem.horizon
    return ControlInput(
        t0=k * problem.dt,
        x0=x,
        u_prev=u_prev,
        disturbances=np.zeros((n, 0)),
        y_low=np.full((n + 1, 1), -np.inf),
        y_high=np.full((n + 1, 1), CSTR_T_R_MAX),
    )


def cstr_objective(xs: Array, u_prev: Array, plan: Array) -> float:
    """do-mpc's CSTR objective at an NLP solution: states ``xs`` (N+1, 4) at the interval
    starts, ``plan`` (N, 2); the T_R slack at its least, (T_R - 140)+ for k < N."""
    scaled = np.vstack([u_prev, plan]) / np.array([CSTR_SCALES[n] for n in CSTR_INPUTS])
    moves = np.diff(scaled, axis=0) ** 2 @ np.array([CSTR_RTERM[n] for n in CSTR_INPUTS])
    return float(
        np.sum((xs[:, 1] - 0.6) ** 2)
        + moves.sum()
        + 100.0 * np.maximum(0.0, xs[:-1, 2] - CSTR_T_R_MAX).sum()
    )


def dompc_solution(mpc: Any, horizon: int) -> tuple[Array, Array]:
    xs = np.array(
        [
            np.asarray(mpc.opt_x_num_unscaled["_x", k, 0, -1], dtype=float).ravel()
            for k in range(horizon + 1)
        ]
    )
    return xs, _dompc_plan(mpc, horizon)


def our_solution(ctrl: NmpcController) -> Array:
    """The shooting-node states of the NLP solution just found (not the re-simulation)."""
    last = ctrl._last
    assert last is not None
    return np.asarray((last["w"] * ctrl._wscale)[ctrl._ix], dtype=float)


def cstr_plan_cost(x0: Array, u_prev: Array, plan: Array) -> float:
    """do-mpc's CSTR objective of a plan, its states from a tight ODE solution (CVODES):
    the one yardstick for both controllers' plans.  Slack at its least (T_R - 140)+."""
    xs = [np.asarray(x0, dtype=float)]
    for u in plan:
        xs.append(np.asarray(_cstr_plant()(x0=xs[-1], p=u)["xf"], dtype=float).ravel())
    c_b = np.array([x[1] for x in xs])
    t_r = np.array([x[2] for x in xs[:-1]])
    scaled = np.vstack([u_prev, plan]) / np.array([CSTR_SCALES[n] for n in CSTR_INPUTS])
    moves = np.diff(scaled, axis=0) ** 2 @ np.array([CSTR_RTERM[n] for n in CSTR_INPUTS])
    return float(
        np.sum((c_b - 0.6) ** 2) + moves.sum() + 100.0 * np.maximum(0.0, t_r - CSTR_T_R_MAX).sum()
    )


_PLANT: list[ca.Function] = []


def _cstr_plant() -> ca.Function:
    if not _PLANT:
        x, u = ca.SX.sym("x", 4), ca.SX.sym("u", 2)
        ode = {"x": x, "p": u, "ode": cstr_rhs(x, u, [1.0, 1.0])}
        opts = {"abstol": 1e-11, "reltol": 1e-11}
        _PLANT.append(ca.integrator("plant", "cvodes", ode, 0.0, CSTR_DT_H, opts))
    return _PLANT[0]


def dompc_cstr() -> Any:
    """do-mpc's CSTR MPC, nominal: the example's settings without the scenario tree."""
    import do_mpc  # benchmark-only dependency

    model = do_mpc.model.Model("continuous", "SX")
    xs = [model.set_variable("_x", name) for name in CSTR_STATES]
    us = [model.set_variable("_u", name) for name in CSTR_INPUTS]
    ps = [model.set_variable("_p", name) for name in ("alpha", "beta")]
    rhs = cstr_rhs(ca.vertcat(*xs), ca.vertcat(*us), ca.vertcat(*ps))
    for i, name in enumerate(CSTR_STATES):
        model.set_rhs(name, rhs[i])
    model.setup()
    mpc = do_mpc.controller.MPC(model)
    mpc.settings.n_horizon = CSTR_HORIZON
    mpc.settings.n_robust = 0
    mpc.settings.open_loop = 0
    mpc.settings.t_step = CSTR_DT_H
    mpc.settings.state_discretization = "collocation"
    mpc.settings.collocation_type = "radau"
    mpc.settings.collocation_deg = 2
    mpc.settings.collocation_ni = 1
    mpc.settings.store_full_solution = True
    mpc.settings.supress_ipopt_output()
    for name, s in CSTR_SCALES.items():
        mpc.scaling["_x" if name in CSTR_STATES else "_u", name] = s
    c_b = model.x["C_b"]
    mpc.set_objective(mterm=(c_b - 0.6) ** 2, lterm=(c_b - 0.6) ** 2)
    mpc.set_rterm(**CSTR_RTERM)
    for name, (lo, hi) in CSTR_X_BOUNDS.items():
        mpc.bounds["lower", "_x", name] = lo
        if math.isfinite(hi):
            mpc.bounds["upper", "_x", name] = hi
    for i, name in enumerate(CSTR_INPUTS):
        mpc.bounds["lower", "_u", name] = CSTR_U_MIN[i]
        mpc.bounds["upper", "_u", name] = CSTR_U_MAX[i]
    mpc.set_nl_cons(
        "T_R", model.x["T_R"], ub=CSTR_T_R_MAX, soft_constraint=True, penalty_term_cons=1e2
    )
    mpc.set_uncertainty_values(alpha=np.array([1.0]), beta=np.array([1.0]))
    mpc.setup()
    return mpc


# ----------------------------------------------------------------- oscillating masses

MASSES_A = np.array(
    [
        [0.96033209, 0.19734663, 0.01973449, 0.0013227],
        [-0.39337056, 0.96033209, 0.19470123, 0.01973449],
        [0.01973449, 0.0013227, 0.96033209, 0.19734663],
        [0.19470123, 0.01973449, -0.39337056, 0.96033209],
    ]
)
MASSES_B = np.array(
    [
        [1.98671102e-02, 6.63119354e-05],
        [1.97346631e-01, 1.32269963e-03],
        [6.63119354e-05, 1.98671102e-02],
        [1.32269963e-03, 1.97346631e-01],
    ]
)
MASSES_X_MAX = np.array([4.0, 10.0, 4.0, 10.0])
MASSES_U_MAX = 0.5
MASSES_RTERM = 1e-4


def masses_x0(seed: int = 99, spread: float = 6.0) -> Array:
    """``spread * (U(0,1) - 0.5)``: do-mpc's example starts with spread 1 (its own RNG);
    spread 6 starts far enough out that the input bounds stay active for a while."""
    rng = np.random.default_rng(seed)
    return spread * (rng.random(4) - 0.5)


def our_masses(horizon: int, solver: str, active_set_iterations: int = 4) -> LinearMpc:
    return LinearMpc(
        MASSES_A,
        MASSES_B,
        np.eye(4),
        np.zeros((2, 2)),
        horizon,
        P=np.eye(4),  # do-mpc's mterm x'x, not the LQR terminal cost
        Rd=MASSES_RTERM * np.eye(2),
        u_min=-MASSES_U_MAX,
        u_max=MASSES_U_MAX,
        x_min=-MASSES_X_MAX,
        x_max=MASSES_X_MAX,
        solver=solver,  # type: ignore[arg-type]
        active_set_iterations=active_set_iterations,
    )


def dompc_masses(horizon: int) -> Any:
    import do_mpc

    model = do_mpc.model.Model("discrete", "SX")
    x = model.set_variable("_x", "x", shape=(4, 1))
    u = model.set_variable("_u", "u", shape=(2, 1))
    model.set_expression("cost", ca.sum1(x**2))
    model.set_rhs("x", ca.DM(MASSES_A) @ x + ca.DM(MASSES_B) @ u)
    model.setup()
    mpc = do_mpc.controller.MPC(model)
    mpc.settings.n_robust = 0
    mpc.settings.n_horizon = horizon
    mpc.settings.t_step = 0.5
    mpc.settings.store_full_solution = True
    mpc.settings.supress_ipopt_output()
    mpc.set_objective(mterm=model.aux["cost"], lterm=model.aux["cost"])
    mpc.set_rterm(u=MASSES_RTERM)
    mpc.bounds["lower", "_x", "x"] = -MASSES_X_MAX.reshape(-1, 1)
    mpc.bounds["upper", "_x", "x"] = MASSES_X_MAX.reshape(-1, 1)
    mpc.bounds["lower", "_u", "u"] = -MASSES_U_MAX
    mpc.bounds["upper", "_u", "u"] = MASSES_U_MAX
    mpc.setup()
    return mpc


# ------------------------------------------------------------------------------ runner


@dataclass
class Series:
    name: str
    times: list[float] = field(default_factory=list)
    costs: list[float] = field(default_factory=list)
    iterations: list[int] = field(default_factory=list)
    failures: int = 0

    def median_ms(self) -> float:
        return float(np.median(self.times) * 1e3)

    def p95_ms(self) -> float:
        return float(np.percentile(self.times, 95) * 1e3)


def _dompc_plan(mpc: Any, horizon: int) -> Array:
    return np.array(
        [
            np.asarray(mpc.opt_x_num_unscaled["_u", k, 0], dtype=float).ravel()
            for k in range(horizon)
        ]
    )


def _dompc_objective(mpc: Any) -> Callable[[], float]:
    f = ca.Function("obj", [mpc.nlp["x"], mpc.nlp["p"]], [mpc.nlp["f"]])
    return lambda: float(f(mpc.opt_x_num.cat, mpc.opt_p_num.cat))


def _dompc_step(mpc: Any, x: Array, u_prev: Array) -> tuple[Array, float]:
    mpc.u0 = u_prev.reshape(-1, 1)  # the move penalty starts from the applied input
    t = time.perf_counter()
    u = mpc.make_step(x.reshape(-1, 1))
    return np.asarray(u, dtype=float).ravel(), time.perf_counter() - t


def _report(title: str, base: Series, ours: list[Series]) -> list[dict[str, Any]]:
    """Per controller: times, speed-up, and the cost against do-mpc's at the same step,
    (ours - do-mpc) / do-mpc: the median, and the worst step each way."""
    print(f"\n{title}")
    print(
        f"  {'controller':<34} {'median ms':>9} {'p95 ms':>8} {'x faster':>8} {'iters':>5} "
        f"{'cost diff: median':>17} {'worst +':>9} {'worst -':>9} {'fails':>5}"
    )
    rows = []
    for s in [base, *ours]:
        ratio = base.median_ms() / s.median_ms()
        diffs = np.array(
            [
                (a - b) / max(abs(b), 1e-300)
                for a, b in zip(s.costs, base.costs, strict=True)
                if math.isfinite(a) and math.isfinite(b)
            ]
        )
        med = float(np.median(diffs)) if diffs.size else math.nan
        hi = float(max(diffs.max(), 0.0)) if diffs.size else math.nan
        lo = float(min(diffs.min(), 0.0)) if diffs.size else math.nan
        print(
            f"  {s.name:<34} {s.median_ms():>9.3f} {s.p95_ms():>8.3f} {ratio:>8.1f} "
            f"{np.median(s.iterations):>5.0f} {med:>+17.1e} {hi:>+9.1e} {lo:>+9.1e} "
            f"{s.failures:>5}"
        )
        rows.append(
            {
                "name": s.name,
                "median_ms": s.median_ms(),
                "p95_ms": s.p95_ms(),
                "speedup": ratio,
                "cost_diff_median": med,
                "cost_diff_worst_up": hi,
                "cost_diff_worst_down": lo,
            }
        )
    return rows


# tol 1e-8: IPOPT's default, which do-mpc uses
CSTR_PATHS: dict[str, dict[str, Any]] = {
    "nmpc ipopt": {"solver": "ipopt", "tol": 1e-8},
    "nmpc fatrop": {"solver": "fatrop", "tol": 1e-8},
    "nmpc fatrop + compiled C": {"solver": "fatrop", "tol": 1e-8, "compile": True},
    "nmpc sqp_fatrop (default)": {"solver": "sqp_fatrop", "tol": 1e-8},
    "nmpc sqp_fatrop + compiled C": {"solver": "sqp_fatrop", "tol": 1e-8, "compile": True},
}


def run_cstr(
    steps: int, paths: dict[str, dict[str, Any]] | None = None, with_dompc: bool = True
) -> list[dict[str, Any]]:
    model = cstr_model()
    problem = cstr_problem(model)
    ours: dict[str, NmpcController] = {}
    for name, changes in (paths or CSTR_PATHS).items():
        ctrl = NmpcController(cstr_config(**changes))
        ctrl.setup(problem)
        ours[name] = ctrl
    plant = _cstr_plant()
    base = Series("do-mpc 5.1.2 (IPOPT, MUMPS)")
    series = {name: Series(name) for name in ours}
    mpc = None
    if with_dompc:
        mpc = dompc_cstr()
        mpc.x0 = CSTR_X0.reshape(-1, 1)
        mpc.set_initial_guess()
    x, u_prev = CSTR_X0.copy(), np.zeros(2)  # do-mpc starts its move penalty from u = 0
    for k in range(steps):
        u_apply = None
        if mpc is not None:
            u_apply, dt_s = _dompc_step(mpc, x, u_prev)
            base.times.append(dt_s)
            base.costs.append(
                cstr_objective(
                    *dompc_solution(mpc, CSTR_HORIZON)[:1], u_prev, _dompc_plan(mpc, CSTR_HORIZON)
                )
            )
            base.iterations.append(int(mpc.solver_stats.get("iter_count", 0)))
        for name, ctrl in ours.items():
            inp = cstr_input(problem, k, x, u_prev)
            t = time.perf_counter()
            r = ctrl.step(inp)
            series[name].times.append(time.perf_counter() - t)
            series[name].costs.append(
                cstr_objective(our_solution(ctrl), u_prev, r.u_plan)
                if r.status.usable
                else math.nan
            )
            series[name].iterations.append(r.iterations)
            if not r.status.usable:
                series[name].failures += 1
            if u_apply is None:
                u_apply = r.u_first
        assert u_apply is not None
        x = np.asarray(plant(x0=x, p=u_apply)["xf"], dtype=float).ravel()
        u_prev = u_apply
    if not with_dompc:
        return [
            {"name": s.name, "median_ms": s.median_ms(), "costs": s.costs} for s in series.values()
        ]
    return _report(
        f"(a) CSTR, horizon {CSTR_HORIZON}, Radau collocation degree 2, {steps} steps",
        base,
        list(series.values()),
    )


def run_masses(
    steps: int,
    horizon: int,
    solvers: tuple[str, ...] = ("qpoases", "daqp", "osqp"),
    spread: float = 6.0,
) -> list[dict[str, Any]]:
    ours = {s: our_masses(horizon, s) for s in solvers}
    # the same DAQP path without the active-set guess of the last plan: what it gains
    ours["daqp, no AS guess"] = our_masses(horizon, "daqp", active_set_iterations=0)
    mpc = dompc_masses(horizon)
    x = masses_x0(spread=spread)
    mpc.x0 = x.reshape(-1, 1)
    mpc.set_initial_guess()
    objective = _dompc_objective(mpc)
    base = Series("do-mpc 5.1.2 (IPOPT, MUMPS)")
    series = {s: Series(f"linear_mpc QP, {s}") for s in ours}
    paths = {s: 0 for s in ours}  # steps solved by the active-set guess, no QP solver
    u_prev = np.zeros(2)
    names = list(ours)
    for step in range(steps):
        u_apply, dt_s = _dompc_step(mpc, x, u_prev)
        base.times.append(dt_s)
        base.costs.append(objective())
        base.iterations.append(int(mpc.solver_stats.get("iter_count", 0)))
        # rotate the order: the first call after do-mpc's finds colder caches
        for s in names[step % len(names) :] + names[: step % len(names)]:
            ctrl = ours[s]
            t = time.perf_counter()
            r = ctrl.solve(x, u_prev)
            series[s].times.append(time.perf_counter() - t)
            series[s].costs.append(r.cost)
            series[s].iterations.append(r.iterations)
            paths[s] += r.extra.get("return_status") == "active set of the last plan"
            if not r.status.usable:
                series[s].failures += 1
        x = MASSES_A @ x + MASSES_B @ u_apply
        u_prev = u_apply
    rows = _report(
        f"(b) oscillating masses, horizon {horizon}, start spread {spread:g}, {steps} steps",
        base,
        list(series.values()),
    )
    print(
        "  steps solved from the last plan's active set (no QP solver call): "
        + ", ".join(f"{s} {n}/{steps}" for s, n in paths.items())
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--only", choices=("cstr", "masses"))
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")  # do-mpc's notices about optional features
    logging.basicConfig(level=logging.WARNING)
    try:
        import do_mpc
    except ImportError:
        print(
            "do-mpc is a benchmark-only extra: .venv/bin/pip install -e '.[bench]'", file=sys.stderr
        )
        return 2
    print(
        f"do-mpc {getattr(do_mpc, '__version__', '?')}, CasADi {ca.CasadiMeta.version()}; "
        "times are wall-clock per controller call on this machine, ratios are do-mpc / ours "
        "in the same run"
    )
    if args.only in (None, "cstr"):
        run_cstr(args.steps)
    if args.only in (None, "masses"):
        for horizon in (20, 50):
            for spread in (1.0, 6.0):  # do-mpc's start; one that saturates the inputs
                run_masses(args.steps, horizon, spread=spread)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
