"""Attacks on the gateway's decision rules, against ``parallelcity gateway CONFIG`` in its own
process, over CURVE on 127.0.0.1, in front of a real OPC UA server that records every write.

Each test reproduces an attack an allowed key could make with hand-written bytes:

* ramp bypass and ramp denial through a client-chosen ``issued_at``;
* one key speaking for another key's issuer (its seq, its leases, its name);
* lone UTF-16 surrogates in a re-arm reason and in a setpoint name;
* a reused command id with another payload, across a restart;
* times far out of range.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio
from asyncua import Server, ua
from asyncua.common.callback import CallbackType, ServerItemCallback

from parallelcity.dispatch.keys import KeyPair, read_public_key, read_secret_key, write_keypair
from parallelcity.dispatch.wire import (
    MAX_SEQ,
    Ack,
    AckStatus,
    RefusalCode,
    Reply,
    Status,
    WatchdogState,
    decode_reply,
    new_command_id,
)

from .conftest import ROOT
from .test_gateway import free_port

NS = "urn:parallelcity:test:attacks"
VERDICT = "cd" * 32
T_SET, M_FLOW = "plant.T_supply_set", "apartment.m_flow"
RATE_K_PER_H = 10.0
RAMP_SLACK_S = 60.0
SAFE = {T_SET: 65.0, M_FLOW: 0.2}
RECV_S = 5.0


def run(make: Callable[[], Awaitable[None]], timeout_s: float = 60.0) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(timeout_s):
            await make()

    asyncio.run(bounded())


class RecordingServer:
    """An asyncua server (no security: the OPC UA side is not under test) with the two inputs;
    records every value written to them, in order."""

    def __init__(self, port: int) -> None:
        self.endpoint = f"opc.tcp://127.0.0.1:{port}/attacks/"
        self.writes: list[tuple[str, float]] = []
        self.server = Server()
        self._names: dict[Any, str] = {}

    async def start(self) -> None:
        server = self.server
        await server.init()
        server.set_endpoint(self.endpoint)
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        idx = await server.register_namespace(NS)
        for name, start in ((T_SET, 70.0), (M_FLOW, 0.3)):
            node = ua.NodeId(name.replace(".", "/"), idx)
            var = await server.nodes.objects.add_variable(
                node, name, start, varianttype=ua.VariantType.Double
            )
            await var.set_writable()
            self._names[var.nodeid] = name
        server.subscribe_server_callback(CallbackType.PostWrite, self._on_write)
        await server.start()

    def _on_write(self, event: ServerItemCallback, _dispatcher: Any) -> None:
        results = event.response_params or []
        for k, wv in enumerate(event.request_params.NodesToWrite):
            name = self._names.get(wv.NodeId)
            if name is None or (k < len(results) and not results[k].is_good()):
                continue
            self.writes.append((name, float(wv.Value.Value.Value)))

    def values(self, name: str) -> list[float]:
        return [v for n, v in self.writes if n == name]

    async def stop(self) -> None:
        await self.server.stop()


def write_config(folder: Path, opc: str, port: int, *, watchdog: bool) -> Path:
    for name in ("gateway", "alpha", "beta"):
        write_keypair(folder / "keys", name)
    safe = {T_SET: f"safe = {SAFE[T_SET]}", M_FLOW: f"safe = {SAFE[M_FLOW]}"}
    if not watchdog:
        safe = {T_SET: "", M_FLOW: ""}
    path = folder / "gateway.toml"
    path.write_text(
        f"""
[gateway]
bind = "tcp://127.0.0.1:{port}"
state = "state.sqlite"
clock_skew_s = 5.0
ramp_slack_s = {RAMP_SLACK_S}

[security]
insecure_lab = true   # OPC UA to the recording server has no security; ZeroMQ uses CURVE

[security.zmq]
secret_key = "keys/gateway.secret"
[[security.zmq.clients]]
name = "alpha"
public_key = "keys/alpha.public"
equipment = ["*"]
rearm = true
[[security.zmq.clients]]
name = "beta"
public_key = "keys/beta.public"
equipment = ["*"]

[field]
endpoint = "{opc}"
namespace = "{NS}"
[[field.inputs]]
name = "{T_SET}"
node = "s=plant/T_supply_set"
min = 60.0
max = 95.0
max_rate_per_h = {RATE_K_PER_H}
{safe[T_SET]}
[[field.inputs]]
name = "{M_FLOW}"
node = "s=apartment/m_flow"
min = 0.02
max = 2.0
{safe[M_FLOW]}

