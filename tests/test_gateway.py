"""The field gateway's rules, and dispatcher -> gateway -> writer over real ZeroMQ sockets.

pytest-asyncio is not used: each socket test is a sync function running
``asyncio.run`` of an inner coroutine under ``asyncio.timeout``.  Sockets are
on 127.0.0.1 with linger 0, and every receive is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio
from asyncua import Server, ua

from parallelcity import plugins
from parallelcity.clock import FakeClock
from parallelcity.dispatch.dispatcher import Dispatcher
from parallelcity.dispatch.keys import write_keypair
from parallelcity.dispatch.wire import (
    MAX_SEQ,
    NULL_ID,
    Ack,
    AckStatus,
    Command,
    RefusalCode,
    decode_ack,
)
from parallelcity.errors import (
    DispatchError,
    FieldConnectionError,
    NodeMappingError,
    SecurityError,
)
from parallelcity.field.opcua.config import OpcUaField as FieldConfig
from parallelcity.field.opcua.writer import OpcUaWriter
from parallelcity.gateway.config import parse_gateway_config, serve_gateway
from parallelcity.gateway.core import GatewayCore, RulingKind
from parallelcity.gateway.server import FieldGateway
from parallelcity.scenario.definition import Scenario, ScenarioFile
from parallelcity.specs import InputLimit

SCENARIO = Path(__file__).resolve().parent.parent / "scenarios" / "district_heating.toml"
T0 = 1768179600.0  # 2026-01-12 01:00 UTC
VERDICT = "ab" * 32
LIMITS = {
    "plant.T_supply_set": InputLimit("plant.T_supply_set", 60.0, 95.0, 10.0),
    "apartment.m_flow": InputLimit("apartment.m_flow", 0.02, 2.0),
}
GOOD = {"plant.T_supply_set": 70.0, "apartment.m_flow": 0.3}
RECV_TIMEOUT_MS = 2000


def command(
    setpoints: Mapping[str, float] = GOOD,
    *,
    seq: int = 0,
    issued_at: float = T0,
    valid_for: float = 900.0,
    issuer: str = "cycle",
) -> Command:
    return Command.create(
        issuer=issuer,
        seq=seq,
        issued_at=issued_at,
        valid_until=issued_at + valid_for,
        setpoints=setpoints,
        verdict=VERDICT,
    )


def run(make: Callable[[], Awaitable[None]], timeout_s: float = 15.0) -> None:
    async def main() -> None:
        async with asyncio.timeout(timeout_s):
            await make()

    asyncio.run(main())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# =========================================================================== pure core


def test_core_accepts_a_good_first_command() -> None:
    assert GatewayCore(LIMITS).decide(command(), T0).outcome is RulingKind.ACCEPT


def test_core_refuses_expired_commands_after_the_skew_allowance() -> None:
    core = GatewayCore(LIMITS, clock_skew_s=5.0)
    cmd = command(valid_for=900.0)
    assert core.decide(cmd, T0 + 905.0).accepted
    d = core.decide(cmd, T0 + 905.001)
    assert d.outcome is RulingKind.REFUSE and d.code is RefusalCode.EXPIRED
    assert "late" in d.detail


def test_core_refuses_out_of_bounds_beyond_tolerance() -> None:
    core = GatewayCore(LIMITS)
    assert core.decide(command({"plant.T_supply_set": 95.0 + 5e-7}), T0).accepted
    for value in (95.01, 59.9):
        d = core.decide(command({"plant.T_supply_set": value}), T0)
        assert d.code is RefusalCode.OUT_OF_BOUNDS
        assert "plant.T_supply_set" in d.detail and "[60, 95]" in d.detail
    d = core.decide(command({"apartment.m_flow": 0.0}), T0)
    assert d.code is RefusalCode.OUT_OF_BOUNDS


def test_core_rate_limit_refuses_a_jump_and_accepts_a_move_within_the_ramp() -> None:
    core = GatewayCore(LIMITS, ramp_slack_s=0.0)
    first = command({"plant.T_supply_set": 70.0, "apartment.m_flow": 0.3}, seq=0)
    core.record_applied(first, T0)
    later = T0 + 900.0  # 10 K/h over 15 min: at most 2.5 K
    jump = command({"plant.T_supply_set": 72.6}, seq=1, issued_at=later)
    d = core.decide(jump, later)
    assert d.code is RefusalCode.RATE_LIMIT and "at most 2.5" in d.detail
    ramp = command({"plant.T_supply_set": 72.5, "apartment.m_flow": 2.0}, seq=1, issued_at=later)
    assert core.decide(ramp, later).accepted  # m_flow has no rate limit: any jump in bounds
    core.record_applied(ramp, later)
    down = command({"plant.T_supply_set": 70.0}, seq=2, issued_at=later + 900.0)
    assert core.decide(down, later + 900.0).accepted
    # An issued_at ahead of the gateway's clock is refused; it never buys a bigger step.
    ahead = command({"plant.T_supply_set": 95.0}, seq=2, issued_at=later + 36_000.0)
    d = core.decide(ahead, later + 900.0)
    assert d.code is RefusalCode.BAD_TIME and "ahead of gateway time" in d.detail


def test_core_refuses_unknown_inputs() -> None:
    d = GatewayCore(LIMITS).decide(command({"plant.T_supply_set": 70.0, "valve.x": 1.0}), T0)
    assert d.code is RefusalCode.UNKNOWN_INPUT and "'valve.x'" in d.detail


def test_core_recognises_a_duplicate_id_and_does_not_accept_it_again() -> None:
    core = GatewayCore(LIMITS)
    cmd = command(seq=3)
    core.record_applied(cmd, T0 + 1.0)
    d = core.decide(cmd, T0 + 2.0)
    assert d.outcome is RulingKind.DUPLICATE and not d.accepted and d.applied_at == T0 + 1.0


def test_core_refuses_stale_sequence_numbers_per_issuer() -> None:
    core = GatewayCore(LIMITS)
    core.record_applied(command(seq=5), T0)
    for seq in (4, 5):
        d = core.decide(command(seq=seq), T0)
        assert d.code is RefusalCode.STALE_SEQUENCE and "last applied seq 5" in d.detail
    assert core.decide(command(seq=6), T0).accepted
    # Another issuer has its own sequence, once the first one's lease has run out.
    assert core.decide(command(seq=0, issuer="other"), T0).code is RefusalCode.LEASE_HELD
    later = T0 + core.leases.lease_s + 1.0
    assert core.decide(command(seq=0, issuer="other", issued_at=later), later).accepted


def test_core_judges_ramps_on_its_own_clock_with_bounded_slack() -> None:
    """The base is the gateway time of the last write; unused allowance never accumulates."""
    core = GatewayCore(LIMITS, ramp_slack_s=90.0)  # 10 K/h: 0.25 K of slack
    core.record_applied(command({"plant.T_supply_set": 70.0}, seq=0), T0)
    # issued_at stamps buy nothing: 60 s of gateway time allow 1/6 K + 0.25 K.
    early = command({"plant.T_supply_set": 70.5}, seq=1, issued_at=T0 - 3000.0, valid_for=3600)
    assert core.decide(early, T0 + 60.0).code is RefusalCode.RATE_LIMIT
    ok = command({"plant.T_supply_set": 70.4}, seq=1, issued_at=T0 + 60.0)
    assert core.decide(ok, T0 + 60.0).accepted
    core.record_applied(ok, T0 + 60.0)
    # Small steps in quick succession cannot add slack upon slack.
    t, value = T0 + 60.0, 70.4
    for seq in range(2, 50):
        t += 1.0
        step = command({"plant.T_supply_set": value + 0.01}, seq=seq, issued_at=t)
        if core.decide(step, t).accepted:
            core.record_applied(step, t)
            value += 0.01
    assert value - 70.0 <= 10.0 * (t - T0) / 3600.0 + 0.25 + 1e-9
    # A watchdog revert is a write too: the next ramp starts from it, at its time.
    core.watchdog.safe = {"plant.T_supply_set": 65.0}
    core.reverted(t + 1.0)
    assert core.state.last_applied["plant.T_supply_set"].at == t + 1.0
    back = command({"plant.T_supply_set": 70.0}, seq=60, issued_at=t + 2.0)
    assert core.decide(back, t + 2.0).code is RefusalCode.RATE_LIMIT


def test_core_refuses_issued_at_ahead_of_its_clock_or_too_old() -> None:
    core = GatewayCore(LIMITS, clock_skew_s=5.0, max_age_s=600.0)
    assert core.decide(command(issued_at=T0 + 5.0), T0).accepted
    ahead = core.decide(command(issued_at=T0 + 5.5), T0)
    assert ahead.code is RefusalCode.BAD_TIME and "ahead of gateway time" in ahead.detail
    old = core.decide(command(issued_at=T0 - 606.0, valid_for=1200.0), T0)
    assert old.code is RefusalCode.BAD_TIME and "at most 600 s" in old.detail


def test_core_refuses_another_issuer_and_a_reused_id_with_another_payload() -> None:
    from parallelcity.gateway.grants import Grant

    core = GatewayCore(LIMITS)
    grant = Grant.everything("cycle")
    d = core.decide(command(issuer="other"), T0, grant)
    assert d.code is RefusalCode.UNAUTHORISED and "bound to issuer 'cycle'" in d.detail
    first = command(seq=1)
    core.record_applied(first, T0)
    assert core.decide(first, T0, grant).outcome is RulingKind.DUPLICATE
    for changed in (
        Command(first.id, "cycle", 2, first.issued_at, first.valid_until, GOOD, VERDICT),
        Command(first.id, "cycle", 1, first.issued_at, first.valid_until + 1, GOOD, VERDICT),
        Command(first.id, "cycle", 1, first.issued_at, first.valid_until, GOOD, "cd" * 32),
        Command(first.id, "cycle", 1, first.issued_at, first.valid_until, {"a.b": 1}, VERDICT),
    ):
        d = core.decide(changed, T0, grant)
        assert d.code is RefusalCode.ID_CONFLICT and "different payload" in d.detail
    # Leases held by others are shown without their holder's name.
    core.leases.take("other", ["office.m_flow"], T0)
    assert core.status(NULL_ID, "cycle", T0, False).leases == {
        "plant": "cycle", "apartment": "cycle", "office": "*"
    }  # fmt: skip


def test_a_dispatcher_whose_issuer_is_at_the_maximum_seq_stops_with_a_clear_error() -> None:
    writer, clock = FakeWriter(), FakeClock(T0)

    async def main() -> None:
        async with zmq_context() as ctx, serving(ctx, writer, clock) as gw:
            gw.core.state.last_seq["cycle"] = MAX_SEQ
            async with lab_dispatcher(gw.endpoint, "cycle", context=ctx) as disp:
                status = await disp.heartbeat()
                assert status.last_seq == MAX_SEQ
                with pytest.raises(DispatchError, match="used every sequence number"):
                    await disp.send(GOOD, issued_at=T0, valid_until=T0 + 60, verdict_digest=VERDICT)
        assert writer.writes == []

    run(main)


def test_core_forgets_old_ids_but_sequence_still_blocks_them() -> None:
    core = GatewayCore(LIMITS, max_remembered_ids=2)
    cmds = [command(seq=i) for i in range(3)]
    for cmd in cmds:
        core.record_applied(cmd, T0)
    assert core.decide(cmds[0], T0).code is RefusalCode.STALE_SEQUENCE
    assert core.decide(cmds[2], T0).outcome is RulingKind.DUPLICATE


# =========================================================================== over sockets


class FakeWriter:
    """In-memory field: records what was written, or fails as told."""

    def __init__(self) -> None:
        self.writes: list[dict[str, float]] = []
        self.fail: Exception | None = None

    async def write(self, setpoints: Mapping[str, float]) -> None:
        if self.fail is not None:
            raise self.fail
        self.writes.append(dict(setpoints))

    async def read(self, names: Sequence[str]) -> dict[str, float]:
        last: dict[str, float] = {}
        for w in self.writes:
            last.update(w)
        return {n: last[n] for n in names if n in last}


def lab_dispatcher(endpoint: str, issuer: str = "cycle", **kw: Any) -> Dispatcher:
    """A dispatcher for an insecure-lab gateway."""
    return Dispatcher(endpoint, issuer, insecure_lab=True, **kw)


@contextlib.asynccontextmanager
async def serving(
    ctx: zmq.asyncio.Context, writer: FakeWriter, clock: FakeClock
) -> AsyncIterator[FieldGateway]:
    gateway = FieldGateway(
        GatewayCore(LIMITS),
        writer,
        clock,
        bind="tcp://127.0.0.1:0",
        insecure_lab=True,
        context=ctx,
    )
    async with gateway:
        task = asyncio.create_task(gateway.serve())
        try:
            yield gateway
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@contextlib.asynccontextmanager
async def zmq_context() -> AsyncIterator[zmq.asyncio.Context]:
    ctx = zmq.asyncio.Context()
    try:
        yield ctx
    finally:
        ctx.destroy(linger=0)


async def recv_ack(sock: zmq.asyncio.Socket) -> Ack:
    assert await sock.poll(RECV_TIMEOUT_MS, zmq.POLLIN), "no ack within the timeout"
    return decode_ack(await sock.recv())


def test_dispatcher_gets_applied_acks_and_the_writer_sees_the_setpoints(
    caplog: pytest.LogCaptureFixture,
) -> None:
    writer, clock = FakeWriter(), FakeClock(T0 + 10.0)

    async def main() -> None:
        async with (
            zmq_context() as ctx,
            serving(ctx, writer, clock) as gw,
            lab_dispatcher(gw.endpoint, "cycle", timeout_s=2.0, context=ctx) as disp,
        ):
            assert gw.endpoint.startswith("tcp://127.0.0.1:") and not gw.endpoint.endswith(":0")
            ack = await disp.send(
                GOOD, issued_at=T0, valid_until=T0 + 900.0, verdict_digest=VERDICT
            )
            assert ack.status is AckStatus.APPLIED and ack.code is None
            assert ack.applied_at == T0 + 10.0 and ack.insecure_lab is True and ack.seq == 0
            clock.advance(900.0)
            ack2 = await disp.send(
                {"plant.T_supply_set": 72.5},
                issued_at=T0 + 900.0,
                valid_until=T0 + 1800.0,
                verdict_digest=VERDICT,
            )
            assert ack2.status is AckStatus.APPLIED and ack2.seq == 1 and ack2.id != ack.id
            assert writer.writes == [GOOD, {"plant.T_supply_set": 72.5}]
            assert (gw.counters.received, gw.counters.applied) == (2, 2)
            assert (disp.counters.sent, disp.counters.acked, disp.counters.timeouts) == (2, 2, 0)

    with caplog.at_level(logging.WARNING, logger="parallelcity.gateway.server"):
        run(main)
    assert any("INSECURE LAB MODE" in r.getMessage() for r in caplog.records)


def test_refused_acks_carry_the_code_and_nothing_is_written() -> None:
    writer, clock = FakeWriter(), FakeClock(T0)

    async def main() -> None:
        async with (
            zmq_context() as ctx,
            serving(ctx, writer, clock) as gw,
            lab_dispatcher(gw.endpoint, "cycle", context=ctx) as disp,
        ):
            cases = [
                ({"plant.T_supply_set": 120.0}, T0, RefusalCode.OUT_OF_BOUNDS),
                ({"valve.x": 1.0}, T0, RefusalCode.UNKNOWN_INPUT),
                (GOOD, T0 - 3600.0, RefusalCode.EXPIRED),
            ]
            for setpoints, issued_at, code in cases:
                ack = await disp.send(
                    setpoints,
                    issued_at=issued_at,
                    valid_until=issued_at + 900.0,
                    verdict_digest=VERDICT,
                )
                assert ack.status is AckStatus.REFUSED and ack.code is code, ack
                assert ack.detail and ack.applied_at is None and ack.insecure_lab
            # A failing field write is refused, not recorded, and the gateway goes on.
            writer.fail = FieldConnectionError("opc.tcp://plant: connection lost")
            ack = await disp.send(GOOD, issued_at=T0, valid_until=T0 + 900, verdict_digest=VERDICT)
            assert ack.code is RefusalCode.WRITE_FAILED and "connection lost" in ack.detail
            writer.fail = None
            ack = await disp.send(GOOD, issued_at=T0, valid_until=T0 + 900, verdict_digest=VERDICT)
            assert ack.status is AckStatus.APPLIED
            assert writer.writes == [GOOD]
            assert disp.counters.refused == 4 and gw.counters.refused_total == 4
            assert gw.counters.refused[RefusalCode.WRITE_FAILED] == 1

    run(main)


def test_garbage_gets_a_malformed_refusal_and_the_gateway_keeps_serving() -> None:
    writer, clock = FakeWriter(), FakeClock(T0)
    partial = b'{"v":1,"type":"command","id":"' + b"c" * 32 + b'","seq":9}'

    async def main() -> None:
        async with zmq_context() as ctx, serving(ctx, writer, clock) as gw:
            raw = ctx.socket(zmq.DEALER)
            raw.setsockopt(zmq.LINGER, 0)
            raw.connect(gw.endpoint)
            try:
                await raw.send(b"\xff\xfe\x00garbage")
                ack = await recv_ack(raw)
                assert (ack.id, ack.seq, ack.status) == (NULL_ID, 0, AckStatus.REFUSED)
                assert ack.code is RefusalCode.MALFORMED and "not UTF-8" in ack.detail
                await raw.send(partial)
                ack = await recv_ack(raw)
                assert (ack.id, ack.seq, ack.code) == ("c" * 32, 9, RefusalCode.MALFORMED)
                assert "missing field(s)" in ack.detail
                await raw.send_multipart([command().encode(), b""])
                ack = await recv_ack(raw)
                assert ack.code is RefusalCode.MALFORMED and "one frame" in ack.detail
                await raw.send(b"{" + b" " * 70_000 + b"}")
                ack = await recv_ack(raw)
                assert ack.code is RefusalCode.MALFORMED and "limit" in ack.detail
                # Still serving: a good command on the same raw socket is applied.
                good = command()
                await raw.send(good.encode())
                ack = await recv_ack(raw)
                assert ack.id == good.id and ack.status is AckStatus.APPLIED
            finally:
                raw.close(linger=0)
            assert gw.counters.malformed == 4 and gw.counters.applied == 1
            assert writer.writes == [GOOD]

    run(main)


def test_a_command_spelled_otherwise_is_applied_and_its_canonical_resend_is_a_duplicate() -> None:
    # Decoders accept any valid JSON, `1.0` or `1` or `1e0` (docs/wire-protocol.md): a peer
    # whose encoder writes `"v": 1.0, "seq": 3.0` sends the same command as the canonical
    # bytes, so the gateway applies it once and answers the canonical resend `duplicate`.
    writer, clock = FakeWriter(), FakeClock(T0)
    good = command(seq=3)
    body = good.to_json() | {"v": 1.0, "seq": 3.0}
    spelled = json.dumps(body, indent=1, sort_keys=False).encode()
    assert spelled != good.encode() and b'"seq": 3.0' in spelled and b'"v": 1.0' in spelled

    async def main() -> None:
        async with zmq_context() as ctx, serving(ctx, writer, clock) as gw:
            raw = ctx.socket(zmq.DEALER)
            raw.setsockopt(zmq.LINGER, 0)
            raw.connect(gw.endpoint)
            try:
                await raw.send(spelled)
                ack = await recv_ack(raw)
                assert (ack.id, ack.seq, ack.status) == (good.id, 3, AckStatus.APPLIED), ack
                await raw.send(good.encode())
                again = await recv_ack(raw)
                assert (again.id, again.status) == (good.id, AckStatus.DUPLICATE), again
                assert again.applied_at == ack.applied_at
            finally:
                raw.close(linger=0)
            assert writer.writes == [GOOD]

    run(main)


def test_dispatcher_without_a_gateway_raises_after_bounded_retries() -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"

    async def main() -> None:
        async with (
            zmq_context() as ctx,
            lab_dispatcher(endpoint, "cycle", timeout_s=0.2, retries=2, context=ctx) as disp,
        ):
            start = time.monotonic()
            with pytest.raises(DispatchError) as info:
                await disp.send(GOOD, issued_at=T0, valid_until=T0 + 900, verdict_digest=VERDICT)
            elapsed = time.monotonic() - start
            assert 0.55 <= elapsed < 1.5, elapsed
            message = str(info.value)
            assert "3 attempt(s)" in message and endpoint in message
            assert disp.counters.timeouts == 3 and disp.counters.failed == 1
            # The id that was tried is named in the error.
            assert any(len(w) == 32 and w in message for w in message.split())

    run(main)


def test_insecure_lab_false_is_refused() -> None:
    with pytest.raises(SecurityError, match=r"insecure_lab = true in \[security\]"):
        FieldGateway(
            GatewayCore(LIMITS), FakeWriter(), FakeClock(), bind="tcp://127.0.0.1:0",
            insecure_lab=False,
        )  # fmt: skip


async def lossy_proxy(
    ctx: zmq.asyncio.Context, upstream: str, drop: str, ready: asyncio.Future[str]
) -> None:
    """A real ROUTER in front of the gateway that loses the first request or the first reply.

    With ``drop="noise"`` it loses nothing but sends an ack for another id and
    some garbage before each real reply.
    """
    front = ctx.socket(zmq.ROUTER)
    back = ctx.socket(zmq.DEALER)
    for s in (front, back):
        s.setsockopt(zmq.LINGER, 0)
    try:
        front.bind("tcp://127.0.0.1:0")
        back.connect(upstream)
        ready.set_result(front.getsockopt_string(zmq.LAST_ENDPOINT))
        n = 0
        while True:
            identity, data = await front.recv_multipart()
            n += 1
            if drop == "request" and n == 1:
                continue
            await back.send(data)
            assert await back.poll(RECV_TIMEOUT_MS, zmq.POLLIN), "gateway did not answer"
            reply = await back.recv()
            if drop == "reply" and n == 1:
                continue
            if drop == "noise":
                other = Ack("f" * 32, 99, AckStatus.APPLIED, applied_at=1.0)
                await front.send_multipart([identity, other.encode()])
                await front.send_multipart([identity, b"not an ack"])
            await front.send_multipart([identity, reply])
    finally:
        front.close(linger=0)
        back.close(linger=0)


@pytest.mark.parametrize(
    ("drop", "status", "resent"),
    [
        ("reply", AckStatus.DUPLICATE, 1),
        ("request", AckStatus.APPLIED, 1),
        ("noise", AckStatus.APPLIED, 0),
    ],
)
def test_a_retried_command_is_applied_once(drop: str, status: AckStatus, resent: int) -> None:
    writer, clock = FakeWriter(), FakeClock(T0 + 1.0)

    async def main() -> None:
        async with zmq_context() as ctx, serving(ctx, writer, clock) as gw:
            ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            proxy = asyncio.create_task(lossy_proxy(ctx, gw.endpoint, drop, ready))
            try:
                endpoint = await ready
                async with lab_dispatcher(
                    endpoint, "cycle", timeout_s=0.3, retries=2, context=ctx
                ) as disp:
                    ack = await disp.send(
                        GOOD, issued_at=T0, valid_until=T0 + 900, verdict_digest=VERDICT
                    )
                    assert ack.status is status and ack.applied
                    if status is AckStatus.DUPLICATE:
                        assert "not written again" in ack.detail
                    assert ack.applied_at == T0 + 1.0
                    assert disp.counters.resent == resent
                    assert disp.counters.timeouts == resent
            finally:
                proxy.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await proxy
            assert writer.writes == [GOOD]
            assert gw.counters.applied == 1
            assert gw.counters.duplicates == (1 if drop == "reply" else 0)

    run(main)


def test_a_late_status_to_the_loops_last_heartbeat_is_not_taken_for_another_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A run stops its heartbeat loop and says goodbye: the loop's last beat may still be
    # unanswered, and its status then arrives on the socket before the goodbye's.  It is
    # the loop's, expected, and must not be logged as a stray reply.
    writer, clock = FakeWriter(), FakeClock(T0)

    async def holding_proxy(upstream: str, ready: asyncio.Future[str], held: asyncio.Event):
        """Holds the gateway's reply to the second request until the third arrives."""
        front, back = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
        for s in (front, back):
            s.setsockopt(zmq.LINGER, 0)
        try:
            front.bind("tcp://127.0.0.1:0")
            back.connect(upstream)
            ready.set_result(front.getsockopt_string(zmq.LAST_ENDPOINT))
            pending: list[bytes] = []
            n = 0
            while True:
                identity, data = await front.recv_multipart()
                n += 1
                await back.send(data)
                assert await back.poll(RECV_TIMEOUT_MS, zmq.POLLIN), "gateway did not answer"
                reply = await back.recv()
                if n == 2:
                    pending.append(reply)
                    held.set()
                    continue
                for late in [*pending, reply]:
                    await front.send_multipart([identity, late])
                pending.clear()
        finally:
            front.close(linger=0)
            back.close(linger=0)

    answered = ""

    async def main() -> None:
        nonlocal ctx, answered
        async with zmq_context() as ctx, serving(ctx, writer, clock) as gw:
            loop = asyncio.get_running_loop()
            ready: asyncio.Future[str] = loop.create_future()
            held = asyncio.Event()
            proxy = asyncio.create_task(holding_proxy(gw.endpoint, ready, held))
            try:
                async with lab_dispatcher(await ready, "cycle", context=ctx) as disp:
                    await disp.heartbeat()  # connected: the loop's first beat leaves at once
                    beats = asyncio.create_task(disp.heartbeat_loop(30.0))
                    await held.wait()  # the loop's beat reached the gateway; no status yet
                    beats.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await beats
                    with caplog.at_level(logging.DEBUG, "parallelcity.dispatch.dispatcher"):
                        status = await disp.heartbeat(release=True)
                    answered = status.id
            finally:
                proxy.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await proxy
        messages = [(r.levelno, r.getMessage()) for r in caplog.records]
        assert not [m for level, m in messages if "another message" in m], messages
        late = [m for level, m in messages if level == logging.DEBUG and "late status" in m]
        assert len(late) == 1 and answered not in late[0], (answered, late)

    ctx: zmq.asyncio.Context
    run(main)


