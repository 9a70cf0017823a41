"""An experiment's figures: one box plot per KPI across seeds, one box per variant."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from parallelcity.experiment.table import Row, variants


def file_part(name: str) -> str:
    """A KPI or run name as part of a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "kpi"


def boxplot(rows: Sequence[Row], kpi: str, unit: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = variants(rows)
    data = []
    for v in names:
        values = [
            float(r["kpis"][kpi])
            for r in rows
            if r["variant"] == v and r.get("status") == "done" and r["kpis"].get(kpi) is not None
        ]
        data.append([x for x in values if math.isfinite(x)])
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(names), 3.6))
    try:
        ax.boxplot(data, tick_labels=names, showmeans=True)
        for i, values in enumerate(data, start=1):  # every seed as a point beside its box
            ax.plot([i] * len(values), values, "o", color="tab:gray", alpha=0.6, markersize=3)
        ax.set_ylabel(f"{kpi} [{unit}]" if unit else kpi)
        ax.set_title(f"{kpi} across seeds")
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path


def boxplots(
    rows: Sequence[Row], kpis: Sequence[str], units: Mapping[str, str], out: Path
) -> list[Path]:
    return [
        boxplot(rows, k, units.get(k, ""), out / f"boxplot_{file_part(k)}.png")
        for k in kpis
        if any(r.get("status") == "done" and k in r.get("kpis", {}) for r in rows)
    ]
