"""A secure OPC UA server refuses every service on a SecurityPolicy None channel.

The server is a real process (``python -m tests.opcua_input_server``, built with
``configure_server``: SignAndEncrypt endpoints only) on 127.0.0.1.  The attacker
is a hand-driven asyncua client without a certificate that knows the password:
it opens a None channel (or skips OpenSecureChannel altogether), then tries to
create and activate a session with the password in plaintext, read and write.
Only discovery (GetEndpoints, FindServers) is answered on a None channel, as the
OPC UA specification asks; everything else is refused and the connection closed.
"""

from __future__ import annotations

import asyncio
import logging
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
from asyncua import Client, ua
from asyncua.crypto import security_policies
from asyncua.ua.object_ids import ObjectIds
from parallelcity.hil.field import free_port

from parallelcity.field.opcua.certs import LabPki, make_lab_pki
from parallelcity.field.opcua.session import (
    _install_channel_guard,
    channel_problem,
    configure_server,
)

from .opcua_input_server import INPUTS, NAMESPACE, PASSWORD_ENV, USER

ROOT = Path(__file__).resolve().parents[1]
STEP_TIMEOUT_S = 5.0
REFUSAL_LOG_EVERY_S = 10.0  # parallelcity.field.opcua.session._REFUSAL_LOG_EVERY_S


def run(make: Callable[[], Awaitable[Any]], timeout_s: float = 60.0) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(timeout_s):
            return await make()

    return asyncio.run(bounded())


class InputServer:
    """The secure input server as a subprocess; ``writes`` is what it reports as written."""

    def __init__(self, pki: Path, password: str, stderr: Path) -> None:
        self.port = free_port("127.0.0.1")
        self.stderr = stderr
        self._err = stderr.open("w")
        self.writes: list[str] = []
        self._up: queue.Queue[str] = queue.Queue()
        env = dict(os.environ, **{PASSWORD_ENV: password})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.opcua_input_server"]
            + ["--port", str(self.port), "--pki", str(pki)],
            stdout=subprocess.PIPE,
            stderr=self._err,
            text=True,
            cwd=ROOT,
            env=env,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        line = self._up.get(True, 30.0)
        assert line == f"up {self.port}", line

    @property
    def endpoint(self) -> str:
        return f"opc.tcp://127.0.0.1:{self.port}"

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("write "):
                self.writes.append(line.strip())
            elif line.startswith("up "):
                self._up.put(line.strip())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10.0)
        self._reader.join(10.0)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._err.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LabPki:
    return make_lab_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def password() -> str:
    return secrets.token_urlsafe(16)


