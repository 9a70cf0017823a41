"""Webster's method: a textbook junction by hand, flows through a corridor, the green wave,
and the controller kind on the shipped scenario."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from parallelcity.controllers.webster import (
    Config,
    approach_flows,
    green_wave,
    webster_cycle,
    webster_plan,
)

from parallelcity import plugins
from parallelcity.decide.control import ControlInput, ControlProblem, SolveStatus
from parallelcity.models.pump_tank import Config as TankConfig
from parallelcity.models.pump_tank import build as build_tank
from parallelcity.models.traffic.network import (
    Approach,
    Junction,
    Movement,
    Network,
    SignalPhase,
)
from parallelcity.scenario.definition import load_scenario

CORRIDOR = Path(__file__).resolve().parent.parent / "scenarios" / "traffic_corridor"

TWO_PHASE = (
    SignalPhase("GGrr", 30, 10, 60),
    SignalPhase("yyrr", 3, 0, 3),
    SignalPhase("rrrr", 2, 0, 2),
    SignalPhase("rrGG", 30, 10, 60),
    SignalPhase("rryy", 3, 0, 3),
    SignalPhase("rrrr", 2, 0, 2),
)


def _junction(tls: str, approaches: tuple[str, ...]) -> Junction:
    return Junction(tls, "0", 0.0, TWO_PHASE, (0, 3), approaches)


def _approach(
    edge: str, tls: str, phase: int, to: dict[str, float], up: str | None = None
) -> Approach:
    movements = tuple(Movement(t, (i,), (phase,), 1) for i, t in enumerate(to))
    return Approach(edge, tls, 1, 280.0, 14.0, movements, up)


def _textbook() -> tuple[Network, dict[str, dict[str, float]]]:
    """One junction: the north approach runs in phase 0, the east approach in phase 1."""
    net = Network(
        "",
        (_junction("X", ("nX", "eX")),),
        (_approach("nX", "X", 0, {"Xs": 1.0}), _approach("eX", "X", 1, {"Xw": 1.0})),
    )
    return net, {"nX": {"Xs": 1.0}, "eX": {"Xw": 1.0}}


def test_textbook_two_phase_junction() -> None:
    # y = 540/1800 = 0.30 and 900/3600 = 0.25, L = 10 s:
    # C0 = (1.5 * 10 + 5) / (1 - 0.55) = 44.4 s, greens 34.4 s shared 0.30 : 0.25
    net, shares = _textbook()
    plan = webster_plan(
        net,
        shares,
        {"nX": 1800.0, "eX": 3600.0},
        {"nX": 540.0, "eX": 900.0},
        Config(cycle_min_s=30, cycle_max_s=120),
    )
    assert plan.flow_ratios["X"] == pytest.approx((0.30, 0.25))
    assert plan.cycle_s["X"] == pytest.approx(20 / 0.45)
    assert plan.splits["X"] == pytest.approx((0.30 / 0.55,))
    green0 = plan.splits["X"][0] * (plan.cycle_s["X"] - 10)
    assert green0 == pytest.approx(18.79, abs=0.01)


def test_the_cycle_is_clipped_and_saturated_junctions_get_the_longest() -> None:
    assert webster_cycle(10, 0.2, 60, 120) == 60  # 25 s is below the shortest allowed
    assert webster_cycle(10, 0.80, 40, 120) == pytest.approx(100)
    assert webster_cycle(10, 0.9, 40, 120) == 120  # 200 s asked
    assert webster_cycle(10, 0.97, 40, 120) == 120  # oversaturated


def _chain() -> tuple[Network, dict[str, dict[str, float]]]:
    """A -> B along an arterial: 80 % of A's entry traffic goes on to B."""
    net = Network(
        "",
        (_junction("A", ("wA", "nA")), _junction("B", ("AB", "nB"))),
        (
            _approach("wA", "A", 0, {"AB": 0.8, "As": 0.2}),
            _approach("nA", "A", 1, {"AB": 0.5, "As": 0.5}),
            _approach("AB", "B", 0, {"Be": 1.0}, up="A"),
            _approach("nB", "B", 1, {"Bs": 1.0}),
        ),
    )
    shares = {
        "wA": {"AB": 0.8, "As": 0.2},
        "nA": {"AB": 0.5, "As": 0.5},
        "AB": {"Be": 1.0},
        "nB": {"Bs": 1.0},
    }
    return net, shares


def test_flows_are_carried_by_the_turning_shares_and_the_wave_runs_downstream() -> None:
    net, shares = _chain()
    q = approach_flows(net, shares, {"wA": 1000.0, "nA": 200.0, "nB": 100.0})
    assert q == pytest.approx({"wA": 1000.0, "nA": 200.0, "AB": 900.0, "nB": 100.0})
    assert green_wave(net, {"A": 90.0, "B": 90.0}, None) == pytest.approx({"A": 0.0, "B": 20.0})
    assert green_wave(net, {"A": 90.0, "B": 90.0}, "B") == pytest.approx({"A": 0.0, "B": 0.0})
    sat = dict.fromkeys(q, 1800.0)
    arrivals = {"wA": 1000.0, "nA": 200.0, "nB": 100.0}
    free = webster_plan(net, shares, sat, arrivals, Config(coordinated=False, cycle_min_s=30))
    common = webster_plan(net, shares, sat, arrivals, Config(cycle_min_s=30))
    assert free.cycle_s["A"] > free.cycle_s["B"]
    assert common.cycle_s == {"A": free.cycle_s["A"], "B": free.cycle_s["A"]}


def test_check_refuses_a_model_that_is_not_a_signal_corridor() -> None:
    tank = build_tank(TankConfig())
    inf = np.full(tank.nu, np.inf)
    problem = ControlProblem(tank, 900.0, 4, -inf, inf, inf, ())
    lines = plugins.controller_kind("webster").check(Config(), problem)
    assert len(lines) == 1 and lines[0].startswith("kind: ") and "pump_tank" in lines[0]


def test_the_webster_kind_plans_the_corridor_within_its_specs() -> None:
    scenario = load_scenario(CORRIDOR / "corridor.toml")
    m, meta = scenario.model, scenario.meta
    specs = scenario.safety_specs()
    problem = specs.control_problem(m, meta.cycle_s, meta.horizon_steps)
    controller = plugins.controller_kind("webster").create(scenario.fallback_config)
    controller.setup(problem)
    t0 = meta.start_epoch + 3600  # the peak
    dist = m.forecast(t0, problem.horizon, meta.cycle_s)
    low, high = specs.band_arrays(t0, problem.horizon + 1, meta.cycle_s)
    result = controller.step(ControlInput(t0, m.x0, m.u0, dist, low, high))
    assert result.status is SolveStatus.SOLVED
    plan = result.u_plan
    assert np.all(plan >= problem.u_min - 1e-9) and np.all(plan <= problem.u_max + 1e-9)
    moves = np.abs(np.diff(np.vstack([m.u0, plan]), axis=0))
    assert np.all(moves <= problem.du_max + 1e-9)
    cycles = [m.index("inputs", f"{j}.cycle_s") for j in ("J1", "J2", "J3", "J4")]
    assert len(set(plan[-1, cycles])) == 1  # coordinated: one common cycle
    split = m.index("inputs", "J1.split0")
    assert plan[-1, split] > 0.6  # the arterial carries most of the traffic
