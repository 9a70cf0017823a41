"""A diagnosis campaign: planted faults drawn per seed, and the scores of the alarms.

``[experiment.faults]`` turns an experiment's seeds into a campaign: seed ``s`` of the
first ``len(kinds) * runs_per_kind`` plants one fault of kind ``kinds[(s - 1) //
runs_per_kind]`` on a component, size and start drawn from the seed; the remaining
``fault_free_runs`` seeds plant none.  The fault goes into the run's effective scenario
as ``[[rig.faults]]``, so the manifest records it and the run reproduces.  Scoring reads
the runs' summaries only (``faults_injected`` against ``alarms``).  Pure.
"""

from __future__ import annotations

import itertools
import math
import statistics
import weakref
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from parallelcity.diagnose.config import settings as diagnosis_settings
from parallelcity.diagnose.visibility import operating_points, visible_size
from parallelcity.experiment.plan import RunSpec, VariantPlan, apply_overrides, run_key
from parallelcity.scenario.definition import Scenario
from parallelcity.scenario.text import tables_toml
from parallelcity.twin.model import FaultEffect, FaultKind, FaultTarget, SubsystemModel

FAULT_KEY = "rig.faults"
MISSED = "missed"
NO_FAULT = "none"
WEEK_S = 7 * 86400.0
MAX_RUNS = 10_000
SIZE_BINS = (0.0, 1.0, 1.5, 2.0, 3.0, math.inf)  # planted size over the kind's minimum


class FaultCampaign(BaseModel):
    """``[experiment.faults]``: planted faults per seed (docs/experiments.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    kinds: list[str] = Field(min_length=1, description="fault kinds planted, in turn")
    runs_per_kind: int = Field(ge=1, le=MAX_RUNS, description="planted runs of each kind")
    fault_free_runs: int = Field(0, ge=0, le=MAX_RUNS, description="runs with no fault")
    size: tuple[float, float] = Field(
        (1.0, 3.0),
        description="size range, in multiples of each kind's declared minimum size (a "
        "sensor drift's counts noise sigmas per cycle of its channel)",
    )
    start_s: tuple[float, float] = Field(
        description="window of the fault's start, simulated seconds after the scenario's start"
    )
    sensors: list[str] | None = Field(
        None, description="outputs a sensor fault may hit (default: the diagnosis's channels)"
    )

    @model_validator(mode="after")
    def _ranges(self) -> FaultCampaign:
        lo, hi = self.size
        if not 0 < lo <= hi:
            raise ValueError("size: need 0 < low <= high")
        a, b = self.start_s
        if not 0 <= a <= b:
            raise ValueError("start_s: need 0 <= low <= high")
        if len(self.kinds) * self.runs_per_kind + self.fault_free_runs > MAX_RUNS:
            raise ValueError(f"at most {MAX_RUNS} runs")
        return self

    @property
    def planted(self) -> int:
        return len(self.kinds) * self.runs_per_kind

    @property
    def seeds(self) -> list[int]:
        return list(range(1, self.planted + self.fault_free_runs + 1))


def problems(campaign: FaultCampaign, scenario: Scenario, cycles: int) -> list[str]:
    """Why a variant's scenario cannot run the campaign (key paths of the experiment file)."""
    out = []
    cfg = scenario.file.diagnosis
    if cfg is None or not cfg.enabled:
        out.append("experiment.faults: the scenario has no enabled [diagnosis] table")
    if not hasattr(scenario.rig_config, "faults"):
        out.append(
            f"experiment.faults: rig kind {scenario.file.rig.kind!r} takes no [[rig.faults]]"
        )
    known = [k.name for k in scenario.model.fault_kinds]
    for i, name in enumerate(campaign.kinds):
        if name not in known:
            out.append(
                f"experiment.faults.kinds[{i}]: {name!r} is not a fault kind of model "
                f"{scenario.model.name!r} (kinds: {', '.join(known)})"
            )
    channels = list(cfg.noise) if cfg is not None else []
    for i, name in enumerate(campaign.sensors or []):
        if name not in channels:
            out.append(f"experiment.faults.sensors[{i}]: {name!r} is not a [diagnosis] channel")
    end = cycles * scenario.meta.cycle_s
    if campaign.start_s[1] >= end:
        out.append(f"experiment.faults.start_s: starts must fall before the run's end ({end:g} s)")
    return out


