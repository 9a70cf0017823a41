"""Wall time of the shipped experiment on one worker against two, measured in one run.

    .venv/bin/python -m benchmarks.experiment_pool [--rounds 1] [--experiment FILE]

Each measurement is ``parallelcity experiment FILE --workers N --force`` as a user runs
it (process start, validation, pool start-up, every run, the table and the plots), into a
throw-away folder.  The named baseline is workers=1 (the runs one after another in the
command's own process); workers=2 is given as a ratio to it.  With several rounds the order
alternates, so the machine's load falls on both alike; the median of each is compared.
The CPU seconds (the command and its workers) show the pool's own cost apart from the
machine's load, which the wall times include.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = ROOT / "experiments" / "district_heating_controllers.toml"


def wall(
    experiment: Path, workers: int, out: Path, extra: Sequence[str] = ()
) -> tuple[float, float]:
    """Wall seconds and CPU seconds (the command and its workers) of one call; ``extra``
    are further options of ``parallelcity experiment``."""
    cpu0 = _children_cpu()
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "parallelcity", "experiment", str(experiment)]
        + ["--workers", str(workers), "--force", "--out", str(out), *extra],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=3600,
    )
    took = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"workers={workers} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return took, _children_cpu() - cpu0


def _children_cpu() -> float:
    use = resource.getrusage(resource.RUSAGE_CHILDREN)
    return use.ru_utime + use.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--experiment", type=Path, default=EXPERIMENT)
    args = ap.parse_args()
    times: dict[int, list[float]] = {1: [], 2: []}
    cpu: dict[int, list[float]] = {1: [], 2: []}
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = (1, 2) if r % 2 == 0 else (2, 1)
            for w in order:
                t, c = wall(args.experiment, w, Path(tmp) / f"w{w}")
                times[w].append(t)
                cpu[w].append(c)
                print(f"round {r + 1}: workers={w}: {t:.1f} s wall, {c:.1f} s CPU", flush=True)
    print(f"load average at end: {os.getloadavg()[0]:.1f}")
    base, pooled = statistics.median(times[1]), statistics.median(times[2])
    print(f"\n{args.experiment.name}, median of {args.rounds} round(s):")
    print(f"  workers=1 (baseline)  {base:7.1f} s   CPU {statistics.median(cpu[1]):.1f} s")
    ratio = f"ratio {pooled / base:.2f} (speed-up {base / pooled:.2f}x)"
    print(
        f"  workers=2             {pooled:7.1f} s   CPU {statistics.median(cpu[2]):.1f} s   {ratio}"
    )


if __name__ == "__main__":
    main()
