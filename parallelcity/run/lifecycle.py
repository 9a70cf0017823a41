"""How a run begins and ends: the speeds a run accepts, the solve thread that never keeps
the process alive, and SIGINT / SIGTERM asking the loop to stop after the cycle in hand."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from typing import Any, TypeVar

log = logging.getLogger("parallelcity.run.runner")

T = TypeVar("T")

MIN_CYCLE_WALL_S = 1e-3
"""A cycle shorter than this in wall time leaves the plant simulator no time to keep up."""
MAX_CYCLE_WALL_S = 86400.0
"""A cycle longer than this in wall time is a typo, not a slow-motion run."""
EXIT_SIGNAL = {"SIGINT": 130, "SIGTERM": 143}


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
