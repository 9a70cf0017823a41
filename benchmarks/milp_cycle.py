"""Pump scheduling MILP per cycle against the deadline: warm start against cold start.

    .venv/bin/python -m benchmarks.milp_cycle [--cycles 96] [--horizon 32] [--deadline 10]
        [--terminal-price P] [--seed 0]
    .venv/bin/python -m benchmarks.milp_cycle --scenario FILE [--cycles N]

A closed loop over a simulated day of 15-minute cycles on a two-tank, two-pump network
model (``two_tanks``: a linear balance, a critical node's pressure ``a + b level``, a
tariff that changes every quarter hour): soft level and pressure bands, minimum run
and rest of 30 minutes, at most two starts per pump and hour, end levels held within
0.2 m.  The plant draws the forecast demand times a seeded random factor.  Every cycle
two schedulers plan from the same state: the named baseline **cold start** (HiGHS from
nothing) and **warm start** (HiGHS given the previous plan, shifted); the loop applies
the warm plan.  Printed per variant: p50, p99 and the largest wall time of
``PumpScheduler.step`` and their share of the cycle's deadline, HiGHS's own time and
branch-and-bound nodes (medians), and the cost difference between the variants (they
solve the same MILP to the same gap).

``--scenario`` runs a scenario's own model, bands, cycle, horizon and deadline instead
(e.g. a water network's; the deadline in wall seconds at the scenario's ``speed``), its
demands spread by 10 % in the plant, with its ``[controller]`` table when that is a
``milp_pump`` one, else ``SCENARIO_CONFIG``; the run ends after ``--cycles``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import casadi as ca
import numpy as np
from parallelcity.controllers.milp import Config, PumpScheduler

from parallelcity.decide.control import ControlInput, ControlProblem
from parallelcity.twin.model import ModelForm, SubsystemModel

AREA = np.array([20.0, 30.0])  # m2
Q = np.array([[50.0, 0.0], [20.0, 40.0]])  # m3/h into tank r from pump i
KW = np.array([25.0, 20.0])
HEAD_A, HEAD_B = 5.0, 2.0  # critical pressure = a + b * level of tank t1 (m)
# a scenario whose own controller is not milp_pump is scheduled with this
SCENARIO_CONFIG = {"min_up": 1, "terminal_slack_m": 0.5, "mip_rel_gap": 0.01}


def two_tanks(step_s: float = 900.0, square: bool = False) -> SubsystemModel:
    """Tanks ``t1``, ``t2`` filled by pumps ``p1`` (into t1) and ``p2`` (both), drawn by
    demands; node ``n7``'s pressure follows t1's level (``square``: quadratically, so
    the model is not affine).  Output ``tariff.cost_per_h`` is the pumps' power times the
    price."""
    x, u = ca.SX.sym("x", 2), ca.SX.sym("u", 2)
    d, p = ca.SX.sym("d", 3), ca.SX.sym("p", 1)
    inflow = ca.mtimes(ca.DM(Q), u)
    x_next = x + step_s / 3600.0 * (inflow - d[:2]) / ca.DM(AREA) * p[0]
    head = HEAD_A + HEAD_B * (x[0] ** 2 / 3.0 if square else x[0])
    power = ca.dot(ca.DM(KW), u)
    y = ca.vertcat(x[0], x[1], head, power, power * d[2])
    f = ca.Function("F", [x, u, d, p], [x_next])
    h = ca.Function("h", [x, u, d, p], [y])

    def forecast(t0: float, n: int, dt: float) -> np.ndarray:
        hours = ((t0 + dt * np.arange(n)) / 3600.0) % 24.0
        demand = 20.0 + 15.0 * np.exp(-(((hours - 8.0) / 2.0) ** 2))
        # a day-ahead price that changes every quarter hour: one clear optimum
        price = 0.2 + 0.08 * np.sin(2 * np.pi * (hours - 9.0) / 24.0)
        price += 0.03 * np.sin(2 * np.pi * hours / 1.7)
        return np.column_stack([demand, 0.8 * demand, price])

    return SubsystemModel(
        name="two_tanks",
        states=("t1.level", "t2.level"),
        inputs=("p1.on", "p2.on"),
        disturbances=("t1.demand", "t2.demand", "tariff.price"),
        outputs=("t1.level", "t2.level", "n7.pressure", "pumps.kw", "tariff.cost_per_h"),
        parameters=("scale",),
        nominal=np.array([1.0]),
        f=f,
        h=h,
        forecast=forecast,
        x0=np.array([2.0, 2.0]),
        u0=np.zeros(2),
        state_outputs={"t1.level": "t1.level", "t2.level": "t2.level"},
        form=ModelForm.DISCRETE,
        step_s=step_s,
    )


@dataclass(frozen=True)
class Case:
    """One closed loop to measure: the problem, its bands, the plant's step and noise."""

    title: str
    problem: ControlProblem
    band: Callable[[float], tuple[np.ndarray, np.ndarray]]  # t0 -> (y_low, y_high)
    config: dict[str, Any]
    t_start: float
    cycles: int
    deadline_s: float
    noise: np.ndarray  # relative spread of each disturbance in the plant


