"""A pure plant simulator: the model's plant run in real (simulated) time under a disturbance truth.

Nothing here knows about field protocols or clocks.  ``PlantSimulator`` holds the
inputs last applied and the time it has reached; ``advance(t)`` steps the model's
plant (``SubsystemModel.plant``: RK4 steps of at most ``max_step_s`` for an ODE, the
map at every whole step of a discrete model, or the kind's own simulator) up to
``t``, evaluating the disturbance truth at the start of every step and holding the
inputs.

The truth differs from the forecast the twin plans with: ``forecast_truth``
adds a smooth, seeded error to chosen disturbances, and ``perturbed_params``
draws plant parameters around the nominal ones, so a rig never matches the
twin exactly.

``faults`` (``diagnose.faults.ActiveFault``) make the plant faulty from their start
time: its parameters, the inputs it really gets and the readings it reports change as
each fault says.  Only the field's plant gets them; the verification rig never does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from parallelcity.diagnose.faults import ActiveFault
from parallelcity.twin.model import (
    Array,
    FormSimulator,
    KpiSource,
    MeasuredOnlySource,
    Simulator,
    SubsystemModel,
)

Truth = Callable[[float], Array]

# Error periods are drawn from this range (seconds): a few hours, slow against a control cycle.
ERROR_PERIOD_RANGE_S = (2.0 * 3600.0, 12.0 * 3600.0)
ERROR_COMPONENTS = 3


def _vector(value: object, size: int, what: str) -> Array:
    arr = np.array(value, dtype=float).reshape(-1)
    if arr.shape != (size,):
        raise ValueError(f"{what} has {arr.size} entries, expected {size}")
    return arr


class PlantSimulator:
    """The model integrated forward in time with its own parameters and disturbance truth."""

    def __init__(
        self,
        model: SubsystemModel,
        params: Array,
        truth: Truth,
        x0: Array,
        u0: Array,
        t0: float,
        max_step_s: float = 60.0,
        faults: Sequence[ActiveFault] = (),
    ) -> None:
        if not max_step_s > 0:
            raise ValueError(f"max_step_s must be positive, got {max_step_s}")
        self.model = model
        self.params = _vector(params, len(model.parameters), "params")
        self.truth = truth
        self.max_step_s = float(max_step_s)
        self._u = _vector(u0, model.nu, "u0")
        self._t = float(t0)
        self._plant = model.plant(self.params, self.max_step_s)
        self._plant.reset(_vector(x0, model.nx, "x0"), self._t)
        self.faults = tuple(faults)
        self._params_now = self.params

    @property
    def t(self) -> float:
        """Simulated time the state belongs to (epoch seconds)."""
        return self._t

    @property
    def state(self) -> Array:
        return self._plant.state

    @property
    def inputs(self) -> dict[str, float]:
        """The inputs currently held, by model input name."""
        return {name: float(v) for name, v in zip(self.model.inputs, self._u, strict=True)}

    @property
    def input_vector(self) -> Array:
        return self._u.copy()

    def set_input(self, name: str, value: float) -> None:
        """Hold input ``name`` at ``value`` from the current time on."""
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"input {name!r}: value must be finite, got {value}")
        self._u[self.model.index("inputs", name)] = value

    def set_inputs(self, values: Mapping[str, float]) -> None:
        for name, value in values.items():
            self.set_input(name, value)

    def disturbances(self, t: float | None = None) -> Array:
        """The disturbance truth at ``t`` (default: now)."""
        return _vector(self.truth(self._t if t is None else t), self.model.nd, "truth(t)")

    def advance(self, t: float) -> None:
        """Integrate from the current time to ``t``; a ``t`` in the past is a no-op."""
        while t - self._t > 1e-9:
            h = min(self.max_step_s, t - self._t)
            if self.faults:
                self._apply_params(self._t)
            self._plant.step(self._u_real(self._t), self.disturbances(self._t), h)
            self._t += h
        x = self._plant.state
        if self.model.simulator is None and not np.all(np.isfinite(x)):
            raise FloatingPointError(f"plant state is no longer finite at t={self._t}: {x}")

    def outputs(self) -> Array:
        """Model outputs at the current state, inputs and disturbance truth, as the field's
        sensors report them; then the model's measured-only signals (NaN where the plant
        does not measure one), in ``point_signals`` order."""
        y = self._plant.outputs(self._u_real(self._t), self.disturbances(self._t))
        for fault in self.faults:
            y = fault.readings(y, self._t)
        names = self.model.measured_only
        if not names:
            return y
        got = self._plant.measured_only() if isinstance(self._plant, MeasuredOnlySource) else {}
        extra = np.array([float(got.get(n, math.nan)) for n in names])
        return np.concatenate([np.asarray(y, dtype=float).reshape(-1), extra])

    def _u_real(self, t: float) -> Array:
        """The inputs the plant really gets: the ones held, unless an actuator is faulty."""
        u = self._u
        for fault in self.faults:
            u = fault.inputs(u, t)
        return u

    def _apply_params(self, t: float) -> None:
        p = self.params
        for fault in self.faults:
            p = fault.params(p, t)
        if not np.array_equal(p, self._params_now):
            set_params(self._plant, p)
            self._params_now = p

    def output_dict(self) -> dict[str, float]:
        y = self.outputs()
        return {name: float(v) for name, v in zip(self.model.point_signals, y, strict=True)}

    def kpis(self) -> dict[str, float]:
        """The simulator's own KPIs if it measures any (``KpiSource``), else none."""
        return dict(self._plant.kpis()) if isinstance(self._plant, KpiSource) else {}


