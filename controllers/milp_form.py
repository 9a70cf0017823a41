"""The affine form of a model over one cycle, for the pump-scheduling MILP.

Over stage ``k`` of the horizon, with the disturbances ``d_k`` of the forecast,

    x_{k+1} = A_k x_k + B_k u_k + c_k,     y_k = C_k x_k + D_k u_k + e_k

from exact CasADi Jacobians of the model's one-cycle map ``F`` (``step_function(dt)``)
and its output map ``h``, taken at a base point ``(xb_k, ub_k)``; ``y_N`` uses the last
input, as ``SubsystemModel.simulate`` does.  A model that is affine in its states and
inputs (a tank balance, a pressure ``a + b level``, a cost ``P on price``) has the same
Jacobians at every base point for given ``d_k``, so any base point gives the exact
model; ``affinity`` finds out by comparing them at a few random points.

A model that is not affine in its on/off inputs (fits blended across pump combinations)
is taken exactly in them instead, when they are few: ``combinations`` evaluates the
one-cycle map and the outputs at every on/off combination ``s`` around the base states,

    x_{k+1} = A_k x_k + B_k u_k + sum_s z_ks g_ks,     y_k = C_k x_k + D_k u_k + sum_s z_ks f_ks

with ``B``, ``D`` zero in the on/off columns and ``z_k`` the one-hot of stage ``k``'s
combination, so only the states' effect is linearised.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import casadi as ca
import numpy as np

from parallelcity.twin.model import Array, SubsystemModel

AFFINE_TOLERANCE = 1e-7  # relative change of a Jacobian between points that still is affine


@dataclass(frozen=True)
class AffineForm:
    """The stage matrices: ``A`` (n, nx, nx), ``B`` (n, nx, nu), ``c`` (n, nx); ``C``
    (n + 1, ny, nx), ``D`` (n + 1, ny, nu), ``e`` (n + 1, ny)."""

    A: Array
    B: Array
    c: Array
    C: Array
    D: Array
    e: Array


def _symbols(model: SubsystemModel, f: ca.Function) -> tuple[Any, ...]:
    """SX symbols when ``f`` takes them (exact sparsity), else MX."""
    sizes = (model.nx, model.nu, model.nd, len(model.parameters))
    sym = ca.SX.sym if f.is_a("SXFunction") and model.h.is_a("SXFunction") else ca.MX.sym
    return tuple(sym(name, size) for name, size in zip("xudp", sizes, strict=True))


class Linearisation:
    """Jacobians of a model over one cycle ``dt`` (see the module docstring)."""

    def __init__(self, model: SubsystemModel, dt: float) -> None:
        self.model = model
        step = model.step_function(dt)
        x, u, d, p = _symbols(model, step)
        fx, y = step(x, u, d, p), model.h(x, u, d, p)
        outs = [fx, ca.jacobian(fx, x), ca.jacobian(fx, u), y, ca.jacobian(y, x), ca.jacobian(y, u)]
        self._jac = ca.Function("milp_jac", [x, u, d, p], outs)
        self._fh = ca.Function("milp_fh", [x, u, d, p], [fx, y])
        # structural nonzeros: the entries a MILP needs a coefficient for
        self.mask_A, self.mask_B, self.mask_C, self.mask_D = (
            np.array(self._jac.sparsity_out(i), dtype=bool) for i in (1, 2, 4, 5)
        )

    def at(self, xb: Array, ub: Array, d: Array, p: Array) -> AffineForm:
        """The stage matrices around states ``xb`` (n + 1, nx) and inputs ``ub`` (n, nu)
        under disturbances ``d`` (n, nd)."""
        m = self.model
        n = ub.shape[0]
        u_ext = np.vstack([ub, ub[-1:]])
        d_ext = np.vstack([d[:n], d[n - 1 : n]])
        res = self._jac.map(n + 1)(xb.T, u_ext.T, d_ext.T, p)
        fx, ax, bu, y, cx, du = (np.asarray(r, dtype=float) for r in res)
        nx, nu, ny = m.nx, m.nu, m.ny
        # a map stacks each stage's Jacobian column blocks side by side
        A = ax.reshape(nx, n + 1, nx).transpose(1, 0, 2)
        B = bu.reshape(nx, n + 1, nu).transpose(1, 0, 2)
        C = cx.reshape(ny, n + 1, nx).transpose(1, 0, 2)
        D = du.reshape(ny, n + 1, nu).transpose(1, 0, 2)
        xs, us = xb[: n + 1], u_ext
        c = fx.T - np.einsum("kij,kj->ki", A, xs) - np.einsum("kij,kj->ki", B, us)
        e = y.T - np.einsum("kij,kj->ki", C, xs) - np.einsum("kij,kj->ki", D, us)
        return AffineForm(A=A[:n], B=B[:n], c=c[:n], C=C, D=D, e=e)

    def combinations(
        self, form: AffineForm, xb: Array, ub: Array, d: Array, p: Array, binary: tuple[int, ...]
    ) -> tuple[AffineForm, Array, Array]:
        """``form`` exact in the on/off inputs ``binary``: the form with their columns of
        ``B`` and ``D`` and the constants zeroed, and per stage and combination (in
        ``switch_combinations`` order) the state constants ``g`` (n, ns, nx) and the
        output constants ``f`` (n + 1, ns, ny) at the base states ``xb``."""
        n = ub.shape[0]
        combos = switch_combinations(len(binary))
        u_ext = np.vstack([ub, ub[-1:]])
        d_ext = np.vstack([d[:n], d[n - 1 : n]])
        cols = list(binary)
        cont = [i for i in range(ub.shape[1]) if i not in binary]
        B, D = form.B.copy(), form.D.copy()
        B[:, :, cols] = 0.0
        D[:, :, cols] = 0.0
        ns = len(combos)
        us = np.repeat(u_ext, ns, axis=0)  # stage-major, combination-minor
        us[:, cols] = np.tile(np.array(combos, dtype=float), (n + 1, 1))
        xs = np.repeat(xb[: n + 1], ns, axis=0)
        ds = np.repeat(d_ext, ns, axis=0)
        fx, y = (
            np.asarray(r, dtype=float).T for r in self._fh.map(ns * (n + 1))(xs.T, us.T, ds.T, p)
        )
        fx = fx.reshape(n + 1, ns, -1)
        y = y.reshape(n + 1, ns, -1)
        base_x = np.einsum("kij,kj->ki", form.A, xb[:n]) + np.einsum(
            "kij,kj->ki", form.B[:, :, cont], ub[:, cont]
        )
        base_y = np.einsum("kij,kj->ki", form.C, xb[: n + 1]) + np.einsum(
            "kij,kj->ki", form.D[:, :, cont], u_ext[:, cont]
        )
        g = fx[:n] - base_x[:, None, :]
        f = y - base_y[:, None, :]
        zero_c, zero_e = np.zeros_like(form.c), np.zeros_like(form.e)
        exact = AffineForm(A=form.A, B=B, c=zero_c, C=form.C, D=D, e=zero_e)
        return exact, g, f

    def affinity(
        self, x: Array, u_lo: Array, u_hi: Array, d: Array, p: Array, points: int = 4
    ) -> float:
        """The largest relative change of a Jacobian over ``points`` random states and
        inputs around ``x`` (inputs within their bounds, or +-1 around 0 where unbounded)
        under disturbances ``d``: below ``AFFINE_TOLERANCE`` the model is affine."""
        rng = np.random.default_rng(0)
        lo = np.where(np.isfinite(u_lo), u_lo, -1.0)
        hi = np.where(np.isfinite(u_hi), u_hi, 1.0)
        xs = x + rng.uniform(-0.5, 0.5, (points, x.size)) * np.maximum(1.0, np.abs(x))
        us = lo + rng.uniform(0.0, 1.0, (points, lo.size)) * (hi - lo)
        jacs = []
        for xi, ui in zip(xs, us, strict=True):
            res = self._jac(xi, ui, d, p)
            jacs.append([np.asarray(res[i], dtype=float) for i in (1, 2, 4, 5)])
        worst = 0.0
        for later in jacs[1:]:
            for j0, j1 in zip(jacs[0], later, strict=True):
                if not (np.all(np.isfinite(j0)) and np.all(np.isfinite(j1))):
                    return float("inf")
                scale = 1.0 + float(np.max(np.abs(j0), initial=0.0))
                worst = max(worst, float(np.max(np.abs(j1 - j0), initial=0.0)) / scale)
        return worst


def switch_combinations(nb: int) -> list[tuple[int, ...]]:
    """Every on/off combination of ``nb`` inputs, the first input varying slowest."""
    return [tuple(c) for c in itertools.product((0, 1), repeat=nb)]
