"""Starting the mirror on a large server: the budget, the timeouts, the errors of asyncua.

The slow test starts the mirror on 10,000 points of a server in another process while
a second client in a third process is subscribed to all of them and takes their
changes (``benchmarks.mirror_start`` runs the same setup ten times).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time

import pytest
from asyncua import ua
from wait_for2 import CancelledWithResultError

from benchmarks.mirror_start import field_config, start_busy_field
from parallelcity.clock import SimClock
from parallelcity.errors import FieldConnectionError
from parallelcity.field.mirror import Mirror
from parallelcity.field.opcua.reader import DEFAULT_TIMEOUT_S, START_S_PER_POINT
from parallelcity.field.opcua.session import deadline, raised_by_asyncua


def clock() -> SimClock:
    return SimClock(epoch=time.time(), speed=1.0)


async def _raise_on_cancel(exc: BaseException) -> None:
    """What asyncua's wait_for2 does when a reply lands as the caller is cancelled."""
    try:
        await asyncio.sleep(10)
    except asyncio.CancelledError:
        raise exc from None


def test_deadline_turns_a_cancelled_with_result_error_into_a_timeout() -> None:
    async def plain() -> None:
        async with asyncio.timeout(0.01):
            await _raise_on_cancel(CancelledWithResultError(None, False))

    async def ours() -> None:
        async with deadline(0.01):
            await _raise_on_cancel(CancelledWithResultError(None, False))

    if sys.version_info < (3, 12):  # 3.11 converts only the exact CancelledError type
        with pytest.raises(CancelledWithResultError):
            asyncio.run(plain())
    with pytest.raises(TimeoutError):
        asyncio.run(ours())


def test_deadline_passes_on_a_cancellation_that_is_not_its_own() -> None:
    async def body() -> None:
        async def inner() -> None:
            async with deadline(10.0):
                await asyncio.sleep(10)

        task = asyncio.create_task(inner())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(body())


def test_errors_raised_inside_asyncua_are_told_from_ours() -> None:
    try:
        ua.NodeId.from_string("ns=;;i=zzz!!")
    except Exception as exc:  # whatever asyncua raises for garbage
        assert raised_by_asyncua(exc)
    else:
        raise AssertionError("asyncua parsed garbage")
    try:
        raise ValueError("ours")
    except ValueError as exc:
        assert not raised_by_asyncua(exc)


def test_start_budget_grows_with_the_point_count() -> None:
    small = Mirror(field_config(10), clock(), endpoint="opc.tcp://127.0.0.1:4840")
    large = Mirror(field_config(10_000), clock(), endpoint="opc.tcp://127.0.0.1:4840")
    assert small.start_budget_s == pytest.approx(DEFAULT_TIMEOUT_S + 11 * START_S_PER_POINT)
    assert large.start_budget_s == pytest.approx(DEFAULT_TIMEOUT_S + 10_001 * START_S_PER_POINT)
    fixed = Mirror(field_config(10_000, 90.0), clock(), endpoint="opc.tcp://127.0.0.1:4840")
    assert fixed.start_budget_s == 90.0
    with pytest.raises(ValueError, match="start_timeout_s"):
        Mirror(field_config(10), clock(), endpoint="opc.tcp://x:1", start_timeout_s=0.0)


def test_a_garbage_endpoint_is_a_field_error_not_a_traceback() -> None:
    async def body() -> None:
        for endpoint in ("garbage", "opc.tcp://:4840", "opc.tcp://127.0.0.1:notaport"):
            mirror = Mirror(field_config(3), clock(), endpoint=endpoint)
            with pytest.raises(FieldConnectionError, match=r"opc\.tcp://HOST:PORT"):
                await mirror.start()

    asyncio.run(body())


@pytest.mark.slow
def test_mirror_starts_on_10000_points_beside_a_busy_client(
    caplog: pytest.LogCaptureFixture,
) -> None:
    n, starts = 10_000, 2
    server, client, endpoint = start_busy_field(n, period_ms=1000.0)
    took: list[float] = []

    async def body() -> None:
        for _ in range(starts):
            mirror = Mirror(field_config(n), clock(), endpoint=endpoint)
            t0 = time.monotonic()
            async with asyncio.timeout(mirror.start_budget_s + 30.0):  # a hang guard only
                await mirror.start()
            took.append(time.monotonic() - t0)
            try:
                assert took[-1] <= mirror.start_budget_s
                assert await mirror.wait_all_received(60.0)
            finally:
                await mirror.stop()

    try:
        with caplog.at_level(logging.INFO, logger="parallelcity.field.opcua.reader"):
            asyncio.run(body())
    finally:
        client.close()
        server.close()
    assert len(took) == starts
    assert any(f"{n} points subscribed" in r.getMessage() for r in caplog.records)
    print(
        f"mirror starts on {n} points beside a busy client: {', '.join(f'{t:.1f} s' for t in took)}"
    )
