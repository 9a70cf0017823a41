"""How a run begins and ends: the speeds a run accepts, the solve thread that never keeps
the process alive, and SIGINT / SIGTERM asking the loop to stop after the cycle in hand."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from typing import Any, TypeVar

log = logging.getLogger("parallelcity.run.runner")

T = TypeVar("T")

MIN_CYCLE_WALL_S = 1e-3
"""A cycle shorter than this in wall time leaves the plant simulator no time to keep up."""
MAX_CYCLE_WALL_S = 86400.0
"""A cycle longer than this in wall time is a typo, not a slow-motion run."""
EXIT_SIGNAL = {"SIGINT": 130, "SIGTERM": 143}
CLOSE_BOUND_S = 15.0
"""Wall time one part of a run (a server, a client, a task) may take to close or end;
past it the part is left behind (logged) and the run goes on to write its outputs."""
CANCEL_GRACE_S = 5.0
"""Wall time a part cancelled for being late has to end before it is left behind."""


def speed_problem(cycle_s: float, speed: float) -> str | None:
    """Why an embedded run cannot go at ``speed`` (simulated s per wall s), or None."""
    if not speed > 0 or speed != speed or speed == float("inf"):
        return f"speed {speed}: must be a positive finite number"
    wall = cycle_s / speed
    if wall < MIN_CYCLE_WALL_S:
        return (
            f"speed {speed:g}: a {cycle_s:g} s cycle would last {wall * 1e3:.3g} ms of wall time; "
            f"at most {cycle_s / MIN_CYCLE_WALL_S:g} (1 ms per cycle)"
        )
    if wall > MAX_CYCLE_WALL_S:
        return (
            f"speed {speed:g}: a {cycle_s:g} s cycle would last {wall / 86400:.3g} days of wall "
            f"time; at least {cycle_s / MAX_CYCLE_WALL_S:g} (one day per cycle)"
        )
    return None


class SolveWorker:
    """One daemon thread running the cycle's decisions, one at a time.

    A solver stuck in native code cannot be interrupted; a pool thread would be joined
    at interpreter exit and keep the command alive after its summary.  A daemon thread
    is left behind instead (``close`` says whether it was busy).
    """

    def __init__(self, name: str = "cycle") -> None:
        self._jobs: list[tuple[Future[Any], Callable[[], Any]] | None] = []
        self._ready = threading.Condition()
        self._busy = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        fut: Future[T] = Future()
        with self._ready:
            self._jobs.append((fut, fn))
            self._ready.notify()
        return fut

    @property
    def busy(self) -> bool:
        with self._ready:
            return self._busy or bool(self._jobs)

    def close(self, wait_s: float = 0.0) -> bool:
        """Stop taking jobs; True if a job is still running (and is abandoned).

        An idle thread is joined, for at most ``wait_s``; a busy one never is.
        """
        with self._ready:
            for job in self._jobs:
                if job is not None:
                    job[0].cancel()
            self._jobs = [None]
            self._ready.notify()
            busy = self._busy
        if not busy and wait_s > 0:
            self._thread.join(wait_s)
        return busy

    def _work(self) -> None:
        while True:
            with self._ready:
                while not self._jobs:
                    self._ready.wait()
                job = self._jobs.pop(0)
                if job is None:
                    return
                self._busy = True
            fut, fn = job
            try:
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn())
                    except BaseException as exc:
                        fut.set_exception(exc)
            finally:
                with self._ready:
                    self._busy = False


class StopRequest:
    """Set by SIGINT / SIGTERM (with ``install``) or by hand; the loop ends at the next
    safe point.  A second signal while stopping exits at once with the signal's code."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.signal: str | None = None
        self._installed: list[signal.Signals] = []

    @property
    def requested(self) -> bool:
        return self.event.is_set()

    def request(self, name: str) -> None:
        if self.event.is_set():
            log.error("second %s while stopping: exiting at once, outputs not written", name)
            logging.shutdown()
            os._exit(EXIT_SIGNAL.get(name, 1))
        self.signal = name
        self.event.set()
        log.warning(
            "%s: ending the run after the cycle in hand and writing the outputs "
            "(again to exit at once)",
            name,
        )

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.request, sig.name)
            self._installed.append(sig)

    def uninstall(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in self._installed:
            loop.remove_signal_handler(sig)
        self._installed.clear()
        if self.signal is not None:  # while the outputs are written, a second signal ends it
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, _exit_now)


