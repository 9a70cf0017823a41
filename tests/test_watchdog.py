"""The heartbeat watchdog and equipment leases: pure rules, then a real gateway on sockets.

The trials test measures, on the gateway's own clock, the time from the last
heartbeat the gateway saw to the moment the safe values landed in the
(recording) field, over ``>= 200`` trials (``PARALLELCITY_SLOW_SCALE`` scales
it; CI runs 200).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path

import pytest

from parallelcity.clock import FakeClock, SimClock
from parallelcity.dispatch.dispatcher import ClientCurve, Dispatcher
from parallelcity.dispatch.keys import KeyPair
from parallelcity.dispatch.wire import AckStatus, RefusalCode, WatchdogState
from parallelcity.errors import DispatchError
from parallelcity.gateway.core import GatewayCore
from parallelcity.gateway.grants import Grant
from parallelcity.gateway.server import FieldGateway, ServerCurve, new_zap_domain
from parallelcity.gateway.store import GatewayStore
from parallelcity.gateway.watchdog import LeaseTable, Watchdog, equipment_of
from parallelcity.gateway.zap import AllowList

from .test_gateway import GOOD, LIMITS, T0, VERDICT, run

SCALE = float(os.environ.get("PARALLELCITY_SLOW_SCALE", "1"))
SAFE = {"plant.T_supply_set": 65.0, "apartment.m_flow": 0.1}

# =========================================================================== pure


def test_watchdog_arms_on_first_sign_of_life_and_trips_only_after_the_window() -> None:
    wd = Watchdog(1.0, 3, SAFE)
    assert wd.state is WatchdogState.IDLE and wd.deadline() is None and not wd.due(1e9)
    wd.seen(100.0)
    assert wd.state is WatchdogState.ARMED and wd.deadline() == 103.0
    wd.seen(101.0)
    assert not wd.due(104.0) and wd.due(104.000001)
    reason = wd.trip(104.5)
    assert wd.tripped and not wd.reverted and "no heartbeat for 3.500 s" in reason
    wd.seen(105.0)  # heartbeats do not un-trip it
    assert wd.tripped and wd.deadline() is None
    wd.rearm(106.0, "admin", "plant checked")
    assert wd.state is WatchdogState.IDLE and "plant checked" in wd.detail
    wd.seen(107.0)
    assert wd.deadline() == 110.0


def test_watchdog_without_safe_values_is_disabled_and_restores_across_restarts() -> None:
    off = Watchdog(1.0, 3, {})
    off.seen(1.0)
    assert off.state is WatchdogState.DISABLED and off.deadline() is None
    wd = Watchdog(1.0, 3, SAFE)
    wd.restore(WatchdogState.TRIPPED, "tripped at 5", 5.0, now=50.0)
    assert wd.tripped and not wd.reverted  # the safe values are written again
    wd2 = Watchdog(1.0, 3, SAFE)
    wd2.restore(WatchdogState.ARMED, "", 5.0, now=50.0)
    assert wd2.deadline() == 53.0  # a fresh window after a restart
    with pytest.raises(ValueError):
        Watchdog(0.0, 3, SAFE)
    with pytest.raises(ValueError):
        GatewayCore(LIMITS, safe={"plant.T_supply_set": 200.0})


def test_leases_give_one_writer_per_equipment() -> None:
    assert equipment_of("plant.T_supply_set") == "plant" and equipment_of("pump") == "pump"
    table = LeaseTable(10.0)
    table.take("a", ["plant.T_supply_set", "apartment.m_flow"], 0.0)
    assert table.conflicts("a", ["plant.T_supply_set"], 5.0) == []
    assert "plant is leased to another issuer" in table.conflicts("b", ["plant.x"], 5.0)[0]
    assert table.conflicts("b", ["office.m_flow"], 5.0) == []
    assert table.renew("a", 8.0) and table.conflicts("b", ["plant.x"], 17.0)
    assert table.conflicts("b", ["plant.x"], 18.5) == []  # ran out
    table.take("a", ["plant.x"], 20.0)
    assert table.release("a") and table.conflicts("b", ["plant.x"], 21.0) == []


def test_core_refuses_while_tripped_and_after_a_revert_ramps_from_safe_values() -> None:
    core = GatewayCore(LIMITS, safe=SAFE, heartbeat_interval_s=1.0, missed_heartbeats=2)
    from .test_gateway import command

    core.record_applied(command(seq=0), T0)
    core.watchdog.trip(T0 + 3)
    d = core.decide(command(seq=1, issued_at=T0 + 3), T0 + 3)
    assert d.code is RefusalCode.WATCHDOG_TRIPPED and "re-arm" in d.detail
    core.reverted(T0 + 3)
    core.watchdog.rearm(T0 + 4, "admin", "ok")
    jump = command({"plant.T_supply_set": 70.0}, seq=1, issued_at=T0 + 4)
    assert core.decide(jump, T0 + 4).code is RefusalCode.RATE_LIMIT  # 65 -> 70 in 1 s


# =========================================================================== on sockets


class TimedWriter:
    """Records each write with the time it landed (``clock``: monotonic unless set)."""

    def __init__(self) -> None:
        self.writes: list[tuple[float, dict[str, float]]] = []
        self.landed = asyncio.Event()
        self.clock: Callable[[], float] = time.monotonic

    async def write(self, setpoints: Mapping[str, float]) -> None:
        self.writes.append((self.clock(), dict(setpoints)))
        self.landed.set()

    async def read(self, names: Sequence[str]) -> dict[str, float]:
        return {}


@contextlib.asynccontextmanager
async def watched_gateway(
    writer: TimedWriter,
    interval_s: float,
    missed: int,
    *,
    store: GatewayStore | None = None,
    clock: SimClock | FakeClock | None = None,
) -> AsyncIterator[tuple[FieldGateway, ClientCurve, ClientCurve]]:
    server, admin, runtime = KeyPair.generate(), KeyPair.generate(), KeyPair.generate()
    allow = AllowList.of(
        [
            (admin.public, Grant.everything("admin")),
            (runtime.public, Grant("runtime", equipment=frozenset({"plant", "apartment"}))),
        ]
    )
    core = GatewayCore(
        LIMITS, safe=SAFE, heartbeat_interval_s=interval_s, missed_heartbeats=missed, lease_s=60
    )
    gw = FieldGateway(
        core,
        writer,
        clock if clock is not None else SimClock(epoch=T0, speed=1.0),
        bind="tcp://127.0.0.1:0",
        curve=ServerCurve(server, allow, new_zap_domain()),
        store=store,
    )
    async with gw:
        task = asyncio.create_task(gw.serve())
        try:
            yield gw, ClientCurve(admin, server.public), ClientCurve(runtime, server.public)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def test_silence_trips_the_watchdog_reverts_reports_journals_and_needs_a_rearm(
    tmp_path: Path,
) -> None:
    writer = TimedWriter()
    store = GatewayStore(tmp_path / "state.sqlite")

    async def main() -> None:
        async with (
            watched_gateway(writer, 0.1, 3, store=store) as (gw, admin, runtime),
            Dispatcher(gw.endpoint, "runtime", curve=runtime, timeout_s=1.0) as disp,
            Dispatcher(gw.endpoint, "admin", curve=admin, timeout_s=1.0) as op,
        ):
            status = await disp.heartbeat()
            assert status.watchdog is WatchdogState.ARMED and status.heartbeat_s == 0.1
            assert status.insecure_lab is False
            now = gw.clock.now()
            ack = await disp.send(
                GOOD, issued_at=now, valid_until=now + 900, verdict_digest=VERDICT
            )
            assert ack.status is AckStatus.APPLIED
            assert (await disp.heartbeat()).leases == {"plant": "runtime", "apartment": "runtime"}
            # Another issuer cannot drive the leased equipment meanwhile.
            now = gw.clock.now()
            other = await op.send(
                {"apartment.m_flow": 0.3}, issued_at=now, valid_until=now + 900,
                verdict_digest=VERDICT,
            )  # fmt: skip
            assert other.code is RefusalCode.LEASE_HELD and "another issuer" in other.detail
            assert "runtime" not in other.detail  # issuers do not learn each other's names
            assert (await op.heartbeat()).leases == {"plant": "*", "apartment": "*"}
            # Silence: the safe values land, leases end, commands are refused.
            writer.landed.clear()
            await asyncio.wait_for(writer.landed.wait(), 2.0)
            assert writer.writes[-1][1] == SAFE and gw.counters.trips == 1
            status = await disp.heartbeat()
            assert status.watchdog is WatchdogState.TRIPPED and "re-arm" in status.detail
            assert status.leases == {}
            now = gw.clock.now()
            refused = await disp.send(
                GOOD, issued_at=now, valid_until=now + 900, verdict_digest=VERDICT
            )
            assert refused.code is RefusalCode.WATCHDOG_TRIPPED
            # Only a key allowed to re-arm may; then commands flow again.
            with pytest.raises(DispatchError, match="may not re-arm"):
                await disp.rearm("me")
            status = await op.rearm("plant inspected")
            assert status.watchdog is WatchdogState.IDLE and "plant inspected" in status.detail
            now = gw.clock.now()
            ack = await disp.send(
                {"plant.T_supply_set": 65.0}, issued_at=now, valid_until=now + 900,
                verdict_digest=VERDICT,
            )  # fmt: skip
            assert ack.status is AckStatus.APPLIED
        kinds = [kind for _, kind, _ in store.events()]
        assert kinds == ["watchdog_armed", "watchdog_tripped", "reverted", "watchdog_rearmed",
                         "watchdog_armed"]  # fmt: skip

    try:
        run(main, timeout_s=20.0)
    finally:
        store.close()


def test_a_trip_survives_a_gateway_restart(tmp_path: Path) -> None:
    writer = TimedWriter()
    path = tmp_path / "state.sqlite"

    async def main() -> None:
        store = GatewayStore(path)
        async with (
            watched_gateway(writer, 0.05, 2, store=store) as (gw, _admin, runtime),
            Dispatcher(gw.endpoint, "runtime", curve=runtime) as disp,
        ):
            await disp.heartbeat()
            await asyncio.wait_for(writer.landed.wait(), 2.0)
        store.close()
        writer.writes.clear()
        writer.landed.clear()
        store = GatewayStore(path)
        async with (
            watched_gateway(writer, 0.05, 2, store=store) as (gw, _admin, runtime),
            Dispatcher(gw.endpoint, "runtime", curve=runtime) as disp,
        ):
            status = await disp.heartbeat()
            assert status.watchdog is WatchdogState.TRIPPED
            await asyncio.wait_for(writer.landed.wait(), 2.0)  # safe values written again
            assert writer.writes[0][1] == SAFE
        store.close()

    run(main)


@pytest.mark.slow
def test_watchdog_reverts_within_the_window_in_every_trial() -> None:
    """>= 200 trials: heartbeat, fall silent, measure when the safe values land.

    All times are the gateway's clock.  The guarantee checked: silence of
    ``missed x interval`` after the last sign of life the gateway saw never trips it
    (the trip comes strictly later), and the safe values land within one more window
    (``REVERT_WITHIN``), which is what a loaded machine may add to wake the gateway.
    The client's view is checked too, against the time its last heartbeat was sent:
    that is no later than the gateway saw it, so it can only make a revert look later.
    """
    trials = max(200, round(200 * SCALE))
    interval, missed = 0.08, 3
    window = interval * missed
    revert_within = window
    writer = TimedWriter()
    silence: list[float] = []  # last heartbeat seen -> trip, gateway clock
    latencies: list[float] = []  # last heartbeat seen -> safe values landed, gateway clock
    client: list[float] = []  # last heartbeat sent -> safe values landed

    async def main() -> None:
        async with (
            watched_gateway(writer, interval, missed) as (gw, admin, _runtime),
            Dispatcher(gw.endpoint, "admin", curve=admin, timeout_s=5.0) as op,
        ):
            writer.clock = gw.clock.now
            wd = gw.core.watchdog
            for _ in range(trials):
                await op.heartbeat()
                await asyncio.sleep(interval / 2)
                writer.landed.clear()  # nothing writes before the trip
                sent_at = gw.clock.now()
                await op.heartbeat()
                await asyncio.wait_for(writer.landed.wait(), window + revert_within + 10.0)
                landed_at, values = writer.writes[-1]
                assert values == SAFE and wd.tripped and wd.last_seen is not None
                silence.append(wd.since - wd.last_seen)
                latencies.append(landed_at - wd.last_seen)
                client.append(landed_at - sent_at)
                await op.rearm("next trial")
            assert gw.counters.trips == trials == gw.counters.reverts

    run(main, timeout_s=trials * (window + revert_within + 0.5) + 60)
    early = [x for x in silence if not x > window]
    early_client = [x for x in client if not x > window]
    late = [x for x in latencies if x > window + revert_within]
    latencies.sort()
    p50, p99 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99)]
    print(
        f"\n{trials} trials, window {window:.3f} s: safe values landed after p50 {p50:.4f} s, "
        f"p99 {p99:.4f} s, max {latencies[-1]:.4f} s of silence; tripped after min "
        f"{min(silence):.4f} s"
    )
    assert not early, f"tripped after no more than the window of silence: {early}"
    assert not early_client, f"reverted within the window after the heartbeat left: {early_client}"
    assert not late, f"reverted later than window + {revert_within} s: {late}"


def test_rearm_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from parallelcity.cli import main as cli_main
    from parallelcity.dispatch.keys import read_secret_key, write_keypair

    for name in ("gateway", "operator", "runtime"):
        write_keypair(tmp_path, name)
    server = read_secret_key(tmp_path / "gateway.secret")
    operator = read_secret_key(tmp_path / "operator.secret")
    runtime = read_secret_key(tmp_path / "runtime.secret")
    allow = AllowList.of(
        [
            (operator.public, Grant("operator", frozenset(), frozenset(), {}, True)),
            (runtime.public, Grant.everything("runtime")),
        ]
    )
    writer = TimedWriter()

    async def main() -> None:
        core = GatewayCore(LIMITS, safe=SAFE, heartbeat_interval_s=0.05, missed_heartbeats=2)
        gw = FieldGateway(
            core,
            writer,
            SimClock(epoch=T0),
            bind="tcp://127.0.0.1:0",
            curve=ServerCurve(server, allow, new_zap_domain()),
        )
        async with gw:
            task = asyncio.create_task(gw.serve())
            try:
                # Only a key that may drive something arms the watchdog.
                curve = ClientCurve(runtime, server.public)
                async with Dispatcher(gw.endpoint, "runtime", curve=curve) as rt:
                    await rt.heartbeat()
                await asyncio.wait_for(writer.landed.wait(), 2.0)
                argv = ["rearm", gw.endpoint, "--reason", "valve checked", "--key",
                        str(tmp_path / "operator.secret"), "--gateway-key",
                        str(tmp_path / "gateway.public")]  # fmt: skip
                assert await asyncio.to_thread(cli_main, argv) == 0
                assert core.watchdog.state is WatchdogState.IDLE
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    run(main)
    assert "watchdog idle: re-armed" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # no keys and not --insecure-lab: a usage error
        cli_main(["rearm", "tcp://127.0.0.1:9", "--reason", "x"])
