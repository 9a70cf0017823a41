"""Linear MPC (condensed QP): LQR equality, constraints, statuses, with the real QP solvers."""

from __future__ import annotations

import numpy as np
import pytest
from parallelcity.controllers.linear_mpc import LinearMpc, dare, lqr_gain

from parallelcity.decide.control import SolveStatus

SOLVERS = ("qpoases", "daqp", "osqp")


def riccati_by_iteration(A: np.ndarray, B: np.ndarray, Q: np.ndarray, R: np.ndarray) -> np.ndarray:
    """The plain Riccati recursion run to its fixed point: a reference independent of
    the doubling algorithm the library uses."""
    P = Q.copy()
    for _ in range(100_000):
        K = np.linalg.solve(R + B.T @ P @ B, B.T @ P @ A)
        nxt = Q + A.T @ P @ (A - B @ K)
        if np.max(np.abs(nxt - P)) < 1e-15 * max(1.0, np.max(np.abs(P))):
            return nxt
        P = nxt
    raise AssertionError("the Riccati recursion did not converge")


def random_system(seed: int, nx: int = 4, nu: int = 2) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(nx, nx))
    A *= 1.05 / max(abs(np.linalg.eigvals(A)))  # open-loop unstable, but not wildly
    B = rng.normal(size=(nx, nu))
    M = rng.normal(size=(nx, nx))
    Q = M @ M.T + 0.1 * np.eye(nx)
    N = rng.normal(size=(nu, nu))
    R = N @ N.T + 0.1 * np.eye(nu)
    return A, B, Q, R


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_riccati_solution_matches_the_plain_recursion(seed: int) -> None:
    A, B, Q, R = random_system(seed)
    P = dare(A, B, Q, R)
    ref = riccati_by_iteration(A, B, Q, R)
    assert np.max(np.abs(P - ref)) <= 1e-10 * np.max(np.abs(ref))
    K, _ = lqr_gain(A, B, Q, R)
    assert max(abs(np.linalg.eigvals(A - B @ K))) < 1.0  # stabilising


@pytest.mark.parametrize("solver", [*SOLVERS, "shortcut"])
@pytest.mark.parametrize("horizon", [1, 5, 30])
def test_unconstrained_mpc_with_lqr_terminal_cost_is_the_lqr_law(solver: str, horizon: int) -> None:
    for seed in (0, 1, 2):
        A, B, Q, R = random_system(seed)
        P = riccati_by_iteration(A, B, Q, R)
        K = np.linalg.solve(R + B.T @ P @ B, B.T @ P @ A)
        if solver == "shortcut":  # no QP solver: the precomputed unconstrained minimiser
            mpc = LinearMpc(A, B, Q, R, horizon, P="lqr")
        else:  # the QP solver itself (the shortcut off)
            mpc = LinearMpc(A, B, Q, R, horizon, P="lqr", solver=solver, shortcut=False)  # type: ignore[arg-type]
        rng = np.random.default_rng(100 + seed)
        for _ in range(3):
            x0 = rng.normal(size=4)
            r = mpc.solve(x0)
            assert r.status is SolveStatus.SOLVED, r.message
            assert (r.extra["qp_solver"] == "none") == (solver == "shortcut")
            np.testing.assert_allclose(r.u_plan[0], -K @ x0, rtol=0, atol=1e-8)
            # the whole plan is the LQR closed loop, and the cost is x0' P x0
            x = x0
            for k in range(horizon):
                np.testing.assert_allclose(r.u_plan[k], -K @ x, rtol=0, atol=1e-7)
                x = A @ x + B @ r.u_plan[k]
            assert r.cost == pytest.approx(float(x0 @ P @ x0), rel=1e-8)


def masses() -> tuple[np.ndarray, np.ndarray]:
    A = np.array(
        [
            [0.96033209, 0.19734663, 0.01973449, 0.0013227],
            [-0.39337056, 0.96033209, 0.19470123, 0.01973449],
            [0.01973449, 0.0013227, 0.96033209, 0.19734663],
            [0.19470123, 0.01973449, -0.39337056, 0.96033209],
        ]
    )
    B = np.array(
        [
            [1.98671102e-02, 6.63119354e-05],
            [1.97346631e-01, 1.32269963e-03],
            [6.63119354e-05, 1.98671102e-02],
            [1.32269963e-03, 1.97346631e-01],
        ]
    )
    return A, B


