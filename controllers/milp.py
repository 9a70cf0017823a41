"""Pump scheduling as a MILP (Pyomo + HiGHS), built from the scenario's model.

Any discrete-time model with on/off inputs (pumps, switched links) and tanks as states
schedules this way.  The model's one-cycle map and output map are linearised with exact
CasADi Jacobians (``milp_form``): ``x+ = A_k x + B_k u + c_k``, ``y = C_k x + D_k u +
e_k`` per period, with the forecast's disturbances.  A model affine in its states and
inputs (checked at setup at a few random points) is exact in this form; any other is
re-linearised every step around the previous plan, shifted, and ``extra["linearisation"]``
says so.  A model that is not affine only through few on/off inputs (at most
``MAX_COMBINATION_SWITCHES``; a water network's fits blended across pump combinations)
is taken exactly in them (every combination's one-cycle map, ``milp_form.combinations``)
and linearised only in its states and continuous inputs (``switch_combinations``).

Decisions: the inputs over the ``N`` periods, binary for the ``binary`` ones (default:
every input named ``*.on`` or ``*.open``), continuous within their bounds and rate
limits otherwise.  Constraints:

* the bands of ``[specs.bands]`` (tank levels, minimum pressures) at ``k = 1..N``, and
  at ``k = 0`` too for outputs the inputs move at once (a pressure with the pumps);
  ``bands = "hard"`` makes a band the plant cannot hold ``INFEASIBLE``, ``"soft"``
  (default) pays ``slack_price`` per unit and period outside it and reports the
  largest excursion in ``extra["band_slack"]``;
* per binary input, runs of at least ``min_up`` periods, rests of at least ``min_down``
  and at most ``max_starts_per_hour`` starts in any hour, counted across the horizon's
  start from the states applied in earlier cycles (``milp_switching``);
* with ``terminal_slack_m``, the end level of each tank (``terminal_states``, default:
  the states named ``*.level``) at least its level now minus that slack, so a schedule
  cannot save energy by emptying the tanks.  ``terminal_at = "run_end"`` aims at the
  run's end too: once the run's end (``ControlProblem.end_t``) falls within the
  horizon, each tank at least at its level at the run's start (the first cycle this
  controller planned) minus the slack, at the stage where the run ends (none after
  it); before that, the horizon's end at least at the lower of the level now and the
  run's start level (a tank fuller than at the start may come down; the target does
  not ratchet up); without a known end, as above.

With ``bias_gain`` above 0 the plan corrects the model's one-cycle error per state: the
level measured now against what the affine form predicted a cycle ago from the inputs
actually applied, smoothed (``b <- (1 - gain) b + gain error``) and added to every
period's state update, so the end levels hold on the plant and not only on the model
(``extra["bias"]``).

Cost: the priced outputs (``output_costs``, per unit-hour, like the ``linear_mpc``
kind's; default ``{"tariff.cost_per_h" = 1}``) integrated over the periods, plus
``start_cost`` per start.

The Pyomo model is built once with mutable parameters (``milp_build``); each step sets
their values and re-solves with a persistent HiGHS (``reuse = false`` builds everything
anew, for comparison: benchmarks/milp_reuse.py), started from the previous plan shifted
by one period (``warm_start``).  HiGHS gets a time limit (the smaller of ``time_limit_s``
and the cycle's deadline) and a relative gap.  Its outcome is always a value, in
``extra["milp_status"]``:

* ``optimal``: proven optimal (gap below 1e-9)  -> ``SOLVED``
* ``feasible_gap``: a plan, stopped at the gap setting or the time limit, with its
  gap in ``extra["gap"]``  -> ``ACCEPTABLE``
* ``infeasible``  -> ``INFEASIBLE``;  ``timeout``: no plan within the time  -> ``TIMEOUT``
* ``failed``: anything else  -> ``FAILED``

The plan's predicted states and outputs are the model's own simulation of it.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from parallelcity.decide.control import (
    ControlInput,
    ControlProblem,
    ControlResult,
    KindOf,
    SolveStatus,
    guarded_step,
    input_problem,
    require_fit,
    unknown_names,
)
from parallelcity.twin.model import Array, ModelForm

from .milp_build import BIG, Layout, build, warm_highs
from .milp_form import AFFINE_TOLERANCE, AffineForm, Linearisation, switch_combinations
from .milp_switching import SwitchHistory, starts_window

log = logging.getLogger(__name__)

OPTIMAL_GAP = 1e-9  # a smaller relative gap than this counts as proven optimal
DEADLINE_SHARE = 0.97  # of the deadline left: HiGHS stops a little after its time limit
COST_OUTPUT = "tariff.cost_per_h"  # priced by default
BINARY_SUFFIXES = (".on", ".open")  # inputs on/off by default
TERMINAL_SUFFIX = ".level"  # states held at the end of the horizon by default
MAX_COMBINATION_SWITCHES = 4  # at most 16 on/off combinations taken exactly


class Config(BaseModel):
    """``[controller]`` table for ``kind = "milp_pump"``."""

    model_config = ConfigDict(extra="forbid")
    kind: str = "milp_pump"
    binary: list[str] | None = Field(
        None, description="inputs that are on/off (default: those named *.on or *.open)"
    )
    output_costs: dict[str, float] | None = Field(
        None,
        description="output name -> price per unit-hour (default: tariff.cost_per_h = 1)",
    )
    bands: Literal["hard", "soft"] = Field(
        "soft", description="hard: a band that cannot be held is infeasible; soft: priced"
    )
    slack_price: float = Field(
        1e4, gt=0, allow_inf_nan=False, description="cost per unit outside a band per period"
    )
    min_up: int = Field(1, ge=1, description="periods a pump runs at least once started")
    min_down: int = Field(1, ge=1, description="periods it rests at least once stopped")
    max_starts_per_hour: int | None = Field(None, ge=1, description="starts per pump per hour")
    start_cost: float = Field(0.0, ge=0, allow_inf_nan=False, description="cost per start")
    terminal_slack_m: float | None = Field(
        None,
        ge=0,
        allow_inf_nan=False,
        description="end level >= level now minus this (None: no end constraint)",
    )
    terminal_price: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="soft bands: cost per m of end level below that (default: slack_price)",
    )
    terminal_states: list[str] | None = Field(
        None, description="states held at the end (default: those named *.level)"
    )
    terminal_at: Literal["horizon", "run_end"] = Field(
        "horizon",
        description="horizon: each horizon's end >= the level now; run_end: the run's end "
        ">= the level at the run's start once it is within the horizon, before that each "
        "horizon's end >= the lower of the level now and the run's start level",
    )
    bias_gain: float = Field(
        0.0,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="smoothing gain of the per-state correction of the model's one-cycle "
        "error (0: none)",
    )
    time_limit_s: float = Field(10.0, gt=0, description="HiGHS wall-time limit per solve")
    mip_rel_gap: float = Field(1e-6, ge=0, le=1, description="stop within this relative gap")
    reuse: bool = Field(True, description="mutable parameters + persistent HiGHS")
    warm_start: bool = Field(True, description="start HiGHS from the previous plan, shifted")
    switch_combinations: bool = Field(
        True,
        description="a model not affine in its on/off inputs, with at most "
        f"{MAX_COMBINATION_SWITCHES} of them: every on/off combination taken exactly",
    )
    require_affine: bool = Field(
        False, description="refuse a model that is not affine in its states and inputs"
    )

    @field_validator("output_costs")
    @classmethod
    def _finite(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        bad = [k for k, w in (v or {}).items() if not math.isfinite(w)]
        if bad:
            raise ValueError(f"values must be finite ({', '.join(bad)})")
        return v

    def binary_inputs(self, inputs: tuple[str, ...]) -> list[str]:
        if self.binary is not None:
            return list(self.binary)
        return [name for name in inputs if name.endswith(BINARY_SUFFIXES)]

    def costs(self, outputs: tuple[str, ...]) -> dict[str, float]:
        if self.output_costs is not None:
            return dict(self.output_costs)
        return {COST_OUTPUT: 1.0} if COST_OUTPUT in outputs else {}

    def terminal(self, states: tuple[str, ...]) -> list[str]:
        if self.terminal_slack_m is None and self.terminal_at == "horizon":
            return []
        if self.terminal_states is not None:
            return list(self.terminal_states)
        return [name for name in states if name.endswith(TERMINAL_SUFFIX)]

    def problems(self, problem: ControlProblem) -> list[str]:
        """What in this table does not fit the problem (checked by ``validate``)."""
        m = problem.model
        if m.form is not ModelForm.DISCRETE:
            return [
                f"kind: 'milp_pump' schedules a discrete-time model; model {m.name!r} is "
                "continuous-time (use nmpc or linear_mpc)"
            ]
        out = [
            f"binary[{i}]: {name!r} is not an input of model {m.name!r} "
            f"(inputs: {', '.join(m.inputs)})"
            for i, name in enumerate(self.binary or [])
            if name not in m.inputs
        ]
        out += [
            f"terminal_states[{i}]: {name!r} is not a state of model {m.name!r} "
            f"(states: {', '.join(m.states)})"
            for i, name in enumerate(self.terminal_states or [])
            if name not in m.states
        ]
        if self.output_costs is None and COST_OUTPUT not in m.outputs:
            out.append(
                f"output_costs: not given, and model {m.name!r} has no output "
                f"{COST_OUTPUT!r} to price by default: name the priced outputs"
            )
        out += unknown_names("output_costs", self.output_costs or {}, m.outputs, "output", m.name)
        if out:
            return out
        try:
            lin = Linearisation(m, problem.dt)
            change = lin.affinity(
                np.asarray(m.x0, dtype=float),
                np.asarray(problem.u_min, dtype=float),
                np.asarray(problem.u_max, dtype=float),
                np.asarray(m.forecast(0.0, 1, problem.dt), dtype=float)[0],
                np.asarray(problem.p, dtype=float),
            )
        except Exception as exc:  # the model's own error, reported as a line
            return [f"kind: 'milp_pump' cannot linearise model {m.name!r}: {exc}"]
        if not math.isfinite(change):
            return [f"kind: model {m.name!r} has non-finite Jacobians at its initial state"]
        if self.require_affine and change > AFFINE_TOLERANCE:
            out.append(
                f"require_affine: model {m.name!r} is not affine in its states and inputs "
                f"(its Jacobians change by {change:.2g} between points)"
            )
        return out


class PumpScheduler:
    """Controller kind ``milp_pump``; see the module docstring."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._problem: ControlProblem | None = None
        self._model: Any = None
        self._solver: Any = None
        self._highs_total = 0.0
        self._last: tuple[float, Array] | None = None  # (t0, plan) of the last usable step
        self._reserve_s = 0.0  # a step's wall time outside HiGHS's run, kept off the deadline
        self._x_start: Array | None = None  # the states the run started from
        self._bias: Array = np.zeros(0)  # per state, added to each period's update
        self._one_step: tuple[float, Array, Array] | None = None  # t0, x0, d0 of the last step
        self._gf: tuple[Array, Array] | None = None  # per-combination constants this cycle

    # ---------------------------------------------------------------- setup

    def setup(self, problem: ControlProblem) -> None:
        cfg, m = self.config, problem.model
        require_fit("milp_pump", cfg.problems(problem))
        if problem.horizon < 1:
            raise ValueError(f"milp_pump: horizon must be at least 1, got {problem.horizon}")
        lin = Linearisation(m, problem.dt)
        u_lo = np.asarray(problem.u_min, dtype=float)
        u_hi = np.asarray(problem.u_max, dtype=float)
        d0 = np.asarray(m.forecast(0.0, 1, problem.dt), dtype=float)[0]
        change = lin.affinity(np.asarray(m.x0, dtype=float), u_lo, u_hi, d0, problem.p)
        self._affine = change <= AFFINE_TOLERANCE
        self._lin_note = (
            "affine"
            if self._affine
            else f"re-linearised every step: the model is not affine (Jacobians change by "
            f"{change:.2g} between points)"
        )
        binary = tuple(m.index("inputs", name) for name in cfg.binary_inputs(m.inputs))
        window = starts_window(problem.dt)
        combos: tuple[tuple[int, ...], ...] = ()
        few = 0 < len(binary) <= MAX_COMBINATION_SWITCHES
        if not self._affine and cfg.switch_combinations and few:
            combos = tuple(switch_combinations(len(binary)))
            self._lin_note = (
                f"every combination of its {len(binary)} on/off inputs, linearised in "
                "the rest around the previous plan: the model is not affine"
            )
        if not self._affine:
            log.info("milp_pump: model %s %s", m.name, self._lin_note)
        self._lay = Layout(
            n=problem.horizon,
            dt_h=problem.dt / 3600.0,
            nx=m.nx,
            nu=m.nu,
            binary=binary,
            u_lo=tuple(float(v) for v in u_lo),
            u_hi=tuple(float(v) for v in u_hi),
            du_max=tuple(float(v) for v in np.asarray(problem.du_max, dtype=float)),
            mask_A=lin.mask_A,
            mask_B=lin.mask_B,
            mask_C=lin.mask_C,
            mask_D=lin.mask_D,
            banded=tuple(problem.banded_outputs),
            priced={m.index("outputs", k): w for k, w in cfg.costs(m.outputs).items()},
            terminal=tuple(m.index("states", s) for s in cfg.terminal(m.states)),
            soft=cfg.bands == "soft",
            slack_price=cfg.slack_price,
            terminal_price=cfg.terminal_price or cfg.slack_price,
            min_up=cfg.min_up,
            min_down=cfg.min_down,
            max_starts=cfg.max_starts_per_hour,
            window=window,
            start_cost=cfg.start_cost,
            combos=combos,
        )
        self._lin = lin
        self._problem = problem
        self._history = SwitchHistory(problem.dt, max(cfg.min_up, cfg.min_down, window))
        self._last = None
        self._model = build(self._lay) if cfg.reuse else None
        self._solver = warm_highs() if cfg.reuse else None
        if self._solver is not None:  # load HiGHS now, not in the first cycle's time
            self._solver.set_instance(self._model)
        self._highs_total = 0.0
        self._reserve_s = 0.0
        self._x_start = None
        self._bias = np.zeros(m.nx)
        self._one_step = None

    # ----------------------------------------------------------------- step

    def step(self, inp: ControlInput) -> ControlResult:
        return guarded_step("milp_pump", self._problem, inp, self._step, self._forget)

    def _forget(self) -> None:
        self._last = None

    def _base(self, inp: ControlInput, x0: Array, dist: Array) -> tuple[Array, Array]:
        """States and inputs to linearise around: the previous plan shifted to this
        cycle (else the applied input held), simulated on the model."""
        problem = self._problem
        assert problem is not None
        m, n = problem.model, problem.horizon
        u = self._shifted(float(inp.t0))
        if u is None:
            held = np.asarray(inp.u_prev, dtype=float)
            held = np.where(np.isfinite(held), held, m.u0)
            u = np.tile(held, (n, 1))
        if self._affine:  # any point is exact: skip the simulation
            return np.tile(x0, (n + 1, 1)), u
        xs, _ = m.simulate(x0, u, dist, problem.p, problem.dt)
        return xs, u

    def _shifted(self, t0: float) -> Array | None:
        """The last plan moved to start at ``t0`` (its last period repeated)."""
        if self._last is None or self._problem is None:
            return None
        dt = float(self._problem.dt)
        t_last, plan = self._last
        shift = round((t0 - t_last) / dt)
        if shift < 0 or shift >= plan.shape[0] or abs(t0 - t_last - shift * dt) > 1e-6 * dt:
            return None
        return np.vstack([plan[shift:], np.repeat(plan[-1:], shift, axis=0)])

    def _step(self, problem: ControlProblem, inp: ControlInput, t_start: float) -> ControlResult:
        cfg, lay = self.config, self._lay
        n, dt = problem.horizon, float(problem.dt)
        why = input_problem(problem, inp)
        if why:
            return self._fail(SolveStatus.FAILED, f"bad input: {why}", t_start)
        deadline = float(inp.deadline_s)
        x0 = np.asarray(inp.x0, dtype=float)
        dist = np.asarray(inp.disturbances, dtype=float)[:n]
        u_prev = np.asarray(inp.u_prev, dtype=float)
        if lay.binary:
            self._history.observe(float(inp.t0), u_prev[list(lay.binary)])
        carry = self._history.carry(n, len(lay.binary), cfg.min_up, cfg.min_down, lay.window)

        if self._x_start is None:
            self._x_start = x0.copy()
        xb, ub = self._base(inp, x0, dist)
        p = np.asarray(problem.p, dtype=float)
        form = self._lin.at(xb, ub, dist, p)
        self._gf = None
        if lay.combos:
            form, g, f = self._lin.combinations(form, xb, ub, dist, p, lay.binary)
            self._gf = (g, f)
        self._learn_bias(float(inp.t0), x0, u_prev)
        self._one_step = (float(inp.t0), x0, dist[0])
        if cfg.bias_gain > 0:
            form = replace(form, c=form.c + self._bias)
        end_stage, run_end = self._end_stage(float(inp.t0))
        M = self._model if cfg.reuse else build(lay)
        ref = x0
        if cfg.terminal_at == "run_end" and self._x_start is not None:
            # before the end is in view, never above the run's start: no ratchet upwards
            ref = self._x_start if run_end else np.minimum(x0, self._x_start)
        self._set(M, form, inp, x0, u_prev, carry, end_stage, ref)
        solver = self._solver if cfg.reuse else warm_highs()
        warm = self._shifted(float(inp.t0)) if cfg.warm_start else None
        solver.start = None if warm is None else self._start(M, warm, carry.prev, form, x0)

        remaining = deadline - (time.perf_counter() - t_start) - self._reserve_s
        left = min(cfg.time_limit_s, DEADLINE_SHARE * remaining)
        if left <= 0:
            return self._fail(SolveStatus.TIMEOUT, "no time to solve", t_start, "timeout")
        t_solve = time.perf_counter()
        res = solver.solve(
            M,
            time_limit=max(left, 1e-3),
            rel_gap=cfg.mip_rel_gap,
            load_solutions=False,
            raise_exception_on_nonoptimal_result=False,
        )
        solve_s = time.perf_counter() - t_solve
        status, milp_status, gap, why = classify(res)
        extra: dict[str, Any] = {
            "milp_status": milp_status,
            "gap": gap,
            "bound": res.objective_bound,
            "highs_s": solve_s,  # pyomo's update plus HiGHS
            "highs_run_s": self._highs_run(res, reused=cfg.reuse),
            "termination": str(res.termination_condition),
            "linearisation": self._lin_note,
            "warm_start": warm is not None,
            "warm_start_accepted": solver.start_accepted,
            "terminal_stage": end_stage,
            "terminal_run_end": run_end,
            "bias": [float(v) for v in self._bias],
        }
        nodes = int(getattr(res.extra_info, "mip_node_count", 0) or 0)
        if not status.usable:
            return self._fail(status, why, t_start, milp_status, extra, nodes)
        res.solution_loader.load_vars()
        plan = self._plan(M)
        extra.update(self._slacks(M))
        extra["starts"] = round(sum(M.start[kb].value or 0.0 for kb in M.start))
        self._last = (float(inp.t0), plan)
        xs, ys = problem.model.simulate(x0, plan, dist, problem.p, dt)
        total = time.perf_counter() - t_start
        self._learn_reserve(total - extra["highs_run_s"])
        return ControlResult(
            status=status,
            u_plan=plan,
            x_pred=xs,
            y_pred=ys,
            cost=float(res.incumbent_objective),
            iterations=nodes,
            solve_time_s=total,
            message="" if status is SolveStatus.SOLVED else f"milp_pump: {why}",
            extra=extra,
        )

    def _end_stage(self, t0: float) -> tuple[int, bool]:
        """The stage whose states the end constraint holds (0: none this cycle), and
        whether it is the run's end (held at the run's start levels, else at those now)."""
        problem = self._problem
        assert problem is not None
        n = problem.horizon
        if self.config.terminal_at == "horizon" or problem.end_t is None:
            return n, False
        left = round((problem.end_t - t0) / problem.dt)
        return (left, True) if 1 <= left <= n else (0 if left < 1 else n, False)

    def _learn_bias(self, t0: float, x0: Array, u_prev: Array) -> None:
        """Move the bias towards the model's error over the cycle that just ended (its
        one-cycle map from the states then under the inputs applied since)."""
        gain, last = self.config.bias_gain, self._one_step
        if gain <= 0 or last is None or self._problem is None:
            return
        t_last, x_last, d_last = last
        problem = self._problem
        dt = float(problem.dt)
        if abs(t0 - t_last - dt) > 1e-6 * dt or not np.all(np.isfinite(u_prev)):
            return  # not the next cycle, or the applied inputs are unknown
        xs, _ = problem.model.simulate(x_last, u_prev[None, :], d_last[None, :], problem.p, dt)
        error = x0 - xs[1]
        self._bias = (1.0 - gain) * self._bias + gain * error

    def _set(
        self,
        M: Any,
        form: AffineForm,
        inp: ControlInput,
        x0: Array,
        u_prev: Array,
        carry: Any,
        end_stage: int,
        ref: Array,
    ) -> None:
        """Every mutable parameter from this cycle's numbers."""
        lay, cfg = self._lay, self.config
        n = lay.n
        for r in range(lay.nx):
            M.x0[r].set_value(float(x0[r]))
        for params, values in (
            (M.A, form.A),
            (M.B, form.B),
            (M.c, form.c),
            (M.C, form.C),
            (M.D, form.D),
            (M.e, form.e),
        ):  # each Pyomo parameter is indexed as its array: (k, row, column) or (k, row)
            for index, par in params.items():
                par.set_value(float(values[index]))
        lo = np.asarray(inp.y_low, dtype=float)[: n + 1]
        hi = np.asarray(inp.y_high, dtype=float)[: n + 1]
        for (k, b), par in M.lo.items():
            par.set_value(float(np.clip(lo[k, b], -BIG, BIG)) if lay.banded else -BIG)
        for (k, b), par in M.hi.items():
            par.set_value(float(np.clip(hi[k, b], -BIG, BIG)) if lay.banded else BIG)
        drop = float(cfg.terminal_slack_m or 0.0)
        for r in range(lay.nx):
            M.x_ref[r].set_value(float(ref[r]) - drop if end_stage else -BIG)
        for k in range(1, n + 1):
            M.at[k].set_value(1.0 if k == end_stage else 0.0)
        if self._gf is not None:
            g, f = self._gf
            for (k, s, r), par in M.g.items():
                par.set_value(float(g[k, s, r]))
            for (k, s, j), par in M.f.items():
                par.set_value(float(f[k, s, j]))
        for b in range(len(lay.binary)):
            M.prev_on[b].set_value(float(carry.prev[b]))
            for k in range(n):
                M.must_on[k, b].set_value(float(carry.must_on[k, b]))
                M.must_off[k, b].set_value(float(carry.must_off[k, b]))
                M.past_starts[k, b].set_value(float(carry.past_starts[k, b]))
        for i in range(lay.nu):
            known = math.isfinite(float(u_prev[i]))
            M.u_prev[i].set_value(float(u_prev[i]) if known else 0.0)
            du = lay.du_max[i]
            M.move0[i].set_value(du if known and math.isfinite(du) else BIG)

    def _start(
        self, M: Any, plan: Array, prev: Array, form: AffineForm, x0: Array
    ) -> list[tuple[Any, float]]:
        """A complete start for HiGHS: the shifted plan, the states and outputs it makes on
        the affine form, its switches and slacks (HiGHS checks it; a partial one would
        need a repair LP that a persistent HiGHS's running clock can time out)."""
        lay = self._lay
        n = lay.n
        u = plan.copy()
        u[:, list(lay.binary)] = np.round(u[:, list(lay.binary)])
        combo = self._combo_index(u)
        g, f = self._gf if self._gf is not None else (None, None)
        xs = np.empty((n + 1, lay.nx))
        xs[0] = x0
        for k in range(n):
            xs[k + 1] = form.A[k] @ xs[k] + form.B[k] @ u[k] + form.c[k]
            if g is not None:
                xs[k + 1] += g[k, combo[k]]
        start = [(M.u[k, i], float(u[k, i])) for k in range(n) for i in range(lay.nu)]
        ns = len(lay.combos)
        start += [(M.z[k, s], float(s == combo[k])) for k in range(n) for s in range(ns)]
        start += [(M.x[k, r], float(xs[k, r])) for k in range(n + 1) for r in range(lay.nx)]
        for b, i in enumerate(lay.binary):
            before = float(prev[b])
            for k in range(n):
                now = float(u[k, i])
                start += [(M.start[k, b], float(now > before)), (M.stop[k, b], float(now < before))]
                before = now
        if lay.soft:
            for (k, b), var in M.slack.items():
                j = lay.banded[b]
                ku = min(k, n - 1)
                y = form.C[k, j] @ xs[k] + form.D[k, j] @ u[ku] + form.e[k, j]
                if f is not None:
                    y += f[k, combo[ku], j]
                gap = max(0.0, M.lo[k, b].value - y, y - M.hi[k, b].value)
                start.append((var, float(gap)))
            at = np.array([M.at[k].value for k in range(1, n + 1)])
            for r, var in getattr(M, "tslack", {}).items():
                short = M.x_ref[r].value - float(at @ xs[1:, r])
                start.append((var, float(max(0.0, short))))
        return start

    def _combo_index(self, u: Array) -> list[int]:
        """Per stage, the index of its on/off combination in ``Layout.combos``."""
        lay = self._lay
        if not lay.combos:
            return [0] * u.shape[0]
        where = {c: s for s, c in enumerate(lay.combos)}
        return [where[tuple(int(v > 0.5) for v in row[list(lay.binary)])] for row in u]

    def _plan(self, M: Any) -> Array:
        lay = self._lay
        plan = np.array(
            [[float(M.u[k, i].value or 0.0) for i in range(lay.nu)] for k in range(lay.n)]
        )
        for i in range(lay.nu):
            if i in lay.binary:
                plan[:, i] = np.round(plan[:, i])
            lo = lay.u_lo[i] if math.isfinite(lay.u_lo[i]) else -np.inf
            plan[:, i] = np.clip(plan[:, i], lo, lay.u_hi[i])
        return plan

    def _slacks(self, M: Any) -> dict[str, float]:
        """The largest band and end-level shortfalls the plan accepts (0 when hard)."""
        if not self._lay.soft:
            return {"band_slack": 0.0, "terminal_slack": 0.0}
        band = max((float(v.value or 0.0) for v in M.slack.values()), default=0.0)
        end = max((float(v.value or 0.0) for v in getattr(M, "tslack", {}).values()), default=0.0)
        return {"band_slack": band, "terminal_slack": end}

    def _learn_reserve(self, outside_s: float) -> None:
        """The time HiGHS's limit leaves for the rest of a step (a moving average)."""
        if math.isfinite(outside_s) and outside_s > 0:
            r = self._reserve_s
            self._reserve_s = outside_s if r == 0.0 else 0.7 * r + 0.3 * outside_s

    def _highs_run(self, res: Any, reused: bool) -> float:
        """HiGHS's own time for this solve (a persistent HiGHS keeps a running total)."""
        total = float(getattr(res.timing_info, "highs_time", math.nan))
        if not reused:
            return total
        last, self._highs_total = self._highs_total, total
        return total - last

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


def classify(res: Any) -> tuple[SolveStatus, str, float, str]:
    """HiGHS's termination as (status, milp_status, gap, why)."""
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
        return SolveStatus.ACCEPTABLE, "feasible_gap", gap, f"within the gap setting ({gap:.3g})"
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
        return SolveStatus.ACCEPTABLE, "feasible_gap", gap, f"node/solution limit, gap {gap:.3g}"
    return SolveStatus.FAILED, "failed", gap, f"HiGHS: {tc}"


KIND = KindOf(Config, PumpScheduler)

__all__ = ["KIND", "OPTIMAL_GAP", "Config", "PumpScheduler", "classify"]
