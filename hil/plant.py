"""A pure plant simulator: the model integrated in real (simulated) time under a disturbance truth.

Nothing here knows about OPC UA or clocks.  ``PlantSimulator`` holds a state,
the inputs last applied and the time it has reached; ``advance(t)`` integrates
up to ``t`` with fixed-size RK4 steps (at most ``max_step_s`` each), evaluating
the disturbance truth at the start of every step and holding the inputs.

The truth differs from the forecast the twin plans with: ``forecast_truth``
adds a smooth, seeded error to chosen disturbances, and ``perturbed_params``
draws plant parameters around the nominal ones, so a rig never matches the
twin exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from functools import cache

import casadi as ca
import numpy as np

from parallelcity.twin.model import Array, SubsystemModel

Truth = Callable[[float], Array]

# Error periods are drawn from this range (seconds): a few hours, like weather fronts and clouds.
ERROR_PERIOD_RANGE_S = (2.0 * 3600.0, 12.0 * 3600.0)
ERROR_COMPONENTS = 3

# Disturbances that are physically never negative; their error fades out where the
# forecast is zero (no sun at night) and their truth is clipped at zero.
NONNEGATIVE_HINTS = ("I_sol", "solar", "irradiance", "Q_int", "gains")


@cache
def _rk4_step(f: ca.Function) -> ca.Function:
    """One classical RK4 step of ``f`` with the step length as an argument."""
    x = ca.SX.sym("x", f.size1_in(0))
    u = ca.SX.sym("u", f.size1_in(1))
    d = ca.SX.sym("d", f.size1_in(2))
    p = ca.SX.sym("p", f.size1_in(3))
    h = ca.SX.sym("h")
    k1 = f(x, u, d, p)
    k2 = f(x + h / 2 * k1, u, d, p)
    k3 = f(x + h / 2 * k2, u, d, p)
    k4 = f(x + h * k3, u, d, p)
    x_next = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return ca.Function("rk4", [x, u, d, p, h], [x_next], ["x", "u", "d", "p", "h"], ["x_next"])


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
    ) -> None:
        if not max_step_s > 0:
            raise ValueError(f"max_step_s must be positive, got {max_step_s}")
        self.model = model
        self.params = _vector(params, len(model.parameters), "params")
        self.truth = truth
        self.max_step_s = float(max_step_s)
        self._x = _vector(x0, model.nx, "x0")
        self._u = _vector(u0, model.nu, "u0")
        self._t = float(t0)
        self._step = _rk4_step(model.f)

    @property
    def t(self) -> float:
        """Simulated time the state belongs to (epoch seconds)."""
        return self._t

    @property
    def state(self) -> Array:
        return self._x.copy()

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
            d = self.disturbances(self._t)
            x_next = np.asarray(self._step(self._x, self._u, d, self.params, h), dtype=float)
            self._x = x_next.reshape(-1)
            self._t += h
        if not np.all(np.isfinite(self._x)):
            raise FloatingPointError(f"plant state is no longer finite at t={self._t}: {self._x}")

    def outputs(self) -> Array:
        """Model outputs at the current state, inputs and disturbance truth."""
        y = self.model.h(self._x, self._u, self.disturbances(self._t), self.params)
        return np.asarray(y, dtype=float).reshape(-1)

    def output_dict(self) -> dict[str, float]:
        return {name: float(v) for name, v in zip(self.model.outputs, self.outputs(), strict=True)}


def _is_nonnegative(name: str) -> bool:
    return any(hint.lower() in name.lower() for hint in NONNEGATIVE_HINTS)


class DisturbanceError:
    """A smooth, seeded error added to disturbance values as a function of time.

    Each named disturbance gets the sum of ``ERROR_COMPONENTS`` sinusoids with
    random periods of a few hours and random phases, scaled so the error's
    standard deviation is the given value.  The draw for one disturbance
    depends only on ``seed`` and the disturbance's position in the model, so
    adding an error to another disturbance does not change it.

    Disturbances in ``nonnegative`` (default: names that look like irradiance
    or gains) never go below zero, and their error fades out where the
    disturbance is near zero, so there is no sun at night.
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
            for n in (
                nonnegative
                if nonnegative is not None
                else [d for d in model.disturbances if _is_nonnegative(d)]
            )
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