def test_constrained_solvers_agree_and_keep_the_bounds() -> None:
    A, B = masses()
    x_max = np.array([4.0, 10.0, 4.0, 10.0])
    plans, costs = [], []
    for solver in SOLVERS:
        mpc = LinearMpc(
            A,
            B,
            np.eye(4),
            np.zeros((2, 2)),
            20,
            shortcut=False,
            P=np.eye(4),
            Rd=1e-4 * np.eye(2),
            u_min=-0.5,
            u_max=0.5,
            x_min=-x_max,
            x_max=x_max,
            solver=solver,  # type: ignore[arg-type]
        )
        x, u_prev = np.array([2.5, -1.0, -2.0, 1.5]), np.zeros(2)
        first = None
        for _ in range(15):  # closed loop, warm-started
            r = mpc.solve(x, u_prev)
            assert r.status is SolveStatus.SOLVED, (solver, r.message)
            assert np.all(np.abs(r.u_plan) <= 0.5 + 1e-9)
            assert np.all(np.abs(r.x_pred[1:]) <= x_max + 1e-6)
            first = r if first is None else first
            x, u_prev = A @ x + B @ r.u_first, r.u_first
        plans.append(first.u_plan)
        costs.append(first.cost)
        assert np.any(np.isclose(np.abs(first.u_plan), 0.5))  # the input bound is active
    for plan, cost in zip(plans[1:], costs[1:], strict=True):
        np.testing.assert_allclose(plan, plans[0], atol=2e-4)
        assert cost == pytest.approx(costs[0], rel=1e-6)


@pytest.mark.parametrize("solver", SOLVERS)
def test_state_bounds_that_cannot_hold_are_infeasible(solver: str) -> None:
    A, B = masses()
    mpc = LinearMpc(
        A,
        B,
        np.eye(4),
        np.eye(2),
        10,
        u_min=-0.5,
        u_max=0.5,
        x_min=-np.ones(4),
        x_max=np.ones(4),
        solver=solver,  # type: ignore[arg-type]
    )
    assert mpc.solve(np.array([0.5, 0.0, 0.0, 0.0])).status is SolveStatus.SOLVED
    # moving at 8 while the bound is 1: no input within 0.5 brings it back in one step
    r = mpc.solve(np.array([0.0, 8.0, 0.0, 0.0]))
    assert r.status is SolveStatus.INFEASIBLE, r.message
    assert np.all(np.isnan(r.u_plan)) and np.isnan(r.cost)
    # and the next feasible problem solves again
    assert mpc.solve(np.array([0.5, 0.0, 0.0, 0.0])).status is SolveStatus.SOLVED


def test_affine_term_shifts_the_prediction() -> None:
    A, B = masses()
    mpc = LinearMpc(A, B, np.eye(4), np.eye(2), 6)
    e = np.tile([0.1, 0.0, -0.1, 0.0], (6, 1))
    r = mpc.solve(np.ones(4), e=e)
    assert r.status is SolveStatus.SOLVED
    x = np.ones(4)
    for k in range(6):
        x = A @ x + B @ r.u_plan[k] + e[k]
        np.testing.assert_allclose(r.x_pred[k + 1], x, atol=1e-12)


def test_bad_setup_is_refused() -> None:
    A, B = masses()
    with pytest.raises(ValueError, match="Q must be 4x4"):
        LinearMpc(A, B, np.eye(3), np.eye(2), 5)
    with pytest.raises(ValueError, match="horizon"):
        LinearMpc(A, B, np.eye(4), np.eye(2), 0)
    with pytest.raises(ValueError, match="not available"):
        LinearMpc(A, B, np.eye(4), np.eye(2), 5, solver="nope")  # type: ignore[arg-type]


def test_the_shortcut_gives_the_qp_solution_whether_or_not_bounds_are_active() -> None:
    A, B = masses()
    x_max = np.array([4.0, 10.0, 4.0, 10.0])
    kw = dict(P=np.eye(4), Rd=1e-4 * np.eye(2), u_min=-0.5, u_max=0.5, x_min=-x_max, x_max=x_max)
    fast = LinearMpc(A, B, np.eye(4), np.zeros((2, 2)), 20, **kw)  # type: ignore[arg-type]
    plain = LinearMpc(A, B, np.eye(4), np.zeros((2, 2)), 20, shortcut=False, **kw)  # type: ignore[arg-type]
    x, u_prev = np.array([2.5, -1.0, -2.0, 1.5]), np.zeros(2)
    used = set()
    for _ in range(100):  # saturated at first, inside the bounds once the masses calm down
        a, b = fast.solve(x, u_prev), plain.solve(x, u_prev)
        assert a.status is SolveStatus.SOLVED and b.status is SolveStatus.SOLVED
        used.add(a.extra["qp_solver"])
        np.testing.assert_allclose(a.u_plan, b.u_plan, atol=1e-6)
        assert a.cost == pytest.approx(b.cost, rel=1e-7, abs=1e-10)
        x, u_prev = A @ x + B @ a.u_first, a.u_first
    assert used == {"daqp", "none"}  # both paths were taken


