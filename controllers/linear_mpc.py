"""Linear MPC: a condensed QP solved by an active-set or interior solver shipped with CasADi.

For the discrete linear system ``x_{k+1} = A x_k + B u_k + e_k`` (``e_k`` an optional
known affine term, e.g. a disturbance forecast) over ``N`` steps the cost is

    sum_{k<N} x_k' Q x_k + u_k' R u_k + (u_k - u_{k-1})' Rd (u_k - u_{k-1})  +  x_N' P x_N

with ``u_{-1}`` the input applied now, inputs within ``[u_min, u_max]`` and states
within ``[x_min, x_max]`` at ``k = 1..N`` (hard, so a state that cannot be kept
there is an ``INFEASIBLE`` result).  ``P = "lqr"`` takes the stabilising solution of
the discrete algebraic Riccati equation, so without active constraints the first
move is exactly the LQR law ``u_0 = -K x_0``.

The states are eliminated (condensing): ``X = Phi x_0 + Gamma U + Psi E``, so the QP
has only the ``N * nu`` inputs, a dense Hessian that is built once, and a gradient
and constraint bounds that change with ``x_0``.  qpOASES keeps its active set from
one solve to the next (hot start); DAQP and OSQP are warm-started with the shifted
previous plan.  When the unconstrained minimiser (``-H^-1 g``, precomputed inverse)
already satisfies every bound it is the QP's solution and no solver is called
(``shortcut``; ``extra["qp_solver"] == "none"``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import casadi as ca
import numpy as np
from numpy.typing import ArrayLike

from parallelcity.control import SolveStatus
from parallelcity.model import Array

QpSolver = Literal["qpoases", "daqp", "osqp"]

_QP_OPTIONS: dict[str, dict[str, Any]] = {
    "qpoases": {"printLevel": "none", "sparse": False},
    "daqp": {},
    "osqp": {
        "osqp": {
            "verbose": False,
            "eps_abs": 1e-10,
            "eps_rel": 1e-10,
            "polish": False,
            "max_iter": 20000,
        },
        "warm_start_primal": True,
    },
}


def dare(A: Array, B: Array, Q: Array, R: Array, tol: float = 1e-13, max_iter: int = 200) -> Array:
    """Stabilising solution of ``P = A'PA - A'PB (R + B'PB)^-1 B'PA + Q``.

    Structure-preserving doubling: quadratic convergence, no eigen-decomposition.
    Needs ``(A, B)`` stabilisable and ``(A, Q^1/2)`` detectable.
    """
    A = np.asarray(A, dtype=float)
    G = np.asarray(B, dtype=float) @ np.linalg.solve(np.asarray(R, dtype=float), B.T)
    H = np.asarray(Q, dtype=float).copy()
    eye = np.eye(A.shape[0])
    for _ in range(max_iter):
        W = eye + G @ H
        A_W = np.linalg.solve(W.T, A.T).T  # A W^-1
        G_next = G + A_W @ G @ A.T
        H_next = H + A.T @ H @ np.linalg.solve(W, A)
        A = A_W @ A
        done = np.max(np.abs(H_next - H)) <= tol * max(1.0, np.max(np.abs(H_next)))
        G, H = G_next, H_next
        if done:
            return np.asarray(0.5 * (H + H.T), dtype=float)
    raise ValueError("the Riccati iteration did not converge: is (A, B) stabilisable?")


def lqr_gain(A: Array, B: Array, Q: Array, R: Array) -> tuple[Array, Array]:
    """``(K, P)``: the infinite-horizon LQR law ``u = -K x`` and its cost matrix."""
    P = dare(A, B, Q, R)
    K = np.asarray(np.linalg.solve(R + B.T @ P @ B, B.T @ P @ A), dtype=float)
    return K, P


@dataclass(frozen=True, eq=False)
class LinearMpcResult:
    status: SolveStatus
    u_plan: Array  # (N, nu)
    x_pred: Array  # (N + 1, nx)
    cost: float  # the full objective, constants included
    iterations: int
    solve_time_s: float
    message: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def u_first(self) -> Array:
        return np.asarray(self.u_plan[0], dtype=float)


def _matrix(value: ArrayLike | None, rows: int, cols: int, what: str) -> Array:
    if value is None:
        return np.zeros((rows, cols))
    m = np.atleast_2d(np.asarray(value, dtype=float))
    if m.shape != (rows, cols):
        raise ValueError(f"{what} must be {rows}x{cols}, got {m.shape}")
    if not np.all(np.isfinite(m)):
        raise ValueError(f"{what} must be finite")
    return m


def _vector(value: ArrayLike | None, n: int, fill: float, what: str) -> Array:
    if value is None:
        return np.full(n, fill)
    v = np.broadcast_to(np.asarray(value, dtype=float), (n,)).copy()
    if np.any(np.isnan(v)):
        raise ValueError(f"{what} has NaN entries")
    return v


class LinearMpc:
    """Condensed linear MPC; see the module docstring."""

    def __init__(
        self,
        A: ArrayLike,
        B: ArrayLike,
        Q: ArrayLike,
        R: ArrayLike,
        horizon: int,
        *,
        P: ArrayLike | Literal["lqr"] | None = "lqr",
        Rd: ArrayLike | None = None,
        u_min: ArrayLike | None = None,
        u_max: ArrayLike | None = None,
        x_min: ArrayLike | None = None,
        x_max: ArrayLike | None = None,
        solver: QpSolver = "daqp",
        warm_start: bool = True,
        shortcut: bool = True,
    ) -> None:
        A_ = np.atleast_2d(np.asarray(A, dtype=float))
        nx = A_.shape[0]
        B_ = np.asarray(B, dtype=float).reshape(nx, -1)
        nu = B_.shape[1]
        if A_.shape != (nx, nx):
            raise ValueError(f"A must be square, got {A_.shape}")
        if horizon < 1:
            raise ValueError(f"horizon must be at least 1, got {horizon}")
        self.A, self.B = A_, B_
        self.Q = _matrix(Q, nx, nx, "Q")
        self.R = _matrix(R, nu, nu, "R")
        self.Rd = _matrix(Rd, nu, nu, "Rd")
        self.K: Array | None = None  # the LQR gain, with P = "lqr"
        if isinstance(P, str):
            if P != "lqr":
                raise ValueError(f"P must be a matrix, 'lqr' or None, got {P!r}")
            self.K, self.P = lqr_gain(A_, B_, self.Q, self.R)
        else:
            self.P = _matrix(P, nx, nx, "P")
        self.N, self.nx, self.nu = horizon, nx, nu
        self.u_min = _vector(u_min, nu, -np.inf, "u_min")
        self.u_max = _vector(u_max, nu, np.inf, "u_max")
        self.x_min = _vector(x_min, nx, -np.inf, "x_min")
        self.x_max = _vector(x_max, nx, np.inf, "x_max")
        if solver not in _QP_OPTIONS or not ca.has_conic(solver):
            raise ValueError(f"QP solver {solver!r} is not available in this CasADi build")
        self.solver_name = solver
        self.warm_start = warm_start
        self.shortcut = shortcut
        self._condense()
        self._build()
        self._last: tuple[Array, Array, Array] | None = None  # x, lam_x, lam_a

    def _condense(self) -> None:
        N, nx, nu, A, B = self.N, self.nx, self.nu, self.A, self.B
        powers = [np.eye(nx)]
        for _ in range(N):
            powers.append(A @ powers[-1])
        self.Phi = np.vstack(powers[1:])  # (N nx, nx): x_1..x_N from x_0
        Gamma = np.zeros((N * nx, N * nu))
        Psi = np.zeros((N * nx, N * nx))  # from the affine terms e_0..e_{N-1}
        for k in range(N):
            for j in range(k + 1):
                Gamma[k * nx : (k + 1) * nx, j * nu : (j + 1) * nu] = powers[k - j] @ B
                Psi[k * nx : (k + 1) * nx, j * nx : (j + 1) * nx] = powers[k - j]
        self.Gamma, self.Psi = Gamma, Psi
        Qb = np.kron(np.eye(N), self.Q)
        Qb[-nx:, -nx:] = self.P  # x_N carries the terminal weight, x_0 is a constant
        Rb = np.kron(np.eye(N), self.R)
        Dm = np.eye(N * nu) - np.eye(N * nu, k=-nu)  # U - [u_prev; U[:-1]] = Dm U - E u_prev
        self._E = np.zeros((N * nu, nu))
        self._E[:nu] = np.eye(nu)
        Rdb = np.kron(np.eye(N), self.Rd)
        H = Gamma.T @ Qb @ Gamma + Rb + Dm.T @ Rdb @ Dm
        self._H = 0.5 * (H + H.T)
        self._Qb, self._Rdb, self._Dm = Qb, Rdb, Dm
        # everything a solve needs from x0, e and u_prev, as matrices
        GQ = Gamma.T @ Qb
        self._g_x, self._g_e = GQ @ self.Phi, GQ @ Psi
        self._g_u = Dm.T @ Rdb @ self._E
        PQ = self.Phi.T @ Qb
        self._c_xx = self.Q + PQ @ self.Phi
        self._c_xe = 2.0 * PQ @ Psi
        self._c_ee = Psi.T @ Qb @ Psi
        self._c_uu = self._E.T @ Rdb @ self._E
        # state bounds at k = 1..N as rows of Gamma (only the finite ones)
        lo, hi = np.tile(self.x_min, N), np.tile(self.x_max, N)
        self._rows = np.flatnonzero(np.isfinite(lo) | np.isfinite(hi))
        self._x_lo, self._x_hi = lo[self._rows], hi[self._rows]
        self._phi_rows, self._psi_rows = self.Phi[self._rows], Psi[self._rows]

    def _build(self) -> None:
        nv = self.N * self.nu
        a = self.Gamma[self._rows] if self._rows.size else np.zeros((0, nv))
        self._a = ca.DM(a)
        self._h = ca.DM(2.0 * self._H)
        opts = {**_QP_OPTIONS[self.solver_name], "error_on_fail": False}
        self._qp = ca.conic(
            "lmpc", self.solver_name, {"h": self._h.sparsity(), "a": self._a.sparsity()}, opts
        )
        self._lbx = np.tile(self.u_min, self.N)
        self._ubx = np.tile(self.u_max, self.N)
        # the constant Hessian and constraint matrix inside a wrapper: each solve passes
        # only what changes (about a fifth less call overhead)
        na = self._a.size1()
        sym = {
            n: ca.MX.sym(n, size)
            for n, size in (
                ("g", nv),
                ("lba", na),
                ("uba", na),
                ("lbx", nv),
                ("ubx", nv),
                ("x0", nv),
                ("lam_x0", nv),
                ("lam_a0", na),
            )
        }
        out = self._qp(h=self._h, a=self._a, **sym)
        self._call = ca.Function(
            "lmpc_call",
            list(sym.values()),
            [out["x"], out["cost"], out["lam_x"], out["lam_a"]],
            list(sym),
            ["x", "cost", "lam_x", "lam_a"],
        )
        self._zeros = (np.zeros(nv), np.zeros(nv), np.zeros(na))
        # the unconstrained minimiser, when it is feasible, is the QP's solution (convex)
        try:
            np.linalg.cholesky(self._H)
            self._H_inv: Array | None = np.linalg.inv(self._H)
        except np.linalg.LinAlgError:  # only semidefinite: always ask the QP solver
            self._H_inv = None
        self._a_np = np.asarray(a, dtype=float)

    def reset(self) -> None:
        """Forget the warm start."""
        self._last = None

    def predict(self, x0: Array, U: Array, e: Array | None = None) -> Array:
        """States x_0..x_N along the plan ``U`` (N, nu)."""
        x = self.Phi @ x0 + self.Gamma @ U.ravel()
        if e is not None:
            x = x + self.Psi @ e.ravel()
        return np.vstack([x0[None, :], x.reshape(self.N, self.nx)])

    def solve(
        self, x0: ArrayLike, u_prev: ArrayLike | None = None, e: ArrayLike | None = None
    ) -> LinearMpcResult:
        """Plan from ``x0``; ``u_prev`` (default 0) is the input applied now, ``e`` (N, nx)
        the affine terms.  Never raises for solver trouble: the status says it."""
        t_start = time.perf_counter()
        N, nx, nu = self.N, self.nx, self.nu
        x0_ = np.asarray(x0, dtype=float).reshape(nx)
        up = np.zeros(nu) if u_prev is None else np.asarray(u_prev, dtype=float).reshape(nu)
        e_ = None if e is None else np.asarray(e, dtype=float).reshape(N, nx)
        if not (np.all(np.isfinite(x0_)) and np.all(np.isfinite(up))):
            return self._failure(SolveStatus.FAILED, "x0 and u_prev must be finite", t_start)
        g = self._g_x @ x0_ - self._g_u @ up
        const = x0_ @ self._c_xx @ x0_ + up @ self._c_uu @ up
        free_rows = self._phi_rows @ x0_
        if e_ is not None:
            ev = e_.ravel()
            g = g + self._g_e @ ev
            const = const + x0_ @ self._c_xe @ ev + ev @ self._c_ee @ ev
            free_rows = free_rows + self._psi_rows @ ev
        lba = self._x_lo - free_rows
        uba = self._x_hi - free_rows
        if self.shortcut and self._H_inv is not None:
            U = -self._H_inv @ g
            rows = self._a_np @ U
            if (
                np.all(self._lbx <= U)
                and np.all(self._ubx >= U)
                and np.all(rows >= lba)
                and np.all(rows <= uba)
            ):
                self._last = (U, self._zeros[1], self._zeros[2])
                plan = U.reshape(N, nu)
                return LinearMpcResult(
                    status=SolveStatus.SOLVED,
                    u_plan=plan,
                    x_pred=self.predict(x0_, plan, e_),
                    cost=float(U @ self._H @ U + 2.0 * g @ U + const),
                    iterations=0,
                    solve_time_s=time.perf_counter() - t_start,
                    extra={"return_status": "no constraint active", "qp_solver": "none"},
                )
        x_guess, lam_x_guess, lam_a_guess = self._zeros
        if self.warm_start and self._last is not None:
            x_prev, lam_x, lam_a = self._last
            # the previous plan shifted by one step, its last move repeated
            x_guess = np.concatenate([x_prev[nu:], x_prev[-nu:]])
            lam_x_guess = np.concatenate([lam_x[nu:], lam_x[-nu:]])
            lam_a_guess = lam_a
        try:
            sol = self._call(
                g=2.0 * g,
                lba=lba,
                uba=uba,
                lbx=self._lbx,
                ubx=self._ubx,
                x0=x_guess,
                lam_x0=lam_x_guess,
                lam_a0=lam_a_guess,
            )
        except RuntimeError as exc:  # e.g. bounds that cross: the problem has no solution
            return self._failure(SolveStatus.INFEASIBLE, f"QP rejected: {exc}", t_start)
        stats = self._call.stats()  # the one call inside: the QP solver's own statistics
        ret = str(stats.get("return_status", ""))
        iters = max(0, int(stats.get("iter_count", 0) or 0))
        status = self._status(stats, ret)
        if not status.usable:
            self._last = None
            return self._failure(status, f"{self.solver_name}: {ret}", t_start, iters, ret)
        U = np.asarray(sol["x"], dtype=float).ravel()
        self._last = (
            U,
            np.asarray(sol["lam_x"], dtype=float).ravel(),
            np.asarray(sol["lam_a"], dtype=float).ravel(),
        )
        cost = float(sol["cost"]) + float(const)
        plan = np.clip(U.reshape(N, nu), self.u_min, self.u_max)
        return LinearMpcResult(
            status=status,
            u_plan=plan,
            x_pred=self.predict(x0_, plan, e_),
            cost=cost,
            iterations=iters,
            solve_time_s=time.perf_counter() - t_start,
            extra={"return_status": ret, "qp_solver": self.solver_name},
        )

    def _status(self, stats: dict[str, Any], ret: str) -> SolveStatus:
        if stats.get("success", False):
            return SolveStatus.SOLVED
        text = ret.lower()
        if self.solver_name == "daqp" and ret.strip() == "-1":  # DAQP's EXIT_INFEASIBLE
            return SolveStatus.INFEASIBLE
        if "infeas" in text:
            return SolveStatus.INFEASIBLE
        if "time" in text:
            return SolveStatus.TIMEOUT
        return SolveStatus.FAILED

    def _failure(
        self,
        status: SolveStatus,
        message: str,
        t_start: float,
        iterations: int = 0,
        ret: str = "",
    ) -> LinearMpcResult:
        nan = math.nan
        return LinearMpcResult(
            status=status,
            u_plan=np.full((self.N, self.nu), nan),
            x_pred=np.full((self.N + 1, self.nx), nan),
            cost=nan,
            iterations=iterations,
            solve_time_s=time.perf_counter() - t_start,
            message=f"linear_mpc: {message}",
            extra={"return_status": ret} if ret else {},
        )


__all__ = ["LinearMpc", "LinearMpcResult", "QpSolver", "dare", "lqr_gain"]
