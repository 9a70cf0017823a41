"""A field write whose outcome is unknown: settled by reading the field back, or held in doubt.

Only ``FieldUnavailableError`` means "certainly not written".  A write that
timed out, broke mid-request or raised unexpectedly may have landed: the
gateway reads the field back and settles by what it sees; when the field
cannot be read, the write group stays pending in the store, the gateway is
*in doubt* and refuses every command it would write until a read-back
succeeds.  The field here is an in-test double (``Field``) because the point
is a write that lands and *then* hangs, which a real server does not do on
demand; the rest (gateway, store, SQLite) is real.  The last test does it with a real
asyncua server in another process, frozen with ``SIGSTOP`` mid-write.
"""

from __future__ import annotations

import asyncio
import secrets
import signal
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
from parallelcity.hil.field import free_port

from parallelcity.backoff import Backoff
from parallelcity.clock import FakeClock, SimClock
from parallelcity.dispatch.wire import Ack, AckStatus, Command, RefusalCode, decode_ack
from parallelcity.errors import FieldConnectionError, FieldUnavailableError
from parallelcity.field.opcua.certs import LabPki, make_lab_pki
from parallelcity.field.opcua.writer import OpcUaWriter
from parallelcity.gateway.core import GatewayCore
from parallelcity.gateway.server import FieldGateway
from parallelcity.gateway.store import GatewayStore
from parallelcity.gateway.zap import Grant

from .opcua_input_server import INPUTS
from .test_field_writer import FIELD, InputServer, client_security
from .test_field_writer import LIMITS as WRITER_LIMITS
from .test_gateway import LIMITS, T0, command, run

OPS = Grant.everything("ops", issuers=None)  # several issuers: batching, not binding
T1 = T0 + 900.0
SAFE = {"plant.T_supply_set": 65.0, "apartment.m_flow": 0.1}
WRITE_TIMEOUT_S = 0.3
FAST = Backoff(initial=0.02, maximum=0.05, jitter=0.0)
WRITER_BACKOFF = Backoff(initial=0.05, maximum=0.5)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LabPki:
    return make_lab_pki(tmp_path_factory.mktemp("pki"))


