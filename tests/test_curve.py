"""CURVE + ZAP at the field gateway, over real loopback sockets; key files; authorisation.

"Reaches the handler" means ``FieldGateway.counters.received``: every message
the gateway's command handler sees is counted there, before decoding.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from parallelcity.cli import main as cli_main
from parallelcity.clock import FakeClock
from parallelcity.dispatch.dispatcher import ClientCurve, Dispatcher
from parallelcity.dispatch.keys import KeyPair, read_public_key, read_secret_key, write_keypair
from parallelcity.dispatch.wire import AckStatus, Command, RefusalCode, decode_ack
from parallelcity.errors import DispatchError, SecurityError
from parallelcity.gateway.core import GatewayCore
from parallelcity.gateway.grants import Grant
from parallelcity.gateway.server import FieldGateway, ServerCurve, new_zap_domain
from parallelcity.gateway.zap import AllowList, ZapHandler

from .test_gateway import GOOD, LIMITS, T0, VERDICT, FakeWriter, command, run

SCALE = float(os.environ.get("PARALLELCITY_SLOW_SCALE", "1"))
LIMITS3 = {
    **LIMITS,
    "office.m_flow": LIMITS["apartment.m_flow"].__class__("office.m_flow", 0.02, 2.0),
}
LIMITED = Grant(
    "limited",
    equipment=frozenset({"apartment"}),
    inputs=frozenset({"plant.T_supply_set"}),
    ranges={"plant.T_supply_set": (60.0, 80.0)},
    rearm=False,
)


class Keys:
    def __init__(self) -> None:
        self.server = KeyPair.generate()
        self.admin = KeyPair.generate()
        self.limited = KeyPair.generate()
        self.allow = AllowList.of(
            [(self.admin.public, Grant.everything("admin")), (self.limited.public, LIMITED)]
        )

    def curve(self) -> ServerCurve:
        return ServerCurve(self.server, self.allow, new_zap_domain())


@contextlib.asynccontextmanager
async def secure_gateway(
    keys: Keys, writer: FakeWriter, clock: FakeClock
) -> AsyncIterator[FieldGateway]:
    gateway = FieldGateway(
        GatewayCore(LIMITS3), writer, clock, bind="tcp://127.0.0.1:0", curve=keys.curve()
    )
    async with gateway:
        task = asyncio.create_task(gateway.serve())
        try:
            yield gateway
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def curve_socket(
    ctx: zmq.asyncio.Context, endpoint: str, client: KeyPair | None, server_public: bytes
) -> zmq.asyncio.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, 0)
    if client is not None:
        sock.setsockopt(zmq.CURVE_SERVERKEY, server_public)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, client.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, client.secret)
    sock.connect(endpoint)
    return sock


def test_only_allowed_curve_clients_reach_the_command_handler() -> None:
    """NULL clients, unknown keys, a wrong server key and raw garbage: 0 of N get through."""
    n = max(5, round(40 * SCALE))
    keys, writer, clock = Keys(), FakeWriter(), FakeClock(T0)
    rng = random.Random(5)

    async def main() -> None:
        ctx = zmq.asyncio.Context()
        try:
            async with secure_gateway(keys, writer, clock) as gw:
                host, port = gw.endpoint.removeprefix("tcp://").rsplit(":", 1)
                wrong_server = KeyPair.generate().public
                attackers = (
                    [curve_socket(ctx, gw.endpoint, None, b"") for _ in range(n)]  # NULL
                    + [
                        curve_socket(ctx, gw.endpoint, KeyPair.generate(), keys.server.public)
                        for _ in range(n)
                    ]  # unknown client keys
                    + [
                        curve_socket(ctx, gw.endpoint, keys.admin, wrong_server) for _ in range(n)
                    ]  # an allowed client key, but the wrong server key
                )
                for sock in attackers:
                    with contextlib.suppress(zmq.Again):
                        await sock.send(command().encode())
                # Raw bytes straight onto the TCP port: noise, and a NULL-mechanism greeting.
                null_greeting = b"\xff" + b"\x00" * 8 + b"\x7f\x03\x00NULL" + b"\x00" * 48
                for i in range(n):
                    with (
                        socket.create_connection((host, int(port)), timeout=2) as raw,
                        contextlib.suppress(ConnectionError),  # the gateway hangs up: good
                    ):
                        raw.sendall(null_greeting if i % 2 else rng.randbytes(rng.randint(1, 512)))
                        raw.sendall(command().encode())
                await asyncio.sleep(1.0)
                for sock in attackers:
                    assert not await sock.poll(0), "an unauthenticated peer got a reply"
                    sock.close(linger=0)
                assert gw.counters.received == 0
                assert gw.zap is not None
                assert gw.zap.denied["unknown client key"] >= n
                assert writer.writes == []
                # The gateway was listening all along: the allowed key gets through.
                curve = ClientCurve(keys.admin, keys.server.public)
                async with Dispatcher(gw.endpoint, "admin", curve=curve, context=ctx) as disp:
                    ack = await disp.send(
                        GOOD, issued_at=T0, valid_until=T0 + 900, verdict_digest=VERDICT
                    )
                assert ack.status is AckStatus.APPLIED and ack.insecure_lab is False
                assert gw.counters.received == 1 and writer.writes == [GOOD]
        finally:
            ctx.destroy(linger=0)

    run(main, timeout_s=60.0)


def random_unauthorised(rng: random.Random, seq: int) -> Command:
    """A command with at least one setpoint the ``LIMITED`` grant does not allow."""
    allowed_ok = {
        "apartment.m_flow": lambda: rng.uniform(0.02, 2.0),
        "plant.T_supply_set": lambda: rng.uniform(60.0, 80.0),
    }
    bad = rng.choice(["other_input", "unknown_input", "out_of_range"])
    setpoints: dict[str, float] = {}
    if bad == "other_input":
        setpoints["office.m_flow"] = rng.uniform(0.02, 2.0)
    elif bad == "unknown_input":
        setpoints[rng.choice(["valve.x", "apartmentX.m_flow", "plant", "plant.T_supply"])] = 1.0
    else:
        setpoints["plant.T_supply_set"] = rng.choice(
            [rng.uniform(80.001, 95.0), rng.uniform(-1e6, 59.999), rng.uniform(80.001, 1e6)]
        )
    for name, make in allowed_ok.items():
        if name not in setpoints and rng.random() < 0.5:
            setpoints[name] = make()
    return command(setpoints, seq=seq, issuer=rng.choice(["cycle", "limited", "admin"]))


@pytest.mark.slow
def test_authenticated_but_unauthorised_commands_are_never_executed() -> None:
    """10,000 random commands outside the client's grant: 0 executed, each refused."""
    total = 10_000
    keys, writer, clock = Keys(), FakeWriter(), FakeClock(T0)
    rng = random.Random(11)
    cmds = [random_unauthorised(rng, i) for i in range(total)]

    async def main() -> None:
        ctx = zmq.asyncio.Context()
        try:
            async with secure_gateway(keys, writer, clock) as gw:
                sock = curve_socket(ctx, gw.endpoint, keys.limited, keys.server.public)
                sock.setsockopt(zmq.SNDTIMEO, 5000)
                codes: dict[RefusalCode | None, int] = {}
                batch = 200
                for start in range(0, total, batch):
                    chunk = cmds[start : start + batch]
                    for c in chunk:
                        await sock.send(c.encode())
                    for c in chunk:
                        assert await sock.poll(5000), "no ack"
                        ack = decode_ack(await sock.recv())
                        assert ack.id == c.id and ack.status is AckStatus.REFUSED, ack
                        codes[ack.code] = codes.get(ack.code, 0) + 1
                assert codes == {RefusalCode.UNAUTHORISED: total}
                assert writer.writes == [] and gw.counters.applied == 0
                # Re-arming is not in this grant either.
                curve = ClientCurve(keys.limited, keys.server.public)
                async with Dispatcher(gw.endpoint, "limited", curve=curve, context=ctx) as disp:
                    with pytest.raises(DispatchError, match=r"unauthorised.*may not re-arm"):
                        await disp.rearm("trying")
                    # ...while a command inside the grant is applied.
                    ok = {"plant.T_supply_set": 75.0, "apartment.m_flow": 0.5}
                    ack = await disp.send(
                        ok, issued_at=T0, valid_until=T0 + 900, verdict_digest=VERDICT
                    )
                    assert ack.status is AckStatus.APPLIED
                assert writer.writes == [ok]
                sock.close(linger=0)
        finally:
            ctx.destroy(linger=0)

    run(main, timeout_s=120.0)


