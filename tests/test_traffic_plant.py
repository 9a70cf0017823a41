"""The SUMO plant on a generated grid: it measures what SUMO shows, installs the signal
controller's programs only at cycle boundaries, runs reproducible traffic per parameter
draw, matches a verification state, and leaves no sumo process behind."""

from __future__ import annotations

import gc
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from parallelcity.models.traffic.sumo_plant import SumoPlant, derived_seed

from .traffic_nets import grid, plain_model

BEGIN = 1_772_431_200.0  # 2026-03-02T06:00:00Z


@pytest.fixture(scope="module")
def net_model(tmp_path_factory: pytest.TempPathFactory):
    cfg = grid(tmp_path_factory.mktemp("grid"), veh_per_h=400.0)
    return plain_model(cfg, BEGIN, extra_outputs=("network.teleports",))


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "zombie" not in f.read()
    except FileNotFoundError:
        return False


def _own(model) -> np.ndarray:
    return np.array(model.u0, dtype=float)


def test_plant_measures_what_sumo_shows_and_closes(net_model) -> None:
    net, model = net_model
    plant = model.plant(model.nominal)
    assert isinstance(plant, SumoPlant)
    plant.reset(model.x0, BEGIN + 600.0)
    d = np.zeros(model.nd)
    for _ in range(8):
        plant.step(_own(model), d, 90.0)
    conn = plant._conn
    assert conn.simulation.getTime() == 600.0 + 720.0
    halting = [conn.edge.getLastStepHaltingNumber(a.edge) for a in net.approaches]
    np.testing.assert_array_equal(plant.state, halting)
    y = dict(zip(model.outputs, plant.outputs(_own(model), d), strict=True))
    flows = [y[f"{a.edge}.flow"] for a in net.approaches]
    occ = [y[f"{a.edge}.occupancy"] for a in net.approaches]
    assert sum(flows) > 0 and all(f >= 0 for f in flows)
    assert all(0 <= o <= 100 for o in occ) and max(occ) > 0
    assert y["network.teleports"] == 0
    for j in net.junctions:  # only the program's own states are ever shown
        assert conn.trafficlight.getRedYellowGreenState(j.tls) in {p.state for p in j.phases}
    flow_at = [model.outputs.index(f"{a.edge}.flow") for a in net.approaches]
    flows = []
    for _ in range(120):  # as the field stand-in steps it: a fraction of a second per tick
        plant.step(_own(model), d, 0.5)
        flows.append(plant.outputs(_own(model), d)[flow_at])
    jumps = np.abs(np.diff(np.array(flows), axis=0))
    # a mean over the last 90 s moves by 40 veh/h a vehicle, not by 3600 (one second's)
    assert np.sum(flows[-1]) > 0 and jumps.max() <= 8 * 3600.0 / 90.0
    pid = plant.process.pid
    k = plant.kpis()  # ends the run: SUMO writes the trips still under way
    assert not _alive(pid)
    assert k["throughput_veh"] > 0 and k["teleports"] == 0 and k["time_loss_s"] > 0
    assert k["in_network_veh"] > 0  # the run stopped with vehicles on their way: counted
    assert k["max_queue_veh"] >= max(halting)
    plant.close()
    assert plant.kpis() == k  # outputs outlive the process


def test_a_plan_takes_effect_at_the_next_cycle_boundary(net_model) -> None:
    net, model = net_model
    plant = model.plant(model.nominal)
    try:
        plant.reset(model.x0, BEGIN)
        d = np.zeros(model.nd)
        plant.step(_own(model), d, 30.0)
        u = _own(model).copy()
        j0 = net.junctions[0]
        u[0], u[1], u[2] = 0.7, 100.0, 20.0  # split, cycle, offset of the first junction
        for _ in range(12):
            plant.step(u, d, 30.0)
        ours = [c for tls, c in plant.cycles if tls == j0.tls]
        first_plan = next(i for i, c in enumerate(ours) if not c.own)
        assert ours[first_plan].start_s == ours[first_plan - 1].end_s >= 30.0
        assert all(ours[i].start_s == ours[i - 1].end_s for i in range(1, len(ours)))
        last = ours[-1]
        assert last.length_s == 100.0 and (last.start_s - 20.0) % 100.0 == 0
        assert len(plant.received) == 2
    finally:
        plant.close()


def test_each_parameter_draw_runs_its_own_reproducible_traffic(net_model) -> None:
    _, model = net_model
    scaled = model.params({"demand.scale": 1.3})
    assert derived_seed(model.nominal, 0) != derived_seed(scaled, 0)
    runs = []
    for params in (model.nominal, model.nominal, scaled):
        plant = model.plant(params)
        plant.reset(model.x0, BEGIN)
        for _ in range(4):
            plant.step(_own(model), np.zeros(model.nd), 90.0)
        plant.close()
        runs.append(plant.kpis())
    assert runs[0] == runs[1]
    assert runs[2]["throughput_veh"] != runs[0]["throughput_veh"]


def test_a_verification_reset_matches_the_state_and_is_repeatable(net_model) -> None:
    net, model = net_model
    plant = model.plant(model.nominal)
    try:
        plant.reset(model.x0, BEGIN)
        x0 = np.zeros(model.nx)
        x0[:4] = [12, 3, 0, 7]
        for t0 in (BEGIN + 180.0, BEGIN + 270.0, BEGIN + 270.0):
            plant.reset(x0, t0)
            assert plant._conn.simulation.getTime() == t0 - BEGIN
            np.testing.assert_array_equal(plant.state[:4], x0[:4])
            plant.step(_own(model), np.zeros(model.nd), 1.0)
            on_edge = [plant._conn.edge.getLastStepVehicleNumber(a.edge) for a in net.approaches]
            # best effort: a standing vehicle is not inserted in front of a fast follower
            assert sum(on_edge[:4]) >= 0.75 * sum(x0[:4])
            for _ in range(3):
                plant.step(_own(model), np.zeros(model.nd), 90.0)
            assert plant.outputs(_own(model), np.zeros(model.nd))[-1] == 0  # no teleports
    finally:
        plant.close()