def _exit_now(signum: int, frame: object) -> None:
    name = signal.Signals(signum).name
    log.error("second %s while stopping: exiting at once, outputs not all written", name)
    logging.shutdown()
    os._exit(EXIT_SIGNAL.get(name, 1))


async def unless_stopped(aw: Awaitable[T], stop: StopRequest, timeout: float | None = None) -> T:
    """Await ``aw`` unless a stop is requested first (``Stopped``) or ``timeout`` wall seconds
    pass (``TimeoutError``); ``aw`` is cancelled either way if it did not finish."""
    task = asyncio.ensure_future(aw)
    stopper = asyncio.ensure_future(stop.event.wait())
    try:
        done, _ = await asyncio.wait(
            {task, stopper}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        stopper.cancel()
    if task in done:
        return task.result()
    task.cancel()
    if stopper in done:
        raise Stopped(stop.signal)
    raise TimeoutError


class Stopped(Exception):
    """A stop was requested while waiting."""

    def __init__(self, signal_name: str | None) -> None:
        super().__init__(signal_name)
        self.signal = signal_name


async def bounded(aw: Awaitable[T], bound_s: float, what: str) -> T | None:
    """Await ``aw`` for at most ``bound_s`` wall seconds, then cancel it and give it
    ``CANCEL_GRACE_S`` to end; if it does not (a cancellation swallowed), it is left
    behind, logged, and None returned.  Its own exception is raised."""
    task = asyncio.ensure_future(aw)
    try:
        done, _ = await asyncio.wait({task}, timeout=bound_s)
        if not done:
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=CANCEL_GRACE_S)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not done or task.cancelled():
        log.warning("%s did not end within %g s: left behind", what, bound_s)
        return None
    return task.result()


async def enter_bounded(
    stack: AsyncExitStack,
    cm: AbstractAsyncContextManager[T],
    what: str,
    bound_s: float = CLOSE_BOUND_S,
) -> T:
    """``stack.enter_async_context(cm)`` whose exit may take at most ``bound_s`` (``bounded``)."""
    value = await cm.__aenter__()

    async def close(exc_type: Any, exc: Any, tb: Any) -> bool:
        return bool(await bounded(cm.__aexit__(exc_type, exc, tb), bound_s, f"closing {what}"))

    stack.push_async_exit(close)
    return value


def run_bounded(main: Coroutine[Any, Any, T], grace_s: float = CLOSE_BOUND_S) -> T:
    """``asyncio.run(main)`` whose shutdown cannot hang.

    ``asyncio.run`` then waits without a bound for every task still alive to take its
    cancellation and for every thread of the default executor to finish; one task that
    swallows its cancellation, or one blocking call in an executor thread, would keep the
    command alive after its run.  Here each gets ``grace_s``; what is still alive after it
    is logged and left behind.
    """
    executor = ThreadPoolExecutor(thread_name_prefix="asyncio")
    runner = asyncio.Runner()  # its close() would wait without a bound: not used
    loop = runner.get_loop()
    loop.set_default_executor(executor)
    try:
        return runner.run(main)
    finally:
        try:
            left = _end_tasks(loop, grace_s) + _end_executor(executor, grace_s)
            if left:
                log.warning("left behind at exit (not ended within %g s): %s", grace_s, left)
        finally:
            asyncio.set_event_loop(None)
            loop.close()


def _end_tasks(loop: asyncio.AbstractEventLoop, grace_s: float) -> list[str]:
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for t in tasks:
        t.cancel()
    gens = loop.create_task(loop.shutdown_asyncgens(), name="async generators")
    loop.run_until_complete(asyncio.wait([*tasks, gens], timeout=grace_s))
    for t in tasks:
        if t.done() and not t.cancelled() and t.exception() is not None:
            loop.call_exception_handler(
                {"message": "unhandled exception at exit", "exception": t.exception(), "task": t}
            )
    return [t.get_name() for t in [*tasks, gens] if not t.done()]


def _end_executor(executor: ThreadPoolExecutor, grace_s: float) -> list[str]:
    waiter = threading.Thread(
        target=executor.shutdown, kwargs={"cancel_futures": True}, daemon=True
    )
    waiter.start()
    waiter.join(grace_s)
    return ["a default executor thread"] if waiter.is_alive() else []
