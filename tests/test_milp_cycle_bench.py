"""benchmarks/milp_cycle.py runs a few cycles (never its timings)."""

from __future__ import annotations

from benchmarks import milp_cycle


def test_the_cycle_benchmark_runs_cold_and_warm_starts_a_few_cycles() -> None:
    out = milp_cycle.run(cycles=3, horizon=8, deadline_s=30.0)
    assert out["unusable"] == 0 and out["accepted"] == 2
    assert out["cold start"]["p50_ms"] > 0 and out["warm start"]["p50_ms"] > 0
    assert out["worst_cost_diff"] <= 1e-6
