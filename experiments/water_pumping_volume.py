"""End volumes and savings per seed of the pump-scheduling experiment.

Usage: python experiments/water_pumping_volume.py OUT_DIR [SCENARIO]

For every run in OUT_DIR (an `parallelcity experiment` output folder) it reads the run's
energy cost and the water stored in the tanks at the start and at the end of the run as
the field plant measured them (the plant KPIs `cost`, `stored_m3`, `stored_change_m3`),
and the pumps' flows per cycle (`series.csv`, its end-of-run row left out) with the tanks
and pumps of the scenario's network.  Per seed, `milp_pump` against the other variant
(the network's own rules):

- the saving `1 - cost / cost_rules`;
- the end-volume condition: `milp_pump` ends with at least the water it started with
  (`dV >= 0`); the rules' end volume is shown beside it;
- `vs rules end`: the saving with the difference between the two runs' end volumes
  charged to the run that ends lower, at the dearer of the two runs' mean cost of
  pumped water (cost / m3 pumped), i.e. at equal end volume to the baseline;
- `met`: saving >= 15 % and dV >= 0.

Definitions: docs/models/water_network.md ("Comparing pump schedules").
"""

from __future__ import annotations

import csv
import json
import sys
import tomllib
from pathlib import Path

from parallelcity.models.water.network import load

DEFAULT_SCENARIO = Path(__file__).resolve().parents[1] / "scenarios" / "water_net3" / "net3.toml"
TARGET_SAVING = 0.15
MPC = "milp_pump"


def _pumped(path: Path, pumps: list[str], cycle_h: float) -> float:
    with path.open(newline="") as fh:  # each cycle's row stands for its cycle; the end's for none
        rows = [r for r in csv.DictReader(fh) if r["outcome"] != "end"]
    return sum(float(r.get(f"{p}.flow") or 0.0) for r in rows for p in pumps) * cycle_h


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    out = Path(argv[0])
    scenario = Path(argv[1]) if len(argv) > 1 else DEFAULT_SCENARIO
    sc = tomllib.loads(scenario.read_text())
    pumps = [p.name for p in load(sc["model"]["inp"]).pumps]
    cycle_h = float(sc["scenario"]["cycle_s"]) / 3600.0
    runs: dict[tuple[str, int], tuple[float, float, float, float]] = {}
    for summary in sorted(out.glob("runs/*/*/summary.json")):
        variant, seed = summary.parent.parent.name, int(summary.parent.name)
        k = json.loads(summary.read_text())["kpis"]
        cost, end, change = float(k["cost"]), float(k["stored_m3"]), float(k["stored_change_m3"])
        pumped = _pumped(summary.parent / "series.csv", pumps, cycle_h)
        runs[(variant, seed)] = (cost, end - change, end, cost / pumped if pumped > 0 else 0.0)
    others = sorted({v for v, _ in runs if v != MPC})
    if len(others) != 1:
        print(f"expected {MPC} and one other variant, found {sorted({v for v, _ in runs})}")
        return 2
    base = others[0]
    print(
        f"| seed | cost {MPC} | cost {base} | saving | V start m3 | dV {MPC} m3 | dV {base} m3 "
        "| vs rules end | met |\n|---|---|---|---|---|---|---|---|---|"
    )
    met_all = True
    for seed in sorted({s for _, s in runs}):
        if (MPC, seed) not in runs or (base, seed) not in runs:
            continue
        (ca, va0, va1, pa), (cb, vb0, vb1, pb) = runs[(MPC, seed)], runs[(base, seed)]
        dear = max(pa, pb)
        short_a, short_b = max(0.0, vb1 - va1), max(0.0, va1 - vb1)
        equal = 1 - (ca + short_a * dear) / (cb + short_b * dear)
        saving = 1 - ca / cb
        met = saving >= TARGET_SAVING and va1 - va0 >= 0.0
        met_all &= met
        print(
            f"| {seed} | {ca:.1f} | {cb:.1f} | {saving:.1%} | {va0:.0f} | {va1 - va0:+.0f} "
            f"| {vb1 - vb0:+.0f} | {equal:.1%} | {'yes' if met else 'no'} |"
        )
    print(f"\nevery seed: {'met' if met_all else 'NOT met'}")
    return 0 if met_all else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
