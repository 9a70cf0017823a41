"""The divergence monitor: does the field still behave like the twin says it should?

Every cycle the monitor rolls the twin's model forward over the last
``window`` cycles, from the state the twin had then, with the inputs that were
really applied and the disturbances as measured where a point measures them
(the forecast otherwise), and compares the predicted outputs with what the
field now reports.  A residual beyond the output's threshold for ``persist``
cycles in a row raises the alarm; the alarm clears after ``clear`` cycles in a
row with every residual back within its threshold.  While the alarm is up the
runner drives the subsystem with its verified fallback
(``CycleLogic.decide(..., fallback_reason=...)``).

Pure: no clock, no I/O; the caller passes times, snapshots and inputs in.
A stuck sensor (the field stops moving while the twin predicts change), a
parameter step (the plant starts moving differently) and a broken model all
show as persistent residuals.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from parallelcity.field.snapshot import Snapshot
from parallelcity.twin.model import Array, SubsystemModel


@dataclass(frozen=True)
class DivergenceSettings:
    thresholds: Mapping[str, float]  # output -> largest tolerated |measured - predicted|
    window: int = 4  # cycles of open-loop prediction
    persist: int = 3  # cycles beyond threshold before the alarm
    clear: int = 4  # cycles within threshold before the alarm clears

    def __post_init__(self) -> None:
        if not self.thresholds:
            raise ValueError("the divergence monitor needs at least one output threshold")
        for name, limit in self.thresholds.items():
            if not (math.isfinite(limit) and limit > 0):
                raise ValueError(f"threshold of {name!r} must be positive, got {limit}")
        if self.window < 1 or self.persist < 1 or self.clear < 1:
            raise ValueError("window, persist and clear must be at least 1")


@dataclass(frozen=True)
class Check:
    """One cycle's verdict."""

    t: float
    residuals: Mapping[str, float]  # measured - predicted, for outputs that could be compared
    beyond: tuple[str, ...]  # outputs beyond their threshold this cycle
    alarm: bool  # the alarm is up after this cycle
    change: Literal["alarm", "clear"] | None  # the alarm was raised / cleared this cycle
    reason: str  # why the alarm is up (empty when it is not)


@dataclass
class _Step:
    t: float
    x: Array | None  # the twin's state at t (None: it had none, e.g. stale cycle)
    u: Array  # inputs in force from t on
    d_measured: dict[int, float] = field(default_factory=dict)  # disturbance index -> value


def fresh_readings(snapshot: Snapshot) -> dict[str, float]:
    """The snapshot's fresh values by output name (stale and missing points left out)."""
    return {
        n: p.reading.value
        for n, p in snapshot.points.items()
        if not p.stale and p.reading is not None
    }


@dataclass(frozen=True)
class Prediction:
    """One cycle's comparison: the twin's prediction of the outputs at ``t`` from
    ``window`` cycles earlier, and the field's readings minus it."""

    t: float
    y_pred: Array  # (ny,) predicted outputs at t
    residuals: Mapping[str, float]  # measured - predicted, for outputs that could be compared
    x_from: Array  # the twin's state the prediction started from
    steps: tuple[tuple[float, Array, Array], ...]  # (t, u, d) of each predicted period
    d_now: Array  # disturbances at t (measured where a point measures them)


