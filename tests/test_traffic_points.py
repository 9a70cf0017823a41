"""Measured-only points: each junction's running phase and cycle second, served by the SUMO
plant through the OPC UA stand-in, mirrored with plausible values, and ignored by the twin
(the estimator, the divergence monitor, diagnosis and validation of what it predicts)."""

from __future__ import annotations

import asyncio
import itertools
import math
import re
import time
from pathlib import Path

import casadi as ca
import numpy as np
import pytest
from parallelcity.hil.plant import PlantSimulator
from parallelcity.hil.simulated import KIND

from parallelcity.clock import SimClock
from parallelcity.errors import ScenarioError
from parallelcity.field.mirror import Mirror
from parallelcity.field.snapshot import Snapshot
from parallelcity.models.traffic.skeleton import skeleton
from parallelcity.models.traffic.sumo_plant import SumoPlant
from parallelcity.scenario.definition import Scenario, parse_scenario
from parallelcity.twin.divergence import DivergenceMonitor, DivergenceSettings
from parallelcity.twin.estimate import ExtendedKalmanFilter
from parallelcity.twin.model import ModelForm, SubsystemModel

from .traffic_nets import grid, plain_model

CORRIDOR = Path(__file__).resolve().parent.parent / "scenarios/traffic_corridor/corridor.toml"
SPEED = 45.0  # simulated s per wall s: more than a 90 s cycle within a few wall seconds
SAMPLES = 12  # snapshots taken, one per SAMPLE_WALL_S
SAMPLE_WALL_S = 0.2


def corridor_text() -> str:
    text = CORRIDOR.read_text()
    for key, value in {
        "sumocfg": f'"{CORRIDOR.parent / "corridor.sumocfg"}"',
        "start": "2026-03-02T07:15:00Z",
        "speed": f"{SPEED:g}",
        "insecure_lab": "true",
    }.items():
        text, n = re.subn(rf"^{key} = [^#\n]*", f"{key} = {value}", text, count=1, flags=re.M)
        assert n == 1, key
    return text


