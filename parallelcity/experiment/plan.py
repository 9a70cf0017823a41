"""The run matrix of an experiment: variants' scenario tables, seeds, run keys.  Pure.

A variant's scenario is the base scenario's tables with the variant's ``set`` keys
replaced (``apply_overrides``); a run is one variant with one seed, and its key (a
hash of the effective tables, seed, cycles and verify) says whether a finished run
on disk is the same run (resume) or an older one (rerun).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

NONE_CONTROLLER = "none"
"""``controller.kind`` of a variant in which no command is ever applied: the field runs on
its own (its initial inputs, or its own program such as an actuated signal plan)."""

_BARE = re.compile(r"[A-Za-z0-9_-]+")
_INDEX = re.compile(r"\[(\d+)\]")


def parse_key_path(path: str) -> list[str | int]:
    """``model.buildings[1].ua_kw_per_k`` or ``rig.forecast_error."weather.T_out"`` as its
    parts; ``ValueError`` saying why a path does not parse."""
    parts: list[str | int] = []
    i, n = 0, len(path)
    while True:
        if i < n and path[i] == '"':
            end = path.find('"', i + 1)
            if end < 0:
                raise ValueError("unterminated quoted key")
            parts.append(path[i + 1 : end])
            i = end + 1
        else:
            m = _BARE.match(path, i)
            if m is None:
                raise ValueError(f"expected a key at character {i + 1}")
            parts.append(m.group(0))
            i = m.end()
        while (m := _INDEX.match(path, i)) is not None:
            parts.append(int(m.group(1)))
            i = m.end()
        if i == n:
            return parts
        if path[i] != ".":
            raise ValueError(f"unexpected {path[i]!r} at character {i + 1}")
        i += 1


def _set_one(tables: dict[str, Any], parts: list[str | int], value: Any) -> str | None:
    """Set ``parts`` in ``tables`` (missing tables are made); why it cannot, or None."""
    node: Any = tables
    for depth, part in enumerate(parts[:-1]):
        nxt = parts[depth + 1]
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                size = len(node) if isinstance(node, list) else 0
                return f"no item [{part}] (the array has {size})"
            node = node[part]
            continue
        if not isinstance(node, dict):
            return f"{part!r} is below a value that is not a table"
        if part not in node:
            if isinstance(nxt, int):
                return f"no array {part!r} in the base scenario"
            node[part] = {}
        node = node[part]
    last = parts[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or last >= len(node):
            return f"no item [{last}] to replace"
        node[last] = copy.deepcopy(value)
    elif isinstance(node, dict):
        node[last] = copy.deepcopy(value)
    else:
        return f"{last!r} is below a value that is not a table"
    return None


def apply_overrides(
    base: Mapping[str, Any], overrides: Mapping[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """The base tables with each dotted key of ``overrides`` replaced (a whole table, or one
    value), in order; problems name the key."""
    tables = copy.deepcopy(dict(base))
    problems: list[str] = []
    for key, value in overrides.items():
        try:
            parts = parse_key_path(key)
        except ValueError as exc:
            problems.append(f"set.{json.dumps(key)}: not a key path: {exc}")
            continue
        why = _set_one(tables, parts, value)
        if why is not None:
            problems.append(f"set.{json.dumps(key)}: {why}")
    return tables, problems


def controller_none(tables: Mapping[str, Any]) -> bool:
    ctrl = tables.get("controller")
    return isinstance(ctrl, Mapping) and ctrl.get("kind") == NONE_CONTROLLER


def validation_tables(tables: Mapping[str, Any]) -> dict[str, Any]:
    """What a variant's tables are validated as: a ``none`` controller stands aside, so
    the fallback table fills the scenario's [controller] (it never runs)."""
    out = dict(tables)
    if controller_none(tables) and isinstance(tables.get("fallback"), Mapping):
        out["controller"] = dict(tables["fallback"])
    return out


def canonical(value: Any) -> str:
    """Order-independent JSON of TOML values (dates and times as ISO text)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=_iso)


def _iso(v: Any) -> str:
    iso = getattr(v, "isoformat", None)
    if iso is None:
        raise TypeError(f"not a TOML value: {type(v).__name__}")
    return f"{type(v).__name__}:{iso()}"


def run_key(tables: Mapping[str, Any], seed: int, cycles: int, verify: bool) -> str:
    """What makes a run the same run: its effective scenario, seed, cycles and verify."""
    text = canonical({"scenario": tables, "seed": seed, "cycles": cycles, "verify": verify})
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class RunSpec:
    """One run: plain values only (it crosses to a worker process as a dict)."""

    variant: str
    seed: int
    cycles: int
    verify: bool
    scenario_toml: str  # the variant's effective scenario tables, as TOML
    scenario_path: str  # the base scenario file: relative paths resolve against its folder
    key: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    series: bool = False  # plot this run's time series

    @property
    def run_id(self) -> str:
        return f"{self.variant}/{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "seed": self.seed,
            "cycles": self.cycles,
            "verify": self.verify,
            "scenario_toml": self.scenario_toml,
            "scenario_path": self.scenario_path,
            "key": self.key,
            "overrides": json.loads(canonical(dict(self.overrides))),
            "series": self.series,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunSpec:
        return cls(
            variant=str(d["variant"]),
            seed=int(d["seed"]),
            cycles=int(d["cycles"]),
            verify=bool(d["verify"]),
            scenario_toml=str(d["scenario_toml"]),
            scenario_path=str(d["scenario_path"]),
            key=str(d["key"]),
            overrides=dict(d.get("overrides", {})),
            series=bool(d.get("series", False)),
        )


@dataclass(frozen=True)
class VariantPlan:
    """A validated variant: its effective tables, cycles, and TOML text."""

    name: str
    tables: Mapping[str, Any]
    toml: str
    cycles: int
    overrides: Mapping[str, Any]


def run_matrix(
    variants: Sequence[VariantPlan],
    seeds: Sequence[int],
    *,
    verify: bool,
    scenario_path: str,
    series_run: str | None = None,
) -> list[RunSpec]:
    """Every variant times every seed, variant-major, in the file's order."""
    runs = []
    for v in variants:
        for s in seeds:
            runs.append(
                RunSpec(
                    variant=v.name,
                    seed=s,
                    cycles=v.cycles,
                    verify=verify,
                    scenario_toml=v.toml,
                    scenario_path=scenario_path,
                    key=run_key(v.tables, s, v.cycles, verify),
                    overrides=v.overrides,
                    series=series_run == f"{v.name}/{s}",
                )
            )
    return runs


def select(
    runs: Iterable[RunSpec], only: Iterable[str] | None = None, seeds: Iterable[int] | None = None
) -> list[RunSpec]:
    """The runs of the variants ``only`` and the seeds ``seeds`` (None: all)."""
    keep_v = None if only is None else set(only)
    keep_s = None if seeds is None else set(seeds)
    return [
        r
        for r in runs
        if (keep_v is None or r.variant in keep_v) and (keep_s is None or r.seed in keep_s)
    ]