class Predictor:
    """The twin's ``window``-cycle-ahead prediction of the field, cycle by cycle (pure)."""

    def __init__(
        self,
        model: SubsystemModel,
        dt: float,
        outputs: tuple[str, ...],
        window: int,
        params: Array | None = None,
    ) -> None:
        self.model = model
        self.dt = float(dt)
        self.window = int(window)
        self.params = np.asarray(model.nominal if params is None else params, dtype=float)
        self._step = model.step_function(self.dt)
        self._history: deque[_Step] = deque(maxlen=self.window + 1)
        self._outputs = {n: model.index("outputs", n) for n in outputs}
        # outputs that are disturbances passed straight through (a measured disturbance)
        self._measures_d = {
            n: model.index("disturbances", n) for n in model.outputs if n in model.disturbances
        }

    def observe(
        self, t: float, readings: Mapping[str, float], x: Array | None, u: Array
    ) -> Prediction | None:
        """Record cycle ``t`` (fresh ``readings``, the twin's state ``x`` there, inputs
        ``u`` from then on); the prediction of ``t`` from ``window`` cycles ago, if any."""
        d_meas = {i: readings[n] for n, i in self._measures_d.items() if n in readings}
        out: Prediction | None = None
        if len(self._history) == self.window and self._history[0].x is not None:
            out = self._predict(t, d_meas, readings)
        self._history.append(_Step(t, None if x is None else np.array(x), np.array(u), d_meas))
        while len(self._history) > self.window:
            self._history.popleft()
        return out

    def _predict(
        self, t: float, d_now: Mapping[int, float], readings: Mapping[str, float]
    ) -> Prediction:
        steps = list(self._history)
        x0 = steps[0].x
        assert x0 is not None
        x, used = x0, []
        for s in steps:
            d = self.disturbances(s.t, s.d_measured)
            used.append((s.t, s.u, d))
            x = np.asarray(self._step(x, s.u, d, self.params), dtype=float).reshape(-1)
        d1 = self.disturbances(t, d_now)
        y = np.asarray(self.model.h(x, steps[-1].u, d1, self.params), dtype=float).reshape(-1)
        res = {n: readings[n] - float(y[i]) for n, i in self._outputs.items() if n in readings}
        return Prediction(t, y, res, x0, tuple(used), d1)

    def disturbances(self, t: float, measured: Mapping[int, float]) -> Array:
        d = np.array(self.model.forecast(t, 1, self.dt)[0], dtype=float)
        for i, v in measured.items():
            d[i] = v
        return d


class DivergenceMonitor:
    """Compare the twin's ``window``-cycle predictions with the field, alarm on persistence."""

    def __init__(
        self,
        model: SubsystemModel,
        dt: float,
        settings: DivergenceSettings,
        *,
        params: Array | None = None,
    ) -> None:
        unknown = [n for n in settings.thresholds if n not in model.outputs]
        if unknown:
            raise ValueError(f"divergence thresholds name unknown outputs: {unknown}")
        self.model = model
        self.dt = float(dt)
        self.settings = settings
        self.predictor = Predictor(model, dt, tuple(settings.thresholds), settings.window, params)
        self.params = self.predictor.params
        self._over: dict[str, int] = dict.fromkeys(settings.thresholds, 0)
        self._within = 0
        self.alarm = False
        self.reason = ""

    def observe(self, t: float, snapshot: Snapshot, x: Array | None, u: Array) -> Check:
        """Record cycle ``t`` (the twin's state ``x`` there, inputs ``u`` from then on) and
        check the field's outputs at ``t`` against the prediction from ``window`` cycles ago.
        """
        pred = self.predictor.observe(t, fresh_readings(snapshot), x, np.asarray(u, dtype=float))
        return self._judge(t, {} if pred is None else pred.residuals)

    def _judge(self, t: float, residuals: Mapping[str, float]) -> Check:
        limits = self.settings.thresholds
        beyond = tuple(n for n, r in residuals.items() if abs(r) > limits[n])
        for name in limits:
            self._over[name] = self._over[name] + 1 if name in beyond else 0
        change: Literal["alarm", "clear"] | None = None
        persistent = [n for n, c in self._over.items() if c >= self.settings.persist]
        if not self.alarm and persistent:
            self.alarm, change, self._within = True, "alarm", 0
            self.reason = "twin diverges from the field: " + ", ".join(
                f"{n} off by {residuals[n]:+.2f} (limit {limits[n]:g}) for {self._over[n]} cycles"
                for n in persistent
            )
        elif self.alarm:
            self._within = self._within + 1 if not beyond and residuals else 0
            if self._within >= self.settings.clear:
                self.alarm, change, self.reason = False, "clear", ""
        return Check(t, dict(residuals), beyond, self.alarm, change, self.reason)
