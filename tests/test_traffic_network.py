"""The shipped corridor: rebuilt from its plain sources, and read as the twin sees it."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import ModuleType

import pytest

from parallelcity.models.traffic.network import (
    JAM_SPACING_M,
    QUEUED,
    TELEPORTS,
    read_network,
    signal_names,
)

CORRIDOR = Path(__file__).resolve().parent.parent / "scenarios" / "traffic_corridor"
GENERATED = ("tll.xml", "net.xml", "rou.xml", "det.xml", "sumocfg")


def _build_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("corridor_build", CORRIDOR / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_build_reproduces_the_committed_files_byte_for_byte(tmp_path: Path) -> None:
    _build_script().build(tmp_path)
    for suffix in GENERATED:
        name = f"corridor.{suffix}"
        assert (tmp_path / name).read_bytes() == (CORRIDOR / name).read_bytes(), name


def test_the_corridor_has_four_signalised_junctions_with_cross_streets() -> None:
    net = read_network(CORRIDOR / "corridor.net.xml")
    assert net.junction_ids == ("J1", "J2", "J3", "J4")
    for j in net.junctions:
        assert len(j.green) == 2 and len(j.approaches) == 4
        assert j.cycle_s == 90 and j.lost_s == 10  # 2 x (3 s yellow + 2 s all-red)
        # the fixed-time program has no minDur: it comes from the actuated program
        assert j.min_greens_s == (15.0, 10.0)
        assert j.splits == pytest.approx((48 / 80,))
    inner = [a for a in net.approaches if not a.is_entry]
    assert sorted(a.edge for a in inner) == sorted(["J1J2", "J2J3", "J3J4", "J4J3", "J3J2", "J2J1"])
    assert {a.upstream for a in inner} == {"J1", "J2", "J3", "J4"}
    arterial = net.approach("J1J2")
    assert arterial.lanes == 2 and 200 <= arterial.length_m <= 400
    assert arterial.storage_veh == pytest.approx(2 * arterial.length_m / JAM_SPACING_M)
    cross = net.approach("N1J1")
    assert cross.lanes == 1
    assert arterial.saturation_veh_h == pytest.approx(2 * cross.saturation_veh_h)
    # every movement of an approach runs in one green phase: arterial first, cross second
    assert {m.green_phases for m in arterial.movements} == {(0,)}
    assert {m.green_phases for m in cross.movements} == {(1,)}


def test_signal_names_follow_the_network() -> None:
    net = read_network(CORRIDOR / "corridor.net.xml")
    names = signal_names(net)
    assert len(names["states"]) == 16 and names["states"][0] == "A0J1.queue"
    assert names["inputs"][:3] == ("J1.split0", "J1.cycle_s", "J1.offset_s")
    assert len(names["disturbances"]) == 10
    assert names["outputs"][-2:] == (QUEUED, TELEPORTS) and len(names["outputs"]) == 3 * 16 + 2
    assert names["parameters"][:2] == ("A0J1.saturation", "A0J1.storage")
    assert names["parameters"][-3:] == ("demand.scale", "driver.sigma", "driver.tau")


def test_a_file_that_is_not_a_network_is_a_value_error(tmp_path: Path) -> None:
    bad = tmp_path / "x.net.xml"
    bad.write_text("<net><edge id=")
    with pytest.raises(ValueError, match="not a readable SUMO network"):
        read_network(bad)
    with pytest.raises(ValueError, match="no traffic light"):
        read_network(CORRIDOR / "corridor.net.xml", ["J9"])
    assert math.isfinite(read_network(CORRIDOR / "corridor.net.xml", ["J2"]).junctions[0].cycle_s)


def test_the_program_key_selects_each_junctions_own_program() -> None:
    """`model.program = "actuated"` runs SUMO's actuated program as every junction's own
    (an experiment's baseline); a program the net lacks is a value error."""
    fixed = read_network(CORRIDOR / "corridor.net.xml")
    actuated = read_network(CORRIDOR / "corridor.net.xml", program="actuated")
    assert {j.program for j in fixed.junctions} == {"0"}
    assert {j.program for j in actuated.junctions} == {"actuated"}
    assert [j.min_greens_s for j in actuated.junctions] == [j.min_greens_s for j in fixed.junctions]
    with pytest.raises(ValueError, match="has no program 'nope'"):
        read_network(CORRIDOR / "corridor.net.xml", program="nope")
