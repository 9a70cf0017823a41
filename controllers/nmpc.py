"""Nonlinear MPC: multiple shooting on the model's RK4 step, solved by IPOPT.

Decision variables over a horizon of ``N`` sample periods:

* ``X`` (nx, N+1) shooting states, ``X_0 = x0`` and ``X_{k+1} = F(X_k, U_k, D_k, p)``;
* ``U`` (nu, N) inputs within ``[u_min, u_max]``, moving at most ``du_max`` per step
  (``U_{-1}`` is the input currently applied in the field);
* ``S`` (nb, N+1) >= 0 slack on every banded output, so comfort is soft and a state
  already outside its band never makes the problem infeasible.

Cost per step ``k < N``: the price of each costed output over the period
(``price * y_k * dt / 3600``, ``y_k = h(X_k, U_k, D_k)``) plus the move weight times
``(U_k - U_{k-1})^2``; plus ``comfort_weight * sum(S^2)``.  Bands, tightened by
``band_tightening_k``, hold at ``k = 0..N`` (``k = N`` reuses the last input).

The NLP is built once in ``setup``; each ``step`` only changes its parameters
(state, applied input, disturbance forecast) and constraint bounds (bands), and
warm-starts from the previous solution, primal and dual, shifted by the cycles
that have passed.  IPOPT's wall-time limit is an option fixed when a solver is
built, so a (cheap, derivative-sharing) solver is kept per rounded deadline.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from typing import Any

import casadi as ca
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from parallelcity.control import ControlInput, ControlProblem, ControlResult, SolveStatus
from parallelcity.model import Array

# A plan this far outside [u_min, u_max] is put back on the bound silently ...
CLIP_TOLERANCE = 1e-9
# ... and one breaking a bound or rate limit by more than this is reported FAILED.
LIMIT_TOLERANCE = 1e-6

_STATUS = {
    "Solve_Succeeded": SolveStatus.SOLVED,
    "Solved_To_Acceptable_Level": SolveStatus.ACCEPTABLE,
    "Infeasible_Problem_Detected": SolveStatus.INFEASIBLE,
    "Maximum_WallTime_Exceeded": SolveStatus.TIMEOUT,
    "Maximum_CpuTime_Exceeded": SolveStatus.TIMEOUT,
}

_IPOPT: dict[str, Any] = {"print_level": 0, "sb": "yes"}
# Warm starts: start IPOPT close to the central path of the shifted solution.  On the
# district-heating scenario this halves the iterations of a primal-only warm start
# (median 6 instead of 15, where a cold start also takes about 15).
_IPOPT_WARM: dict[str, Any] = {
    "warm_start_init_point": "yes",
    "mu_init": 1e-6,
    "warm_start_bound_push": 1e-9,
    "warm_start_slack_bound_push": 1e-9,
    "warm_start_mult_bound_push": 1e-9,
}
# Deadlines are rounded down onto a geometric grid (8 per octave: at most 8 % of the
# time is given away) so slowly varying deadlines share a few cached solvers.
_GRID_PER_OCTAVE = 8
_MAX_TIMED_SOLVERS = 16


class Config(BaseModel):
    """``[controller]`` table for ``kind = "nmpc"``."""

    model_config = ConfigDict(extra="forbid")
    kind: str = "nmpc"
    output_costs: dict[str, float] = Field(
        default_factory=dict,
        description="output name -> price per unit-hour of the output (per kWh for kW)",
    )
    comfort_weight: float = Field(50.0, ge=0, description="cost per K^2 of band slack, per step")
    move_weights: dict[str, float] = Field(
        default_factory=dict,
        description="input name -> cost per squared move per step (inputs not listed: 0)",
    )
    band_tightening_k: float = Field(
        0.0, ge=0, description="plan this far inside each band to absorb model mismatch"
    )
    max_iter: int = Field(300, ge=1, description="IPOPT iteration limit")
    tol: float = Field(1e-6, gt=0, description="IPOPT convergence tolerance")
    warm_start: bool = Field(True, description="start from the previous solution, shifted")


def _wall_bucket(seconds: float) -> float:
    """The largest grid value not above ``seconds``: the solver's max_wall_time."""
    k = math.floor(math.log2(seconds) * _GRID_PER_OCTAVE)
    while 2.0 ** (k / _GRID_PER_OCTAVE) > seconds:
        k -= 1
    return float(2.0 ** (k / _GRID_PER_OCTAVE))


