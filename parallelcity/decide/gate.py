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

Pure and single-threaded: no clock, no I/O, no lock.  ``GateState`` is a value;
the solve thread plans against a copy of it and hands the state after back in its
``Decision``; only the loop thread changes the run's gate (``SimplexGate.adopt``,
``trip`` for a missed deadline).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
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


@dataclass(frozen=True)
class GateState:
    """Who is in control, and how many consecutive verified controller plans in FALLBACK."""

    reverify_cycles: int = 3
    mode: Mode = Mode.CONTROLLER
    streak: int = 0


class SimplexGate:
    """The gate's state and its switches so far; one thread owns it."""

    def __init__(self, reverify_cycles: int = 3, state: GateState | None = None) -> None:
        if reverify_cycles < 1:
            raise ValueError(f"reverify_cycles must be at least 1, got {reverify_cycles}")
        self.state = state if state is not None else GateState(reverify_cycles)
        self.switches: list[Switch] = []

    @classmethod
    def scratch(cls, state: GateState) -> SimplexGate:
        """A private gate starting at ``state``, to plan one cycle against."""
        return cls(state.reverify_cycles, state)

    @property
    def mode(self) -> Mode:
        return self.state.mode

    @property
    def streak(self) -> int:
        return self.state.streak

    @property
    def reverify_cycles(self) -> int:
        return self.state.reverify_cycles

    def trip(self, t: float, reason: str) -> Switch | None:
        """Hand control to the fallback (or keep it there, restarting the count)."""
        was = self.state.mode
        self.state = replace(self.state, mode=Mode.FALLBACK, streak=0)
        if was is Mode.FALLBACK:
            return None
        return self._switch(t, Mode.CONTROLLER, Mode.FALLBACK, reason)

    def controller_verified(self, t: float) -> Switch | None:
        """The controller's plan was approved this cycle; returns the switch back, if due."""
        s = self.state
        if s.mode is Mode.CONTROLLER:
            return None
        if s.streak + 1 < s.reverify_cycles:
            self.state = replace(s, streak=s.streak + 1)
            return None
        self.state = replace(s, mode=Mode.CONTROLLER, streak=0)
        return self._switch(
            t,
            Mode.FALLBACK,
            Mode.CONTROLLER,
            f"controller plan verified on {s.reverify_cycles} consecutive cycles",
        )

    def controller_unverified(self) -> None:
        """The controller's plan was not approved (or not tried) this cycle."""
        self.state = replace(self.state, streak=0)

    def adopt(self, state: GateState, switches: tuple[Switch, ...]) -> None:
        """Take the state a cycle was planned to, with the switches that led there."""
        self.state = state
        self.switches.extend(switches)

    def _switch(self, t: float, frm: Mode, to: Mode, reason: str) -> Switch:
        s = Switch(t, frm, to, reason)
        self.switches.append(s)
        return s