def run(
    cycles: int = 96,
    horizon: int = 32,
    deadline_s: float = 10.0,
    seed: int = 0,
    terminal_price: float | None = None,
) -> dict[str, Any]:
    """The two-tank loop (see the module docstring)."""
    dt = 900.0
    m = two_tanks(dt)
    problem = ControlProblem(
        model=m,
        dt=dt,
        horizon=horizon,
        u_min=np.zeros(2),
        u_max=np.ones(2),
        du_max=np.full(2, np.inf),
        banded_outputs=(0, 1, 2),
    )
    low = np.tile([1.0, 1.0, 7.2], (horizon + 1, 1))
    high = np.tile([4.0, 4.0, np.inf], (horizon + 1, 1))
    config = {
        "min_up": 2,
        "min_down": 2,
        "max_starts_per_hour": 2,
        "terminal_slack_m": 0.2,
        "mip_rel_gap": 1e-4,
        "time_limit_s": deadline_s,
        "terminal_price": terminal_price,
    }
    title = f"two tanks and two pumps, {cycles} cycles of 15 min, horizon {horizon}"
    case = Case(
        title,
        problem,
        lambda t0: (low, high),
        config,
        0.0,
        cycles,
        deadline_s,
        np.array([0.15, 0.15, 0.0]),
    )
    return measure(case, seed)


def run_scenario(path: Path, cycles: int | None, seed: int = 0) -> dict[str, Any]:
    """A scenario's own model, bands, cycle, horizon and deadline; its ``[controller]``
    table when it is a ``milp_pump`` one, else ``SCENARIO_CONFIG``."""
    from parallelcity.scenario.definition import load_scenario
    from parallelcity.twin.twin import Twin

    sc = load_scenario(path)
    m, specs = sc.model, sc.safety_specs()
    dt, n = sc.meta.cycle_s, sc.meta.horizon_steps
    count = cycles or sc.meta.cycles
    problem = specs.control_problem(m, dt, n, sc.meta.start_epoch + count * dt)
    twin = Twin(m, specs, dt, n)
    own = sc.controller_config.model_dump()
    config = own if own.get("kind") == "milp_pump" else dict(SCENARIO_CONFIG)
    config.pop("kind", None)
    config.pop("warm_start", None)  # each variant sets its own
    nonneg = np.array([name in m.nonnegative for name in m.disturbances], dtype=float)

    def band(t0: float) -> tuple[np.ndarray, np.ndarray]:
        return twin.specs.band_arrays(t0, n + 1, dt)

    title = f"{sc.meta.name} ({m.name}), {count} cycles of {dt:g} s, horizon {n}"
    case = Case(
        title,
        problem,
        band,
        config,
        sc.meta.start_epoch,
        count,
        sc.meta.deadline / sc.meta.speed,  # wall seconds
        0.1 * nonneg * np.array([not n.startswith("tariff") for n in m.disturbances]),
    )
    return measure(case, seed)


