"""The ``simulated`` rig kind: the model itself, with parameters of its own.

Two plants come out of one configuration, deliberately different from the
twin and from each other:

* the verification rig (``seed``): plans are rolled out on the model with
  parameters drawn within ``parameter_spread`` of nominal, under the
  disturbances the caller passes in; with ``samples`` > 1 it also holds
  ``samples - 1`` further seeded draws (parameters, and disturbance scenarios
  departing from the forecast by ``sample_forecast_error``), and a verdict
  must hold on all of them;
* the field stand-in (``field_seed``): a plant with another parameter draw,
  driven by a disturbance truth that departs from the forecast by
  ``forecast_error``, served on 127.0.0.1 in the scenario's field protocol (its
  ``stand_in``, given a factory of ``PlantSimulator``); ``[[rig.faults]]`` make this
  plant, and only this one, faulty from their start (a fault to diagnose, with its
  ground truth in the run's summary).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from parallelcity.clock import Clock
from parallelcity.diagnose.faults import ActiveFault, FaultSpec, check_spec
from parallelcity.twin.model import Array, SubsystemModel
from parallelcity.verify.machine import RigMachine
from parallelcity.verify.rig import value_error_lines

from .plant import (
    DisturbanceError,
    PlantSimulator,
    forecast_truth,
    perturbed_params,
    sample_seed,
)

if TYPE_CHECKING:
    from parallelcity.field.protocol import FieldStandIn
    from parallelcity.scenario.definition import Scenario


class RigFault(BaseModel):
    """``[[rig.faults]]``: a fault the field's plant gets (never the verification rig)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    kind: str = Field(description="a fault kind of the model (docs/diagnosis.md)")
    component: str = Field(description="a component of the kind, or a measured output")
    size: float | None = Field(None, description="the fault's size (none for a stuck fault)")
    start_s: float = Field(ge=0, description="simulated seconds after the scenario's start")

    def spec(self, start_epoch: float) -> FaultSpec:
        return FaultSpec(self.kind, self.component, self.size, start_epoch + self.start_s)


