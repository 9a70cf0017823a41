"""The ``linear_mpc`` controller kind: linear MPC on a linearisation of the scenario's model.

Every step linearises the model's RK4 step over one cycle (``F(x, u, d, p)``, the
same discretisation the NMPC and the rigs use) and its output map ``h`` with exact
CasADi Jacobians, then solves one condensed QP (``parallelcity.controllers.linear_mpc.DenseQp``:
DAQP, qpOASES or OSQP) in the planned inputs and the band slacks.

Linearisation points (``linearisation``):

- ``"trajectory"`` (default): along the previous plan, shifted by the cycles that have
  passed and simulated on the nonlinear model from the current state, so stage ``k``
  has its own ``A_k, B_k, C_k, D_k`` (a linear time-varying model).  With
  ``sqp_iterations > 1`` the QP is re-linearised along its own solution until the plan
  moves by less than ``sqp_tol`` (an SQP method without globalisation).
- ``"point"``: every stage around the current state and the applied input, each with
  its own disturbance forecast ``d_k``.

In both cases ``x_{k+1} = A_k x_k + B_k u_k + e_k`` with the affine term
``e_k = F(xb_k, ub_k, d_k) - A_k xb_k - B_k ub_k`` carrying the forecast, and
``y_k = C_k x_k + D_k u_k + f_k`` likewise (``y_N`` uses the last input).

Cost, as the ``nmpc`` kind's: output prices per unit-hour, quadratic output tracking,
move weights, and band slack ``S_k >= 0`` penalised by ``comfort_weight * S^2 +
comfort_weight_l1 * S`` (soft bands: ``low <= y + S``, ``y - S <= high``, tightened by
``band_tightening_k``).  Tracking terms are squared linearised outputs (Gauss-Newton);
the prices add the exact Hessian of the priced outputs in ``(x, u)`` at the stages
where it is convex, only their slope elsewhere.  Input bounds and rate limits are
hard.  A small ``regularisation`` on every move and slack keeps the Hessian positive
definite.

The plan returned is the QP's; its predicted states and outputs are the nonlinear
model's simulation of it, and ``cost`` the objective evaluated on that simulation.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Literal

import casadi as ca
import numpy as np
from pydantic import Field, model_validator

from parallelcity.decide.control import (
    ControlInput,
    ControlProblem,
    ControlResult,
    KindOf,
    SolveStatus,
    guarded_step,
    input_problem,
    require_fit,
)
from parallelcity.twin.model import Array

from .linear_mpc import DenseQp, QpSolution, condense_ltv
from .objective import Objective, Tracking

log = logging.getLogger(__name__)

# Relative to each input's scale (the larger of 1 and its bounds' magnitudes): a QP
# solver's feasibility tolerance is relative, so a 90 s cycle bound misses by more than
# a 0..1 split does.
CLIP_TOLERANCE = 1e-6  # a plan this far outside [u_min, u_max] is put back on the bound
LIMIT_TOLERANCE = 1e-6  # one breaking a bound or rate limit by more is reported FAILED


class Config(Objective):
    """``[controller]`` table for ``kind = "linear_mpc"``."""

    kind: str = "linear_mpc"
    linearisation: Literal["trajectory", "point"] = Field(
        "trajectory",
        description="trajectory: along the shifted previous plan (LTV); point: around the "
        "current state and applied input",
    )
    sqp_iterations: int = Field(
        1, ge=1, le=50, description="QPs per step, each re-linearised along the last plan"
    )
    sqp_tol: float = Field(
        1e-3, gt=0, allow_inf_nan=False, description="stop re-linearising when no input moves more"
    )
    solver: Literal["daqp", "qpoases", "osqp"] = Field("daqp", description="the QP solver")
    warm_start: bool = Field(True, description="start from the previous solution, shifted")
    shortcut: bool = Field(
        True, description="skip the QP solver when the unconstrained minimiser is feasible"
    )
    regularisation: float = Field(
        1e-6, gt=0, allow_inf_nan=False, description="weight on every squared move and slack"
    )
    rk4_substeps: int = Field(4, ge=1, le=100, description="RK4 substeps per cycle")

    @model_validator(mode="after")
    def _rounds_need_a_trajectory(self) -> Config:
        if self.sqp_iterations > 1 and self.linearisation != "trajectory":
            raise ValueError(
                "sqp_iterations > 1 re-linearises along the plan: it needs "
                'linearisation = "trajectory"'
            )
        return self

    def problems(self, problem: ControlProblem) -> list[str]:
        """What in this table does not fit the problem (checked by ``validate``)."""
        return self.objective_problems(problem.model)


class LinearMpcController:
    """See the module docstring."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._problem: ControlProblem | None = None
        self._last: dict[str, Any] | None = None
        self._s_per_qp = 0.0  # measured wall time of one linearise + QP (EWMA)

    # ------------------------------------------------------------------ setup

    def setup(self, problem: ControlProblem) -> None:
        """Check the configuration against the model; build the linearisation and the QP."""
        m, cfg = problem.model, self.config
        require_fit("linear_mpc", cfg.problems(problem))
        n = problem.horizon
        if n < 1:
            raise ValueError(f"linear_mpc: horizon must be at least 1, got {n}")
        if not (math.isfinite(problem.dt) and problem.dt > 0):
            raise ValueError(f"linear_mpc: the cycle time must be > 0, got {problem.dt}")
        u_min = np.asarray(problem.u_min, dtype=float)
        u_max = np.asarray(problem.u_max, dtype=float)
        du_max = np.asarray(problem.du_max, dtype=float)
        if any(a.shape != (m.nu,) for a in (u_min, u_max, du_max)):
            raise ValueError(f"linear_mpc: u_min, u_max and du_max must have {m.nu} entries")
        if np.any(u_min > u_max):
            raise ValueError("linear_mpc: an input's minimum is above its maximum")
        for j in problem.banded_outputs:
            if not 0 <= j < m.ny:
                raise ValueError(f"linear_mpc: banded output {j} is not an output of {m.name!r}")

        self._problem = problem
        self._u_min, self._u_max, self._du_max = u_min, u_max, du_max
        bounds = np.abs(np.stack([u_min, u_max]))
        self._scale = np.maximum(1.0, np.where(np.isfinite(bounds), bounds, 0.0).max(axis=0))
        self._rated = np.flatnonzero(np.isfinite(du_max))
        self._banded = np.asarray(problem.banded_outputs, dtype=np.intp)
        nb, nu, nr = self._banded.size, m.nu, self._rated.size
        self._dims = (n, m.nx, nu, m.nd, m.ny, nb)
        self._p = np.asarray(problem.p, dtype=float)
        self._price = np.zeros(m.ny)
        for name, c in cfg.output_costs.items():
            self._price[m.index("outputs", name)] = c * problem.dt / 3600.0
        self._move_w = np.zeros(nu)
        for name, w in cfg.move_weights.items():
            self._move_w[m.index("inputs", name)] = w
        self._track_w = np.zeros((n + 1, m.ny))
        self._track_t = np.zeros(m.ny)
        for name, t in cfg.tracking.items():
            j = m.index("outputs", name)
            self._track_w[:n, j], self._track_w[n, j] = t.weight, t.terminal_weight
            self._track_t[j] = t.target

        # F, its Jacobians, h and its Jacobians at one point, mapped over the N + 1 stages
        x = ca.SX.sym("x", m.nx)
        u = ca.SX.sym("u", nu)
        d = ca.SX.sym("d", m.nd)
        p = ca.DM(self._p)
        xn = m.step_function(problem.dt, cfg.rk4_substeps)(x, u, d, p)
        y = m.h(x, u, d, p)
        self._lin = ca.Function(
            "linearise",
            [x, u, d],
            [xn, ca.jacobian(xn, x), ca.jacobian(xn, u), y, ca.jacobian(y, x), ca.jacobian(y, u)],
            ["x", "u", "d"],
            ["F", "A", "B", "y", "C", "D"],
        )
        self._lin_map = self._lin.map(n + 1)
        # the curvature of the priced outputs in (x, u) (a fuel use that is a product of
        # flow and temperature): a QP with prices on linearised outputs alone is an LP in
        # those directions and its plans jump from bound to bound between cycles
        z = ca.vertcat(x, u)
        priced = ca.dot(ca.DM(self._price), y)
        hess = ca.hessian(priced, z)[0]
        self._price_hess: ca.Function | None = None
        if hess.nnz() and np.any(self._price):
            self._price_hess = ca.Function("price_hess", [x, u, d], [hess]).map(n)
        self._sim = m.step_function(problem.dt, cfg.rk4_substeps).mapaccum(n)
        self._out = m.h.map(n + 1)

        # fixed parts of the QP: v = [U (N nu); S ((N + 1) nb)]
        nU, nS = n * nu, (n + 1) * nb
        self._nU, self._nS = nU, nS
        w_move = np.tile(self._move_w + cfg.regularisation, n)
        Dm = np.eye(nU) - np.eye(nU, k=-nu)  # U_k - U_{k-1}; U_{-1} enters the gradient
        self._H_move = 2.0 * Dm.T @ (w_move[:, None] * Dm)
        self._H_slack = 2.0 * (cfg.comfort_weight + cfg.regularisation) * np.eye(nS)
        # rows: band low (N+1) nb, band high (N+1) nb, rate N nr
        na = 2 * nS + n * nr
        A_fixed = np.zeros((na, nU + nS))
        A_fixed[:nS, nU:] = np.eye(nS)
        A_fixed[nS : 2 * nS, nU:] = -np.eye(nS)
        for k in range(n):
            for r, i in enumerate(self._rated):
                row = 2 * nS + k * nr + r
                A_fixed[row, k * nu + i] = 1.0
                if k:
                    A_fixed[row, (k - 1) * nu + i] = -1.0
        self._A_fixed = A_fixed
        self._lbx = np.concatenate([np.tile(u_min, n), np.zeros(nS)])
        self._ubx = np.concatenate([np.tile(u_max, n), np.full(nS, np.inf)])
        self._qp = DenseQp(nU + nS, na, cfg.solver, shortcut=cfg.shortcut)
        self._last = None
        self._s_per_qp = 0.0

    # ---------------------------------------------------------------- helpers

    def linearise(self, x: Array, u: Array, d: Array) -> dict[str, Array]:
        """``F(x, u, d)`` (the RK4 step over one cycle), ``A = dF/dx``, ``B = dF/du``,
        ``y = h(x, u, d)``, ``C = dh/dx``, ``D = dh/du`` at one point, with the planning
        parameters."""
        if self._problem is None:
            raise RuntimeError("linear_mpc: linearise called before setup")
        out = self._lin(x, u, d)
        names = ("F", "A", "B", "y", "C", "D")
        res = {k: np.asarray(v, dtype=float) for k, v in zip(names, out, strict=True)}
        res["F"], res["y"] = res["F"].ravel(), res["y"].ravel()
        return res

    def _tightened(self, y_low: Array, y_high: Array) -> tuple[Array, Array]:
        t = self.config.band_tightening_k
        lo, hi = y_low + t, y_high - t
        crossed = lo > hi  # narrower than twice the tightening: aim at the middle
        if np.any(crossed):
            mid = 0.5 * (y_low + y_high)
            lo, hi = np.where(crossed, mid, lo), np.where(crossed, mid, hi)
        return lo, hi

    def _simulate(self, x0: Array, plan: Array, dist: Array) -> tuple[Array, Array]:
        n = plan.shape[0]
        xs = np.empty((n + 1, x0.shape[0]))
        xs[0] = x0
        xs[1:] = np.asarray(self._sim(x0, plan.T, dist.T, self._p)).T
        u_ext = np.vstack([plan, plan[-1:]])
        d_ext = np.vstack([dist, dist[-1:]])
        ys = np.asarray(self._out(xs.T, u_ext.T, d_ext.T, self._p)).T
        return xs, ys

    def _objective(
        self, plan: Array, ys: Array, v0: Array, first_w: Array, lo: Array, hi: Array
    ) -> float:
        """The configured cost of ``plan`` with outputs ``ys`` (slack: the band excess)."""
        n = plan.shape[0]
        cost = float(np.sum(ys[:n] @ self._price))
        cost += float(np.sum(self._track_w * (ys - self._track_t) ** 2))
        moves = np.diff(np.vstack([v0[None, :], plan]), axis=0)
        w = np.tile(self._move_w, (n, 1))
        w[0] = first_w
        cost += float(np.sum(w * moves**2))
        if self._banded.size:
            yb = ys[:, self._banded]
            with np.errstate(invalid="ignore"):
                s = np.maximum(0.0, np.maximum(lo - yb, yb - hi))
            s = np.where(np.isfinite(s), s, 0.0)
            cost += float(
                self.config.comfort_weight * np.sum(s**2)
                + self.config.comfort_weight_l1 * np.sum(s)
            )
        return cost

    def _failed(
        self, status: SolveStatus, why: str, t_start: float, iterations: int = 0, ret: str = ""
    ) -> ControlResult:
        assert self._problem is not None
        return ControlResult.failure(
            status,
            self._problem,
            f"linear_mpc: {why}",
            time.perf_counter() - t_start,
            iterations=iterations,
            extra={"return_status": ret} if ret else None,
        )

    def _reference_plan(self, t0: float, u_ref0: Array) -> tuple[Array, bool]:
        """The inputs to linearise along: the previous plan moved on, else ``u_ref0`` held."""
        n = self._dims[0]
        last, problem = self._last, self._problem
        assert problem is not None
        if (
            self.config.linearisation == "trajectory"
            and self.config.warm_start
            and last is not None
        ):
            shift = round((t0 - last["t0"]) / float(problem.dt))
            if 0 <= shift < n:
                U = last["plan"]
                ref = np.vstack([U[shift:], np.repeat(U[-1:], shift, axis=0)])
                return np.clip(ref, self._u_min, self._u_max), True
        return np.repeat(u_ref0[None, :], n, axis=0), False

    # ------------------------------------------------------------------- step

    def step(self, inp: ControlInput) -> ControlResult:
        """Plan from ``inp``; every kind of trouble comes back as a status, never raised."""
        return guarded_step("linear_mpc", self._problem, inp, self._step, self._forget)

    def _forget(self) -> None:
        self._last = None

    def _step(self, problem: ControlProblem, inp: ControlInput, t_start: float) -> ControlResult:
        cfg = self.config
        n, _, nu, _, ny, nb = self._dims
        assert self._problem is not None
        bad = input_problem(self._problem, inp)
        if bad:
            return self._failed(SolveStatus.FAILED, f"bad input: {bad}", t_start)
        deadline = float(inp.deadline_s)
        if deadline <= 0:
            return self._failed(SolveStatus.TIMEOUT, "no time to solve", t_start)
        x0 = np.asarray(inp.x0, dtype=float)
        u_prev = np.asarray(inp.u_prev, dtype=float)
        known = np.isfinite(u_prev)
        u_ref0 = np.clip(
            np.where(known, u_prev, 0.5 * (self._u_min + self._u_max)), self._u_min, self._u_max
        )
        v0 = np.where(known, u_prev, u_ref0)  # U_{-1}: moves from it are costed where known
        first_w = np.where(known, self._move_w, 0.0)
        dist = np.asarray(inp.disturbances, dtype=float)[:n]
        d_ext = np.vstack([dist, dist[-1:]])
        lo = hi = np.zeros((n + 1, 0))
        if nb:
            lo, hi = self._tightened(
                np.asarray(inp.y_low, dtype=float)[: n + 1],
                np.asarray(inp.y_high, dtype=float)[: n + 1],
            )
            if not cfg.band_at_end:
                lo[n], hi[n] = -np.inf, np.inf

        # the bounds that do not depend on the linearisation
        nr = self._rated.size
        rate_lo = np.tile(-self._du_max[self._rated], n)
        rate_hi = np.tile(self._du_max[self._rated], n)
        if nr:
            first = known[self._rated]
            up = u_prev[self._rated]
            rate_lo[:nr] = np.where(first, up + rate_lo[:nr], -np.inf)
            rate_hi[:nr] = np.where(first, up + rate_hi[:nr], np.inf)
        # the first move's weight: only the regularisation where u_prev is unknown
        w0 = first_w + cfg.regularisation
        g_move = np.zeros(self._nU)
        g_move[:nu] = -2.0 * w0 * v0
        H_move = self._H_move.copy()
        H_move[range(nu), range(nu)] -= 2.0 * (self._move_w - first_w)

        ref, shifted = self._reference_plan(float(inp.t0), u_ref0)
        guess: tuple[Array, Array, Array] | None = None
        if cfg.warm_start and shifted and self._last is not None:
            guess = self._last["guess"]
        total_iter, used, qp_solver, ret = 0, 0, "none", ""
        plan: Array | None = None
        sol: QpSolution | None = None
        rounds = cfg.sqp_iterations if cfg.linearisation == "trajectory" else 1
        converged = False
        for it in range(rounds):
            left = deadline - (time.perf_counter() - t_start)
            if it and left < 1.5 * self._s_per_qp:
                break  # keep the plan of the last QP: no time for another round
            if left <= 0 or (math.isfinite(deadline) and left < self._s_per_qp):
                return self._failed(
                    SolveStatus.TIMEOUT,
                    f"{left * 1e3:.3g} ms left, a linearise + QP takes {self._s_per_qp * 1e3:.3g}",
                    t_start,
                    total_iter,
                )
            t_round = time.perf_counter()
            if cfg.linearisation == "trajectory":
                xb, _ = self._simulate(x0, ref, dist)
            else:
                xb = np.repeat(x0[None, :], n + 1, axis=0)
            ub = np.vstack([ref, ref[-1:]])
            M, y_off, X_off, G3 = self._condense(x0, xb, ub, d_ext)
            H, g, A, lba, uba = self._qp_data(M, y_off, H_move, g_move, lo, hi, rate_lo, rate_hi)
            if self._price_hess is not None:
                self._add_price_curvature(H, g, X_off, G3, xb, ub, dist)
            sol = self._qp.solve(H, g, A, lba, uba, self._lbx, self._ubx, guess)
            elapsed = time.perf_counter() - t_round
            self._s_per_qp = elapsed if not self._s_per_qp else 0.7 * self._s_per_qp + 0.3 * elapsed
            total_iter += sol.iterations
            used, qp_solver, ret = it + 1, sol.solver, sol.return_status
            if not sol.status.usable:
                self._last = None
                why = f"{cfg.solver}: {sol.return_status}"
                if sol.status is SolveStatus.INFEASIBLE:
                    why += " (input bounds and rate limits cannot both hold)"
                return self._failed(sol.status, why, t_start, total_iter, ret)
            new = sol.v[: self._nU].reshape(n, nu)
            change = float(np.max(np.abs(new - ref)))
            plan = new
            lin_y = y_off + np.einsum("kyv,v->ky", M, sol.v[: self._nU])
            lin_x = X_off[1:] + np.einsum("kxv,v->kx", G3[1:], sol.v[: self._nU])
            guess = (sol.v, sol.lam_x, sol.lam_a)
            if change < cfg.sqp_tol:
                converged = True
                break
            ref = np.clip(plan, self._u_min, self._u_max)
        assert plan is not None and sol is not None and guess is not None

        raw = plan
        plan = np.clip(raw, self._u_min, self._u_max)
        plan = np.where(np.abs(plan - raw) <= CLIP_TOLERANCE * self._scale, plan, raw)
        trouble = self._check_plan(plan, u_prev, known)
        if trouble:
            self._last = None
            return self._failed(
                SolveStatus.FAILED, f"{qp_solver} {ret} but the plan {trouble}", t_start, total_iter
            )
        xs, ys = self._simulate(x0, plan, dist)
        lin_err = float(
            max(np.max(np.abs(lin_x - xs[1:])), np.max(np.abs(lin_y - ys)) if ny else 0.0)
        )
        if time.perf_counter() - t_start > deadline:
            return self._failed(
                SolveStatus.TIMEOUT, "solved after the deadline", t_start, total_iter
            )
        self._last = {"t0": float(inp.t0), "plan": plan, "guess": self._shifted_guess(guess)}
        status = sol.status
        if rounds > 1 and not converged:  # re-linearising was asked for and did not settle
            status = SolveStatus.ACCEPTABLE
        return ControlResult(
            status=status,
            u_plan=plan,
            x_pred=xs,
            y_pred=ys,
            cost=self._objective(plan, ys, v0, first_w, lo, hi),
            iterations=total_iter,
            solve_time_s=time.perf_counter() - t_start,
            message=""
            if status is SolveStatus.SOLVED
            else f"linear_mpc: the plan still moved after {used} QP round(s)",
            extra={
                "return_status": ret,
                "qp_solver": qp_solver,
                "qp_cost": sol.cost,
                "linearisation": cfg.linearisation,
                "qp_rounds": used,
                "sqp_converged": converged,
                "linearisation_error": lin_err,
                "warm_start": shifted,
            },
        )

    def _condense(
        self, x0: Array, xb: Array, ub: Array, d_ext: Array
    ) -> tuple[Array, Array, Array, Array]:
        """Outputs ``Y_k = y_off_k + M_k U`` and states ``X_k = X_off_k + G3_k U`` of the
        model linearised at ``(xb_k, ub_k, d_k)``, k = 0..N."""
        n, nx, nu, _, ny, _ = self._dims
        F, A, B, Y, C, D = (np.asarray(v, dtype=float) for v in self._lin_map(xb.T, ub.T, d_ext.T))
        As = A.reshape(nx, n + 1, nx).transpose(1, 0, 2)
        Bs = B.reshape(nx, n + 1, nu).transpose(1, 0, 2)
        Cs = C.reshape(ny, n + 1, nx).transpose(1, 0, 2)
        Ds = D.reshape(ny, n + 1, nu).transpose(1, 0, 2)
        Fb, Yb = F.T, Y.T  # (n + 1, nx), (n + 1, ny)
        # affine terms: x_{k+1} = A_k x_k + B_k u_k + e_k, y_k = C_k x_k + D_k u_k + f_k
        e = (
            Fb[:n]
            - np.einsum("kij,kj->ki", As[:n], xb[:n])
            - np.einsum("kij,kj->ki", Bs[:n], ub[:n])
        )
        f = Yb - np.einsum("kij,kj->ki", Cs, xb) - np.einsum("kij,kj->ki", Ds, ub)
        X_off = np.empty((n + 1, nx))  # the state with U = 0
        X_off[0] = x0
        for k in range(n):
            X_off[k + 1] = As[k] @ X_off[k] + e[k]
        Gamma = condense_ltv(As[:n], Bs[:n])
        G3 = np.concatenate([np.zeros((1, nx, n * nu)), Gamma.reshape(n, nx, n * nu)])
        M = np.einsum("kyx,kxv->kyv", Cs, G3)
        for k in range(n + 1):
            j = min(k, n - 1)
            M[k, :, j * nu : (j + 1) * nu] += Ds[k]
        y_off = np.einsum("kyx,kx->ky", Cs, X_off) + f
        return M, y_off, X_off, G3

    def _add_price_curvature(
        self, H: Array, g: Array, X_off: Array, G3: Array, xb: Array, ub: Array, dist: Array
    ) -> None:
        """Add the second-order term of the output prices at the stages k < N where it is
        convex, so the QP stays convex."""
        assert self._price_hess is not None
        n, nx, nu, _, _, _ = self._dims
        nU, nz = self._nU, nx + nu
        Hs = np.asarray(self._price_hess(xb[:n].T, ub[:n].T, dist.T), dtype=float)
        Hs = Hs.reshape(nz, n, nz).transpose(1, 0, 2)
        Hs = 0.5 * (Hs + Hs.transpose(0, 2, 1))
        w = np.linalg.eigvalsh(Hs)
        # a stage whose Hessian is indefinite (a bilinear product) keeps only the linear
        # term: clipping its negative eigenvalues would add curvature the cost does not
        # have, and damps the plan in a direction the price does not care about
        convex = w.min(axis=1) >= -1e-9 * np.maximum(1.0, np.abs(w).max(axis=1))
        if not convex.any():
            return
        Hs = Hs * convex[:, None, None]
        # z_k = (x_k, u_k) = z_off_k + T_k U, and the term is 1/2 (z_k - zb_k)' H_k (...)
        T = np.zeros((n, nz, nU))
        T[:, :nx, :] = G3[:n]
        for k in range(n):
            T[k, nx + np.arange(nu), k * nu + np.arange(nu)] = 1.0
        r = np.concatenate([X_off[:n] - xb[:n], -ub[:n]], axis=1)
        HT = np.einsum("kab,kbv->kav", Hs, T)
        H[:nU, :nU] += np.einsum("kav,kaw->vw", T, HT)
        g[:nU] += np.einsum("kav,ka->v", HT, r)

    def _qp_data(
        self,
        M: Array,
        y_off: Array,
        H_move: Array,
        g_move: Array,
        lo: Array,
        hi: Array,
        rate_lo: Array,
        rate_hi: Array,
    ) -> tuple[Array, Array, Array, Array, Array]:
        nU, nS = self._nU, self._nS
        n = self._dims[0]
        nv = nU + nS
        H = np.zeros((nv, nv))
        g = np.zeros(nv)
        H[:nU, :nU] = H_move
        H[nU:, nU:] = self._H_slack
        g[:nU] = g_move
        # prices on y_k, k < N
        g[:nU] += np.einsum("kyv,y->v", M[:n], self._price)
        tw = self._track_w
        if np.any(tw):
            Mw = M * tw[:, :, None]
            H[:nU, :nU] += 2.0 * np.einsum("kyv,kyw->vw", Mw, M)
            g[:nU] += 2.0 * np.einsum("kyv,ky->v", Mw, y_off - self._track_t)
        g[nU:] = self.config.comfort_weight_l1
        A = self._A_fixed.copy()
        lba = np.empty(A.shape[0])
        uba = np.empty(A.shape[0])
        if nS:
            Mb = M[:, self._banded, :].reshape(nS, nU)
            yb = y_off[:, self._banded].ravel()
            A[:nS, :nU] = Mb
            A[nS : 2 * nS, :nU] = Mb
            lba[:nS], uba[:nS] = lo.ravel() - yb, np.inf
            lba[nS : 2 * nS], uba[nS : 2 * nS] = -np.inf, hi.ravel() - yb
        lba[2 * nS :], uba[2 * nS :] = rate_lo, rate_hi
        return 0.5 * (H + H.T), g, A, lba, uba

    def _shifted_guess(self, guess: tuple[Array, Array, Array]) -> tuple[Array, Array, Array]:
        """The solution moved on by one cycle, for the next QP's warm start."""
        _, _, nu, _, _, nb = self._dims
        v, lam_x, lam_a = guess
        nU = self._nU

        def shift_v(a: Array) -> Array:
            U, S = a[:nU], a[nU:]
            U = np.concatenate([U[nu:], U[-nu:]])
            S = np.concatenate([S[nb:], S[-nb:]]) if nb else S
            return np.concatenate([U, S])

        return shift_v(v), shift_v(lam_x), lam_a

    def _check_plan(self, plan: Array, u_prev: Array, known: Array) -> str:
        """Why the plan breaks a limit by more than LIMIT_TOLERANCE ("" if it does not)."""
        if not np.all(np.isfinite(plan)):
            return "has non-finite inputs"
        outside = np.maximum(self._u_min - plan, plan - self._u_max) / self._scale
        worst = float(outside.max())
        if worst > LIMIT_TOLERANCE:
            return f"breaks an input bound by {worst:.3g}"
        r = self._rated
        if r.size:
            prev = np.vstack([np.where(known, u_prev, plan[0])[None, :], plan[:-1]])
            over = (np.abs(plan - prev)[:, r] - self._du_max[r]) / self._scale[r]
            worst = float(over.max())
            if worst > LIMIT_TOLERANCE:
                return f"breaks a rate limit by {worst:.3g}"
        return ""


KIND = KindOf(Config, LinearMpcController)

__all__ = ["KIND", "Config", "LinearMpcController", "Tracking"]
