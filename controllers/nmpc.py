"""Nonlinear MPC on CasADi SX graphs: multiple shooting or direct collocation,
solved by IPOPT, fatrop (the OCP-structured interior point solver shipped with
CasADi) or an SQP method with a QP solver, optionally from C code compiled once
and cached on disk.

The default path, ``sqp_fatrop``, solves warm starts by SQP with CasADi's
active-set QP solver qrqp and cold starts by fatrop.  A shifted warm start is
close to the new optimum in its primal *and* dual values, and only an SQP with an
active-set QP uses both: it converges in 1-3 iterations where an interior point
needs 4-9.  fatrop, through CasADi, takes the primal guess only (its interface
has no way in for multipliers), and an interior point cannot start on the
active set anyway.  From a cold start the interior point is the robust choice.

The NLP is laid out stage by stage, as an optimal control problem, so that a
structure-exploiting solver can find the stages on its own.  Stage ``k`` has the
states ``X_k`` (nx) and ``V_k`` (nu, the input applied during the previous
period, so a move ``U_k - V_k`` stays inside one stage) and, for ``k < N``, the
controls ``U_k`` (nu), the collocation states ``C_k`` (nx * degree, collocation
only) and, at every stage, the band slack ``S_k`` (nb) >= 0.  Constraints,
again stage by stage: the gap ``[X_{k+1}; V_{k+1}] = [F(X_k, U_k, D_k); U_k]``
(``F``: the model's RK4 step, or the collocation polynomial's end point), then
the stage's own rows: ``[X_0; V_0] = [x0; u_prev]`` at ``k = 0``, the
collocation equations, the rate limits ``|U_k - V_k| <= du_max`` and the soft
bands ``low <= y_k + S_k`` and ``y_k - S_k <= high``.

Cost per stage ``k < N``: the price of each costed output over the period
(``price * y_k * dt / 3600``), tracking terms ``weight * (y_k - target)^2``,
and the move weight times ``(U_k - V_k)^2``; at ``k = N`` the terminal tracking
terms; at every stage ``comfort_weight * |S_k|^2 + comfort_weight_l1 * sum(S_k)``.
Bands, tightened by ``band_tightening_k``, hold at ``k = 0..N``; ``y_N`` uses
``V_N``, the last input.  Optional hard bounds on states hold at ``k >= 1`` and
at every collocation point.

The NLP is built once in ``setup``; each ``step`` only changes its parameters
(state, applied input, disturbance forecast) and constraint bounds (bands), and
warm-starts from the previous solution, primal and dual, shifted by the cycles
that have passed (an interior point's multipliers of inactive bounds are zeroed
first, so the active-set QP starts on the active set).  Every solve has a time
limit: IPOPT's own wall-time limit (an option fixed when a solver is built, so a
cheap, derivative-sharing solver is kept per rounded deadline), an iteration
callback that stops the SQP method, and for fatrop, which offers neither, an
iteration cap from its measured time per iteration.  Running out of time is a
``TIMEOUT`` result, never a block.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import subprocess
import tempfile
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Literal

import casadi as ca
import numpy as np
from pydantic import Field, field_validator

from parallelcity.decide.control import (
    ControlInput,
    ControlProblem,
    ControlResult,
    KindOf,
    SolveStatus,
    guarded_step,
    require_fit,
    unknown_names,
)
from parallelcity.twin.model import Array

from .objective import Objective, Tracking

log = logging.getLogger(__name__)

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
# fatrop has no wall-time limit: its iteration cap is rounded down onto this ladder
_FATROP_WARM: dict[str, Any] = {"mu_init": 1e-9, "bound_push": 1e-12, "bound_frac": 1e-12}
# a bound this close (relative) to its value counts as active when an interior-point
# solution hands its multipliers to the SQP method's active-set QP
_ACTIVE_GAP = 1e-6
# sqp_fatrop: SQP iterations from a warm start (typically 1-4) before fatrop takes over
_SQP_WARM_MAX_ITER = 30
_ITER_CAPS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)

Method = Literal["multiple_shooting", "collocation"]
SolverName = Literal["ipopt", "fatrop", "sqp"]
# "sqp_fatrop": SQP from warm starts, fatrop from cold ones (see Config.solver)
PathName = Literal["sqp_fatrop", "ipopt", "fatrop", "sqp"]
# hpipm needs the OCP structure spelled out and DAQP fails on these QPs: not offered
QpSolverName = Literal["osqp", "qpoases", "qrqp"]


class Config(Objective):
    """``[controller]`` table for ``kind = "nmpc"``."""

    kind: str = "nmpc"
    state_bounds: dict[str, tuple[float, float]] = Field(
        default_factory=dict, description="state name -> [low, high], hard, from k = 1 on"
    )
    scales: dict[str, float] = Field(
        default_factory=dict,
        description="state or input name -> typical magnitude (the solver sees value/scale)",
    )
    method: Method = Field(
        "multiple_shooting",
        description="multiple_shooting (the model's RK4 step) or collocation",
    )
    collocation_degree: int = Field(2, ge=1, le=9)
    collocation_scheme: Literal["radau", "legendre"] = "radau"
    solver: PathName = Field(
        "sqp_fatrop",
        description="sqp_fatrop (SQP from warm starts, fatrop from cold), fatrop "
        "(OCP-structured interior point), ipopt, or sqp",
    )
    qp_solver: QpSolverName = Field("qrqp", description="QP solver of the SQP method")
    compile: bool = Field(
        False, description="generate C for the NLP, compile it once and cache it on disk"
    )
    cache_dir: str | None = Field(
        None, description="where compiled NLPs are kept (default: ~/.cache/parallelcity/nmpc)"
    )
    max_iter: int = Field(300, ge=1, description="solver iteration limit")
    tol: float = Field(1e-6, gt=0, description="solver convergence tolerance")
    warm_start: bool = Field(True, description="start from the previous solution, shifted")

    @field_validator("scales")
    @classmethod
    def _positive(cls, v: dict[str, float]) -> dict[str, float]:
        bad = [k for k, s in v.items() if not (math.isfinite(s) and s > 0)]
        if bad:
            raise ValueError(f"scales must be finite and > 0 ({', '.join(bad)})")
        return v

    @field_validator("state_bounds")
    @classmethod
    def _ordered(cls, v: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        bad = [f"{name!r} ({lo:g} > {hi:g})" for name, (lo, hi) in v.items() if not lo <= hi]
        if bad:
            raise ValueError(f"low is above high for {', '.join(bad)}")
        return v

    def problems(self, problem: ControlProblem) -> list[str]:
        """What in this table does not fit the problem (checked by ``validate``)."""
        m = problem.model
        out = [
            *self.objective_problems(m),
            *unknown_names("state_bounds", self.state_bounds, m.states, "state", m.name),
            *unknown_names("scales", self.scales, m.states + m.inputs, "state or input", m.name),
            *(
                [f"method: collocation needs an ODE model; {m.name!r} is discrete-time"]
                if self.method == "collocation" and m.form != "continuous"
                else []
            ),
        ]
        if self.solver == "fatrop" and not ca.has_nlpsol("fatrop"):
            out.append("solver: 'fatrop' is not in this CasADi build; use ipopt or sqp")
        if self.solver in ("sqp", "sqp_fatrop") and not ca.has_conic(self.qp_solver):
            out.append(f"qp_solver: {self.qp_solver!r} is not in this CasADi build")
        return out


def _wall_bucket(seconds: float) -> float:
    """The largest grid value not above ``seconds``: the solver's max_wall_time."""
    k = math.floor(math.log2(seconds) * _GRID_PER_OCTAVE)
    while 2.0 ** (k / _GRID_PER_OCTAVE) > seconds:
        k -= 1
    return float(2.0 ** (k / _GRID_PER_OCTAVE))