@pytest.fixture(scope="module")
def corridor(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    return parse_scenario(corridor_text(), tmp_path_factory.mktemp("c") / "corridor.toml")


def _sumo_truth(plant: SumoPlant) -> dict[str, tuple[int, float, float]]:
    """Per junction, as SUMO shows it now: phase, seconds to the next switch, and the end of
    that phase in the controller's running cycle (seconds from the cycle's start)."""
    conn = plant._conn
    now = conn.simulation.getTime()
    out = {}
    for tls, ctrl in plant._ctrl.items():
        phase = int(conn.trafficlight.getPhase(tls))
        cur = ctrl.current
        assert cur is not None and not cur.actuated
        to_switch = conn.trafficlight.getNextSwitch(tls) - now
        out[tls] = (phase, to_switch, sum(cur.durations_s[: phase + 1]))
    return out


@pytest.mark.slow
def test_phase_and_cycle_second_are_served_mirrored_and_ignored_by_the_twin(
    corridor: Scenario,
) -> None:
    model = corridor.model
    tls = [j.tls for j in corridor.model.corridor.network.junctions]  # type: ignore[attr-defined]
    phases = {j.tls: len(j.phases) for j in model.corridor.network.junctions}  # type: ignore[attr-defined]
    names = [f"{t}.{p}" for t in tls for p in ("phase", "cycle_second")]
    assert model.measured_only == tuple(names)
    assert not set(names) & set(model.outputs) and model.h.size1_out(0) == model.ny
    clock = SimClock(epoch=corridor.meta.start_epoch, speed=SPEED)
    snaps: list[Snapshot] = []
    checked = 0

    async def body() -> None:
        nonlocal checked
        async with KIND.field_stand_in(corridor.rig_config, corridor, clock) as field:
            plant = field.plant._plant
            assert isinstance(plant, SumoPlant)
            async with Mirror(corridor.field, clock, endpoint=field.endpoint) as mirror:
                assert await mirror.wait_all_received(30.0)
                for _ in range(SAMPLES):
                    await asyncio.sleep(SAMPLE_WALL_S)
                    snaps.append(mirror.snapshot())
                    # the plant's values are what SUMO shows, at the same instant
                    mine = plant.measured_only()
                    for t, (phase, to_switch, phase_end) in _sumo_truth(plant).items():
                        assert mine[f"{t}.phase"] == phase
                        assert mine[f"{t}.cycle_second"] + to_switch == pytest.approx(phase_end)
                        checked += 1

    t0 = time.monotonic()
    asyncio.run(asyncio.wait_for(body(), timeout=90.0))
    assert checked == SAMPLES * len(tls)
    span = snaps[-1].taken_at - snaps[0].taken_at
    assert span >= 90.0, f"only {span:.0f} simulated s mirrored in {time.monotonic() - t0:.0f} s"
    for t in tls:
        seen_phase, seen_second = [], []
        for snap in snaps:
            for name, into in ((f"{t}.phase", seen_phase), (f"{t}.cycle_second", seen_second)):
                point = snap.points[name]
                assert not point.stale, (name, point.why)
                assert point.reading is not None
                into.append(point.reading.value)
        assert all(v == int(v) and 0 <= v < phases[t] for v in seen_phase), seen_phase
        assert all(0 <= v < 120.0 for v in seen_second), seen_second  # the plant's max cycle
        assert len(set(seen_phase)) >= 2 and len(set(seen_second)) >= 4
        assert any(b < a for a, b in itertools.pairwise(seen_second)), "no new cycle began"

    # the twin ignores them: the estimator corrects with the outputs only ...
    last = snaps[-1]
    ekf = ExtendedKalmanFilter(model, corridor.meta.cycle_s)
    est = ekf.step(last.taken_at, model.u0, last)
    assert est.used and not set(est.used) & set(names)
    assert np.all(np.isfinite(est.x))
    # ... and the divergence monitor compares outputs only (and refuses to judge these)
    settings = DivergenceSettings({"A0J1.queue": 50.0}, window=1, persist=1)
    monitor = DivergenceMonitor(model, corridor.meta.cycle_s, settings)
    checks = [monitor.observe(s.taken_at, s, est.x, model.u0) for s in snaps[-3:]]
    assert all(set(c.residuals) <= {"A0J1.queue"} for c in checks)
    with pytest.raises(ValueError, match="unknown outputs"):
        DivergenceMonitor(model, 90.0, DivergenceSettings({"J1.phase": 1.0}))


def test_validate_accepts_them_as_points_and_refuses_them_where_the_twin_predicts() -> None:
    text = corridor_text() + (
        '\n[divergence]\nthresholds = { "J1.phase" = 1.0 }\n'
        '\n[diagnosis]\nnoise = { "J2.cycle_second" = 1.0 }\n'
    )
    text = text.replace('output = "network.teleports"', 'output = "J3.cycle_second"')
    with pytest.raises(ScenarioError) as exc:
        parse_scenario(text, CORRIDOR.parent / "x.toml")
    problems = exc.value.problems
    joined = "\n".join(problems)
    assert "divergence.thresholds: 'J1.phase' is not an output" in joined
    assert "measured only" in joined
    assert "diagnosis.noise: 'J2.cycle_second' is measured only" in joined
    assert "'J3.cycle_second' is not an output of the model (it is measured only" in joined
    assert not [p for p in problems if p.startswith("field.points")]


def test_the_skeleton_writes_the_points_the_corridor_lists() -> None:
    def points(text: str) -> list[str]:
        return re.findall(r'name = "(J\d\.(?:phase|cycle_second))"', text)

    made = skeleton(CORRIDOR.parent / "corridor.sumocfg")
    assert points(made) == points(CORRIDOR.read_text())
    assert len(points(made)) == 8


def test_a_plant_without_them_serves_nan_and_names_may_not_clash() -> None:
    x, u, d, p = (ca.SX.sym(n) for n in "xudp")
    kw = {
        "name": "m",
        "states": ("x",),
        "inputs": ("u",),
        "disturbances": ("d",),
        "outputs": ("x",),
        "parameters": ("p",),
        "nominal": np.array([1.0]),
        "f": ca.Function("f", [x, u, d, p], [x + u]),
        "h": ca.Function("h", [x, u, d, p], [x]),
        "forecast": lambda t0, n, dt: np.zeros((n, 1)),
        "x0": np.array([2.0]),
        "u0": np.array([0.0]),
        "form": ModelForm.DISCRETE,
        "step_s": 1.0,
    }
    model = SubsystemModel(**kw, measured_only=("count",))  # type: ignore[arg-type]
    assert model.point_signals == ("x", "count") and model.ny == 1
    plant = PlantSimulator(model, model.nominal, lambda t: np.zeros(1), model.x0, model.u0, 0.0)
    y = plant.outputs()
    assert y[0] == 2.0 and math.isnan(y[1])
    for clash in (("x",), ("u",), ("c", "c")):
        with pytest.raises(ValueError, match="measured_only"):
            SubsystemModel(**kw, measured_only=clash)  # type: ignore[arg-type]


def test_an_actuated_junction_reports_sumos_phase_and_its_own_cycle_second(
    tmp_path: Path,
) -> None:
    """Handed to SUMO's actuated logic, a junction's phase is SUMO's and its cycle second
    counts from its logic's last return to phase 0 (or the start)."""
    cfg = grid(tmp_path, veh_per_h=300.0, end_s=600, tls_type="actuated")
    net, model = plain_model(cfg, 0.0)
    plant = model.plant(model.nominal)
    assert isinstance(plant, SumoPlant)
    try:
        plant.reset(model.x0, 0.0)
        conn, d, u = plant._conn, np.zeros(model.nd), np.array(model.u0)
        began = dict.fromkeys((j.tls for j in net.junctions), conn.simulation.getTime())
        last = {t: int(conn.trafficlight.getPhase(t)) for t in began}
        wrapped: set[str] = set()
        for _ in range(150):  # 150 simulated s, one at a time
            plant.step(u, d, 1.0)
            now, mine = conn.simulation.getTime(), plant.measured_only()
            for t in began:
                phase = int(conn.trafficlight.getPhase(t))
                if phase == 0 and last[t] != 0:
                    began[t] = now
                    wrapped.add(t)
                last[t] = phase
                assert mine[f"{t}.phase"] == phase
                assert mine[f"{t}.cycle_second"] == now - began[t]
        assert wrapped == set(began)  # every junction began a new cycle at least once
        assert all(c.actuated for _, c in plant.cycles)
    finally:
        plant.close()
