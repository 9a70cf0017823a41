"""Structured concurrency: nothing a run starts outlives it.

After ``run`` returns, inside the same event loop, no task but the caller's is left
and no thread the run started is alive (the solve thread is joined when idle).  Once
with everything embedded, once against a stand-alone gateway (its own thread and
event loop, so that only the run's tasks are in the run's loop).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from parallelcity.clock import SimClock
from parallelcity.gateway.core import GatewayCore
from parallelcity.gateway.server import FieldGateway
from parallelcity.run.runner import RunOptions, RunResult, run
from parallelcity.scenario.definition import Scenario

from .test_gateway import FakeWriter

THREAD_GRACE_S = 2.0
"""A thread the run stopped may still be returning from its last statement."""


def tasks_left(scenario: Scenario, options: RunOptions) -> tuple[RunResult, list[str]]:
    """Run in an event loop of its own, then name every task the run left in it."""

    async def main() -> tuple[RunResult, list[str]]:
        async with asyncio.timeout(120.0):
            result = await run(scenario, options)
        await asyncio.sleep(0)  # callbacks scheduled by the last close run first
        me = asyncio.current_task()
        return result, [t.get_name() for t in asyncio.all_tasks() if t is not me]

    return asyncio.run(main())


def threads_left(before: set[threading.Thread]) -> list[str]:
    """Threads started since ``before`` and still alive after a grace (the loops' own
    default executors are shut down by ``asyncio.run``, so look after it)."""
    end = time.monotonic() + THREAD_GRACE_S
    threads = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    while threads and time.monotonic() < end:
        time.sleep(0.05)
        threads = [t for t in threads if t.is_alive()]
    return [t.name for t in threads]


@contextmanager
def gateway_in_its_own_loop(scenario: Scenario) -> Iterator[str]:
    """A stand-alone gateway on a thread of its own; yields its endpoint."""
    limits = {i.name: i for i in scenario.safety_specs().inputs}
    ready: list[str] = []
    stop: list[asyncio.AbstractEventLoop | FieldGateway] = []

    async def serve() -> None:
        gw = FieldGateway(
            GatewayCore(limits, clock_skew_s=1e10),
            FakeWriter(),
            SimClock(epoch=time.time()),
            bind="tcp://127.0.0.1:0",
            insecure_lab=True,
        )
        async with gw:
            stop.extend([asyncio.get_running_loop(), gw])
            ready.append(gw.endpoint)
            await gw.serve()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), name="gateway")
    thread.start()
    try:
        end = time.monotonic() + 10.0
        while not ready and thread.is_alive() and time.monotonic() < end:
            time.sleep(0.02)
        assert ready, "the gateway did not start"
        yield ready[0]
    finally:
        if len(stop) == 2:
            loop, gw = stop
            assert isinstance(loop, asyncio.AbstractEventLoop) and isinstance(gw, FieldGateway)
            loop.call_soon_threadsafe(gw.request_stop, "test over")
        thread.join(10.0)
        assert not thread.is_alive()


@pytest.mark.slow
def test_no_task_or_thread_outlives_a_run(dh: Scenario, tmp_path: Path) -> None:
    """Two runs side by side (less wall time than one after the other): everything
    embedded, and one against a stand-alone gateway, each in its own event loop."""
    before = set(threading.enumerate())
    embedded: list[tuple[RunResult, list[str]]] = []
    alone = RunOptions(out_dir=tmp_path / "embedded", cycles=2, speed=1440, controller_kind="pi")
    beside = threading.Thread(target=lambda: embedded.append(tasks_left(dh, alone)))
    beside.start()
    try:
        with gateway_in_its_own_loop(dh) as endpoint:
            options = RunOptions(
                out_dir=tmp_path / "standalone",
                cycles=2,
                speed=1440,
                controller_kind="pi",
                gateway_endpoint=endpoint,
            )
            standalone, standalone_tasks = tasks_left(dh, options)
    finally:
        beside.join(150.0)
    assert embedded, "the embedded run did not finish"
    result, embedded_tasks = embedded[0]
    assert result.counts["cycles"] == 2 and result.end == "completed", result.counts
    assert standalone.counts["cycles"] == 2 and standalone.counts["acked"] >= 1, standalone.counts
    assert (embedded_tasks, standalone_tasks) == ([], [])
    assert threads_left(before) == []


@pytest.mark.parametrize("busy", [False, True])
def test_the_solve_thread_is_joined_only_when_idle(busy: bool) -> None:
    from parallelcity.run.lifecycle import SolveWorker

    release = threading.Event()
    worker = SolveWorker(name="joined" if not busy else "stuck")
    if busy:
        running = threading.Event()
        worker.submit(lambda: running.set() or release.wait(10.0))
        assert running.wait(5.0)
    started = time.monotonic()
    assert worker.close(wait_s=5.0) is busy
    assert time.monotonic() - started < 4.0, "a busy thread must never be waited for"
    alive = [t for t in threading.enumerate() if t.name in ("joined", "stuck")]
    release.set()
    assert [t.name for t in alive] == (["stuck"] if busy else [])


def test_a_close_waits_for_its_task_within_a_bound() -> None:
    from parallelcity.aio import cancel_and_wait

    async def stubborn(release: asyncio.Event) -> None:
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue  # ignores being cancelled until released

    async def main() -> None:
        polite = asyncio.create_task(asyncio.sleep(60), name="polite")
        assert await cancel_and_wait(polite, 5.0) and polite.cancelled()
        release = asyncio.Event()
        task = asyncio.create_task(stubborn(release), name="stubborn")
        await asyncio.sleep(0)
        started = time.monotonic()
        assert not await cancel_and_wait(task, 0.2)
        assert time.monotonic() - started < 3.0  # the bound, with room for a loaded machine
        release.set()
        await asyncio.wait({task}, timeout=5.0)
        assert task.done()

    asyncio.run(main())
