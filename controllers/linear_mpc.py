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
(``shortcut``; ``extra["qp_solver"] == "none"``).  Else, with ``shortcut``, the active
set of the previous solution, shifted by one step, is tried first: its KKT system is
solved directly and accepted only when the full QP's KKT conditions hold (every bound
kept, every multiplier of the right sign), corrected by at most
``active_set_iterations`` primal-dual active-set steps; only then is the QP solver
called.  CasADi's DAQP interface sets DAQP up afresh on every call (no warm start of
its working set); its qpOASES interface does hot-start, but a call costs more than
DAQP's cold solve here.  Saturating inputs, whose active set moves by one step per
cycle, are where the guess pays.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import casadi as ca
import numpy as np
from numpy.typing import ArrayLike

from parallelcity.decide.control import SolveStatus
from parallelcity.twin.model import Array

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


def qp_status(solver: str, stats: dict[str, Any], ret: str) -> SolveStatus:
    """What a CasADi conic solver's statistics mean for the plan."""
    if stats.get("success", False):
        return SolveStatus.SOLVED
    text = ret.lower()
    if solver == "daqp" and ret.strip() == "-1":  # DAQP's EXIT_INFEASIBLE
        return SolveStatus.INFEASIBLE
    if "infeas" in text:
        return SolveStatus.INFEASIBLE
    if "time" in text:
        return SolveStatus.TIMEOUT
    return SolveStatus.FAILED


@dataclass(frozen=True, eq=False)
class QpSolution:
    """The outcome of one ``DenseQp.solve``: status first; ``v`` is NaN unless usable."""

    status: SolveStatus
    v: Array
    cost: float  # 1/2 v'Hv + g'v
    lam_x: Array
    lam_a: Array
    iterations: int
    solver: str  # the QP solver used, "none" for the shortcut
    return_status: str


class DenseQp:
    """``min 1/2 v'Hv + g'v`` s.t. ``lbx <= v <= ubx``, ``lba <= A v <= uba``, with ``H`` and
    ``A`` that may change at every solve (a time-varying condensed MPC).

    The same solvers and options as ``LinearMpc``.  ``solve`` never raises for solver
    trouble.  With ``shortcut`` the unconstrained minimiser ``-H^-1 g`` (a Cholesky
    solve) is returned without calling the solver when it satisfies every bound; it is
    tried only while the previous solution had no active constraint, so a problem whose
    constraints stay active (a band held all day) does not pay for the factorisation.
    """

    def __init__(self, nv: int, na: int, solver: QpSolver = "daqp", *, shortcut: bool = True):
        if solver not in _QP_OPTIONS or not ca.has_conic(solver):
            raise ValueError(f"QP solver {solver!r} is not available in this CasADi build")
        self.nv, self.na, self.solver_name, self.shortcut = nv, na, solver, shortcut
        self._was_free = True  # the previous solution had no active constraint
        opts = {**_QP_OPTIONS[solver], "error_on_fail": False}
        self._qp = ca.conic(
            "dense_qp",
            solver,
            {"h": ca.Sparsity.dense(nv, nv), "a": ca.Sparsity.dense(na, nv)},
            opts,
        )

    def solve(
        self,
        H: Array,
        g: Array,
        A: Array,
        lba: Array,
        uba: Array,
        lbx: Array,
        ubx: Array,
        guess: tuple[Array, Array, Array] | None = None,
    ) -> QpSolution:
        nan_v = np.full(self.nv, math.nan)
        zx, za = np.zeros(self.nv), np.zeros(self.na)

        def failure(status: SolveStatus, ret: str, iters: int = 0) -> QpSolution:
            return QpSolution(status, nan_v, math.nan, zx, za, iters, self.solver_name, ret)

        if np.any(lbx > ubx) or np.any(lba > uba):
            return failure(SolveStatus.INFEASIBLE, "bounds cross")
        if self.shortcut and self._was_free:
            try:
                v = -_cho_solve(np.asarray(np.linalg.cholesky(H), dtype=float), g)
            except np.linalg.LinAlgError:
                v = None
            if v is not None:
                rows = A @ v
                if (
                    np.all(lbx <= v)
                    and np.all(v <= ubx)
                    and np.all(lba <= rows)
                    and np.all(rows <= uba)
                ):
                    cost = float(0.5 * v @ H @ v + g @ v)
                    return QpSolution(
                        SolveStatus.SOLVED, v, cost, zx, za, 0, "none", "no constraint active"
                    )
        x0, lam_x0, lam_a0 = guess if guess is not None else (zx, zx, za)
        try:
            sol = self._qp(
                h=H,
                g=g,
                a=A,
                lba=lba,
                uba=uba,
                lbx=lbx,
                ubx=ubx,
                x0=x0,
                lam_x0=lam_x0,
                lam_a0=lam_a0,
            )
        except RuntimeError as exc:
            return failure(SolveStatus.FAILED, f"QP rejected: {exc}")
        stats = self._qp.stats()
        ret = str(stats.get("return_status", ""))
        iters = max(0, int(stats.get("iter_count", 0) or 0))
        status = qp_status(self.solver_name, stats, ret)
        if not status.usable:
            self._was_free = True
            return failure(status, ret, iters)
        lam_x = np.asarray(sol["lam_x"], dtype=float).ravel()
        lam_a = np.asarray(sol["lam_a"], dtype=float).ravel()
        self._was_free = not (np.any(lam_x != 0.0) or np.any(lam_a != 0.0))
        return QpSolution(
            status,
            np.asarray(sol["x"], dtype=float).ravel(),
            float(sol["cost"]),
            lam_x,
            lam_a,
            iters,
            self.solver_name,
            ret,
        )


