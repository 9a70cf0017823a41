"""Mixed-integer scheduling with Pyomo and HiGHS: a pump filling a storage tank by tariff.

Over ``N`` periods of ``dt`` the pump is on or off (``on_k`` binary); the tank level
follows ``L_{k+1} = L_k + dt (q on_k - demand_k) / area`` and must stay within the
level band at ``k = 1..N`` (hard: a band the pump cannot hold is ``INFEASIBLE``).  The
cost is the energy bought, ``price_k * P * on_k * dt``, plus ``start_cost`` per start.
The pump runs at least ``min_up`` and rests at least ``min_down`` periods, counted
across the boundary of the horizon from the runs seen in earlier cycles.

The model is built once with mutable parameters; every step changes only their values
and re-solves with a persistent HiGHS instance (``reuse = false`` builds everything
anew each step, for comparison: benchmarks/milp_reuse.py).  HiGHS gets a time limit
(the smaller of ``time_limit_s`` and the cycle's deadline) and a relative gap.  Its
outcome is always reported, in ``extra["milp_status"]``:

* ``optimal``: proven optimal (gap below 1e-9)  -> ``SOLVED``
* ``feasible_gap``: a plan, stopped at the gap setting or the time limit, with its
  gap in ``extra["gap"]``  -> ``ACCEPTABLE``
* ``infeasible``  -> ``INFEASIBLE``;  ``timeout``: no plan within the time  -> ``TIMEOUT``
* ``failed``: anything else  -> ``FAILED``

The tank is a ``SubsystemModel`` (``tank_model``) like any other, so the verifier
rolls the schedule out on a rig exactly as it does an NMPC plan.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import casadi as ca
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from parallelcity.decide.control import (
    ControlInput,
    ControlProblem,
    ControlResult,
    KindOf,
    SolveStatus,
    guarded_step,
    require_fit,
)
from parallelcity.twin.model import Array, SubsystemModel

log = logging.getLogger(__name__)

OPTIMAL_GAP = 1e-9  # a smaller relative gap than this counts as proven optimal

LEVEL, PUMP, DEMAND, PRICE = "tank.level", "pump.on", "tank.demand", "tariff.price"
_PARAMETERS = ("tank.area_m2", "pump.m3_per_h", "pump.kw")  # read from the plan's parameters


def tank_model(
    area_m2: float = 50.0,
    pump_m3_per_h: float = 60.0,
    pump_kw: float = 30.0,
    level0_m: float = 2.0,
    forecast: Any = None,
) -> SubsystemModel:
    """A storage tank filled by one on/off pump and drawn by a demand.

    States ``tank.level`` (m); input ``pump.on`` (0 or 1); disturbances
    ``tank.demand`` (m3/h) and ``tariff.price`` (per kWh); outputs the level, the
    pump's power (kW) and the cost rate (per h).  Time in seconds.
    """
    x, u = ca.SX.sym("x", 1), ca.SX.sym("u", 1)
    d, p = ca.SX.sym("d", 2), ca.SX.sym("p", 3)
    area, q, kw = p[0], p[1], p[2]
    xdot = (q * u[0] - d[0]) / area / 3600.0
    y = ca.vertcat(x[0], kw * u[0], kw * u[0] * d[1])
    f = ca.Function("f", [x, u, d, p], [xdot], ["x", "u", "d", "p"], ["xdot"])
    h = ca.Function("h", [x, u, d, p], [y], ["x", "u", "d", "p"], ["y"])

    def default_forecast(t0: float, n: int, dt: float) -> Array:
        hours = ((t0 + dt * np.arange(n)) / 3600.0) % 24.0
        demand = 30.0 + 20.0 * np.exp(-(((hours - 7.5) / 1.5) ** 2))
        demand += 15.0 * np.exp(-(((hours - 19.0) / 2.0) ** 2))
        price = np.where((hours >= 7) & (hours < 22), 0.30, 0.12)
        return np.column_stack([demand, price])

    return SubsystemModel(
        name="tank",
        states=(LEVEL,),
        inputs=(PUMP,),
        disturbances=(DEMAND, PRICE),
        outputs=(LEVEL, "pump.kw", "tariff.cost_per_h"),
        parameters=_PARAMETERS,
        nominal=np.array([area_m2, pump_m3_per_h, pump_kw]),
        f=f,
        h=h,
        forecast=forecast or default_forecast,
        x0=np.array([level0_m]),
        u0=np.array([0.0]),
        state_outputs={LEVEL: LEVEL},
    )


class Config(BaseModel):
    """``[controller]`` table for ``kind = "milp_pump"``."""

    model_config = ConfigDict(extra="forbid")
    kind: str = "milp_pump"
    min_up: int = Field(1, ge=1, description="periods the pump runs at least once started")
    min_down: int = Field(1, ge=1, description="periods it rests at least once stopped")
    start_cost: float = Field(0.0, ge=0, description="cost per start (wear)")
    time_limit_s: float = Field(10.0, gt=0, description="HiGHS wall-time limit per solve")
    mip_rel_gap: float = Field(1e-6, ge=0, le=1, description="stop within this relative gap")
    reuse: bool = Field(True, description="mutable parameters + persistent HiGHS")

    def problems(self, problem: ControlProblem) -> list[str]:
        """The tank model's signals this kind schedules, and the band on its level
        (checked by ``validate``)."""
        m = problem.model
        needs = [("state", LEVEL, m.states), ("input", PUMP, m.inputs)]
        needs += [("disturbance", name, m.disturbances) for name in (DEMAND, PRICE)]
        needs += [("parameter", name, m.parameters) for name in _PARAMETERS]
        missing = [f"{what} {name!r}" for what, name, have in needs if name not in have]
        if missing:
            return [
                f"kind: 'milp_pump' schedules a pump filling a tank and needs a model with "
                f"{', '.join(missing)} (see parallelcity.controllers.milp.tank_model); "
                f"model {m.name!r} lacks that"
            ]
        out = []
        if LEVEL not in m.outputs or m.index("outputs", LEVEL) not in problem.banded_outputs:
            out.append(f"kind: 'milp_pump' needs a band on output {LEVEL!r} ([[specs.bands]])")
        area, flow, kw = (float(problem.p[m.index("parameters", n)]) for n in _PARAMETERS)
        if not (area > 0 and flow > 0 and kw >= 0):
            out.append("kind: 'milp_pump' needs tank area and pump flow > 0, pump power >= 0")
        return out


@dataclass
class _History:
    t0: float
    on: bool  # state during the period that ended at t0
    run: int  # periods in that state, up to t0


def _pyomo() -> Any:
    import pyomo.environ as pyo

    return pyo


class PumpScheduler:
    """Controller kind ``milp_pump``; see the module docstring."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._problem: ControlProblem | None = None
        self._model: Any = None
        self._solver: Any = None
        self._history: _History | None = None
        self._highs_total = 0.0

    # ---------------------------------------------------------------- setup

    def setup(self, problem: ControlProblem) -> None:
        m = problem.model
        require_fit("milp_pump", self.config.problems(problem))
        p = np.asarray(problem.p, dtype=float)
        self._area, self._flow, self._kw = (float(p[m.index("parameters", n)]) for n in _PARAMETERS)
        self._i_level = m.index("states", LEVEL)
        self._i_pump = m.index("inputs", PUMP)
        self._i_dem, self._i_price = m.index("disturbances", DEMAND), m.index("disturbances", PRICE)
        self._band = list(problem.banded_outputs).index(m.index("outputs", LEVEL))
        self._problem = problem
        self._history = None
        self._sim = m.step_function(problem.dt)
        self._model = (
            self._build(problem.horizon, problem.dt / 3600.0) if self.config.reuse else None
        )
        self._solver = self._new_solver() if self.config.reuse else None
        self._highs_total = 0.0

    def _new_solver(self) -> Any:
        from pyomo.contrib.solver.solvers.highs import Highs

        solver = Highs()
        if not solver.available():
            raise ValueError("HiGHS (highspy) is not installed")
        # the model's structure never changes between steps: only look at parameters
        auto = solver.config.auto_updates
        auto.check_for_new_or_removed_constraints = False
        auto.check_for_new_or_removed_vars = False
        auto.check_for_new_or_removed_params = False
        auto.check_for_new_objective = False
        auto.update_constraints = False
        auto.update_vars = False
        auto.update_named_expressions = False
        auto.update_objective = False
        return solver

    def _build(self, n: int, dt_h: float) -> Any:
        pyo = _pyomo()
        cfg = self.config
        M = pyo.ConcreteModel("pump_schedule")
        M.K = pyo.RangeSet(0, n - 1)
        M.L = pyo.RangeSet(0, n)
        M.level0 = pyo.Param(mutable=True, initialize=0.0)
        M.prev_on = pyo.Param(mutable=True, initialize=0.0)
        M.demand = pyo.Param(M.K, mutable=True, initialize=0.0)
        M.price = pyo.Param(M.K, mutable=True, initialize=0.0)
        M.lo = pyo.Param(M.L, mutable=True, initialize=-1e6)
        M.hi = pyo.Param(M.L, mutable=True, initialize=1e6)
        M.must_on = pyo.Param(M.K, mutable=True, initialize=0.0)
        M.must_off = pyo.Param(M.K, mutable=True, initialize=0.0)

        M.on = pyo.Var(M.K, domain=pyo.Binary)
        M.start = pyo.Var(M.K, domain=pyo.Binary)
        M.stop = pyo.Var(M.K, domain=pyo.Binary)
        M.level = pyo.Var(M.L)

        M.init = pyo.Constraint(expr=M.level[0] == M.level0)
        rate = dt_h / self._area
        M.balance = pyo.Constraint(
            M.K,
            rule=lambda M, k: (
                M.level[k + 1] == M.level[k] + rate * (self._flow * M.on[k] - M.demand[k])
            ),
        )
        M.band_lo = pyo.Constraint(M.L, rule=lambda M, k: M.level[k] >= M.lo[k])
        M.band_hi = pyo.Constraint(M.L, rule=lambda M, k: M.level[k] <= M.hi[k])

        def prev(M: Any, k: int) -> Any:
            return M.prev_on if k == 0 else M.on[k - 1]

        M.switch = pyo.Constraint(
            M.K, rule=lambda M, k: M.start[k] - M.stop[k] == M.on[k] - prev(M, k)
        )
        M.one_way = pyo.Constraint(M.K, rule=lambda M, k: M.start[k] + M.stop[k] <= 1)
        up, down = cfg.min_up, cfg.min_down
        M.min_up = pyo.Constraint(
            M.K,
            rule=lambda M, k: sum(M.start[j] for j in range(max(0, k - up + 1), k + 1)) <= M.on[k],
        )
        M.min_down = pyo.Constraint(
            M.K,
            rule=lambda M, k: (
                sum(M.stop[j] for j in range(max(0, k - down + 1), k + 1)) <= 1 - M.on[k]
            ),
        )
        # runs that started before the horizon (from the history)
        M.keep_on = pyo.Constraint(M.K, rule=lambda M, k: M.on[k] >= M.must_on[k])
        M.keep_off = pyo.Constraint(M.K, rule=lambda M, k: M.on[k] <= 1 - M.must_off[k])
        M.cost = pyo.Objective(
            expr=sum(
                M.price[k] * self._kw * dt_h * M.on[k] + cfg.start_cost * M.start[k] for k in M.K
            ),
            sense=pyo.minimize,
        )
        return M

    # ----------------------------------------------------------------- step

    def step(self, inp: ControlInput) -> ControlResult:
        return guarded_step("milp_pump", self._problem, inp, self._step)

    def _history_now(self, t0: float, on: bool, known: bool) -> tuple[bool, int]:
        """(state of the period that just ended, how many periods it has lasted)."""
        assert self._problem is not None
        dt = float(self._problem.dt)
        h = self._history
        if not known:
            return on, 10**6  # unknown past: no constraint from it
        if h is not None and abs(t0 - h.t0) < 1e-6 * dt:  # the same cycle asked again
            return h.on, h.run
        if h is not None and abs(t0 - h.t0 - dt) < 0.5 * dt:
            return on, (h.run + 1 if h.on == on else 1)
        return on, 10**6

    def _step(self, problem: ControlProblem, inp: ControlInput, t_start: float) -> ControlResult:
        cfg = self.config
        n, dt = problem.horizon, float(problem.dt)
        x0 = np.asarray(inp.x0, dtype=float)
        dist = np.asarray(inp.disturbances, dtype=float)
        if x0.shape != (problem.model.nx,) or not np.all(np.isfinite(x0)):
            return self._fail(SolveStatus.FAILED, "bad input: x0 must be finite", t_start)
        if dist.ndim != 2 or dist.shape[0] < n or not np.all(np.isfinite(dist[:n])):
            return self._fail(SolveStatus.FAILED, "bad input: disturbances", t_start)
        deadline = float(inp.deadline_s)
        left = min(cfg.time_limit_s, deadline - (time.perf_counter() - t_start))
        if left <= 0:
            return self._fail(SolveStatus.TIMEOUT, "no time to solve", t_start, "timeout")
        u_prev = float(np.asarray(inp.u_prev, dtype=float)[self._i_pump])
        known = math.isfinite(u_prev)
        prev_on = known and u_prev > 0.5
        state, run = self._history_now(float(inp.t0), prev_on, known)

        lo = np.asarray(inp.y_low, dtype=float)[: n + 1, self._band]
        hi = np.asarray(inp.y_high, dtype=float)[: n + 1, self._band]
        must_on = np.zeros(n)
        must_off = np.zeros(n)
        if known and state and run < cfg.min_up:
            must_on[: cfg.min_up - run] = 1.0
        if known and not state and run < cfg.min_down:
            must_off[: cfg.min_down - run] = 1.0

        M = self._model if cfg.reuse else self._build(n, dt / 3600.0)
        M.level0.set_value(float(x0[self._i_level]))
        M.prev_on.set_value(1.0 if prev_on else 0.0)
        for k in range(n):
            M.demand[k].set_value(float(dist[k, self._i_dem]))
            M.price[k].set_value(float(dist[k, self._i_price]))
            M.must_on[k].set_value(float(must_on[k]))
            M.must_off[k].set_value(float(must_off[k]))
        big = 1e6  # HiGHS takes an infinite bound too, but a mutable Param must be finite
        for k in range(n + 1):
            M.lo[k].set_value(float(lo[k]) if math.isfinite(lo[k]) else -big)
            M.hi[k].set_value(float(hi[k]) if math.isfinite(hi[k]) else big)
        M.lo[0].set_value(-big)  # the level now is what it is
        M.hi[0].set_value(big)

        solver = self._solver if cfg.reuse else self._new_solver()
        t_solve = time.perf_counter()
        res = solver.solve(
            M,
            time_limit=max(left, 1e-3),
            rel_gap=cfg.mip_rel_gap,
            load_solutions=False,
            raise_exception_on_nonoptimal_result=False,
        )
        solve_s = time.perf_counter() - t_solve
        status, milp_status, gap, why = self._classify(res)
        extra: dict[str, Any] = {
            "milp_status": milp_status,
            "gap": gap,
            "bound": res.objective_bound,
            "highs_s": solve_s,  # pyomo's update plus HiGHS
            "highs_run_s": self._highs_run(res, reused=cfg.reuse),
            "termination": str(res.termination_condition),
        }
        nodes = int(getattr(res.extra_info, "mip_node_count", 0) or 0)
        if not status.usable:
            return self._fail(status, why, t_start, milp_status, extra, nodes)
        res.solution_loader.load_vars()
        plan = np.zeros((n, problem.model.nu))
        plan[:, self._i_pump] = [round(M.on[k].value or 0.0) for k in range(n)]
        self._history = _History(float(inp.t0), state, run)
        xs, ys = problem.model.simulate(x0, plan, dist, problem.p, dt)
        return ControlResult(
            status=status,
            u_plan=plan,
            x_pred=xs,
            y_pred=ys,
            cost=float(res.incumbent_objective),
            iterations=nodes,
            solve_time_s=time.perf_counter() - t_start,
            message="" if status is SolveStatus.SOLVED else f"milp_pump: {why}",
            extra=extra,
        )

    def _highs_run(self, res: Any, reused: bool) -> float:
        """HiGHS's own time for this solve (a persistent HiGHS keeps a running total)."""
        total = float(getattr(res.timing_info, "highs_time", math.nan))
        if not reused:
            return total
        last, self._highs_total = self._highs_total, total
        return total - last

    def _classify(self, res: Any) -> tuple[SolveStatus, str, float, str]:
        from pyomo.contrib.solver.common.results import TerminationCondition as TC

        tc = res.termination_condition
        inc, bound = res.incumbent_objective, res.objective_bound
        has_plan = inc is not None and math.isfinite(inc)
        gap = math.nan
        if has_plan and bound is not None and math.isfinite(bound):
            gap = abs(inc - bound) / max(abs(inc), 1e-9)
        if tc == TC.provenInfeasible or tc == TC.infeasibleOrUnbounded:
            return SolveStatus.INFEASIBLE, "infeasible", gap, "HiGHS: the schedule is infeasible"
        if tc == TC.convergenceCriteriaSatisfied and has_plan:
            if not gap > OPTIMAL_GAP:  # NaN (no bound reported) counts as proven by HiGHS
                return SolveStatus.SOLVED, "optimal", 0.0 if math.isnan(gap) else gap, "optimal"
            return (
                SolveStatus.ACCEPTABLE,
                "feasible_gap",
                gap,
                f"within the gap setting ({gap:.3g})",
            )
        if tc == TC.maxTimeLimit:
            if has_plan:
                return (
                    SolveStatus.ACCEPTABLE,
                    "feasible_gap",
                    gap,
                    f"time limit with a plan, gap {gap:.3g}",
                )
            return SolveStatus.TIMEOUT, "timeout", gap, "time limit before any plan"
        if has_plan and tc == TC.iterationLimit:
            return (
                SolveStatus.ACCEPTABLE,
                "feasible_gap",
                gap,
                f"node/solution limit, gap {gap:.3g}",
            )
        return SolveStatus.FAILED, "failed", gap, f"HiGHS: {tc}"

    def _fail(
        self,
        status: SolveStatus,
        why: str,
        t_start: float,
        milp_status: str = "failed",
        extra: dict[str, Any] | None = None,
        iterations: int = 0,
    ) -> ControlResult:
        assert self._problem is not None
        return ControlResult.failure(
            status,
            self._problem,
            f"milp_pump: {why}",
            time.perf_counter() - t_start,
            iterations=iterations,
            extra={**(extra or {}), "milp_status": milp_status},
        )


KIND = KindOf(Config, PumpScheduler)

__all__ = ["KIND", "OPTIMAL_GAP", "Config", "PumpScheduler", "tank_model"]