[watchdog]
heartbeat_interval_s = 0.2
missed_heartbeats = 2
"""
    )
    return path


class GatewayProcess:
    """``python -m parallelcity gateway CONFIG``; its output lines are collected."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.log: list[str] = []
        self._lines: queue.Queue[str] = queue.Queue()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "parallelcity", "gateway", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.append(line)
            self._lines.put(line)

    async def ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if self.proc.poll() is not None and self._lines.empty():
                break
            try:
                line = await asyncio.to_thread(self._lines.get, True, min(left, 0.5))
            except queue.Empty:
                continue
            if "serving on" in line:
                return
        raise AssertionError(f"the gateway did not start; log:\n{''.join(self.log)}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10.0)


class Client:
    """A raw CURVE DEALER: sends hand-written JSON, reads replies with a bound."""

    def __init__(
        self, ctx: zmq.asyncio.Context, endpoint: str, keys: KeyPair, server: bytes
    ) -> None:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDTIMEO, 5000)
        sock.setsockopt(zmq.CURVE_SERVERKEY, server)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
        sock.connect(endpoint)
        self.sock = sock

    async def send(self, obj: dict[str, Any] | bytes) -> None:
        data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        await self.sock.send(data)

    async def recv(self) -> tuple[bytes, Reply]:
        assert await self.sock.poll(RECV_S * 1000, zmq.POLLIN), "no reply in time"
        data = await self.sock.recv()
        return data, decode_reply(data)

    async def ask(self, obj: dict[str, Any] | bytes) -> Reply:
        await self.send(obj)
        return (await self.recv())[1]

    async def ack(self, obj: dict[str, Any] | bytes) -> Ack:
        reply = await self.ask(obj)
        assert isinstance(reply, Ack), reply
        return reply

    async def status(self, obj: dict[str, Any] | bytes) -> Status:
        reply = await self.ask(obj)
        assert isinstance(reply, Status), reply
        return reply


def command(issuer: str, seq: int, setpoints: dict[str, float], **times: float) -> dict[str, Any]:
    now = time.time()
    issued = times.get("issued_at", now)
    return {
        "v": 1,
        "type": "command",
        "id": new_command_id(),
        "issuer": issuer,
        "seq": seq,
        "issued_at": issued,
        "valid_until": times.get("valid_until", issued + 600.0),
        "setpoints": setpoints,
        "verdict": VERDICT,
    }


def heartbeat(issuer: str, *, release: bool = False) -> dict[str, Any]:
    return {
        "v": 1,
        "type": "heartbeat",
        "id": new_command_id(),
        "issuer": issuer,
        "sent_at": time.time(),
        "release": release,
    }


def rearm(issuer: str, reason: str) -> bytes:
    # json.dumps writes a lone surrogate as the escape "\ud800", exactly what an attacker sends.
    obj = {"v": 1, "type": "rearm", "id": new_command_id(), "issuer": issuer, "reason": reason}
    return json.dumps(obj).encode()


class Site:
    """The recording OPC UA server, the gateway process, and one raw client per key."""

    def __init__(self, folder: Path, *, watchdog: bool = False) -> None:
        self.folder = folder
        self.opc = RecordingServer(free_port())
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.config = write_config(
            folder, self.opc.endpoint, int(self.endpoint.rsplit(":", 1)[1]), watchdog=watchdog
        )
        self.ctx = zmq.asyncio.Context()
        self.gateway: GatewayProcess | None = None

    def client(self, name: str) -> Client:
        keys = read_secret_key(self.folder / "keys" / f"{name}.secret")
        server = read_public_key(self.folder / "keys" / "gateway.public")
        return Client(self.ctx, self.endpoint, keys, server)

    async def start_gateway(self) -> GatewayProcess:
        self.gateway = GatewayProcess(self.config)
        await self.gateway.ready()
        return self.gateway

    def store_rows(self, sql: str) -> list[tuple[Any, ...]]:
        db = sqlite3.connect(self.folder / "state.sqlite")
        try:
            return db.execute(sql).fetchall()
        finally:
            db.close()


@contextlib.asynccontextmanager
async def site(folder: Path, *, watchdog: bool = False) -> AsyncIterator[Site]:
    s = Site(folder, watchdog=watchdog)
    await s.opc.start()
    try:
        await s.start_gateway()
        yield s
    finally:
        if s.gateway is not None:
            s.gateway.kill()
        s.ctx.destroy(linger=0)
        await s.opc.stop()


# =========================================================================== 1. ramps


