"""The SUMO plant's speed on the traffic corridor, against plain ``sumo`` as the baseline.

    .venv/bin/python -m benchmarks.traffic_plant [--sim-s 7200] [--scenario PATH]

Rows (simulated seconds per wall second, and each row over the baseline):

* ``sumo (no traci)``: the baseline, the scenario's ``.sumocfg`` run by the ``sumo`` binary
  alone for ``--sim-s`` seconds;
* ``plant, controller only``: the SUMO plant stepped one cycle at a time under the
  junctions' own plans, with only the signal controller's per-cycle TraCI calls (queue
  probes every cycle, not every ``probe_s``);
* ``plant, as the field runs it``: the same with the queue probes every ``probe_s``;

and the verification of one plan as the rig does it, on two consecutive cycles: on each
of the rig's samples a reset (load the saved state, match the queues) and
``horizon_steps`` cycles of the plan.
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import time
from pathlib import Path

import numpy as np
from parallelcity.hil.simulated import simulated_driver

from parallelcity.models.traffic.sumo_plant import SumoPlant, sumo_binary
from parallelcity.scenario.definition import load_scenario

SCENARIO = Path(__file__).resolve().parent.parent / "scenarios/traffic_corridor/corridor.toml"


def plain_sumo(sumocfg: Path, sim_s: float) -> float:
    began = time.perf_counter()
    subprocess.run(
        [sumo_binary(), "-c", str(sumocfg), "--begin", "0", "--end", str(int(sim_s))],
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - began


def plant_run(
    plant: SumoPlant,
    x0: np.ndarray,
    t0: float,
    u: np.ndarray,
    nd: int,
    cycle_s: float,
    sim_s: float,
) -> float:
    began = time.perf_counter()
    plant.reset(x0, t0)
    for _ in range(int(sim_s // cycle_s)):
        plant.step(u, np.zeros(nd), cycle_s)
    took = time.perf_counter() - began
    plant.close()
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sim-s", type=float, default=7200.0)
    ap.add_argument("--scenario", default=str(SCENARIO))
    ap.add_argument("--at-s", type=float, default=3600.0, help="verification time into the run")
    args = ap.parse_args()
    sc = load_scenario(args.scenario)
    m, meta = sc.model, sc.meta
    factory = m.simulator
    assert factory is not None
    probe = factory(m.nominal)
    assert isinstance(probe, SumoPlant)
    cfg = probe.config
    rows: list[tuple[str, float]] = []
    base = plain_sumo(cfg.sumocfg, args.sim_s)
    rows.append(("sumo (no traci)", base))
    u = np.array(m.u0, dtype=float)
    slow_probe = dataclasses.replace(cfg, probe_s=meta.cycle_s)
    t0 = cfg.begin
    rows.append(
        (
            "plant, controller only",
            plant_run(
                SumoPlant(probe.network, slow_probe, m.nominal),
                m.x0,
                t0,
                u,
                m.nd,
                meta.cycle_s,
                args.sim_s,
            ),
        )
    )
    rows.append(
        (
            "plant, as the field runs it",
            plant_run(
                SumoPlant(probe.network, cfg, m.nominal),
                m.x0,
                t0,
                u,
                m.nd,
                meta.cycle_s,
                args.sim_s,
            ),
        )
    )
    probe.close()
    print(f"{'row':32s} {'wall s':>8s} {'sim s / wall s':>15s} {'x baseline':>10s}")
    for name, took in rows:
        print(f"{name:32s} {took:8.2f} {args.sim_s / took:15.0f} {took / base:10.2f}")

    rig_cfg = sc.rig_config
    driver = simulated_driver(rig_cfg, m)  # type: ignore[arg-type]
    horizon = meta.horizon_steps
    plan = np.tile(u, (horizon, 1))
    dist = m.forecast(t0 + args.at_s, horizon, meta.cycle_s)
    x0 = np.full(m.nx, 5.0)
    for s in range(driver.samples):  # the field's history: each sample runs to --at-s once
        driver.reset(m.x0, t0, s)
        driver.trace(np.tile(u, (1, 1)), dist[:1], args.at_s)
        driver.reset(x0, t0 + args.at_s, s)
    rollouts, resets = [], []
    for k in (1, 2):  # two consecutive cycles' verifications, as the loop runs them
        began = time.perf_counter()
        for s in range(driver.samples):
            r0 = time.perf_counter()
            driver.reset(x0, t0 + args.at_s + k * meta.cycle_s, s)
            resets.append(time.perf_counter() - r0)
            driver.trace(plan, dist, meta.cycle_s)
        rollouts.append(time.perf_counter() - began)
    for p in driver._plants:
        p.close()  # type: ignore[attr-defined]
    rollout_sim = horizon * meta.cycle_s * driver.samples
    print(
        f"verification of one plan at {args.at_s:g} s: {driver.samples} samples x {horizon} "
        f"cycles x {meta.cycle_s:g} s: {' and '.join(f'{r:.2f}' for r in rollouts)} s wall "
        f"(two consecutive cycles), of which resets {np.median(resets) * 1e3:.0f} ms per "
        f"sample (median); plain sumo: {base * rollout_sim / args.sim_s:.2f} s for the "
        "same simulated seconds"
    )


if __name__ == "__main__":
    main()
