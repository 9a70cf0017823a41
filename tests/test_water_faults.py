"""Water faults: leaks per district and worn pumps as model parameters that the EPANET plant
applies and the twin represents, diagnosed in the experiment loop on Net3."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from parallelcity.experiment.loop import closed_loop, scenario_of
from parallelcity.experiment.plan import RunSpec, apply_overrides, run_key
from parallelcity.models.water.districts import fault_layout
from parallelcity.models.water.epanet_plant import solve_snapshot
from parallelcity.models.water.faults import HEAD_LOSS, LEAK
from parallelcity.models.water.kind import water_info
from parallelcity.scenario.definition import Scenario, load_scenario
from parallelcity.scenario.text import tables_toml
from parallelcity.toml_file import parse_toml

ROOT = Path(__file__).resolve().parents[1]
NET3 = ROOT / "scenarios" / "water_net3" / "net3.toml"
NOISE = {  # as experiments/water_diagnosis.toml declares it
    "1.level": 0.1,
    "2.level": 0.1,
    "3.level": 0.02,
    "10.flow": 6.0,
    "335.flow": 6.0,
    "River.supply": 10.0,
    "153.pressure": 0.45,
    "15.pressure": 1.1,
    "253.pressure": 0.22,
}


@pytest.fixture(scope="module")
def net3() -> Scenario:
    return load_scenario(NET3)


def test_faults_are_declared_from_the_network(net3: Scenario) -> None:
    m = net3.model
    info = water_info(m)
    assert info is not None
    flt = fault_layout(info.network)
    # every junction in exactly one district, named by its nearest tank or source
    members = [j for d in flt.districts for j in d.junctions]
    assert sorted(members) == sorted(j.name for j in info.network.junctions)
    anchors = {t.name for t in info.network.tanks}
    assert {d.anchor for d in flt.districts} <= anchors
    kinds = {k.name: k for k in m.faults}
    assert set(kinds[LEAK].components) == {d.name for d in flt.districts}
    assert set(kinds[HEAD_LOSS].components) == {p.name for p in info.network.pumps}
    assert 0 < kinds[LEAK].min_size < kinds[LEAK].max_size
    assert 0.04 <= kinds[HEAD_LOSS].min_size < kinds[HEAD_LOSS].max_size == 0.5
    # nominal parameters are a healthy network: no leak, full head
    for name, v in zip(m.parameters, m.nominal, strict=True):
        if name.endswith(".leak"):
            assert v == 0.0
        if name.endswith(".head_scale"):
            assert v == 1.0


def test_the_plant_and_the_twin_agree_on_a_leak_and_a_worn_pump(net3: Scenario) -> None:
    """The plant applies the fault parameters through set_params; the twin's outputs move
    the same way (same sign, comparable size) for the flows that show them."""
    m = net3.model
    t0 = net3.meta.start_epoch
    d = np.asarray(m.forecast(t0, 1, 900.0)[0], dtype=float)
    u = np.array([1.0, 0.0, 0.0])  # pump 10 on
    i_leak = m.parameters.index("district_1.leak")
    i_head = m.parameters.index("10.head_scale")
    i_flow = m.outputs.index("10.flow")
    assert m.simulator is not None
    plant = m.simulator(m.nominal)
    try:
        plant.reset(m.x0, t0)
        healthy = plant.outputs(u, d)
        for i, value in ((i_leak, 150.0), (i_head, 0.8)):
            p = m.nominal.copy()
            p[i] = value
            plant.set_params(p)  # type: ignore[attr-defined]
            faulty = plant.outputs(u, d)
            plant.set_params(m.nominal)  # type: ignore[attr-defined]
            twin = (
                np.asarray(m.h(m.x0, u, d, p)).ravel()
                - np.asarray(m.h(m.x0, u, d, m.nominal)).ravel()
            )
            real = faulty[i_flow] - healthy[i_flow]
            assert np.sign(twin[i_flow]) == np.sign(real) != 0
            assert 0.5 < twin[i_flow] / real < 2.0
        assert np.allclose(plant.outputs(u, d), healthy, atol=0.01), "nominal restores it"
    finally:
        plant.close()  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def net3_closed() -> Scenario:
    tables, why = apply_overrides(parse_toml(NET3.read_text()), {"model.close_full_tanks": True})
    assert not why
    return scenario_of(
        RunSpec("t", 1, 1, False, tables_toml(tables), str(NET3), run_key(tables, 1, 1, 0))
    )


def test_the_twin_closes_a_full_tank_as_epanet_does(net3: Scenario, net3_closed: Scenario) -> None:
    """A full tank takes no more water: EPANET closes it, and with ``close_full_tanks`` the
    twin's flows follow (without it, the river pump's flow after tank 3 filled was off by
    hundreds of m3/h)."""
    m = net3_closed.model
    info = water_info(m)
    assert info is not None and m.simulator is not None
    t0 = net3.meta.start_epoch
    d = np.asarray(m.forecast(t0, 1, 900.0)[0], dtype=float)
    u = np.array([1.0, 1.0, 0.0])  # both pumps on, the bypass closed: tank 3 fills
    full = np.array(m.x0, dtype=float)
    full[2] = info.network.tanks[2].max_level_m
    q335 = m.outputs.index("335.flow")
    plant = m.simulator(m.nominal)
    try:
        _, inflow_below = solve_snapshot(plant, [*full[:2], full[2] - 0.5], u, d)
        assert inflow_below[2] > 0, "tank 3 would take water"
        y, inflow = solve_snapshot(plant, full, u, d)
    finally:
        plant.close()  # type: ignore[attr-defined]
    assert abs(inflow[2]) < 1e-6, "EPANET closes the full tank"
    closed = np.asarray(m.h(full, u, d, m.nominal)).ravel()
    still_open = np.asarray(net3.model.h(full, u, d, net3.model.nominal)).ravel()
    # the closure takes most of the error away; what is left is the affine fit's
    # extrapolation to the head at which the tank takes nothing (docs/models/water_network.md)
    assert abs(closed[q335] - y[q335]) < 0.5 * abs(still_open[q335] - y[q335])
    assert abs(closed[q335] - y[q335]) < 0.05 * y[q335]


def _run(fault: dict[str, Any], cycles: int) -> tuple[list[dict[str, Any]], float]:
    tables = parse_toml(NET3.read_text())
    over = {
        "controller": {"kind": "inp_rules"},  # the noise was measured under the file's rules
        "diagnosis": {"window_cycles": 8, "outlier_clip": 4.0, "noise": NOISE},
        "model.close_full_tanks": True,
        "rig.faults": [fault],
    }
    tables, why = apply_overrides(tables, over)
    assert not why
    spec = RunSpec("t", 3, cycles, False, tables_toml(tables), str(NET3), run_key(tables, 3, 1, 0))
    scenario = scenario_of(spec)
    result, _, _ = closed_loop(spec, scenario)
    return result.alarms, scenario.meta.start_epoch


@pytest.mark.slow
@pytest.mark.parametrize(
    "fault",
    [
        {"kind": LEAK, "component": "district_2", "size": 120.0, "start_s": 64800},
        {"kind": HEAD_LOSS, "component": "10", "size": 0.2, "start_s": 64800},
    ],
    ids=["leak", "head_loss"],
)
def test_a_planted_fault_on_net3_is_detected_and_isolated(fault: dict[str, Any]) -> None:
    """A leak in a district and a pump losing head, planted 18 h in (after the warm-up):
    the first alarm names the kind and the district or pump, with a size near the truth."""
    alarms, t0 = _run(fault, 36)
    assert alarms, "detected"
    first = alarms[0]
    assert (first["kind"], first["component"]) == (fault["kind"], fault["component"])
    assert first["raised_at"] - t0 >= fault["start_s"]
    assert abs(first["size"] - fault["size"]) <= 0.3 * fault["size"]
