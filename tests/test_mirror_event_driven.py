"""An event-driven point (a setpoint that changes only when written) against a real server:
fresh while its subscription is alive, however old its value; stale once the server goes."""

from __future__ import annotations

import asyncio
import time

import pytest
from parallelcity.hil.field import POINT_NAMESPACE, PointServer, free_port, point_node

from parallelcity.clock import SimClock
from parallelcity.field.mirror import Mirror
from parallelcity.field.opcua.config import OpcUaField as FieldConfig
from parallelcity.field.opcua.config import OpcUaInput as InputMap
from parallelcity.field.opcua.config import OpcUaPoint as PointMap
from parallelcity.field.snapshot import PointSpec, Reading, assess

MAX_AGE_S = 1.5


def test_event_driven_age_counts_from_the_subscription_life() -> None:
    specs = {
        "sp": PointSpec("sp", 10.0, event_driven=True),
        "plain": PointSpec("plain", 10.0),
    }
    readings = {"sp": Reading(65.0, 0.0), "plain": Reading(65.0, 0.0)}
    snap = assess(specs, readings, 100.0, alive_at=95.0)
    assert not snap.points["sp"].stale and snap.points["sp"].age_s == 5.0
    assert snap.points["plain"].stale
    silent = assess(specs, readings, 100.0, alive_at=80.0)  # the subscription went quiet
    assert silent.points["sp"].stale and "exceeds max_age_s" in silent.points["sp"].why
    held = assess(specs, readings, 100.0, alive_at=99.0, held={"sp": "gap"})
    assert held.points["sp"].stale
    bad = assess(specs, {"sp": Reading(65.0, 0.0, 0x80000000)}, 100.0, alive_at=99.0)
    assert bad.points["sp"].stale and "status bad" in bad.points["sp"].why


@pytest.mark.slow
def test_an_unchanging_setpoint_stays_fresh_until_the_server_stops() -> None:
    cfg = FieldConfig(
        namespace=POINT_NAMESPACE,
        sampling_interval_ms=100.0,
        points=[
            PointMap(name="setpoint", node=point_node(0), max_age_s=MAX_AGE_S, event_driven=True),
            PointMap(name="plain", node=point_node(1), max_age_s=MAX_AGE_S),
        ],
        inputs=[InputMap(name="setpoint", node=point_node(0))],
    )

    async def body() -> None:
        server = PointServer(free_port(), 2, period_s=3600.0)  # written once, at start
        await server.start()
        clock = SimClock(epoch=time.time(), speed=1.0)
        endpoint = f"opc.tcp://127.0.0.1:{server.port}"
        mirror = Mirror(cfg, clock, endpoint=endpoint, keepalive_ms=300.0)
        try:
            await mirror.start()
            assert await mirror.wait_all_received(20.0)
            written = mirror.readings["setpoint"].source_time
            await asyncio.sleep(2 * MAX_AGE_S + 0.5)
            snap = mirror.snapshot()
            assert clock.now() - written > 2 * MAX_AGE_S  # the value itself is that old
            sp = snap.points["setpoint"]
            assert not sp.stale, sp.why
            assert sp.age_s is not None and sp.age_s < MAX_AGE_S
            assert snap.points["plain"].stale  # the same node, not declared event-driven
            assert "exceeds max_age_s" in snap.points["plain"].why

            await server.stop()
            for _ in range(100):  # bounded: 10 s
                snap = mirror.snapshot()
                if snap.points["setpoint"].stale:
                    break
                await asyncio.sleep(0.1)
            assert snap.points["setpoint"].stale
            assert not snap.link_up and snap.link_why
            for _ in range(100):
                if mirror.gaps:
                    break
                await asyncio.sleep(0.1)
            assert mirror.gaps == 1
            assert [e.kind for e in mirror.take_events()][:1] == ["lost"]
        finally:
            await mirror.stop()
            await server.stop()

    async def bounded() -> None:
        async with asyncio.timeout(60.0):
            await body()

    asyncio.run(bounded())
