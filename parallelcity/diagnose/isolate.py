"""Isolation: which (fault kind, component) explains a window of residuals, and how large.

Every hypothesis is the twin's own one-cycle-ahead prediction with the fault applied as
``faults.ActiveFault`` would apply it to the plant, so its residual signature comes from
the model, not from a table: ``P(size) = y_fault(size) - y_twin`` over the window, per
residual channel.  The fit minimises ``J(size) = sum(((r - P(size)) / sigma)^2)`` over
the channels and cycles of the window:

* sensor faults are affine in their size (a drifting reading, a frozen one): the fit is
  the least-squares solution along the secant ``P(1) - P(0)``, the linearisation;
* parameter and input faults can be far from linear (an exchanger deep in saturation):
  a grid over the size's range, refined by golden section around the best grid point.

The best hypothesis is the smallest ``J``; the runner-up's ``J`` minus it is the margin,
and ``1 - J_best / J_0`` (``J_0``: no fault) how much of the residuals it explains.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache

import casadi as ca
import numpy as np

from parallelcity.twin.model import (
    Array,
    FaultEffect,
    FaultKind,
    FaultTarget,
    SubsystemModel,
)

from .detect import frozen_moved
from .faults import targets

GRID_POINTS = 25
GOLDEN_STEPS = 12  # the bracket is two grid cells: 0.618^12 of it is far below any noise
MIN_ACTIVE = 3  # a fitted start leaves at least this many faulty cycles in the window
INV_PHI = (math.sqrt(5.0) - 1.0) / 2.0


@dataclass(frozen=True)
class Window:
    """The cycles a hypothesis is fitted on (W cycles, C residual channels)."""

    t: Array  # (W,) time of each reading
    t_from: Array  # (W,) time each prediction started from
    x_from: Array  # (W, nx) the twin's state there
    u: Array  # (W, nu) inputs in force over the period
    d0: Array  # (W, nd) disturbances over the period
    d1: Array  # (W, nd) disturbances at the reading
    y_pred: Array  # (W, ny) the twin's prediction
    r: Array  # (W, C) residual minus its fault-free baseline (NaN: no reading)
    y_meas: Array  # (W, C) the readings themselves
    channels: tuple[str, ...]
    sigma: Array  # (C,)


@dataclass(frozen=True)
class Hypothesis:
    kind: FaultKind
    component: str
    index: tuple[int, ...]  # parameters, inputs or the output it perturbs
    state: int | None  # a sensor fault's state: the twin reads it from the faulty sensor
    bounds: tuple[float, float]


@dataclass(frozen=True)
class Fit:
    kind: str
    component: str
    size: float  # estimate; a stuck fault's: the value it froze at
    cost: float  # J at the estimate
    start: float  # the fitted start: the beginning of the first faulty cycle

    def as_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "component": self.component,
            "size": self.size,
            "cost": self.cost,
            "start": self.start,
        }


@cache
def one_step(model: SubsystemModel, dt: float) -> ca.Function:
    """``G(x, u, d0, d1, p)``: the outputs one step of ``dt`` after state ``x`` (inputs
    ``u`` and disturbances ``d0`` over the step, ``d1`` at its end)."""
    x = ca.SX.sym("x", model.nx)
    u = ca.SX.sym("u", model.nu)
    d0 = ca.SX.sym("d0", model.nd)
    d1 = ca.SX.sym("d1", model.nd)
    p = ca.SX.sym("p", len(model.parameters))
    x1 = model.step_function(dt)(x, u, d0, p)
    return ca.Function("G", [x, u, d0, d1, p], [model.h(x1, u, d1, p)])


def _golden(j: Callable[[float], float], grid: Array, i: int, j_i: float) -> tuple[float, float]:
    """Refine the grid's best point ``i`` by golden section between its neighbours."""
    a, b = float(grid[max(0, i - 1)]), float(grid[min(len(grid) - 1, i + 1)])
    best, best_j = float(grid[i]), j_i
    c, d = b - INV_PHI * (b - a), a + INV_PHI * (b - a)
    fc, fd = j(c), j(d)
    for _ in range(GOLDEN_STEPS):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - INV_PHI * (b - a)
            fc = j(c)
        else:
            a, c, fc = c, d, fd
            d = a + INV_PHI * (b - a)
            fd = j(d)
    for size, f in ((c, fc), (d, fd)):
        if f < best_j:
            best, best_j = size, f
    return best, best_j


