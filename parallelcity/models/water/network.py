"""An EPANET ``.inp`` read through WNTR into a plain description, in SI units.

Everything the water domain needs from a network comes from here, by the names in the
file: tanks (area, levels, limits), pumps (head curve, ends), valves, reservoirs,
junctions with their demands grouped by pattern, and the file's own controls and rules
as condition trees.  Nothing here steps hydraulics (``epanet_plant`` does).

Units: m, m2, m3/h, seconds.  A ``wntr:NAME.inp`` reference names a network shipped in
the installed ``wntr`` package (``wntr/library/networks``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

WNTR_PREFIX = "wntr:"
M3S_TO_M3H = 3600.0
NO_PATTERN = "base"  # the demand group of junction demands without a pattern


@dataclass(frozen=True)
class Tank:
    name: str
    elevation_m: float
    area_m2: float  # floor area of the cylinder (volume curves are not modelled)
    min_level_m: float
    max_level_m: float
    init_level_m: float


@dataclass(frozen=True)
class Pump:
    name: str
    start: str
    end: str
    curve: tuple[tuple[float, float], ...]  # (flow m3/h, head m); empty for a power pump
    initial_on: bool
    power_kw: float  # a constant-power pump's power; 0 for a head-curve pump


@dataclass(frozen=True)
class Valve:
    name: str
    valve_type: str  # PRV, PSV, PBV, FCV, TCV, GPV
    setting: float  # initial setting in SI (m for pressure valves, m3/h for FCV)


@dataclass(frozen=True)
class Junction:
    name: str
    elevation_m: float
    demands: tuple[tuple[float, str], ...]  # (base m3/h, demand group)


@dataclass(frozen=True)
class Condition:
    """A control condition: ``kind`` is "level", "pressure" or "head" (a node's value
    against ``threshold``), "sim_time" (seconds since the network's time 0), "clock_time"
    (seconds of the day), "and" / "or" (of ``children``)."""

    kind: str
    relation: str = "="  # one of < <= > >= = !=
    target: str = ""
    threshold: float = 0.0
    children: tuple[Condition, ...] = ()


@dataclass(frozen=True)
class Action:
    link: str
    attribute: str  # "status" (0 closed, 1 open) or "setting"
    value: float


@dataclass(frozen=True)
class Rule:
    name: str
    condition: Condition
    then: tuple[Action, ...]
    otherwise: tuple[Action, ...]
    priority: float


@dataclass(frozen=True)
class Network:
    """A network's description (see the module docstring); ``source`` is the file read."""

    source: str
    tanks: tuple[Tank, ...]
    pumps: tuple[Pump, ...]
    valves: tuple[Valve, ...]
    reservoirs: tuple[str, ...]
    junctions: tuple[Junction, ...]
    patterns: dict[str, tuple[float, ...]]  # demand group -> multipliers (NO_PATTERN: (1,))
    pattern_step_s: float
    pattern_start_s: float
    start_clock_s: float
    switched_pipes: tuple[str, ...]  # pipes the file's controls open and close
    initially_open_pipes: frozenset[str]
    rules: tuple[Rule, ...]
    unsupported: tuple[str, ...] = field(default=())  # controls not representable here

    @property
    def groups(self) -> tuple[str, ...]:
        """Demand groups (patterns with demand on them), in file order."""
        return tuple(self.patterns)

    def group_totals(self) -> dict[str, float]:
        """Total base demand (m3/h) of each demand group."""
        totals = dict.fromkeys(self.patterns, 0.0)
        for j in self.junctions:
            for base, group in j.demands:
                totals[group] += base
        return totals

    def multiplier(self, group: str, pattern_time_s: float) -> float:
        """The group's pattern multiplier at ``pattern_time_s`` (pattern start included)."""
        values = self.patterns[group]
        k = math.floor(pattern_time_s / self.pattern_step_s + 1e-9)
        return values[k % len(values)]


def resolve(ref: str) -> Path:
    """The file ``ref`` names: a path, or ``wntr:NAME`` for a network shipped in wntr."""
    if ref.startswith(WNTR_PREFIX):
        import wntr

        name = ref[len(WNTR_PREFIX) :]
        base = Path(wntr.__file__).parent / "library" / "networks"
        path = base / name
        if Path(name).name != name or not path.is_file():
            shipped = ", ".join(sorted(p.name for p in base.glob("*.inp")))
            raise ValueError(f"{ref!r}: wntr ships no network {name!r} (it ships {shipped})")
        return path
    path = Path(ref).expanduser()
    if not path.is_file():
        raise ValueError(f"network file {ref!r} does not exist")
    return path


def read_wntr(path: Path) -> Any:
    """WNTR's model of the file (a ``ValueError`` for a file EPANET's format rejects)."""
    import wntr

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return wntr.network.WaterNetworkModel(str(path))
    except Exception as exc:  # wntr raises assorted errors for a bad file
        raise ValueError(f"{path.name}: not a readable EPANET network: {exc}") from None


@cache
def load(ref: str) -> Network:
    """The network ``ref`` names (cached per process: the file is read once)."""
    path = resolve(ref)
    return describe(read_wntr(path), str(path))


def describe(wn: Any, source: str) -> Network:
    """The plain description of a WNTR network model."""
    t = wn.options.time
    patterns: dict[str, tuple[float, ...]] = {}
    junctions = []
    default = wn.options.hydraulic.pattern
    dmult = float(wn.options.hydraulic.demand_multiplier or 1.0)
    for name in wn.junction_name_list:
        j = wn.get_node(name)
        demands = []
        for ts in j.demand_timeseries_list:
            if ts.base_value == 0:
                continue
            pat = ts.pattern_name or (default if default in wn.pattern_name_list else None)
            group = str(pat) if pat is not None else NO_PATTERN
            if group not in patterns:
                mult = wn.get_pattern(pat).multipliers if pat is not None else [1.0]
                patterns[group] = tuple(float(v) for v in mult) or (1.0,)
            demands.append((float(ts.base_value) * dmult * M3S_TO_M3H, group))
        junctions.append(Junction(name, float(j.elevation), tuple(demands)))
    tanks = tuple(
        Tank(
            n,
            float(k.elevation),
            math.pi * float(k.diameter) ** 2 / 4.0,
            float(k.min_level),
            float(k.max_level),
            float(k.init_level),
        )
        for n, k in ((n, wn.get_node(n)) for n in wn.tank_name_list)
    )
    pumps = []
    for name in wn.pump_name_list:
        p = wn.get_link(name)
        curve: tuple[tuple[float, float], ...] = ()
        power = 0.0
        if p.pump_type == "HEAD":
            pts = wn.get_curve(p.pump_curve_name).points
            curve = tuple((float(q) * M3S_TO_M3H, float(h)) for q, h in pts)
        else:
            power = float(p.power) / 1000.0
        pumps.append(Pump(name, p.start_node_name, p.end_node_name, curve, _is_open(p), power))
    valves = tuple(
        Valve(n, str(v.valve_type), _si_setting(v))
        for n, v in ((n, wn.get_link(n)) for n in wn.valve_name_list)
    )
    rules, unsupported = [], []
    pump_names = set(wn.pump_name_list)
    valve_names = set(wn.valve_name_list)
    switched: list[str] = []
    for name, ctl in wn.controls():
        try:
            rule = _rule(name, ctl)
        except ValueError as exc:
            unsupported.append(f"{name}: {exc}")
            continue
        for a in (*rule.then, *rule.otherwise):
            if a.link not in pump_names | valve_names and a.link not in switched:
                switched.append(a.link)
        rules.append(rule)
    opened = frozenset(n for n in switched if _is_open(wn.get_link(n)))
    return Network(
        source=source,
        tanks=tanks,
        pumps=tuple(pumps),
        valves=valves,
        reservoirs=tuple(wn.reservoir_name_list),
        junctions=tuple(junctions),
        patterns=patterns,
        pattern_step_s=float(t.pattern_timestep),
        pattern_start_s=float(t.pattern_start),
        start_clock_s=float(t.start_clocktime),
        switched_pipes=tuple(switched),
        initially_open_pipes=opened,
        rules=tuple(rules),
        unsupported=tuple(unsupported),
    )


def _is_open(link: Any) -> bool:
    return str(getattr(link, "initial_status", "Open")).lower() != "closed"


def _si_setting(valve: Any) -> float:
    s = float(valve.initial_setting)
    return s * M3S_TO_M3H if str(valve.valve_type) == "FCV" else s


_RELATIONS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<=", "eq": "=", "ne": "!="}


def _relation(cond: Any) -> str:
    return _RELATIONS[cond._relation.name]


def _condition(cond: Any) -> Condition:
    kind = type(cond).__name__
    if kind in ("AndCondition", "OrCondition"):
        parts = (_condition(cond._condition_1), _condition(cond._condition_2))
        return Condition("and" if kind == "AndCondition" else "or", children=parts)
    if kind == "SimTimeCondition":
        return Condition("sim_time", _relation(cond), threshold=float(cond._threshold))
    if kind == "TimeOfDayCondition":
        return Condition("clock_time", _relation(cond), threshold=float(cond._threshold))
    if kind in ("ValueCondition", "TankLevelCondition"):
        attr = cond._source_attr
        src = cond._source_obj
        node_types = ("Tank", "Junction", "Reservoir")
        if type(src).__name__ in node_types and attr in ("level", "pressure", "head"):
            if attr == "pressure" and type(src).__name__ == "Tank":
                attr = "level"
            return Condition(attr, _relation(cond), src.name, float(cond._threshold))
    raise ValueError(f"condition {cond} is not supported (node level, pressure or head; time)")


def _actions(actions: Any) -> tuple[Action, ...]:
    out = []
    for a in actions:
        attr = a._attribute
        if attr not in ("status", "setting"):
            raise ValueError(f"action on {attr!r} is not supported (status or setting)")
        link = a._target_obj
        value = float(a._value)
        if attr == "setting" and type(link).__name__ == "FCValve":
            value *= M3S_TO_M3H
        out.append(Action(link.name, attr, value))
    return tuple(out)


def _rule(name: str, ctl: Any) -> Rule:
    return Rule(
        name=str(name),
        condition=_condition(ctl._condition),
        then=_actions(ctl._then_actions),
        otherwise=_actions(ctl._else_actions),
        priority=float(ctl._priority),
    )


def controllable(net: Network) -> None:
    """``ValueError`` for a network with nothing to schedule or nothing to schedule with."""
    name = Path(net.source).name
    if not net.tanks:
        raise ValueError(f"{name} has no tank: there is no storage to schedule")
    if not (net.pumps or net.valves or net.switched_pipes):
        raise ValueError(f"{name} has no pump, valve or switched pipe: nothing to control")
