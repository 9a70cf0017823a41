"""Experiment files: a base scenario under variants, times seeds (TOML, unknown keys forbidden).

``load_experiment(path)`` validates the file, applies each variant's ``set`` to the base
scenario's tables and validates every variant's scenario through the same loader as
``parallelcity validate``; every problem is reported at once with its key path (a
variant's scenario problems prefixed by the variant) in one ``ExperimentError``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from parallelcity import plugins
from parallelcity.errors import ExperimentError, PluginError, ScenarioError
from parallelcity.experiment import campaign as fault_campaign
from parallelcity.experiment.campaign import FaultCampaign
from parallelcity.experiment.plan import (
    RunSpec,
    VariantPlan,
    apply_overrides,
    run_matrix,
    validation_tables,
)
from parallelcity.scenario.definition import Scenario, scenario_from_tables
from parallelcity.scenario.text import tables_toml
from parallelcity.toml_file import parse_toml, read_text_bounded
from parallelcity.verify.rig import PlantRigKind

NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
MAX_SEEDS = 10_000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ExperimentMeta(_Strict):
    name: str = Field(pattern=NAME, max_length=100, description="names the output folder")
    description: str = ""
    base: str = Field(min_length=1, description="base scenario, relative to the experiment file")
    seeds: list[int] = Field(
        description="seeds of the field's draw, one run each (a number n: 1..n)"
    )
    cycles: int | None = Field(None, ge=1, description="cycles per run (default: the scenario's)")
    workers: int | None = Field(
        None, ge=1, le=256, description="parallel runs (default: the CPU count)"
    )
    verify: bool = Field(True, description="verify every plan on the scenario's rig")
    series_run: str | None = Field(
        None, description="VARIANT/SEED whose time series is plotted (default: the first run)"
    )
    kpis: list[str] | None = Field(
        None, description="KPIs with a box plot (default: the model's and the plant's)"
    )
    faults: FaultCampaign | None = Field(
        None,
        description="a diagnosis campaign: planted faults per seed; its seeds are 1..runs "
        "(no seeds key then)",
    )

    @model_validator(mode="before")
    @classmethod
    def _campaign_seeds(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("faults") is None:
            return data
        if "seeds" in data:
            raise ValueError("seeds: a campaign ([experiment.faults]) numbers its own seeds")
        try:
            campaign = FaultCampaign.model_validate(data["faults"])
        except ValidationError:
            return data  # reported with its key path by the field's own validation
        return {**data, "seeds": campaign.seeds}

    @field_validator("seeds", mode="before")
    @classmethod
    def _seed_count(cls, v: object) -> object:
        if isinstance(v, int) and not isinstance(v, bool):
            if not 1 <= v <= MAX_SEEDS:
                raise ValueError(f"a number of seeds must be from 1 to {MAX_SEEDS}, got {v}")
            return list(range(1, v + 1))
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("needs at least one seed")
        if len(v) > MAX_SEEDS:
            raise ValueError(f"at most {MAX_SEEDS} seeds")
        if any(s < 0 or s >= 2**32 for s in v):
            raise ValueError("seeds are whole numbers from 0 to 2**32 - 1")
        if len(set(v)) != len(v):
            raise ValueError("seeds repeat")
        return v


class Variant(_Strict):
    name: str = Field(pattern=NAME, max_length=100)
    description: str = ""
    set: dict[str, Any] = Field(
        default_factory=dict,
        description='dotted keys into the base scenario\'s tables, e.g. "controller" (a whole '
        'table) or "model.plant.tau_min" (one value); controller.kind = "none" runs the field '
        "on its own",
    )


class ExperimentFile(_Strict):
    experiment: ExperimentMeta
    variant: list[Variant] = Field(min_length=1)


def _cross_problems(file: ExperimentFile) -> list[str]:
    """Problems between keys: repeated variant names, a series run that is no run."""
    problems = []
    seen: dict[str, int] = {}
    for i, v in enumerate(file.variant):
        if v.name in seen:
            problems.append(f"variant[{i}].name: {v.name!r} is variant[{seen[v.name]}]'s name too")
        seen.setdefault(v.name, i)
    run = file.experiment.series_run
    if run is not None:
        name, _, seed = run.rpartition("/")
        if name not in seen or not seed.isdigit() or int(seed) not in file.experiment.seeds:
            problems.append(
                f"experiment.series_run: {run!r} is not VARIANT/SEED of a run of this file"
            )
    return problems


@dataclass(frozen=True)
class Experiment:
    path: Path
    file: ExperimentFile
    base_path: Path
    base_sha256: str
    file_sha256: str
    variants: tuple[VariantPlan, ...]
    scenarios: dict[str, Scenario]  # by variant, as validated

    @property
    def name(self) -> str:
        return self.file.experiment.name

    @property
    def series_run(self) -> str:
        e = self.file.experiment
        return e.series_run or f"{self.variants[0].name}/{e.seeds[0]}"

    def runs(self) -> list[RunSpec]:
        e = self.file.experiment
        runs = run_matrix(
            self.variants,
            e.seeds,
            verify=e.verify,
            scenario_path=str(self.base_path),
            series_run=self.series_run,
        )
        if e.faults is None:
            return runs
        plans = {v.name: v for v in self.variants}
        return fault_campaign.plant(runs, plans, self.scenarios, e.faults)


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _read(path: Path, what: str) -> tuple[str, bytes]:
    try:
        text = read_text_bounded(path)
    except OSError as exc:
        raise ExperimentError(str(path), [f"{what}: {exc.strerror or exc}"]) from exc
    except ValueError as exc:
        raise ExperimentError(str(path), [f"{what}: {exc}"]) from exc
    return text, text.encode()


def effective_scenario(tables: dict[str, Any], path: Path) -> Scenario:
    """A variant's tables validated as ``validate`` does (``ScenarioError`` if not)."""
    return scenario_from_tables(validation_tables(tables), path)


