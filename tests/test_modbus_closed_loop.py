"""The district-heating loop with its field on Modbus TCP, gateway included.

``scenarios/district_heating_modbus.toml`` runs through the ordinary runner: the
rig's Modbus stand-in (a real pymodbus server on 127.0.0.1) serves the plant, the
mirror polls it, and the embedded field gateway writes the setpoints to holding
registers and reads them back.  Nothing here is a double.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from parallelcity.field.modbus.protocol import ModbusField
from parallelcity.field.modbus.stand_in import ModbusStandIn
from parallelcity.record.report import summarize
from parallelcity.run.runner import RunOptions, run
from parallelcity.scenario.definition import load_scenario
from parallelcity.specs import TOLERANCE

from .conftest import ROOT

DH_MODBUS = ROOT / "scenarios" / "district_heating_modbus.toml"
CYCLES = 4


@pytest.mark.slow
def test_the_district_heating_loop_runs_on_modbus_with_commands_acked(tmp_path: Path) -> None:
    scenario = load_scenario(DH_MODBUS)
    assert isinstance(scenario.field, ModbusField)
    result = asyncio.run(
        asyncio.wait_for(run(scenario, RunOptions(cycles=CYCLES, speed=720, out_dir=tmp_path)), 300)
    )
    s = summarize(result)
    assert s.cycles == CYCLES
    assert s.stale == 0, "every required point was read fresh over Modbus"
    assert s.sent >= 2 and s.acked == s.sent and s.refused == 0, s

    stand_in = result.stand_in
    assert isinstance(stand_in, ModbusStandIn)
    assert stand_in.endpoint.startswith("modbus://127.0.0.1:")
    applied = stand_in.applied
    assert applied, "the gateway wrote no register"
    # what the plant received is what the holding registers hold, within the specs
    limits = {lim.name: lim for lim in scenario.safety_specs().inputs}
    for a in applied:
        lo, hi = limits[a.name].min, limits[a.name].max
        assert lo - TOLERANCE <= a.value <= hi + TOLERANCE, a
    inputs = {i.name: i.modbus_address() for i in scenario.field.inputs}
    last = {a.name: a.value for a in applied}
    for name, value in last.items():
        scale = inputs[name].scale
        assert stand_in.registers.words(inputs[name]), name
        acked = result.records[-1].applied.get(name)
        if acked is not None:
            assert value == pytest.approx(acked, abs=abs(scale) / 2 + 1e-6), name
