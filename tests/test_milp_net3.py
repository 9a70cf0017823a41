"""milp_pump on EPANET's Net3 (the water_network model kind): one cycle planned within the
scenario's deadline, with the pumps on/off and the bands held on the twin."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from parallelcity import plugins

SCENARIO = Path(__file__).resolve().parents[1] / "scenarios" / "water_net3" / "net3.toml"
MILP = """[controller]
kind = "milp_pump"
min_up = 1
terminal_slack_m = 0.5
mip_rel_gap = 0.01
"""


@pytest.mark.slow
def test_one_cycle_on_net3_is_planned_within_the_deadline() -> None:
    pytest.importorskip("parallelcity.models.water.kind")
    if not SCENARIO.exists():
        pytest.skip("no Net3 scenario in this tree")
    from parallelcity.scenario.definition import parse_scenario
    from parallelcity.twin.twin import Twin

    text = SCENARIO.read_text()
    start = text.index("[controller]")
    end = text.index("[", text.index("\n", start))  # the next table
    sc = parse_scenario(text[:start] + MILP + "\n" + text[end:], SCENARIO)
    m, specs = sc.model, sc.safety_specs()
    dt, n, deadline = sc.meta.cycle_s, sc.meta.horizon_steps, sc.meta.deadline_s
    ctrl = plugins.controller_kind("milp_pump").create(sc.controller_config)
    ctrl.setup(specs.control_problem(m, dt, n))
    twin = Twin(m, specs, dt, n)
    r = ctrl.step(twin.control_input(sc.meta.start_epoch, m.x0, m.u0, deadline_s=deadline))
    assert r.status.usable, r.message
    assert r.solve_time_s < deadline
    assert set(np.unique(r.u_plan)) <= {0.0, 1.0}
    assert r.extra["band_slack"] == 0.0 and r.extra["terminal_slack"] == 0.0
    for j in specs.banded_outputs:
        lo, hi = specs.band_arrays(sc.meta.start_epoch, n + 1, dt)
        k = list(specs.banded_outputs).index(j)
        # the twin's own simulation of the plan, within a centimetre of what the MILP saw
        assert np.all(r.y_pred[1:, j] >= lo[1:, k] - 0.01), m.outputs[j]
        assert np.all(r.y_pred[1:, j] <= hi[1:, k] + 0.01), m.outputs[j]
