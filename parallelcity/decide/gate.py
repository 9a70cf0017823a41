"""The simplex gate: who is in control, the high-performance controller or the verified fallback.

    ┌────────────┐  rejected plan, solver failure, missed deadline, stale data,
    │ CONTROLLER │  or an outside reason (e.g. the twin diverges)          ┌──────────┐
    │  (MPC)     │ ──────────────────────────────────────────────────────► │ FALLBACK │
    └────────────┘ ◄────────────────────────────────────────────────────── └──────────┘
                    the controller's plan verified on `reverify_cycles`
                    consecutive cycles while the fallback kept control

While in FALLBACK the controller still plans every cycle in the shadow and its
plan is verified, but only the fallback's plan is dispatched; any cycle whose
controller plan is not approved (or not tried) resets the count.  Every change
of mode is a ``Switch`` with its time and reason, for the journal.

Pure: no clock, no I/O.  ``CycleLogic`` drives it from the cycle's worker
thread; the runner trips it for a missed deadline, which only the runner can
see, so every method holds a lock.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from enum import StrEnum


class Mode(StrEnum):
    CONTROLLER = "controller"
    FALLBACK = "fallback"


@dataclass(frozen=True)
class Switch:
    t: float  # simulated time of the cycle that switched
    frm: Mode
    to: Mode
    reason: str


class SimplexGate:
    def __init__(self, reverify_cycles: int = 3) -> None:
        if reverify_cycles < 1:
            raise ValueError(f"reverify_cycles must be at least 1, got {reverify_cycles}")
        self.reverify_cycles = reverify_cycles
        self.mode = Mode.CONTROLLER
        self.streak = 0  # consecutive verified controller plans while in FALLBACK
        self.switches: list[Switch] = []
        self._lock = threading.Lock()

    @property
    def in_fallback(self) -> bool:
        return self.mode is Mode.FALLBACK

    def trip(self, t: float, reason: str) -> Switch | None:
        """Hand control to the fallback (or keep it there, restarting the count)."""
        with self._lock:
            self.streak = 0
            if self.mode is Mode.FALLBACK:
                return None
            self.mode = Mode.FALLBACK
            return self._switch(t, Mode.CONTROLLER, Mode.FALLBACK, reason)

    def controller_verified(self, t: float) -> Switch | None:
        """The controller's plan was approved this cycle; returns the switch back, if due."""
        with self._lock:
            if self.mode is Mode.CONTROLLER:
                return None
            self.streak += 1
            if self.streak < self.reverify_cycles:
                return None
            self.mode, self.streak = Mode.CONTROLLER, 0
            return self._switch(
                t,
                Mode.FALLBACK,
                Mode.CONTROLLER,
                f"controller plan verified on {self.reverify_cycles} consecutive cycles",
            )

    def controller_unverified(self) -> None:
        """The controller's plan was not approved (or not tried) this cycle."""
        with self._lock:
            self.streak = 0

    def status(self) -> str:
        if self.mode is Mode.CONTROLLER:
            return "controller in control"
        return f"fallback in control; controller verified {self.streak}/{self.reverify_cycles}"

    def _switch(self, t: float, frm: Mode, to: Mode, reason: str) -> Switch:
        s = Switch(t, frm, to, reason)
        self.switches.append(s)
        return s
