"""Field objects end the tasks they own with ``cancel_and_wait``: a close whose own caller is
cancelled meanwhile is cancelled too (a bare ``suppress(CancelledError)`` around the await of
the owned task swallowed that cancel, so the closer ran on as if nothing had happened)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from parallelcity.clock import SimClock
from parallelcity.field.mirror import Mirror
from parallelcity.field.protocols import protocol_of
from parallelcity.scenario.definition import load_scenario

from .conftest import DH, ROOT

MODBUS = ROOT / "scenarios" / "district_heating_modbus.toml"
SLOW_END_S = 0.5
"""How long an owned task takes to end once cancelled (a reader finishing its request)."""


async def slow_to_end() -> None:
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        await asyncio.sleep(SLOW_END_S)
        raise


def owners() -> list[Any]:
    """pytest params: (make the object, the attribute holding its task, its close)."""
    dh, mb = load_scenario(DH), load_scenario(MODBUS)
    clock = SimClock(epoch=time.time())
    opcua, modbus = protocol_of(dh.field), protocol_of(mb.field)
    ua, tcp = "opc.tcp://127.0.0.1:1", "127.0.0.1:1"  # never reached: nothing is opened
    return [
        pytest.param(
            lambda: Mirror(dh.field, clock, endpoint=ua), "_watch_task", "stop", id="mirror"
        ),
        pytest.param(
            lambda: opcua.writer(dh.field, endpoint=ua), "_watch_task", "aclose", id="opcua-writer"
        ),
        pytest.param(
            lambda: modbus.reader(mb.field, clock, endpoint=tcp),
            "_task",
            "close",
            id="modbus-reader",
        ),
        pytest.param(
            lambda: modbus.writer(mb.field, endpoint=tcp),
            "_watch_task",
            "aclose",
            id="modbus-writer",
        ),
    ]


@pytest.mark.parametrize(("make", "attr", "close"), owners())
def test_a_cancelled_close_stays_cancelled(make: Callable[[], Any], attr: str, close: str) -> None:
    async def body() -> None:
        owner = make()
        setattr(owner, attr, asyncio.create_task(slow_to_end()))
        await asyncio.sleep(0)
        closing: Awaitable[None] = getattr(owner, close)()
        closer = asyncio.ensure_future(closing)
        await asyncio.sleep(0.05)
        closer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closer

    async def bounded() -> None:
        async with asyncio.timeout(30):
            await body()

    asyncio.run(bounded())