def measure(case: Case, seed: int) -> dict[str, Any]:
    """Cold and warm start in lockstep on the same states; the loop applies the warm
    plan on the model itself, its disturbances spread by ``case.noise``."""
    problem, cycles, deadline_s = case.problem, case.cycles, case.deadline_s
    m, dt, horizon = problem.model, problem.dt, problem.horizon
    variants = {
        "cold start": PumpScheduler(Config(**case.config, warm_start=False)),
        "warm start": PumpScheduler(Config(**case.config, warm_start=True)),
    }
    for s in variants.values():
        s.setup(problem)
    rng = np.random.default_rng(seed)
    wall: dict[str, list[float]] = {k: [] for k in variants}
    highs: dict[str, list[float]] = {k: [] for k in variants}
    nodes: dict[str, list[int]] = {k: [] for k in variants}
    status: dict[str, list[str]] = {k: [] for k in variants}
    excess: dict[str, list[float]] = {k: [] for k in variants}  # cost over the better plan
    accepted, worst_diff, unusable = 0, 0.0, 0
    x, u = m.x0.copy(), m.u0.copy()
    step = m.step_function(dt)
    for c in range(cycles):
        t0 = case.t_start + c * dt
        low, high = case.band(t0)
        inp = ControlInput(
            t0=t0,
            x0=x,
            u_prev=u,
            disturbances=m.forecast(t0, horizon, dt),
            y_low=low,
            y_high=high,
            deadline_s=deadline_s,
        )
        res = {}
        for name, s in variants.items():
            t = time.perf_counter()
            res[name] = s.step(inp)
            wall[name].append(time.perf_counter() - t)
            highs[name].append(float(res[name].extra.get("highs_run_s", np.nan)))
            nodes[name].append(res[name].iterations)
            status[name].append(str(res[name].extra.get("milp_status")))
        cold, warm = res["cold start"], res["warm start"]
        accepted += bool(warm.extra.get("warm_start_accepted"))
        if cold.status.usable and warm.status.usable:
            best = min(cold.cost, warm.cost)
            for name, r in res.items():
                excess[name].append((r.cost - best) / max(abs(best), 1e-9))
        both_optimal = cold.extra["milp_status"] == warm.extra["milp_status"] == "optimal"
        if both_optimal:
            worst_diff = max(worst_diff, abs(warm.cost - cold.cost) / max(abs(cold.cost), 1e-9))
        if warm.status.usable:
            u = warm.u_first
        else:  # no plan in time: the pumps as they are (a real run falls back)
            unusable += 1
        spread = 1.0 + case.noise * rng.uniform(-1.0, 1.0, m.nd)
        d_true = m.forecast(t0, 1, dt)[0] * spread
        x = np.asarray(step(x, u, d_true, m.nominal), dtype=float).reshape(-1)

    print(f"pump schedule MILP on {case.title}, deadline {deadline_s:g} s")
    print(
        f"  {'variant':<11} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'p99/deadline':>13} "
        f"{'HiGHS p50 ms':>13} {'nodes p50':>10} {'optimal':>8} {'gap':>4} {'none':>5} "
        f"{'excess':>7}"
    )
    out: dict[str, Any] = {"unusable": unusable, "worst_cost_diff": worst_diff}
    for name in variants:
        w = np.array(wall[name]) * 1e3
        optimal, gap = status[name].count("optimal"), status[name].count("feasible_gap")
        p50, p99, top = (float(v) for v in np.percentile(w, [50, 99, 100]))
        inner = float(np.nanmedian(highs[name])) * 1e3
        print(
            f"  {name:<11} {p50:>8.1f} {p99:>8.1f} {top:>8.1f} {p99 / 1e3 / deadline_s:>13.2%} "
            f"{inner:>13.1f} {float(np.median(nodes[name])):>10.0f} "
            f"{optimal:>8} {gap:>4} {len(status[name]) - optimal - gap:>5} "
            f"{float(np.mean(excess[name])) if excess[name] else float('nan'):>7.2%}"
        )
        out[name] = {
            "p50_ms": p50,
            "p99_ms": p99,
            "max_ms": top,
            "highs_p50_ms": inner,
            "statuses": status[name],
        }
    ratio = out["cold start"]["p50_ms"] / out["warm start"]["p50_ms"]
    print(
        f"  cold / warm, p50 per cycle: {ratio:.2f}x; warm starts HiGHS accepted: "
        f"{accepted} of {cycles - 1}; worst relative cost difference where both are optimal "
        f"{worst_diff:.1e}; cycles the loop had no warm plan: {unusable}"
    )
    out["ratio"] = ratio
    out["accepted"] = accepted
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, help="default: 96, or the scenario's")
    parser.add_argument("--horizon", type=int, default=32)
    parser.add_argument("--deadline", type=float, default=10.0, help="seconds per cycle")
    parser.add_argument(
        "--terminal-price",
        type=float,
        default=None,
        help="price the end-level shortfall at this (per m) instead of holding it",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--scenario", type=Path, help="a scenario file instead of the two-tank model"
    )
    args = parser.parse_args(argv)
    if args.scenario is not None:
        run_scenario(args.scenario, args.cycles, args.seed)
    else:
        run(args.cycles or 96, args.horizon, args.deadline, args.seed, args.terminal_price)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
