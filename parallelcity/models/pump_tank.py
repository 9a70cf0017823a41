"""Pump and tank: a storage tank filled by one on/off pump and drawn by a demand.

A discrete-time model (``ModelForm.DISCRETE``) over ``step_s``, the form a water utility's
pump schedule is written in:

    level+ = level + step_s (q on - demand) / (3600 area)
    power  = P on,    cost rate = P on price

States: the tank level (m).  Input: the pump, 0 (off) to 1 (on).  Disturbances: the
demand drawn from the tank (m3/h) and the tariff (per kWh).  The ``milp_pump``
scheduler (and ``hold``, ``hysteresis``) controls this kind; the balance is affine, so
the scheduler's linearisation of it is exact.

Units: level in m, area in m2, flows in m3/h, power in kW, price per kWh.
"""

from __future__ import annotations

import casadi as ca
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from parallelcity.twin.model import Array, ModelForm, Panel, ReportSpec, SubsystemModel, Total

LEVEL, PUMP, DEMAND, PRICE = "tank.level", "pump.on", "tank.demand", "tariff.price"


class Tank(BaseModel):
    model_config = ConfigDict(extra="forbid")
    area_m2: float = Field(50.0, gt=0, le=1e6, description="tank floor area (at most 1 km2)")
    initial_level_m: float = Field(2.0, ge=0, le=100, description="0 to 100 m")


class Pump(BaseModel):
    model_config = ConfigDict(extra="forbid")
    flow_m3_per_h: float = Field(60.0, gt=0, le=1e5, description="flow when on")
    power_kw: float = Field(30.0, ge=0, le=1e5, description="electric power when on")
    initial_on: float = Field(0.0, ge=0, le=1, description="0 off, 1 on")


class Demand(BaseModel):
    """Daily demand: a base with a morning and an evening bell."""

    model_config = ConfigDict(extra="forbid")
    base_m3_per_h: float = Field(30.0, ge=0, le=1e5)
    morning_peak_m3_per_h: float = Field(20.0, ge=0, le=1e5, description="above the base")
    morning_hour: float = Field(7.5, ge=0, lt=24)
    evening_peak_m3_per_h: float = Field(15.0, ge=0, le=1e5, description="above the base")
    evening_hour: float = Field(19.0, ge=0, lt=24)


class Tariff(BaseModel):
    """A day and a night price per kWh; the day runs from ``day_start_hour``."""

    model_config = ConfigDict(extra="forbid")
    day_price: float = Field(0.30, ge=0, le=1e3)
    night_price: float = Field(0.12, ge=0, le=1e3)
    day_start_hour: float = Field(7.0, ge=0, le=24)
    day_end_hour: float = Field(22.0, ge=0, le=24, description="after day_start_hour")

    @model_validator(mode="after")
    def _ordered(self) -> Tariff:
        if not self.day_end_hour > self.day_start_hour:
            raise ValueError(
                f"day_end_hour {self.day_end_hour:g} is not after day_start_hour "
                f"{self.day_start_hour:g}"
            )
        return self


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: str = "pump_tank"
    step_s: float = Field(
        300.0, gt=0, le=86400, description="model step; the cycle is a whole number of steps"
    )
    tank: Tank = Tank()
    pump: Pump = Pump()
    demand: Demand = Demand()
    tariff: Tariff = Tariff()


def build(config: Config) -> SubsystemModel:
    x, u = ca.SX.sym("x", 1), ca.SX.sym("u", 1)
    d, p = ca.SX.sym("d", 2), ca.SX.sym("p", 3)
    area, q, kw = p[0], p[1], p[2]
    x_next = x[0] + config.step_s * (q * u[0] - d[0]) / (3600.0 * area)
    y = ca.vertcat(x[0], kw * u[0], kw * u[0] * d[1])
    f = ca.Function("F", [x, u, d, p], [x_next], ["x", "u", "d", "p"], ["x_next"])
    h = ca.Function("h", [x, u, d, p], [y], ["x", "u", "d", "p"], ["y"])
    dem, tar = config.demand, config.tariff

    def forecast(t0: float, n: int, dt: float) -> Array:
        hours = ((t0 + dt * np.arange(n, dtype=float)) / 3600.0) % 24.0
        demand = dem.base_m3_per_h + dem.morning_peak_m3_per_h * np.exp(
            -(((hours - dem.morning_hour) / 1.5) ** 2)
        )
        demand += dem.evening_peak_m3_per_h * np.exp(-(((hours - dem.evening_hour) / 2.0) ** 2))
        day = (hours >= tar.day_start_hour) & (hours < tar.day_end_hour)
        price = np.where(day, tar.day_price, tar.night_price)
        return np.column_stack([demand, price]).astype(float)

    return SubsystemModel(
        name="pump_tank",
        states=(LEVEL,),
        inputs=(PUMP,),
        disturbances=(DEMAND, PRICE),
        outputs=(LEVEL, "pump.kw", "tariff.cost_per_h"),
        parameters=("tank.area_m2", "pump.m3_per_h", "pump.kw"),
        nominal=np.array([config.tank.area_m2, config.pump.flow_m3_per_h, config.pump.power_kw]),
        f=f,
        h=h,
        forecast=forecast,
        x0=np.array([config.tank.initial_level_m]),
        u0=np.array([config.pump.initial_on]),
        state_outputs={LEVEL: LEVEL},
        form=ModelForm.DISCRETE,
        step_s=config.step_s,
        nonnegative=(DEMAND, PRICE),
        report=ReportSpec(
            banded_label="tank level [m]",
            band_name="level band",
            band_kpi="level violation",
            band_unit="m·h",
            totals=(
                Total("energy", "pump.kw", "kWh"),
                Total("cost", "tariff.cost_per_h", ""),
            ),
            panels=(
                Panel("pump", (PUMP,)),
                Panel("demand", (DEMAND,), "m³/h"),
                Panel("tariff", (PRICE,), "per kWh"),
            ),
            baseline="hysteresis",
        ),
    )


class _Kind:
    """Entry point object for ``kind = "pump_tank"``."""

    Config = Config

    @staticmethod
    def build(config: BaseModel) -> SubsystemModel:
        if not isinstance(config, Config):
            raise TypeError(f"expected a pump_tank Config, got {type(config).__name__}")
        return build(config)


KIND = _Kind()
