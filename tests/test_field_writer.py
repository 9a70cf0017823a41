"""The gateway's OPC UA writer across outages, against a real asyncua server in another process.

The server (``python -m tests.opcua_input_server``) offers SignAndEncrypt only
and prints every value a client writes to it, so the test counts what landed
in the field, across a ``kill -9`` and a fresh process on the same port, or a
``SIGSTOP`` (a silent link: the socket stays open, nothing answers).

A real gateway (CURVE, durable store) serves a real dispatcher in this
process.  Every command carries values no other command uses.  Checked:

* while the session is down every command is refused (``write_failed``) with
  a reason that says nothing was written and nothing is kept for later;
* after the outage the writer has reconnected (new secure session, nodes
  resolved again) and commands are applied again, without a restart;
* every applied command's values landed exactly once, no refused command's
  values ever landed (never late), and a resend of an applied id is a duplicate;
* the loss and the recovery are journaled in the gateway's store.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from parallelcity.hil.field import free_port

from parallelcity.backoff import Backoff
from parallelcity.clock import SimClock
from parallelcity.dispatch.dispatcher import ClientCurve, Dispatcher
from parallelcity.dispatch.keys import KeyPair
from parallelcity.dispatch.wire import Ack, AckStatus, Command, RefusalCode
from parallelcity.errors import FieldUnavailableError
from parallelcity.field.opcua.certs import LabPki, make_lab_pki
from parallelcity.field.opcua.config import OpcUaField as FieldConfig
from parallelcity.field.opcua.config import OpcUaInput as InputMap
from parallelcity.field.opcua.config import OpcUaPoint as PointMap
from parallelcity.field.opcua.session import ClientSecurity
from parallelcity.field.opcua.writer import OpcUaWriter
from parallelcity.gateway.core import GatewayCore
from parallelcity.gateway.grants import Grant
from parallelcity.gateway.server import FieldGateway, ServerCurve, new_zap_domain
from parallelcity.gateway.store import GatewayStore
from parallelcity.gateway.zap import AllowList
from parallelcity.specs import InputLimit

from .opcua_input_server import INPUTS, NAMESPACE, PASSWORD_ENV, USER

ROOT = Path(__file__).resolve().parents[1]
VERDICT = "cd" * 32
FIELD = FieldConfig(
    namespace=NAMESPACE,
    points=[PointMap(name="a", node=INPUTS["a"], max_age_s=60.0)],
    inputs=[InputMap(name=n, node=node) for n, node in INPUTS.items()],
)
LIMITS = {n: InputLimit(n, 0.0, 1000.0) for n in INPUTS}
BACKOFF = Backoff(initial=0.05, maximum=0.5)


def run(make: Callable[[], Awaitable[Any]], timeout_s: float) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(timeout_s):
            return await make()

    return asyncio.run(bounded())


class InputServer:
    """``python -m tests.opcua_input_server`` on a fixed port; collects what was written."""

    def __init__(self, port: int, pki: Path, password: str) -> None:
        self.port, self.pki, self.password = port, pki, password
        self.proc: subprocess.Popen[str] | None = None
        self.writes: list[tuple[str, float]] = []
        self._up: queue.Queue[str] = queue.Queue()
        self._reader: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        return f"opc.tcp://127.0.0.1:{self.port}"

    async def spawn(self) -> None:
        env = dict(os.environ, **{PASSWORD_ENV: self.password})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.opcua_input_server"]
            + ["--port", str(self.port), "--pki", str(self.pki)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
        )
        self._reader = threading.Thread(target=self._read, args=(self.proc,), daemon=True)
        self._reader.start()
        line = await asyncio.to_thread(self._up.get, True, 30.0)
        assert line == f"up {self.port}", line

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            word, *rest = line.split()
            if word == "write":
                self.writes.append((rest[0], float(rest[1])))
            elif word == "up":
                self._up.put(line.strip())

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def kill(self) -> None:
        """``kill -9``, and every line it printed before is collected."""
        proc, reader = self.proc, self._reader
        assert proc is not None and reader is not None
        proc.kill()
        await asyncio.to_thread(proc.wait)
        await asyncio.to_thread(reader.join, 10.0)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def client_security(pki: LabPki, password: str) -> ClientSecurity:
    return ClientSecurity(
        "Basic256Sha256",
        pki.client.certificate,
        pki.client.private_key,
        pki.client_trusted,
        username=USER,
        password=password,
    )


class Runtime:
    """A dispatcher sending commands whose values no other command uses."""

    def __init__(self, disp: Dispatcher, clock: SimClock) -> None:
        self.disp, self.clock = disp, clock
        self.n = 0
        self.applied: list[Command] = []
        self.refused: list[tuple[Command, Ack]] = []

    async def send(self) -> tuple[Command, Ack]:
        self.n += 1
        now = self.clock.now()
        cmd = self.disp.command(
            {"a": 100.0 + self.n / 1000.0, "b": 500.0 + self.n / 1000.0},
            issued_at=now,
            valid_until=now + 60.0,
            verdict_digest=VERDICT,
        )
        ack = await self.disp.deliver(cmd)
        if ack.status is AckStatus.APPLIED:
            self.applied.append(cmd)
        else:
            assert ack.status is AckStatus.REFUSED, ack
            self.refused.append((cmd, ack))
        return cmd, ack

    def landed_exactly_once(self, writes: list[tuple[str, float]]) -> None:
        counts = Counter(writes)
        for cmd in self.applied:
            for name, value in cmd.setpoints.items():
                assert counts[(INPUTS[name], value)] == 1, (cmd.id, name, value, counts)
        for cmd, _ in self.refused:
            for name, value in cmd.setpoints.items():
                assert counts[(INPUTS[name], value)] == 0, f"refused {cmd.id} landed: {value}"
        assert len(writes) == 2 * len(self.applied)


async def wait_for(what: Callable[[], bool], timeout_s: float, why: str) -> None:
    async with asyncio.timeout(timeout_s):
        while not what():
            await asyncio.sleep(0.02)
    assert what(), why


async def outage_round(
    tmp_path: Path,
    pki: LabPki,
    cut: Callable[[InputServer], Awaitable[None]],
    mend: Callable[[InputServer], Awaitable[None]],
    notice_s: float,
) -> None:
    password = secrets.token_urlsafe(16)
    server = InputServer(free_port(), pki.root, password)
    events: list[tuple[str, str]] = []
    store = GatewayStore(tmp_path / "gateway.sqlite")
    server_keys, client_keys = KeyPair.generate(), KeyPair.generate()
    curve = ServerCurve(
        server_keys, AllowList.of([(client_keys.public, Grant.everything("runtime"))]),
        new_zap_domain(),
    )  # fmt: skip
    clock = SimClock(epoch=time.time(), speed=1.0)

    def on_link(kind: str, detail: str) -> None:
        events.append((kind, detail))
        store.record_event(clock.now(), kind, detail)

    try:
        await server.spawn()
        writer = OpcUaWriter(
            server.endpoint,
            FIELD,
            security=client_security(pki, password),
            backoff=BACKOFF,
            timeout_s=2.0,
            on_link=on_link,
        )
        gateway = FieldGateway(
            GatewayCore(LIMITS), writer, clock, bind="tcp://127.0.0.1:0", curve=curve, store=store
        )
        async with writer, gateway, contextlib.AsyncExitStack() as stack:
            serving = asyncio.create_task(gateway.serve())
            stack.callback(serving.cancel)
            async with Dispatcher(
                gateway.endpoint,
                "runtime",
                timeout_s=8.0,
                retries=0,
                curve=ClientCurve(client_keys, server_keys.public),
            ) as disp:
                rt = Runtime(disp, clock)
                for _ in range(5):
                    _, ack = await rt.send()
                    assert ack.status is AckStatus.APPLIED, ack
                first = rt.applied[0]

                await cut(server)
                await wait_for(
                    lambda: not writer.available, notice_s, "the writer missed the outage"
                )
                for _ in range(10):
                    _, ack = await rt.send()
                    assert ack.code is RefusalCode.WRITE_FAILED, ack
                    assert "nothing was written" in ack.detail, ack.detail
                    assert "nothing is kept to be written later" in ack.detail, ack.detail
                    await asyncio.sleep(0.05)
                # The outage changes nothing about ids already applied.
                again = await disp.deliver(first)
                assert again.status is AckStatus.DUPLICATE, again
                with pytest.raises(FieldUnavailableError):
                    await writer.write({"a": 1.0})

                await mend(server)
                refused_before = len(rt.refused)
                async with asyncio.timeout(30.0):
                    while True:
                        _, ack = await rt.send()
                        if ack.status is AckStatus.APPLIED:
                            break
                        assert ack.code is RefusalCode.WRITE_FAILED, ack
                        await asyncio.sleep(0.05)
                for _ in range(5):
                    _, ack = await rt.send()
                    assert ack.status is AckStatus.APPLIED, ack
                for cmd in (first, rt.applied[-1]):
                    again = await disp.deliver(cmd)
                    assert again.status is AckStatus.DUPLICATE, again
                refused_after = len(rt.refused) - refused_before
            await asyncio.sleep(0.5)  # time for any late write to show up (there must be none)
        await server.kill()
        rt.landed_exactly_once(server.writes)
        assert len(rt.applied) >= 11 and len(rt.refused) >= 10
        assert gateway.counters.applied == len(rt.applied)
        assert writer.outages == writer.reconnects == 1, (writer.outages, writer.reconnects)
        assert [k for k, _ in events] == ["field_lost", "field_restored"], events
        journaled = [k for _, k, _ in store.events()]
        assert "field_lost" in journaled and "field_restored" in journaled
        print(f"refused after the server was back: {refused_after}")
    finally:
        server.close()
        store.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LabPki:
    return make_lab_pki(tmp_path_factory.mktemp("pki"))


@pytest.mark.slow
def test_gateway_refuses_while_the_plc_is_killed_and_applies_after_it_restarts(
    tmp_path: Path, pki: LabPki
) -> None:
    async def cut(server: InputServer) -> None:
        await server.kill()

    async def mend(server: InputServer) -> None:
        await server.spawn()  # a fresh process on the same port: a rebooted PLC

    # A closed socket shows at once; allow for a busy machine.
    run(lambda: outage_round(tmp_path, pki, cut, mend, notice_s=3.0), timeout_s=120.0)


@pytest.mark.slow
def test_gateway_refuses_on_a_silent_link_and_applies_after_it_answers_again(
    tmp_path: Path, pki: LabPki
) -> None:
    async def cut(server: InputServer) -> None:
        server.signal(signal.SIGSTOP)  # socket open, nothing answers

    async def mend(server: InputServer) -> None:
        server.signal(signal.SIGCONT)

    # asyncua probes the server every second and gives the probe up to a second.
    run(lambda: outage_round(tmp_path, pki, cut, mend, notice_s=8.0), timeout_s=120.0)


def test_a_writer_that_cannot_connect_at_start_raises(tmp_path: Path, pki: LabPki) -> None:
    """The first connection must succeed: a wrong endpoint is an error, not an outage."""
    from parallelcity.errors import FieldConnectionError

    async def body() -> None:
        writer = OpcUaWriter(
            f"opc.tcp://127.0.0.1:{free_port()}",
            FIELD,
            security=client_security(pki, "x"),
            timeout_s=1.0,
        )
        with pytest.raises(FieldConnectionError):
            await writer.connect()
        assert not writer.available

    run(body, timeout_s=30.0)
