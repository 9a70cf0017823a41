"""Subsystem models in one of two CasADi forms, and the plants that stand in for them.

* continuous time: an ODE ``x' = f(x, u, d, p)``, integrated by fixed-step RK4;
* discrete time: a map ``x+ = f(x, u, d, p)`` over the model's own step ``step_s``.

Either way ``y = h(x, u, d, p)``, and ``step_function(dt)`` is the one-step map over a
sample period that the twin, the estimator, the controllers and the rigs use, so a
controller written against it works for both forms.  A model kind may also back its
plant with an external simulator (``SubsystemModel.simulator``: an object with
``reset``/``step``/``outputs``, no CasADi needed); the CasADi form then is what its
twin and controllers plan with, and rigs run the simulator (``plant``).

A model may also name **measured-only** signals (``measured_only``): what its plant
measures and the field serves that the model does not predict (a signal's running phase,
an event counter).  Field points may carry them, so they are mirrored, journaled and
checked for range and freshness like any point; ``h`` has no row for them, so the
estimator, the divergence monitor, diagnosis and the controllers never see them.

The same model object serves the twin (nominal parameters), the controllers
(symbolic, for optimisation) and the rigs (their own parameters), so the
parameter vector ``p`` is an explicit argument everywhere.  Disturbances ``d``
are held constant over one sample period.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cache
from typing import Protocol, runtime_checkable

import casadi as ca
import numpy as np
from numpy.typing import NDArray

Array = NDArray[np.float64]

# forecast(t0, n, dt) -> disturbances for the n periods starting at t0, shape (n, nd)
Forecast = Callable[[float, int, float], Array]

STEP_TOLERANCE = 1e-9  # relative: a period within this of a multiple of step_s is one


class ModelForm(StrEnum):
    CONTINUOUS = "continuous"  # f is x' = f(x, u, d, p)
    DISCRETE = "discrete"  # f is x+ = f(x, u, d, p) over step_s


class Simulator(Protocol):
    """A plant that steps itself: the model's own CasADi form (``FormSimulator``) or an
    external simulator a model kind brings (``SubsystemModel.simulator``)."""

    def reset(self, x0: Array, t0: float) -> None:
        """Put the plant in state ``x0`` at simulated time ``t0``."""
        ...

    def step(self, u: Array, d: Array, dt: float) -> None:
        """Let ``dt`` simulated seconds pass with ``u`` and ``d`` held."""
        ...

    def outputs(self, u: Array, d: Array) -> Array:
        """Outputs (ny,) now under ``u`` and ``d``, in model output order."""
        ...

    @property
    def state(self) -> Array:
        """The state now (NaN where the simulator has no counterpart of a model state)."""
        ...


@runtime_checkable
class KpiSource(Protocol):
    """A plant that measures KPIs of its own (optional, beside ``Simulator``): a traffic
    simulator's time loss per vehicle, stops, throughput or teleports.  ``parallelcity
    experiment`` adds them to each run's KPIs, read once after the run's last cycle."""

    def kpis(self) -> dict[str, float]:
        """KPI name -> value over the whole run so far (names stable across runs)."""
        ...


@runtime_checkable
class MeasuredOnlySource(Protocol):
    """A plant that measures its model's measured-only signals (optional, beside
    ``Simulator``); a plant without them serves NaN for each."""

    def measured_only(self) -> Mapping[str, float]:
        """Signal name -> value now (names the plant does not measure may be missing)."""
        ...


# params -> a simulator of the plant with those parameters
SimulatorFactory = Callable[[Array], Simulator]


@dataclass(frozen=True)
class Panel:
    """One plot panel of a run: signals sharing a unit.  An input is drawn as applied, a
    measured output as measured, a disturbance that is not measured from the forecast."""

    title: str
    signals: tuple[str, ...]
    unit: str = ""


@dataclass(frozen=True)
class Total:
    """A KPI that is the time integral of an output: ``per_hour`` outputs (kW, cost per
    hour) integrate over hours (energy, money)."""

    label: str
    output: str
    unit: str = ""
    per_hour: bool = True


@dataclass(frozen=True)
class ReportSpec:
    """What a model kind's runs report and plot: its KPIs, panels and baseline.

    The band KPI is the time integral of the distance outside the bands of ``[specs.bands]``
    (in the banded outputs' unit times hours); ``totals`` integrate outputs; ``baseline`` is
    the controller kind a run of this model is compared against (a reference, not a
    fallback)."""

    banded_label: str = "banded output"  # y label of the banded outputs' panels
    band_name: str = "band"  # what a band is called in plot legends
    band_kpi: str = "band violation"  # what the band KPI is called in summaries
    band_unit: str = "·h"  # its unit (the banded outputs' unit times hours)
    totals: tuple[Total, ...] = ()
    panels: tuple[Panel, ...] = ()  # empty: one panel of the inputs as applied
    baseline: str = "hold"


class FaultTarget(StrEnum):
    """What a fault kind applies to."""

    SENSOR = "sensor"  # a measured output: the field reports something else than the plant does
    PARAMETER = "parameter"  # a group of model parameters: the plant itself changed
    INPUT = "input"  # an actuator: the plant does not get what is commanded


class FaultEffect(StrEnum):
    """How a fault changes the plant, from its start time on (``size`` is the fault's)."""

    SCALE = "scale"  # parameters times (1 - size): size is the fraction lost
    ADD = "add"  # parameters plus size (a leak's emitter coefficient from zero)
    DRIFT = "drift"  # a reading plus size per hour since the start
    STUCK = "stuck"  # a reading, or an input, frozen at its value at the start (no size)


@dataclass(frozen=True, eq=False)
class FaultKind:
    """A fault a model kind declares: what it perturbs and how (``components``: component
    name -> the parameters or inputs it perturbs; a sensor fault applies to every measured
    output).  ``min_size`` is the smallest size the kind promises is diagnosable; with
    ``relative_to_noise`` it counts diagnosis noise standard deviations of the output (per
    cycle, for a drift: ``size * cycle_h / sigma``)."""

    name: str
    applies_to: FaultTarget
    effect: FaultEffect
    min_size: float
    unit: str = ""
    components: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    max_size: float = math.inf  # the largest size a fit considers (SCALE: below 1)
    relative_to_noise: bool = False
    description: str = ""

    def __post_init__(self) -> None:
        allowed = {
            FaultTarget.SENSOR: (FaultEffect.DRIFT, FaultEffect.STUCK),
            FaultTarget.PARAMETER: (FaultEffect.SCALE, FaultEffect.ADD),
            FaultTarget.INPUT: (FaultEffect.STUCK,),
        }[self.applies_to]
        if self.effect not in allowed:
            raise ValueError(f"fault {self.name}: a {self.applies_to} fault cannot {self.effect}")
        if (self.applies_to is FaultTarget.SENSOR) == bool(self.components):
            raise ValueError(
                f"fault {self.name}: a sensor fault applies to every measured output and "
                "names no components; parameter and input faults name theirs"
            )
        if not (self.min_size >= 0 and self.max_size > self.min_size):
            raise ValueError(f"fault {self.name}: need 0 <= min_size < max_size")

    @property
    def sized(self) -> bool:
        """Whether the fault has a size (a stuck one is frozen at its value at the start)."""
        return self.effect is not FaultEffect.STUCK


SENSOR_FAULTS = (
    FaultKind(
        "sensor_drift",
        FaultTarget.SENSOR,
        FaultEffect.DRIFT,
        min_size=2.5,  # noise sigmas per cycle: a one-cycle-ahead residual sees rate * cycle
        unit="per hour",
        relative_to_noise=True,
        description="a reading drifting away from the truth at a constant rate",
    ),
    FaultKind(
        "sensor_stuck",
        FaultTarget.SENSOR,
        FaultEffect.STUCK,
        min_size=0.0,
        description="a reading frozen at its last value",
    ),
)
"""Generic sensor faults: every model kind has them on every measured output."""


@dataclass(frozen=True, eq=False)
class SubsystemModel:
    """A plant model with named signals and nominal parameters (see the module docstring
    for ``form``, ``step_s`` and ``simulator``)."""

    name: str
    states: tuple[str, ...]
    inputs: tuple[str, ...]
    disturbances: tuple[str, ...]
    outputs: tuple[str, ...]
    parameters: tuple[str, ...]
    nominal: Array
    f: ca.Function  # (x, u, d, p) -> xdot (continuous) or x_next after step_s (discrete)
    h: ca.Function  # (x, u, d, p) -> y
    forecast: Forecast
    x0: Array
    u0: Array
    # which output measures each state; the twin reads its state from these
    state_outputs: Mapping[str, str] = field(default_factory=dict)
    report: ReportSpec = ReportSpec()
    form: ModelForm = ModelForm.CONTINUOUS
    step_s: float = 0.0  # a discrete model's step; sample periods are whole multiples of it
    simulator: SimulatorFactory | None = None  # an external plant; None: the CasADi form
    # disturbances that are physically never negative (rigs clip their drawn truth at zero)
    nonnegative: tuple[str, ...] = ()
    # faults the kind's plant can have and its twin explains (the sensor faults come free)
    faults: tuple[FaultKind, ...] = ()
    # signals the plant measures and field points may carry, but h does not predict
    measured_only: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        sizes = {
            "nominal": (len(self.nominal), len(self.parameters)),
            "x0": (len(self.x0), len(self.states)),
            "u0": (len(self.u0), len(self.inputs)),
        }
        for what, (got, want) in sizes.items():
            if got != want:
                raise ValueError(f"model {self.name}: {what} has {got} entries, expected {want}")
        taken = set(self.states) | set(self.inputs) | set(self.outputs) | set(self.disturbances)
        clash = sorted(taken & set(self.measured_only))
        if clash or len(set(self.measured_only)) != len(self.measured_only):
            raise ValueError(
                f"model {self.name}: measured_only names repeat or name other signals: "
                f"{clash or list(self.measured_only)}"
            )
        known = set(self.inputs) | set(self.point_signals) | set(self.disturbances)
        for panel in self.report.panels:
            unknown = [n for n in panel.signals if n not in known]
            if unknown:
                raise ValueError(f"model {self.name}: panel {panel.title!r} names {unknown}")
        for total in self.report.totals:
            if total.output not in self.outputs:
                raise ValueError(f"model {self.name}: total {total.label!r} is not an output")
        if self.form is ModelForm.DISCRETE and not (math.isfinite(self.step_s) and self.step_s > 0):
            raise ValueError(f"model {self.name}: a discrete model needs step_s > 0")
        unknown_d = [n for n in self.nonnegative if n not in self.disturbances]
        if unknown_d:
            raise ValueError(f"model {self.name}: nonnegative names {unknown_d}")
        for s, y in self.state_outputs.items():
            if s not in self.states or y not in self.outputs:
                raise ValueError(f"model {self.name}: state_outputs maps unknown {s!r} -> {y!r}")
        self._check_faults()

    def _check_faults(self) -> None:
        names = [k.name for k in self.fault_kinds]
        if len(set(names)) != len(names):
            raise ValueError(f"model {self.name}: fault kind names repeat: {names}")
        for kind in self.faults:
            pool = self.parameters if kind.applies_to is FaultTarget.PARAMETER else self.inputs
            if kind.applies_to is FaultTarget.SENSOR:
                raise ValueError(f"model {self.name}: sensor faults are generic ({kind.name})")
            for comp, names_ in kind.components.items():
                unknown = [n for n in names_ if n not in pool] or ([] if names_ else ["nothing"])
                if unknown:
                    raise ValueError(
                        f"model {self.name}: fault {kind.name} component {comp!r} perturbs "
                        f"unknown {kind.applies_to}s {unknown}"
                    )

    @property
    def fault_kinds(self) -> tuple[FaultKind, ...]:
        """The kind's declared faults, then the generic sensor faults."""
        return self.faults + SENSOR_FAULTS

    def fault_kind(self, name: str) -> FaultKind:
        for kind in self.fault_kinds:
            if kind.name == name:
                return kind
        known = ", ".join(k.name for k in self.fault_kinds)
        raise KeyError(f"model {self.name} has no fault kind {name!r} (kinds: {known})")

    @property
    def nx(self) -> int:
        return len(self.states)

    @property
    def nu(self) -> int:
        return len(self.inputs)

    @property
    def nd(self) -> int:
        return len(self.disturbances)

    @property
    def ny(self) -> int:
        return len(self.outputs)

    @property
    def point_signals(self) -> tuple[str, ...]:
        """What a field point may measure: the outputs, then the measured-only signals (the
        order of a field plant's ``outputs()``)."""
        return self.outputs + self.measured_only

    def index(self, kind: str, name: str) -> int:
        """Position of signal ``name`` among the model's ``kind`` ("states", "inputs", ...)."""
        names: tuple[str, ...] = getattr(self, kind)
        try:
            return names.index(name)
        except ValueError:
            raise KeyError(f"model {self.name} has no {kind[:-1]} named {name!r}") from None

    def params(self, overrides: Mapping[str, float] | None = None) -> Array:
        """The nominal parameter vector with some entries replaced by name."""
        p = np.array(self.nominal, dtype=float)
        for k, v in (overrides or {}).items():
            p[self.index("parameters", k)] = v
        return p

    @property
    def ode(self) -> ca.Function:
        """``xdot = f(x, u, d, p)``; ValueError for a discrete model (it has none)."""
        if self.form is not ModelForm.CONTINUOUS:
            raise ValueError(f"model {self.name} is discrete-time: it has no ODE")
        return self.f

    def steps_in(self, dt: float) -> int:
        """How many of a discrete model's steps make ``dt``; ValueError if not a whole number."""
        k = round(dt / self.step_s)
        if k < 1 or abs(k * self.step_s - dt) > STEP_TOLERANCE * max(dt, self.step_s):
            raise ValueError(
                f"model {self.name} steps every {self.step_s:g} s: a period of {dt:g} s "
                "is not a whole number of its steps"
            )
        return k

    def step_function(self, dt: float, substeps: int = 4) -> ca.Function:
        """x_next = F(x, u, d, p) over one sample period ``dt``: fixed-step RK4 with
        ``substeps`` for an ODE, the map applied ``dt / step_s`` times for a discrete model."""
        if self.form is ModelForm.DISCRETE:
            return _compose(self.f, self.steps_in(float(dt)))
        return _rk4(self.f, float(dt), int(substeps))

    def plant(self, params: Array, max_step_s: float | None = None) -> Simulator:
        """A simulator of the plant with ``params``: the model kind's own if it brings one,
        else the CasADi form (``FormSimulator``)."""
        if self.simulator is not None:
            return self.simulator(np.asarray(params, dtype=float))
        return FormSimulator(self, params, max_step_s)

    def simulate(
        self, x0: Array, inputs: Array, disturbances: Array, p: Array, dt: float
    ) -> tuple[Array, Array]:
        """Roll the model forward under ``inputs`` (n, nu) and ``disturbances`` (n, nd).

        Returns states (n+1, nx) and outputs (n+1, ny); output k uses input k
        (the last output reuses the last input).
        """
        u = np.atleast_2d(np.asarray(inputs, dtype=float))
        d = np.atleast_2d(np.asarray(disturbances, dtype=float))
        n = u.shape[0]
        if d.shape[0] < n:
            raise ValueError(f"need {n} disturbance rows, got {d.shape[0]}")
        step = self.step_function(dt)
        xs = np.empty((n + 1, self.nx))
        xs[0] = np.asarray(x0, dtype=float)
        traj = step.mapaccum(n)(xs[0], u.T, d[:n].T, p)
        xs[1:] = np.asarray(traj).T
        u_ext = np.vstack([u, u[-1:]])
        d_ext = np.vstack([d[:n], d[n - 1 : n]])
        ys = np.asarray(self.h.map(n + 1)(xs.T, u_ext.T, d_ext.T, p)).T
        return xs, ys


class FormSimulator:
    """The model's CasADi form as a ``Simulator``.

    Continuous: each ``step(dt)`` is ``step_function(dt)`` (RK4, 4 substeps), or with
    ``max_step_s`` RK4 steps of at most that length (a plant advanced to arbitrary times).
    Discrete: the map applies at every whole ``step_s`` since ``reset``; time between
    boundaries is carried over to the next ``step``."""

    def __init__(self, model: SubsystemModel, params: Array, max_step_s: float | None = None):
        if max_step_s is not None and not max_step_s > 0:
            raise ValueError(f"max_step_s must be positive, got {max_step_s}")
        self.model = model
        self.params = np.asarray(params, dtype=float).reshape(-1)
        self.max_step_s = max_step_s
        self._x = np.full(model.nx, np.nan)
        self._since = 0.0  # discrete: seconds since the last step boundary

    @property
    def state(self) -> Array:
        return self._x.copy()

    def reset(self, x0: Array, t0: float) -> None:
        self._x = np.array(x0, dtype=float).reshape(self.model.nx)
        self._since = 0.0

    def step(self, u: Array, d: Array, dt: float) -> None:
        m, x = self.model, self._x
        if m.form is ModelForm.DISCRETE:
            total = self._since + dt
            k = math.floor(total / m.step_s + STEP_TOLERANCE)
            for _ in range(k):
                x = np.asarray(m.f(x, u, d, self.params), dtype=float).reshape(-1)
            self._since = max(0.0, total - k * m.step_s)
        elif self.max_step_s is None:
            x = np.asarray(m.step_function(dt)(x, u, d, self.params), dtype=float).reshape(-1)
        else:
            rk4, left = _rk4_h(m.f), dt
            while left > 1e-9:
                h = min(self.max_step_s, left)
                x = np.asarray(rk4(x, u, d, self.params, h), dtype=float).reshape(-1)
                left -= h
        self._x = x

    def outputs(self, u: Array, d: Array) -> Array:
        return np.asarray(self.model.h(self._x, u, d, self.params), dtype=float).reshape(-1)


@cache
def _compose(f: ca.Function, k: int) -> ca.Function:
    x = ca.SX.sym("x", f.size1_in(0))
    u = ca.SX.sym("u", f.size1_in(1))
    d = ca.SX.sym("d", f.size1_in(2))
    p = ca.SX.sym("p", f.size1_in(3))
    xk = x
    for _ in range(k):
        xk = f(xk, u, d, p)
    return ca.Function("F", [x, u, d, p], [xk], ["x", "u", "d", "p"], ["x_next"])


@cache
def _rk4_h(f: ca.Function) -> ca.Function:
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


@cache
def _rk4(f: ca.Function, dt: float, substeps: int) -> ca.Function:
    nx = f.size1_in(0)
    x = ca.SX.sym("x", nx)
    u = ca.SX.sym("u", f.size1_in(1))
    d = ca.SX.sym("d", f.size1_in(2))
    p = ca.SX.sym("p", f.size1_in(3))
    h = dt / substeps
    xk = x
    for _ in range(substeps):
        k1 = f(xk, u, d, p)
        k2 = f(xk + h / 2 * k1, u, d, p)
        k3 = f(xk + h / 2 * k2, u, d, p)
        k4 = f(xk + h * k3, u, d, p)
        xk = xk + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return ca.Function("F", [x, u, d, p], [xk], ["x", "u", "d", "p"], ["x_next"])
