"""Baseline controllers: PI loops with weather compensation, and plain hold.

Both plan over the whole horizon like the NMPC does, because every plan is
verified over the horizon: the PI plan is its own closed loop simulated on the
model with the forecast disturbances, the hold plan is the held input.
Plans always respect input bounds and rate limits.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

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
from parallelcity.twin.model import Array, SubsystemModel

LIMIT_TOLERANCE = 1e-6


class _Limits:
    """Input bounds and rate limits of a problem, applied move by move."""

    def __init__(self, problem: ControlProblem) -> None:
        nu = problem.model.nu
        self.u_min = np.asarray(problem.u_min, dtype=float)
        self.u_max = np.asarray(problem.u_max, dtype=float)
        self.du_max = np.asarray(problem.du_max, dtype=float)
        if any(a.shape != (nu,) for a in (self.u_min, self.u_max, self.du_max)):
            raise ValueError(f"u_min, u_max and du_max must each have {nu} entries")

    def start(self, u_prev: Array, fallback: Array) -> Array:
        """The applied input, with unknown entries replaced by ``fallback`` (clipped)."""
        u = np.asarray(u_prev, dtype=float)
        return np.where(np.isfinite(u), u, np.clip(fallback, self.u_min, self.u_max))

    def move(self, target: Array, prev: Array) -> Array:
        """``target`` moved at most ``du_max`` from ``prev``, then put within bounds."""
        step = np.clip(target - prev, -self.du_max, self.du_max)
        return np.clip(prev + step, self.u_min, self.u_max)

    def broken(self, u_prev: Array, plan: Array) -> str:
        """Why ``plan`` breaks a limit (only possible when ``u_prev`` is far out of bounds)."""
        prev = np.vstack([u_prev[None, :], plan[:-1]])
        rate = np.abs(plan - prev) - self.du_max
        if np.nanmax(rate) > LIMIT_TOLERANCE:
            k, i = np.unravel_index(int(np.nanargmax(rate)), rate.shape)
            return (
                f"input {i} cannot reach its bounds from {u_prev[i]:.4g} without breaking "
                f"its rate limit (step {k})"
            )
        return ""


class _Simulator:
    """One-step plant model with the controller's parameters."""

    def __init__(self, problem: ControlProblem) -> None:
        m = problem.model
        self.step = m.step_function(problem.dt)
        self.h = m.h
        self.p = np.asarray(problem.p, dtype=float)
        self.sim = self.step.mapaccum(problem.horizon)
        self.out = m.h.map(problem.horizon + 1)

    def next(self, x: Array, u: Array, d: Array) -> Array:
        return np.asarray(self.step(x, u, d, self.p), dtype=float).ravel()

    def y(self, x: Array, u: Array, d: Array) -> Array:
        return np.asarray(self.h(x, u, d, self.p), dtype=float).ravel()

    def plan(self, x0: Array, plan: Array, dist: Array) -> tuple[Array, Array]:
        """States and outputs along ``plan``; the last output reuses the last input."""
        n = plan.shape[0]
        xs = np.empty((n + 1, x0.shape[0]))
        xs[0] = x0
        xs[1:] = np.asarray(self.sim(x0, plan.T, dist[:n].T, self.p)).T
        u_ext = np.vstack([plan, plan[-1:]])
        d_ext = np.vstack([dist[:n], dist[n - 1 : n]])
        ys = np.asarray(self.out(xs.T, u_ext.T, d_ext.T, self.p)).T
        return xs, ys


def _result(
    problem: ControlProblem,
    limits: _Limits,
    sim: _Simulator,
    inp: ControlInput,
    u_start: Array,
    plan: Array,
    xs: Array | None,
    t_start: float,
) -> ControlResult:
    trouble = limits.broken(u_start, plan)
    if trouble:
        return ControlResult.failure(
            SolveStatus.INFEASIBLE, problem, trouble, time.perf_counter() - t_start
        )
    dist = np.asarray(inp.disturbances, dtype=float)
    if xs is None:
        xs, ys = sim.plan(np.asarray(inp.x0, dtype=float), plan, dist)
    else:
        n = plan.shape[0]
        u_ext = np.vstack([plan, plan[-1:]])
        d_ext = np.vstack([dist[:n], dist[n - 1 : n]])
        ys = np.asarray(sim.out(xs.T, u_ext.T, d_ext.T, sim.p)).T
    return ControlResult(
        status=SolveStatus.SOLVED,
        u_plan=plan,
        x_pred=xs,
        y_pred=ys,
        cost=float("nan"),
        iterations=0,
        solve_time_s=time.perf_counter() - t_start,
    )


# ---------------------------------------------------------------------- PI


