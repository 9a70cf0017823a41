"""The water domain on EPANET: the network read from the .inp, the EPANET plant, the twin
identified from it, the inp_rules controller, and the simulated rig on top."""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from parallelcity.controllers.inp_rules import KIND as INP_RULES
from parallelcity.hil.plant import PlantSimulator, forecast_truth
from parallelcity.hil.simulated import Config as RigConfig
from parallelcity.hil.simulated import simulated_driver

from parallelcity.decide.control import ControlInput, ControlProblem
from parallelcity.models import pump_tank
from parallelcity.models.water.epanet_plant import EpanetPlant
from parallelcity.models.water.kind import Config, build, water_info
from parallelcity.models.water.network import load
from parallelcity.twin.model import SubsystemModel

NET3 = "wntr:Net3.inp"
NET1 = "wntr:Net1.inp"
HOUR = 3600.0
LEVEL_ERROR_24H_M = 0.75  # twin vs EPANET after 24 h under the file's own rules


@pytest.fixture(scope="module")
def net3() -> SubsystemModel:
    return build(Config(inp=NET3, step_s=900, critical_nodes={"153": 20.0, "15": 20.0}))


@pytest.fixture(scope="module")
def net1() -> SubsystemModel:
    return build(Config(inp=NET1, step_s=900))


def _problem(model: SubsystemModel, horizon: int = 24) -> ControlProblem:
    nu = model.nu
    return ControlProblem(model, HOUR, horizon, np.zeros(nu), np.ones(nu), np.full(nu, np.inf), ())


def _rules_loop(model: SubsystemModel, hours: int) -> tuple[list[np.ndarray], EpanetPlant]:
    """inp_rules closing the loop on an EPANET plant, hour by hour: the inputs applied."""
    ctrl = INP_RULES.create(INP_RULES.Config())
    ctrl.setup(_problem(model))
    plant = model.plant(model.nominal)
    assert isinstance(plant, EpanetPlant)
    plant.reset(model.x0, 0.0)
    u, applied = model.u0.copy(), []
    empty = np.zeros((25, 0))
    for k in range(hours):
        d = model.forecast(k * HOUR, 24, HOUR)
        res = ctrl.step(ControlInput(k * HOUR, plant.state, u, d, empty, empty))
        assert res.status.usable, res.message
        u = res.u_first
        applied.append(u)
        plant.step(u, d[0], HOUR)
    return applied, plant


def test_every_name_comes_from_the_inp(net3: SubsystemModel, net1: SubsystemModel) -> None:
    assert net3.states == ("1.level", "2.level", "3.level")
    assert net3.inputs == ("10.on", "335.on", "330.open")  # pipe 330 is switched by the rules
    assert net3.disturbances == (
        "demand.3", "demand.4", "demand.1", "demand.2", "demand.5", "tariff.price",
    )  # fmt: skip
    assert "River.supply" in net3.outputs and "153.pressure" in net3.outputs
    assert net1.states == ("2.level",) and net1.inputs == ("9.on",)
    assert net1.disturbances == ("demand.1", "tariff.price")
    assert net1.report.baseline == "inp_rules"
    tank = load(NET3).tanks[0]
    assert tank.max_level_m == pytest.approx(32.1 * 0.3048)  # feet in the file, m here


def test_the_forecast_follows_the_patterns_from_time0() -> None:
    time0 = 1_768_176_000.0  # 2026-01-12T00:00Z
    m = build(Config(inp=NET3, time0="2026-01-12T00:00:00Z", tariff=[(0, 0.1), (7, 0.3)]))
    d = m.forecast(time0, 24, HOUR)
    net = load(NET3)
    main = m.disturbances.index("demand.1")
    assert np.allclose(d[:, main], net.patterns["1"])
    assert d[6, -1] == pytest.approx(0.1) and d[7, -1] == pytest.approx(0.3)


def test_several_plants_coexist_in_one_process(net3: SubsystemModel) -> None:
    a, b = net3.plant(net3.nominal), net3.plant(net3.nominal)
    d = net3.forecast(0.0, 1, HOUR)[0]
    a.reset(net3.x0, 0.0)
    b.reset(net3.x0 + 1.0, 0.0)
    u = np.array([1.0, 1.0, 0.0])
    ya = a.outputs(u, d)
    for _ in range(3):
        b.step(u, d, HOUR)
    a2 = net3.plant(net3.nominal)
    a2.reset(net3.x0, 0.0)
    assert np.allclose(a2.outputs(u, d), ya)  # b's steps did not move a's project
    assert not np.allclose(b.state, a.state)


def test_the_plant_ignores_the_files_controls(net3: SubsystemModel) -> None:
    # the file closes pump 335 when tank 1 is above 5.82 m: the plant obeys its input only
    plant = net3.plant(net3.nominal)
    x0 = net3.x0.copy()
    x0[0] = 8.0
    plant.reset(x0, 0.0)
    d = net3.forecast(0.0, 1, HOUR)[0]
    u = np.array([0.0, 1.0, 0.0])
    plant.step(u, d, HOUR)
    assert plant.outputs(u, d)[net3.index("outputs", "335.flow")] > 100.0