# =========================================================================== real OPC UA


def district_heating(insecure_lab: bool = True) -> Scenario:
    """The district-heating scenario, built without the controller and rig plug-ins.

    Only ``field``, ``specs``, ``security`` and the model are used by the gateway.
    """
    raw: dict[str, Any] = tomllib.loads(SCENARIO.read_text("utf-8"))
    raw["security"]["insecure_lab"] = insecure_lab
    file = ScenarioFile.model_validate(raw)
    kind = plugins.model_kind(file.model.kind)
    extra = dict(file.model.model_extra or {})
    config = kind.Config.model_validate(extra)
    model = kind.build(config)
    return Scenario(SCENARIO, file, model, config, config, config, config)


async def start_field_server(field: FieldConfig, port: int) -> tuple[Server, dict[str, Any]]:
    server = Server()
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}/parallelcity/")
    server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    idx = await server.register_namespace(field.namespace)
    plant = await server.nodes.objects.add_object(ua.NodeId("dh", idx), "dh")
    nodes = {}
    for m in field.inputs:
        parsed = ua.NodeId.from_string(m.node)
        nodes[m.name] = await plant.add_variable(
            ua.NodeId(parsed.Identifier, idx), m.name, 0.0, varianttype=ua.VariantType.Double
        )
        await nodes[m.name].set_writable()
    await server.start()
    return server, nodes


