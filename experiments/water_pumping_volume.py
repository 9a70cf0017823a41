"""End-volume correction of the pump-scheduling experiment's costs.

Usage: python experiments/water_pumping_volume.py OUT_DIR [SCENARIO]

For every run in OUT_DIR (an `parallelcity experiment` output folder) it reads the run's
energy cost (the plant's `cost` KPI), its per-cycle tank levels and pump flows
(`series.csv`) and the tanks' floor areas from the scenario's network, and prints a
Markdown table: cost, stored volume at the start and at the end (m3), their difference,
the mean marginal cost of pumped water (cost / m3 pumped) and the volume-corrected cost

    corrected = cost + (V_start - V_end) * cost / V_pumped

i.e. water a run leaves missing from the tanks is charged at that run's own mean price
of pumped water (a surplus is credited the same way).  Then, per seed, the saving of
`milp_pump` against the other variant: raw, corrected, and corrected with every run's
volume difference valued at the dearer of the two runs' mean prices (`strict`).
Definitions: docs/models/water_network.md.
"""

from __future__ import annotations

import csv
import json
import sys
import tomllib
from pathlib import Path

from parallelcity.models.water.network import load

DEFAULT_SCENARIO = Path(__file__).resolve().parents[1] / "scenarios" / "water_net3" / "net3.toml"


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _value(row: dict[str, str], name: str) -> float:
    text = row.get(name, "")
    return float(text) if text else 0.0


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    out = Path(argv[0])
    scenario = Path(argv[1]) if len(argv) > 1 else DEFAULT_SCENARIO
    sc = tomllib.loads(scenario.read_text())
    net = load(sc["model"]["inp"])
    cycle_h = float(sc["scenario"]["cycle_s"]) / 3600.0
    areas = {t.name: t.area_m2 for t in net.tanks}
    pumps = [p.name for p in net.pumps]
    table: dict[tuple[str, int], tuple[float, float, float, float]] = {}
    print("| variant | seed | cost | V start m3 | V end m3 | dV m3 | cost/m3 | corrected |")
    print("|---|---|---|---|---|---|---|---|")
    for summary in sorted(out.glob("runs/*/*/summary.json")):
        variant, seed = summary.parent.parent.name, int(summary.parent.name)
        s = json.loads(summary.read_text())
        cost = float(s["kpis"]["cost"])
        rows = _rows(summary.parent / "series.csv")
        v0 = sum(a * _value(rows[0], f"{t}.level") for t, a in areas.items())
        v1 = sum(a * _value(rows[-1], f"{t}.level") for t, a in areas.items())
        pumped = sum(_value(r, f"{p}.flow") for r in rows for p in pumps) * cycle_h
        price = cost / pumped if pumped > 0 else 0.0
        corrected = cost + (v0 - v1) * price
        table[(variant, seed)] = (cost, corrected, v0 - v1, price)
        print(
            f"| {variant} | {seed} | {cost:.1f} | {v0:.0f} | {v1:.0f} | {v1 - v0:+.0f} "
            f"| {price:.4f} | {corrected:.1f} |"
        )
    variants = sorted({v for v, _ in table})
    if len(variants) == 2:
        a, b = sorted(variants, key=lambda v: v != "milp_pump")
        print(f"\n| seed | {a} vs {b}: saving | corrected | strict |\n|---|---|---|---|")
        for seed in sorted({s for _, s in table}):
            if (a, seed) in table and (b, seed) in table:
                (ca, ka, da, pa), (cb, kb, db, pb) = table[(a, seed)], table[(b, seed)]
                dear = max(pa, pb)
                strict = 1 - (ca + da * dear) / (cb + db * dear)
                print(f"| {seed} | {1 - ca / cb:.1%} | {1 - ka / kb:.1%} | {strict:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
