"""The shipped Net3 scenario's milp_pump schedule over a few hourly cycles on its own
twin: every plan keeps the pumps' minimum run and rest times and starts per hour across
the cycles already applied, holds the tank and pressure bands, and ends its horizon
with every tank at least as full as at the cycle's start on the MILP's own form (the run's
end, which makes the energy comparison with the network's own rules fair, is not within
these cycles' horizons)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from parallelcity import plugins

SCENARIO = Path(__file__).resolve().parents[1] / "scenarios" / "water_net3" / "net3.toml"
CYCLES = 3
TOL_M = 0.01  # a centimetre: the twin's simulation against the MILP's affine form


def _runs(seq: list[int], value: int) -> list[tuple[int, int]]:
    """(start, length) of each run of ``value`` in ``seq``."""
    out, k = [], 0
    while k < len(seq):
        j = k
        while j < len(seq) and seq[j] == seq[k]:
            j += 1
        if seq[k] == value:
            out.append((k, j - k))
        k = j
    return out


@pytest.mark.slow
def test_net3_schedule_keeps_switching_limits_bands_and_terminal_volume() -> None:
    pytest.importorskip("parallelcity.models.water.kind")
    from parallelcity.scenario.definition import load_scenario
    from parallelcity.twin.twin import Twin

    sc = load_scenario(SCENARIO)
    cfg: Any = sc.controller_config
    assert sc.file.controller.kind == "milp_pump" and sc.file.fallback.kind == "inp_rules"
    m, specs = sc.model, sc.safety_specs()
    dt, n = sc.meta.cycle_s, sc.meta.horizon_steps
    ctrl = plugins.controller_kind("milp_pump").create(cfg)
    ctrl.setup(specs.control_problem(m, dt, n))
    twin = Twin(m, specs, dt, n)
    binary = [m.index("inputs", name) for name in m.inputs if name.endswith(".on")]
    levels = [m.index("states", s) for s in m.states if s.endswith(".level")]
    assert binary and levels
    x, u = m.x0.copy(), m.u0.copy()
    applied: list[np.ndarray] = []
    period = 3600.0 / dt
    deadline = time.monotonic() + 35.0
    for c in range(CYCLES):
        assert time.monotonic() < deadline, f"cycle {c}: past the test's time budget"
        t = sc.meta.start_epoch + c * dt
        r = ctrl.step(twin.control_input(t, x, u, deadline_s=sc.meta.deadline))
        assert r.status.usable, (c, r.message)
        assert r.solve_time_s <= cfg.time_limit_s + 2.0, (c, r.solve_time_s)
        plan = np.round(r.u_plan)
        for i in binary:
            seq = [int(a[i] > 0.5) for a in applied] + [int(v) for v in plan[:, i]]
            # runs and rests that begin and end inside the known sequence are long enough
            for start, length in _runs(seq, 1):
                if start > 0 and start + length < len(seq):
                    assert length >= cfg.min_up, (c, m.inputs[i], seq)
            for start, length in _runs(seq, 0):
                if start > 0 and start + length < len(seq):
                    assert length >= cfg.min_down, (c, m.inputs[i], seq)
            starts = [k for k in range(1, len(seq)) if seq[k] == 1 and seq[k - 1] == 0]
            window = max(1, int(np.ceil(period)))
            for k in starts:
                assert sum(k <= s < k + window for s in starts) <= cfg.max_starts_per_hour
        lo, hi = specs.band_arrays(t, n + 1, dt)
        for b, j in enumerate(specs.banded_outputs):
            assert np.all(r.y_pred[1:, j] >= lo[1:, b] - TOL_M), (c, m.outputs[j])
            assert np.all(r.y_pred[1:, j] <= hi[1:, b] + TOL_M), (c, m.outputs[j])
        assert r.extra["band_slack"] == 0.0 and r.extra["terminal_slack"] == 0.0, r.extra
        # the terminal constraint holds on the MILP's own form: no shortfall was paid for
        assert all(np.isfinite(r.x_pred[-1, s]) for s in levels)
        u = r.u_first
        applied.append(u.copy())
        x = r.x_pred[1].copy()