def hypotheses(
    model: SubsystemModel,
    kinds: Sequence[FaultKind],
    channels: Sequence[str],
    input_bounds: Mapping[str, tuple[float, float]],
) -> list[Hypothesis]:
    """Every (kind, component) pair to weigh: declared components, and for a sensor fault
    every residual channel."""
    measuring = {y: model.index("states", s) for s, y in model.state_outputs.items()}
    out = []
    for kind in kinds:
        comps = list(channels) if kind.applies_to is FaultTarget.SENSOR else list(kind.components)
        for comp in comps:
            index = targets(model, kind, comp)
            if kind.applies_to is FaultTarget.INPUT:
                lo, hi = zip(*(input_bounds[model.inputs[i]] for i in index), strict=True)
                bounds = (min(lo), max(hi))
            elif kind.effect is FaultEffect.SCALE:
                bounds = (0.0, min(kind.max_size, 0.999))
            elif kind.effect is FaultEffect.ADD:
                top = kind.max_size if math.isfinite(kind.max_size) else 10 * max(kind.min_size, 1)
                bounds = (0.0, top)
            else:
                bounds = (-math.inf, math.inf)
            state = measuring.get(comp) if kind.applies_to is FaultTarget.SENSOR else None
            out.append(Hypothesis(kind, comp, index, state, bounds))
    return out