class Loop(BaseModel):
    """A PI loop holding a banded output at its band's low edge plus an offset."""

    model_config = ConfigDict(extra="forbid")
    output: str = Field(description="banded output the loop controls")
    input: str = Field(description="input it moves (more input raises the output)")
    setpoint_offset_k: float = Field(0.0, description="setpoint above the band's low edge")
    kp: float = Field(ge=0, description="proportional gain, input units per output unit")
    ki_per_h: float = Field(ge=0, description="integral gain, input units per output unit-hour")
    setpoint_lead_h: float = Field(
        0.0,
        ge=0,
        description="take the highest band low edge of the coming hours (preheat); 0: current",
    )


class Curve(BaseModel):
    """An input set from a disturbance by a piecewise-linear curve (e.g. heating curve)."""

    model_config = ConfigDict(extra="forbid")
    input: str
    disturbance: str
    points: list[tuple[float, float]] = Field(
        min_length=2, description="[disturbance, input] pairs, disturbance increasing"
    )

    @field_validator("points")
    @classmethod
    def _increasing(cls, v: list[tuple[float, float]]) -> list[tuple[float, float]]:
        xs = [p[0] for p in v]
        if any(b <= a for a, b in itertools.pairwise(xs)):
            raise ValueError(f"curve points must have strictly increasing x, got {xs}")
        if not all(math.isfinite(c) for p in v for c in p):
            raise ValueError("curve points must be finite")
        return v


def _loop_problems(
    loops: Sequence[Loop | OnOffLoop], problem: ControlProblem, used: dict[str, str]
) -> list[str]:
    """Each loop watches a banded output of the model and moves an input no other loop or
    curve moves (``used``: input -> the key that moves it, filled in here)."""
    m, out = problem.model, []
    banded = {m.outputs[j] for j in problem.banded_outputs}
    for i, lp in enumerate(loops):
        key = f"loops[{i}]"
        bad = unknown_names(f"{key}.output", [lp.output], m.outputs, "output", m.name, keyed=False)
        if not bad and lp.output not in banded:
            bad = [f"{key}.output: {lp.output!r} has no band ([[specs.bands]]) to follow"]
        out += bad
        out += _input_problems(key, lp.input, m, used)
    return out


def _input_problems(key: str, name: str, m: SubsystemModel, used: dict[str, str]) -> list[str]:
    bad = unknown_names(f"{key}.input", [name], m.inputs, "input", m.name, keyed=False)
    if not bad and name in used:
        bad = [f"{key}.input: {name!r} is already set by {used[name]}"]
    used.setdefault(name, key)
    return bad


class PIConfig(BaseModel):
    """``[fallback]`` (or ``[controller]``) table for ``kind = "pi"``."""

    model_config = ConfigDict(extra="forbid")
    kind: str = "pi"
    loops: list[Loop] = Field(default_factory=list)
    curves: list[Curve] = Field(default_factory=list)

    def problems(self, problem: ControlProblem) -> list[str]:
        """What the loops and curves name that does not fit the problem (``validate``)."""
        m, used = problem.model, dict[str, str]()
        out = _loop_problems(self.loops, problem, used)
        for i, c in enumerate(self.curves):
            out += _input_problems(f"curves[{i}]", c.input, m, used)
            out += unknown_names(
                f"curves[{i}].disturbance",
                [c.disturbance],
                m.disturbances,
                "disturbance",
                m.name,
                keyed=False,
            )
        return out


@dataclass(frozen=True)
class _LoopIx:
    output: int  # model output index
    band: int  # column among the banded outputs
    input: int
    offset: float
    kp: float
    ki_per_s: float
    lead: int  # steps of band looked ahead for the setpoint


@dataclass(frozen=True)
class _Memory:
    t0: float  # cycle the errors belong to
    before: Array  # error of the cycle before it (what that step used as e_{k-1})
    error: Array  # error at t0


