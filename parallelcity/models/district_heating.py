"""District heating: one heat plant feeding buildings through substations.

States: zone temperature per building, plant supply temperature.
Inputs: supply-temperature setpoint, mass flow per building.
Disturbances: outdoor temperature, solar irradiance, internal gains per building.

    C_i dT_i/dt = Q_i - UA_i (T_i - T_out) + g_i I_sol + Q_int_i
    Q_i         = m_i c_p (T_s - T_i) (1 - exp(-UA_hx_i / (m_i c_p)))
    dT_s/dt     = (T_s_set - T_s) / tau_s
    fuel        = (sum_i Q_i + UA_net (T_s - T_ground)) / eta_boiler

The network loss term is what makes a high supply temperature cost something.

Units: temperatures in C, heat in kW, capacities in MJ/K, flows in kg/s.
"""

from __future__ import annotations

import math

import casadi as ca
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from parallelcity.twin.model import (
    Array,
    FaultEffect,
    FaultKind,
    FaultTarget,
    Panel,
    ReportSpec,
    SubsystemModel,
    Total,
)
from parallelcity.twin.schedule import Period, active

CP_KJ_PER_KG_K = 4.186
FOULING_VISIBLE_LOSS = 0.02  # a fouled exchanger is diagnosable once it loses this share of Q