def gateway_toml(
    field: FieldConfig, opc: str, bind: str, *, zmq: str = "", insecure_lab: bool = True
) -> str:
    """A stand-alone gateway config for ``field``'s inputs, with bounds from the scenario."""
    specs = {s.name: s for s in district_heating().specs.inputs}
    lines = [
        "[gateway]",
        f'bind = "{bind}"',
        'state = "state.sqlite"',
        "[security]",
        f"insecure_lab = {str(insecure_lab).lower()}",
        zmq,
        "[field]",
        f'endpoint = "{opc}"',
        f'namespace = "{field.namespace}"',
    ]
    for m in field.inputs:
        spec = specs[m.name]
        lines += [
            "[[field.inputs]]",
            f'name = "{m.name}"',
            f'node = "{m.node}"',
            f"min = {spec.min}",
            f"max = {spec.max}",
        ]
    return "\n".join(lines) + "\n"


@pytest.mark.slow
def test_gateway_writes_to_a_real_opcua_server(tmp_path: Path) -> None:
    """The stand-alone gateway (config file, CURVE, durable state) in front of a real server."""
    from parallelcity.dispatch.dispatcher import ClientCurve
    from parallelcity.dispatch.keys import read_public_key, read_secret_key

    scenario = district_heating()
    field = scenario.field
    opc_port, zmq_port = free_port(), free_port()
    opc = f"opc.tcp://127.0.0.1:{opc_port}/parallelcity/"
    endpoint = f"tcp://127.0.0.1:{zmq_port}"
    write_keypair(tmp_path / "keys", "gateway")
    write_keypair(tmp_path / "keys", "control-room")
    zmq_toml = (
        '[security.zmq]\nsecret_key = "keys/gateway.secret"\n'
        '[[security.zmq.clients]]\nname = "control-room"\n'
        'public_key = "keys/control-room.public"\nequipment = ["plant", "apartment", '
        '"office", "school"]\n'
    )
    config_path = tmp_path / "gateway.toml"
    config_path.write_text(gateway_toml(field, opc, endpoint, zmq=zmq_toml))
    config = parse_gateway_config(config_path.read_text(), config_path)
    curve = ClientCurve(
        read_secret_key(tmp_path / "keys" / "control-room.secret"),
        read_public_key(tmp_path / "keys" / "gateway.public"),
    )
    setpoints = {
        "plant.T_supply_set": 72.5,
        "apartment.m_flow": 0.35,
        "office.m_flow": 0.4,
        "school.m_flow": 0.45,
    }

    async def main() -> None:
        server, nodes = await start_field_server(field, opc_port)
        try:
            # A NodeId the server does not have is named, with its input.
            broken = field.model_copy(
                update={"inputs": [*field.inputs, field.inputs[0].model_copy(
                    update={"name": "valve.x", "node": "s=dh/valve/x"})]}
            )  # fmt: skip
            with pytest.raises(NodeMappingError) as info:
                async with OpcUaWriter(opc, broken):
                    pass
            assert "'valve.x'" in str(info.value) and "s=dh/valve/x" in str(info.value)

            clock = FakeClock(T0 + 5.0)
            task = asyncio.create_task(serve_gateway(config, clock))
            try:
                async with (
                    zmq_context() as ctx,
                    Dispatcher(endpoint, "control-room", curve=curve, context=ctx) as d,
                ):
                    ack = await d.send(
                        setpoints, issued_at=T0, valid_until=T0 + 900, verdict_digest=VERDICT
                    )
                    assert ack.status is AckStatus.APPLIED, ack
                    assert ack.insecure_lab is True  # the OPC UA side runs without security
                    refused = await d.send(
                        {"plant.T_supply_set": 96.0},
                        issued_at=T0,
                        valid_until=T0 + 900,
                        verdict_digest=VERDICT,
                    )
                    assert refused.code is RefusalCode.OUT_OF_BOUNDS
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            for name, value in setpoints.items():
                dv = await nodes[name].read_data_value()
                assert dv.Value.VariantType is ua.VariantType.Double
                assert dv.Value.Value == value, name
            assert (tmp_path / "state.sqlite").exists()
        finally:
            await server.stop()

    run(main, timeout_s=30.0)


