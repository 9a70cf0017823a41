"""Controller kind ``inp_rules``: a water network's own ``.inp`` controls and rules.

The baseline a water schedule is compared against, and its fallback: the controls and
rules of the network file (tank-level on/off switching, time controls, rule-based
controls with their priorities), run unchanged against the twin.  Each cycle the plan
starts from the settings applied in the field, evaluates every rule at each step of the
horizon on the twin's predicted tank levels (and critical-node pressures) and the time,
applies the actions of the rules that fire (the highest priority last, so it wins) and
steps the twin on, so the plan is the file's own behaviour predicted over the horizon.

Times: "AT TIME" counts from the model's ``time0``, "AT CLOCKTIME" is the time of day
of the network's clock (``time0`` plus the file's start clock time); a time control
fires in the step whose interval holds its instant.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
from pydantic import BaseModel, ConfigDict

from parallelcity.decide.control import (
    ControlInput,
    ControlProblem,
    ControlResult,
    KindOf,
    SolveStatus,
    guarded_step,
    require_fit,
)
from parallelcity.models.water.kind import KIND_NAME, WaterInfo, water_info
from parallelcity.models.water.network import Action, Condition, Rule
from parallelcity.twin.model import Array, SubsystemModel

DAY_S = 86400.0
_REL: dict[str, Callable[[float, float], bool]] = {
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "=": lambda a, b: math.isclose(a, b, abs_tol=1e-9),
    "!=": lambda a, b: not math.isclose(a, b, abs_tol=1e-9),
}


class InpRulesConfig(BaseModel):
    """``kind = "inp_rules"``: no options; the rules come from the model's network."""

    model_config = ConfigDict(extra="forbid")
    kind: str = "inp_rules"

    def problems(self, problem: ControlProblem) -> list[str]:
        info = water_info(problem.model)
        if info is None:
            return [
                f"kind: inp_rules runs a {KIND_NAME} model's .inp rules, "
                f"not a {problem.model.name!r} model"
            ]
        out = [f"kind: the network's control {u}" for u in info.network.unsupported]
        for rule in info.network.rules:
            for node, what in _nodes(rule.condition):
                if what == "level":
                    if f"{node}.level" not in problem.model.states:
                        out.append(
                            f"kind: rule {rule.name!r} reads the level of {node!r}, "
                            "which is not a tank"
                        )
                elif f"{node}.pressure" not in problem.model.outputs and (
                    f"{node}.level" not in problem.model.states
                ):
                    out.append(
                        f"kind: rule {rule.name!r} reads the {what} of node {node!r}: list "
                        "it in the model's critical_nodes"
                    )
        return out


def _nodes(c: Condition) -> list[tuple[str, str]]:
    if c.kind in ("and", "or"):
        return [n for ch in c.children for n in _nodes(ch)]
    if c.kind in ("level", "pressure", "head"):
        return [(c.target, c.kind)]
    return []


class InpRulesController:
    """The network file's rules against the twin (module docstring)."""

    def __init__(self, config: InpRulesConfig) -> None:
        self.config = config
        self._problem: ControlProblem | None = None

    def setup(self, problem: ControlProblem) -> None:
        require_fit("inp_rules", self.config.problems(problem))
        info = water_info(problem.model)
        assert info is not None  # checked by problems()
        self._info: WaterInfo = info
        m = problem.model
        self._step_fn = m.step_function(problem.dt)
        self._problem = problem
        col: dict[str, tuple[int, str]] = {}
        for i, name in enumerate(m.inputs):
            link, _, what = name.rpartition(".")
            col[link] = (i, what)
        self._col = col
        self._rules = sorted(info.network.rules, key=lambda r: r.priority)

    def step(self, inp: ControlInput) -> ControlResult:
        return guarded_step("inp_rules", self._problem, inp, self._plan, check_input=False)

    def _plan(self, problem: ControlProblem, inp: ControlInput, t_start: float) -> ControlResult:
        m, n, dt = problem.model, problem.horizon, problem.dt
        p = np.asarray(problem.p, dtype=float)
        dist = np.asarray(inp.disturbances, dtype=float)
        u_prev = np.asarray(inp.u_prev, dtype=float)
        u = np.where(np.isfinite(u_prev), u_prev, m.u0)
        x = np.asarray(inp.x0, dtype=float)
        plan = np.empty((n, m.nu))
        xs = np.empty((n + 1, m.nx))
        ys = np.empty((n + 1, m.ny))
        xs[0] = x
        for k in range(n):
            y = np.asarray(m.h(x, u, dist[k], p), dtype=float).ravel()
            u = self._fire(u, y, inp.t0 + k * dt, dt)
            u = np.clip(u, problem.u_min, problem.u_max)
            plan[k] = u
            ys[k] = np.asarray(m.h(x, u, dist[k], p), dtype=float).ravel()
            x = np.asarray(self._step_fn(x, u, dist[k], p), dtype=float).ravel()
            xs[k + 1] = x
        ys[n] = np.asarray(m.h(x, u, dist[n - 1], p), dtype=float).ravel()
        return ControlResult(
            status=SolveStatus.SOLVED,
            u_plan=plan,
            x_pred=xs,
            y_pred=ys,
            cost=float("nan"),
            iterations=0,
            solve_time_s=time.perf_counter() - t_start,
        )

    def _fire(self, u: Array, y: Array, t: float, dt: float) -> Array:
        out = u.copy()
        for rule in self._rules:  # ascending priority: the highest is applied last
            holds = self._holds(rule.condition, y, t, dt)
            for a in rule.then if holds else rule.otherwise:
                self._act(out, a)
        return out

    def _act(self, u: Array, a: Action) -> None:
        found = self._col.get(a.link)
        if found is None:
            return  # a link the model does not switch (cannot happen for a parsed file)
        i, what = found
        if a.attribute == "status" and what in ("on", "open"):
            u[i] = 1.0 if a.value >= 0.5 else 0.0
        elif a.attribute == "setting" and what == "setting":
            u[i] = a.value

    def _holds(self, c: Condition, y: Array, t: float, dt: float) -> bool:
        if c.kind == "and":
            return all(self._holds(ch, y, t, dt) for ch in c.children)
        if c.kind == "or":
            return any(self._holds(ch, y, t, dt) for ch in c.children)
        m, info = self._model(), self._info
        if c.kind in ("sim_time", "clock_time"):
            now = t - info.time0
            if c.kind == "clock_time":
                now = (now + info.network.start_clock_s) % DAY_S
                if c.relation == "=":
                    return (c.threshold - now) % DAY_S < dt
            elif c.relation == "=":
                return 0.0 <= c.threshold - now < dt
            return _REL[c.relation](now, c.threshold)
        tank = f"{c.target}.level" in m.states
        signal = f"{c.target}.level" if c.kind == "level" or tank else f"{c.target}.pressure"
        value = float(y[m.outputs.index(signal)])
        if c.kind == "head":
            value += self._elevation(c.target)
        return _REL[c.relation](value, c.threshold)

    def _model(self) -> SubsystemModel:
        assert self._problem is not None  # set by setup
        return self._problem.model

    def _elevation(self, node: str) -> float:
        net = self._info.network
        for j in net.junctions:
            if j.name == node:
                return j.elevation_m
        for tank in net.tanks:
            if tank.name == node:
                return tank.elevation_m
        return 0.0


KIND = KindOf(InpRulesConfig, InpRulesController)
__all__ = ["KIND", "InpRulesConfig", "InpRulesController", "Rule"]
