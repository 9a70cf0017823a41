"""The Pyomo model of the pump schedule, built once from a model's affine form.

Every number that changes between cycles (the stage matrices' nonzeros, the state now,
the bands, what earlier cycles impose) is a mutable parameter, so a persistent HiGHS
only updates coefficients and bounds.  ``WarmHighs`` hands HiGHS a start solution
(the previous plan, shifted) before it runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

BIG = 1e6  # stands for an infinite band: a mutable Param must be finite


@dataclass(frozen=True)
class Layout:
    """Which signals the MILP has and how they enter (indices into the model's vectors)."""

    n: int
    dt_h: float
    nx: int
    nu: int
    binary: tuple[int, ...]  # input indices that are on/off
    u_lo: tuple[float, ...]  # per input; -inf / inf where unbounded
    u_hi: tuple[float, ...]
    du_max: tuple[float, ...]  # per input; inf where unlimited (binaries: ignored)
    mask_A: Any  # (nx, nx) bool: structural nonzeros of the stage matrices
    mask_B: Any  # (nx, nu)
    mask_C: Any  # (ny, nx)
    mask_D: Any  # (ny, nu)
    banded: tuple[int, ...]  # output indices with a band, in the band arrays' order
    priced: dict[int, float]  # output index -> price per unit-hour
    terminal: tuple[int, ...]  # state indices held at an end stage (``milp.Config.terminal``)
    soft: bool
    slack_price: float
    terminal_price: float
    min_up: int
    min_down: int
    max_starts: int | None
    window: int
    start_cost: float
    # on/off combinations taken exactly (``milp_form.combinations``); empty: linearised
    combos: tuple[tuple[int, ...], ...] = ()

    @property
    def outputs(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.banded) | set(self.priced)))

    def band_from(self, j: int) -> int:
        """First stage a band on output ``j`` applies: 0 when the inputs move it now,
        else 1 (the state now is what it is)."""
        return 0 if bool(np.any(self.mask_D[j])) else 1


def pyomo() -> Any:
    import pyomo.environ as pyo

    return pyo