def test_serve_gateway_refuses_to_run_without_keys(tmp_path: Path) -> None:
    field = district_heating().field
    path = tmp_path / "gateway.toml"
    path.write_text(
        gateway_toml(field, "opc.tcp://127.0.0.1:1/", "tcp://127.0.0.1:0", insecure_lab=False)
    )
    config = parse_gateway_config(path.read_text(), path)

    async def main() -> None:
        with pytest.raises(SecurityError, match=r"needs \[security.zmq\] and \[security.opcua\]"):
            await serve_gateway(config, FakeClock(T0))

    run(main)
    assert not (tmp_path / "state.sqlite").exists()  # refused before touching anything


def test_an_issuer_is_bound_to_one_key_at_most() -> None:
    from parallelcity.dispatch.keys import KeyPair
    from parallelcity.gateway.grants import Grant
    from parallelcity.gateway.zap import AllowList

    a, b = KeyPair.generate(), KeyPair.generate()
    ok = AllowList.of([(a.public, Grant.everything("a")), (b.public, Grant.everything("b"))])
    grant = ok.by_name("a")
    assert grant is not None and grant.issuers == frozenset({"a"})
    with pytest.raises(SecurityError, match="issuer 'site' is bound to both"):
        AllowList.of(
            [
                (a.public, Grant.everything("a", frozenset({"site"}))),
                (b.public, Grant.everything("b", frozenset({"site"}))),
            ]
        )


def test_a_store_from_before_payload_digests_opens_and_keeps_its_ids(tmp_path: Path) -> None:
    import sqlite3

    from parallelcity.gateway.store import GatewayStore

    path = tmp_path / "old.sqlite"
    old = command(seq=3)
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE applied (id TEXT PRIMARY KEY, issuer TEXT NOT NULL, seq INTEGER NOT NULL,"
        " state TEXT NOT NULL, issued_at REAL NOT NULL, applied_at REAL, setpoints TEXT NOT NULL);"
    )
    db.execute(
        "INSERT INTO applied VALUES (?, 'cycle', 3, 'applied', ?, ?, '{}')", (old.id, T0, T0)
    )
    db.commit()
    db.close()
    store = GatewayStore(path)
    try:
        loaded = store.load(10)
        assert list(loaded.applied_ids) == [old.id] and loaded.digests == {}
        new = command(seq=4)
        store.begin_batch([new], [0])
        assert [p.digest for p in store.load(10).pending] == [new.digest]
    finally:
        store.close()
