"""State estimation: an extended Kalman filter on the twin's CasADi model.

The filter's state is the model state plus one slow offset per chosen
disturbance (``biases``): ``d_used = forecast + b``, ``b`` a random walk.  The
offsets soak up what the forecast and the nominal parameters miss (unmodelled
internal gains, a heat exchanger that fouls), so the predictions the controller
plans with do not keep the same error.

Each step predicts with the inputs that were applied, then corrects with
whichever measuring points are fresh in the snapshot: a missing or stale point
is simply not used, so the states it would have measured come from the model
and the other outputs (a temperature through a heat flow it drives, for
instance).  Jacobians come from CasADi, exact; the covariance update
is the Joseph form.

Pure: time, inputs and snapshots are passed in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import casadi as ca
import numpy as np

from parallelcity.field.snapshot import Snapshot
from parallelcity.twin.model import Array, SubsystemModel


@dataclass(frozen=True)
class Estimate:
    t: float
    x: Array  # model state
    biases: Mapping[str, float]  # disturbance offset estimates
    std: Array  # standard deviation of each state
    used: tuple[str, ...]  # measuring points used in the last correction
    innovations: Mapping[str, float]  # measured - predicted, before the correction


class ExtendedKalmanFilter:
    """EKF over ``x`` and disturbance offsets ``b``; one ``step`` per control cycle.

    ``state_std`` is the process noise per step of each state (a float for all,
    or per state name), ``bias_std`` the random-walk step of each offset,
    ``measurement_std`` the noise of each measured output (float or per name),
    ``initial_std`` the prior on the first estimate.
    """

    def __init__(
        self,
        model: SubsystemModel,
        dt: float,
        *,
        params: Array | None = None,
        biases: Sequence[str] = (),
        state_std: float | Mapping[str, float] = 0.05,
        bias_std: float | Mapping[str, float] = 0.05,
        measurement_std: float | Mapping[str, float] = 0.1,
        initial_std: float = 1.0,
        initial_bias_std: float = 1.0,
    ) -> None:
        for name in biases:
            if name not in model.disturbances:
                raise ValueError(f"bias {name!r} is not a disturbance of model {model.name!r}")
        self.model = model
        self.dt = float(dt)
        self.params = np.asarray(model.nominal if params is None else params, dtype=float)
        self.bias_names = tuple(biases)
        nx, nb = model.nx, len(self.bias_names)
        self.nz = nx + nb
        self._q = np.diag(
            np.concatenate(
                [
                    _per_name(state_std, model.states, 0.05) ** 2,
                    _per_name(bias_std, self.bias_names, 0.05) ** 2,
                ]
            )
        )
        self._r = _per_name(measurement_std, model.outputs, 1.0) ** 2
        self._p0 = np.diag([initial_std**2] * nx + [initial_bias_std**2] * nb)
        self._build(nx, nb)
        self.z: Array | None = None
        self.p = self._p0.copy()
        self.t: float | None = None

    def _build(self, nx: int, nb: int) -> None:
        m = self.model
        z = ca.SX.sym("z", self.nz)
        u = ca.SX.sym("u", m.nu)
        d = ca.SX.sym("d", m.nd)
        p = ca.SX.sym("p", len(m.parameters))
        e = np.zeros((m.nd, nb))
        for j, name in enumerate(self.bias_names):
            e[m.index("disturbances", name), j] = 1.0
        d_used = d + ca.mtimes(ca.DM(e), z[nx:]) if nb else d
        step = m.step_function(self.dt)
        z_next = ca.vertcat(step(z[:nx], u, d_used, p), z[nx:])
        y = m.h(z[:nx], u, d_used, p)
        self._f = ca.Function("ekf_f", [z, u, d, p], [z_next, ca.jacobian(z_next, z)])
        self._h = ca.Function("ekf_h", [z, u, d, p], [y, ca.jacobian(y, z)])

    # -- public API ----------------------------------------------------------------------------

    def reset(self, t: float, x0: Array, biases: Mapping[str, float] | None = None) -> None:
        b = np.array([(biases or {}).get(n, 0.0) for n in self.bias_names])
        self.z = np.concatenate([np.asarray(x0, dtype=float), b])
        self.p = self._p0.copy()
        self.t = float(t)

    @property
    def x(self) -> Array:
        if self.z is None:
            raise RuntimeError("the filter has no estimate yet: reset() or step() first")
        return self.z[: self.model.nx].copy()

    def step(self, t: float, u: Array, snapshot: Snapshot) -> Estimate:
        """Predict from the last estimate to ``t`` under inputs ``u`` (held since the last
        step), then correct with the snapshot's fresh points.

        The first call starts from the measured states (the model's initial state
        where a state's point is missing).
        """
        u = np.asarray(u, dtype=float)
        if self.z is None or self.t is None:
            self.reset(t, self._initial_state(snapshot))
        else:
            steps = max(1, round((t - self.t) / self.dt))
            for k in range(steps):
                self._predict(self.t + k * self.dt, u)
            self.t = float(t)
        used, innovations = self._correct(t, u, snapshot)
        assert self.z is not None
        nx = self.model.nx
        return Estimate(
            t=float(t),
            x=self.z[:nx].copy(),
            biases={n: float(v) for n, v in zip(self.bias_names, self.z[nx:], strict=True)},
            std=np.sqrt(np.clip(np.diag(self.p)[:nx], 0.0, None)),
            used=used,
            innovations=innovations,
        )

    # -- internals -----------------------------------------------------------------------------

    def _initial_state(self, snapshot: Snapshot) -> Array:
        x = np.array(self.model.x0, dtype=float)
        for i, state in enumerate(self.model.states):
            point = snapshot.points.get(self.model.state_outputs.get(state, ""))
            if point is not None and not point.stale and point.reading is not None:
                x[i] = point.reading.value
        return x

    def _d(self, t: float) -> Array:
        return np.asarray(self.model.forecast(float(t), 1, self.dt)[0], dtype=float)

    def _predict(self, t: float, u: Array) -> None:
        assert self.z is not None
        z_next, a = self._f(self.z, u, self._d(t), self.params)
        a = np.asarray(a, dtype=float)
        self.z = np.asarray(z_next, dtype=float).reshape(-1)
        self.p = a @ self.p @ a.T + self._q

    def _correct(
        self, t: float, u: Array, snapshot: Snapshot
    ) -> tuple[tuple[str, ...], dict[str, float]]:
        assert self.z is not None
        y_pred, h_all = self._h(self.z, u, self._d(t), self.params)
        y_pred = np.asarray(y_pred, dtype=float).reshape(-1)
        h_all = np.asarray(h_all, dtype=float)
        rows: list[int] = []
        values: list[float] = []
        names: list[str] = []
        for name, point in snapshot.points.items():
            if point.stale or point.reading is None or name not in self.model.outputs:
                continue
            value = point.reading.value
            if not math.isfinite(value):
                continue
            rows.append(self.model.index("outputs", name))
            values.append(value)
            names.append(name)
        innovations = {n: v - float(y_pred[i]) for n, v, i in zip(names, values, rows, strict=True)}
        if not rows:
            return (), innovations
        h = h_all[rows]
        r = np.diag(self._r[rows])
        s = h @ self.p @ h.T + r
        k = np.linalg.solve(s, h @ self.p).T  # P H' S^-1, with S symmetric
        innovation = np.array(values) - y_pred[rows]
        self.z = self.z + k @ innovation
        i_kh = np.eye(self.nz) - k @ h
        self.p = i_kh @ self.p @ i_kh.T + k @ r @ k.T
        return tuple(names), innovations


def _per_name(value: float | Mapping[str, float], names: Sequence[str], default: float) -> Array:
    """One value per name: a float for all, or a mapping (``default`` for names it omits)."""
    if isinstance(value, Mapping):
        unknown = [n for n in value if n not in names]
        if unknown:
            raise ValueError(f"unknown names {unknown} (known: {list(names)})")
        return np.array([float(value.get(n, default)) for n in names])
    return np.full(len(names), float(value))
