"""The ``simulated`` rig kind: the model itself, with parameters of its own.

Two plants come out of one configuration, deliberately different from the
twin and from each other:

* the verification rig (``seed``): plans are rolled out on the model with
  parameters drawn within ``parameter_spread`` of nominal, under the
  disturbances the caller passes in;
* the field stand-in (``field_seed``): a plant with another parameter draw,
  driven by a disturbance truth that departs from the forecast by
  ``forecast_error``, served over OPC UA on 127.0.0.1 (``hil.field``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from parallelcity.clock import Clock
from parallelcity.model import Array, SubsystemModel

from .field import EmbeddedField
from .plant import forecast_truth, perturbed_params

if TYPE_CHECKING:
    from parallelcity.scenario import Scenario


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

    @field_validator("forecast_error")
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
    for suffix in config.spread_parameters:
        if not any(p.endswith(suffix) for p in model.parameters):
            raise ValueError(
                f"rig.spread_parameters: {suffix!r} matches no parameter of model "
                f"{model.name!r} (parameters: {', '.join(model.parameters)})"
            )


class SimulatedRig:
    """The model with its own perturbed parameters: what a plan is tried on before dispatch."""

    def __init__(self, model: SubsystemModel, params: Array, name: str = "simulated") -> None:
        self.model = model
        self.params = np.asarray(params, dtype=float)
        self.name = name

    def rollout(self, x0: Array, inputs: Array, disturbances: Array, t0: float, dt: float) -> Array:
        """Outputs (n + 1, ny) of the rig's plant under ``inputs`` (n, nu) from ``x0``.

        ``t0`` is not needed: the plant is time-invariant and ``disturbances`` are given.
        """
        _, ys = self.model.simulate(x0, inputs, disturbances, self.params, dt)
        return ys


def _as_config(config: BaseModel) -> Config:
    if not isinstance(config, Config):
        raise TypeError(f"expected a simulated rig Config, got {type(config).__name__}")
    return config


class _Kind:
    """Entry point object for ``kind = "simulated"`` (``parallelcity.rigs``)."""

    Config = Config
    check = staticmethod(check)

    @staticmethod
    def verification_rig(config: BaseModel, model: SubsystemModel) -> SimulatedRig:
        cfg = _as_config(config)
        check(cfg, model)
        params = perturbed_params(model, cfg.parameter_spread, cfg.spread_parameters, cfg.seed)
        return SimulatedRig(model, params, name=f"simulated(seed={cfg.seed})")

    @staticmethod
    def field_stand_in(config: BaseModel, scenario: Scenario, clock: Clock) -> EmbeddedField:
        cfg = _as_config(config)
        model = scenario.model
        check(cfg, model)
        params = perturbed_params(
            model, cfg.parameter_spread, cfg.spread_parameters, cfg.field_seed
        )
        truth = forecast_truth(model, cfg.forecast_error, cfg.field_seed)
        return EmbeddedField(scenario, clock, params=params, truth=truth, tick_ms=cfg.tick_ms)


KIND = _Kind()
