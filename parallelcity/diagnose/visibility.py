"""The smallest fault the diagnosis can see: sizes from the residual channels' noise.

A fault shows in the one-cycle-ahead residuals by its signature ``P(size) = y_fault -
y_twin``; the CUSUM ignores per-cycle shifts below its allowance ``k`` sigmas and sees a
shift of ``2 k`` within about ``h / k`` cycles.  A parameter or input fault is *visible*
at a size whose signature reaches ``2 k`` sigmas on some channel at the median operating
point of those where it shows at all (a worn pump's: where it runs).  The operating
points are the model's initial state with every corner of the inputs' bounds (up to
``MAX_CORNERS``) at ``DAY_POINTS`` times of a day of the model's own disturbance
forecast.  Pure.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping

import numpy as np

from parallelcity.twin.model import Array, FaultEffect, FaultKind, FaultTarget, SubsystemModel

from .faults import targets
from .isolate import one_step

VISIBLE_ALLOWANCES = 2.0  # a shift of this many CUSUM allowances k is seen within h / k cycles
MAX_CORNERS = 16
DAY_POINTS = 24  # times of the day sampled
DAY_S = 86400.0
BISECTIONS = 20  # the size to a millionth of its range
SHOWS_SHARE = 0.05  # a point where the largest size's signature is below this share of its
# largest anywhere is one where the fault does not show (a pump that is off)


def operating_points(
    model: SubsystemModel, dt: float, t0: float, bounds: Mapping[str, tuple[float, float]]
) -> tuple[Array, Array, Array, Array]:
    """(x, u, d0, d1) stacked: the initial state, each input corner, each cycle of a day."""
    lo = np.array([bounds.get(n, (v, v))[0] for n, v in zip(model.inputs, model.u0, strict=True)])
    hi = np.array([bounds.get(n, (v, v))[1] for n, v in zip(model.inputs, model.u0, strict=True)])
    free = [i for i in range(model.nu) if hi[i] > lo[i]]
    corners = [np.asarray(model.u0, dtype=float)]
    picks = itertools.product((0, 1), repeat=len(free))
    for pick in itertools.islice(picks, MAX_CORNERS):
        u = np.asarray(model.u0, dtype=float).copy()
        for i, side in zip(free, pick, strict=True):
            u[i] = hi[i] if side else lo[i]
        corners.append(u)
    n = max(1, math.ceil(DAY_S / dt))
    d = np.asarray(model.forecast(t0, n + 1, dt), dtype=float).reshape(n + 1, -1)
    times = np.unique(np.linspace(0, n - 1, min(n, DAY_POINTS)).round().astype(int))
    rows = [(u, d[i], d[i + 1]) for u in corners for i in times]
    x = np.tile(np.asarray(model.x0, dtype=float), (len(rows), 1))
    return (
        x,
        np.array([r[0] for r in rows]),
        np.array([r[1] for r in rows]),
        np.array([r[2] for r in rows]),
    )


def visible_size(
    model: SubsystemModel,
    kind: FaultKind,
    component: str,
    sigma: Mapping[str, float],
    k: float,
    dt: float,
    points: tuple[Array, Array, Array, Array],
    params: Array | None = None,
) -> float:
    """The smallest size of a parameter or input fault whose signature reaches
    ``VISIBLE_ALLOWANCES * k`` sigmas on some channel at the median of the operating
    points where it shows (bisection over the kind's range; ``inf`` if even its largest
    size stays below)."""
    if kind.applies_to is FaultTarget.SENSOR or not kind.sized:
        raise ValueError(f"{kind.name}: only sized parameter and input faults have a size here")
    x, u, d0, d1 = points
    p0 = np.asarray(model.nominal if params is None else params, dtype=float)
    n = x.shape[0]
    g = one_step(model, float(dt)).map(n)
    chan = [model.index("outputs", c) for c in sigma]
    s = np.array([sigma[c] for c in sigma])
    idx = list(targets(model, kind, component))

    def out(p: Array, uu: Array) -> Array:
        y = np.asarray(g(x.T, uu.T, d0.T, d1.T, np.tile(p, (n, 1)).T), dtype=float).T
        return y[:, chan]

    base = out(p0, u)

    def z(size: float) -> Array:
        """Per operating point, the signature's largest |residual| in sigmas."""
        p, uu = p0.copy(), u.copy()
        if kind.applies_to is FaultTarget.PARAMETER:
            if kind.effect is FaultEffect.SCALE:
                p[idx] *= 1.0 - size
            else:
                p[idx] += size
        else:
            uu[:, idx] = size
        return np.asarray(np.nanmax(np.abs(out(p, uu) - base) / s[None, :], axis=1))

    top = kind.max_size if math.isfinite(kind.max_size) else 1e3 * max(kind.min_size, 1.0)
    if kind.effect is FaultEffect.SCALE:
        top = min(top, 0.999)
    z_top = z(top)
    where = z_top > SHOWS_SHARE * float(np.max(z_top))  # points where it shows at all
    if not np.any(where) or not float(np.max(z_top)) > 0:
        return math.inf

    def shows(size: float) -> bool:
        return float(np.median(z(size)[where])) >= VISIBLE_ALLOWANCES * k

    if not shows(top):
        return math.inf
    lo, hi = 0.0, top
    for _ in range(BISECTIONS):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if shows(mid) else (mid, hi)
    return hi