class Isolator:
    """Fit every hypothesis to a window (pure; CasADi evaluates the model in batches)."""

    def __init__(
        self,
        model: SubsystemModel,
        dt: float,
        params: Array | None = None,
        resolution: Mapping[str, float] | None = None,
    ) -> None:
        self.model = model
        self.resolution = dict(resolution or {})
        self.dt = float(dt)
        self.params = np.asarray(model.nominal if params is None else params, dtype=float)
        self._g = one_step(model, self.dt)
        self._maps: dict[int, ca.Function] = {}
        self._rollout: tuple[Window, str, Array] | None = None  # the last one rolled out

    def _eval(self, x: Array, u: Array, d0: Array, d1: Array, p: Array) -> Array:
        """Outputs (N, ny) of the one-step map over N stacked columns."""
        n = x.shape[0]
        size = 1 << max(0, n - 1).bit_length()  # a few map sizes, padded: building one costs ms
        g = self._maps.get(size)
        if g is None:
            g = self._maps[size] = self._g.map(size)
        cols = [
            np.concatenate([a, np.repeat(a[-1:], size - n, axis=0)]).T for a in (x, u, d0, d1, p)
        ]
        return np.asarray(g(*cols), dtype=float).T.reshape(size, -1)[:n]

    def patterns(self, w: Window, hyp: Hypothesis, sizes: Sequence[float], start: float) -> Array:
        """Predicted residuals (S, W, C) of ``hyp`` at each of ``sizes``, as if active over
        the whole window (a drift counts its hours from ``start``)."""
        m, nw, ns = self.model, len(w.t), len(sizes)
        chan = [m.index("outputs", c) for c in w.channels]
        kind, idx = hyp.kind, list(hyp.index)
        x = np.tile(w.x_from, (ns, 1))
        u = np.tile(w.u, (ns, 1))
        p = np.tile(self.params, (ns * nw, 1))
        size_col = np.repeat(np.asarray(sizes, dtype=float), nw)
        extra = np.zeros((ns * nw, m.ny))
        if kind.applies_to is FaultTarget.PARAMETER:
            if kind.effect is FaultEffect.SCALE:
                p[:, idx] *= (1.0 - size_col)[:, None]
            else:
                p[:, idx] += size_col[:, None]
        elif kind.applies_to is FaultTarget.INPUT:
            u[:, idx] = size_col[:, None]
        elif kind.effect is FaultEffect.DRIFT:
            hours = np.tile(np.maximum(0.0, w.t - start) / 3600.0, ns)
            hours_from = np.tile(np.maximum(0.0, w.t_from - start) / 3600.0, ns)
            extra[:, hyp.index[0]] = size_col * hours
            if hyp.state is not None:
                x[:, hyp.state] -= size_col * hours_from
        if kind.applies_to is FaultTarget.SENSOR and kind.effect is FaultEffect.STUCK:
            y = np.tile(self._unseen_state(w, hyp, start), (ns, 1))
            y[:, hyp.index[0]] = size_col
        else:
            y = self._eval(x, u, np.tile(w.d0, (ns, 1)), np.tile(w.d1, (ns, 1)), p) + extra
        pred = y - np.tile(w.y_pred, (ns, 1))
        return pred[:, chan].reshape(ns, nw, len(chan))

    def _unseen_state(self, w: Window, hyp: Hypothesis, start: float) -> Array:
        """Outputs (W, ny) if the sensor of a state froze at ``start``: the twin read the
        frozen value as the state, while the state went on as the model moves it from
        there (for a sensor of no state: the twin's prediction)."""
        if hyp.state is None:
            return w.y_pred
        last = self._rollout
        if last is None or last[0] is not w or last[1] != hyp.component:
            last = self._rollout = (w, hyp.component, self._roll_unseen(w, hyp))
        return np.asarray(last[2][int(np.searchsorted(w.t_from, start))], dtype=float)

    def _roll_unseen(self, w: Window, hyp: Hypothesis) -> Array:
        """``_unseen_state`` for every start row at once (F, W, ny): one batch per cycle."""
        assert hyp.state is not None
        nw, out_i = len(w.t), hyp.index[0]
        outs = np.tile(w.y_pred, (nw, 1, 1))
        xs = np.full(nw, np.nan)  # per start row: the state as carried forward
        for row in range(nw):
            firsts = np.arange(row + 1)  # rollouts that have started by this row
            x = np.tile(w.x_from[row], (len(firsts), 1))
            carried = firsts < row
            x[carried, hyp.state] = xs[firsts[carried]]
            reps = len(firsts)
            y = self._eval(
                x,
                np.tile(w.u[row], (reps, 1)),
                np.tile(w.d0[row], (reps, 1)),
                np.tile(w.d1[row], (reps, 1)),
                np.tile(self.params, (reps, 1)),
            )
            outs[firsts, row] = y
            xs[firsts] = y[:, out_i]
        return outs

    def _stuck_readings(self, w: Window, fit: Fit) -> Array | None:
        """A stuck-sensor fit's readings from its start on (None for other fits)."""
        kind = self.model.fault_kind(fit.kind)
        if not (kind.applies_to is FaultTarget.SENSOR and kind.effect is FaultEffect.STUCK):
            return None
        col = w.y_meas[w.t_from >= fit.start, w.channels.index(fit.component)]
        return np.asarray(col[np.isfinite(col)], dtype=float)

    def _frozen(self, w: Window, fit: Fit) -> bool:
        """A reading repeated bit for bit while the twin expected it to move away
        (``detect.frozen_moved``; an idle pump's flow reads exactly 0 on a live sensor)."""
        col = self._stuck_readings(w, fit)
        if col is None or len(col) < MIN_ACTIVE or not bool(np.all(col == col[0])):
            return False
        c = w.channels.index(fit.component)
        rows = w.t_from >= fit.start
        pred = w.y_pred[rows, self.model.index("outputs", fit.component)]
        if float(np.ptp(pred)) > float(w.sigma[c]):  # a change was detected: moving is enough
            return True
        gap = (pred - w.y_meas[rows, c])[1:]  # after its first reading
        departures = [float(v) for v in gap if math.isfinite(v)]
        return frozen_moved(departures, float(w.sigma[c]), self.resolution.get(fit.component, 0.0))

    def _moving(self, w: Window, fit: Fit) -> bool:
        col = self._stuck_readings(w, fit)
        if col is None or len(col) < 2:
            return False
        return float(np.std(col)) > float(w.sigma[w.channels.index(fit.component)])

    @staticmethod
    def row_costs(w: Window, pattern: Array) -> Array:
        """Each cycle's share of J: (S, W, C) -> (S, W)."""
        z = (w.r[None] - pattern) / w.sigma[None, None, :]
        return np.asarray(np.nansum(z * z, axis=2), dtype=float)

    def cost(self, w: Window, pattern: Array, first: int) -> Array:
        """J per pattern (S,) with the fault active from row ``first`` on."""
        quiet = float(self.row_costs(w, np.zeros((1, *w.r.shape)))[0, :first].sum())
        return np.asarray(quiet + self.row_costs(w, pattern)[:, first:].sum(axis=1), dtype=float)

    def fit(self, w: Window, hyp: Hypothesis) -> Fit:
        """The best size and start (a cycle of the window, leaving ``MIN_ACTIVE`` after it)."""
        firsts = range(max(1, len(w.t) - MIN_ACTIVE + 1))
        best = Fit(hyp.kind.name, hyp.component, 0.0, math.inf, float(w.t_from[0]))
        if hyp.kind.applies_to is FaultTarget.SENSOR:
            wt = 1.0 / (w.sigma[None, :] ** 2)
            for first in firsts:
                start = float(w.t_from[first])
                if hyp.kind.effect is FaultEffect.DRIFT:  # no drift: the twin's prediction
                    p1 = self.patterns(w, hyp, [1.0], start)[0]
                    p0 = np.zeros_like(p1)
                else:
                    p0, p1 = self.patterns(w, hyp, [0.0, 1.0], start)
                dp, r = (p1 - p0)[first:], w.r[first:] - p0[first:]
                den = float(np.nansum(wt * dp * dp))
                size = float(np.nansum(wt * dp * r)) / den if den > 0 else 0.0
                size = min(hyp.bounds[1], max(hyp.bounds[0], size))
                cost = float(self.cost(w, (p0 + size * (p1 - p0))[None], first)[0])
                if cost < best.cost:
                    best = Fit(hyp.kind.name, hyp.component, size, cost, start)
            return best
        lo, hi = hyp.bounds
        grid = np.linspace(lo, hi, GRID_POINTS)
        rows = self.row_costs(w, self.patterns(w, hyp, list(grid), 0.0))  # (G, W)
        quiet = np.concatenate([[0.0], np.cumsum(self.row_costs(w, np.zeros((1, *w.r.shape)))[0])])
        after = np.cumsum(rows[:, ::-1], axis=1)[:, ::-1]  # (G, W): rows first.. summed
        costs = np.array([quiet[f] + after[:, f] for f in firsts])  # (F, G)
        fi, gi = np.unravel_index(int(np.argmin(costs)), costs.shape)
        first = list(firsts)[int(fi)]

        def j(size: float) -> float:
            return float(self.cost(w, self.patterns(w, hyp, [size], 0.0), first)[0])

        size, cost = _golden(j, grid, int(gi), float(costs[fi, gi]))
        return Fit(hyp.kind.name, hyp.component, size, cost, float(w.t_from[first]))

    def rank(self, w: Window, hyps: Sequence[Hypothesis]) -> tuple[list[Fit], float]:
        """Every hypothesis's fit, best first, and ``J_0`` (no fault).

        A reading repeated bit for bit from the fitted start on is a frozen sensor: a live
        one's noise never repeats exactly, so that stuck hypothesis goes first whatever
        the fits of the others (a drift cancelling the plant's movement can fit as well
        while the plant moves in a straight line)."""
        fits = sorted((self.fit(w, h) for h in hyps), key=lambda f: f.cost)
        frozen = [f for f in fits if self._frozen(w, f)]
        moving = [f for f in fits if self._moving(w, f)]
        fits = frozen + [f for f in fits if f not in frozen and f not in moving] + moving
        j0 = float(np.nansum((w.r / w.sigma[None, :]) ** 2))
        return fits, j0
