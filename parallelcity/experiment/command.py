"""``parallelcity experiment``: validate, run the matrix, write the table, plots and manifest."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from parallelcity import __version__
from parallelcity.errors import ExperimentError
from parallelcity.experiment.campaign import report as campaign_report
from parallelcity.experiment.definition import Experiment, load_experiment
from parallelcity.experiment.loop import PLOT, SUMMARY, RunOutcome, read_summary, run_one
from parallelcity.experiment.plan import RunSpec, select
from parallelcity.experiment.plots import boxplots, file_part
from parallelcity.experiment.pool import PoolResult, run_all, run_dir, terminate_as_interrupt
from parallelcity.experiment.table import (
    finite_or_null,
    kpi_names,
    kpis_csv,
    kpis_json,
    markdown,
)

EXIT_OK, EXIT_FAILED = 0, 1
EXIT_SIGNAL = {"SIGINT": 130, "SIGTERM": 143}
MANIFEST = "manifest.json"
LOOP_KPIS = ("cycles", "fallbacks", "holds", "rejected_plans", "solve_p50_ms", "solve_p99_ms")


@dataclass(frozen=True)
class Options:
    out: Path | None = None
    workers: int | None = None
    only: Sequence[str] | None = None
    seeds: Sequence[int] | None = None
    force: bool = False


def manifest(exp: Experiment, runs: Sequence[RunSpec]) -> dict[str, Any]:
    """Enough to reproduce every run: the inputs' hashes, and each run's effective scenario
    (as TOML), overrides, seed, cycles, verify and key."""
    return {
        "experiment": exp.name,
        "experiment_file": str(exp.path),
        "experiment_sha256": exp.file_sha256,
        "base": str(exp.base_path),
        "base_sha256": exp.base_sha256,
        "parallelcity": __version__,
        "reproduce": "parallelcity experiment EXPERIMENT --only VARIANT --seeds SEED --force "
        "(or experiment.rerun(manifest, 'VARIANT/SEED'))",
        "runs": {r.run_id: r.to_dict() for r in runs},
    }


def _check_selection(exp: Experiment, opts: Options) -> None:
    names = [v.name for v in exp.variants]
    problems = [
        f"--only: no variant {v!r} (variants: {', '.join(names)})"
        for v in opts.only or ()
        if v not in names
    ]
    seeds = exp.file.experiment.seeds
    problems += [
        f"--seeds: {s} is not a seed of the experiment (seeds: {seeds})"
        for s in opts.seeds or ()
        if s not in seeds
    ]
    if problems:
        raise ExperimentError(str(exp.path), problems)


def _headline(exp: Experiment) -> list[str]:
    """The KPIs a progress line shows: the model's band KPI and first total."""
    from parallelcity.experiment.loop import snake

    spec = next(iter(exp.scenarios.values())).model.report
    return [snake(spec.band_kpi), *(snake(t.label) for t in spec.totals[:1])]


def plotted_kpis(exp: Experiment, names: Sequence[str]) -> list[str]:
    chosen = exp.file.experiment.kpis
    if chosen is not None:
        return [k for k in chosen if k in names]
    return [k for k in names if k not in LOOP_KPIS and k != "wall_s"]


def experiment_command(path: Path, opts: Options, say: Callable[[str], None]) -> int:
    exp = load_experiment(path)
    _check_selection(exp, opts)
    runs = exp.runs()
    chosen = select(runs, opts.only, opts.seeds)
    out = opts.out or Path("experiment-out") / exp.name
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).write_text(json.dumps(manifest(exp, runs), indent=2) + "\n")
    workers = opts.workers or exp.file.experiment.workers or os.cpu_count() or 1
    say(
        f"experiment {exp.name}: {len(exp.variants)} variants x "
        f"{len(exp.file.experiment.seeds)} seeds; running {len(chosen)} runs on "
        f"{min(workers, max(1, len(chosen)))} workers (verify={exp.file.experiment.verify})"
    )
    with terminate_as_interrupt():
        res = run_all(
            chosen, out, workers=workers, force=opts.force, say=say, headline_kpis=_headline(exp)
        )
    _write_outputs(exp, res, chosen, out, say)
    if res.interrupted:
        say(f"interrupted by {res.interrupted}: finished runs kept in {out}")
        return EXIT_SIGNAL[res.interrupted]
    return EXIT_FAILED if res.failed else EXIT_OK


def _write_outputs(
    exp: Experiment, res: PoolResult, runs: Sequence[RunSpec], out: Path, say: Callable[[str], None]
) -> None:
    rows = res.rows
    (out / "kpis.csv").write_text(kpis_csv(rows))
    (out / "kpis.json").write_text(kpis_json(rows, res.units))
    table = markdown(rows, res.units)
    (out / "table.md").write_text(table)
    names = kpi_names(rows)
    unknown = [k for k in exp.file.experiment.kpis or () if k not in names]
    if unknown and any(r["status"] == "done" for r in rows):
        say(f"experiment.kpis: no run has {', '.join(unknown)} (KPIs: {', '.join(names)})")
    boxplots(rows, plotted_kpis(exp, names), res.units, out)
    for spec in runs:
        plot = run_dir(out, spec) / PLOT
        if spec.series and plot.exists():
            name = f"series_{file_part(spec.variant)}_{spec.seed}.png"
            shutil.copyfile(plot, out / name)
    if exp.file.experiment.faults is not None:
        _write_campaign(exp, runs, out)
    done = sum(1 for r in rows if r["status"] == "done")
    say(
        f"{done} of {len(runs)} runs done ({res.skipped} skipped as already done), "
        f"{res.failed} failed; outputs in {out}"
    )
    print(table, end="", flush=True)


def _write_campaign(exp: Experiment, runs: Sequence[RunSpec], out: Path) -> None:
    """The campaign's scores from the finished runs' summaries: diagnosis.json, diagnosis.md
    (printed)."""
    assert exp.file.experiment.faults is not None
    found = []
    for spec in runs:
        data = read_summary(run_dir(out, spec) / SUMMARY)
        ok = data is not None and data.get("run", {}).get("key") == spec.key
        found.append((spec, data.get("summary") if ok and data is not None else None))
    data, text = campaign_report(found, exp.scenarios, exp.file.experiment.faults.kinds)
    (out / "diagnosis.json").write_text(json.dumps(finite_or_null(data), indent=2) + "\n")
    (out / "diagnosis.md").write_text(text)
    print(text, end="", flush=True)


def rerun(manifest_path: Path, run_id: str, out: Path) -> RunOutcome:
    """Run one run of a manifest again, from its recorded scenario and seed, into ``out``."""
    data = json.loads(manifest_path.read_text())
    try:
        spec_data = data["runs"][run_id]
    except KeyError:
        known = ", ".join(data.get("runs", {}))
        raise ExperimentError(str(manifest_path), [f"no run {run_id!r} (runs: {known})"]) from None
    return run_one(RunSpec.from_dict(spec_data), out)