@pytest.mark.slow
def test_a_past_issued_at_does_not_buy_a_jump_past_the_ramp(tmp_path: Path) -> None:
    """Bypass: the current value again with an old issued_at, then a jump stamped now."""

    async def main() -> None:
        async with site(tmp_path) as s:
            alpha = s.client("alpha")
            assert (await alpha.ack(command("alpha", 1, {T_SET: 70.0}))).status is AckStatus.APPLIED
            now = time.time()
            # issued_at = 0: a day of validity at most, so it cannot still be valid now.
            old = await alpha.ack(command("alpha", 2, {T_SET: 70.0}, issued_at=0.0,
                                          valid_until=now + 600.0))  # fmt: skip
            assert old.code is RefusalCode.MALFORMED and "at most 86400 s" in old.detail, old
            # Within the bounds (50 minutes old, still valid): accepted, it moves nothing...
            older = await alpha.ack(command("alpha", 3, {T_SET: 70.0}, issued_at=now - 3000.0,
                                            valid_until=now + 600.0))  # fmt: skip
            assert older.status is AckStatus.APPLIED, older
            # ...and buys nothing: the ramp is judged on the gateway's clock (7 K in 3000 s
            # of issued_at would be within 10 K/h; in the seconds since the last write it is not).
            jump = await alpha.ack(command("alpha", 4, {T_SET: 77.0}))
            assert jump.code is RefusalCode.RATE_LIMIT, jump
            assert "since its last write" in jump.detail
            assert 89.0 not in s.opc.values(T_SET)
            jump = await alpha.ack(command("alpha", 5, {T_SET: 89.0}))
            assert jump.code is RefusalCode.RATE_LIMIT, jump
            assert s.opc.values(T_SET) == [70.0, 70.0]
            assert s.store_rows("SELECT value FROM input WHERE name = 'plant.T_supply_set'") == [
                (70.0,)
            ]

    run(main)


@pytest.mark.slow
def test_a_future_issued_at_is_refused_and_does_not_freeze_the_ramp(tmp_path: Path) -> None:
    """Denial: one command stamped 1e9 s ahead used to make every later move '0 s elapsed'."""

    async def main() -> None:
        async with site(tmp_path) as s:
            alpha = s.client("alpha")
            assert (await alpha.ack(command("alpha", 1, {T_SET: 70.0}))).status is AckStatus.APPLIED
            ahead = await alpha.ack(command("alpha", 2, {T_SET: 70.0}, issued_at=time.time() + 1e9))
            assert ahead.code is RefusalCode.BAD_TIME and "ahead of gateway time" in ahead.detail
            # A move within the ramp (10 K/h, 60 s of slack: 0.17 K) is still accepted.
            ok = await alpha.ack(command("alpha", 3, {T_SET: 70.1}))
            assert ok.status is AckStatus.APPLIED, ok
            assert s.opc.values(T_SET)[-1] == 70.1
            # Far in the past but not too old for the wire: refused by the gateway's max age.
            now = time.time()
            stale = await alpha.ack(command("alpha", 4, {T_SET: 70.1}, issued_at=now - 80_000.0,
                                            valid_until=now + 60.0))  # fmt: skip
            assert stale.code is RefusalCode.BAD_TIME and "before gateway time" in stale.detail

    run(main)


# =========================================================================== 3. issuers


@pytest.mark.slow
def test_a_key_cannot_speak_for_another_issuer_nor_learn_its_name(tmp_path: Path) -> None:
    async def main() -> None:
        async with site(tmp_path) as s:
            alpha, beta = s.client("alpha"), s.client("beta")
            assert (await alpha.ack(command("alpha", 5, {M_FLOW: 0.5}))).status is AckStatus.APPLIED
            # B sets A's seq to the maximum: refused, whatever the seq.
            for seq in (MAX_SEQ, 6):
                taken = await beta.ack(command("alpha", seq, {M_FLOW: 0.6}))
                assert taken.code is RefusalCode.UNAUTHORISED, taken
                assert "bound to issuer 'beta'" in taken.detail
            beyond = await beta.ack(command("alpha", 2**63 - 1, {M_FLOW: 0.6}))
            assert beyond.code is RefusalCode.MALFORMED and "2**53-1" in beyond.detail
            # B releases A's leases, or heartbeats as A: refused.
            for hb in (heartbeat("alpha", release=True), heartbeat("alpha")):
                refused = await beta.ack(hb)
                assert refused.code is RefusalCode.UNAUTHORISED, refused
            # B's own release leaves A's lease alone; B's status does not name A.
            await beta.send(heartbeat("beta", release=True))
            data, status = await beta.recv()
            assert isinstance(status, Status) and status.leases == {"apartment": "*"}
            assert b"alpha" not in data
            held = await beta.ack(command("beta", 0, {M_FLOW: 0.7}))
            assert held.code is RefusalCode.LEASE_HELD and "another issuer" in held.detail
            assert "alpha" not in held.detail
            assert s.opc.values(M_FLOW) == [0.5]
            # A's own view: its seq where it left it, its lease.
            own = await alpha.status(heartbeat("alpha"))
            assert own.last_seq == 5 and own.leases == {"apartment": "alpha"}
            assert s.store_rows("SELECT issuer, last_seq FROM issuer") == [("alpha", 5)]

    run(main)