def build(lay: Layout) -> Any:
    """The Pyomo model (see the module docstring of ``milp``)."""
    pyo = pyomo()
    n, nx, nu = lay.n, lay.nx, lay.nu
    M = pyo.ConcreteModel("pump_schedule")
    K, L = range(n), range(n + 1)
    ys = lay.outputs
    a_nz = [(r, c) for r in range(nx) for c in range(nx) if lay.mask_A[r, c]]
    exact = set(lay.binary) if lay.combos else set()  # columns the combinations carry
    b_nz = [(r, i) for r in range(nx) for i in range(nu) if lay.mask_B[r, i] and i not in exact]
    c_nz = [(j, c) for j in ys for c in range(nx) if lay.mask_C[j, c]]
    d_nz = [(j, i) for j in ys for i in range(nu) if lay.mask_D[j, i] and i not in exact]
    M.x0 = pyo.Param(range(nx), mutable=True, initialize=0.0)
    M.A = pyo.Param([(k, *rc) for k in K for rc in a_nz], mutable=True, initialize=0.0)
    M.B = pyo.Param([(k, *ri) for k in K for ri in b_nz], mutable=True, initialize=0.0)
    M.c = pyo.Param(K, range(nx), mutable=True, initialize=0.0)
    M.C = pyo.Param([(k, *jc) for k in L for jc in c_nz], mutable=True, initialize=0.0)
    M.D = pyo.Param([(k, *ji) for k in L for ji in d_nz], mutable=True, initialize=0.0)
    M.e = pyo.Param(L, ys, mutable=True, initialize=0.0)
    nb = len(lay.banded)
    M.lo = pyo.Param(L, range(nb), mutable=True, initialize=-BIG)
    M.hi = pyo.Param(L, range(nb), mutable=True, initialize=BIG)

    def u_bounds(M: Any, k: int, i: int) -> tuple[float | None, float | None]:
        lo, hi = lay.u_lo[i], lay.u_hi[i]
        if i in lay.binary:
            lo, hi = max(lo, 0.0), min(hi, 1.0)
        return (lo if math.isfinite(lo) else None, hi if math.isfinite(hi) else None)

    def u_domain(M: Any, k: int, i: int) -> Any:
        return pyo.Binary if i in lay.binary else pyo.Reals

    M.u = pyo.Var(K, range(nu), domain=u_domain, bounds=u_bounds)
    M.x = pyo.Var(L, range(nx))
    S = range(len(lay.combos))
    M.g = pyo.Param(K, S, range(nx), mutable=True, initialize=0.0)
    M.f = pyo.Param(L, S, ys, mutable=True, initialize=0.0)
    M.z = pyo.Var(K, S, bounds=(0.0, 1.0))  # one-hot once the inputs are whole
    if lay.combos:
        M.one_combo = pyo.Constraint(K, rule=lambda M, k: sum(M.z[k, s] for s in S) == 1)
        M.combo_of = pyo.Constraint(
            K,
            range(len(lay.binary)),
            rule=lambda M, k, b: (
                sum(M.z[k, s] for s in S if lay.combos[s][b]) == M.u[k, lay.binary[b]]
            ),
        )
    M.init = pyo.Constraint(range(nx), rule=lambda M, r: M.x[0, r] == M.x0[r])
    M.dyn = pyo.Constraint(
        K,
        range(nx),
        rule=lambda M, k, r: (
            M.x[k + 1, r]
            == sum(M.A[k, r, c] * M.x[k, c] for (rr, c) in a_nz if rr == r)
            + sum(M.B[k, r, i] * M.u[k, i] for (rr, i) in b_nz if rr == r)
            + M.c[k, r]
            + sum(M.g[k, s, r] * M.z[k, s] for s in S)
        ),
    )

    def y(k: int, j: int) -> Any:
        ku = min(k, n - 1)  # y_N uses the last input
        return (
            sum(M.C[k, j, c] * M.x[k, c] for (jj, c) in c_nz if jj == j)
            + sum(M.D[k, j, i] * M.u[ku, i] for (jj, i) in d_nz if jj == j)
            + M.e[k, j]
            + sum(M.f[k, s, j] * M.z[ku, s] for s in S)
        )

    bands = [(k, b) for b, j in enumerate(lay.banded) for k in L if k >= lay.band_from(j)]
    slack_cost: Any = 0.0
    if lay.soft:
        M.slack = pyo.Var(bands, domain=pyo.NonNegativeReals)
        slack_cost = lay.slack_price * sum(M.slack[kb] for kb in bands)
    slack = (lambda k, b: M.slack[k, b]) if lay.soft else (lambda k, b: 0.0)
    M.band_lo = pyo.Constraint(
        bands, rule=lambda M, k, b: y(k, lay.banded[b]) + slack(k, b) >= M.lo[k, b]
    )
    M.band_hi = pyo.Constraint(
        bands, rule=lambda M, k, b: y(k, lay.banded[b]) - slack(k, b) <= M.hi[k, b]
    )
    # the end level: the state at the one stage ``at`` selects (weight 1) at least ``x_ref``
    M.at = pyo.Param(range(1, n + 1), mutable=True, initialize=0.0)
    M.x_ref = pyo.Param(range(nx), mutable=True, initialize=-BIG)
    if lay.terminal:
        if lay.soft:
            M.tslack = pyo.Var(lay.terminal, domain=pyo.NonNegativeReals)
            slack_cost = slack_cost + lay.terminal_price * sum(M.tslack[s] for s in lay.terminal)
        short = (lambda s: M.tslack[s]) if lay.soft else (lambda s: 0.0)
        M.end = pyo.Constraint(
            lay.terminal,
            rule=lambda M, s: (
                sum(M.at[k] * M.x[k, s] for k in range(1, n + 1)) + short(s) >= M.x_ref[s]
            ),
        )

    _switching(M, lay)
    _rates(M, lay)
    energy = sum(w * lay.dt_h * y(k, j) for j, w in lay.priced.items() for k in K)
    M.cost = pyo.Objective(
        expr=energy + lay.start_cost * sum(M.start[kb] for kb in M.start) + slack_cost,
        sense=pyo.minimize,
    )
    return M


