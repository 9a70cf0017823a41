"""``parallelcity field`` asks the scenario's protocol: a Modbus stand-in serves loopback with a
loud warning (Modbus TCP has no security), another host only with --insecure-lab, and the
"what next" text names no command the protocol lacks (Modbus has no browse)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pymodbus.client import AsyncModbusTcpClient

from parallelcity.cli import main
from parallelcity.field.modbus.codec import decode
from parallelcity.field.modbus.protocol import as_modbus
from parallelcity.field.opcua.stand_in import free_port
from parallelcity.scenario.definition import load_scenario

from .conftest import ROOT

MODBUS = ROOT / "scenarios" / "district_heating_modbus.toml"
EXIT_SECURITY = 4


async def read_point(port: int, name: str) -> float:
    """One real Modbus TCP read of point ``name``'s registers, decoded as the scenario says."""
    field = as_modbus(load_scenario(MODBUS).field)
    addr = next(p for p in field.points if p.name == name).modbus_address()
    assert addr.table == "input"
    client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=5, retries=0)
    try:
        async with asyncio.timeout(20):
            assert await client.connect()
            reply = await client.read_input_registers(
                addr.address, count=addr.words, device_id=addr.unit
            )
    finally:
        client.close()
    assert not reply.isError(), reply
    return float(decode(addr, reply.registers))


def test_a_modbus_stand_in_serves_loopback_loudly_and_offers_no_browse(tmp_path: Path) -> None:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "parallelcity", "field", str(MODBUS), "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        seen: list[str] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(seen) < 200:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if "stop with Ctrl-C" in line:
                break
        text = "".join(seen)
        assert f"serving modbus://127.0.0.1:{port}" in text, text
        assert "WARNING: Modbus TCP HAS NO SECURITY" in text, text
        assert "browse" not in text, text
        assert "insecure_lab = true" in text  # what `run --field` against it needs
        supply = asyncio.run(read_point(port, "plant.T_supply"))
        assert 20.0 < supply < 130.0, supply  # the plant's supply temperature, in C
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, text + out
        assert "field stand-in stopped" in out and "Traceback" not in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_modbus_stand_in_on_another_host_needs_insecure_lab(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["field", str(MODBUS), "--host", "0.0.0.0", "--port", "0"])
    assert code == EXIT_SECURITY
    err = capsys.readouterr().err
    assert "Modbus TCP has no authentication or encryption" in err
    assert "--insecure-lab" in err and "Traceback" not in err