# visible sizes per model, by everything else they depend on; an entry goes with its model
_VISIBLE: weakref.WeakKeyDictionary[SubsystemModel, dict[str, float]] = weakref.WeakKeyDictionary()


def min_size(kind: FaultKind, component: str, scenario: Scenario) -> float:
    """The smallest size the campaign scores detection against, in the kind's unit: a
    drift's is ``min_size`` noise sigmas of ``component`` per cycle, per hour; a parameter
    or input fault's is the larger of the kind's declared minimum and the size at which
    the component's signature becomes visible on the diagnosis channels
    (``diagnose.visibility``: twice the CUSUM allowance on some channel)."""
    cfg = scenario.file.diagnosis
    if kind.relative_to_noise:
        sigma = cfg.noise[component] if cfg is not None else 1.0
        return kind.min_size * sigma / (scenario.meta.cycle_s / 3600.0)
    if cfg is None or kind.applies_to is FaultTarget.SENSOR or not kind.sized:
        return kind.min_size
    dt, t0 = scenario.meta.cycle_s, scenario.meta.start_epoch
    bounds = {s.name: (s.min, s.max) for s in scenario.specs.inputs}
    noise, k = sorted(cfg.noise.items()), cfg.drift_allowance
    key = repr((kind.name, component, noise, k, dt, t0, sorted(bounds.items())))
    sizes = _VISIBLE.setdefault(scenario.model, {})
    found = sizes.get(key)
    if found is None:
        points = operating_points(scenario.model, dt, t0, bounds)
        found = sizes[key] = visible_size(
            scenario.model, kind, component, cfg.noise, cfg.drift_allowance, dt, points
        )
    return max(kind.min_size, found)


@dataclass(frozen=True)
class Planted:
    kind: str
    component: str
    size: float | None
    start_s: float
    min_size: float  # the kind's declared minimum, in the size's unit (0: unsized)
    # observable: it showed on the diagnosis channels long enough for the CUSUM to cross
    # (None: not judged, a sensor fault; see ``observable_cycles``)
    observable: bool | None = None

    def as_table(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind,
            "component": self.component,
            "start_s": self.start_s,
        }
        if self.size is not None:
            out["size"] = self.size
        return out


