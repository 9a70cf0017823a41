"""The economic and tracking objective the optimising kinds (nmpc, linear_mpc) share:
one config model, so its keys, bounds and model checks are written once."""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field, field_validator

from parallelcity.decide.control import unknown_names
from parallelcity.twin.model import SubsystemModel


class Tracking(BaseModel):
    """Quadratic tracking of one output: ``weight * (y - target)^2`` per step."""

    model_config = ConfigDict(extra="forbid")
    target: float = Field(allow_inf_nan=False)
    weight: float = Field(1.0, ge=0, allow_inf_nan=False, description="per step k < N")
    terminal_weight: float = Field(
        0.0, ge=0, allow_inf_nan=False, description="at the end of the horizon, k = N"
    )


class Objective(BaseModel):
    """The objective keys of a ``[controller]`` table (a kind's Config extends this)."""

    model_config = ConfigDict(extra="forbid")
    output_costs: dict[str, float] = Field(
        default_factory=dict,
        description="output name -> price per unit-hour of the output (per kWh for kW)",
    )
    tracking: dict[str, Tracking] = Field(
        default_factory=dict, description="output name -> quadratic tracking term"
    )
    comfort_weight: float = Field(
        50.0, ge=0, allow_inf_nan=False, description="cost per unit^2 of band slack, per step"
    )
    comfort_weight_l1: float = Field(
        0.0,
        ge=0,
        allow_inf_nan=False,
        description="cost per unit of band slack, per step (an exact penalty)",
    )
    move_weights: dict[str, float] = Field(
        default_factory=dict,
        description="input name -> cost per squared move per step (inputs not listed: 0)",
    )
    band_at_end: bool = Field(True, description="hold the bands at k = N too, not only k < N")
    band_tightening_k: float = Field(
        0.0,
        ge=0,
        allow_inf_nan=False,
        description="plan this far inside each band to absorb model mismatch",
    )

    @field_validator("output_costs")
    @classmethod
    def _finite(cls, v: dict[str, float]) -> dict[str, float]:
        bad = [k for k, w in v.items() if not math.isfinite(w)]
        if bad:
            raise ValueError(f"values must be finite ({', '.join(bad)})")
        return v

    @field_validator("move_weights")
    @classmethod
    def _non_negative(cls, v: dict[str, float]) -> dict[str, float]:
        bad = [k for k, w in v.items() if not (math.isfinite(w) and w >= 0)]
        if bad:
            raise ValueError(f"move weights must be finite and >= 0 ({', '.join(bad)})")
        return v

    def objective_problems(self, m: SubsystemModel) -> list[str]:
        """Names in the objective keys that the model lacks."""
        return [
            *unknown_names("output_costs", self.output_costs, m.outputs, "output", m.name),
            *unknown_names("tracking", self.tracking, m.outputs, "output", m.name),
            *unknown_names("move_weights", self.move_weights, m.inputs, "input", m.name),
        ]