def test_fault_hooks_leak_and_worn_pump(net3: SubsystemModel) -> None:
    plant = net3.plant(net3.nominal)
    assert isinstance(plant, EpanetPlant)
    d = net3.forecast(0.0, 1, HOUR)[0]
    u = np.array([1.0, 1.0, 0.0])
    plant.reset(net3.x0, 0.0)
    y0 = plant.outputs(u, d)
    supply = [net3.index("outputs", "River.supply"), net3.index("outputs", "Lake.supply")]
    drawn0 = y0[supply].sum() - plant.tank_inflows().sum()  # all the network consumes
    plant.set_leak("153", 50.0)  # 50 m3/h per sqrt(m): ~270 m3/h at its ~30 m
    y1 = plant.outputs(u, d)
    assert y1[supply].sum() - plant.tank_inflows().sum() > drawn0 + 150.0
    plant.set_leak("153", 0.0)
    q10 = net3.index("outputs", "10.flow")
    plant.scale_pump_head("10", 0.8)
    assert plant.outputs(u, d)[q10] < y0[q10] - 30.0  # less head against the same system
    plant.scale_pump_head("10", 1.0)
    assert plant.outputs(u, d)[q10] == pytest.approx(y0[q10], rel=1e-4)
    with pytest.raises(ValueError, match="not a pump"):
        plant.scale_pump_head("330", 0.8)


def test_twin_tracks_epanet_for_a_day_under_the_files_rules(
    net3: SubsystemModel, capsys: pytest.CaptureFixture[str]
) -> None:
    applied, plant = _rules_loop(net3, 24)
    xs, _ = net3.simulate(
        net3.x0, np.array(applied), net3.forecast(0.0, 24, HOUR), net3.nominal, HOUR
    )
    err = np.abs(xs[-1] - plant.state)
    with capsys.disabled():
        print(f"\nNet3 tank level error after 24 h (m): {np.round(err, 3)}")
    assert np.all(err < LEVEL_ERROR_24H_M), err
    fit = water_info(net3)
    assert fit is not None and fit.identified.samples >= 8 * 20


def test_inp_rules_runs_the_files_timer_and_level_controls(net3: SubsystemModel) -> None:
    """Pump 10's timer (on 1-15 h, 25-39 h ...) exactly; pump 335 and pipe 330 switch
    together on tank 1's level as EPANET's own run of the file does."""
    import wntr

    applied, plant = _rules_loop(net3, 48)
    u = np.array(applied)
    timer = np.array([1.0 if 1 <= h % 24 < 15 else 0.0 for h in range(48)])
    assert np.array_equal(u[:, 0], timer)
    assert np.array_equal(u[:, 1], 1.0 - u[:, 2])  # pump on, bypass closed, and back
    assert plant.kpis()["pump_starts"] >= 2
    wn = wntr.network.WaterNetworkModel(str(load(NET3).source))
    wn.options.time.duration = 48 * 3600
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = wntr.sim.EpanetSimulator(wn).run_sim(file_prefix=os.path.join(tmp, "r"))
    own = res.link["status"]["335"].to_numpy()[:48]
    agree = np.mean((own > 0.5) == (u[:, 1] > 0.5))
    assert agree >= 0.8, agree  # hourly decisions against EPANET's continuous switching


def test_inp_rules_refuses_a_model_of_another_kind() -> None:
    other = pump_tank.build(pump_tank.Config())
    problems = INP_RULES.check(INP_RULES.Config(), _problem(other))
    assert problems and "water_network" in problems[0]


def test_simulated_rig_draws_demand_and_steps_epanet(net3: SubsystemModel) -> None:
    cfg = RigConfig(
        seed=1,
        field_seed=2,
        parameter_spread=0.2,
        spread_parameters=["demand.scale"],
        samples=3,
        sample_forecast_error={"demand.1": 0.1},
    )
    driver = simulated_driver(cfg, net3)
    scales = {float(p[0]) for p in driver.params}
    assert len(scales) == 3 and all(0.8 <= s <= 1.2 for s in scales)
    u = np.tile(net3.u0, (6, 1))
    d = net3.forecast(0.0, 6, HOUR)
    finals = []
    for sample in range(3):
        driver.reset(net3.x0, 0.0, sample)
        ys = driver.trace(u, d, HOUR)
        assert ys.shape == (7, net3.ny) and np.all(np.isfinite(ys))
        finals.append(ys[-1, :3])
    assert not np.allclose(finals[0], finals[1])
    # the field stand-in's plant: EPANET advanced in steps of at most a minute
    truth = forecast_truth(net3, {"demand.1": 0.05}, 2)
    field = PlantSimulator(net3, net3.nominal, truth, net3.x0, net3.u0, 0.0)
    field.advance(2 * HOUR)
    assert np.all(np.isfinite(field.outputs()))