def test_grant_check_is_exact() -> None:
    assert LIMITED.check({"apartment.m_flow": 3.0}) is None  # bounds are the gateway's job
    assert LIMITED.check({"plant.T_supply_set": 80.0}) is None
    why = LIMITED.check({"plant.T_supply_set": 80.5, "office.m_flow": 1.0})
    assert why is not None and "outside [60, 80]" in why and "office.m_flow" in why
    assert Grant.everything("x").check({"anything.at_all": 1e9}) is None


def test_zap_handler_refuses_every_mismatch() -> None:
    keys = Keys()
    zap = ZapHandler(zmq.asyncio.Context.instance(), "gw-1", keys.allow)
    raw_admin = zmq.utils.z85.decode(keys.admin.public)
    ok = zap.decide([b"gw-1", b"127.0.0.1", b"", b"CURVE", raw_admin])
    assert ok == (b"200", b"OK", b"admin")
    for frames, reason in [
        ([b"gw-2", b"127.0.0.1", b"", b"CURVE", raw_admin], "domain"),
        ([b"*", b"127.0.0.1", b"", b"CURVE", raw_admin], "domain"),  # "*" is no wildcard
        ([b"gw-1", b"127.0.0.1", b"", b"NULL"], "not CURVE"),
        ([b"gw-1", b"127.0.0.1", b"", b"PLAIN", b"u", b"p"], "not CURVE"),
        ([b"gw-1", b"127.0.0.1", b"", b"CURVE", b"short"], "credentials"),
        ([b"gw-1", b"127.0.0.1", b"", b"CURVE", os.urandom(32)], "unknown client key"),
        ([b"gw-1"], "malformed"),
    ]:
        code, text, user = zap.decide(frames)
        assert (code, user) == (b"400", b""), frames
        assert reason in text.decode()


