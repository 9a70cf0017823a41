"""The twin: the subsystem model, its state read from the mirror, and its forecast.

Without an estimator the state is taken directly from the points that measure
it.  With one (``estimate.ExtendedKalmanFilter``) each ``estimate`` call is one
filter step: predicted under the inputs last passed to ``control_input`` (the
ones in force since the previous cycle), corrected with the fresh points, so a
state whose point is missing or stale comes from the model and the other points.
"""

from __future__ import annotations

import math

import numpy as np

from parallelcity.decide.control import ControlInput
from parallelcity.field.snapshot import Snapshot
from parallelcity.specs import SafetySpecs
from parallelcity.twin.estimate import ExtendedKalmanFilter
from parallelcity.twin.model import Array, SubsystemModel


class Twin:
    def __init__(
        self,
        model: SubsystemModel,
        specs: SafetySpecs,
        dt: float,
        horizon: int,
        estimator: ExtendedKalmanFilter | None = None,
    ) -> None:
        self.model = model
        self.specs = specs
        self.dt = dt
        self.horizon = horizon
        self.estimator = estimator
        self._u_applied = np.array(model.u0, dtype=float)

    def estimate(self, snapshot: Snapshot) -> Array:
        """State vector from the snapshot: the estimator's, or every state read from its own
        fresh measuring point."""
        if self.estimator is not None:
            x_est = self.estimator.step(snapshot.taken_at, self._u_applied, snapshot).x
            if not all(math.isfinite(v) for v in x_est):
                raise ValueError(f"state estimate is not finite: {x_est}")
            return x_est
        x = np.empty(self.model.nx)
        for i, state in enumerate(self.model.states):
            output = self.model.state_outputs[state]
            point = snapshot.points[output]
            if point.stale or point.reading is None:
                raise ValueError(f"state {state!r}: point {output!r} is stale ({point.why})")
            x[i] = point.reading.value
        if not all(math.isfinite(v) for v in x):
            raise ValueError(f"state estimate is not finite: {x}")
        return x

    def forecast(self, t0: float) -> Array:
        return self.model.forecast(t0, self.horizon, self.dt)

    def control_input(
        self, t0: float, x0: Array, u_prev: Array, deadline_s: float = math.inf
    ) -> ControlInput:
        self._u_applied = np.asarray(u_prev, dtype=float)
        y_low, y_high = self.specs.band_arrays(t0, self.horizon + 1, self.dt)
        return ControlInput(
            t0=t0,
            x0=x0,
            u_prev=np.asarray(u_prev, dtype=float),
            disturbances=self.forecast(t0),
            y_low=y_low,
            y_high=y_high,
            deadline_s=deadline_s,
        )