@pytest.mark.parametrize("solver", SOLVERS)
def test_dense_qp_with_changing_matrices_matches_the_kkt_solution(solver: str) -> None:
    """``DenseQp`` (the QP layer of the ``linear_mpc`` kind): a new H and A every solve;
    with no active bound the unconstrained minimiser is taken without the solver, and
    with active bounds every solver finds the same point as the others."""
    from parallelcity.controllers.linear_mpc import DenseQp

    rng = np.random.default_rng(7)
    nv, na = 12, 5
    qp = DenseQp(nv, na, solver)  # type: ignore[arg-type]
    plain = DenseQp(nv, na, "qpoases", shortcut=False)
    used = []
    for trial in range(6):
        M = rng.normal(size=(nv, nv))
        H = M @ M.T + 0.5 * np.eye(nv)
        g = rng.normal(size=nv)
        A = rng.normal(size=(na, nv))
        free = -np.linalg.solve(H, g)
        width = 10.0 if trial % 2 == 0 else 0.05  # loose: nothing active; tight: active
        lbx, ubx = free - width * np.abs(free) - 1e-3, free + 0.5 * width * np.abs(free)
        rows = A @ free
        lba, uba = rows - 1.0, rows + 1.0
        if trial % 2:
            ubx = np.minimum(ubx, free - 0.1)  # the free minimiser breaks these bounds
            lbx = np.minimum(lbx, ubx - 1.0)
        r = qp.solve(H, g, A, lba, uba, lbx, ubx)
        ref = plain.solve(H, g, A, lba, uba, lbx, ubx)
        assert r.status is SolveStatus.SOLVED and ref.status is SolveStatus.SOLVED
        used.append(r.solver)
        np.testing.assert_allclose(r.v, ref.v, atol=1e-6)
        assert r.cost == pytest.approx(ref.cost, rel=1e-7, abs=1e-9)
        if trial % 2 == 0:
            np.testing.assert_allclose(r.v, free, atol=1e-9)
    assert "none" in used and solver in used
    r = qp.solve(H, g, A, lba, uba, ubx + 1.0, ubx)  # bounds that cross
    assert r.status is SolveStatus.INFEASIBLE and np.all(np.isnan(r.v))


@pytest.mark.parametrize("horizon", [20, 50])
def test_the_active_set_of_the_last_plan_gives_the_qp_solution(horizon: int) -> None:
    """From a start that saturates the inputs, in closed loop:
    the guess from the last plan's active set (KKT-checked) gives the QP solver's plan
    and cost at every step, and is what solves most saturated steps."""
    A, B = masses()
    x_max = np.array([4.0, 10.0, 4.0, 10.0])
    kw = dict(P=np.eye(4), Rd=1e-4 * np.eye(2), u_min=-0.5, u_max=0.5, x_min=-x_max, x_max=x_max)
    fast = LinearMpc(A, B, np.eye(4), np.zeros((2, 2)), horizon, **kw)  # type: ignore[arg-type]
    plain = LinearMpc(A, B, np.eye(4), np.zeros((2, 2)), horizon, shortcut=False, **kw)  # type: ignore[arg-type]
    x0 = 6.0 * (np.random.default_rng(99).random(4) - 0.5)  # the benchmark's far start
    x, u_prev = x0, np.zeros(2)
    paths: dict[str, int] = {}
    for _ in range(60):
        a, b = fast.solve(x, u_prev), plain.solve(x, u_prev)
        assert a.status is SolveStatus.SOLVED and b.status is SolveStatus.SOLVED
        paths[a.extra["return_status"]] = paths.get(a.extra["return_status"], 0) + 1
        np.testing.assert_allclose(a.u_plan, b.u_plan, atol=1e-6)
        assert a.cost == pytest.approx(b.cost, rel=1e-8)
        assert np.all(np.abs(a.x_pred[1:]) <= x_max + 1e-6)
        x, u_prev = A @ x + B @ a.u_first, a.u_first
    guessed = paths.get("active set of the last plan", 0)
    saturated = 60 - paths.get("no constraint active", 0)
    assert guessed >= saturated // 2, paths
    # off, the QP solver does every constrained step
    off = LinearMpc(A, B, np.eye(4), np.zeros((2, 2)), horizon, active_set_iterations=0, **kw)  # type: ignore[arg-type]
    r = off.solve(x0, np.zeros(2))
    r = off.solve(A @ x0 + B @ r.u_first, r.u_first)
    assert r.extra["return_status"] != "active set of the last plan"
    with pytest.raises(ValueError, match="active_set_iterations"):
        LinearMpc(A, B, np.eye(4), np.eye(2), 5, active_set_iterations=-1)