def test_a_forgotten_plant_ends_its_sumo(net_model) -> None:
    _, model = net_model
    plant = model.plant(model.nominal)
    plant.reset(model.x0, BEGIN)
    pid = plant.process.pid
    folder = plant._dir
    del plant
    gc.collect()
    assert not _alive(pid)
    assert not Path(folder).exists()
    assert math.isfinite(os.getpid())


def test_an_actuated_junction_runs_its_own_logic_until_a_plan_is_written(
    tmp_path: Path,
) -> None:
    cfg = grid(tmp_path, veh_per_h=300.0, tls_type="actuated")
    net, model = plain_model(cfg, BEGIN)
    plant = model.plant(model.nominal)
    try:
        plant.reset(model.x0, BEGIN)
        d, own = np.zeros(model.nd), _own(model)
        for _ in range(4):  # the safe values (the own program) keep the actuated logic
            plant.step(own, d, 60.0)
        tls = net.junctions[0].tls
        assert plant._conn.trafficlight.getProgram(tls) == net.junctions[0].program
        assert all(c.actuated for t, c in plant.cycles if t == tls)
        u = own.copy()
        u[0], u[1] = 0.7, 80.0
        for _ in range(6):
            plant.step(u, d, 60.0)
        ours = [c for t, c in plant.cycles if t == tls]
        taken = next(i for i, c in enumerate(ours) if not c.actuated)
        assert ours[taken].start_s >= 240.0  # at the actuated logic's return to phase 0
        assert ours[-1].length_s == 80.0 and ours[-1].start_s % 80.0 == 0  # offset reached
        assert plant._conn.trafficlight.getProgram(tls) == "parallelcity"
    finally:
        plant.close()


def test_coordinated_actuated_gaps_out_cross_streets_and_keeps_the_cycles() -> None:
    """On the corridor at the peak with a 3 s gap: cross-street greens end early, the time
    goes to the arterial, and every cycle starts where the last ended, as planned."""
    import dataclasses
    import datetime as dt

    from parallelcity.models.traffic.kind import Config, load
    from parallelcity.models.traffic.signal_controller import SignalController
    from parallelcity.models.traffic.sumo_plant import plant_config

    sumocfg = Path(__file__).resolve().parent.parent / "scenarios/traffic_corridor/corridor.sumocfg"
    begin = dt.datetime(2026, 3, 2, 6, 30, tzinfo=dt.UTC)
    corridor = load(Config(sumocfg=str(sumocfg), begin=begin, gap_out_s=3.0))
    net = corridor.network
    cfg = dataclasses.replace(
        plant_config(net, corridor.config),
        parameters=("demand.scale", "driver.sigma", "driver.tau"),
    )
    assert cfg.gap_out_s == 3.0
    plant = SumoPlant(net, cfg, np.array([1.0, 0.5, 1.0]))
    u = np.array([v for _ in net.junctions for v in (0.55, 90.0, 0.0)])  # aligned at once
    try:
        plant.reset(np.zeros(len(net.approaches)), cfg.begin + 2700.0)
        for _ in range(8):
            plant.step(u, np.zeros(0), 90.0)
        conn = plant._conn
        for j in net.junctions:  # only the program's own states are ever shown
            assert conn.trafficlight.getRedYellowGreenState(j.tls) in {p.state for p in j.phases}
    finally:
        plant.close()
    gapped = 0
    for j in net.junctions:
        ours = [c for tls, c in plant.cycles if tls == j.tls]
        assert all(ours[i].start_s == ours[i - 1].end_s for i in range(1, len(ours)))
        shadow = SignalController(j, cfg.max_cycle_s)  # the same plan, without gap-out
        shadow.write([0.55], 90.0, 0.0)
        for c in ours[1:-1]:  # the plan's (the last may not have reached its gap)
            planned = shadow.restart_at(c.start_s)
            assert not c.own and c.coordinated == 0 and c.length_s == planned.length_s
            assert all(d >= m for d, m in zip(c.durations_s[::3], j.min_greens_s, strict=True))
            assert c.durations_s[0] == planned.durations_s[0]
            assert c.durations_s[3] + c.tail_s == planned.durations_s[3]
            gapped += c.tail_s > 0
        assert ours[-1].length_s == 90.0  # aligned on the offset
    assert gapped >= 8  # most cross-street greens ended early at the peak


def test_close_lets_sumo_finish_writing_its_outputs(net_model, tmp_path: Path) -> None:
    # SUMO writes the unfinished trips after TraCI's close; a plant that signalled it at
    # once left a tripinfo cut short whenever the machine was busy, and its KPIs (read after
    # close) differed from run to run.  A child standing in for that exit: it writes its
    # output half a second after it starts, and on SIGTERM exits at once without it.
    _, model = net_model
    plant = model.plant(model.nominal)
    out = tmp_path / "written"
    code = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(15))\n"
        "time.sleep(0.5)\n"
        f"open({str(out)!r}, 'w').write('whole')\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    plant._proc = proc
    plant.close()
    assert proc.returncode == 0 and out.read_text() == "whole"
