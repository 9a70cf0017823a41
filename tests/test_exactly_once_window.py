"""The exactly-once window after a crash, against a real ``parallelcity gateway`` process.

A gateway killed with SIGKILL right after an ack may leave that command
*pending* (its applied mark rides in the next commit).  If a third party (a
PLC program, an operator) changes the input before the restart, the field no
longer holds our value: the restart must count the command as applied (a
resend is a ``duplicate``), leave the third party's value in place and
journal a ``conflict``.  With ``ack_after_applied_commit = true`` in the
config, every ack implies a durable applied mark: no pending row after the
kill.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
import zmq.asyncio
from asyncua import ua

from parallelcity.dispatch.dispatcher import ClientCurve, Dispatcher
from parallelcity.dispatch.keys import read_public_key, read_secret_key
from parallelcity.dispatch.wire import Ack, AckStatus, Command
from parallelcity.errors import DispatchError

from .test_dispatch_exactly_once import CountingServer, GatewayProcess, write_config
from .test_gateway import VERDICT, free_port, run

INPUT = "apartment.m_flow"


def store_rows(path: Path, command_id: str) -> tuple[str | None, list[tuple[str, str]]]:
    """The state of ``command_id``'s row and the events, read from the file (read-only)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
    try:
        row = db.execute("SELECT state FROM applied WHERE id = ?", (command_id,)).fetchone()
        events = db.execute("SELECT kind, detail FROM event ORDER BY n").fetchall()
    finally:
        db.close()
    return (None if row is None else str(row[0])), [(str(k), str(d)) for k, d in events]


class Rig:
    """A counting OPC UA server and a gateway process in front of it, with CURVE."""

    def __init__(self, tmp: Path, *, strict: bool) -> None:
        self.opc = CountingServer(free_port())
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        config = write_config(tmp, self.opc.endpoint, self.endpoint)
        if strict:
            text = config.read_text().replace(
                "lease_s = 3600\n", "lease_s = 3600\nack_after_applied_commit = true\n"
            )
            config.write_text(text)
        self.state = tmp / "state.sqlite"
        self.proc = GatewayProcess(config, tmp / "gateway.log")
        self.curve = ClientCurve(
            read_secret_key(tmp / "keys" / "runtime.secret"),
            read_public_key(tmp / "keys" / "gateway.public"),
        )

    async def deliver(self, disp: Dispatcher, cmd: Command) -> Ack:
        """Deliver ``cmd``, starting the gateway if it is down; bounded."""
        for _ in range(40):
            if not self.proc.alive():
                self.proc.start()
            try:
                return await disp.deliver(cmd)
            except DispatchError:
                continue
        raise AssertionError(f"{cmd.id} never answered; see {self.proc.log}")

    async def set_by_third_party(self, value: float) -> None:
        node = self.opc.server.get_node(self.opc._node_id)
        await node.write_value(ua.DataValue(ua.Variant(value, ua.VariantType.Double)))

    async def field_value(self) -> float:
        node = self.opc.server.get_node(self.opc._node_id)
        return float(await node.read_value())


def command(disp: Dispatcher, value: float) -> Command:
    now = time.time()
    return disp.command(
        {INPUT: value}, issued_at=now, valid_until=now + 3600, verdict_digest=VERDICT
    )


@pytest.mark.slow
def test_a_restart_never_rewrites_an_input_a_third_party_changed_after_an_acked_write(
    tmp_path: Path,
) -> None:
    rig = Rig(tmp_path, strict=False)
    tries, pending_seen = 0, 0

    async def main() -> None:
        nonlocal tries, pending_seen
        await rig.opc.start()
        ctx = zmq.asyncio.Context()
        try:
            async with Dispatcher(
                rig.endpoint, "runtime", curve=rig.curve, timeout_s=1.0, retries=1, context=ctx
            ) as disp:
                # A first command gives the input a value of ours (not the point of the test).
                assert (await rig.deliver(disp, command(disp, 0.5))).status is AckStatus.APPLIED
                while pending_seen < 3 and tries < 10:
                    tries += 1
                    ours, theirs = 1.0 + tries, 100.0 + tries
                    cmd = command(disp, ours)
                    ack = await rig.deliver(disp, cmd)
                    rig.proc.kill()  # right after the ack: the applied mark may be pending
                    # DUPLICATE: an earlier attempt landed, its reply was lost (slow start).
                    assert ack.status in (AckStatus.APPLIED, AckStatus.DUPLICATE), ack
                    state, _ = store_rows(rig.state, cmd.id)
                    pending = state == "pending"
                    pending_seen += pending
                    await rig.set_by_third_party(theirs)

                    disp._reconnect()
                    resent = await rig.deliver(disp, cmd)  # restarts the gateway
                    assert resent.status is AckStatus.DUPLICATE, resent
                    assert await rig.field_value() == theirs  # not written over
                    assert rig.opc.writes[ours] == 1
                    state, events = store_rows(rig.state, cmd.id)
                    assert state == "applied"
                    conflicts = [d for k, d in events if k == "conflict" and cmd.id in d]
                    if pending:
                        assert len(conflicts) == 1, events
                        assert INPUT in conflicts[0]
                        assert f"ours {ours!r}" in conflicts[0]
                        assert f"holds {theirs!r}" in conflicts[0]
                    else:
                        assert conflicts == []
        finally:
            rig.proc.kill()
            ctx.destroy(linger=0)
            await rig.opc.stop()
        assert pending_seen >= 1, f"no kill left the ack pending in {tries} tries: proved nothing"
        print(f"\n{tries} kills right after an ack, {pending_seen} left the command pending")

    run(main, timeout_s=240.0)


@pytest.mark.slow
def test_with_ack_after_applied_commit_every_ack_is_durably_applied_before_it_leaves(
    tmp_path: Path,
) -> None:
    rig = Rig(tmp_path, strict=True)

    async def main() -> None:
        await rig.opc.start()
        ctx = zmq.asyncio.Context()
        try:
            async with Dispatcher(
                rig.endpoint, "runtime", curve=rig.curve, timeout_s=1.0, retries=1, context=ctx
            ) as disp:
                for k in range(4):
                    cmd = command(disp, 1.0 + k)
                    ack = await rig.deliver(disp, cmd)
                    rig.proc.kill()
                    # DUPLICATE: an earlier attempt landed, its reply was lost (slow start).
                    assert ack.status in (AckStatus.APPLIED, AckStatus.DUPLICATE), ack
                    state, events = store_rows(rig.state, cmd.id)
                    assert state == "applied", f"try {k}: {state}"
                    assert not any(kind == "settled" for kind, _ in events)
                    disp._reconnect()
                    assert (await rig.deliver(disp, cmd)).status is AckStatus.DUPLICATE
                    rig.proc.kill()
        finally:
            rig.proc.kill()
            ctx.destroy(linger=0)
            await rig.opc.stop()
        db = sqlite3.connect(f"file:{rig.state}?mode=ro", uri=True)
        try:
            assert db.execute(
                "SELECT count(*) FROM applied WHERE state = 'pending'"
            ).fetchone() == (0,)
        finally:
            db.close()

    run(main, timeout_s=180.0)
