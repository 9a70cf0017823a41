"""The ``signal_corridor`` model kind: a signalised network on SUMO.

``[model]`` names a ``.sumocfg`` (network, routes, detectors); ``build`` reads the network
(``network.read_network``) and the demand (``demand.read_demand``) from the files it
names and returns the store-and-forward queue model (``queue_model``) that the twin and
the controllers plan with; its ``simulator`` is the SUMO plant
(``parallelcity.models.traffic.sumo_plant.plant_factory``), which rigs and the field
stand-in run.  ``skeleton`` lists what a ``.sumocfg`` holds and writes a scenario for it.
"""

from __future__ import annotations

import datetime as dt
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from parallelcity.twin.model import (
    Array,
    ModelForm,
    Panel,
    ReportSpec,
    SimulatorFactory,
    SubsystemModel,
    Total,
)
from parallelcity.twin.schedule import TIME_ZONE
from parallelcity.verify.rig import resolve_path

from .calibrate import measured_saturation
from .demand import Demand, read_demand, sumocfg_files
from .network import QUEUED, Network, read_network, signal_names
from .queue_model import queue_functions
from .sumo_plant import junction_points

NAME = "signal_corridor"
PLANT_MODULE = "parallelcity.models.traffic.sumo_plant"


class Config(BaseModel):
    """``[model]`` table for ``kind = "signal_corridor"``."""

    model_config = ConfigDict(extra="forbid")
    kind: str = NAME
    sumocfg: str = Field(
        description="SUMO configuration (network, routes, detectors), relative to the scenario"
    )
    begin: dt.datetime = Field(description="scenario time of SUMO second 0")
    seed: int = Field(0, ge=0, lt=2**31, description="added to the plant's random seed")
    step_s: float = Field(
        10.0, gt=0, le=900, description="model step; the scenario's cycle is a whole number"
    )
    junctions: list[str] | None = Field(
        None, description="traffic light ids (default: all with two or more green phases)"
    )
    program: str | None = Field(
        None,
        description="program every junction runs on its own, e.g. 'actuated' (default: its first)",
    )
    demand_scale: float = Field(
        1.0, gt=0, le=10, description="nominal demand.scale: multiplies every route flow"
    )
    driver_sigma: float = Field(0.5, ge=0, le=1, description="nominal Krauss imperfection")
    driver_tau: float = Field(1.0, gt=0, le=5, description="nominal driver reaction time, s")
    initial_queue_veh: float = Field(0.0, ge=0, le=1000, description="on every approach")
    saturation: Literal["geometry", "measured"] = Field(
        "geometry",
        description="saturation flows from lanes and speed, or measured on SUMO (cached)",
    )
    gap_out_s: float = Field(
        0.0,
        ge=0,
        le=30,
        description="> 0: coordinated-actuated field operation; a planned non-coordinated "
        "green ends after its minimum once its stop-line loops saw no vehicle for this long",
    )

    @field_validator("sumocfg")
    @classmethod
    def _resolve(cls, v: str, info: ValidationInfo) -> str:
        return resolve_path(v, info)

    @field_validator("begin")
    @classmethod
    def _aware(cls, v: dt.datetime, info: ValidationInfo) -> dt.datetime:
        zone = (info.context or {}).get(TIME_ZONE, dt.UTC)
        return v if v.tzinfo is not None else v.replace(tzinfo=zone)


@dataclass(frozen=True)
class Corridor:
    """What a model kind's controllers need beyond the CasADi model."""

    network: Network
    demand: Demand
    config: Config


@dataclass(frozen=True, eq=False)
class CorridorModel(SubsystemModel):
    """A ``SubsystemModel`` that also carries its network and demand (``webster`` reads them)."""

    corridor: Corridor | None = None


def corridor_of(model: SubsystemModel) -> Corridor | None:
    return model.corridor if isinstance(model, CorridorModel) else None


def plant_factory(network: Network, config: Config) -> SimulatorFactory:
    """The SUMO plant's factory, imported when a plant is first made."""

    def make(params: Array) -> Any:
        module = importlib.import_module(PLANT_MODULE)
        return module.plant_factory(network, config)(params)

    return cast(SimulatorFactory, make)


def load(config: Config) -> Corridor:
    net_file, route_files, _extra = sumocfg_files(config.sumocfg)
    network = read_network(net_file, config.junctions, config.program)
    return Corridor(network, read_demand(route_files, network), config)


def build(config: Config) -> CorridorModel:
    corridor = load(config)
    network, demand = corridor.network, corridor.demand
    names = signal_names(network)
    f, h = queue_functions(network, demand.shares, config.step_s)
    saturation = {a.edge: a.saturation_veh_h for a in network.approaches}
    if config.saturation == "measured":
        saturation = measured_saturation(Path(config.sumocfg), network, demand.shares)
    nominal = [v for a in network.approaches for v in (saturation[a.edge], a.storage_veh)]
    nominal += [config.demand_scale, config.driver_sigma, config.driver_tau]
    u0 = []
    for j in network.junctions:
        u0 += [*j.splits, j.cycle_s, j.offset_s]
    entries = [n.removesuffix(".arrival") for n in names["disturbances"]]
    begin = config.begin.timestamp()

    def forecast(t0: float, n: int, dt_s: float) -> Array:
        starts = t0 - begin + dt_s * np.arange(n, dtype=float)
        return demand.mean_rates(entries, starts, dt_s) * config.demand_scale

    queues = names["states"]
    return CorridorModel(
        name=NAME,
        states=queues,
        inputs=names["inputs"],
        disturbances=names["disturbances"],
        outputs=names["outputs"],
        parameters=names["parameters"],
        nominal=np.array(nominal, dtype=float),
        f=f,
        h=h,
        forecast=forecast,
        x0=np.full(len(queues), config.initial_queue_veh),
        u0=np.array(u0, dtype=float),
        state_outputs={q: q for q in queues},
        form=ModelForm.DISCRETE,
        step_s=config.step_s,
        simulator=plant_factory(network, config),
        nonnegative=names["disturbances"],
        report=ReportSpec(
            banded_label="queue [veh]",
            band_name="storage",
            band_kpi="spillback",
            band_unit="veh·h",
            totals=(Total("delay", QUEUED, "veh·h"),),
            panels=(
                Panel("splits", tuple(n for n in names["inputs"] if ".split" in n)),
                Panel("queued", (QUEUED,), "veh"),
                Panel("arrivals", names["disturbances"], "veh/h"),
            ),
            baseline="webster",
        ),
        corridor=corridor,
        measured_only=junction_points(network),  # served by the plant, not predicted
    )


class _Kind:
    """Entry point object for ``kind = "signal_corridor"``."""

    Config = Config
    skeleton_suffixes = (".sumocfg",)

    @staticmethod
    def build(config: BaseModel) -> SubsystemModel:
        if not isinstance(config, Config):
            raise TypeError(f"expected a signal_corridor Config, got {type(config).__name__}")
        return build(config)

    @staticmethod
    def skeleton(path: str) -> str:
        from .skeleton import skeleton

        return str(skeleton(path))


KIND = _Kind()
__all__ = ["KIND", "Config", "Corridor", "CorridorModel", "build", "corridor_of", "load"]
