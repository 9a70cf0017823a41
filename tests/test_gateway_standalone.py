"""``parallelcity gateway CONFIG``, the real CLI in its own process, in front of a secure PLC.

The PLC is the hil field stand-in (the district-heating plant behind an
asyncua server) offering SignAndEncrypt only, with certificates made by
``parallelcity.field.opcua.certs``; the gateway process talks CURVE to a real dispatcher
in this process and Basic256Sha256 SignAndEncrypt to the stand-in.  Checked:

* commands from the dispatcher land on the server (the stand-in records every
  value written to its input nodes), the acks say the gateway is not a lab one,
  and an out-of-bounds command does not land;
* when the dispatcher falls silent the stand-alone watchdog writes its safe
  values to the server, over the same secure session;
* a config whose trust list lacks the server's certificate refuses to start
  (exit code 4) with an error naming the certificate and the folder to copy
  it into, and keeps a copy of it under ``rejected/``.
"""

from __future__ import annotations

import asyncio
import os
import queue
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from parallelcity.hil.simulated import KIND

from parallelcity.clock import SimClock
from parallelcity.dispatch.dispatcher import ClientCurve, Dispatcher
from parallelcity.dispatch.keys import read_public_key, read_secret_key, write_keypair
from parallelcity.dispatch.wire import AckStatus, RefusalCode
from parallelcity.field.opcua.certs import LabPki, describe, load_certificate, make_lab_pki
from parallelcity.field.opcua.session import ServerSecurity, hash_password
from parallelcity.field.opcua.stand_in import EmbeddedField, free_port
from parallelcity.scenario.definition import Scenario, parse_scenario

from .conftest import ROOT, lab_text

PASSWORD_ENV = "PARALLELCITY_PLC_PASSWORD"
VERDICT = "ef" * 32
SAFE = {
    "plant.T_supply_set": 71.5,
    "apartment.m_flow": 0.31,
    "office.m_flow": 0.32,
    "school.m_flow": 0.33,
}
HEARTBEAT_S, MISSED = 0.5, 2


def run(make: Callable[[], Awaitable[Any]], timeout_s: float) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(timeout_s):
            return await make()

    return asyncio.run(bounded())


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    text = lab_text().replace("insecure_lab = true", "insecure_lab = false")
    return parse_scenario(text, tmp_path_factory.mktemp("scn") / "secure.toml")


def gateway_toml(scenario: Scenario, endpoint: str, port: int, trusted: str) -> str:
    """A gateway config with paths relative to its own folder (keys/, pki/)."""
    bounds = {s.name: s for s in scenario.specs.inputs}
    inputs = "".join(
        f"""
[[field.inputs]]
name = "{i.name}"
node = "{i.node}"
min = {bounds[i.name].min}
max = {bounds[i.name].max}
safe = {SAFE[i.name]}
"""
        for i in scenario.field.inputs
    )
    return f"""
[gateway]
name = "test-plc-gateway"
bind = "tcp://127.0.0.1:{port}"
state = "gateway-state.sqlite"

[security.zmq]
secret_key = "keys/gateway.secret"

[[security.zmq.clients]]
name = "control-room"
public_key = "keys/control-room.public"
equipment = ["plant", "apartment", "office", "school"]

[security.opcua]
certificate = "pki/client/own/client.der"
private_key = "pki/client/own/client.key.pem"
trusted = "{trusted}"
username = "gateway"
password_env = "{PASSWORD_ENV}"

[field]
endpoint = "{endpoint}"
namespace = "{scenario.field.namespace}"
{inputs}
[watchdog]
heartbeat_interval_s = {HEARTBEAT_S}
missed_heartbeats = {MISSED}
"""


