"""Wall time of the traffic-programs experiment (its programs x 5 seeds x the 2 h peak).

    .venv/bin/python -m benchmarks.traffic_experiment [--workers 2] [--experiment FILE]
        [--variants webster,actuated,mpc | --variants all]

The measurement is ``parallelcity experiment FILE --workers N --force`` as a user runs it
(process start, validation, pool start-up, the closed loops on SUMO, the table and the
plots), into a throw-away folder.  By default only the issue's three programs run
(``webster``, ``actuated``, ``mpc``, through ``--only``); ``--variants all`` times the
whole file.  The named baseline, in the same run: plain ``sumo`` on
the same network and demand for the same number of simulations and the same simulated
time (the net's own programs, no TraCI, no controller), ``N`` at a time.  The ratio is
what the closed loop (TraCI stepping, the twin, the controllers) costs on top of the
simulation itself.  The issue's target: under 3 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.experiment_pool import wall

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = ROOT / "experiments" / "traffic_programs.toml"
SUMOCFG = ROOT / "scenarios" / "traffic_corridor" / "corridor.sumocfg"
TARGET_S = 180.0
PROGRAMS = "webster,actuated,mpc"  # the three programs


def plain_sumo_wall(runs: int, workers: int, end_s: int) -> float:
    import sumolib

    sumo = sumolib.checkBinary("sumo")

    def one(seed: int) -> None:
        subprocess.run(
            [sumo, "-c", str(SUMOCFG), "--seed", str(seed), "--end", str(end_s)]
            + ["--no-step-log", "--no-warnings", "--duration-log.disable"],
            check=True,
            capture_output=True,
            timeout=1800,
        )

    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(1, runs + 1)))
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--experiment", type=Path, default=EXPERIMENT)
    ap.add_argument("--variants", default=PROGRAMS, help="comma-separated, or 'all'")
    args = ap.parse_args()
    exp = tomllib.loads(args.experiment.read_text())
    if args.variants != "all":
        wanted = args.variants.split(",")
        missing = set(wanted) - {v["name"] for v in exp["variant"]}
        if missing:
            raise SystemExit(f"{args.experiment}: no variant {sorted(missing)}")
        exp["variant"] = [v for v in exp["variant"] if v["name"] in wanted]
    print(f"variants: {', '.join(v['name'] for v in exp['variant'])}")
    seeds = exp["experiment"]["seeds"]
    runs = len(exp["variant"]) * (seeds if isinstance(seeds, int) else len(seeds))
    end_s = int(exp["experiment"].get("cycles", 80) * 90 + 90)
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    base = plain_sumo_wall(runs, args.workers, end_s)
    print(f"baseline: plain sumo, {runs} runs of {end_s} s, {args.workers} at a time: {base:.1f} s")
    with tempfile.TemporaryDirectory() as tmp:
        only = [] if args.variants == "all" else [f"--only={v['name']}" for v in exp["variant"]]
        took = wall(args.experiment, args.workers, Path(tmp) / "out", only)[0]
    print(f"parallelcity experiment {args.experiment.name}, workers={args.workers}: {took:.1f} s")
    print(f"load average at end: {os.getloadavg()[0]:.1f}")
    verdict = "met" if took < TARGET_S else "missed"
    print(f"ratio to plain sumo {took / base:.2f}; target < {TARGET_S:.0f} s: {verdict}")


if __name__ == "__main__":
    main()