def _iter_cap(iterations: float, limit: int) -> int:
    """The largest rung of the ladder not above ``iterations`` (at least 1, at most limit)."""
    cap = 1
    for rung in _ITER_CAPS:
        if rung <= iterations:
            cap = rung
    return min(cap, limit)


def _active_only(lam: Array, value: Array, low: Array, high: Array) -> Array:
    """Interior-point multipliers with those of inactive bounds set to zero.

    An interior point leaves every inequality a small multiplier; an active-set QP
    warm-started with them would start with every bound active and spend hundreds of
    iterations (half a second here) dropping them one by one.
    """
    with np.errstate(invalid="ignore"):  # inf - inf on rows without a bound
        near_low = np.isfinite(low) & (value - low <= _ACTIVE_GAP * (1.0 + np.abs(low)))
        near_high = np.isfinite(high) & (high - value <= _ACTIVE_GAP * (1.0 + np.abs(high)))
    keep = (low == high) | ((lam < 0) & near_low) | ((lam > 0) & near_high)
    return np.where(keep, lam, 0.0)


def collocation_coefficients(degree: int, scheme: str) -> tuple[list[float], Array, Array]:
    """Points ``tau`` (with 0 first), derivative matrix ``C`` and end-point weights ``D``.

    ``C[r, j]`` is the derivative at ``tau_j`` of the Lagrange polynomial of ``tau_r``,
    so ``sum_r C[r, j] x_r = h * f(x_j)`` are the collocation equations of an interval
    of length ``h``, and ``sum_r D[r] x_r`` is the polynomial at the interval's end.
    """
    tau = [0.0, *ca.collocation_points(degree, scheme)]
    d = degree
    C = np.zeros((d + 1, d + 1))
    D = np.zeros(d + 1)
    for r in range(d + 1):
        poly = np.poly1d([1.0])
        for q in range(d + 1):
            if q != r:
                poly *= np.poly1d([1.0, -tau[q]]) / (tau[r] - tau[q])
        D[r] = poly(1.0)
        dpoly = np.polyder(poly)
        for j in range(d + 1):
            C[r, j] = dpoly(tau[j])
    return tau, C, D


