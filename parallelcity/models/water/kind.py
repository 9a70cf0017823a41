"""Model kind ``water_network``: a drinking-water network from an EPANET ``.inp``.

Every name comes from the file: states ``<tank>.level``; inputs ``<pump>.on``,
``<valve>.setting`` and ``<pipe>.open`` for the pipes the file's controls switch;
disturbances ``demand.<pattern>`` (the demand multiplier of each demand pattern) and
``tariff.price``; outputs tank levels, pump flows and power, source flows, critical-node
pressures and ``tariff.cost_per_h``.  The twin is identified from EPANET when the model
is built (``tank_model``); the plant is EPANET itself (``epanet_plant``).
docs/models/water_network.md has the details.
"""

from __future__ import annotations

import datetime as dt
import weakref
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from parallelcity.twin.model import (
    Array,
    FaultKind,
    ModelForm,
    Panel,
    ReportSpec,
    SubsystemModel,
    Total,
)

from .districts import FaultLayout, fault_layout
from .epanet_plant import Layout, plant_factory
from .faults import identify, kinds, min_sizes
from .network import WNTR_PREFIX, Network, controllable, load
from .skeleton import skeleton
from .tank_model import Identified, casadi_functions

KIND_NAME = "water_network"


class TankLimit(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_level_m: float | None = Field(None, ge=0, description="default: the .inp's MinLevel")
    max_level_m: float | None = Field(None, ge=0, description="default: the .inp's MaxLevel")


class Config(BaseModel):
    """``[model]`` table of ``kind = "water_network"``."""

    model_config = ConfigDict(extra="forbid")
    kind: str = KIND_NAME
    inp: str = Field(
        description="the network: a .inp path relative to the scenario file, or "
        "'wntr:NAME.inp' for a network shipped in wntr"
    )
    step_s: float = Field(900.0, gt=0, le=86400, description="model step (s)")
    critical_nodes: dict[str, float] = Field(
        default_factory=dict, description="junction -> minimum service pressure (m)"
    )
    tariff: list[tuple[float, float]] = Field(
        default_factory=lambda: [(0.0, 0.1)],
        description="time of use: [from_hour, price per kWh] pairs, hours of the UTC day",
    )
    tank_limits: dict[str, TankLimit] = Field(
        default_factory=dict, description="tighter tank level limits than the .inp's"
    )
    initial_levels: dict[str, float] = Field(
        default_factory=dict, description="tank -> initial level (m); default the .inp's"
    )
    demand_multiplier: float = Field(1.0, gt=0, le=10, description="scales every demand")
    time0: dt.datetime = Field(
        dt.datetime(1970, 1, 1, tzinfo=dt.UTC),
        description="when the .inp's time 0 falls on the scenario's clock",
    )
    close_full_tanks: bool = Field(
        False,
        description="the twin closes a full tank to inflow and an empty one to outflow, as "
        "EPANET does (docs/models/water_network.md)",
    )
    identify_samples: int = Field(
        24, ge=4, le=1000, description="EPANET solutions per on/off combination fitted"
    )

    @field_validator("inp")
    @classmethod
    def _relative(cls, v: str, info: ValidationInfo) -> str:
        if v.startswith(WNTR_PREFIX):
            return v
        from parallelcity.verify.rig import resolve_path

        return resolve_path(v, info)

    @field_validator("tariff")
    @classmethod
    def _tariff(cls, v: list[tuple[float, float]]) -> list[tuple[float, float]]:
        if not v:
            raise ValueError("the tariff needs at least one [from_hour, price] pair")
        hours = [h for h, _ in v]
        if hours != sorted(hours) or len(set(hours)) != len(hours):
            raise ValueError("tariff hours must increase")
        if not all(0 <= h < 24 for h in hours) or any(p < 0 for _, p in v):
            raise ValueError("tariff hours are in [0, 24) and prices >= 0")
        return v

    @field_validator("time0")
    @classmethod
    def _aware(cls, v: dt.datetime) -> dt.datetime:
        return v if v.tzinfo is not None else v.replace(tzinfo=dt.UTC)


@dataclass(frozen=True, eq=False)
class WaterInfo:
    """What controllers and tools need beyond the ``SubsystemModel``: the network, its
    signal layout, the effective tank limits, minimum pressures and the fitted twin."""

    network: Network
    layout: Layout
    time0: float
    limits: dict[str, tuple[float, float]]
    min_pressure: dict[str, float]
    identified: Identified


_INFO: weakref.WeakKeyDictionary[SubsystemModel, WaterInfo] = weakref.WeakKeyDictionary()


def water_info(model: SubsystemModel) -> WaterInfo | None:
    """The water network behind ``model``; None for a model of another kind."""
    return _INFO.get(model)


def price_at(tariff: list[tuple[float, float]], hours: Array) -> Array:
    """Price at each UTC hour of the day (before the first pair: the last pair's)."""
    starts = np.array([h for h, _ in tariff])
    prices = np.array([p for _, p in tariff])
    idx = np.searchsorted(starts, np.asarray(hours) % 24.0, side="right") - 1
    return np.asarray(prices[idx % len(prices)], dtype=float)


@lru_cache(maxsize=16)
def _identified(source: str, mtime: float, critical: tuple[str, ...], n: int) -> Identified:
    del mtime  # part of the key: an edited file is fitted again
    net = load(source)
    return identify(Layout(net, critical), 0.0, n, seed=0)


def build(config: Config) -> SubsystemModel:
    net = load(config.inp)
    names = {j.name for j in net.junctions} | {t.name for t in net.tanks}
    for node in config.critical_nodes:
        if node not in names:
            raise ValueError(f"critical_nodes: {node!r} is not a junction of {net.source}")
    tanks = {t.name: t for t in net.tanks}
    limits = {}
    for name, t in tanks.items():
        lim = config.tank_limits.get(name, TankLimit())
        lo = t.min_level_m if lim.min_level_m is None else lim.min_level_m
        hi = t.max_level_m if lim.max_level_m is None else lim.max_level_m
        if not (t.min_level_m <= lo < hi <= t.max_level_m):
            raise ValueError(
                f"tank_limits[{name!r}]: {lo:g}..{hi:g} m is not inside the tank's "
                f"{t.min_level_m:g}..{t.max_level_m:g} m"
            )
        limits[name] = (lo, hi)
    for name in [*config.tank_limits, *config.initial_levels]:
        if name not in tanks:
            raise ValueError(f"{name!r} is not a tank of {net.source} (tanks: {', '.join(tanks)})")
    controllable(net)
    critical = tuple(config.critical_nodes)
    layout = Layout(net, critical)
    mtime = Path(net.source).stat().st_mtime
    ident = _identified(config.inp, mtime, critical, config.identify_samples)
    areas = np.array([t.area_m2 for t in net.tanks])
    bottom = np.array([t.min_level_m for t in net.tanks])
    top = np.array([t.max_level_m for t in net.tanks])
    f, h = casadi_functions(ident, config.step_s, areas, bottom, top, config.close_full_tanks)
    flt = fault_layout(net)
    time0 = config.time0.timestamp()
    tariff = list(config.tariff)

    def forecast(t0: float, n: int, dt_s: float) -> Array:
        t = t0 + dt_s * np.arange(n, dtype=float)
        pattern_time = t - time0 + net.pattern_start_s
        cols = [[net.multiplier(g, float(s)) for s in pattern_time] for g in net.groups]
        price = price_at(tariff, t / 3600.0)
        return np.column_stack([*cols, price]).astype(float).reshape(n, -1)

    x0 = np.array([config.initial_levels.get(t.name, t.init_level_m) for t in net.tanks])
    u0 = np.concatenate(
        [
            [1.0 if p.initial_on else 0.0 for p in net.pumps],
            [v.setting for v in net.valves],
            [1.0 if s in net.initially_open_pipes else 0.0 for s in net.switched_pipes],
        ]
    )
    levels = tuple(f"{t.name}.level" for t in net.tanks)
    pumps_on = tuple(f"{p.name}.on" for p in net.pumps)
    panels = [Panel("pumps", pumps_on)] if pumps_on else []
    if net.pumps:
        panels.append(Panel("pump power", tuple(f"{p.name}.kw" for p in net.pumps), "kW"))
    if critical:
        panels.append(Panel("critical pressure", tuple(f"{c}.pressure" for c in critical), "m"))
    panels.append(Panel("tariff", ("tariff.price",), "per kWh"))
    model = SubsystemModel(
        name=KIND_NAME,
        states=levels,
        inputs=layout.inputs,
        disturbances=layout.disturbances,
        outputs=layout.outputs,
        parameters=("demand.scale", *flt.parameters),
        nominal=np.concatenate([[config.demand_multiplier], flt.nominal]),
        f=f,
        h=h,
        forecast=forecast,
        x0=x0,
        u0=u0,
        state_outputs={s: s for s in levels},
        form=ModelForm.DISCRETE,
        step_s=config.step_s,
        simulator=plant_factory(layout, time0, ident.leak_coef),
        faults=water_faults(ident, flt),
        nonnegative=layout.disturbances,
        report=ReportSpec(
            banded_label="level, pressure [m]",
            band_name="level band",
            band_kpi="level violation",
            band_unit="m·h",
            totals=(
                Total("energy", "pumps.kw", "kWh"),
                Total("cost", "tariff.cost_per_h", ""),
            ),
            panels=tuple(panels),
            baseline="inp_rules",
        ),
    )
    _INFO[model] = WaterInfo(net, layout, time0, limits, dict(config.critical_nodes), ident)
    return model


def water_faults(ident: Identified, flt: FaultLayout) -> tuple[FaultKind, ...]:
    """Leak per district, head loss per pump (``faults``), with their smallest diagnosable
    sizes from the twin's own fit error; the largest leak weighed is a quarter of the
    network's total base demand."""
    if ident.sens_cases is None:
        return ()
    net = ident.layout.network
    nt, npump = len(net.tanks), len(net.pumps)
    leak, head = min_sizes(ident.sens_cases, ident.rms, flt, slice(nt + npump, nt + 2 * npump))
    total = sum(net.group_totals().values())
    max_leak = max(0.25 * total, 4.0 * leak)
    return kinds(flt, leak, max_leak, head)


class _Kind:
    """Entry point object for ``kind = "water_network"`` (``parallelcity.models``)."""

    Config = Config
    skeleton_suffixes = (".inp",)

    @staticmethod
    def build(config: BaseModel) -> SubsystemModel:
        if not isinstance(config, Config):
            raise TypeError(f"expected a water_network Config, got {type(config).__name__}")
        return build(config)

    @staticmethod
    def skeleton(path: str) -> str:
        return skeleton(path)


KIND = _Kind()
__all__ = ["KIND", "Config", "WaterInfo", "water_info"]
