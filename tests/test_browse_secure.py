"""``browse`` on its own security options, anonymous sessions on secure channels, and the
command's usage errors.  Real asyncua servers on 127.0.0.1 with SignAndEncrypt only."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import subprocess
import sys
import time
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from asyncua import Server, ua
from parallelcity.hil.field import free_port, stop_server
from pydantic import ValidationError

from parallelcity.cli import EXIT_FIELD, EXIT_INVALID, EXIT_OK, _parser, main
from parallelcity.clock import SimClock
from parallelcity.errors import SecurityError
from parallelcity.field.mirror import Mirror
from parallelcity.field.opcua.certs import LabPki, make_lab_pki
from parallelcity.field.opcua.config import OpcUaField as FieldConfig
from parallelcity.field.opcua.config import OpcUaInput as InputMap
from parallelcity.field.opcua.config import OpcUaPoint as PointMap
from parallelcity.field.opcua.session import (
    ClientSecurity,
    ServerSecurity,
    TrustList,
    configure_server,
)
from parallelcity.scenario.definition import OpcUaSecurity

ROOT = Path(__file__).resolve().parents[1]
NS = "urn:parallelcity:test:secure-browse"
USER, PASSWORD = "operator", "correct horse battery staple"


def run(make: Callable[[], Awaitable[Any]], timeout_s: float = 60.0) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(timeout_s):
            return await make()

    return asyncio.run(bounded())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LabPki:
    return make_lab_pki(tmp_path_factory.mktemp("pki"))


@asynccontextmanager
async def secure_server(pki: LabPki, *, anonymous_only: bool) -> AsyncIterator[str]:
    """A SignAndEncrypt-only server with a measurement and a writable setpoint."""
    server = Server()
    await server.init()
    if anonymous_only:
        # what many vendor servers do: the channel is secure, the session anonymous
        await server.load_certificate(str(pki.server.certificate))
        await server.load_private_key(str(pki.server.private_key))
        await server.set_application_uri("urn:parallelcity:field")
        server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt])
        server.set_identity_tokens([ua.AnonymousIdentityToken])
        server.set_certificate_validator(TrustList(pki.server_trusted))
    else:
        from parallelcity.field.opcua.session import hash_password

        await configure_server(
            server,
            ServerSecurity(
                pki.server.certificate,
                pki.server.private_key,
                pki.server_trusted,
                users={USER: hash_password(PASSWORD)},
            ),
        )
    ns = await server.register_namespace(NS)
    plant = await server.nodes.objects.add_object(
        ua.NodeId("plant", ns), ua.QualifiedName("plant", ns)
    )
    await plant.add_variable(ua.NodeId("plant/T", ns), ua.QualifiedName("T", ns), 70.0)
    sp = await plant.add_variable(ua.NodeId("plant/T_set", ns), ua.QualifiedName("T_set", ns), 65.0)
    await sp.set_writable()
    port = free_port()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}")
    await server.start()
    try:
        yield f"opc.tcp://127.0.0.1:{port}"
    finally:
        await stop_server(server)


def security_args(pki: LabPki) -> list[str]:
    return [
        "--certificate",
        str(pki.client.certificate),
        "--private-key",
        str(pki.client.private_key),
        "--trust",
        str(pki.client_trusted),
    ]


def test_anonymous_needs_saying_so_in_the_scenario(pki: LabPki) -> None:
    files = {"certificate": "c.der", "private_key": "k.pem", "trusted": "trusted"}
    with pytest.raises(ValidationError, match=r"give exactly one user token.*anonymous = true"):
        OpcUaSecurity(**files)
    with pytest.raises(ValidationError, match="anonymous = true excludes"):
        OpcUaSecurity(**files, anonymous=True, username="u", password_env="P")
    assert OpcUaSecurity(**files, anonymous=True).anonymous
    with pytest.raises(SecurityError, match="anonymous = true"):
        ClientSecurity(
            "Basic256Sha256", pki.client.certificate, pki.client.private_key, pki.client_trusted
        ).check()


@pytest.mark.slow
def test_anonymous_session_on_a_secure_channel(
    pki: LabPki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The mirror and ``browse --anonymous`` against a server that allows only anonymous
    sessions, on SignAndEncrypt; the log says the session is anonymous."""
    security = ClientSecurity(
        "Basic256Sha256",
        pki.client.certificate,
        pki.client.private_key,
        pki.client_trusted,
        anonymous=True,
    )
    cfg = FieldConfig(
        namespace=NS,
        points=[PointMap(name="T", node="s=plant/T", max_age_s=60.0)],
        inputs=[InputMap(name="T_set", node="s=plant/T_set")],
    )
    out = tmp_path / "points.toml"

    async def body() -> tuple[float, dict[str, float], int]:
        async with secure_server(pki, anonymous_only=True) as endpoint:
            clock = SimClock(epoch=time.time(), speed=1.0)
            async with Mirror(cfg, clock, endpoint=endpoint, security=security) as mirror:
                assert await mirror.wait_all_received(20.0)
                value = mirror.snapshot().value("T")
                inputs = await mirror.read_inputs()
            args = ["browse", endpoint, *security_args(pki), "--anonymous", "-o", str(out)]
            code = await asyncio.to_thread(main, args)
            return value, inputs, code

    with caplog.at_level(logging.WARNING, logger="parallelcity.field.opcua.session"):
        value, inputs, code = run(body)
    assert value == 70.0 and inputs == {"T_set": 65.0}
    assert code == EXIT_OK
    anonymous = [r for r in caplog.records if "ANONYMOUS" in r.getMessage()]
    assert anonymous and all(r.levelno == logging.WARNING for r in anonymous)
    assert "SignAndEncrypt" in anonymous[0].getMessage()
    table = tomllib.loads(out.read_text())
    assert {p["node"] for p in table["field"]["points"]} == {"s=plant/T", "s=plant/T_set"}