class PIController:
    """Velocity-form PI loops plus heating curves; other inputs are held."""

    def __init__(self, config: PIConfig) -> None:
        self.config = config
        self._problem: ControlProblem | None = None
        self._memory: _Memory | None = None

    @property
    def previous_error(self) -> Array | None:
        """Loop errors of the last cycle planned (in loop order), None before the first."""
        return None if self._memory is None else self._memory.error.copy()

    def setup(self, problem: ControlProblem) -> None:
        require_fit("pi", self.config.problems(problem))
        m = problem.model
        banded = list(problem.banded_outputs)
        loops = []
        for lp in self.config.loops:
            j = m.index("outputs", lp.output)
            loops.append(
                _LoopIx(
                    j,
                    banded.index(j),
                    m.index("inputs", lp.input),
                    lp.setpoint_offset_k,
                    lp.kp,
                    lp.ki_per_h / 3600.0,
                    round(lp.setpoint_lead_h * 3600.0 / problem.dt),
                )
            )
        curves = []
        for cv in self.config.curves:
            pts = np.asarray(cv.points, dtype=float)
            curves.append(
                (m.index("inputs", cv.input), m.index("disturbances", cv.disturbance), pts)
            )
        self._limits = _Limits(problem)
        self._sim = _Simulator(problem)
        self._loops = loops
        self._curves = curves
        self._problem = problem
        self._memory = None

    def step(self, inp: ControlInput) -> ControlResult:
        return guarded_step("pi", self._problem, inp, self._step)

    def _step(self, problem: ControlProblem, inp: ControlInput, t_start: float) -> ControlResult:
        bad = input_problem(problem, inp, bands=False)
        n, dt = problem.horizon, float(problem.dt)
        y_low = np.asarray(inp.y_low, dtype=float)
        if not bad and self._loops and (y_low.ndim != 2 or y_low.shape[0] < n + 1):
            bad = f"y_low must be ({n + 1}, {len(problem.banded_outputs)})"
        if bad:
            return ControlResult.failure(
                SolveStatus.FAILED, problem, f"pi: bad input: {bad}", time.perf_counter() - t_start
            )
        lim, sim = self._limits, self._sim
        dist = np.asarray(inp.disturbances, dtype=float)
        u_start = lim.start(inp.u_prev, problem.model.u0)
        t0 = float(inp.t0)

        mem = self._memory
        e_prev: Array | None = None
        if mem is not None:
            if abs(t0 - mem.t0) < 1e-6 * dt:  # the same cycle asked again
                e_prev = mem.before
            elif abs(t0 - mem.t0 - dt) < 0.5 * dt:  # the next cycle
                e_prev = mem.error
            # otherwise a gap (e.g. the fallback was not asked for a while): restart bumpless

        x = np.asarray(inp.x0, dtype=float)
        u = u_start
        plan = np.empty((n, problem.model.nu))
        xs = np.empty((n + 1, problem.model.nx))
        xs[0] = x
        first: tuple[Array, Array] | None = None
        for k in range(n):
            d = dist[k]
            target = u.copy()
            if self._loops:
                y = sim.y(x, u, d)
                e = np.array(
                    [
                        y_low[k : k + lp.lead + 1, lp.band].max() + lp.offset - y[lp.output]
                        for lp in self._loops
                    ]
                )
                # a band without a finite low edge gives no setpoint: that loop holds
                e = np.where(np.isfinite(e), e, 0.0)
                if e_prev is None:
                    e_prev = e
                for i, lp in enumerate(self._loops):
                    target[lp.input] = (
                        u[lp.input] + lp.kp * (e[i] - e_prev[i]) + lp.ki_per_s * dt * e[i]
                    )
                if first is None:
                    first = (e_prev, e)
                e_prev = e
            for i_in, i_d, pts in self._curves:
                target[i_in] = np.interp(d[i_d], pts[:, 0], pts[:, 1])
            u = lim.move(target, u)
            plan[k] = u
            x = sim.next(x, u, d)
            xs[k + 1] = x

        result = _result(problem, lim, sim, inp, u_start, plan, xs, t_start)
        if first is not None and result.status.usable:  # advance by the first step only
            self._memory = _Memory(t0, first[0], first[1])
        return result


PI_KIND = KindOf(PIConfig, PIController)


# -------------------------------------------------------------------- hold


class HoldConfig(BaseModel):
    """``kind = "hold"``: keep the applied inputs, or drive some to fixed values."""

    model_config = ConfigDict(extra="forbid")
    kind: str = "hold"
    values: dict[str, float] = Field(
        default_factory=dict, description="input name -> value to hold (others keep u_prev)"
    )

    def problems(self, problem: ControlProblem) -> list[str]:
        """Inputs ``values`` names that the model lacks (checked by ``validate``)."""
        m = problem.model
        return unknown_names("values", self.values, m.inputs, "input", m.name) + [
            f"values[{name!r}]: must be finite, got {v}"
            for name, v in self.values.items()
            if not math.isfinite(v)
        ]


class HoldController:
    """No control: the plan holds the inputs (moving to ``values`` within rate limits)."""

    def __init__(self, config: HoldConfig) -> None:
        self.config = config
        self._problem: ControlProblem | None = None

    def setup(self, problem: ControlProblem) -> None:
        require_fit("hold", self.config.problems(problem))
        m = problem.model
        self._fixed = {m.index("inputs", k): v for k, v in self.config.values.items()}
        self._limits = _Limits(problem)
        self._sim = _Simulator(problem)
        self._problem = problem

    def step(self, inp: ControlInput) -> ControlResult:
        return guarded_step("hold", self._problem, inp, self._step, check_input=False)

    def _step(self, problem: ControlProblem, inp: ControlInput, t_start: float) -> ControlResult:
        lim = self._limits
        u_start = lim.start(inp.u_prev, problem.model.u0)
        target = u_start.copy()
        for i, v in self._fixed.items():
            target[i] = v
        plan = np.empty((problem.horizon, problem.model.nu))
        u = u_start
        for k in range(problem.horizon):
            u = lim.move(target, u)
            plan[k] = u
        return _result(problem, lim, self._sim, inp, u_start, plan, None, t_start)


