"""Group commit at the field gateway: batches, per-command acks, settling after kill -9.

The gateway takes everything waiting on its socket as one batch: one pending
commit, writes in groups, applied marks riding in the next commit, then the
replies.  These tests check that each command of a batch still gets the answer
it would get alone, that a failed write poisons nobody, and that a crash at any
point of a batch (simulated in-process, and a real ``kill -9`` of a
``parallelcity gateway`` process in the slow test) never applies anything twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from parallelcity.clock import FakeClock
from parallelcity.dispatch.dispatcher import Dispatcher
from parallelcity.dispatch.keys import read_public_key, read_secret_key
from parallelcity.dispatch.wire import (
    Ack,
    AckStatus,
    Command,
    Heartbeat,
    RefusalCode,
    decode_ack,
    decode_reply,
    decode_status,
)
from parallelcity.errors import FieldConnectionError
from parallelcity.gateway.core import GatewayCore
from parallelcity.gateway.grants import Grant
from parallelcity.gateway.server import FieldGateway
from parallelcity.gateway.store import GatewayStore, Pending, judge, landed

from .test_curve import LIMITS3, Keys, curve_socket
from .test_dispatch_exactly_once import CountingServer, GatewayProcess, write_config
from .test_gateway import GOOD, LIMITS, T0, VERDICT, FakeWriter, command, free_port, run

SCALE = float(os.environ.get("PARALLELCITY_SLOW_SCALE", "1"))
T1 = T0 + 900.0
OPS = Grant.everything("ops", issuers=None)  # several issuers: batching, not binding
APARTMENT_ONLY = Grant("apartment-only", equipment=frozenset({"apartment"}), issuers=None)


def pending(command_id: str, group: int, **setpoints: float) -> Pending:
    return Pending(command_id, "cycle", 0, T0, dict(setpoints), batch=1, group=group)


def gateway(writer: FakeWriter, clock: FakeClock, store: GatewayStore | None) -> FieldGateway:
    return FieldGateway(
        GatewayCore(LIMITS, clock_skew_s=5.0),
        writer,
        clock,
        bind="tcp://127.0.0.1:0",
        insecure_lab=True,
        store=store,
    )


def acks(replies: list[bytes | None]) -> list[Ack]:
    out = []
    for r in replies:
        assert r is not None
        out.append(decode_ack(r))
    return out


def kill_store(store: GatewayStore) -> None:
    """What ``kill -9`` leaves: committed transactions only, deferred marks lost."""
    store._db.close()


# =========================================================================== pure parts


def test_landed_takes_the_longest_prefix_of_write_groups_the_field_agrees_with() -> None:
    # Group 0 writes x and y (two commands), group 1 x again, group 2 x and y.
    batch = [
        pending("a", 0, x=1.0),
        pending("b", 0, y=1.0),
        pending("c", 1, x=2.0),
        pending("d", 2, x=3.0, y=2.0),
    ]
    yes, no = True, False
    assert landed(batch, {"x": 3.0, "y": 2.0}) == [yes, yes, yes, yes]
    assert landed(batch, {"x": 2.0, "y": 1.0}) == [yes, yes, yes, no]
    assert landed(batch, {"x": 1.0, "y": 1.0}) == [yes, yes, no, no]
    # Group 2 half written (x landed, y not): d is not applied, the groups before are.
    assert landed(batch, {"x": 3.0, "y": 1.0}) == [yes, yes, yes, no]
    # Group 0 half written: only the command whose values are all there.
    assert landed(batch, {"x": 1.0, "y": 0.0}) == [yes, no, no, no]
    assert landed(batch, {"x": 0.0, "y": 0.0}) == [no, no, no, no]
    assert landed(batch, {"y": 2.0}) == [no, no, no, no]  # x could not be read
    # The field cannot be read at all: never apply twice, count everything.
    assert landed(batch, None) == [yes, yes, yes, yes]


def test_judge_tells_not_landed_from_a_third_party_by_the_values_we_wrote_before() -> None:
    # Group 0 writes x and y (two commands), group 1 x again; before the batch x=0, y=0.
    batch = [pending("a", 0, x=1.0), pending("b", 0, y=1.0), pending("c", 1, x=2.0)]
    before = {"x": 0.0, "y": 0.0}

    def verdicts(field: dict[str, float] | None, before: dict[str, float] = before) -> list[str]:
        out = []
        for v in judge(batch, field, before):
            if v.conflicts:
                assert v.applied
                out.append(";".join(f"{c.name}={c.field}" for c in v.conflicts))
            else:
                out.append("applied" if v.applied else "forgotten")
        return out

    assert verdicts({"x": 2.0, "y": 1.0}) == ["applied"] * 3
    assert verdicts({"x": 0.0, "y": 0.0}) == ["forgotten"] * 3  # nothing landed
    # y holds a stranger's value: b counts as applied with a conflict; c never ran (x=1 is
    # a's, ours) and is forgotten.
    assert verdicts({"x": 1.0, "y": 5.0}) == ["applied", "y=5.0", "forgotten"]
    assert verdicts({"x": 7.0, "y": 1.0}) == ["x=7.0", "applied", "x=7.0"]
    assert verdicts({"y": 1.0}) == ["x=None", "applied", "x=None"]  # x unreadable
    # Inputs this gateway never wrote: no value of ours to tell "not landed" by.
    assert verdicts({"x": 0.0, "y": 0.0}, {}) == ["x=0.0", "y=0.0", "x=0.0"]
    assert verdicts(None) == ["applied"] * 3
    conflict = judge(batch, {"x": 7.0, "y": 1.0}, before)[0].conflicts[0]
    assert "ours 1.0" in conflict.describe() and "holds 7.0" in conflict.describe()


def test_core_rollback_undoes_tentative_records_including_evicted_ids() -> None:
    core = GatewayCore(LIMITS, max_remembered_ids=3)
    old = [command(seq=i, issued_at=T0 + i) for i in range(3)]
    for i, cmd in enumerate(old):
        core.record_applied(cmd, T0 + i)
    before = (
        list(core.state.applied_ids.items()),
        dict(core.state.last_seq),
        dict(core.state.last_applied),
        dict(core.leases.leases),
    )
    cp = core.checkpoint()
    new = [
        command({"plant.T_supply_set": 70.01}, seq=10, issued_at=T0 + 10),
        command({"apartment.m_flow": 0.5}, seq=0, issued_at=T0 + 10, issuer="other"),
    ]
    core.record_applied(new[0], T0 + 10)
    core.record_applied(new[1], T0 + 10)
    assert old[0].id not in core.state.applied_ids  # pushed out
    assert core.decide(new[0], T0 + 11).code is None  # a duplicate now
    core.rollback(cp)
    core.release(cp)
    after = (
        list(core.state.applied_ids.items()),
        dict(core.state.last_seq),
        dict(core.state.last_applied),
        dict(core.leases.leases),
    )
    assert after == before
    assert core.decide(new[0], T0 + 11).accepted


def test_core_confirm_is_recording_again_at_the_write_time() -> None:
    cmds = [
        command({"plant.T_supply_set": 70.0}, seq=1),
        command({"apartment.m_flow": 0.4}, seq=0, issuer="other"),
        command({"plant.T_supply_set": 70.0, "apartment.m_flow": 0.5}, seq=2),
    ]
    confirmed, again = GatewayCore(LIMITS), GatewayCore(LIMITS)
    for cmd in cmds:
        confirmed.record_applied(cmd, T0)
        again.record_applied(cmd, T0 + 5.0)
    confirmed.confirm(cmds, T0 + 5.0)
    for core in (confirmed, again):
        assert core.leases.holders(T0 + 64.0) == {"plant": "cycle", "apartment": "cycle"}
    assert list(confirmed.state.applied_ids.items()) == list(again.state.applied_ids.items())
    assert confirmed.state == again.state and confirmed.leases == again.leases


# =========================================================================== one batch


def test_a_mixed_batch_gets_every_ack_right_and_shares_commits_and_writes(
    tmp_path: Path,
) -> None:
    writer, clock = FakeWriter(), FakeClock(T0)
    path = tmp_path / "state.sqlite"

    async def main() -> None:
        store = GatewayStore(path)
        gw = gateway(writer, clock, store)
        async with gw:
            earlier = command(GOOD, seq=1)
            (first,) = acks(await gw.handle_batch([([earlier.encode()], OPS)]))
            assert first.status is AckStatus.APPLIED and first.applied_at == T0
            clock.t = T1

            a = command({"plant.T_supply_set": 72.0}, seq=2, issued_at=T1)
            b = command({"apartment.m_flow": 0.9}, seq=6, issued_at=T1)
            c = command({"plant.T_supply_set": 72.0, "apartment.m_flow": 1.0}, seq=7, issued_at=T1)
            hb = Heartbeat.create("cycle", T1)
            batch: list[tuple[bytes, Grant | None]] = [
                (a.encode(), OPS),
                (earlier.encode(), OPS),  # applied in an earlier batch
                (a.encode(), OPS),  # applied earlier in this batch
                (command(seq=3, issued_at=T0 - 2000.0).encode(), OPS),
                (command({"plant.T_supply_set": 72.0}, seq=4, issued_at=T1).encode(),
                 APARTMENT_ONLY),
                # seq 2 is stale only because of `a`, earlier in this batch
                (command({"apartment.m_flow": 0.5}, seq=2, issued_at=T1).encode(), OPS),
                # within the ramp from 70 (2.4 of 2.5 K in 900 s), not from `a` (72, 0 s)
                (command({"plant.T_supply_set": 72.4}, seq=5, issued_at=T1).encode(), OPS),
                (b"\xffgarbage", OPS),
                (command({"plant.T_supply_set": 72.0}, seq=0, issued_at=T1,
                         issuer="other").encode(), OPS),
                (b.encode(), OPS),  # disjoint from `a`: the same write call
                (hb.encode(), OPS),
                (c.encode(), OPS),  # after the heartbeat: a second group commit
                (c.encode(), None),  # a peer with no grant
                (c.encode(), OPS),
            ]  # fmt: skip
            commits_before = store.commits
            replies = await gw.handle_batch([([data], grant) for data, grant in batch])
            assert all(r is not None for r in replies)
            status = decode_status(replies[10] or b"")
            assert status.last_seq == 6  # a and b were applied when the heartbeat came
            got = [
                (r.status, r.code) if isinstance(r, Ack) else "status"
                for r in (decode_reply(x or b"") for x in replies)
            ]
            applied, dup = (AckStatus.APPLIED, None), (AckStatus.DUPLICATE, None)
            refused = AckStatus.REFUSED
            assert got == [
                applied,
                dup,
                dup,
                (refused, RefusalCode.EXPIRED),
                (refused, RefusalCode.UNAUTHORISED),
                (refused, RefusalCode.STALE_SEQUENCE),
                (refused, RefusalCode.RATE_LIMIT),
                (refused, RefusalCode.MALFORMED),
                (refused, RefusalCode.LEASE_HELD),
                applied,
                "status",
                applied,
                (refused, RefusalCode.UNAUTHORISED),
                dup,
            ]
            all_acks = [decode_reply(x or b"") for x in replies]
            assert isinstance(all_acks[1], Ack) and all_acks[1].applied_at == T0
            assert isinstance(all_acks[2], Ack) and all_acks[2].applied_at == T1
            # One write for a and b together, one for c.  Three commits for 14 messages:
            # the two pending commits (the heartbeat split the batch) and the heartbeat's
            # lease renewal; the applied marks rode along in those.
            assert writer.writes == [GOOD, {"plant.T_supply_set": 72.0, "apartment.m_flow": 0.9},
                                     dict(c.setpoints)]  # fmt: skip
            assert store.commits - commits_before == 3
            assert store.deferred == 1  # c's mark waits for the next commit
            assert gw.counters.applied == 4 and gw.counters.duplicates == 3
        store.close()  # flushes the deferred mark

        loaded = GatewayStore(path).load(100)
        assert set(loaded.applied_ids) == {earlier.id, a.id, b.id, c.id}
        assert loaded.last_seq == {"cycle": 7} and loaded.pending == []
        assert loaded.inputs["apartment.m_flow"] == (1.0, T1)

    run(main)


class PickyWriter(FakeWriter):
    """A field that refuses some (input, value) pairs and takes the rest of the same write."""

    def __init__(self, refuse: set[tuple[str, float]]) -> None:
        super().__init__()
        self.refuse = refuse
        self.calls = 0

    async def write(self, setpoints: Mapping[str, float]) -> None:
        self.calls += 1
        ok = {n: v for n, v in setpoints.items() if (n, v) not in self.refuse}
        if ok:
            self.writes.append(ok)
        if len(ok) < len(setpoints):
            raise FieldConnectionError(f"field refused {sorted(set(setpoints) - set(ok))}")


def test_a_failed_write_in_a_batch_fails_only_the_commands_it_did_not_apply(
    tmp_path: Path,
) -> None:
    writer, clock = PickyWriter({("apartment.m_flow", 0.66)}), FakeClock(T1)

    async def main() -> None:
        store = GatewayStore(tmp_path / "state.sqlite")
        gw = gateway(writer, clock, store)
        async with gw:
            a = command({"plant.T_supply_set": 71.0}, seq=1, issued_at=T1)
            b = command({"apartment.m_flow": 0.66}, seq=2, issued_at=T1)
            d = command({"apartment.m_flow": 0.5}, seq=3, issued_at=T1)
            # b's resend was a duplicate of b and d followed b's value; once b failed,
            # both are decided again: the resend is tried (and fails), d is applied.
            batch = [a, b, b, d]
            got = acks(await gw.handle_batch([([x.encode()], OPS) for x in batch]))
            assert [(x.id, x.status, x.code) for x in got] == [
                (a.id, AckStatus.APPLIED, None),
                (b.id, AckStatus.REFUSED, RefusalCode.WRITE_FAILED),
                (b.id, AckStatus.REFUSED, RefusalCode.WRITE_FAILED),
                (d.id, AckStatus.APPLIED, None),
            ]
            assert "apartment.m_flow" in got[1].detail
            last: dict[str, float] = {}
            for w in writer.writes:
                last.update(w)
            assert last == {"plant.T_supply_set": 71.0, "apartment.m_flow": 0.5}
            assert gw.core.state.last_seq == {"cycle": 3}
            assert set(gw.core.state.applied_ids) == {a.id, d.id}
            # The failed command can be sent again once the field takes it.
            writer.refuse.clear()
            e = command({"apartment.m_flow": 0.66}, seq=4, issued_at=T1)
            assert acks(await gw.handle_batch([([e.encode()], OPS)]))[0].applied
        store.close()
        loaded = GatewayStore(tmp_path / "state.sqlite").load(100)
        assert loaded.pending == [] and set(loaded.applied_ids) == {a.id, d.id, e.id}

    run(main)


class StuckWriter(FakeWriter):
    """Hangs on write number ``stuck_at`` (1-based) until cancelled: a crash mid-batch."""

    def __init__(self, stuck_at: int) -> None:
        super().__init__()
        self.stuck_at = stuck_at
        self.calls = 0
        self.stuck = asyncio.Event()

    async def write(self, setpoints: Mapping[str, float]) -> None:
        self.calls += 1
        if self.calls == self.stuck_at:
            self.stuck.set()
            await asyncio.Event().wait()
        await super().write(setpoints)


@pytest.mark.parametrize("stuck_at", [2, 3, 5, 6, None])
def test_a_crash_anywhere_in_a_batch_is_settled_so_each_command_is_written_once(
    tmp_path: Path, stuck_at: int | None
) -> None:
    """Five commands on one input (five write groups), crash during write ``stuck_at``
    (write 1 is an earlier command's, so ``stuck_at - 2`` of the five landed).

    ``None``: the batch completes and is acked, then the process dies before the
    deferred applied marks were committed.
    """
    path = tmp_path / "state.sqlite"
    values = [0.1, 0.2, 0.3, 0.4, 0.5]
    cmds = [command({"apartment.m_flow": v}, seq=i + 1, issued_at=T1) for i, v in enumerate(values)]
    writer = StuckWriter(stuck_at or 0)
    clock = FakeClock(T1)

    async def main() -> None:
        store = GatewayStore(path)
        gw = gateway(writer, clock, store)
        async with gw:
            # It also gives the input a value of ours to tell "did not land" by (judge).
            first = command(
                {"plant.T_supply_set": 70.0, "apartment.m_flow": 0.05}, seq=0, issued_at=T1
            )
            assert acks(await gw.handle_batch([([first.encode()], OPS)]))[0].applied
            task = asyncio.create_task(gw.handle_batch([([c.encode()], OPS) for c in cmds]))
            if stuck_at is None:
                got = acks(await task)
                assert all(x.status is AckStatus.APPLIED for x in got)
                assert store.deferred == len(cmds)
            else:
                await writer.stuck.wait()
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        kill_store(store)
        written_before = [w for w in writer.writes if "apartment.m_flow" in w][1:]

        # The restarted gateway settles the batch from the field, then every resend
        # is answered and nothing is written twice.
        writer.stuck_at = 0
        store = GatewayStore(path)
        gw = gateway(writer, clock, store)
        async with gw:
            settled = [d for _, kind, d in store.events() if kind == "settled"]
            assert len(settled) == len(cmds)
            got = acks(await gw.handle_batch([([c.encode()], OPS) for c in cmds]))
        store.close()
        n_before = len(written_before)
        assert [x.status for x in got] == (
            [AckStatus.DUPLICATE] * n_before + [AckStatus.APPLIED] * (len(cmds) - n_before)
        )
        m_flow = [w["apartment.m_flow"] for w in writer.writes if "apartment.m_flow" in w]
        assert m_flow == [0.05, *values]  # each command written exactly once, in order
        expected_before = len(cmds) if stuck_at is None else min(stuck_at - 2, len(cmds))
        assert n_before == max(0, expected_before)

    run(main)


# =========================================================================== over sockets


def test_pipelined_commands_on_a_socket_are_batched_and_answered_in_order(tmp_path: Path) -> None:
    writer, clock = FakeWriter(), FakeClock(T1)
    n = 120

    async def main() -> None:
        ctx = zmq.asyncio.Context()
        store = GatewayStore(tmp_path / "state.sqlite")
        gw = gateway(writer, clock, store)
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            async with gw:
                sock.connect(gw.endpoint)
                sent: list[Command] = []
                for i in range(n):
                    cmd = command({"apartment.m_flow": 0.5 + i * 1e-3}, seq=i, issued_at=T1)
                    # every third one is a replay of the one before: a duplicate
                    data = sent[-1].encode() if i % 3 == 2 else cmd.encode()
                    if i % 3 != 2:
                        sent.append(cmd)
                    await sock.send(data)
                # Everything queued before the gateway reads: it comes in a few batches.
                await asyncio.sleep(0.2)
                task = asyncio.create_task(gw.serve())
                got = []
                for _ in range(n):
                    assert await sock.poll(5000, zmq.POLLIN), "no ack"
                    got.append(decode_ack(await sock.recv()))
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        finally:
            sock.close(linger=0)
            ctx.destroy(linger=0)
            store.close()
        expected = []
        k = 0
        for i in range(n):
            if i % 3 == 2:
                expected.append((sent[k - 1].id, AckStatus.DUPLICATE))
            else:
                expected.append((sent[k].id, AckStatus.APPLIED))
                k += 1
        assert [(a.id, a.status) for a in got] == expected
        assert 1 < gw.counters.largest_batch <= gw.max_batch and gw.counters.batches < n
        assert [w["apartment.m_flow"] for w in writer.writes] == [
            c.setpoints["apartment.m_flow"] for c in sent
        ]

    run(main)


def test_an_idle_gateway_commits_the_deferred_applied_marks_on_its_own(tmp_path: Path) -> None:
    writer, clock = FakeWriter(), FakeClock(T1)
    path = tmp_path / "state.sqlite"

    async def main() -> None:
        store = GatewayStore(path)
        gw = gateway(writer, clock, store)
        gw.applied_flush_delay_s = 0.5
        async with gw:
            task = asyncio.create_task(gw.serve())
            try:
                async with Dispatcher(gw.endpoint, "cycle", insecure_lab=True) as disp:
                    ack = await disp.send(
                        GOOD, issued_at=T1, valid_until=T1 + 900, verdict_digest=VERDICT
                    )
                    assert ack.status is AckStatus.APPLIED
                    assert store.deferred == 1  # acked; the mark waits for a next batch
                    async with asyncio.timeout(5.0):
                        while store.deferred:
                            await asyncio.sleep(0.01)
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        kill_store(store)
        loaded = GatewayStore(path).load(10)
        assert loaded.pending == [] and set(loaded.applied_ids) == {ack.id}

    run(main)


def test_a_mixed_batch_from_two_curve_clients_gets_every_ack_right() -> None:
    """Over CURVE, two clients with different grants queue a mix before the gateway reads."""
    keys, writer, clock = Keys(), FakeWriter(), FakeClock(T1)

    async def main() -> None:
        ctx = zmq.asyncio.Context()
        gw = FieldGateway(
            GatewayCore(LIMITS3, clock_skew_s=5.0),
            writer,
            clock,
            bind="tcp://127.0.0.1:0",
            curve=keys.curve(),
        )
        try:
            async with gw:
                admin = curve_socket(ctx, gw.endpoint, keys.admin, keys.server.public)
                limited = curve_socket(ctx, gw.endpoint, keys.limited, keys.server.public)
                good = command({"plant.T_supply_set": 71.0}, seq=1, issued_at=T1, issuer="admin")
                later = command({"office.m_flow": 0.4}, seq=3, issued_at=T1, issuer="admin")
                plan: list[tuple[zmq.asyncio.Socket, bytes, AckStatus, RefusalCode | None]] = [
                    (admin, good.encode(), AckStatus.APPLIED, None),
                    (admin, good.encode(), AckStatus.DUPLICATE, None),
                    (admin, command(seq=2, issued_at=T0 - 2000.0, issuer="admin").encode(),
                     AckStatus.REFUSED, RefusalCode.EXPIRED),
                    (admin, command({"office.m_flow": 0.3}, seq=1, issued_at=T1,
                                    issuer="admin").encode(),
                     AckStatus.REFUSED, RefusalCode.STALE_SEQUENCE),
                    (limited, command({"office.m_flow": 0.3}, seq=0, issued_at=T1,
                                      issuer="limited").encode(),
                     AckStatus.REFUSED, RefusalCode.UNAUTHORISED),
                    (limited, command({"apartment.m_flow": 0.3}, seq=0, issued_at=T1,
                                      issuer="limited").encode(),
                     AckStatus.APPLIED, None),
                    (admin, later.encode(), AckStatus.APPLIED, None),
                    (limited, b"not json", AckStatus.REFUSED, RefusalCode.MALFORMED),
                    (admin, later.encode(), AckStatus.DUPLICATE, None),
                ]  # fmt: skip
                for sock, data, _, _ in plan:
                    await sock.send(data)
                await asyncio.sleep(0.3)  # handshakes done, everything queued
                task = asyncio.create_task(gw.serve())
                got: dict[int, list[Ack]] = {id(admin): [], id(limited): []}
                for sock in (admin, limited):
                    want = sum(1 for s, *_ in plan if s is sock)
                    for _ in range(want):
                        assert await sock.poll(5000, zmq.POLLIN), "no ack"
                        got[id(sock)].append(decode_ack(await sock.recv()))
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                for sock in (admin, limited):
                    expected = [(st, code) for s, _, st, code in plan if s is sock]
                    assert [(a.status, a.code) for a in got[id(sock)]] == expected
                assert gw.counters.largest_batch > 1
                # Three commands on three inputs; in one batch they share one write call.
                assert sorted((k, v) for w in writer.writes for k, v in w.items()) == [
                    ("apartment.m_flow", 0.3), ("office.m_flow", 0.4),
                    ("plant.T_supply_set", 71.0),
                ]  # fmt: skip
                assert len(writer.writes) < 3 or gw.counters.largest_batch < len(plan)
                admin.close(linger=0)
                limited.close(linger=0)
        finally:
            ctx.destroy(linger=0)

    run(main)


# =========================================================================== kill -9


@pytest.mark.slow
def test_kill9_during_pipelined_batches_executes_each_approved_id_exactly_once(
    tmp_path: Path,
) -> None:
    """A real gateway process behind a counting OPC UA server, killed while a window of
    commands is in flight; the client resends what was not acked on a new connection."""
    total = max(200, round(600 * SCALE))
    window = 48
    rng = random.Random(5)
    opc_port, zmq_port = free_port(), free_port()
    counting = CountingServer(opc_port)
    endpoint = f"tcp://127.0.0.1:{zmq_port}"
    config = write_config(tmp_path, counting.endpoint, endpoint)
    client = read_secret_key(tmp_path / "keys" / "runtime.secret")
    server_public = read_public_key(tmp_path / "keys" / "gateway.public")
    proc = GatewayProcess(config, tmp_path / "gateway.log")
    outcomes: Counter[str] = Counter()

    def value(i: int) -> float:
        return round(1.0 + i * 0.001, 9)

    async def main() -> None:
        await counting.start()
        ctx = zmq.asyncio.Context()
        proc.start()
        now = time.time()
        cmds = [
            Command.create(
                issuer="runtime",
                seq=i,
                issued_at=now,
                valid_until=now + 3600,
                setpoints={"apartment.m_flow": value(i)},
                verdict=VERDICT,
            )
            for i in range(total)
        ]
        by_id = {c.id: i for i, c in enumerate(cmds)}
        acked: set[int] = set()
        kills: list[asyncio.Task[None]] = []

        def connect() -> zmq.asyncio.Socket:
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.curve_serverkey = server_public
            s.curve_publickey = client.public
            s.curve_secretkey = client.secret
            s.connect(endpoint)
            return s

        async def kill_soon() -> None:
            await asyncio.sleep(rng.uniform(0.0, 0.03))
            proc.kill()

        sock = connect()
        in_flight: list[int] = []
        next_i = 0
        try:
            while len(acked) < total:
                while next_i < total and len(in_flight) < window:
                    await sock.send(cmds[next_i].encode())
                    in_flight.append(next_i)
                    next_i += 1
                if await sock.poll(1500, zmq.POLLIN):
                    ack = decode_ack(await sock.recv())
                    i = by_id[ack.id]
                    assert ack.status in (AckStatus.APPLIED, AckStatus.DUPLICATE), ack
                    outcomes[ack.status.value] += 1
                    acked.add(i)
                    if i in in_flight:
                        in_flight.remove(i)
                    if rng.random() < 0.015 and proc.alive():
                        kills.append(asyncio.create_task(kill_soon()))
                    continue
                # Silence: the gateway is dead (or still starting). Resend what is not
                # acked, in order, on a fresh connection, plus a few old acked ones.
                if not proc.alive():
                    proc.start()
                sock.close(linger=0)
                sock = connect()
                replays = rng.sample(sorted(acked), min(3, len(acked)))
                for i in replays:
                    await sock.send(cmds[i].encode())
                    outcomes["replayed"] += 1
                for i in in_flight:
                    await sock.send(cmds[i].encode())
                    outcomes["resent"] += 1
        finally:
            await asyncio.gather(*kills)
            sock.close(linger=0)
            proc.kill()
            ctx.destroy(linger=0)
            await counting.stop()
        executed = Counter({round(v, 9): k for v, k in counting.writes.items()})
        assert set(executed) == {value(i) for i in range(total)}, "missing or stranger"
        twice = {v: k for v, k in executed.items() if k != 1}
        assert not twice, f"executed more than once: {twice}"
        store = GatewayStore(tmp_path / "state.sqlite")
        settled = [d for _, kind, d in store.events() if kind == "settled"]
        store.close()
        print(
            f"\n{total} pipelined commands (window {window}), {proc.kills} kill -9, "
            f"{proc.starts} starts, {len(settled)} commands settled after a crash, "
            f"outcomes {dict(outcomes)}"
        )
        assert proc.kills >= 1 and settled, "no kill landed in a batch: the test proved nothing"

    run(main, timeout_s=max(180.0, total * 0.3))