# =========================================================================== 4. surrogates


@pytest.mark.slow
def test_lone_surrogates_are_malformed_and_touch_no_other_reply_nor_the_store(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with site(tmp_path, watchdog=True) as s:
            gw = s.gateway
            assert gw is not None
            alpha = s.client("alpha")
            # Arm the watchdog, fall silent: it trips and reverts.
            assert (await alpha.status(heartbeat("alpha"))).watchdog is WatchdogState.ARMED
            for _ in range(100):
                await asyncio.sleep(0.1)
                if s.opc.values(T_SET)[-1:] == [SAFE[T_SET]]:
                    break
            assert (await alpha.status(heartbeat("alpha"))).watchdog is WatchdogState.TRIPPED
            bad = await alpha.ack(rearm("alpha", "checked \ud800"))
            assert bad.code is RefusalCode.MALFORMED and "lone surrogate U+D800" in bad.detail
            assert s.store_rows("SELECT state FROM watchdog") == [("tripped",)]
            # A store write after it: the gateway is alive and its store consistent.
            good = await alpha.status(rearm("alpha", "plant inspected"))
            assert good.watchdog is WatchdogState.IDLE and gw.alive()
            assert s.store_rows("SELECT state FROM watchdog") == [("idle",)]
            # One batch: surrogate setpoint names between good commands; every reply arrives.
            msgs: list[dict[str, Any]] = []
            for k in range(4):
                msgs.append(command("alpha", 2 * k + 1, {"apartment.m\ud800": 0.4}))
                msgs.append(command("alpha", 2 * k + 2, {M_FLOW: (40 + k) / 100}))
            for m in msgs:
                await alpha.send(m)
            got: dict[str, Ack] = {}
            for _ in msgs:
                _, reply = await alpha.recv()
                assert isinstance(reply, Ack)
                got[reply.id] = reply
            for k, m in enumerate(msgs):
                ack = got[m["id"]]
                if k % 2 == 0:
                    assert ack.code is RefusalCode.MALFORMED and "lone surrogate" in ack.detail
                else:
                    assert ack.status is AckStatus.APPLIED, ack
            assert 0.43 in s.opc.values(M_FLOW) and gw.alive()
            # A restart reads a consistent store: the watchdog as stored, the last seq, no
            # pending row (the watchdog may have tripped again meanwhile: nobody heartbeats).
            gw.kill()
            await s.start_gateway()
            alpha = s.client("alpha")
            status = await alpha.status(heartbeat("alpha"))
            assert status.last_seq == 8
            ((stored,),) = s.store_rows("SELECT state FROM watchdog")
            assert stored in ("armed", "tripped") and (stored == "tripped") == (
                status.watchdog is WatchdogState.TRIPPED
            )
            assert s.store_rows("SELECT count(*) FROM applied WHERE state = 'pending'") == [(0,)]

    run(main)


# =========================================================================== 9. ids, bounds


@pytest.mark.slow
def test_a_reused_id_with_another_payload_is_a_conflict_also_after_a_restart(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with site(tmp_path) as s:
            alpha = s.client("alpha")
            first = command("alpha", 1, {M_FLOW: 0.5})
            assert (await alpha.ack(first)).status is AckStatus.APPLIED
            for attempt in range(2):
                assert (await alpha.ack(first)).status is AckStatus.DUPLICATE
                for change in (
                    {"setpoints": {M_FLOW: 0.9}},
                    {"seq": 2},
                    {"valid_until": first["valid_until"] + 1.0},
                    {"verdict": "ef" * 32},
                ):
                    other = await alpha.ack(first | change)
                    assert other.code is RefusalCode.ID_CONFLICT, (attempt, change, other)
                    assert "different payload" in other.detail
                assert s.opc.values(M_FLOW) == [0.5]
                if attempt == 0:  # the digest is durable: the same after kill -9
                    assert s.gateway is not None
                    s.gateway.kill()
                    await s.start_gateway()
                    alpha = s.client("alpha")

    run(main)


@pytest.mark.slow
def test_times_out_of_range_are_refused_with_a_reason(tmp_path: Path) -> None:
    async def main() -> None:
        async with site(tmp_path) as s:
            alpha = s.client("alpha")
            now = time.time()
            for times, reason in (
                ({"valid_until": 1e300}, "'valid_until': expected seconds since the epoch"),
                ({"issued_at": now, "valid_until": now + 2 * 86_400}, "at most 86400 s"),
                ({"issued_at": -5.0, "valid_until": now}, "'issued_at': expected seconds"),
            ):
                ack = await alpha.ack(command("alpha", 1, {M_FLOW: 0.5}, **times))
                assert ack.code is RefusalCode.MALFORMED and reason in ack.detail, ack
            assert s.opc.values(M_FLOW) == []

    run(main)