class NmpcController:
    """Economic NMPC with soft comfort bands; see the module docstring."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._problem: ControlProblem | None = None
        self._solvers: OrderedDict[tuple[float | None, bool], ca.Function] = OrderedDict()
        self._nlp: dict[str, ca.SX] = {}
        self._wrapped: dict[str, ca.MX] | None = None
        self._derivatives: dict[str, ca.Function] = {}
        self._shift_cache: dict[int, tuple[Array, Array]] = {}
        self._last: dict[str, Any] | None = None  # previous solution, for the warm start

    # ------------------------------------------------------------------ setup

    def setup(self, problem: ControlProblem) -> None:
        """Check the configuration against the model and build the NLP and its solvers."""
        m, cfg = problem.model, self.config
        unknown_out = sorted(set(cfg.output_costs) - set(m.outputs))
        if unknown_out:
            raise ValueError(
                f"output_costs: unknown output(s) {', '.join(map(repr, unknown_out))} "
                f"of model {m.name!r} (outputs: {', '.join(m.outputs)})"
            )
        unknown_in = sorted(set(cfg.move_weights) - set(m.inputs))
        if unknown_in:
            raise ValueError(
                f"move_weights: unknown input(s) {', '.join(map(repr, unknown_in))} "
                f"of model {m.name!r} (inputs: {', '.join(m.inputs)})"
            )
        for name, w in cfg.move_weights.items():
            if not (math.isfinite(w) and w >= 0):
                raise ValueError(f"move_weights[{name!r}] must be finite and >= 0, got {w}")
        for name, c in cfg.output_costs.items():
            if not math.isfinite(c):
                raise ValueError(f"output_costs[{name!r}] must be finite, got {c}")
        for j in problem.banded_outputs:
            if not 0 <= j < m.ny:
                raise ValueError(f"banded output index {j} is not an output of {m.name!r}")
        u_min = np.asarray(problem.u_min, dtype=float)
        u_max = np.asarray(problem.u_max, dtype=float)
        du_max = np.asarray(problem.du_max, dtype=float)
        if any(a.shape != (m.nu,) for a in (u_min, u_max, du_max)):
            raise ValueError(f"u_min, u_max and du_max must each have {m.nu} entries")
        if problem.horizon < 1:
            raise ValueError(f"horizon must be at least 1, got {problem.horizon}")

        self._problem = problem
        self._u_min, self._u_max, self._du_max = u_min, u_max, du_max
        self._rated = [i for i in range(m.nu) if math.isfinite(du_max[i])]
        self._build(problem)
        self._solvers.clear()
        self._wrapped = None
        self._derivatives = {}
        self._shift_cache = {}
        self._last = None
        # build the untimed solvers now rather than during a cycle
        self._solver(None, warm=False)
        if self.config.warm_start:
            self._solver(None, warm=True)

    def _build(self, problem: ControlProblem) -> None:
        m, cfg = problem.model, self.config
        n, nx, nu, nd = problem.horizon, m.nx, m.nu, m.nd
        banded = list(problem.banded_outputs)
        nb = len(banded)
        p = ca.DM(np.asarray(problem.p, dtype=float))
        dt = float(problem.dt)
        step = m.step_function(dt)

        X = ca.SX.sym("X", nx, n + 1)
        U = ca.SX.sym("U", nu, n)
        S = ca.SX.sym("S", nb, n + 1)
        x0 = ca.SX.sym("x0", nx)
        u_prev = ca.SX.sym("u_prev", nu)
        known = ca.SX.sym("known", nu)  # 1 where u_prev is known (moves from it cost), else 0
        D = ca.SX.sym("D", nd, n)

        price = np.zeros(m.ny)
        for name, c in cfg.output_costs.items():
            price[m.index("outputs", name)] = c
        move_w = np.zeros(nu)
        for name, weight in cfg.move_weights.items():
            move_w[m.index("inputs", name)] = weight

        cost: ca.SX = ca.SX(0)
        g: list[ca.SX] = [X[:, 0] - x0]
        layout: list[tuple[str, int, int]] = [("x0", 0, nx)]  # (block, step, size) of g
        for k in range(n + 1):
            uk, dk = U[:, min(k, n - 1)], D[:, min(k, n - 1)]
            y = m.h(X[:, k], uk, dk, p)
            if k < n:
                g.append(X[:, k + 1] - step(X[:, k], uk, dk, p))
                layout.append(("dyn", k, nx))
                cost += ca.dot(ca.DM(price * dt / 3600.0), y)
                move = uk - (u_prev if k == 0 else U[:, k - 1])
                for i in np.flatnonzero(move_w).tolist():
                    scale = known[i] if k == 0 else ca.SX(1.0)
                    cost += float(move_w[i]) * scale * move[i] ** 2
                if self._rated:
                    g.append(ca.vertcat(*[move[i] for i in self._rated]))
                    layout.append(("rate", k, len(self._rated)))
            if nb:
                yb = ca.vertcat(*[y[j] for j in banded])
                g.append(yb + S[:, k])  # >= tightened low
                layout.append(("band_lo", k, nb))
                g.append(yb - S[:, k])  # <= tightened high
                layout.append(("band_hi", k, nb))
        if nb:
            cost += cfg.comfort_weight * ca.sumsqr(S)

        w = ca.vertcat(ca.vec(X), ca.vec(U), ca.vec(S))  # step-major within each block
        par = ca.vertcat(x0, u_prev, known, ca.vec(D))
        self._nlp = {"x": w, "p": par, "f": cost, "g": ca.vertcat(*g)}
        self._dims = (n, nx, nu, nd, nb)

        # constraint bounds: the fixed parts now, bands and the first move per step
        self._g_slices: dict[tuple[str, int], slice] = {}
        pos = 0
        for block, k, size in layout:
            self._g_slices[(block, k)] = slice(pos, pos + size)
            pos += size
        self._g_blocks = [(b, k, self._g_slices[(b, k)]) for b, k, _ in layout]
        self._lbg = np.zeros(pos)
        self._ubg = np.zeros(pos)
        du = self._du_max[self._rated]
        for k in range(n):
            if self._rated:
                self._lbg[self._g_slices[("rate", k)]] = -du
                self._ubg[self._g_slices[("rate", k)]] = du
        for k in range(n + 1 if nb else 0):
            self._ubg[self._g_slices[("band_lo", k)]] = np.inf
            self._lbg[self._g_slices[("band_hi", k)]] = -np.inf

        iu, is_ = nx * (n + 1), nx * (n + 1) + nu * n
        nw = is_ + nb * (n + 1)
        self._slices = (slice(0, iu), slice(iu, is_), slice(is_, nw))
        self._w_blocks = (
            [("X", k, slice(k * nx, (k + 1) * nx)) for k in range(n + 1)]
            + [("U", k, slice(iu + k * nu, iu + (k + 1) * nu)) for k in range(n)]
            + [("S", k, slice(is_ + k * nb, is_ + (k + 1) * nb)) for k in range(n + 1)]
        )
        self._lbx = np.full(nw, -np.inf)
        self._ubx = np.full(nw, np.inf)
        self._lbx[iu:is_] = np.tile(self._u_min, n)
        self._ubx[iu:is_] = np.tile(self._u_max, n)
        self._lbx[is_:] = 0.0

        # plain simulation of a plan: the cold-start guess and the returned prediction
        self._sim = step.mapaccum(n)
        self._out = m.h.map(n + 1)
        self._p = np.asarray(problem.p, dtype=float)

    def _solver(self, wall_s: float | None, warm: bool) -> ca.Function:
        """The IPOPT solver for a wall-time limit (None: none) and start, built on first use.

        The first solver is built from the SX problem, which derives the gradient,
        Jacobian and Hessian of the Lagrangian (about 0.25 s).  The others reuse those
        functions and reach the problem through a thin MX wrapper, so they build in
        about a millisecond.
        """
        key = (wall_s, warm)
        if key in self._solvers:
            self._solvers.move_to_end(key)
            return self._solvers[key]
        ipopt: dict[str, Any] = {
            **_IPOPT,
            "max_iter": self.config.max_iter,
            "tol": self.config.tol,
            **(_IPOPT_WARM if warm else {}),
        }
        if wall_s is not None:
            ipopt["max_wall_time"] = wall_s
        opts: dict[str, Any] = {"print_time": False, "error_on_fail": False, "ipopt": ipopt}
        if not self._derivatives:
            solver = ca.nlpsol("nmpc", "ipopt", self._nlp, opts)
            try:
                self._derivatives = {
                    "grad_f": solver.get_function("nlp_grad_f"),
                    "jac_g": solver.get_function("nlp_jac_g"),
                    "hess_lag": solver.get_function("nlp_hess_l"),
                }
            except RuntimeError:  # a CasADi that names them otherwise: build each from SX
                self._derivatives = {}
        else:
            if self._wrapped is None:
                nlp = ca.Function(
                    "nmpc_nlp",
                    [self._nlp["x"], self._nlp["p"]],
                    [self._nlp["f"], self._nlp["g"]],
                    ["x", "p"],
                    ["f", "g"],
                )
                xm = ca.MX.sym("x", nlp.size1_in(0))
                pm = ca.MX.sym("p", nlp.size1_in(1))
                fm, gm = nlp(xm, pm)
                self._wrapped = {"x": xm, "p": pm, "f": fm, "g": gm}
            solver = ca.nlpsol("nmpc", "ipopt", self._wrapped, {**opts, **self._derivatives})
        self._solvers[key] = solver
        timed = [k for k in self._solvers if k[0] is not None]
        if len(timed) > _MAX_TIMED_SOLVERS:
            del self._solvers[timed[0]]  # least recently used
        return solver

    # ------------------------------------------------------------------- step

    def step(self, inp: ControlInput) -> ControlResult:
        """Plan from ``inp``; every kind of trouble comes back as a status, never raised."""
        t_start = time.perf_counter()
        problem = self._problem
        if problem is None:
            raise RuntimeError("NmpcController.step called before setup")
        try:
            return self._step(problem, inp, t_start)
        except Exception as exc:  # a controller reports trouble, it does not raise it
            self._last = None
            return ControlResult.failure(
                SolveStatus.FAILED,
                problem,
                f"nmpc: {type(exc).__name__}: {exc}",
                time.perf_counter() - t_start,
            )

    def _bad_input(self, inp: ControlInput) -> str:
        n, nx, nu, nd, nb = self._dims
        x0 = np.asarray(inp.x0, dtype=float)
        dist = np.asarray(inp.disturbances, dtype=float)
        if x0.shape != (nx,) or not np.all(np.isfinite(x0)):
            return f"x0 must be {nx} finite values"
        if np.shape(inp.u_prev) != (nu,):
            return f"u_prev must have {nu} entries, got shape {np.shape(inp.u_prev)}"
        if dist.ndim != 2 or dist.shape[0] < n or dist.shape[1] != nd:
            return f"disturbances must be ({n}, {nd}), got {dist.shape}"
        if not np.all(np.isfinite(dist[:n])):
            return "the disturbance forecast has non-finite values"
        for what, band in (("y_low", inp.y_low), ("y_high", inp.y_high)):
            shape = np.shape(band)
            if nb and (len(shape) != 2 or shape[0] < n + 1 or shape[1] != nb):
                return f"{what} must be ({n + 1}, {nb}), got {shape}"
            if nb and np.any(np.isnan(np.asarray(band, dtype=float)[: n + 1])):
                return f"{what} has NaN entries"
        return ""

    def _step(self, problem: ControlProblem, inp: ControlInput, t_start: float) -> ControlResult:
        n, _, nu, _, nb = self._dims
        bad = self._bad_input(inp)
        if bad:
            return ControlResult.failure(
                SolveStatus.FAILED,
                problem,
                f"nmpc: bad input: {bad}",
                time.perf_counter() - t_start,
            )
        deadline = float(inp.deadline_s)
        if deadline <= 0:
            return ControlResult.failure(SolveStatus.TIMEOUT, problem, "nmpc: no time to solve")
        x0 = np.asarray(inp.x0, dtype=float)
        u_prev = np.asarray(inp.u_prev, dtype=float)
        known = np.isfinite(u_prev)
        dist = np.asarray(inp.disturbances, dtype=float)[:n]
        par = np.concatenate([x0, np.where(known, u_prev, 0.0), known.astype(float), dist.ravel()])

        lbg, ubg = self._lbg.copy(), self._ubg.copy()
        if self._rated:  # no rate limit on the first move from an unknown input
            first = self._g_slices[("rate", 0)]
            free = ~known[self._rated]
            lbg[first] = np.where(free, -np.inf, lbg[first])
            ubg[first] = np.where(free, np.inf, ubg[first])
        if nb:
            lo, hi = self._tightened(
                np.asarray(inp.y_low, dtype=float)[: n + 1],
                np.asarray(inp.y_high, dtype=float)[: n + 1],
            )
            for k in range(n + 1):
                lbg[self._g_slices[("band_lo", k)]] = lo[k]
                ubg[self._g_slices[("band_hi", k)]] = hi[k]
        bounds = {"p": par, "lbx": self._lbx, "ubx": self._ubx, "lbg": lbg, "ubg": ubg}

        warm_guess = self._warm_start(inp, x0) if self.config.warm_start else None
        kinds = ["warm", "cold"] if warm_guess is not None else ["cold"]
        total_iter = 0
        failure: ControlResult | None = None  # of a warm start, retried from cold
        for kind in kinds:
            wall: float | None = None
            if math.isfinite(deadline):
                left = deadline - (time.perf_counter() - t_start)
                if left <= 0:
                    if failure is not None:
                        return failure
                    return self._failed(
                        SolveStatus.TIMEOUT, "deadline passed before solving", total_iter, t_start
                    )
                wall = _wall_bucket(left)
            if kind == "warm":
                assert warm_guess is not None
                guess = warm_guess
            else:
                guess = self._cold_start(x0, u_prev, known, dist, lbg, ubg)
            solver = self._solver(wall, warm=kind == "warm")
            sol = solver(**bounds, **guess)
            stats = solver.stats()
            ret = str(stats.get("return_status", "unknown"))
            total_iter += int(stats.get("iter_count", 0))
            status = _STATUS.get(ret, SolveStatus.FAILED)
            plan = np.asarray(sol["x"], dtype=float).ravel()[self._slices[1]].reshape(n, nu)
            trouble = self._check_plan(plan, u_prev, known) if status.usable else ""
            if not status.usable or trouble:
                why = f"IPOPT {ret} but the plan {trouble}" if trouble else f"IPOPT {ret}"
                failure = self._failed(
                    SolveStatus.FAILED if trouble else status, why, total_iter, t_start, ret
                )
                if status is SolveStatus.TIMEOUT:
                    return failure
                continue  # after a warm start that went wrong: try again from cold
            plan = self._clip_tiny(plan)
            xs, ys = self._predict(x0, plan, dist)
            self._last = {
                "t0": float(inp.t0),
                "w": np.asarray(sol["x"], dtype=float).ravel(),
                "lam_x": np.asarray(sol["lam_x"], dtype=float).ravel(),
                "lam_g": np.asarray(sol["lam_g"], dtype=float).ravel(),
            }
            return ControlResult(
                status=status,
                u_plan=plan,
                x_pred=xs,
                y_pred=ys,
                cost=float(sol["f"]),
                iterations=total_iter,
                solve_time_s=time.perf_counter() - t_start,
                message="" if status is SolveStatus.SOLVED else f"nmpc: IPOPT {ret}",
                extra={
                    "return_status": ret,
                    "warm_start": kind == "warm",
                    "retried": failure is not None,
                },
            )
        assert failure is not None
        return failure

    # ---------------------------------------------------------------- helpers

    def _failed(
        self, status: SolveStatus, why: str, iterations: int, t_start: float, ret: str = ""
    ) -> ControlResult:
        assert self._problem is not None
        base = ControlResult.failure(status, self._problem, f"nmpc: {why}")
        return ControlResult(
            status=status,
            u_plan=base.u_plan,
            x_pred=base.x_pred,
            y_pred=base.y_pred,
            cost=base.cost,
            iterations=iterations,
            solve_time_s=time.perf_counter() - t_start,
            message=base.message,
            extra={"return_status": ret} if ret else {},
        )

    def _tightened(self, y_low: Array, y_high: Array) -> tuple[Array, Array]:
        t = self.config.band_tightening_k
        lo, hi = y_low + t, y_high - t
        crossed = lo > hi  # a band narrower than twice the tightening: aim at its middle
        if np.any(crossed):
            mid = 0.5 * (y_low + y_high)
            lo = np.where(crossed, mid, lo)
            hi = np.where(crossed, mid, hi)
        return lo, hi

    def _clip_tiny(self, plan: Array) -> Array:
        """Put entries at most CLIP_TOLERANCE outside their bounds back on the bound."""
        clipped = np.clip(plan, self._u_min, self._u_max)
        return np.where(np.abs(clipped - plan) <= CLIP_TOLERANCE, clipped, plan)

    def _check_plan(self, plan: Array, u_prev: Array, known: Array) -> str:
        """Why the raw plan breaks a limit by more than LIMIT_TOLERANCE ("" if it does not)."""
        if not np.all(np.isfinite(plan)):
            return "has non-finite inputs"
        worst = float(max((self._u_min - plan).max(), (plan - self._u_max).max()))
        if worst > LIMIT_TOLERANCE:
            return f"breaks an input bound by {worst:.3g}"
        if self._rated:
            r = self._rated
            clipped = np.clip(plan, self._u_min, self._u_max)
            prev = np.vstack([np.where(known, u_prev, clipped[0])[None, :], clipped[:-1]])
            worst = float((np.abs(clipped - prev)[:, r] - self._du_max[r]).max())
            if worst > LIMIT_TOLERANCE:
                return f"breaks a rate limit by {worst:.3g}"
        return ""

    def _predict(self, x0: Array, plan: Array, dist: Array) -> tuple[Array, Array]:
        """States and outputs along ``plan``; the last output reuses the last input."""
        n = plan.shape[0]
        xs = np.empty((n + 1, x0.shape[0]))
        xs[0] = x0
        xs[1:] = np.asarray(self._sim(x0, plan.T, dist.T, self._p)).T
        u_ext = np.vstack([plan, plan[-1:]])
        d_ext = np.vstack([dist, dist[-1:]])
        ys = np.asarray(self._out(xs.T, u_ext.T, d_ext.T, self._p)).T
        return xs, ys

    def _shift_maps(self, shift: int) -> tuple[Array, Array]:
        """Where each primal and each constraint entry comes from ``shift`` steps on."""
        maps = self._shift_cache.get(shift)
        if maps is None:
            out = []
            for blocks in (self._w_blocks, self._g_blocks):
                last: dict[str, int] = {}
                for name, k, _ in blocks:
                    last[name] = max(last.get(name, k), k)
                src = {(name, k): sl for name, k, sl in blocks}
                idx = np.arange(max(sl.stop for _, _, sl in blocks))
                for name, k, sl in blocks:
                    if name == "x0":  # its multiplier is the costate of the new first state
                        frm = src[("dyn", shift - 1)] if shift > 0 else sl
                    else:  # past the end: repeat the last step
                        frm = src[(name, min(k + shift, last[name]))]
                    idx[sl] = np.arange(frm.start, frm.stop)
                out.append(idx)
            maps = (out[0], out[1])
            self._shift_cache[shift] = maps
        return maps

    def _warm_start(self, inp: ControlInput, x0: Array) -> dict[str, Array] | None:
        """The previous solution moved on by the cycles since it was computed."""
        last, problem = self._last, self._problem
        if last is None or problem is None:
            return None
        shift = round((float(inp.t0) - last["t0"]) / float(problem.dt))
        if not 0 <= shift < problem.horizon:
            return None
        w_map, g_map = self._shift_maps(shift)
        w = last["w"][w_map]
        w[: x0.shape[0]] = x0
        return {"x0": w, "lam_x0": last["lam_x"][w_map], "lam_g0": last["lam_g"][g_map]}

    def _cold_start(
        self, x0: Array, u_prev: Array, known: Array, dist: Array, lbg: Array, ubg: Array
    ) -> dict[str, Array]:
        """Hold the applied input (within bounds), simulate it, and size the slack to fit."""
        n, nb = self._dims[0], self._dims[4]
        u_hold = np.where(known, u_prev, 0.5 * (self._u_min + self._u_max))
        u_hold = np.clip(u_hold, self._u_min, self._u_max)
        U = np.repeat(u_hold[None, :], n, axis=0)
        X, Y = self._predict(x0, U, dist)
        S = np.zeros((n + 1, nb))
        if nb:
            assert self._problem is not None
            yb = Y[:, list(self._problem.banded_outputs)]
            lo = np.array([lbg[self._g_slices[("band_lo", k)]] for k in range(n + 1)])
            hi = np.array([ubg[self._g_slices[("band_hi", k)]] for k in range(n + 1)])
            with np.errstate(invalid="ignore"):
                S = np.maximum(0.0, np.maximum(lo - yb, yb - hi))
            S = np.where(np.isfinite(S), S, 0.0)
        return {"x0": np.concatenate([X.ravel(), U.ravel(), S.ravel()])}


class _Kind:
    """Entry point object for ``kind = "nmpc"``."""

    Config = Config

    @staticmethod
    def create(config: BaseModel) -> NmpcController:
        if not isinstance(config, Config):
            config = Config.model_validate(config.model_dump())
        return NmpcController(config)


KIND = _Kind()

__all__ = ["KIND", "Config", "NmpcController"]
