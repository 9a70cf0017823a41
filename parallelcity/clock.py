"""Clocks: simulated time that runs a fixed number of times faster than the wall.

Every part of one site (field stand-in, mirror, cycle, gateway) reads time from
the same clock, so source timestamps, ages and command expiry agree.  Against
real equipment the speed is 1 and the epoch is now.  Times are plain floats,
seconds since the Unix epoch, in simulated time.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from typing import Protocol

HELD_POLL_S = 0.05
"""How often a sleeper on a held clock looks whether it started (wall seconds)."""


class Clock(Protocol):
    """What the runtime needs of a clock."""

    @property
    def speed(self) -> float: ...

    def now(self) -> float:
        """Current simulated time, seconds since the Unix epoch."""
        ...

    async def sleep_until(self, t: float) -> None:
        """Return once ``now() >= t``."""
        ...


@dataclass
class SimClock:
    """Simulated time = ``epoch + (wall - wall_start) * speed``.

    A clock made with ``held=True`` stands at ``epoch`` until ``start()``: a run's
    set-up (certificates, servers, solver build) takes machine-dependent wall time,
    and the simulated day must not begin before the loop is ready for it.
    """

    epoch: float
    speed: float = 1.0
    held: bool = False
    _wall_start: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.speed) and self.speed > 0):
            raise ValueError(f"clock speed must be positive and finite, got {self.speed}")
        if not math.isfinite(self.epoch):
            raise ValueError(f"clock epoch must be finite, got {self.epoch}")

    def start(self) -> None:
        """Let a held clock run on from ``epoch``, from this instant; no-op if running."""
        if self.held:
            self._wall_start = time.monotonic()
            self.held = False

    def now(self) -> float:
        if self.held:
            return self.epoch
        return self.epoch + (time.monotonic() - self._wall_start) * self.speed

    async def sleep_until(self, t: float) -> None:
        while True:
            if self.held:  # time does not move: look again shortly
                await asyncio.sleep(HELD_POLL_S)
                continue
            remaining = (t - self.now()) / self.speed
            if remaining <= 0:
                return
            await asyncio.sleep(remaining)


@dataclass
class FakeClock:
    """A clock tests move by hand; ``sleep_until`` jumps straight to the target."""

    t: float = 0.0
    speed: float = 1.0

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds

    async def sleep_until(self, t: float) -> None:
        self.t = max(self.t, t)
        await asyncio.sleep(0)
