"""The benchmarks import and run one short step without do-mpc (never their timings)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks import controllers_vs_dompc, milp_reuse


@pytest.mark.slow
def test_cstr_benchmark_runs_our_side_without_do_mpc() -> None:
    paths = {"ipopt": {"solver": "ipopt", "tol": 1e-8}, "fatrop": {"solver": "fatrop", "tol": 1e-8}}
    rows = controllers_vs_dompc.run_cstr(2, paths=paths, with_dompc=False)
    costs = {row["name"]: row["costs"] for row in rows}
    assert all(math.isfinite(c) for c in costs["ipopt"] + costs["fatrop"])
    # the two paths solve the same NLP: the same optimum
    np.testing.assert_allclose(costs["fatrop"], costs["ipopt"], rtol=1e-5)


def test_masses_controller_keeps_its_bounds() -> None:
    ctrl = controllers_vs_dompc.our_masses(20, "daqp")
    r = ctrl.solve(controllers_vs_dompc.masses_x0(), np.zeros(2))
    assert r.status.usable and np.all(np.abs(r.u_plan) <= 0.5 + 1e-9)


@pytest.mark.slow
def test_milp_reuse_benchmark_runs_a_few_steps() -> None:
    out = milp_reuse.run(steps=2, horizon=6, gap=1e-2)
    assert out["re-use_ms"] > 0 and out["rebuild_ms"] > 0
