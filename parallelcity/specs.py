"""Safety specs as plain values, and the pure checks every stage shares.

The same ``SafetySpecs`` object bounds the controller's problem, judges plans
on the rig, and guards the field gateway, so the three can never disagree.
A limit is broken when it is exceeded by more than ``TOLERANCE``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .model import Array, SubsystemModel
from .scenario import BandSpec, InputSpec, Scenario

TOLERANCE = 1e-6


@dataclass(frozen=True)
class InputLimit:
    name: str
    min: float
    max: float
    max_rate_per_h: float | None = None

    def max_step(self, seconds: float) -> float:
        """Largest allowed change over ``seconds``; inf when the input has no rate limit."""
        if self.max_rate_per_h is None:
            return math.inf
        return self.max_rate_per_h * seconds / 3600.0


@dataclass(frozen=True)
class Band:
    output: str
    spec: BandSpec

    def limits(self, t: float) -> tuple[float, float]:
        for period in self.spec.periods:
            if period.contains(t):
                return period.low, period.high
        return self.spec.low, self.spec.high


@dataclass(frozen=True)
class Violation:
    """One broken spec: which, where in the plan, and by how much."""

    spec: str  # "bound" | "rate" | "band"
    signal: str
    step: int
    value: float
    limit: float

    @property
    def excess(self) -> float:
        return abs(self.value - self.limit)

    def describe(self) -> str:
        return (
            f"{self.spec} on {self.signal} at step {self.step}: "
            f"{self.value:.4g} vs limit {self.limit:.4g} (by {self.excess:.3g})"
        )


@dataclass(frozen=True, eq=False)
class SafetySpecs:
    inputs: tuple[InputLimit, ...]  # in model input order
    bands: tuple[Band, ...]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    @classmethod
    def from_scenario(cls, scenario: Scenario) -> SafetySpecs:
        return cls.build(scenario.model, scenario.specs.inputs, scenario.specs.bands)

    @classmethod
    def build(
        cls, model: SubsystemModel, inputs: Sequence[InputSpec], bands: Sequence[BandSpec]
    ) -> SafetySpecs:
        by_name = {s.name: s for s in inputs}
        limits = tuple(
            InputLimit(n, by_name[n].min, by_name[n].max, by_name[n].max_rate_per_h)
            for n in model.inputs
        )
        return cls(limits, tuple(Band(b.output, b) for b in bands), model.inputs, model.outputs)

    @property
    def limits(self) -> Mapping[str, InputLimit]:
        return {lim.name: lim for lim in self.inputs}

    @property
    def u_min(self) -> Array:
        return np.array([lim.min for lim in self.inputs])

    @property
    def u_max(self) -> Array:
        return np.array([lim.max for lim in self.inputs])

    def du_max(self, dt: float) -> Array:
        return np.array([lim.max_step(dt) for lim in self.inputs])

    @property
    def banded_outputs(self) -> tuple[int, ...]:
        return tuple(self.output_names.index(b.output) for b in self.bands)

    def band_arrays(self, t0: float, n: int, dt: float) -> tuple[Array, Array]:
        """Lower and upper band per step for ``n`` points starting at ``t0``: shape (n, bands)."""
        lo = np.empty((n, len(self.bands)))
        hi = np.empty_like(lo)
        for k in range(n):
            for j, band in enumerate(self.bands):
                lo[k, j], hi[k, j] = band.limits(t0 + k * dt)
        return lo, hi

    def check_inputs(self, u_prev: Array, plan: Array, dt: float) -> list[Violation]:
        """Bounds on every planned input, and rate limits from ``u_prev`` onwards."""
        out: list[Violation] = []
        plan = np.atleast_2d(np.asarray(plan, dtype=float))
        prev = np.asarray(u_prev, dtype=float)
        for k, u in enumerate(plan):
            for i, lim in enumerate(self.inputs):
                v = float(u[i])
                if not math.isfinite(v):
                    out.append(Violation("bound", lim.name, k, v, lim.min))
                    continue
                if v < lim.min - TOLERANCE:
                    out.append(Violation("bound", lim.name, k, v, lim.min))
                elif v > lim.max + TOLERANCE:
                    out.append(Violation("bound", lim.name, k, v, lim.max))
                step = lim.max_step(dt)
                if math.isfinite(step) and math.isfinite(prev[i]):
                    move = v - float(prev[i])
                    if abs(move) > step + TOLERANCE:
                        limit = float(prev[i]) + math.copysign(step, move)
                        out.append(Violation("rate", lim.name, k, v, limit))
            prev = u
        return out

    def check_outputs(self, t0: float, y: Array, dt: float) -> list[Violation]:
        """Bands (widened by their margin) on outputs ``y`` (n + 1, ny), from enforce_after_s on."""
        out: list[Violation] = []
        for band in self.bands:
            j = self.output_names.index(band.output)
            first = math.ceil(band.spec.enforce_after_s / dt - 1e-9)
            for k in range(first, y.shape[0]):
                lo, hi = band.limits(t0 + k * dt)
                v = float(y[k, j])
                if not math.isfinite(v) or v < lo - band.spec.margin_k - TOLERANCE:
                    out.append(Violation("band", band.output, k, v, lo - band.spec.margin_k))
                elif v > hi + band.spec.margin_k + TOLERANCE:
                    out.append(Violation("band", band.output, k, v, hi + band.spec.margin_k))
        return out
