"""Pump scheduling MILP: the model re-used (mutable parameters, persistent HiGHS) against
the model built anew every step, on the same rolling day.

    .venv/bin/python -m benchmarks.milp_reuse [--steps 48] [--horizon 48]

Both schedulers see the same states, forecasts and tariffs every step; the run checks
that their optimal costs agree and reports the median and p95 of the wall time per step
(``PumpScheduler.step``: parameter updates or model build, HiGHS, and reading the plan
back) and the ratio rebuild / re-use.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
from parallelcity.controllers.milp import Config, PumpScheduler

from parallelcity.decide.control import ControlInput, ControlProblem
from parallelcity.models import pump_tank


def forecast(t0: float, n: int, dt: float) -> np.ndarray:
    """Demand peaks morning and evening; a tariff that changes every quarter hour (a
    day-ahead market price), so the schedule has one clear optimum."""
    hours = (t0 + dt * np.arange(n)) / 3600.0
    demand = 30.0 + 20.0 * np.exp(-(((hours % 24 - 7.5) / 1.5) ** 2))
    demand += 15.0 * np.exp(-(((hours % 24 - 19.0) / 2.0) ** 2))
    price = 0.20 + 0.08 * np.sin(2 * np.pi * (hours - 9.0) / 24.0)
    price += 0.02 * np.sin(2 * np.pi * hours / 1.7)
    return np.column_stack([demand, price])


def run(
    steps: int, horizon: int, min_up: int = 2, min_down: int = 2, gap: float = 1e-3
) -> dict[str, float]:
    dt = 900.0
    config = pump_tank.Config(
        step_s=dt,
        tank=pump_tank.Tank(area_m2=40.0),
        pump=pump_tank.Pump(flow_m3_per_h=60.0, power_kw=30.0),
    )
    model = dataclasses.replace(pump_tank.build(config), forecast=forecast)
    problem = ControlProblem(
        model=model,
        dt=dt,
        horizon=horizon,
        u_min=np.array([0.0]),
        u_max=np.array([1.0]),
        du_max=np.array([np.inf]),
        banded_outputs=(0,),
    )
    schedulers = {}
    for name, reuse in (("re-use", True), ("rebuild", False)):
        s = PumpScheduler(Config(min_up=min_up, min_down=min_down, reuse=reuse, mip_rel_gap=gap))
        s.setup(problem)
        schedulers[name] = s
    times: dict[str, list[float]] = {name: [] for name in schedulers}
    highs: dict[str, list[float]] = {name: [] for name in schedulers}
    worst_cost_diff = 0.0
    level, pump = np.array([2.0]), np.array([0.0])
    for k in range(steps):
        t0 = k * dt
        inp = ControlInput(
            t0=t0,
            x0=level,
            u_prev=pump,
            disturbances=model.forecast(t0, horizon, dt),
            y_low=np.full((horizon + 1, 1), 0.5),
            y_high=np.full((horizon + 1, 1), 4.0),
        )
        results = {}
        for name, s in schedulers.items():
            t = time.perf_counter()
            results[name] = s.step(inp)
            times[name].append(time.perf_counter() - t)
            highs[name].append(results[name].extra.get("highs_run_s", 0.0))
        a, b = results["re-use"], results["rebuild"]
        if not (a.status.usable and b.status.usable):
            raise SystemExit(f"step {k}: {a.message or a.status} / {b.message or b.status}")
        worst_cost_diff = max(worst_cost_diff, abs(a.cost - b.cost) / max(abs(b.cost), 1e-9))
        pump = a.u_first
        level = a.x_pred[1]
    med = {n: float(np.median(t)) * 1e3 for n, t in times.items()}
    p95 = {n: float(np.percentile(t, 95)) * 1e3 for n, t in times.items()}
    print(
        f"pump schedule MILP, horizon {horizon} x 15 min, min up/down {min_up}/{min_down}, "
        f"{steps} rolling steps"
    )
    overhead = {n: float(np.median(np.subtract(times[n], highs[n]))) * 1e3 for n in times}
    print(
        f"  {'model':<10} {'median ms':>10} {'p95 ms':>9} {'HiGHS run ms':>13} {'the rest ms':>12}"
    )
    for name in times:
        inner = float(np.median(highs[name])) * 1e3
        print(
            f"  {name:<10} {med[name]:>10.2f} {p95[name]:>9.2f} {inner:>13.2f} "
            f"{overhead[name]:>12.2f}"
        )
    ratio = med["rebuild"] / med["re-use"]
    rest = overhead["rebuild"] / overhead["re-use"]
    print(
        f"  rebuild / re-use, median per step: {ratio:.2f}x in all, {rest:.1f}x outside HiGHS; "
        f"worst relative cost difference {worst_cost_diff:.1e}"
    )
    return {"ratio": ratio, "ratio_outside_highs": rest, **{f"{n}_ms": v for n, v in med.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--horizon", type=int, default=24)
    parser.add_argument("--gap", type=float, default=1e-3, help="HiGHS mip_rel_gap")
    args = parser.parse_args(argv)
    run(args.steps, args.horizon, gap=args.gap)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