class Building(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    ua_kw_per_k: float = Field(
        gt=0, le=1e4, description="building heat loss coefficient (at most 10 MW/K)"
    )
    c_mj_per_k: float = Field(gt=0, le=1e7, description="zone thermal capacity (at most 1e7)")
    ua_hx_kw_per_k: float = Field(
        gt=0, le=1e4, description="substation and emitters heat transfer (at most 10 MW/K)"
    )
    solar_aperture_m2: float = Field(ge=0, le=1e6, description="at most 1 km2")
    gains_kw: float = Field(ge=0, le=1e5, description="internal gains while occupied (<= 100 MW)")
    occupied: list[Period] = Field(
        default_factory=lambda: [Period(start="00:00", end="24:00")],
        description="when the internal gains apply (all day if omitted)",
    )
    initial_temperature_c: float = Field(20.0, ge=-60, le=150, description="-60 to 150 C")
    initial_flow_kg_per_s: float = Field(0.3, gt=0, le=1e4, description="at most 10 t/s")


class Plant(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tau_min: float = Field(20.0, gt=0, le=1440, description="supply temperature lag (<= a day)")
    eta_boiler: float = Field(0.92, gt=0, le=1)
    k_pump_kw_per_kg3_s3: float = Field(
        5.0 / 27.0, ge=0, le=1e3, description="pump power = k (sum m)^3 (k at most 1000)"
    )
    network_loss_kw_per_k: float = Field(
        0.25,
        ge=0,
        le=1e4,
        description="distribution heat loss per kelvin of supply above ground (<= 10 MW/K)",
    )
    ground_temperature_c: float = Field(8.0, ge=-60, le=60, description="-60 to 60 C")
    initial_supply_c: float = Field(70.0, ge=-60, le=200, description="-60 to 200 C")
    initial_setpoint_c: float = Field(70.0, ge=-60, le=200, description="-60 to 200 C")


class Weather(BaseModel):
    """Forecast of a winter day: cosine outdoor temperature and a clear-sky solar bell."""

    model_config = ConfigDict(extra="forbid")
    t_out_mean_c: float = Field(-2.0, ge=-90, le=60, description="-90 to 60 C")
    t_out_amplitude_k: float = Field(4.0, ge=0, le=50)
    t_out_coldest_hour: float = Field(3.0, ge=0, lt=24)
    solar_peak_w_per_m2: float = Field(
        400.0, ge=0, le=1500, description="at most 1500 W/m2 (above the solar constant)"
    )
    sunrise_hour: float = Field(8.0, ge=0, le=24)
    sunset_hour: float = Field(16.0, ge=0, le=24, description="after sunrise_hour")

    @model_validator(mode="after")
    def _day(self) -> Weather:
        if self.solar_peak_w_per_m2 > 0 and not self.sunset_hour > self.sunrise_hour:
            raise ValueError(
                f"sunset_hour {self.sunset_hour:g} is not after sunrise_hour "
                f"{self.sunrise_hour:g} (for a day without sun set solar_peak_w_per_m2 = 0)"
            )
        return self

    def t_out(self, t: Array) -> Array:
        hour = (t % 86400.0) / 3600.0
        return self.t_out_mean_c - self.t_out_amplitude_k * np.cos(
            2 * math.pi * (hour - self.t_out_coldest_hour) / 24.0
        )

    def solar(self, t: Array) -> Array:
        hour = (t % 86400.0) / 3600.0
        span = self.sunset_hour - self.sunrise_hour
        phase = np.clip((hour - self.sunrise_hour) / span, 0.0, 1.0) if span > 0 else hour * 0
        return self.solar_peak_w_per_m2 * np.sin(math.pi * phase) ** 2


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: str = "district_heating"
    plant: Plant = Plant()
    weather: Weather = Weather()
    buildings: list[Building] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> Config:
        names = [b.name for b in self.buildings]
        if len(set(names)) != len(names):
            raise ValueError(f"building names must be unique, got {names}")
        return self


def build(config: Config) -> SubsystemModel:
    bs = config.buildings
    n = len(bs)
    states = tuple(f"{b.name}.T_zone" for b in bs) + ("plant.T_supply",)
    inputs = ("plant.T_supply_set",) + tuple(f"{b.name}.m_flow" for b in bs)
    disturbances = ("weather.T_out", "weather.I_sol") + tuple(f"{b.name}.Q_int" for b in bs)
    outputs = (
        states
        + tuple(f"{b.name}.Q_heat" for b in bs)
        + ("plant.heat_kw", "plant.loss_kw", "plant.pump_kw", "plant.fuel_kw", "weather.T_out")
    )
    params: list[str] = []
    nominal: list[float] = []
    for b in bs:
        for key, value in (
            ("ua_kw_per_k", b.ua_kw_per_k),
            ("c_mj_per_k", b.c_mj_per_k),
            ("ua_hx_kw_per_k", b.ua_hx_kw_per_k),
            ("solar_aperture_m2", b.solar_aperture_m2),
        ):
            params.append(f"{b.name}.{key}")
            nominal.append(value)
    for key, value in (
        ("tau_s", config.plant.tau_min * 60.0),
        ("eta_boiler", config.plant.eta_boiler),
        ("k_pump", config.plant.k_pump_kw_per_kg3_s3),
        ("ua_net", config.plant.network_loss_kw_per_k),
        ("t_ground", config.plant.ground_temperature_c),
    ):
        params.append(f"plant.{key}")
        nominal.append(value)

    x = ca.SX.sym("x", n + 1)
    u = ca.SX.sym("u", n + 1)
    d = ca.SX.sym("d", n + 2)
    p = ca.SX.sym("p", len(params))
    t_s, t_set = x[n], u[0]
    t_out, i_sol = d[0], d[1]
    tau, eta, k_pump = p[4 * n], p[4 * n + 1], p[4 * n + 2]
    ua_net, t_ground = p[4 * n + 3], p[4 * n + 4]
    xdot, q = [], []
    for i in range(n):
        ua, c, ua_hx, g = p[4 * i], p[4 * i + 1], p[4 * i + 2], p[4 * i + 3]
        mcp = u[1 + i] * CP_KJ_PER_KG_K
        q_i = mcp * (t_s - x[i]) * (1 - ca.exp(-ua_hx / mcp))
        q.append(q_i)
        gains = q_i - ua * (x[i] - t_out) + g * i_sol / 1000.0 + d[2 + i]
        xdot.append(gains / (c * 1000.0))
    xdot.append((t_set - t_s) / tau)
    heat = ca.sum1(ca.vertcat(*q))
    loss = ua_net * (t_s - t_ground)
    pump = k_pump * ca.sum1(u[1:]) ** 3
    y = ca.vertcat(*[x[i] for i in range(n + 1)], *q, heat, loss, pump, (heat + loss) / eta, t_out)
    f = ca.Function("f", [x, u, d, p], [ca.vertcat(*xdot)], ["x", "u", "d", "p"], ["xdot"])
    h = ca.Function("h", [x, u, d, p], [y], ["x", "u", "d", "p"], ["y"])

    def forecast(t0: float, steps: int, dt_s: float) -> Array:
        t = t0 + dt_s * np.arange(steps, dtype=float)
        out = np.empty((steps, n + 2))
        out[:, 0] = config.weather.t_out(t)
        out[:, 1] = config.weather.solar(t)
        for i, b in enumerate(bs):
            out[:, 2 + i] = [b.gains_kw if active(b.occupied, tk) else 0.0 for tk in t]
        return out

    return SubsystemModel(
        name="district_heating",
        states=states,
        inputs=inputs,
        disturbances=disturbances,
        outputs=outputs,
        parameters=tuple(params),
        nominal=np.array(nominal),
        f=f,
        h=h,
        forecast=forecast,
        x0=np.array([b.initial_temperature_c for b in bs] + [config.plant.initial_supply_c]),
        u0=np.array([config.plant.initial_setpoint_c] + [b.initial_flow_kg_per_s for b in bs]),
        state_outputs={s: s for s in states},
        nonnegative=("weather.I_sol", *(f"{b.name}.Q_int" for b in bs)),
        faults=faults(config),
        report=ReportSpec(
            banded_label="zone temperature [°C]",
            band_name="comfort band",
            band_kpi="comfort violation",
            band_unit="K·h",
            totals=(Total("energy", "plant.fuel_kw", "kWh"),),
            baseline="pi",
            panels=(
                Panel("supply temperature", ("plant.T_supply_set", "plant.T_supply"), "°C"),
                Panel("outdoor temperature", ("weather.T_out",), "°C"),
                Panel("power", ("plant.fuel_kw", "plant.heat_kw", "plant.pump_kw"), "kW"),
                Panel("flow", tuple(f"{b.name}.m_flow" for b in bs), "kg/s"),
            ),
        ),
    )


def faults(config: Config) -> tuple[FaultKind, ...]:
    """A substation's exchanger fouling (its UA_hx scaled down) and a building's flow valve
    stuck where it stands.

    The exchangers are sized far above their flow (UA_hx / (m c_p) about 10), so
    ``Q = m c_p (T_s - T_i) (1 - exp(-UA_hx / (m c_p)))`` hardly moves until most of UA_hx
    is lost: the smallest diagnosable fouling is the fraction at which a substation at its
    initial flow loses ``FOULING_VISIBLE_LOSS`` of its heat, the largest over buildings."""
    bs = config.buildings
    need = [
        1.0
        - -math.log(FOULING_VISIBLE_LOSS)
        * b.initial_flow_kg_per_s
        * CP_KJ_PER_KG_K
        / b.ua_hx_kw_per_k
        for b in bs
    ]
    return (
        FaultKind(
            "fouled_exchanger",
            FaultTarget.PARAMETER,
            FaultEffect.SCALE,
            min_size=min(0.9, max(0.1, *need)),
            unit="of UA_hx lost",
            components={b.name: (f"{b.name}.ua_hx_kw_per_k",) for b in bs},
            max_size=0.98,
            description="a substation's heat exchanger fouled: its UA_hx scaled by 1 - size",
        ),
        FaultKind(
            "valve_stuck",
            FaultTarget.INPUT,
            FaultEffect.STUCK,
            min_size=0.0,
            unit="kg/s",
            components={b.name: (f"{b.name}.m_flow",) for b in bs},
            description="a building's flow valve stuck where it stood; diagnosable once the "
            "commanded flow moves away from it",
        ),
    )


class _Kind:
    """Entry point object for ``kind = "district_heating"``."""

    Config = Config

    @staticmethod
    def build(config: BaseModel) -> SubsystemModel:
        if not isinstance(config, Config):
            raise TypeError(f"expected a district_heating Config, got {type(config).__name__}")
        return build(config)


KIND = _Kind()