def set_params(plant: Simulator, params: Array) -> None:
    """Give a running plant new parameters (a parameter fault): the CasADi form takes them
    as they are; a kind's own simulator needs a ``set_params(params)`` method."""
    if isinstance(plant, FormSimulator):
        plant.params = np.asarray(params, dtype=float).reshape(-1)
        return
    setter = getattr(plant, "set_params", None)
    if setter is None:
        raise ValueError(f"{type(plant).__name__} takes no parameter faults (no set_params)")
    setter(params)


class DisturbanceError:
    """A smooth, seeded error added to disturbance values as a function of time.

    Each named disturbance gets the sum of ``ERROR_COMPONENTS`` sinusoids with
    random periods of a few hours and random phases, scaled so the error's
    standard deviation is the given value.  The draw for one disturbance
    depends only on ``seed`` and the disturbance's position in the model, so
    adding an error to another disturbance does not change it.

    Disturbances in ``nonnegative`` (default: the ones the model declares
    ``SubsystemModel.nonnegative``) never go below zero, and their error fades out where the
    disturbance is near zero, so a quantity forecast at zero stays zero.
    """

    def __init__(
        self,
        model: SubsystemModel,
        stds: Mapping[str, float],
        seed: int,
        *,
        nonnegative: Iterable[str] | None = None,
        what: str = "forecast_error",
    ) -> None:
        for name, std in stds.items():
            if name not in model.disturbances:
                raise ValueError(
                    f"{what}: {name!r} is not a disturbance of model {model.name!r} "
                    f"(disturbances: {', '.join(model.disturbances)})"
                )
            if not (math.isfinite(std) and std >= 0):
                raise ValueError(f"{what}: {name!r} must be a finite std >= 0, got {std}")
        self.clip = {
            model.index("disturbances", n)
            for n in (model.nonnegative if nonnegative is None else nonnegative)
        }
        lo, hi = ERROR_PERIOD_RANGE_S
        self.components: list[tuple[int, float, Array, Array]] = []  # (index, std, omega, phase)
        for name, std in stds.items():
            i = model.index("disturbances", name)
            rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, i])
            periods = rng.uniform(lo, hi, ERROR_COMPONENTS)
            phases = rng.uniform(0.0, 2.0 * math.pi, ERROR_COMPONENTS)
            self.components.append((i, float(std), 2.0 * math.pi / periods, phases))
        self.amplitude = math.sqrt(2.0 / ERROR_COMPONENTS)  # unit-variance sum of sinusoids

    def apply(self, t: float, d: Array) -> Array:
        """``d`` (nd,) at time ``t`` with the error added (a new array)."""
        out = np.array(d, dtype=float)
        for i, std, omega, phase in self.components:
            err = std * self.amplitude * float(np.sum(np.sin(omega * t + phase)))
            if i in self.clip:
                # fade in over the first two std of the value, then clip
                weight = min(1.0, max(0.0, out[i]) / (2.0 * std)) if std > 0 else 0.0
                out[i] = max(0.0, out[i] + weight * err)
            else:
                out[i] += err
        return out

    def apply_rows(self, t0: float, dt: float, d: Array) -> Array:
        """Rows ``d`` (n, nd) at ``t0 + k*dt`` with the error added."""
        rows = np.atleast_2d(np.asarray(d, dtype=float))
        return np.vstack([self.apply(t0 + k * dt, row) for k, row in enumerate(rows)])


def forecast_truth(
    model: SubsystemModel,
    forecast_error: Mapping[str, float],
    seed: int,
    *,
    nonnegative: Iterable[str] | None = None,
) -> Truth:
    """The disturbance truth: the model's forecast plus a ``DisturbanceError``."""
    error = DisturbanceError(model, forecast_error, seed, nonnegative=nonnegative)

    def truth(t: float) -> Array:
        return error.apply(float(t), np.array(model.forecast(float(t), 1, 1.0)[0], dtype=float))

    return truth


def sample_seed(seed: int, sample: int) -> int:
    """The seed of uncertainty sample ``sample`` (>= 1) of a rig whose own draw is ``seed``."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(sample)]).generate_state(1)[0])


def perturbed_params(
    model: SubsystemModel, spread: float, parameter_suffixes: Iterable[str], seed: int
) -> Array:
    """Nominal parameters with each one ending in a suffix drawn within +-spread of nominal.

    Every parameter gets a draw in model order whether it is perturbed or not,
    so the draw of one parameter does not depend on which others are listed.
    """
    if not (0.0 <= spread < 1.0):
        raise ValueError(f"parameter spread must be in [0, 1), got {spread}")
    suffixes = list(parameter_suffixes)
    unmatched = [s for s in suffixes if not any(p.endswith(s) for p in model.parameters)]
    if unmatched:
        raise ValueError(
            f"spread_parameters: {', '.join(map(repr, unmatched))} match no parameter of "
            f"model {model.name!r} (parameters: {', '.join(model.parameters)})"
        )
    rng = np.random.default_rng(int(seed) & 0xFFFFFFFF)
    factors = rng.uniform(-spread, spread, len(model.parameters))
    p = np.array(model.nominal, dtype=float)
    for i, name in enumerate(model.parameters):
        if any(name.endswith(s) for s in suffixes):
            p[i] *= 1.0 + factors[i]
    return p