class _StopAt(ca.Callback):  # type: ignore[misc]
    """IPOPT/SQP iteration callback that asks the solver to stop once a wall time passes."""

    def __init__(self, nx: int, ng: int, np_: int) -> None:
        ca.Callback.__init__(self)
        self._n = {"x": nx, "lam_x": nx, "g": ng, "lam_g": ng, "lam_p": np_, "f": 1}
        self.stop_at = math.inf
        self.stopped = False
        self.construct("nmpc_stop_at", {})

    def get_n_in(self) -> int:
        return int(ca.nlpsol_n_out())

    def get_n_out(self) -> int:
        return 1

    def get_name_in(self, i: int) -> str:
        return str(ca.nlpsol_out(i))

    def get_name_out(self, i: int) -> str:
        return "ret"

    def get_sparsity_in(self, i: int) -> ca.Sparsity:
        return ca.Sparsity.dense(self._n.get(ca.nlpsol_out(i), 0), 1)

    def eval(self, arg: Any) -> list[int]:
        if time.perf_counter() >= self.stop_at:
            self.stopped = True
            return [1]
        return [0]


def _cache_dir(config: Config) -> Path:
    if config.cache_dir:
        return Path(config.cache_dir).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "parallelcity" / "nmpc"


_ORACLE = (
    "nlp_f",
    "nlp_g",
    "nlp_fg",
    "nlp_grad_f",
    "nlp_jac_g",
    "nlp_jac_fg",
    "nlp_hess_l",
    "nlp_grad",
)