class Config(BaseModel):
    """``[rig]`` section of a scenario with ``kind = "simulated"``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: str = "simulated"
    seed: int = Field(description="parameter draw of the verification rig")
    field_seed: int = Field(description="parameter and forecast-error draw of the field plant")
    parameter_spread: float = Field(
        0.0, ge=0.0, le=0.5, description="relative half-width of the parameter draw"
    )
    spread_parameters: list[str] = Field(
        default_factory=list, description="suffixes of the model parameters that are drawn"
    )
    forecast_error: dict[str, float] = Field(
        default_factory=dict,
        description="std of the field's disturbance truth around the forecast, per disturbance",
    )
    tick_ms: float = Field(50.0, gt=0, description="wall period of the field plant's update loop")
    samples: int = Field(
        1, ge=1, le=4096, description="uncertainty samples a verdict must hold on (1: seed only)"
    )
    whole_trace: bool = Field(
        True, description="roll plans out in one call (false: step by step, like a bench)"
    )
    sample_forecast_error: dict[str, float] = Field(
        default_factory=dict,
        description="std of the disturbance scenarios of samples 1.., per disturbance",
    )

    faults: list[RigFault] = Field(
        default_factory=list, description="faults injected into the field's plant only"
    )

    @field_validator("forecast_error", "sample_forecast_error")
    @classmethod
    def _finite_std(cls, v: dict[str, float]) -> dict[str, float]:
        for name, std in v.items():
            if not (np.isfinite(std) and std >= 0):
                raise ValueError(f"forecast_error[{name!r}] must be a finite std >= 0, got {std}")
        return v


def check(config: Config, model: SubsystemModel) -> None:
    """Cross-check the configuration against the model; ``ValueError`` names the bad key."""
    for name in config.forecast_error:
        if name not in model.disturbances:
            raise ValueError(
                f"rig.forecast_error: {name!r} is not a disturbance of model {model.name!r} "
                f"(disturbances: {', '.join(model.disturbances)})"
            )
    for name in config.sample_forecast_error:
        if name not in model.disturbances:
            raise ValueError(
                f"rig.sample_forecast_error: {name!r} is not a disturbance of model "
                f"{model.name!r} (disturbances: {', '.join(model.disturbances)})"
            )
    for suffix in config.spread_parameters:
        if not any(p.endswith(suffix) for p in model.parameters):
            raise ValueError(
                f"rig.spread_parameters: {suffix!r} matches no parameter of model "
                f"{model.name!r} (parameters: {', '.join(model.parameters)})"
            )
    for i, fault in enumerate(config.faults):
        try:
            check_spec(model, fault.spec(0.0))
        except ValueError as exc:
            raise ValueError(f"rig.faults[{i}]: {exc}") from None


class SimulatedDriver:
    """Rig driver: the model's plant (``SubsystemModel.plant``: its CasADi form, ODE or
    discrete, or the kind's own simulator) stepped cycle by cycle, one parameter and
    disturbance draw per uncertainty sample (sample 0: ``params[0]`` under the forecast as
    given)."""

    def __init__(
        self,
        model: SubsystemModel,
        params: list[Array],
        errors: list[DisturbanceError | None],
        name: str = "simulated",
    ) -> None:
        if len(params) != len(errors) or not params:
            raise ValueError("one parameter vector and one disturbance error per sample")
        self.model = model
        self.params = [np.asarray(p, dtype=float) for p in params]
        self.errors = errors
        self.name = name
        self._plants = [model.plant(p) for p in self.params]
        self._x = np.full(model.nx, np.nan)  # the reset state (the whole-trace start)
        self._u = np.full(model.nu, np.nan)
        self._d = np.full(model.nd, np.nan)
        self._t = 0.0
        self._t0 = 0.0
        self._sample = 0
        self._fns: dict[tuple[float, int], tuple[Any, Any]] = {}

    @property
    def samples(self) -> int:
        return len(self.params)

    def reset(self, x0: Array, t0: float, sample: int) -> None:
        self._x = np.array(x0, dtype=float).reshape(self.model.nx)
        self._t = self._t0 = float(t0)
        self._sample = sample
        self._plants[sample].reset(self._x, self._t)
        self._u = np.full(self.model.nu, np.nan)
        self._d = np.full(self.model.nd, np.nan)

    def apply(self, u: Array, d: Array) -> None:
        self._u = np.array(u, dtype=float).reshape(self.model.nu)
        err = self.errors[self._sample]
        d = np.array(d, dtype=float).reshape(self.model.nd)
        self._d = d if err is None else err.apply(self._t, d)

    def advance(self, dt: float) -> None:
        plant = self._plants[self._sample]
        plant.step(self._u, self._d, dt)
        self._t += dt
        x = plant.state
        if self.model.simulator is None and not np.all(np.isfinite(x)):
            raise FloatingPointError(f"rig state is no longer finite at t={self._t}: {x}")

    def read(self) -> Array:
        return self._plants[self._sample].outputs(self._u, self._d)

    def trace(self, inputs: Array, disturbances: Array, dt: float) -> Array:
        """The whole rollout from the reset state at once: the same numbers, faster (a
        plant with a simulator of its own is stepped through)."""
        if self.model.simulator is not None:
            return self._stepped(inputs, disturbances, dt)
        err = self.errors[self._sample]
        d = np.atleast_2d(np.asarray(disturbances, dtype=float))
        d = d if err is None else err.apply_rows(self._t0, dt, d)
        u = np.atleast_2d(np.asarray(inputs, dtype=float))
        n, p = u.shape[0], self.params[self._sample]
        key = (float(dt), n)
        fns = self._fns.get(key)
        if fns is None:  # CasADi builds these in about a millisecond: keep them
            fns = self._fns[key] = (
                self.model.step_function(dt).mapaccum(n),
                self.model.h.map(n + 1),
            )
        accum, outputs = fns
        xs = np.empty((n + 1, self.model.nx))
        xs[0] = self._x
        xs[1:] = np.asarray(accum(self._x, u.T, d[:n].T, p)).T
        # the last output holds the last input and disturbance, as model.simulate does
        u_ext = np.vstack([u, u[-1:]])
        d_ext = np.vstack([d[:n], d[n - 1 : n]])
        return np.asarray(outputs(xs.T, u_ext.T, d_ext.T, p), dtype=float).T

    def _stepped(self, inputs: Array, disturbances: Array, dt: float) -> Array:
        u = np.atleast_2d(np.asarray(inputs, dtype=float))
        d = np.atleast_2d(np.asarray(disturbances, dtype=float))
        ys = np.empty((u.shape[0] + 1, self.model.ny))
        for k in range(u.shape[0]):
            self.apply(u[k], d[k])
            ys[k] = self.read()
            self.advance(dt)
        ys[-1] = self.read()  # the last input and disturbance held, as model.simulate does
        return ys

    def close(self) -> None:
        pass


def simulated_driver(cfg: Config, model: SubsystemModel) -> SimulatedDriver:
    """Sample 0 is the ``seed`` draw with the forecast as given; samples 1.. draw both."""
    params = [perturbed_params(model, cfg.parameter_spread, cfg.spread_parameters, cfg.seed)]
    errors: list[DisturbanceError | None] = [None]
    for i in range(1, cfg.samples):
        seed_i = sample_seed(cfg.seed, i)
        params.append(perturbed_params(model, cfg.parameter_spread, cfg.spread_parameters, seed_i))
        errors.append(
            DisturbanceError(model, cfg.sample_forecast_error, seed_i, what="sample_forecast_error")
            if cfg.sample_forecast_error
            else None
        )
    return SimulatedDriver(model, params, errors, name=f"simulated(seed={cfg.seed})")


def _as_config(config: BaseModel) -> Config:
    if not isinstance(config, Config):
        raise TypeError(f"expected a simulated rig Config, got {type(config).__name__}")
    return config


class _Kind:
    """Entry point object for ``kind = "simulated"`` (``parallelcity.rigs``)."""

    Config = Config

    @staticmethod
    def check(config: BaseModel, model: SubsystemModel) -> list[str]:
        return value_error_lines(lambda: check(_as_config(config), model))

    @staticmethod
    def driver(config: BaseModel, model: SubsystemModel) -> SimulatedDriver:
        cfg = _as_config(config)
        check(cfg, model)
        return simulated_driver(cfg, model)

    @staticmethod
    def verification_rig(config: BaseModel, model: SubsystemModel) -> RigMachine:
        return RigMachine(_Kind.driver(config, model), use_trace=_as_config(config).whole_trace)

    @staticmethod
    def field_plant(
        config: BaseModel, scenario: Scenario, seed: int | None = None
    ) -> Callable[[float], PlantSimulator]:
        """The field's plant: parameters and disturbance truth drawn with ``field_seed``
        (or ``seed``), starting in the model's initial state and inputs."""
        cfg = _as_config(config)
        model = scenario.model
        check(cfg, model)
        draw = cfg.field_seed if seed is None else seed
        params = perturbed_params(model, cfg.parameter_spread, cfg.spread_parameters, draw)
        truth = forecast_truth(model, cfg.forecast_error, draw)
        start = scenario.meta.start_epoch

        def make_plant(t0: float) -> PlantSimulator:
            faults = [ActiveFault(model, f.spec(start)) for f in cfg.faults]
            return PlantSimulator(model, params, truth, model.x0, model.u0, t0, faults=faults)

        return make_plant

    @staticmethod
    def field_stand_in(config: BaseModel, scenario: Scenario, clock: Clock) -> FieldStandIn:
        make_plant = _Kind.field_plant(config, scenario)
        from parallelcity.field.protocols import protocol_of

        protocol = protocol_of(scenario.field)  # the field is served in the scenario's protocol
        tick_ms = _as_config(config).tick_ms
        return protocol.stand_in(scenario, clock, make_plant=make_plant, tick_ms=tick_ms)


KIND = _Kind()
