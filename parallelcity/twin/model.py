"""Subsystem models: a CasADi ODE ``x' = f(x, u, d, p)``, ``y = h(x, u, d, p)``.

The same model object serves the twin (nominal parameters), the controllers
(symbolic, for optimisation) and the rigs (their own parameters), so the
parameter vector ``p`` is an explicit argument everywhere.  Disturbances ``d``
are held constant over one sample period.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache

import casadi as ca
import numpy as np
from numpy.typing import NDArray

Array = NDArray[np.float64]

# forecast(t0, n, dt) -> disturbances for the n periods starting at t0, shape (n, nd)
Forecast = Callable[[float, int, float], Array]


@dataclass(frozen=True)
class Panel:
    """One plot panel of a run: signals sharing a unit.  An input is drawn as applied, a
    measured output as measured, a disturbance that is not measured from the forecast."""

    title: str
    signals: tuple[str, ...]
    unit: str = ""


@dataclass(frozen=True)
class ReportSpec:
    """What a model kind's runs report and plot besides the comfort-banded outputs."""

    banded_label: str = "banded output"  # y label of the banded outputs' panels
    energy_point: str | None = None  # an output in kW whose integral is the run's energy
    panels: tuple[Panel, ...] = ()  # empty: one panel of the inputs as applied


@dataclass(frozen=True, eq=False)
class SubsystemModel:
    """A plant model with named signals and nominal parameters."""

    name: str
    states: tuple[str, ...]
    inputs: tuple[str, ...]
    disturbances: tuple[str, ...]
    outputs: tuple[str, ...]
    parameters: tuple[str, ...]
    nominal: Array
    f: ca.Function  # (x, u, d, p) -> xdot
    h: ca.Function  # (x, u, d, p) -> y
    forecast: Forecast
    x0: Array
    u0: Array
    # which output measures each state; the twin reads its state from these
    state_outputs: Mapping[str, str] = field(default_factory=dict)
    report: ReportSpec = ReportSpec()

    def __post_init__(self) -> None:
        sizes = {
            "nominal": (len(self.nominal), len(self.parameters)),
            "x0": (len(self.x0), len(self.states)),
            "u0": (len(self.u0), len(self.inputs)),
        }
        for what, (got, want) in sizes.items():
            if got != want:
                raise ValueError(f"model {self.name}: {what} has {got} entries, expected {want}")
        known = set(self.inputs) | set(self.outputs) | set(self.disturbances)
        for panel in self.report.panels:
            unknown = [n for n in panel.signals if n not in known]
            if unknown:
                raise ValueError(f"model {self.name}: panel {panel.title!r} names {unknown}")
        if self.report.energy_point not in (None, *self.outputs):
            raise ValueError(f"model {self.name}: energy point is not an output")
        for s, y in self.state_outputs.items():
            if s not in self.states or y not in self.outputs:
                raise ValueError(f"model {self.name}: state_outputs maps unknown {s!r} -> {y!r}")

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

    def step_function(self, dt: float, substeps: int = 4) -> ca.Function:
        """x_next = F(x, u, d, p): fixed-step RK4 over one sample period ``dt``."""
        return _rk4(self.f, float(dt), int(substeps))

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