def _cho_solve(L: Array, b: Array) -> Array:
    """``(L L')^-1 b`` by forward and back substitution (no LU of the triangles)."""
    n = b.shape[0]
    z = np.empty(n)
    for i in range(n):
        z[i] = (b[i] - L[i, :i] @ z[:i]) / L[i, i]
    x = np.empty(n)
    for i in range(n - 1, -1, -1):
        x[i] = (z[i] - L[i + 1 :, i] @ x[i + 1 :]) / L[i, i]
    return x


def condense_ltv(As: Array, Bs: Array) -> Array:
    """``Gamma`` (N nx, N nu) of the time-varying system ``dx_{k+1} = A_k dx_k + B_k du_k``
    with ``dx_0 = 0``: row block ``k`` is ``dx_{k+1}``."""
    N, nx, nu = Bs.shape
    Gamma = np.zeros((N * nx, N * nu))
    for k in range(N):  # x_{k+1} = A_k x_k + B_k u_k: the previous row block times A_k
        if k:
            Gamma[k * nx : (k + 1) * nx, : k * nu] = As[k] @ Gamma[(k - 1) * nx : k * nx, : k * nu]
        Gamma[k * nx : (k + 1) * nx, k * nu : (k + 1) * nu] = Bs[k]
    return Gamma


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
        active_set_iterations: int = 4,
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
        # the active set of the last solution: per input entry and per state-bound row
        # (all N nx of them), -1 at the lower bound, +1 at the upper, 0 inactive
        self._active: tuple[Array, Array] | None = None
        if active_set_iterations < 0:
            raise ValueError(f"active_set_iterations must be >= 0, got {active_set_iterations}")
        self.active_set_iterations = active_set_iterations

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
        self._active = None

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
                self._active = None
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
            guessed = self._guess_active_set(g, lba, uba)
            if guessed is not None:
                U, lam_x, lam_a, rounds = guessed
                self._last = (U, 2.0 * lam_x, 2.0 * lam_a)
                plan = np.clip(U.reshape(N, nu), self.u_min, self.u_max)
                return LinearMpcResult(
                    status=SolveStatus.SOLVED,
                    u_plan=plan,
                    x_pred=self.predict(x0_, plan, e_),
                    cost=float(U @ self._H @ U + 2.0 * g @ U + const),
                    iterations=rounds,
                    solve_time_s=time.perf_counter() - t_start,
                    extra={"return_status": "active set of the last plan", "qp_solver": "none"},
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
            self._active = None
            return self._failure(status, f"{self.solver_name}: {ret}", t_start, iters, ret)
        U = np.asarray(sol["x"], dtype=float).ravel()
        self._last = (
            U,
            np.asarray(sol["lam_x"], dtype=float).ravel(),
            np.asarray(sol["lam_a"], dtype=float).ravel(),
        )
        rows_active = np.zeros(N * nx)
        rows_active[self._rows] = np.sign(self._last[2])
        self._active = (np.sign(self._last[1]), rows_active)
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
        return qp_status(self.solver_name, stats, ret)

    def _guess_active_set(
        self, g: Array, lba: Array, uba: Array
    ) -> tuple[Array, Array, Array, int] | None:
        """The QP's solution from the last solution's active set, shifted by one step.

        The equality-constrained QP of the guessed active set is solved directly (its
        KKT system); a guess is accepted only if the KKT conditions of the full QP hold:
        every bound and row within its limits and every multiplier of the right sign.
        Otherwise violated constraints join, wrongly signed ones leave, and the system is
        solved again (a primal-dual active-set step), at most ``active_set_iterations``
        times; then the QP solver takes over (None).  Returns the plan, the bound and row
        multipliers (of ``U'HU + 2 g'U``, halved) and the number of KKT solves.
        """
        if self._active is None or self.active_set_iterations < 1:
            return None
        nu, nx = self.nu, self.nx
        bounds, rows_full = self._active
        b_act = np.concatenate([bounds[nu:], bounds[-nu:]])
        r_act = np.concatenate([rows_full[nx:], rows_full[-nx:]])[self._rows]
        if not (np.any(b_act) or np.any(r_act)):
            return None  # nothing was active: the unconstrained check has said no already
        H, A = self._H, self._a_np
        lbx, ubx = self._lbx, self._ubx
        dual_tol = 1e-9 * (1.0 + float(np.max(np.abs(g))))
        for rounds in range(1, self.active_set_iterations + 1):
            B = np.flatnonzero(b_act)
            F = np.flatnonzero(b_act == 0)
            R = np.flatnonzero(r_act)
            vB = np.where(b_act[B] < 0, lbx[B], ubx[B])
            cR = np.where(r_act[R] < 0, lba[R], uba[R])
            if not (np.all(np.isfinite(vB)) and np.all(np.isfinite(cR))):
                return None
            aR = A[R]
            nF = F.size
            K = np.zeros((nF + R.size, nF + R.size))
            K[:nF, :nF] = H[np.ix_(F, F)]
            K[nF:, :nF] = aR[:, F]
            K[:nF, nF:] = aR[:, F].T
            rhs = np.concatenate([-(g[F] + H[np.ix_(F, B)] @ vB), cR - aR[:, B] @ vB])
            try:
                sol = np.linalg.solve(K, rhs)
            except np.linalg.LinAlgError:
                return None
            v = np.empty(self.N * nu)
            v[B], v[F] = vB, sol[:nF]
            mu = sol[nF:]
            lam = -(H[B] @ v + g[B] + aR[:, B].T @ mu)
            wrong_b = ((b_act[B] < 0) & (lam > dual_tol)) | ((b_act[B] > 0) & (lam < -dual_tol))
            wrong_r = ((r_act[R] < 0) & (mu > dual_tol)) | ((r_act[R] > 0) & (mu < -dual_tol))
            primal_tol = 1e-9 * (1.0 + float(np.max(np.abs(v))))
            free = b_act == 0
            low_b = free & (v < lbx - primal_tol)
            high_b = free & (v > ubx + primal_tol)
            r = A @ v
            off = r_act == 0
            low_r = off & (r < lba - primal_tol)
            high_r = off & (r > uba + primal_tol)
            if not (
                wrong_b.any()
                or wrong_r.any()
                or low_b.any()
                or high_b.any()
                or low_r.any()
                or high_r.any()
            ):
                lam_x = np.zeros(self.N * nu)
                lam_x[B] = lam
                lam_a = np.zeros(self._rows.size)
                lam_a[R] = mu
                rows_active = np.zeros(self.N * nx)
                rows_active[self._rows] = r_act
                self._active = (b_act, rows_active)
                return v, lam_x, lam_a, rounds
            b_act = b_act.copy()
            r_act = r_act.copy()
            b_act[B[wrong_b]] = 0
            r_act[R[wrong_r]] = 0
            b_act[low_b], b_act[high_b] = -1, 1
            r_act[low_r], r_act[high_r] = -1, 1
        return None

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


__all__ = [
    "DenseQp",
    "LinearMpc",
    "LinearMpcResult",
    "QpSolution",
    "QpSolver",
    "condense_ltv",
    "dare",
    "lqr_gain",
    "qp_status",
]