def _net1_with_a_prv(folder: Path) -> Path:
    """Net1 with node 32 fed only through a pressure-reducing valve (from junction 22)."""
    import wntr

    wn = wntr.network.WaterNetworkModel(str(load(NET1).source))
    wn.remove_link("31")
    wn.remove_link("122")
    wn.add_valve("v1", "22", "32", diameter=0.152, valve_type="PRV", initial_setting=40.0)
    path = folder / "net1_prv.inp"
    wntr.network.write_inpfile(wn, str(path))
    return path


def test_a_valve_is_an_input_of_plant_and_twin(tmp_path: Path) -> None:
    """A network other than Net3, with a valve, from a relative path of a scenario."""
    from parallelcity.models.water.skeleton import skeleton
    from parallelcity.scenario.definition import load_scenario

    inp = _net1_with_a_prv(tmp_path)
    text = skeleton(str(inp)).replace(f'inp = "{inp.resolve()}"', 'inp = "net1_prv.inp"')
    if '\n"32" = ' not in text:  # the valve's node is usually a candidate already
        text = text.replace("[model.critical_nodes]", '[model.critical_nodes]\n"32" = 10.0', 1)
    assert 'name = "v1.setting"' in text and 'inp = "net1_prv.inp"' in text
    scenario = tmp_path / "prv.toml"
    scenario.write_text(text)
    model = load_scenario(scenario).model  # the .inp resolves against the scenario's folder
    assert "v1.setting" in model.inputs and "32.pressure" in model.outputs
    plant = model.plant(model.nominal)
    plant.reset(model.x0, 0.0)
    d = model.forecast(0.0, 1, HOUR)[0]
    col, out = model.index("inputs", "v1.setting"), model.index("outputs", "32.pressure")
    for setting in (30.0, 40.0):
        u = np.array(model.u0, dtype=float)
        u[model.index("inputs", "9.on")] = 1.0
        u[col] = setting
        measured = plant.outputs(u, d)[out]
        assert measured == pytest.approx(setting, abs=0.5)
        predicted = np.asarray(model.h(model.x0, u, d, model.nominal)).ravel()[out]
        assert predicted == pytest.approx(measured, abs=3.0)


def test_the_fit_per_combination_is_the_twins_relation(net3: SubsystemModel) -> None:
    info = water_info(net3)
    assert info is not None
    u = np.array([1.0, 0.0, 1.0])  # 10 on, 335 off, bypass open
    c, levels, demand, _ = info.identified.affine(u)
    d = net3.forecast(0.0, 1, HOUR)[0]
    totals = np.array(list(info.network.group_totals().values()))
    flows = c + levels @ net3.x0 + demand @ (totals * d[:-1])
    y = np.asarray(net3.h(net3.x0, u, d, net3.nominal)).ravel()
    nt = net3.nx
    assert np.allclose(flows[nt : nt + 2], y[nt : nt + 2])  # pump flows, after the inflows


RULES = """[RULES]
RULE fill
IF TANK 2 LEVEL BELOW 140
THEN PUMP 9 STATUS IS OPEN
ELSE PUMP 9 STATUS IS CLOSED
PRIORITY 1

RULE morning_peak_off
IF SYSTEM CLOCKTIME >= 6:00
AND SYSTEM CLOCKTIME < 8:00
AND TANK 2 LEVEL ABOVE 115
THEN PUMP 9 STATUS IS CLOSED
PRIORITY 5
"""


@pytest.mark.parametrize(
    ("hour", "level_ft", "pump_on"),
    [
        (3.0, 120.0, 1.0),  # fill below 140 ft
        (7.0, 120.0, 0.0),  # the higher-priority rule wins in the morning peak
        (7.0, 112.0, 1.0),  # ... unless the tank is low
        (10.0, 145.0, 0.0),  # ELSE of the fill rule
    ],
)
def test_inp_rules_run_rules_with_else_priority_and_clock_time(
    tmp_path: Path, hour: float, level_ft: float, pump_on: float
) -> None:
    text = Path(load(NET1).source).read_text()
    text = text.replace(" LINK 9 OPEN IF NODE 2 BELOW 110\n", "")
    text = text.replace(" LINK 9 CLOSED IF NODE 2 ABOVE 140\n", "")
    text = text.replace("[RULES]\n", RULES)
    inp = tmp_path / "net1_rules.inp"
    inp.write_text(text)
    model = build(Config(inp=str(inp), step_s=900))
    info = water_info(model)
    assert info is not None and {r.name for r in info.network.rules} == {
        "fill", "morning_peak_off",
    }  # fmt: skip
    ctrl = INP_RULES.create(INP_RULES.Config())
    ctrl.setup(_problem(model, horizon=2))
    t0 = hour * HOUR
    empty = np.zeros((3, 0))
    x0 = np.array([level_ft * 0.3048])
    inp_ = ControlInput(
        t0, x0, 1.0 - np.array([pump_on]), model.forecast(t0, 2, HOUR), empty, empty
    )
    res = ctrl.step(inp_)
    assert res.status.usable, res.message
    assert res.u_plan[0, 0] == pump_on
