"""The twin: the subsystem model, its state read from the mirror, and its forecast.

Issue-level scope: the state is taken directly from the points that measure it;
estimation (EKF/MHE) slots in behind ``estimate``.
"""

from __future__ import annotations

import math

import numpy as np

from .control import ControlInput
from .model import Array, SubsystemModel
from .snapshot import Snapshot
from .specs import SafetySpecs


class Twin:
    def __init__(self, model: SubsystemModel, specs: SafetySpecs, dt: float, horizon: int) -> None:
        self.model = model
        self.specs = specs
        self.dt = dt
        self.horizon = horizon

    def estimate(self, snapshot: Snapshot) -> Array:
        """State vector from the snapshot; every state must have a fresh measuring point."""
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