class Field:
    """An in-memory field.  ``hang`` makes the next writes hang (after landing, or before
    when ``land`` is false) until the gateway's write timeout; ``readable`` False makes
    reads fail as a dropped session does; ``unavailable`` makes writes fail before sending."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}
        self.landed: list[dict[str, float]] = []
        self.hang = False
        self.land = True
        self.readable = True
        self.unavailable = False
        self.reads = 0

    async def write(self, setpoints: Mapping[str, float]) -> None:
        if self.unavailable:
            raise FieldUnavailableError("session down: nothing was written")
        if self.hang and not self.land:
            await asyncio.Event().wait()
        self.values.update(setpoints)
        self.landed.append(dict(setpoints))
        if self.hang:
            await asyncio.Event().wait()

    async def read(self, names: Sequence[str]) -> dict[str, float]:
        self.reads += 1
        if not self.readable:
            raise FieldConnectionError("reading failed: the session dropped")
        return {n: self.values[n] for n in names if n in self.values}

    def times_landed(self, name: str, value: float) -> int:
        return sum(1 for w in self.landed if w.get(name) == value)


def gateway(field: Field, clock: FakeClock, store: GatewayStore, *, watchdog: bool = False
            ) -> FieldGateway:  # fmt: skip
    core = GatewayCore(LIMITS, clock_skew_s=5.0)
    if watchdog:
        core = GatewayCore(
            LIMITS, clock_skew_s=5.0, safe=SAFE, heartbeat_interval_s=1.0, missed_heartbeats=3
        )
    return FieldGateway(
        core,
        field,
        clock,
        bind="tcp://127.0.0.1:0",
        insecure_lab=True,
        store=store,
        write_timeout_s=WRITE_TIMEOUT_S,
        in_doubt_backoff=FAST,
    )


async def send(gw: FieldGateway, *cmds: Command) -> list[Ack]:
    """The commands arrive at the time they were issued (rate limits use the gateway clock)."""
    clock = gw.clock
    if isinstance(clock, FakeClock):
        clock.t = max(clock.t, *(c.issued_at for c in cmds))
    replies = await gw.handle_batch([([c.encode()], OPS) for c in cmds])
    out = []
    for r in replies:
        assert r is not None
        out.append(decode_ack(r))
    return out


async def until_settled(gw: FieldGateway, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while gw.in_doubt is not None:
            await asyncio.sleep(0.01)


def kinds(store: GatewayStore) -> list[str]:
    return [k for _, k, _ in store.events()]


FIRST = command({"plant.T_supply_set": 70.0, "apartment.m_flow": 0.3}, seq=1, issued_at=T0)
# 70 -> 72 in 900 s is within the 10 K/h ramp (2.5 K).
HUNG = command({"plant.T_supply_set": 72.0}, seq=2, issued_at=T1)
# 900 s after HUNG: 6.5 K below 72 is too steep (2.5 K allowed); from FIRST's 70, 1800 s
# earlier, 4.5 K down would be allowed (5 K).  So it tells which base the gateway uses.
DOWN = command({"plant.T_supply_set": 65.5}, seq=3, issued_at=T1 + 900.0)


async def assert_ramps_from_72(gw: FieldGateway, clock: FakeClock) -> None:
    clock.t = T1 + 900.0
    (down,) = await send(gw, DOWN)
    assert down.code is RefusalCode.RATE_LIMIT and "from 72" in down.detail, down


def test_a_write_that_lands_and_times_out_counts_once_and_is_the_next_ramp_base(
    tmp_path: Path,
) -> None:
    field, clock = Field(), FakeClock(T0)
    path = tmp_path / "state.sqlite"

    async def main() -> None:
        store = GatewayStore(path)
        async with gateway(field, clock, store) as gw:
            assert (await send(gw, FIRST))[0].status is AckStatus.APPLIED
            field.hang = True  # lands, then the request never returns
            (ack,) = await send(gw, HUNG)
            assert ack.status is AckStatus.APPLIED, ack
            assert gw.in_doubt is None and gw.counters.applied == 2
            field.hang = False
            (again,) = await send(gw, HUNG)
            assert again.status is AckStatus.DUPLICATE, again
            await assert_ramps_from_72(gw, clock)
        store.close()
        assert field.times_landed("plant.T_supply_set", 72.0) == 1
        loaded = GatewayStore(path).load(10)
        assert loaded.pending == [] and HUNG.id in loaded.applied_ids
        assert loaded.inputs["plant.T_supply_set"] == (72.0, T1)

    run(main)


def test_a_write_that_times_out_without_landing_is_refused_and_its_resend_applied_once(
    tmp_path: Path,
) -> None:
    field, clock = Field(), FakeClock(T0)

    async def main() -> None:
        store = GatewayStore(tmp_path / "state.sqlite")
        async with gateway(field, clock, store) as gw:
            await send(gw, FIRST)
            field.hang, field.land = True, False
            (ack,) = await send(gw, HUNG)
            assert ack.code is RefusalCode.WRITE_FAILED and "did not finish" in ack.detail
            assert gw.in_doubt is None and field.reads == 1
            assert gw.core.state.last_applied["plant.T_supply_set"].value == 70.0
            field.hang = False
            (resent,) = await send(gw, HUNG)
            assert resent.status is AckStatus.APPLIED, resent
            assert (await send(gw, HUNG))[0].status is AckStatus.DUPLICATE
            await assert_ramps_from_72(gw, clock)
        store.close()
        assert field.times_landed("plant.T_supply_set", 72.0) == 1

    run(main)


def test_a_write_refused_as_unavailable_is_not_read_back(tmp_path: Path) -> None:
    """``FieldUnavailableError``: certainly not written, no read-back, no doubt."""
    field, clock = Field(), FakeClock(T0)

    async def main() -> None:
        store = GatewayStore(tmp_path / "state.sqlite")
        async with gateway(field, clock, store) as gw:
            field.unavailable = True
            (ack,) = await send(gw, FIRST)
            assert ack.code is RefusalCode.WRITE_FAILED and "nothing was written" in ack.detail
            assert field.reads == 0 and gw.in_doubt is None
            field.unavailable = False
            assert (await send(gw, FIRST))[0].status is AckStatus.APPLIED
        store.close()

    run(main)


@pytest.mark.parametrize("lands", [True, False], ids=["landed", "not-landed"])
def test_an_unreadable_field_puts_the_gateway_in_doubt_until_it_settles(
    tmp_path: Path, lands: bool
) -> None:
    field, clock = Field(), FakeClock(T0)
    path = tmp_path / "state.sqlite"
    other = command({"apartment.m_flow": 0.5}, seq=4, issued_at=T1)

    async def main() -> None:
        store = GatewayStore(path)
        async with gateway(field, clock, store) as gw:
            await send(gw, FIRST)
            field.hang, field.land, field.readable = True, lands, False
            (ack,) = await send(gw, HUNG)
            assert ack.code is RefusalCode.WRITE_FAILED and "in doubt" in ack.detail, ack
            assert gw.in_doubt is not None and gw.counters.in_doubt == 1
            field.hang = False
            # Pending in the store, as after a crash; entering is journaled.
            assert [p.command_id for p in GatewayStore(path).load(10).pending] == [HUNG.id]
            assert "in_doubt" in kinds(store)
            # Everything that would be written is refused with the declared reason; an id
            # applied before is still a duplicate, and other refusals keep their code.
            written = len(field.landed)
            got = await send(gw, HUNG, other, FIRST, command(seq=0, issued_at=T1))
            assert [(a.status, a.code) for a in got] == [
                (AckStatus.REFUSED, RefusalCode.WRITE_FAILED),
                (AckStatus.REFUSED, RefusalCode.WRITE_FAILED),
                (AckStatus.DUPLICATE, None),
                (AckStatus.REFUSED, RefusalCode.STALE_SEQUENCE),
            ]
            for a in got[:2]:
                assert a.detail.startswith("in doubt: the outcome of an earlier field write")
                assert HUNG.id in a.detail and "nothing was written" in a.detail
            assert len(field.landed) == written
            assert field.reads >= 1  # the read-back is being retried meanwhile

            field.readable = True
            await until_settled(gw)
            assert kinds(store)[-2:] == ["settled", "in_doubt_settled"]
            (resent,) = await send(gw, HUNG)
            want = AckStatus.DUPLICATE if lands else AckStatus.APPLIED
            assert resent.status is want, resent
            assert gw.core.state.last_applied["plant.T_supply_set"].value == 72.0
            await assert_ramps_from_72(gw, clock)
            assert (await send(gw, other))[0].status is AckStatus.APPLIED
        store.close()
        assert field.times_landed("plant.T_supply_set", 72.0) == 1
        loaded = GatewayStore(path).load(10)
        assert loaded.pending == [] and {HUNG.id, other.id} <= set(loaded.applied_ids)

    run(main)


def test_a_crash_while_in_doubt_is_settled_at_the_restart(tmp_path: Path) -> None:
    field, clock = Field(), FakeClock(T0)
    path = tmp_path / "state.sqlite"

    async def main() -> None:
        store = GatewayStore(path)
        async with gateway(field, clock, store) as gw:
            await send(gw, FIRST)
            field.hang, field.readable = True, False
            await send(gw, HUNG)
            assert gw.in_doubt is not None
        store._db.close()  # kill -9: committed transactions only
        field.hang, field.readable = False, True
        store = GatewayStore(path)
        async with gateway(field, clock, store) as gw:
            assert gw.in_doubt is None
            assert (await send(gw, HUNG))[0].status is AckStatus.DUPLICATE
        store.close()
        assert field.times_landed("plant.T_supply_set", 72.0) == 1

    run(main)


def test_a_write_group_of_several_commands_goes_in_doubt_too(tmp_path: Path) -> None:
    field, clock = Field(), FakeClock(T0)
    a = command({"plant.T_supply_set": 71.0}, seq=2, issued_at=T1)
    b = command({"apartment.m_flow": 0.7}, seq=3, issued_at=T1)
    c = command({"apartment.m_flow": 0.8}, seq=4, issued_at=T1)  # next group: never written

    async def main() -> None:
        store = GatewayStore(tmp_path / "state.sqlite")
        async with gateway(field, clock, store) as gw:
            await send(gw, FIRST)
            field.hang, field.readable = True, False
            got = await send(gw, a, b, c)
            assert [x.code for x in got] == [RefusalCode.WRITE_FAILED] * 3
            assert "in doubt:" not in got[0].detail and "in doubt:" in got[2].detail
            assert field.landed[-1] == {"plant.T_supply_set": 71.0, "apartment.m_flow": 0.7}
            field.hang, field.readable = False, True
            await until_settled(gw)
            got = await send(gw, a, b, c)
            assert [x.status for x in got] == [
                AckStatus.DUPLICATE,
                AckStatus.DUPLICATE,
                AckStatus.APPLIED,
            ]
        store.close()
        assert field.times_landed("apartment.m_flow", 0.8) == 1
        assert field.times_landed("apartment.m_flow", 0.7) == 1

    run(main)


@pytest.mark.parametrize("readable", [False, True], ids=["unreadable", "readable"])
def test_a_watchdog_revert_while_in_doubt_settles_the_write_first(
    tmp_path: Path, readable: bool
) -> None:
    """The revert would hide what the write in doubt left in the field, so the write is
    settled before the safe values go out: by the field if it can be read now, else
    counted as applied (never twice).  The settle is durable before the revert."""
    field, clock = Field(), FakeClock(T0)
    path = tmp_path / "state.sqlite"

    async def main() -> None:
        store = GatewayStore(path)
        gw = gateway(field, clock, store, watchdog=True)
        gw.in_doubt_backoff = Backoff(initial=60.0, maximum=60.0)  # only the revert settles
        async with gw:
            await send(gw, FIRST)
            field.hang, field.land, field.readable = True, False, False
            await send(gw, HUNG)
            assert gw.in_doubt is not None
            field.hang, field.readable = False, readable
            clock.advance(10.0)
            await gw._trip()  # what the watchdog task does when its window has passed
            assert gw.in_doubt is None and gw.core.watchdog.reverted
            assert field.landed[-1] == SAFE
            order = kinds(store)
            assert order.index("in_doubt_settled") < order.index("reverted")
            # The ramp base is the safe value either way.
            assert gw.core.state.last_applied["plant.T_supply_set"].value == 65.0
            (resent,) = await send(gw, HUNG)
            if readable:  # the field showed 70: not landed, forgotten; the trip refuses it
                assert resent.code is RefusalCode.WATCHDOG_TRIPPED
            else:  # could not tell: counted as applied
                assert resent.status is AckStatus.DUPLICATE
        store.close()
        assert GatewayStore(path).load(10).pending == []
        assert field.times_landed("plant.T_supply_set", 72.0) == 0

    run(main)


# =========================================================================== a real PLC side


@pytest.mark.slow
def test_a_write_to_a_frozen_plc_goes_in_doubt_and_is_settled_once_it_answers(
    tmp_path: Path, pki: LabPki
) -> None:
    """A real asyncua server in another process, frozen with ``SIGSTOP`` just before a
    write: the write times out with its bytes in the server's socket, the read-back
    fails, the gateway is in doubt.  After ``SIGCONT`` it settles by what the server
    holds, and across everything each value lands at most once and the command's
    values land exactly once."""
    password = secrets.token_urlsafe(16)
    server = InputServer(free_port(), pki.root, password)
    clock = SimClock(epoch=time.time(), speed=1.0)
    store = GatewayStore(tmp_path / "state.sqlite")

    def cmd(seq: int, k: float) -> Command:
        now = clock.now()
        return Command.create(
            issuer="runtime", seq=seq, issued_at=now, valid_until=now + 600.0,
            setpoints={"a": 100.0 + k, "b": 500.0 + k}, verdict="cd" * 32,
        )  # fmt: skip

    async def main() -> None:
        await server.spawn()
        writer = OpcUaWriter(
            server.endpoint, FIELD, security=client_security(pki, password),
            backoff=WRITER_BACKOFF, timeout_s=1.0,
        )  # fmt: skip
        gw = FieldGateway(
            GatewayCore(WRITER_LIMITS), writer, clock, bind="tcp://127.0.0.1:0",
            insecure_lab=True, store=store, write_timeout_s=1.0, in_doubt_backoff=FAST,
        )  # fmt: skip
        async with writer, gw:
            first, frozen, during = cmd(1, 0.001), cmd(2, 0.002), cmd(3, 0.003)
            assert (await send(gw, first))[0].status is AckStatus.APPLIED
            server.signal(signal.SIGSTOP)
            try:
                (ack,) = await send(gw, frozen)
                assert ack.code is RefusalCode.WRITE_FAILED and "in doubt" in ack.detail, ack
                assert gw.in_doubt is not None
                (refused,) = await send(gw, during)
                assert refused.detail.startswith("in doubt:"), refused
            finally:
                server.signal(signal.SIGCONT)
            await until_settled(gw, timeout_s=30.0)
            landed_late = ("s=w/a", 100.002) in server.writes
            (resent,) = await send(gw, frozen)
            want = AckStatus.DUPLICATE if landed_late else AckStatus.APPLIED
            assert resent.status is want, (resent, server.writes)
            assert (await send(gw, during))[0].status is AckStatus.APPLIED
            assert (await send(gw, frozen))[0].status is AckStatus.DUPLICATE
        await server.kill()
        counts = Counter(server.writes)
        for c in (first, frozen, during):
            for name, value in c.setpoints.items():
                assert counts[(INPUTS[name], value)] == 1, (c.id, name, counts)
        events = [k for _, k, _ in store.events()]
        assert events.count("in_doubt") == 1 and events.count("in_doubt_settled") == 1
        print(f"\nthe frozen write landed {'late' if landed_late else 'never'}; events {events}")

    try:
        run(main, timeout_s=90.0)
    finally:
        server.close()
        store.close()
