"""Verifications per second for 1, 16 and 64 uncertainty samples on a 24-step horizon,
serial (in the calling thread) against a process pool, measured in one run.

    .venv/bin/python -m benchmarks.verify_throughput [--seconds S] [--workers W]

The plan passes the input screen, so every sample is rolled out and judged.  The
baseline is the serial verifier; the pool's figure is given as a ratio to it.  The serial
step-by-step state-machine path is shown against the simulated driver's whole-trace path.
"""

from __future__ import annotations

import argparse
import os
import re
import time
from pathlib import Path

import numpy as np
from parallelcity.hil.simulated import KIND

from parallelcity.scenario.definition import parse_scenario
from parallelcity.verify.verifier import PoolSamples, RigRecipe, SerialSamples, Verifier

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = ROOT / "scenarios" / "district_heating.toml"
SAMPLES = (1, 16, 64)


def scenario_with(samples: int, whole_trace: bool = True):
    own = re.sub(r"(?m)^(samples|sample_forecast_error) = .*\n", "", SCENARIO.read_text())
    text = own.replace(
        "field_seed = 11",
        f"field_seed = 11\nsamples = {samples}\nwhole_trace = {str(whole_trace).lower()}\n"
        'sample_forecast_error = { "weather.T_out" = 1.0 }',
    )
    return parse_scenario(text, f"bench-{samples}.toml"), text


def rate(verifier: Verifier, kw: dict, seconds: float) -> tuple[float, int]:
    v = verifier.verify(**kw)  # warm up, and make sure the plan is really approved
    assert v.samples == verifier.samples, v.summary()  # every sample rolled out and judged
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or n < 3:
        verifier.verify(**kw)
        n += 1
    return n / elapsed, n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    args = p.parse_args()
    print(
        f"verify throughput: 24-step horizon, {args.workers} pool workers, "
        f"{os.cpu_count()} cores, {args.seconds:g} s per figure"
    )
    print("verifications per second; the pool's ratio is to the serial figure of the same rig path")
    print(
        f"{'samples':>7} | {'trace':>7} {'pool':>7} {'ratio':>6} | "
        f"{'steps':>7} {'pool':>7} {'ratio':>6}"
    )
    for n in SAMPLES:
        row = []
        for whole in (True, False):
            sc, text = scenario_with(n, whole)
            specs = sc.safety_specs()
            m, dt = sc.model, sc.meta.cycle_s
            t0 = sc.meta.start_epoch + 6 * 3600
            h = sc.meta.horizon_steps
            plan = np.tile([75.0, 0.21, 0.175, 0.175], (h, 1))
            kw = dict(
                source="bench", t0=t0, x0=np.array([20.5, 20.5, 20.0, 75.0]), u_prev=plan[0],
                u_plan=plan, disturbances=m.forecast(t0, h, dt),
            )  # fmt: skip
            rig = KIND.verification_rig(sc.rig_config, m)
            serial, _ = rate(
                Verifier(specs, rig, dt, runner=SerialSamples(rig, specs)), kw, args.seconds
            )
            with PoolSamples(RigRecipe.from_scenario(sc, text=text), args.workers) as pool:
                pooled, _ = rate(Verifier(specs, rig, dt, runner=pool), kw, args.seconds)
            row += [serial, pooled, pooled / serial]
        print(
            f"{n:>7} | {row[0]:>7.1f} {row[1]:>7.1f} {row[2]:>5.2f}x | "
            f"{row[3]:>7.1f} {row[4]:>7.1f} {row[5]:>5.2f}x",
            flush=True,
        )
    print(
        "trace: the simulated driver's whole-trace path; steps: every step through the rig "
        "state machine (as a bench or an FMU is driven)"
    )


if __name__ == "__main__":
    main()