def experiment_problems(scenario: Scenario) -> list[str]:
    """Why a valid scenario cannot run in an experiment: its rig kind has no field plant."""
    kind_name = scenario.file.rig.kind
    try:
        kind = plugins.rig_kind(kind_name)
    except PluginError as exc:
        return [f"rig.kind: {exc}"]
    if not isinstance(kind, PlantRigKind):
        return [
            f"rig.kind: rig kind {kind_name!r} has no field plant to run an experiment on "
            "(it lacks field_plant; docs/experiments.md)"
        ]
    return []


def _variant(
    i: int,
    v: Variant,
    base: dict[str, Any],
    base_path: Path,
    cycles: int | None,
    campaign: FaultCampaign | None = None,
) -> tuple[VariantPlan | None, Scenario | None, list[str]]:
    where = f"variant[{i}] ({v.name})"
    tables, problems = apply_overrides(base, v.set)
    if problems:
        return None, None, [f"{where}.{p}" for p in problems]
    try:
        sc = effective_scenario(tables, base_path)
    except ScenarioError as exc:
        return None, None, [f"{where}: {p}" for p in exc.problems]
    found = [f"{where}: {p}" for p in experiment_problems(sc)]
    if campaign is not None:
        found += [
            f"{where}: {p}" for p in fault_campaign.problems(campaign, sc, cycles or sc.meta.cycles)
        ]
    if found:
        return None, None, found
    plan = VariantPlan(v.name, tables, tables_toml(tables), cycles or sc.meta.cycles, v.set)
    return plan, sc, []


def load_experiment(path: str | Path) -> Experiment:
    path = Path(path)
    text, raw_bytes = _read(path, "cannot read the file")
    try:
        raw = parse_toml(text)
    except ValueError as exc:
        raise ExperimentError(str(path), [str(exc)]) from None
    try:
        file = ExperimentFile.model_validate(raw)
    except ValidationError as exc:
        lines = [f"{_loc(e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ExperimentError(str(path), lines) from None
    if cross := _cross_problems(file):
        raise ExperimentError(str(path), cross)
    base_path = (path.parent / file.experiment.base).resolve()
    base_text, base_bytes = _read(base_path, f"experiment.base: cannot read {base_path.name}")
    try:
        base = parse_toml(base_text)
    except ValueError as exc:
        raise ExperimentError(str(path), [f"experiment.base: {exc}"]) from None
    problems: list[str] = []
    plans: list[VariantPlan] = []
    scenarios: dict[str, Scenario] = {}
    for i, v in enumerate(file.variant):
        plan, sc, found = _variant(
            i, v, base, base_path, file.experiment.cycles, file.experiment.faults
        )
        problems += found
        if plan is not None and sc is not None:
            plans.append(plan)
            scenarios[v.name] = sc
    if problems:
        raise ExperimentError(str(path), problems)
    return Experiment(
        path,
        file,
        base_path,
        hashlib.sha256(base_bytes).hexdigest(),
        hashlib.sha256(raw_bytes).hexdigest(),
        tuple(plans),
        scenarios,
    )


def json_schema() -> dict[str, Any]:
    """JSON Schema of experiment files (``parallelcity schema --experiment``)."""
    schema = ExperimentFile.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "parallelcity experiment"
    meta = schema["$defs"]["ExperimentMeta"]["properties"]
    meta["seeds"] = {
        "anyOf": [
            {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
            {"type": "integer", "minimum": 1, "maximum": MAX_SEEDS},
        ],
        "description": meta["seeds"].get("description", ""),
    }
    return schema
