"""Pump switching seen across cycles: what earlier cycles impose on this horizon.

The MILP plans periods ``0..n-1``; the on/off states applied in earlier periods (read
from ``u_prev`` cycle by cycle) decide whether a pump that started recently must keep
running (``min_up``), one that stopped must keep resting (``min_down``), and how many
starts already count against the hourly limit.  A state seen first, or after a gap in
the cycles, has an unknown past: it counts as having lasted long enough.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from parallelcity.twin.model import Array

LONG = 10**6  # periods: a run whose start is not known


@dataclass(frozen=True)
class Carry:
    """Per binary input: the state in the period that just ended (``prev``), and per
    horizon period the runs forced on or off and the starts already in its window."""

    prev: Array  # (nb,) 0 or 1
    must_on: Array  # (n, nb)
    must_off: Array  # (n, nb)
    past_starts: Array  # (n, nb) starts before the horizon within period k's window
    known: bool


def starts_window(dt: float) -> int:
    """Periods whose starts any hour can contain: ``ceil(3600 / dt)``."""
    return max(1, math.ceil(3600.0 / dt - 1e-9))


class SwitchHistory:
    """The states of the binary inputs in the periods before each cycle, oldest first."""

    def __init__(self, dt: float, keep: int) -> None:
        self.dt = dt
        self.keep = max(2, keep + 1)
        self._t0: float | None = None
        self._states: list[Array] = []

    def observe(self, t0: float, state: Array) -> bool:
        """Record ``state`` (nb,) as applied in the period ending at ``t0``; False (and
        the past forgotten) when it is unknown (NaN)."""
        state = np.asarray(state, dtype=float)
        if not np.all(np.isfinite(state)):
            self._t0, self._states = None, []
            return False
        on = (state > 0.5).astype(float)
        last = self._t0
        if last is not None and abs(t0 - last) < 1e-6 * self.dt:  # the same cycle again
            self._states[-1] = on
        elif last is not None and abs(t0 - last - self.dt) < 0.5 * self.dt:
            self._states = [*self._states, on][-self.keep :]
        else:
            self._states = [on]
        self._t0 = t0
        return True

    def forget(self) -> None:
        self._t0, self._states = None, []

    def carry(self, n: int, nb: int, min_up: int, min_down: int, window: int) -> Carry:
        """What the past imposes on the ``n`` periods of this horizon."""
        must_on, must_off = np.zeros((n, nb)), np.zeros((n, nb))
        past_starts = np.zeros((n, nb))
        if not self._states:
            return Carry(np.zeros(nb), must_on, must_off, past_starts, known=False)
        seen = np.array(self._states)  # (m, nb), last row: the period just ended
        m = seen.shape[0]
        for b in range(nb):
            s = seen[:, b]
            same = s == s[-1]
            run = m if bool(np.all(same)) else int(np.argmin(same[::-1]))
            run = LONG if run == m else run
            if s[-1] > 0.5 and run < min_up:
                must_on[: min_up - run, b] = 1.0
            if s[-1] < 0.5 and run < min_down:
                must_off[: min_down - run, b] = 1.0
            # a start in past period -j (j = 1: the last one) lies in the window of
            # horizon period k when j <= window - 1 - k
            for j in range(1, m):
                if s[-j] > 0.5 and s[-j - 1] < 0.5:
                    past_starts[: max(0, window - j), b] += 1.0
        return Carry(seen[-1].copy(), must_on, must_off, past_starts, known=True)
