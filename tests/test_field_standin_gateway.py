"""A stand-alone gateway (``python -m parallelcity gateway CONFIG``) with ``[field] protocol =
"modbus"``: the Modbus config model checks its inputs, and a command lands in the stand-in's
holding registers; OPC UA security settings are refused for a Modbus field."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest
from parallelcity.hil.simulated import KIND

from parallelcity.clock import SimClock
from parallelcity.dispatch.dispatcher import Dispatcher
from parallelcity.dispatch.wire import AckStatus
from parallelcity.errors import GatewayConfigError
from parallelcity.field.modbus.codec import decode
from parallelcity.field.modbus.protocol import as_modbus
from parallelcity.field.modbus.stand_in import ModbusStandIn
from parallelcity.field.opcua.stand_in import free_port
from parallelcity.gateway.config import parse_gateway_config
from parallelcity.scenario.definition import load_scenario

from .conftest import ROOT

MODBUS = ROOT / "scenarios" / "district_heating_modbus.toml"
VERDICT = "ef" * 32


def gateway_toml(endpoint: str, port: int, extra: str = "") -> str:
    return f"""
[gateway]
name = "modbus-gateway"
bind = "tcp://127.0.0.1:{port}"
state = "state.sqlite"

[security]
insecure_lab = true
{extra}
[field]
protocol = "modbus"
endpoint = "{endpoint}"
timeout_s = 2.0

[[field.inputs]]
name = "plant.T_supply_set"
table = "holding"
address = 100
data_type = "float32"
min = 50.0
max = 95.0

[[field.inputs]]
name = "apartment.m_flow"
table = "holding"
address = 102
data_type = "uint16"
scale = 0.001
min = 0.02
max = 2.0
"""


def test_the_modbus_config_model_checks_the_gateway_inputs(tmp_path: Path) -> None:
    ok = parse_gateway_config(gateway_toml("127.0.0.1:1502", 5555), tmp_path / "g.toml")
    assert ok.field_config().protocol == "modbus"
    bad = gateway_toml("127.0.0.1:1502", 5555).replace('table = "holding"', 'table = "input"', 1)
    with pytest.raises(GatewayConfigError) as info:
        parse_gateway_config(bad, tmp_path / "g.toml")
    assert any(line.startswith("field.inputs[0]") for line in info.value.problems), info.value
    opcua = (
        '[security.opcua]\ncertificate = "c"\nprivate_key = "k"\ntrusted = "t"\nanonymous = true\n'
    )
    with pytest.raises(GatewayConfigError, match=r"security\.opcua: Modbus TCP"):
        parse_gateway_config(gateway_toml("127.0.0.1:1502", 5555, opcua), tmp_path / "g.toml")


def test_a_standalone_gateway_writes_a_modbus_stand_in(tmp_path: Path) -> None:
    scenario = load_scenario(MODBUS)
    stand_in = KIND.field_stand_in(
        scenario.rig_config, scenario, SimClock(epoch=time.time(), speed=1.0)
    )
    assert isinstance(stand_in, ModbusStandIn)
    stand_in.listen_on("127.0.0.1", free_port())
    port = free_port()
    setpoints = {"plant.T_supply_set": 72.5, "apartment.m_flow": 0.45}

    async def body() -> None:
        async with stand_in:
            config = tmp_path / "gateway.toml"
            config.write_text(gateway_toml(stand_in.endpoint, port))
            proc = subprocess.Popen(
                [sys.executable, "-m", "parallelcity", "gateway", str(config)],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                cwd=tmp_path,
            )
            try:
                async with Dispatcher(
                    f"tcp://127.0.0.1:{port}",
                    "control-room",
                    insecure_lab=True,
                    timeout_s=5.0,
                    retries=10,
                ) as disp:
                    now = time.time()
                    ack = await disp.send(
                        setpoints, issued_at=now, valid_until=now + 60, verdict_digest=VERDICT
                    )
                    assert ack.status is AckStatus.APPLIED, ack
                applied = {a.name: a.value for a in stand_in.applied}
                assert applied == pytest.approx(setpoints)
                inputs = {i.name: i.modbus_address() for i in as_modbus(scenario.field).inputs}
                held = {
                    n: float(decode(inputs[n], stand_in.registers.words(inputs[n])))
                    for n in setpoints
                }
                assert held == pytest.approx(setpoints, abs=1e-3)
            finally:
                proc.terminate()
                out, _ = await asyncio.to_thread(proc.communicate, None, 30)
                assert "Traceback" not in out, out
                assert proc.returncode == 0, out

    async def bounded() -> None:
        async with asyncio.timeout(120):
            await body()

    asyncio.run(bounded())