def compile_nlp(solver: ca.Function, cache: Path, name: str) -> Path:
    """C code of ``solver``'s NLP functions, compiled to a shared library kept in ``cache``.

    The library is named by the hash of its C source, so an unchanged problem is
    compiled once per machine and a changed one never loads a stale library.
    """
    cache.mkdir(parents=True, exist_ok=True)
    names = [f for f in _ORACLE if solver.has_function(f)]
    with tempfile.TemporaryDirectory() as tmp:
        gen = ca.CodeGenerator(f"{name}.c", {"with_header": False})
        gen.add(solver.oracle())  # "nlp": (x, p) -> (f, g), what a solver loads first
        for f in names:
            gen.add(solver.get_function(f))
        gen.generate(tmp + os.sep)
        source = (Path(tmp) / f"{name}.c").read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:20]
    lib = cache / f"{name}_{digest}.so"
    if lib.exists():
        return lib
    src = cache / f"{name}_{digest}.c"
    src.write_bytes(source)
    part = lib.with_suffix(f".{os.getpid()}.part")
    cc = os.environ.get("CC", "cc")
    t0 = time.perf_counter()
    try:
        subprocess.run(
            [cc, "-O1", "-fPIC", "-shared", str(src), "-o", str(part), "-lm"],
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        raise RuntimeError(
            f"compiling the NLP with {cc!r} failed: {exc}: {detail.decode(errors='replace')[:500]}"
        ) from exc
    part.replace(lib)  # atomic: concurrent builders never load a half-written library
    log.info("nmpc: compiled %s in %.1f s", lib, time.perf_counter() - t0)
    return lib


class NmpcController:
    """Economic and tracking NMPC with soft bands; see the module docstring."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._problem: ControlProblem | None = None
        self._solvers: OrderedDict[tuple[str, float | int | None, bool], ca.Function] = (
            OrderedDict()
        )
        self._nlp: dict[str, ca.SX] = {}
        self._wrapped: dict[str, ca.MX] | None = None
        self._derivatives: dict[str, ca.Function] = {}
        self._libraries: dict[str, Path] = {}  # plugin -> its compiled NLP functions
        self._warm_name: SolverName = "fatrop"  # the solver of warm starts ...
        self._cold_name: SolverName = "fatrop"  # ... and of cold ones
        self._shift_cache: dict[int, tuple[Array, Array]] = {}
        self._last: dict[str, Any] | None = None  # previous solution, for the warm start
        self._s_per_iter = 0.0  # fatrop's measured wall time per iteration (EWMA)

    # ------------------------------------------------------------------ setup

    def setup(self, problem: ControlProblem) -> None:
        """Check the configuration against the model and build the NLP and its solvers."""
        m, cfg = problem.model, self.config
        require_fit("nmpc", cfg.problems(problem))
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
        if cfg.solver == "sqp_fatrop":
            self._warm_name = "sqp"
            self._cold_name = "fatrop" if ca.has_nlpsol("fatrop") else "ipopt"
        else:
            self._warm_name = self._cold_name = cfg.solver

        self._problem = problem
        self._u_min, self._u_max, self._du_max = u_min, u_max, du_max
        self._rated = [i for i in range(m.nu) if math.isfinite(du_max[i])]
        self._build(problem)
        self._solvers.clear()
        self._wrapped = None
        self._derivatives = {}
        self._libraries = {}
        self._shift_cache = {}
        self._last = None
        self._s_per_iter = 0.0
        # build the untimed solvers now rather than during a cycle
        self._solver(None, warm=False, name=self._cold_name)
        if self.config.warm_start:
            self._solver(None, warm=True, name=self._warm_name)
        if self._cold_name != "ipopt":
            self._solver(None, warm=False, name="ipopt")
        if self._cold_name == "fatrop" and not self.config.compile:
            # pays for the wrapper's derivatives now
            self._solver(_ITER_CAPS[5], warm=False, name="fatrop")

    def _build(self, problem: ControlProblem) -> None:
        m, cfg = problem.model, self.config
        n, nx, nu, nd = problem.horizon, m.nx, m.nu, m.nd
        banded = list(problem.banded_outputs)
        nb = len(banded)
        p = ca.DM(np.asarray(problem.p, dtype=float))
        dt = float(problem.dt)
        colloc = cfg.method == "collocation"
        deg = cfg.collocation_degree if colloc else 0

        scale_x = np.array([cfg.scales.get(s, 1.0) for s in m.states])
        scale_u = np.array([cfg.scales.get(s, 1.0) for s in m.inputs])
        sx, su = ca.DM(scale_x), ca.DM(scale_u)
        price = np.zeros(m.ny)
        for name, c in cfg.output_costs.items():
            price[m.index("outputs", name)] = c
        move_w = np.zeros(nu)
        for name, weight in cfg.move_weights.items():
            move_w[m.index("inputs", name)] = weight
        tracked = [(m.index("outputs", k), t) for k, t in cfg.tracking.items()]
        x_lo, x_hi = np.full(nx, -np.inf), np.full(nx, np.inf)
        for name, (lo, hi) in cfg.state_bounds.items():
            x_lo[m.index("states", name)], x_hi[m.index("states", name)] = lo, hi

        x0 = ca.SX.sym("x0", nx)
        u_prev = ca.SX.sym("u_prev", nu)
        known = ca.SX.sym("known", nu)  # 1 where u_prev is known (moves from it cost), else 0
        D = ca.SX.sym("D", nd, n)

        # decision variables, stage-major; the solver sees each divided by its scale
        w_sym: list[ca.SX] = []
        w_scale: list[Array] = []
        w_lo: list[Array] = []
        w_hi: list[Array] = []
        w_layout: list[tuple[str, int, int]] = []

        def var(block: str, k: int, size: int, scale: Array, lo: Array, hi: Array) -> ca.SX:
            sym = ca.SX.sym(f"{block}{k}", size)
            w_sym.append(sym)
            w_scale.append(np.broadcast_to(scale, (size,)).astype(float))
            w_lo.append(np.broadcast_to(lo, (size,)).astype(float))
            w_hi.append(np.broadcast_to(hi, (size,)).astype(float))
            w_layout.append((block, k, size))
            return sym * ca.DM(np.broadcast_to(scale, (size,)).astype(float))

        g: list[ca.SX] = []
        g_layout: list[tuple[str, int, int]] = []
        g_equal: list[bool] = []

        def con(block: str, k: int, expr: ca.SX, equality: bool) -> None:
            g.append(expr)
            g_layout.append((block, k, expr.numel()))
            g_equal.extend([equality] * expr.numel())

        inf = np.full(1, np.inf)
        X: list[ca.SX] = []
        V: list[ca.SX] = []
        U: list[ca.SX] = []
        C: list[list[ca.SX]] = []
        S: list[ca.SX] = []
        for k in range(n + 1):
            X.append(var("X", k, nx, scale_x, x_lo if k else -inf, x_hi if k else inf))
            V.append(var("V", k, nu, scale_u, -inf, inf))
            if k < n:
                U.append(var("U", k, nu, scale_u, self._u_min, self._u_max))
                if colloc:
                    ck = var(
                        "C",
                        k,
                        nx * deg,
                        np.tile(scale_x, deg),
                        np.tile(x_lo, deg),
                        np.tile(x_hi, deg),
                    )
                    C.append([ck[j * nx : (j + 1) * nx] for j in range(deg)])
            if nb:
                S.append(var("S", k, nb, np.ones(1), np.zeros(1), inf))

        if colloc:
            _, Ccoef, Dcoef = collocation_coefficients(deg, cfg.collocation_scheme)
        else:
            step = m.step_function(dt)

        cost: ca.SX = ca.SX(0)
        for k in range(n + 1):
            last = k == n
            uk = V[k] if last else U[k]  # y_N uses the last input, V_N = U_{N-1}
            dk = D[:, min(k, n - 1)]
            if not last:  # the gap to the next stage comes first (fatrop's layout)
                if colloc:
                    pts = [X[k], *C[k]]
                    x_end = sum((float(Dcoef[r]) * pts[r] for r in range(deg + 1)), ca.SX.zeros(nx))
                else:
                    x_end = step(X[k], U[k], dk, p)
                # in scaled variables, so the next stage's states enter with an identity
                # (fatrop's structure detection needs that)
                gap = ca.vertcat((X[k + 1] - x_end) / sx, (V[k + 1] - U[k]) / su)
                con("dyn", k, gap, True)
            if k == 0:
                con("init", 0, ca.vertcat((X[0] - x0) / sx, (V[0] - u_prev) / su), True)
            if not last and colloc:
                rows = []
                for j in range(1, deg + 1):
                    slope = sum(
                        (float(Ccoef[r, j]) * pts[r] for r in range(deg + 1)), ca.SX.zeros(nx)
                    )
                    rows.append((slope - dt * m.ode(pts[j], U[k], dk, p)) / sx)
                con("col", k, ca.vertcat(*rows), True)
            y = m.h(X[k], uk, dk, p)
            if not last:
                move = U[k] - V[k]
                if self._rated:
                    con("rate", k, ca.vertcat(*[move[i] for i in self._rated]), False)
                cost += ca.dot(ca.DM(price * dt / 3600.0), y)
                for i in np.flatnonzero(move_w).tolist():
                    mw = float(move_w[i]) * (known[i] if k == 0 else ca.SX(1.0))
                    cost += mw * move[i] ** 2
            for j, t in tracked:
                weight = t.terminal_weight if last else t.weight
                if weight:
                    cost += weight * (y[j] - t.target) ** 2
            if nb:
                yb = ca.vertcat(*[y[j] for j in banded])
                con("band_lo", k, yb + S[k], False)  # >= tightened low
                con("band_hi", k, yb - S[k], False)  # <= tightened high
                cost += cfg.comfort_weight * ca.sumsqr(S[k])
                if cfg.comfort_weight_l1:
                    cost += cfg.comfort_weight_l1 * ca.sum1(S[k])

        w = ca.vertcat(*w_sym)
        par = ca.vertcat(x0, u_prev, known, ca.vec(D))
        self._nlp = {"x": w, "p": par, "f": cost, "g": ca.vertcat(*g)}
        self._dims = (n, nx, nu, nd, nb)
        self._g_equal = g_equal

        def place(layout: list[tuple[str, int, int]]) -> dict[tuple[str, int], slice]:
            out, pos = {}, 0
            for block, k, size in layout:
                out[(block, k)] = slice(pos, pos + size)
                pos += size
            return out

        self._g_slices = place(g_layout)
        self._w_slices = place(w_layout)
        self._g_blocks = [(b, k, self._g_slices[(b, k)]) for b, k, _ in g_layout]
        self._w_blocks = [(b, k, self._w_slices[(b, k)]) for b, k, _ in w_layout]
        ng = sum(size for _, _, size in g_layout)
        self._lbg = np.zeros(ng)
        self._ubg = np.zeros(ng)
        du = self._du_max[self._rated]
        for k in range(n):
            if self._rated:
                self._lbg[self._g_slices[("rate", k)]] = -du
                self._ubg[self._g_slices[("rate", k)]] = du
        for k in range(n + 1 if nb else 0):
            self._ubg[self._g_slices[("band_lo", k)]] = np.inf
            self._lbg[self._g_slices[("band_hi", k)]] = -np.inf

        def index(block: str, count: int) -> Array:
            return np.array(
                [
                    np.arange(self._w_slices[(block, k)].start, self._w_slices[(block, k)].stop)
                    for k in range(count)
                ],
                dtype=np.intp,
            )

        self._ix, self._iv, self._iu = index("X", n + 1), index("V", n + 1), index("U", n)
        self._is = index("S", n + 1) if nb else np.zeros((n + 1, 0), dtype=np.intp)
        self._ic = index("C", n) if colloc else np.zeros((n, 0), dtype=np.intp)
        self._wscale = np.concatenate(w_scale)
        self._lbx = np.concatenate(w_lo) / self._wscale
        self._ubx = np.concatenate(w_hi) / self._wscale
        # the fatrop stage sizes, in case its automatic detection is not used
        self._stage_sizes = (nx + nu, nu + nx * deg + nb, nb)

        # plain simulation of a plan: the cold-start guess and the returned prediction
        # as one SX function of one packed vector: each argument a CasADi call converts
        # from numpy costs about as much as evaluating this whole graph
        x_0, u_s, d_s = ca.SX.sym("x0", nx), ca.SX.sym("U", nu, n), ca.SX.sym("D", nd, n)
        x_s = ca.horzcat(x_0, m.step_function(dt).mapaccum(n)(x_0, u_s, d_s, p))
        u_ext = ca.horzcat(u_s, u_s[:, n - 1])
        d_ext = ca.horzcat(d_s, d_s[:, n - 1]) if nd else ca.SX(0, n + 1)
        y_s = m.h.map(n + 1)(x_s, u_ext, d_ext, p)
        self._rollout = ca.Function(
            "nmpc_rollout",
            [ca.vertcat(x_0, ca.vec(u_s), ca.vec(d_s))],
            [ca.vertcat(ca.vec(x_s), ca.vec(y_s))],
        )
        self._ny = m.ny
        # constant solver arguments, converted to CasADi once
        self._lbx_dm, self._ubx_dm = ca.DM(self._lbx), ca.DM(self._ubx)
        self._bounds_dm: tuple[Array, Array, ca.DM, ca.DM] | None = None

        def band_rows(block: str) -> Array:  # (n + 1, nb): the constraint rows of a band
            return np.array(
                [
                    np.arange(self._g_slices[(block, k)].start, self._g_slices[(block, k)].stop)
                    for k in range(n + 1)
                ]
                if nb
                else np.zeros((n + 1, 0)),
                dtype=np.intp,
            )

        self._band_lo_rows, self._band_hi_rows = band_rows("band_lo"), band_rows("band_hi")

    def _solver(self, limit: float | int | None, warm: bool, name: SolverName) -> ca.Function:
        """The solver for a limit (IPOPT: wall seconds, fatrop: iterations; None: none)
        and start, built on first use.

        The first IPOPT solver is built from the SX problem, which derives the gradient,
        Jacobian and Hessian of the Lagrangian (about 0.25 s).  The others reuse those
        functions and reach the problem through a thin MX wrapper, so they build in
        about a millisecond.  With ``compile`` every solver loads the one compiled
        library of its plugin.  The IPOPT second opinion after a failure of another
        solver is built from the SX problem without ``compile``.
        """
        cfg = self.config
        key = (name, limit, warm)
        if key in self._solvers:
            self._solvers.move_to_end(key)
            return self._solvers[key]
        plugin, opts = self._options(name, limit, warm)
        if cfg.compile and name in (self._warm_name, self._cold_name):
            library = self._libraries.get(plugin)
            if library is None:
                plain = ca.nlpsol("nmpc", plugin, self._nlp, opts)
                library = compile_nlp(plain, _cache_dir(cfg), f"nmpc_{plugin}")
                self._libraries[plugin] = library
            solver = ca.nlpsol("nmpc", plugin, str(library), opts)
        elif plugin == "fatrop" and limit is not None:
            # fatrop solvers with an iteration cap are built per cap, during cycles: from
            # the MX wrapper, whose derivatives CasADi keeps after the first build (5 ms
            # instead of 0.3 s), at the price of slower evaluations
            solver = ca.nlpsol("nmpc", plugin, self._wrapper(), opts)
        elif plugin != "ipopt":
            solver = ca.nlpsol("nmpc", plugin, self._nlp, opts)
        elif not self._derivatives:
            solver = ca.nlpsol("nmpc", plugin, self._nlp, opts)
            try:
                self._derivatives = {
                    "grad_f": solver.get_function("nlp_grad_f"),
                    "jac_g": solver.get_function("nlp_jac_g"),
                    "hess_lag": solver.get_function("nlp_hess_l"),
                }
            except RuntimeError:  # a CasADi that names them otherwise: build each from SX
                self._derivatives = {}
        else:
            solver = ca.nlpsol("nmpc", plugin, self._wrapper(), {**opts, **self._derivatives})
        self._solvers[key] = solver
        timed = [k for k in self._solvers if k[1] is not None]
        if len(timed) > _MAX_TIMED_SOLVERS:
            del self._solvers[timed[0]]  # least recently used
        return solver

    def _wrapper(self) -> dict[str, ca.MX]:
        """The NLP as one SX function called from MX: solvers built on it share derivatives."""
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
        return self._wrapped

    def _options(
        self, name: SolverName, limit: float | int | None, warm: bool
    ) -> tuple[str, dict[str, Any]]:
        cfg = self.config
        opts: dict[str, Any] = {"print_time": False, "error_on_fail": False}
        if name == "ipopt":
            ipopt: dict[str, Any] = {
                **_IPOPT,
                "max_iter": cfg.max_iter,
                "tol": cfg.tol,
                **(_IPOPT_WARM if warm else {}),
            }
            if limit is not None:
                ipopt["max_wall_time"] = float(limit)
            return "ipopt", {**opts, "ipopt": ipopt}
        if name == "fatrop":
            fatrop: dict[str, Any] = {
                "print_level": 0,
                "tol": cfg.tol,
                "max_iter": int(limit) if limit is not None else cfg.max_iter,
            }
            if warm:
                fatrop.update(_FATROP_WARM)
            return "fatrop", {
                **opts,
                "structure_detection": "auto",
                "equality": self._g_equal,
                "fatrop": fatrop,
            }
        if not hasattr(self, "_stop"):
            self._stop = _StopAt(
                self._nlp["x"].numel(), self._nlp["g"].numel(), self._nlp["p"].numel()
            )
        qp_opts: dict[str, Any] = {"error_on_fail": False}
        if cfg.qp_solver == "qrqp":
            qp_opts.update({"print_iter": False, "print_header": False})
        elif cfg.qp_solver == "qpoases":
            qp_opts.update({"printLevel": "none"})
        elif cfg.qp_solver == "osqp":
            qp_opts.update({"osqp": {"verbose": False, "eps_abs": 1e-9, "eps_rel": 1e-9}})
        return "sqpmethod", {
            **opts,
            "qpsol": cfg.qp_solver,
            "qpsol_options": qp_opts,
            # in sqp_fatrop a warm SQP that is not converging hands over to fatrop early
            "max_iter": min(cfg.max_iter, _SQP_WARM_MAX_ITER)
            if cfg.solver == "sqp_fatrop"
            else cfg.max_iter,
            "tol_pr": cfg.tol,
            "tol_du": cfg.tol,
            "print_header": False,
            "print_iteration": False,
            "print_status": False,
            "iteration_callback": self._stop,
        }

    # ------------------------------------------------------------------- step

    def step(self, inp: ControlInput) -> ControlResult:
        """Plan from ``inp``; every kind of trouble comes back as a status, never raised."""
        return guarded_step("nmpc", self._problem, inp, self._step, self._forget, check_input=True)

    def _forget(self) -> None:
        self._last = None

    def _step(self, problem: ControlProblem, inp: ControlInput, t_start: float) -> ControlResult:
        n, _, _, _, nb = self._dims
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
            if not self.config.band_at_end:
                lo[n], hi[n] = -np.inf, np.inf
            lbg[self._band_lo_rows] = lo
            ubg[self._band_hi_rows] = hi
        cached = self._bounds_dm
        if cached is None or not (
            np.array_equal(lbg, cached[0]) and np.array_equal(ubg, cached[1])
        ):
            cached = self._bounds_dm = (lbg, ubg, ca.DM(lbg), ca.DM(ubg))
        bounds: dict[str, Any] = {
            "p": par,
            "lbx": self._lbx_dm,
            "ubx": self._ubx_dm,
            "lbg": cached[2],
            "ubg": cached[3],
        }

        warm_guess = self._warm_start(inp, x0, u_prev, known) if self.config.warm_start else None
        attempts: list[tuple[str, SolverName]] = [("cold", self._cold_name)]
        if warm_guess is not None:
            attempts.insert(0, ("warm", self._warm_name))
        if self._cold_name != "ipopt":  # a failure of the fast path gets IPOPT's second opinion
            attempts.append(("cold", "ipopt"))
        total_iter = 0
        failure: ControlResult | None = None  # of a warm start, retried from cold
        for kind, solver_name in attempts:
            limit: float | int | None = None
            stop_at = math.inf
            if math.isfinite(deadline):
                left = deadline - (time.perf_counter() - t_start)
                if left <= 0:
                    if failure is not None:
                        return failure
                    return self._failed(
                        SolveStatus.TIMEOUT, "deadline passed before solving", total_iter, t_start
                    )
                if solver_name == "ipopt":
                    limit = _wall_bucket(left)
                elif solver_name == "fatrop":
                    per_iter = self._s_per_iter or 1e-3  # before any measurement: 1 ms
                    if left < per_iter:
                        return self._failed(
                            SolveStatus.TIMEOUT,
                            f"{left * 1e3:.3g} ms left, an iteration takes {per_iter * 1e3:.3g}",
                            total_iter,
                            t_start,
                        )
                    # uncapped (the fast SX solver) while max_iter iterations fit with room
                    # to spare; else capped to what fits
                    if left < 1.5 * per_iter * self.config.max_iter:
                        limit = _iter_cap(left / per_iter, self.config.max_iter)
                else:
                    stop_at = t_start + deadline
            if kind == "warm":
                assert warm_guess is not None
                guess = warm_guess
            else:
                guess = self._cold_start(x0, u_prev, known, dist, lbg, ubg)
            solver = self._solver(limit, warm=kind == "warm", name=solver_name)
            if solver_name == "sqp":
                self._stop.stop_at, self._stop.stopped = stop_at, False
            t_solve = time.perf_counter()
            sol = solver(**bounds, **guess)
            t_solve = time.perf_counter() - t_solve
            stats = solver.stats()
            iters = int(stats.get("iter_count", 0))
            total_iter += iters
            ret, status = self._status(solver_name, stats, limit, iters)
            if solver_name == "fatrop" and iters > 0:
                rate = t_solve / iters
                self._s_per_iter = (
                    rate if not self._s_per_iter else 0.7 * self._s_per_iter + 0.3 * rate
                )
            w_opt = np.asarray(sol["x"], dtype=float).ravel()
            plan = (w_opt * self._wscale)[self._iu]
            if status.usable and time.perf_counter() - t_start > deadline:
                status, ret = SolveStatus.TIMEOUT, f"{ret}, after the deadline"
            trouble = self._check_plan(plan, u_prev, known) if status.usable else ""
            if not status.usable or trouble:
                why = (
                    f"{solver_name} {ret} but the plan {trouble}"
                    if trouble
                    else f"{solver_name} {ret}"
                )
                failure = self._failed(
                    SolveStatus.FAILED if trouble else status, why, total_iter, t_start, ret
                )
                if status is SolveStatus.TIMEOUT:
                    return failure
                continue  # after a warm start that went wrong: try again from cold
            plan = self._clip_tiny(plan)
            xs, ys = self._predict(x0, plan, dist)
            lam_x = np.asarray(sol["lam_x"], dtype=float).ravel()
            lam_g = np.asarray(sol["lam_g"], dtype=float).ravel()
            if solver_name != "sqp" and self._warm_name == "sqp":
                g_opt = np.asarray(sol["g"], dtype=float).ravel()
                lam_x = _active_only(lam_x, w_opt, self._lbx, self._ubx)
                lam_g = _active_only(lam_g, g_opt, lbg, ubg)
            self._last = {"t0": float(inp.t0), "w": w_opt, "lam_x": lam_x, "lam_g": lam_g}
            return ControlResult(
                status=status,
                u_plan=plan,
                x_pred=xs,
                y_pred=ys,
                cost=float(sol["f"]),
                iterations=total_iter,
                solve_time_s=time.perf_counter() - t_start,
                message="" if status is SolveStatus.SOLVED else f"nmpc: {solver_name} {ret}",
                extra={
                    "return_status": ret,
                    "solver": solver_name,
                    "method": self.config.method,
                    "warm_start": kind == "warm",
                    "retried": failure is not None,
                    "second_opinion": solver_name not in (self._warm_name, self._cold_name),
                },
            )
        assert failure is not None
        return failure

    def _status(
        self, solver_name: SolverName, stats: dict[str, Any], limit: float | int | None, iters: int
    ) -> tuple[str, SolveStatus]:
        """The solver's own return status and what it means for the plan."""
        ret = str(stats.get("return_status", "unknown"))
        if solver_name == "ipopt":
            return ret, _STATUS.get(ret, SolveStatus.FAILED)
        if solver_name == "fatrop":
            if stats.get("success", False):
                return "Solve_Succeeded", SolveStatus.SOLVED
            if limit is not None and iters >= int(limit):
                return f"iteration cap {int(limit)} for the deadline", SolveStatus.TIMEOUT
            return f"fatrop return status {ret}", SolveStatus.FAILED
        if stats.get("success", False):
            return ret, SolveStatus.SOLVED
        if self._stop.stopped:
            return "stopped at the deadline", SolveStatus.TIMEOUT
        if "nfeasib" in ret:
            return ret, SolveStatus.INFEASIBLE
        return ret, SolveStatus.FAILED

    # ---------------------------------------------------------------- helpers

    def _failed(
        self, status: SolveStatus, why: str, iterations: int, t_start: float, ret: str = ""
    ) -> ControlResult:
        assert self._problem is not None
        return ControlResult.failure(
            status,
            self._problem,
            f"nmpc: {why}",
            time.perf_counter() - t_start,
            iterations=iterations,
            extra={"return_status": ret} if ret else None,
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
        n, nx = plan.shape[0], x0.shape[0]
        packed = np.concatenate([x0, plan.ravel(), dist.ravel()])
        out = self._rollout(packed).full().ravel()
        xs = out[: (n + 1) * nx].reshape(n + 1, nx)
        ys = out[(n + 1) * nx :].reshape(n + 1, self._ny)
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
                    if name == "init":  # its multiplier is the costate of the new first stage
                        frm = src[("dyn", shift - 1)] if shift > 0 else sl
                    else:  # past the end: repeat the last step
                        frm = src[(name, min(k + shift, last[name]))]
                    idx[sl] = np.arange(frm.start, frm.stop)
                out.append(idx)
            maps = (out[0], out[1])
            self._shift_cache[shift] = maps
        return maps

    def _warm_start(
        self, inp: ControlInput, x0: Array, u_prev: Array, known: Array
    ) -> dict[str, Array] | None:
        """The previous solution moved on by the cycles since it was computed."""
        last, problem = self._last, self._problem
        if last is None or problem is None:
            return None
        shift = round((float(inp.t0) - last["t0"]) / float(problem.dt))
        if not 0 <= shift < problem.horizon:
            return None
        w_map, g_map = self._shift_maps(shift)
        w = last["w"][w_map]
        w[self._ix[0]] = x0 / self._wscale[self._ix[0]]
        v0 = np.where(known, u_prev, 0.0)
        w[self._iv[0]] = v0 / self._wscale[self._iv[0]]
        return {"x0": w, "lam_x0": last["lam_x"][w_map], "lam_g0": last["lam_g"][g_map]}

    def _cold_start(
        self, x0: Array, u_prev: Array, known: Array, dist: Array, lbg: Array, ubg: Array
    ) -> dict[str, Array]:
        """Hold the applied input (within bounds), simulate it, and size the slack to fit."""
        n, nx, _, _, nb = self._dims
        u_hold = np.where(known, u_prev, 0.5 * (self._u_min + self._u_max))
        u_hold = np.clip(u_hold, self._u_min, self._u_max)
        U = np.repeat(u_hold[None, :], n, axis=0)
        X, Y = self._predict(x0, U, dist)
        w = np.zeros(self._wscale.shape[0])
        w[self._ix] = X
        w[self._iu] = U
        w[self._iv] = np.vstack([np.where(known, u_prev, 0.0)[None, :], U])
        if self._ic.shape[1]:  # collocation points: the state at the start of their interval
            deg = self._ic.shape[1] // nx
            w[self._ic] = np.tile(X[:-1], (1, deg))
        if nb:
            assert self._problem is not None
            yb = Y[:, list(self._problem.banded_outputs)]
            lo = np.array([lbg[self._g_slices[("band_lo", k)]] for k in range(n + 1)])
            hi = np.array([ubg[self._g_slices[("band_hi", k)]] for k in range(n + 1)])
            with np.errstate(invalid="ignore"):
                S = np.maximum(0.0, np.maximum(lo - yb, yb - hi))
            w[self._is] = np.where(np.isfinite(S), S, 0.0)
        return {"x0": w / self._wscale}


KIND = KindOf(Config, NmpcController)

__all__ = [
    "KIND",
    "Config",
    "NmpcController",
    "Tracking",
    "collocation_coefficients",
    "compile_nlp",
]