class GatewayProcess:
    """``python -m parallelcity gateway CONFIG``; its log lines are collected."""

    def __init__(self, config: Path, password: str) -> None:
        env = dict(os.environ, **{PASSWORD_ENV: password})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "parallelcity", "gateway", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
            env=env,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.append(line)
            self.lines.put(line)

    async def wait_for_line(self, text: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or (self.proc.poll() is not None and self.lines.empty()):
                raise AssertionError(f"no line with {text!r}; log:\n{''.join(self.log)}")
            try:
                line = await asyncio.to_thread(self.lines.get, True, min(left, 0.5))
            except queue.Empty:
                continue
            if text in line:
                return line

    async def exit_code(self, timeout_s: float) -> int:
        try:
            return await asyncio.to_thread(self.proc.wait, timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running; log:\n{''.join(self.log)}") from None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def setup_site(tmp_path: Path, scenario: Scenario) -> tuple[LabPki, str, EmbeddedField]:
    """PKI under tmp_path/pki, CURVE keys under tmp_path/keys, and a secure stand-in."""
    pki = make_lab_pki(tmp_path / "pki")
    write_keypair(tmp_path / "keys", "gateway")
    write_keypair(tmp_path / "keys", "control-room")
    password = secrets.token_urlsafe(18)
    field = KIND.field_stand_in(
        scenario.rig_config, scenario, SimClock(epoch=time.time(), speed=1.0)
    )
    assert isinstance(field, EmbeddedField)
    field.use_opcua_security(
        ServerSecurity(
            pki.server.certificate,
            pki.server.private_key,
            pki.server_trusted,
            users={"gateway": hash_password(password)},
        )
    )
    return pki, password, field


@pytest.mark.slow
def test_standalone_gateway_drives_a_sign_and_encrypt_server_over_curve(
    tmp_path: Path, scenario: Scenario
) -> None:
    _, password, field = setup_site(tmp_path, scenario)
    port = free_port()
    curve = ClientCurve(
        read_secret_key(tmp_path / "keys" / "control-room.secret"),
        read_public_key(tmp_path / "keys" / "gateway.public"),
    )

    async def body() -> None:
        async with field:
            assert field.security_description.startswith("Basic256Sha256_SignAndEncrypt")
            config = tmp_path / "gateway.toml"
            config.write_text(gateway_toml(scenario, field.endpoint, port, "pki/client/trusted"))
            gw = GatewayProcess(config, password)
            try:
                line = await gw.wait_for_line("OPC UA session to", 60.0)
                assert "Basic256Sha256 SignAndEncrypt, user gateway" in line, line
                await gw.wait_for_line("serving on", 30.0)
                assert not any("INSECURE" in x for x in gw.log), gw.log
                async with Dispatcher(
                    f"tcp://127.0.0.1:{port}", "control-room", curve=curve, timeout_s=5.0
                ) as disp:
                    sent: list[dict[str, float]] = []
                    for k in range(3):
                        setpoints = {
                            "plant.T_supply_set": 70.0 + k * 0.25,
                            "apartment.m_flow": 0.4 + k * 0.01,
                            "office.m_flow": 0.5 + k * 0.01,
                            "school.m_flow": 0.6 + k * 0.01,
                        }
                        now = time.time()
                        ack = await disp.send(
                            setpoints, issued_at=now, valid_until=now + 30, verdict_digest=VERDICT
                        )
                        assert ack.status is AckStatus.APPLIED, ack
                        assert ack.insecure_lab is False
                        sent.append(setpoints)
                    now = time.time()
                    bad = await disp.send(
                        {"plant.T_supply_set": 99.0},
                        issued_at=now,
                        valid_until=now + 30,
                        verdict_digest=VERDICT,
                    )
                    assert bad.code is RefusalCode.OUT_OF_BOUNDS, bad
                    landed = [(a.name, a.value) for a in field.applied]
                    expected = [(n, v) for sp in sent for n, v in sp.items()]
                    assert sorted(landed) == sorted(expected), landed
                    last_command = time.monotonic()

                    # Silence: the stand-alone watchdog reverts the PLC to the safe values.
                    async with asyncio.timeout(15.0):
                        while len(field.applied) < len(expected) + len(SAFE):
                            await asyncio.sleep(0.02)
                    waited = time.monotonic() - last_command
                    reverted = {a.name: a.value for a in field.applied[len(expected) :]}
                    assert reverted == SAFE
                    assert waited >= HEARTBEAT_S * MISSED * 0.9, waited
                    await gw.wait_for_line("reverted to safe values", 10.0)
                    status = await disp.heartbeat(sent_at=time.time())
                    assert status.watchdog.value == "tripped", status
            finally:
                gw.close()

    run(body, timeout_s=150.0)


@pytest.mark.slow
def test_standalone_gateway_refuses_to_start_when_the_server_certificate_is_not_trusted(
    tmp_path: Path, scenario: Scenario
) -> None:
    pki, password, field = setup_site(tmp_path, scenario)
    empty = tmp_path / "pki" / "gateway-trusts-nothing" / "trusted"
    empty.mkdir(parents=True)

    async def body() -> None:
        async with field:
            config = tmp_path / "gateway.toml"
            config.write_text(
                gateway_toml(
                    scenario, field.endpoint, free_port(), "pki/gateway-trusts-nothing/trusted"
                )
            )
            gw = GatewayProcess(config, password)
            try:
                code = await gw.exit_code(30.0)
            finally:
                gw.close()
            out = "".join(gw.log)
            assert code == 4, out
            assert "refused:" in out and "presented a certificate we do not trust" in out, out
            assert f"copy it into {empty}" in out, out
            assert describe(load_certificate(pki.server.certificate)) in out, out
            rejected = list((empty.parent / "rejected").glob("*.der"))
            assert len(rejected) == 1, out
            assert rejected[0].read_bytes() == pki.server.certificate.read_bytes()
            assert not field.applied

    run(body, timeout_s=120.0)