def draw(campaign: FaultCampaign, scenario: Scenario, seed: int) -> Planted | None:
    """Seed ``seed``'s planted fault (None for a fault-free seed)."""
    index = seed - 1
    if not 0 <= index < campaign.planted:
        return None
    kind = scenario.model.fault_kind(campaign.kinds[index // campaign.runs_per_kind])
    rng = np.random.default_rng([int(seed), 0xFA17])
    if kind.applies_to is FaultTarget.SENSOR:
        cfg = scenario.file.diagnosis
        comps = list(campaign.sensors or (cfg.noise if cfg is not None else []))
    else:
        comps = sorted(kind.components)
    component = comps[int(rng.integers(0, len(comps)))]
    start = float(round(rng.uniform(*campaign.start_s)))
    rel = float(rng.uniform(*campaign.size))
    if not kind.sized:
        return Planted(kind.name, component, None, start, 0.0)
    low = min_size(kind, component, scenario)
    size = rel * low
    if kind.effect is FaultEffect.SCALE:
        size = min(size, 0.999 * min(kind.max_size, 1.0))
    elif math.isfinite(kind.max_size):
        size = min(size, kind.max_size)
    return Planted(kind.name, component, float(f"{size:.6g}"), start, low)


def plant(
    runs: Sequence[RunSpec],
    plans: Mapping[str, VariantPlan],
    scenarios: Mapping[str, Scenario],
    campaign: FaultCampaign,
) -> list[RunSpec]:
    """Each run with its seed's planted fault in its effective scenario (and its key)."""
    out = []
    for spec in runs:
        p = draw(campaign, scenarios[spec.variant], spec.seed)
        faults = [] if p is None else [p.as_table()]
        tables, why = apply_overrides(plans[spec.variant].tables, {FAULT_KEY: faults})
        if why:  # apply_overrides makes missing tables: only a non-table rig could fail
            raise ValueError("; ".join(why))
        out.append(
            replace(
                spec,
                scenario_toml=tables_toml(tables),
                key=run_key(tables, spec.seed, spec.cycles, spec.verify),
                overrides={**spec.overrides, FAULT_KEY: faults},
            )
        )
    return out


# ------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class Scored:
    """One run's outcome as the campaign counts it."""

    seed: int
    planted: Planted | None
    isolated: str  # kind of the first alarm at or after the fault's start; MISSED if none
    component_right: bool
    delay_s: float | None  # first alarm's raised_s - the fault's start
    false_alarms: int  # alarms of a fault-free run, or raised before the planted start
    sim_s: float
    to_class: bool = False  # right through an alarm naming several alike components


def score_run(seed: int, planted: Planted | None, summary: Mapping[str, Any], dt: float) -> Scored:
    alarms = sorted(summary.get("alarms", []), key=lambda a: a.get("raised_s") or 0.0)
    sim_s = float(summary.get("cycles", 0)) * dt
    if planted is None:
        return Scored(seed, None, NO_FAULT, False, None, len(alarms), sim_s)
    after = [a for a in alarms if (a.get("raised_s") or 0.0) >= planted.start_s]
    early = len(alarms) - len(after)
    if not after:
        return Scored(seed, planted, MISSED, False, None, early, sim_s)
    first = after[0]
    named = [first.get("component"), *(first.get("alike") or [])]
    right = first.get("kind") == planted.kind and planted.component in named
    delay = float(first["raised_s"]) - planted.start_s
    return Scored(
        seed, planted, str(first.get("kind")), right, delay, early, sim_s, right and len(named) > 1
    )


def _rate(n: int, d: int) -> float | None:
    return n / d if d else None


def score(runs: Sequence[Scored], kinds: Sequence[str]) -> dict[str, Any]:
    """Confusion counts (true kind -> isolated kind, MISSED), detection and isolation rates
    over the faults at or above their minimum size, false alarms per simulated week of the
    fault-free runs, and detection delays."""
    columns = [*kinds, MISSED]
    confusion: dict[str, dict[str, int]] = {}
    right: Counter[str] = Counter()
    for r in runs:
        true = NO_FAULT if r.planted is None else r.planted.kind
        row = confusion.setdefault(true, dict.fromkeys(columns, 0))
        if r.planted is None:
            continue
        row[r.isolated] = row.get(r.isolated, 0) + 1
        right[true] += int(r.component_right)
    big = [r for r in runs if r.planted is not None and _above(r.planted)]
    detected = [r for r in big if r.isolated != MISSED]
    seen = [r for r in big if r.planted is not None and r.planted.observable is not False]
    seen_detected = [r for r in seen if r.isolated != MISSED]
    correct = [r for r in detected if r.component_right]
    free = [r for r in runs if r.planted is None]
    free_alarms = sum(r.false_alarms for r in free)
    weeks = sum(r.sim_s for r in free) / WEEK_S
    delays = [r.delay_s / 3600.0 for r in detected if r.delay_s is not None]
    per_kind = {}
    for k in kinds:
        ks = [r for r in big if r.planted is not None and r.planted.kind == k]
        kd = [r for r in ks if r.isolated != MISSED]
        per_kind[k] = {
            "runs_above_min": len(ks),
            "observable": sum(1 for r in ks if r.planted and r.planted.observable is not False),
            "observable_detected": sum(
                1 for r in kd if r.planted and r.planted.observable is not False
            ),
            "detected": len(kd),
            "isolated": sum(1 for r in kd if r.component_right),
            "median_delay_h": statistics.median(
                [r.delay_s / 3600.0 for r in kd if r.delay_s is not None]
            )
            if kd
            else None,
        }
    by_size = []
    sized = [r for r in runs if r.planted is not None and r.planted.min_size > 0]
    for lo, hi in itertools.pairwise(SIZE_BINS):
        rs = [r for r in sized if r.planted and lo <= _relative(r.planted) < hi]
        if rs:
            by_size.append(
                {
                    "from": lo,
                    "to": hi,
                    "runs": len(rs),
                    "detected": sum(1 for r in rs if r.isolated != MISSED),
                    "isolated": sum(1 for r in rs if r.component_right),
                }
            )
    if free:
        confusion[NO_FAULT] = {
            "alarms": free_alarms,
            "quiet_runs": sum(1 for r in free if r.false_alarms == 0),
        }
    return {
        "confusion": confusion,
        "right_component": dict(right),
        "planted_runs": sum(1 for r in runs if r.planted is not None),
        "runs_above_min": len(big),
        "detected_above_min": len(detected),
        "detection_rate": _rate(len(detected), len(big)),
        "runs_observable": len(seen),
        "detected_observable": len(seen_detected),
        "detection_rate_observable": _rate(len(seen_detected), len(seen)),
        "isolated_right": len(correct),
        "isolated_to_class": sum(1 for r in correct if r.to_class),
        "isolation_rate": _rate(len(correct), len(detected)),
        "isolation_rate_of_all": _rate(len(correct), len(big)),
        "fault_free_runs": len(free),
        "fault_free_weeks": weeks,
        "false_alarms": free_alarms,
        "false_alarms_per_week": free_alarms / weeks if weeks > 0 else None,
        "alarms_before_planted_start": sum(r.false_alarms for r in runs if r.planted is not None),
        "median_delay_h": statistics.median(delays) if delays else None,
        "per_kind": per_kind,
        "by_size": by_size,
    }


def _relative(p: Planted) -> float:
    return (p.size or 0.0) / p.min_size


def _above(p: Planted) -> bool:
    return p.size is None or p.size >= p.min_size * (1 - 1e-9)


def _pct(v: Any) -> str:
    return "n/a" if v is None else f"{100 * v:.1f} %"


def markdown(variant: str, s: Mapping[str, Any], kinds: Sequence[str]) -> str:
    """The campaign's report for one variant: the confusion table and the headline rates."""
    cols = [*kinds, MISSED]
    lines = [
        f"## {variant}",
        "",
        "Confusion (rows: the planted kind; columns: the kind of the first alarm raised at or "
        f"after its start, {MISSED}: none); right component: that alarm names the planted "
        "kind and component (alone or among the components it names as alike).",
        "",
        "| planted \\ isolated | " + " | ".join(cols) + " | right component |",
        "|---" * (len(cols) + 2) + "|",
    ]
    for true in kinds:
        row = s["confusion"].get(true)
        if row is None:
            continue
        cells = [str(row.get(c, 0)) for c in cols]
        extra = [str(v) for c, v in row.items() if c not in cols]  # an unexpected kind
        lines.append(
            f"| {true} | "
            + " | ".join(cells)
            + (f" (+{', '.join(extra)} other)" if extra else "")
            + f" | {s['right_component'].get(true, 0)} |"
        )
    free = s["confusion"].get(NO_FAULT)
    delay = s["median_delay_h"]
    fa = s["false_alarms_per_week"]
    lines += [
        "",
        f"- detection rate (faults at or above their minimum size): "
        f"{_pct(s['detection_rate'])} ({s['detected_above_min']} of {s['runs_above_min']})",
        f"- detection rate of those also observable (a sensor fault, or one that showed "
        f"for the CUSUM to cross): {_pct(s['detection_rate_observable'])} "
        f"({s['detected_observable']} of {s['runs_observable']})",
        f"- correct isolation (kind and component) of those detected: "
        f"{_pct(s['isolation_rate'])} ({s['isolated_right']} of {s['detected_above_min']}, "
        f"{s['isolated_to_class']} of them to a class of alike components); "
        f"of all at or above minimum size: {_pct(s['isolation_rate_of_all'])}",
        f"- false alarms: {s['false_alarms']} in {s['fault_free_runs']} fault-free runs "
        f"({s['fault_free_weeks']:.2f} simulated weeks): "
        + ("n/a" if fa is None else f"{fa:.2f} per week")
        + (f"; quiet runs {free['quiet_runs']}" if free else ""),
        f"- alarms before the planted start in planted runs: {s['alarms_before_planted_start']}",
        "- median detection delay (alarm raised - fault start): "
        + ("n/a" if delay is None else f"{delay:.1f} h"),
        "",
        "| kind | runs at or above min | detected | isolated | observable | detected of "
        "observable | median delay h |",
        "|---|---|---|---|---|---|---|",
    ]
    for k, v in s["per_kind"].items():
        md = v["median_delay_h"]
        lines.append(
            f"| {k} | {v['runs_above_min']} | {v['detected']} | {v['isolated']} | "
            f"{v['observable']} | {v['observable_detected']} | "
            + ("n/a" if md is None else f"{md:.1f}")
            + " |"
        )
    if s["by_size"]:
        lines += [
            "",
            "| sized faults, size / min size | runs | detected | isolated |",
            "|---|---|---|---|",
        ]
        for b in s["by_size"]:
            hi = "" if math.isinf(b["to"]) else f"{b['to']:g}"
            lines.append(
                f"| {b['from']:g} .. {hi} | {b['runs']} | {b['detected']} | {b['isolated']} |"
            )
    return "\n".join(lines) + "\n"


def planted_of(summary: Mapping[str, Any], scenario: Scenario) -> Planted | None:
    """The fault a run's summary says was planted (``faults_injected``), with its kind's
    minimum size; None if none was."""
    injected = summary.get("faults_injected") or []
    if not injected:
        return None
    f = injected[0]
    kind = scenario.model.fault_kind(str(f["kind"]))
    low = min_size(kind, str(f["component"]), scenario) if kind.sized else 0.0
    size = None if f.get("size") is None else float(f["size"])
    seen = f.get("visible_cycles")
    observable = None if seen is None else int(seen) >= observable_cycles(scenario)
    return Planted(kind.name, str(f["component"]), size, float(f["start_s"]), low, observable)


def observable_cycles(scenario: Scenario) -> int:
    """Cycles a fault must show at twice the CUSUM allowance ``k`` for its detector to cross
    the threshold ``h``: ``ceil(h / k)``."""
    cfg = scenario.file.diagnosis
    if cfg is None:
        return 0
    det = diagnosis_settings(cfg, scenario.model, scenario.meta.cycle_s, {}).detector
    return math.ceil(det.h / det.k)


def report(
    runs: Sequence[tuple[RunSpec, Mapping[str, Any] | None]],
    scenarios: Mapping[str, Scenario],
    kinds: Sequence[str],
) -> tuple[dict[str, Any], str]:
    """Per variant, the scores of its finished runs (summary.json's ``summary``): as JSON
    data and as Markdown."""
    by_variant: dict[str, list[Scored]] = {}
    runs_json: dict[str, list[dict[str, Any]]] = {}
    for spec, summary in runs:
        if summary is None:
            continue
        sc = scenarios[spec.variant]
        p = planted_of(summary, sc)
        r = score_run(spec.seed, p, summary, sc.meta.cycle_s)
        by_variant.setdefault(spec.variant, []).append(r)
        runs_json.setdefault(spec.variant, []).append(
            {
                "seed": r.seed,
                "planted": None
                if p is None
                else {**p.as_table(), "min_size": p.min_size, "observable": p.observable},
                "isolated": r.isolated,
                "component_right": r.component_right,
                "to_class": r.to_class,
                "delay_s": r.delay_s,
                "false_alarms": r.false_alarms,
            }
        )
    data: dict[str, Any] = {}
    text = ["# Diagnosis campaign", ""]
    for variant, scored in by_variant.items():
        s = score(scored, kinds)
        data[variant] = {**s, "runs": runs_json[variant]}
        text.append(markdown(variant, s, kinds))
    return data, "\n".join(text)
