"""The KPI table of an experiment: per run, and per variant across seeds.  Pure.

A row is one run: ``{"variant", "seed", "status", "error", "kpis": {name: value}}``.
``aggregate`` gives, per variant and KPI, the mean, sample standard deviation, minimum
and maximum over the variant's finished runs (NaN values, e.g. no solve ran, left out).
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

Row = Mapping[str, Any]


@dataclass(frozen=True)
class Stats:
    n: int
    mean: float
    std: float  # sample standard deviation (0 for one value)
    min: float
    max: float


def stats(values: Sequence[float]) -> Stats:
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return Stats(0, math.nan, math.nan, math.nan, math.nan)
    std = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return Stats(len(xs), statistics.fmean(xs), std, min(xs), max(xs))


def kpi_names(rows: Sequence[Row]) -> list[str]:
    """Every KPI of the rows, in first-seen order."""
    names: dict[str, None] = {}
    for r in rows:
        names.update(dict.fromkeys(r.get("kpis", {})))
    return list(names)


def variants(rows: Sequence[Row]) -> list[str]:
    return list(dict.fromkeys(str(r["variant"]) for r in rows))


def aggregate(rows: Sequence[Row]) -> dict[str, dict[str, Stats]]:
    """variant -> KPI -> its statistics over the variant's finished runs."""
    names = kpi_names(rows)
    out: dict[str, dict[str, Stats]] = {}
    for v in variants(rows):
        done = [r for r in rows if r["variant"] == v and r.get("status") == "done"]
        out[v] = {k: stats([_num(r["kpis"].get(k)) for r in done]) for k in names}
    return out


def _num(v: Any) -> float:
    return math.nan if v is None else float(v)


def _fmt(v: float) -> str:
    if not math.isfinite(v):
        return "n/a"
    if v == round(v) and abs(v) < 1e9:
        return str(round(v))
    a = abs(v)
    if a == 0 or 0.01 <= a < 1e5:
        return f"{v:.3g}" if a < 10 else f"{v:.1f}" if a < 1000 else f"{v:.0f}"
    return f"{v:.3g}"


def kpis_csv(rows: Sequence[Row]) -> str:
    """One line per run: variant, seed, status, error, then every KPI."""
    names = kpi_names(rows)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["variant", "seed", "status", "error", *names])
    for r in rows:
        k = r.get("kpis", {})
        w.writerow(
            [r["variant"], r["seed"], r.get("status", ""), r.get("error", "")]
            + ["" if _missing(k.get(n)) else repr(float(k[n])) for n in names]
        )
    return buf.getvalue()


def _missing(v: Any) -> bool:
    return v is None or not math.isfinite(float(v))


def finite_or_null(v: Any) -> Any:
    """``v`` with every non-finite float as None (strict JSON)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: finite_or_null(x) for k, x in v.items()}
    if isinstance(v, list):
        return [finite_or_null(x) for x in v]
    return v


def kpis_json(rows: Sequence[Row], units: Mapping[str, str]) -> str:
    """Every run and the per-variant statistics, as strict JSON (NaN as null)."""
    agg = aggregate(rows)
    data = {
        "units": dict(units),
        "runs": [dict(r) for r in rows],
        "variants": {v: {k: asdict(s) for k, s in by.items()} for v, by in agg.items()},
    }
    return json.dumps(finite_or_null(data), indent=2, allow_nan=False) + "\n"


def markdown(
    rows: Sequence[Row], units: Mapping[str, str], kpis: Sequence[str] | None = None
) -> str:
    """KPIs down, variants across: mean ± std [min, max] over the seeds of each variant."""
    agg = aggregate(rows)
    names = list(kpis) if kpis is not None else kpi_names(rows)
    vs = list(agg)
    head = ["KPI", *(f"{v} (n={_runs(rows, v)})" for v in vs)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in names:
        unit = units.get(k, "")
        cells = [f"{k} [{unit}]" if unit else k]
        for v in vs:
            s = agg[v].get(k)
            if s is None or s.n == 0:
                cells.append("n/a")
            else:
                cells.append(f"{_fmt(s.mean)} ± {_fmt(s.std)} [{_fmt(s.min)}, {_fmt(s.max)}]")
        lines.append("| " + " | ".join(cells) + " |")
    failed = [r for r in rows if r.get("status") == "failed"]
    if failed:
        lines.append("")
    for r in failed:
        lines.append(f"failed: {r['variant']} seed {r['seed']}: {r.get('error', '')}")
    return "\n".join(lines) + "\n"


def _runs(rows: Sequence[Row], variant: str) -> int:
    return sum(1 for r in rows if r["variant"] == variant and r.get("status") == "done")