def test_without_keys_nothing_starts_unless_insecure_lab() -> None:
    with pytest.raises(SecurityError, match="needs CURVE keys"):
        Dispatcher("tcp://127.0.0.1:1", "cycle")
    with pytest.raises(SecurityError, match="needs CURVE keys"):
        FieldGateway(GatewayCore(LIMITS), FakeWriter(), FakeClock(), bind="tcp://127.0.0.1:0")


def test_keys_command_writes_pairs_with_private_secret_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["keys", str(tmp_path / "k"), "gateway", "control-room"]) == 0
    out = capsys.readouterr().out
    assert "gateway.secret" in out and "control-room.public" in out
    for name in ("gateway", "control-room"):
        secret = tmp_path / "k" / f"{name}.secret"
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        pair = read_secret_key(secret)
        assert read_public_key(tmp_path / "k" / f"{name}.public") == pair.public
        assert len(pair.public) == 40 and "hidden" in repr(pair)
        assert pair.secret.decode() not in repr(pair)
    # Never overwrites a secret; refuses a secret others may read; refuses non-keys.
    with pytest.raises(SecurityError, match="not overwriting"):
        write_keypair(tmp_path / "k", "gateway")
    assert cli_main(["keys", str(tmp_path / "k"), "gateway"]) == 4
    leaky = tmp_path / "k" / "gateway.secret"
    leaky.chmod(0o644)
    with pytest.raises(SecurityError, match="chmod 600"):
        read_secret_key(leaky)
    bad = tmp_path / "bad.public"
    bad.write_text("not a key\n")
    with pytest.raises(SecurityError, match="40 Z85"):
        read_public_key(bad)
