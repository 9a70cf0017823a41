"""The ``webster`` controller kind: fixed-time signal plans by Webster's method.

For each planned cycle, from the demand forecast of a ``signal_corridor`` model:

* approach flows ``q``: entry arrivals from the forecast, carried through the network by
  the turning shares (``q = e + S q``, solved exactly: routes leave the network, so
  ``I - S`` is invertible);
* per junction and green phase ``k`` the critical flow ratio
  ``y_k = max over approaches a of q_a * (share of a's movements served in k) / s_a``,
  ``Y = sum_k y_k``;
* Webster's optimum cycle ``C0 = (1.5 L + 5) / (1 - Y)`` (``L`` the junction's lost time,
  its intergreens), ``cycle_max_s`` when ``Y >= 0.95``, clipped to
  ``[cycle_min_s, cycle_max_s]`` (``startup_lost_s`` per green phase adds to ``L``); with
  ``coordinated`` every junction runs the largest
  (the critical junction's), so offsets mean something;
* effective green ``C - L`` shared in proportion to ``y_k`` (splits ``y_k / Y``);
* offsets: a green wave in the direction of travel from ``wave_from`` (default: the
  network's first junction), each junction ``length / speed`` of the approach from the
  junction before it later than that one, modulo the cycle.

The plan is then moved toward within the problem's input bounds and rate limits.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from parallelcity.decide.control import (
    ControlInput,
    ControlProblem,
    ControlResult,
    KindOf,
    SolveStatus,
    guarded_step,
    require_fit,
)
from parallelcity.models.traffic.kind import corridor_of
from parallelcity.models.traffic.network import Network
from parallelcity.twin.model import Array

from .baseline import _Limits, _result, _Simulator

MAX_Y = 0.95  # at or above this critical ratio sum the junction gets the longest cycle


class Config(BaseModel):
    """``kind = "webster"``: fixed-time plans by Webster's method from the forecast."""

    model_config = ConfigDict(extra="forbid")
    kind: str = "webster"
    cycle_min_s: float = Field(40.0, gt=0, le=600, allow_inf_nan=False)
    cycle_max_s: float = Field(120.0, gt=0, le=600, allow_inf_nan=False)
    coordinated: bool = Field(True, description="one common cycle (the critical junction's)")
    wave_from: str | None = Field(
        None, description="junction the green wave starts at (default: the first)"
    )
    window_steps: int = Field(
        1, ge=1, le=100, description="forecast periods averaged for each planned cycle"
    )
    startup_lost_s: float = Field(
        0.0, ge=0, le=10, allow_inf_nan=False, description="per green phase, added to L"
    )

    @model_validator(mode="after")
    def _ordered(self) -> Config:
        if self.cycle_min_s > self.cycle_max_s:
            raise ValueError(f"cycle_min_s {self.cycle_min_s} is above cycle_max_s")
        return self

    def problems(self, problem: ControlProblem) -> list[str]:
        corridor = corridor_of(problem.model)
        if corridor is None:
            return [
                f"kind: webster plans signal programs for a signal_corridor model, not "
                f"{problem.model.name!r}"
            ]
        ids = corridor.network.junction_ids
        if self.wave_from is not None and self.wave_from not in ids:
            return [f"wave_from: {self.wave_from!r} is not a junction ({', '.join(ids)})"]
        return []


@dataclass(frozen=True)
class Plan:
    """Per junction: cycle (s), splits (P - 1), offset (s), and the ratios behind them."""

    cycle_s: dict[str, float]
    splits: dict[str, tuple[float, ...]]
    offset_s: dict[str, float]
    flow_ratios: dict[str, tuple[float, ...]]  # y_k per green phase


def approach_flows(
    network: Network, shares: dict[str, dict[str, float]], arrivals: dict[str, float]
) -> dict[str, float]:
    """Flow (veh/h) on every approach: entry arrivals carried on by the turning shares."""
    edges = [a.edge for a in network.approaches]
    index = {e: i for i, e in enumerate(edges)}
    fed = {a.edges[0]: i for i, a in enumerate(network.approaches)}  # first edge -> approach
    s = np.zeros((len(edges), len(edges)))
    for a in network.approaches:
        for m in a.movements:
            if m.to_edge in fed:
                s[fed[m.to_edge], index[a.edge]] += shares[a.edge][m.to_edge]
    e = np.array([arrivals.get(edge, 0.0) for edge in edges])
    q = np.linalg.solve(np.eye(len(edges)) - s, e)
    return {edge: max(0.0, float(v)) for edge, v in zip(edges, q, strict=True)}


def webster_cycle(lost_s: float, y_total: float, cycle_min_s: float, cycle_max_s: float) -> float:
    """Webster's optimum cycle ``(1.5 L + 5) / (1 - Y)`` clipped to the limits."""
    if y_total >= MAX_Y:
        return cycle_max_s
    return min(max((1.5 * lost_s + 5.0) / (1.0 - y_total), cycle_min_s), cycle_max_s)