def _switching(M: Any, lay: Layout) -> None:
    """Starts and stops of every binary input, their minimum run and rest, starts per
    window, and what earlier cycles impose (``milp_switching.Carry``)."""
    pyo = pyomo()
    n, bins = lay.n, range(len(lay.binary))
    K = range(n)
    M.prev_on = pyo.Param(bins, mutable=True, initialize=0.0)
    M.must_on = pyo.Param(K, bins, mutable=True, initialize=0.0)
    M.must_off = pyo.Param(K, bins, mutable=True, initialize=0.0)
    M.past_starts = pyo.Param(K, bins, mutable=True, initialize=0.0)
    M.start = pyo.Var(K, bins, domain=pyo.Binary)
    M.stop = pyo.Var(K, bins, domain=pyo.Binary)

    def on(k: int, b: int) -> Any:
        return M.u[k, lay.binary[b]]

    def prev(k: int, b: int) -> Any:
        return M.prev_on[b] if k == 0 else on(k - 1, b)

    M.switch = pyo.Constraint(
        K, bins, rule=lambda M, k, b: M.start[k, b] - M.stop[k, b] == on(k, b) - prev(k, b)
    )
    M.one_way = pyo.Constraint(K, bins, rule=lambda M, k, b: M.start[k, b] + M.stop[k, b] <= 1)
    up, down = lay.min_up, lay.min_down
    M.min_up = pyo.Constraint(
        K,
        bins,
        rule=lambda M, k, b: (
            sum(M.start[j, b] for j in range(max(0, k - up + 1), k + 1)) <= on(k, b)
        ),
    )
    M.min_down = pyo.Constraint(
        K,
        bins,
        rule=lambda M, k, b: (
            sum(M.stop[j, b] for j in range(max(0, k - down + 1), k + 1)) <= 1 - on(k, b)
        ),
    )
    M.keep_on = pyo.Constraint(K, bins, rule=lambda M, k, b: on(k, b) >= M.must_on[k, b])
    M.keep_off = pyo.Constraint(K, bins, rule=lambda M, k, b: on(k, b) <= 1 - M.must_off[k, b])
    if lay.max_starts is not None:
        w, most = lay.window, lay.max_starts
        M.starts_per_hour = pyo.Constraint(
            K,
            bins,
            rule=lambda M, k, b: (
                sum(M.start[j, b] for j in range(max(0, k - w + 1), k + 1)) + M.past_starts[k, b]
                <= most
            ),
        )


def _rates(M: Any, lay: Layout) -> None:
    """Rate limits of the continuous inputs; the first move is limited only when the
    applied input is known (``move0`` is ``BIG`` otherwise)."""
    pyo = pyomo()
    rated = [i for i in range(lay.nu) if i not in lay.binary and math.isfinite(lay.du_max[i])]
    M.u_prev = pyo.Param(range(lay.nu), mutable=True, initialize=0.0)
    M.move0 = pyo.Param(range(lay.nu), mutable=True, initialize=BIG)
    if not rated:
        return
    idx = [(k, i) for k in range(lay.n) for i in rated]

    def move(M: Any, k: int, i: int) -> Any:
        before = M.u_prev[i] if k == 0 else M.u[k - 1, i]
        limit = M.move0[i] if k == 0 else lay.du_max[i]
        return pyo.inequality(-limit, M.u[k, i] - before, limit)

    M.rate = pyo.Constraint(idx, rule=move)


def warm_highs() -> Any:
    """A persistent HiGHS that starts from ``start`` ((Pyomo var, value) pairs) when set."""
    from pyomo.contrib.solver.solvers.highs import Highs

    class WarmHighs(Highs):  # type: ignore[misc]
        start: list[tuple[Any, float]] | None = None  # (Pyomo var, value)
        start_accepted: bool | None = None

        def update_parameters(self) -> None:
            # HiGHS warns on the console for every zero written where its matrix has no
            # entry; a coefficient that is zero this cycle is expected here
            self._solver_model.setOptionValue("log_to_console", False)
            try:
                super().update_parameters()
            finally:
                self._solver_model.setOptionValue("log_to_console", True)

        def _solve(self) -> Any:
            self.start_accepted = None
            if self.start:
                self.start_accepted = self._set_start(self.start)
            return super()._solve()

        def _set_start(self, start: list[tuple[Any, float]]) -> bool:
            cols = self._pyomo_var_to_solver_var_map
            pairs = [(cols[id(v)], val) for v, val in start if id(v) in cols]
            if not pairs:
                return False
            idx = np.array([p[0] for p in pairs], dtype=np.int32)
            val = np.array([p[1] for p in pairs], dtype=np.float64)
            status = self._solver_model.setSolution(len(pairs), idx, val)
            return "Ok" in str(status)

    solver = WarmHighs()
    if not solver.available():
        raise ValueError("HiGHS (highspy) is not installed")
    # the model's structure never changes between steps: only look at parameters
    auto = solver.config.auto_updates
    auto.check_for_new_or_removed_constraints = False
    auto.check_for_new_or_removed_vars = False
    auto.check_for_new_or_removed_params = False
    auto.check_for_new_objective = False
    auto.update_constraints = False
    auto.update_vars = False
    auto.update_named_expressions = False
    auto.update_objective = False
    return solver