@pytest.fixture(scope="module")
def server(pki: LabPki, password: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    srv = InputServer(pki.root, password, tmp_path_factory.mktemp("log") / "stderr.txt")
    try:
        yield srv
    finally:
        srv.close()


def _target() -> ua.NodeId:
    # The input server registers NAMESPACE first: index 2 after the two standard ones.
    return ua.NodeId(INPUTS["a"].removeprefix("s="), 2)


async def _none_channel(endpoint: str, *, open_channel: bool) -> Client:
    """A connected socket with a SecurityPolicy None channel (or none opened at all)."""
    client = Client(endpoint, timeout=STEP_TIMEOUT_S)
    await client.connect_socket()
    await client.send_hello()
    if open_channel:
        await client.open_secure_channel()
    return client


async def _session_with_plaintext_password(client: Client, password: str) -> None:
    """CreateSession and ActivateSession by hand: no certificate, password in the clear."""
    params = ua.CreateSessionParameters()
    params.ClientNonce = os.urandom(32)
    params.ClientDescription = ua.ApplicationDescription(
        ApplicationUri="urn:attacker", ApplicationType=ua.ApplicationType.Client
    )
    params.EndpointUrl = client.server_url.geturl()
    params.SessionName = "attacker"
    params.RequestedSessionTimeout = 60_000
    await client.uaclient.create_session(params)
    act = ua.ActivateSessionParameters()
    token = ua.UserNameIdentityToken()
    token.PolicyId = "username"
    token.UserName = USER
    token.Password = password.encode()
    token.EncryptionAlgorithm = None
    act.UserIdentityToken = token
    await client.uaclient.activate_session(act)


async def _write(client: Client, value: float) -> None:
    dv = ua.DataValue(ua.Variant(value, ua.VariantType.Double))
    await client.get_node(_target()).write_value(dv)


async def _attempt(step: Callable[[], Awaitable[Any]]) -> str:
    """``"done"`` if the server carried ``step`` out, else the refusal seen by the client."""
    try:
        async with asyncio.timeout(STEP_TIMEOUT_S * 2):
            await step()
    except Exception as exc:  # any refusal: a fault, a closed connection, a timeout
        return f"refused: {type(exc).__name__}"
    return "done"


def test_a_client_without_certificate_cannot_use_a_none_channel(
    server: InputServer, password: str
) -> None:
    async def body() -> dict[str, str]:
        outcome: dict[str, str] = {}
        # 1. a None channel: discovery answers, with SignAndEncrypt endpoints only
        client = await _none_channel(server.endpoint, open_channel=True)
        try:
            endpoints = await client.get_endpoints()
            outcome["get_endpoints"] = "done"
            await client.find_servers()
            outcome["find_servers"] = "done"
            assert {e.SecurityMode for e in endpoints} == {ua.MessageSecurityMode.SignAndEncrypt}
            outcome["session"] = await _attempt(
                lambda: _session_with_plaintext_password(client, password)
            )
            outcome["write"] = await _attempt(lambda: _write(client, 41.0))
        finally:
            client.disconnect_socket()
        # 2. each other service on a fresh None channel, without a session
        services: dict[str, Callable[[Client], Awaitable[Any]]] = {
            "read": lambda c: c.uaclient.read(
                ua.ReadParameters(NodesToRead=[ua.ReadValueId(NodeId=_target())])
            ),
            "write_no_session": lambda c: _write(c, 42.0),
            "register_server": lambda c: c.uaclient.register_server(
                ua.RegisteredServer(ServerUri="urn:attacker", IsOnline=True)
            ),
        }
        for name, call in services.items():
            client = await _none_channel(server.endpoint, open_channel=True)
            try:
                outcome[name] = await _attempt(lambda: call(client))  # noqa: B023
            finally:
                client.disconnect_socket()
        # 3. no OpenSecureChannel at all: messages on the never-opened channel 0
        client = await _none_channel(server.endpoint, open_channel=False)
        try:
            outcome["session_unopened"] = await _attempt(
                lambda: _session_with_plaintext_password(client, password)
            )
            outcome["write_unopened"] = await _attempt(lambda: _write(client, 43.0))
        finally:
            client.disconnect_socket()
        return outcome

    started = time.monotonic()
    outcome = run(body)
    elapsed = time.monotonic() - started
    refused = {k: v for k, v in outcome.items() if v != "done"}
    assert outcome["get_endpoints"] == outcome["find_servers"] == "done"
    assert set(refused) == set(outcome) - {"get_endpoints", "find_servers"}, outcome
    # refused by the server, not lost to a slow machine: the first request on each
    # connection gets the fault, and the server has closed the connection after it
    for first in ("session", "read", "write_no_session", "register_server", "session_unopened"):
        assert outcome[first] == "refused: BadSecurityModeInsufficient", outcome
    closed = {"refused: ConnectionError", "refused: BadSecurityModeInsufficient"}
    assert {outcome["write"], outcome["write_unopened"]} <= closed, outcome
    assert server.writes == [], server.writes
    # the server said so, in at most one line per REFUSAL_LOG_EVERY_S (refusals are aggregated)
    lines = [x for x in server.stderr.read_text().splitlines() if "refused OPC UA " in x]
    assert 1 <= len(lines) <= 1 + elapsed // REFUSAL_LOG_EVERY_S, lines
    assert "refused OPC UA CreateSessionRequest from" in lines[0], lines


def test_the_same_server_accepts_a_trusted_client_over_sign_and_encrypt(
    server: InputServer, pki: LabPki, password: str
) -> None:
    """The control: the refusals above are about the channel, not a broken server."""

    async def body() -> None:
        client = Client(server.endpoint, timeout=STEP_TIMEOUT_S)
        client.application_uri = pki.client.application_uri
        await client.set_security(
            security_policies.SecurityPolicyBasic256Sha256,
            str(pki.client.certificate),
            str(pki.client.private_key),
            mode=ua.MessageSecurityMode.SignAndEncrypt,
        )
        client.set_user(USER)
        client.set_password(password)
        async with client:
            assert await client.get_namespace_index(NAMESPACE) == 2
            await _write(client, 7.0)

    run(body)
    for _ in range(100):  # the server prints before it answers; the reader thread may lag
        if server.writes:
            break
        threading.Event().wait(0.05)
    assert server.writes == [f"write {INPUTS['a']} 7.0"]


def test_an_insecure_lab_server_still_serves_policy_none_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from asyncua import Server

    _install_channel_guard()  # as if a secure server ran in this process too

    async def body() -> float:
        srv = Server()
        await srv.init()
        srv.disable_clock()
        await configure_server(srv, None)
        ns = await srv.register_namespace(NAMESPACE)
        var = await srv.nodes.objects.add_variable(
            ua.NodeId("w/a", ns), ua.QualifiedName("a", ns), 0.0, ua.VariantType.Double
        )
        await var.set_writable()
        port = free_port("127.0.0.1")
        srv.set_endpoint(f"opc.tcp://127.0.0.1:{port}")
        await srv.start()
        try:
            async with Client(f"opc.tcp://127.0.0.1:{port}", timeout=STEP_TIMEOUT_S) as client:
                node = client.get_node(ua.NodeId("w/a", ns))
                await node.write_value(ua.DataValue(ua.Variant(5.0, ua.VariantType.Double)))
                value: float = await node.read_value()
                return value
        finally:
            await srv.stop()

    with caplog.at_level(logging.WARNING, logger="parallelcity"):
        assert run(body) == 5.0
    assert any("INSECURE LAB MODE" in r.getMessage() for r in caplog.records)


def test_only_discovery_is_served_on_a_channel_without_sign_and_encrypt() -> None:
    def req(name: str) -> ua.NodeId:
        return ua.NodeId(ua.Int32(getattr(ObjectIds, f"{name}Request_Encoding_DefaultBinary")))

    discovery = [req("GetEndpoints"), req("FindServers"), req("CloseSecureChannel")]
    services = [req(n) for n in ("CreateSession", "ActivateSession", "Read", "Write", "Call")]
    services += [req("RegisterServer"), req("RegisterServer2"), req("Browse")]
    enc, sign, none = (
        ua.MessageSecurityMode.SignAndEncrypt,
        ua.MessageSecurityMode.Sign,
        ua.MessageSecurityMode.None_,
    )
    for typeid in discovery + services:
        assert channel_problem(True, enc, typeid) is None
        assert channel_problem(False, enc, typeid) is not None  # never opened
        assert channel_problem(False, none, typeid) is not None
    for typeid in discovery:
        assert channel_problem(True, none, typeid) is None
        assert channel_problem(True, sign, typeid) is None
    for typeid in services:
        assert channel_problem(True, none, typeid) is not None
        assert channel_problem(True, sign, typeid) is not None