@pytest.mark.slow
def test_secure_browse_with_its_own_options(
    pki: LabPki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BROWSE_TEST_PASSWORD", PASSWORD)
    out = tmp_path / "points.toml"

    async def body() -> tuple[int, int, str]:
        async with secure_server(pki, anonymous_only=False) as endpoint:
            ok = await asyncio.to_thread(
                main,
                ["browse", endpoint, *security_args(pki), "--policy", "Basic256Sha256"]
                + ["--username", USER, "--password-env", "BROWSE_TEST_PASSWORD", "-o", str(out)],
            )
            # the same server refuses a plain browse: it has no None endpoint to serve it
            insecure = await asyncio.to_thread(main, ["browse", endpoint, "--insecure-lab"])
            return ok, insecure, out.read_text()

    ok, insecure, text = run(body)
    assert ok == EXIT_OK
    assert insecure != EXIT_OK
    table = tomllib.loads(text)
    assert table["field"]["namespace"] == NS
    # the writable setpoint is offered as an event-driven point, commented out
    assert re.search(r'node = "s=plant/T_set"\nmax_age_s = 60\n# event_driven = true', text)
    assert 'node = "s=plant/T"\nmax_age_s = 60\n\n' in text


def usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == EXIT_INVALID
    return capsys.readouterr().err


def test_browse_usage_errors_exit_2_with_a_reason(
    pki: LabPki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = "opc.tcp://127.0.0.1:4840"
    assert "not an opc.tcp://HOST:PORT URL" in usage_error(
        ["browse", "garbage", "--insecure-lab"], capsys
    )
    missing = tmp_path / "missing" / "dir"
    err = usage_error(["browse", url, "--insecure-lab", "-o", str(missing / "f.toml")], capsys)
    assert str(missing) in err and "does not exist" in err
    err = usage_error(["browse", url, "--certificate", str(pki.client.certificate)], capsys)
    assert "--private-key" in err and "--trust" in err
    err = usage_error(["browse", url, *security_args(pki)], capsys)
    assert "exactly one user token" in err
    err = usage_error(["browse", url, *security_args(pki), "--anonymous", "--insecure-lab"], capsys)
    assert "contradicts" in err
    err = usage_error(["browse", url, "--scenario", "s.toml", "--anonymous"], capsys)
    assert "either --scenario" in err
    err = usage_error(["browse", url, *security_args(pki), "--username", "u"], capsys)
    assert "--password-env" in err


@pytest.mark.slow
def test_browse_from_the_shell_unreachable_and_garbage(tmp_path: Path) -> None:
    """As a user runs it: exit 3 for an unreachable server, 2 for garbage, no traceback."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "parallelcity", "browse"]
    port = free_port()  # nothing listens there
    procs = [
        subprocess.Popen(
            [*cmd, target, "--insecure-lab"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=tmp_path,
        )
        for target in (f"opc.tcp://127.0.0.1:{port}", "garbage")
    ]
    (_, err3), (_, err2) = (p.communicate(timeout=60) for p in procs)
    assert procs[0].returncode == EXIT_FIELD, err3
    assert procs[1].returncode == EXIT_INVALID, err2
    for err in (err3, err2):
        assert "Traceback" not in err
    assert "cannot connect" in err3 and "garbage" in err2


def test_readme_lists_every_browse_option() -> None:
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("## The command line") :]
    block = block[: block.index("```\n\n")]
    browse = block[block.index("parallelcity browse") :]
    sub = _parser()._subparsers._group_actions[0].choices["browse"]  # type: ignore[union-attr]
    missing = [
        a.option_strings
        for a in sub._actions
        if a.option_strings
        and "--help" not in a.option_strings
        and not any(re.search(re.escape(o) + r"\b", browse) for o in a.option_strings)
    ]
    assert not missing, missing


def test_the_gateway_config_takes_anonymous_too(pki: LabPki, tmp_path: Path) -> None:
    from parallelcity.errors import ScenarioError
    from parallelcity.gateway.config import load_gateway_config

    text = (ROOT / "docs" / "gateway.example.toml").read_text()
    for key, path in (
        ("certificate", pki.client.certificate),
        ("private_key", pki.client.private_key),
        ("trusted", pki.client_trusted),
    ):
        text = re.sub(rf'(?m)^{key} = ".*"$', f'{key} = "{path}"', text, count=1)
    tokens = 'username = "gateway"\npassword_env = "PARALLELCITY_PLC_PASSWORD"\n'
    assert tokens in text
    config = tmp_path / "gw.toml"
    config.write_text(text.replace(tokens, "anonymous = true\n"))
    security = load_gateway_config(config).opcua()
    assert security.secure and security.anonymous and security.username is None
    config.write_text(text.replace(tokens, ""))
    with pytest.raises(ScenarioError, match="anonymous = true"):
        load_gateway_config(config)