HOLD_KIND = KindOf(HoldConfig, HoldController)

# --------------------------------------------------------------- hysteresis


class OnOffLoop(BaseModel):
    """An on/off loop keeping a banded output inside its band (thermostat, tank level)."""

    model_config = ConfigDict(extra="forbid")
    output: str = Field(description="banded output the loop watches")
    input: str = Field(description="input it switches")
    on_value: float = Field(description="input value when on")
    off_value: float = Field(description="input value when off")
    raises: bool = Field(True, description="on raises the output (heater, filling pump)")
    margin: float = Field(
        0.0, ge=0, description="switch this far inside the band edges (narrows the dead band)"
    )


class HysteresisConfig(BaseModel):
    """``kind = "hysteresis"``: on/off loops with a dead band; other inputs are held."""

    model_config = ConfigDict(extra="forbid")
    kind: str = "hysteresis"
    loops: list[OnOffLoop] = Field(default_factory=list)

    def problems(self, problem: ControlProblem) -> list[str]:
        """What the loops name that does not fit the problem (checked by ``validate``)."""
        out = _loop_problems(self.loops, problem, {})
        for i, sw in enumerate(self.loops):
            if sw.on_value == sw.off_value:
                out.append(f"loops[{i}]: on_value and off_value must differ")
        return out


class HysteresisController:
    """Switch on at one edge of the band, off at the other, hold in between.

    The state of each loop is read from the input applied in the field (nearer
    ``on_value`` means on), so the controller keeps no memory between cycles; the plan
    is the switching rule simulated on the model over the horizon, moved within the
    rate limits and bounds.
    """

    def __init__(self, config: HysteresisConfig) -> None:
        self.config = config
        self._problem: ControlProblem | None = None

    def setup(self, problem: ControlProblem) -> None:
        require_fit("hysteresis", self.config.problems(problem))
        m = problem.model
        banded = list(problem.banded_outputs)
        loops = [
            (
                banded.index(m.index("outputs", sw.output)),
                m.index("outputs", sw.output),
                m.index("inputs", sw.input),
                sw,
            )
            for sw in self.config.loops
        ]
        self._loops = loops
        self._limits = _Limits(problem)
        self._sim = _Simulator(problem)
        self._problem = problem

    def step(self, inp: ControlInput) -> ControlResult:
        return guarded_step("hysteresis", self._problem, inp, self._step, check_input=False)

    def _step(self, problem: ControlProblem, inp: ControlInput, t_start: float) -> ControlResult:
        lim, sim = self._limits, self._sim
        n = problem.horizon
        y_low = np.asarray(inp.y_low, dtype=float)
        y_high = np.asarray(inp.y_high, dtype=float)
        dist = np.asarray(inp.disturbances, dtype=float)
        u_start = lim.start(inp.u_prev, problem.model.u0)
        on = [
            abs(u_start[i] - sw.on_value) < abs(u_start[i] - sw.off_value)
            for _, _, i, sw in self._loops
        ]
        x = np.asarray(inp.x0, dtype=float)
        u = u_start
        plan = np.empty((n, problem.model.nu))
        xs = np.empty((n + 1, problem.model.nx))
        xs[0] = x
        for k in range(n):
            y = sim.y(x, u, dist[k])
            target = u.copy()
            for j, (col, out, i, sw) in enumerate(self._loops):
                low, high = y_low[k, col] + sw.margin, y_high[k, col] - sw.margin
                if y[out] < low:
                    on[j] = sw.raises
                elif y[out] > high:
                    on[j] = not sw.raises
                target[i] = sw.on_value if on[j] else sw.off_value
            u = lim.move(target, u)
            plan[k] = u
            x = sim.next(x, u, dist[k])
            xs[k + 1] = x
        return _result(problem, lim, sim, inp, u_start, plan, xs, t_start)


HYSTERESIS_KIND = KindOf(HysteresisConfig, HysteresisController)

__all__ = [
    "HOLD_KIND",
    "HYSTERESIS_KIND",
    "PI_KIND",
    "Curve",
    "HoldConfig",
    "HoldController",
    "HysteresisConfig",
    "HysteresisController",
    "Loop",
    "OnOffLoop",
    "PIConfig",
    "PIController",
]
