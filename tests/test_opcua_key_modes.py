"""OPC UA private keys that the group or others may read are refused, as CURVE secrets are.

The client key through the real gateway process (``parallelcity gateway CONFIG``
in front of a secure stand-in), the server key through the real secure input
server process, the user certificate's key through ``ClientSecurity``: each
refusal names the file and the chmod that fixes it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from parallelcity.hil.field import free_port

from parallelcity.errors import SecurityError
from parallelcity.field.opcua.certs import LabPki, make_lab_pki
from parallelcity.field.opcua.session import ClientSecurity
from parallelcity.scenario.definition import Scenario

from .conftest import ROOT
from .opcua_input_server import PASSWORD_ENV as INPUT_PASSWORD_ENV
from .test_gateway_standalone import GatewayProcess, gateway_toml, run, scenario, setup_site

__all__ = ["scenario"]  # the secure scenario fixture of the stand-alone gateway tests

EXIT_SECURITY = 4


@pytest.fixture
def pki(tmp_path: Path) -> LabPki:
    return make_lab_pki(tmp_path / "pki")


def test_the_lab_pki_writes_every_private_key_owner_only(pki: LabPki) -> None:
    for identity in (pki.client, pki.server, pki.user):
        assert identity.private_key.stat().st_mode & 0o777 == 0o600


@pytest.mark.slow  # a process start: about 5 s on a loaded 2-core machine
def test_the_gateway_refuses_a_client_key_others_may_read(
    tmp_path: Path, scenario: Scenario
) -> None:
    pki, password, field = setup_site(tmp_path, scenario)
    key = pki.client.private_key
    key.chmod(0o644)

    async def body() -> tuple[int, str]:
        async with field:
            config = tmp_path / "gateway.toml"
            config.write_text(
                gateway_toml(scenario, field.endpoint, free_port(), "pki/client/trusted")
            )
            gw = GatewayProcess(config, password)
            try:
                code = await gw.exit_code(60.0)
            finally:
                gw.close()
            return code, "".join(gw.log)

    code, log = run(body, timeout_s=90.0)
    assert code == EXIT_SECURITY, log
    assert f"OPC UA private key {key} is accessible by group or others (mode 0644)" in log, log
    assert f"chmod 600 {key}" in log, log
    assert "OPC UA session to" not in log, log


@pytest.mark.slow  # a process start: about 5 s on a loaded 2-core machine
def test_a_secure_server_refuses_a_server_key_others_may_read(pki: LabPki) -> None:
    key = pki.server.private_key
    key.chmod(0o640)
    env = dict(os.environ, **{INPUT_PASSWORD_ENV: "irrelevant"})
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "tests.opcua_input_server"]
        + ["--port", str(free_port("127.0.0.1")), "--pki", str(pki.root)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
    )
    assert proc.returncode != 0, proc.stdout
    assert "up " not in proc.stdout, (time.monotonic() - started, proc.stdout)
    assert f"OPC UA server private key {key} is accessible by group or others" in proc.stderr
    assert f"(mode 0640); run: chmod 600 {key}" in proc.stderr


def test_a_user_certificate_key_others_may_read_is_refused(pki: LabPki) -> None:
    sec = ClientSecurity(
        "Basic256Sha256",
        pki.client.certificate,
        pki.client.private_key,
        pki.client_trusted,
        user_certificate=pki.user.certificate,
        user_private_key=pki.user.private_key,
    )
    sec.check()  # 0600: accepted
    pki.user.private_key.chmod(0o604)
    with pytest.raises(SecurityError) as info:
        sec.check()
    msg = str(info.value)
    assert f"OPC UA user private key {pki.user.private_key}" in msg
    assert f"chmod 600 {pki.user.private_key}" in msg