def webster_plan(
    network: Network,
    shares: dict[str, dict[str, float]],
    saturation: dict[str, float],
    arrivals: dict[str, float],
    config: Config,
) -> Plan:
    """See the module docstring; ``saturation`` in veh/h per approach."""
    q = approach_flows(network, shares, arrivals)
    ratios: dict[str, tuple[float, ...]] = {}
    cycles: dict[str, float] = {}
    splits: dict[str, tuple[float, ...]] = {}
    for j in network.junctions:
        y = [0.0] * len(j.green)
        for edge in j.approaches:
            a = network.approach(edge)
            for k in range(len(j.green)):
                served = sum(shares[edge][m.to_edge] for m in a.movements if k in m.green_phases)
                y[k] = max(y[k], q[edge] * served / saturation[edge])
        ratios[j.tls] = tuple(y)
        total = sum(y)
        lost = j.lost_s + config.startup_lost_s * len(j.green)
        cycles[j.tls] = webster_cycle(lost, total, config.cycle_min_s, config.cycle_max_s)
        splits[j.tls] = tuple(v / total for v in y[:-1]) if total > 0 else tuple(j.splits)
    if config.coordinated:
        common = max(cycles.values())
        cycles = dict.fromkeys(cycles, common)
    return Plan(cycles, splits, green_wave(network, cycles, config.wave_from), ratios)


def green_wave(network: Network, cycles: dict[str, float], start: str | None) -> dict[str, float]:
    """Offsets along the direction of travel from ``start``: breadth first over the
    approaches that link two junctions; junctions not reached keep offset 0."""
    first = start if start is not None else network.junctions[0].tls
    offsets = {first: 0.0}
    todo = deque([first])
    while todo:
        up = todo.popleft()
        for a in network.approaches:
            if a.upstream == up and a.junction not in offsets:
                travel = a.total_length_m / a.speed_mps if a.speed_mps > 0 else 0.0
                offsets[a.junction] = (offsets[up] + travel) % cycles[a.junction]
                todo.append(a.junction)
    return {j.tls: offsets.get(j.tls, 0.0) for j in network.junctions}


class WebsterController:
    """See the module docstring."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._problem: ControlProblem | None = None

    def setup(self, problem: ControlProblem) -> None:
        require_fit("webster", self.config.problems(problem))
        corridor = corridor_of(problem.model)
        assert corridor is not None  # require_fit refused any other model
        m = problem.model
        self._network = corridor.network
        self._shares = corridor.demand.shares
        p = np.asarray(problem.p, dtype=float)
        self._saturation = {
            a.edge: float(p[m.index("parameters", f"{a.edge}.saturation")])
            for a in self._network.approaches
        }
        self._entries = [n.removesuffix(".arrival") for n in m.disturbances]
        self._limits = _Limits(problem)
        self._sim = _Simulator(problem)
        self._problem = problem

    def step(self, inp: ControlInput) -> ControlResult:
        return guarded_step("webster", self._problem, inp, self._step, check_input=False)

    def target(self, arrivals: Array) -> Array:
        """The input vector of Webster's plan for entry arrivals (veh/h, model order)."""
        assert self._problem is not None
        m = self._problem.model
        plan = webster_plan(
            self._network,
            self._shares,
            self._saturation,
            dict(zip(self._entries, (float(v) for v in arrivals), strict=True)),
            self.config,
        )
        u = np.array(m.u0, dtype=float)
        for j in self._network.junctions:
            for k, s in enumerate(plan.splits[j.tls]):
                u[m.index("inputs", f"{j.tls}.split{k}")] = s
            u[m.index("inputs", f"{j.tls}.cycle_s")] = plan.cycle_s[j.tls]
            u[m.index("inputs", f"{j.tls}.offset_s")] = plan.offset_s[j.tls]
        return u

    def _step(self, problem: ControlProblem, inp: ControlInput, t_start: float) -> ControlResult:
        lim = self._limits
        dist = np.asarray(inp.disturbances, dtype=float)
        u_start = lim.start(inp.u_prev, problem.model.u0)
        plan = np.empty((problem.horizon, problem.model.nu))
        u = u_start
        w = self.config.window_steps
        for k in range(problem.horizon):
            window = dist[k : min(k + w, problem.horizon)]
            arrivals = np.clip(window.mean(axis=0), 0.0, None)
            u = lim.move(self.target(arrivals), u)
            plan[k] = u
        if not np.all(np.isfinite(plan)):
            return ControlResult.failure(
                SolveStatus.FAILED,
                problem,
                "webster: plan not finite",
                time.perf_counter() - t_start,
            )
        return _result(problem, lim, self._sim, inp, u_start, plan, None, t_start)


KIND = KindOf(Config, WebsterController)
__all__ = [
    "KIND",
    "Config",
    "Plan",
    "approach_flows",
    "green_wave",
    "webster_cycle",
    "webster_plan",
]
