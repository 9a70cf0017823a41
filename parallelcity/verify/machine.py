"""The rig state machine: the one place that decides what a rig may do next.

A rig *driver* (``parallelcity.verify.rig.RigDriver``: simulated, FMU, OPC UA bench)
knows how to reset, apply inputs, advance and read.  ``RigMachine`` wraps a
driver and owns the order of those calls, the same for every driver::

                arm(x0, t0, sample)            apply(u, d)
      ┌──────┐ ───────────────────► ┌───────┐ ───────────► ┌─────────┐ ◄─┐ apply, advance,
      │ IDLE │                      │ ARMED │              │ RUNNING │ ──┘ read
      └──────┘ ◄──── finish() ───── └───────┘              └─────────┘
        ▲   ▲ ◄───────────────────── finish() ─────────────────┘  │
        │   │                                                      │ the driver raised
        │   └─ recover() ── ┌─────────┐ ◄──────────────────────────┘ (in any state)
        │                   │ FAULTED │  refuses everything but recover() and close()
        │                   └─────────┘
        close() from any state ends the machine (CLOSED)

* IDLE: nothing is set up; only ``arm`` is allowed.
* ARMED: the driver was reset to ``x0`` at ``t0`` on one uncertainty sample;
  ``read`` gives the initial outputs; ``advance`` is refused (no inputs yet).
* RUNNING: inputs are held; ``apply``, ``advance`` and ``read`` in any order.
* FAULTED: a driver call raised; the fault is kept in ``fault`` until ``recover``.

A call out of order raises ``RigError`` without touching the driver and
without faulting the rig (it is the caller's bug, not the rig's).  A driver
failure faults the rig and raises ``RigError`` with the driver's error as cause.

``rollout_sample`` runs one whole plan on one sample (arm, then apply/read/advance
per step, then finish) and is what the verifier calls; it recovers a faulted rig
first, because every rollout begins with a reset anyway.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from enum import StrEnum
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np

from parallelcity.errors import RigError
from parallelcity.twin.model import Array
from parallelcity.verify.rig import RigDriver

log = logging.getLogger(__name__)

T = TypeVar("T")


class RigState(StrEnum):
    IDLE = "idle"
    ARMED = "armed"
    RUNNING = "running"
    FAULTED = "faulted"
    CLOSED = "closed"


@runtime_checkable
class TraceDriver(Protocol):
    """A driver that can also produce a whole trace at once (a fast path, same numbers)."""

    def trace(self, inputs: Array, disturbances: Array, dt: float) -> Array: ...


class RigMachine:
    """A rig: a driver behind the state machine.

    Satisfies ``parallelcity.verify.rig.UncertainRig``."""

    def __init__(self, driver: RigDriver, *, use_trace: bool = True) -> None:
        self.driver = driver
        self.name = driver.name
        self.use_trace = use_trace
        self._state = RigState.IDLE
        self.fault: str = ""
        self.sample: int | None = None
        self._lock = threading.RLock()

    @property
    def state(self) -> RigState:
        return self._state

    @property
    def samples(self) -> int:
        return int(self.driver.samples)

    def _need(self, *allowed: RigState, what: str) -> None:
        if self._state not in allowed:
            extra = f" ({self.fault})" if self._state is RigState.FAULTED else ""
            raise RigError(
                f"rig {self.name}: cannot {what} while {self._state.value}{extra}; "
                f"allowed in {', '.join(s.value for s in allowed)}"
            )

    def _call(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        try:
            return fn(*args)
        except Exception as exc:
            self._state = RigState.FAULTED
            self.fault = f"{what} failed: {type(exc).__name__}: {exc}"
            log.warning("rig %s faulted: %s", self.name, self.fault)
            raise RigError(f"rig {self.name}: {self.fault}") from exc

    def arm(self, x0: Array, t0: float, sample: int = 0) -> None:
        with self._lock:
            self._need(RigState.IDLE, what="arm")
            if not 0 <= sample < self.samples:
                raise RigError(f"rig {self.name}: no sample {sample} (has {self.samples})")
            self._call("reset", self.driver.reset, np.asarray(x0, dtype=float), t0, sample)
            self._state, self.sample = RigState.ARMED, sample

    def apply(self, u: Array, d: Array) -> None:
        with self._lock:
            self._need(RigState.ARMED, RigState.RUNNING, what="apply inputs")
            self._call(
                "apply", self.driver.apply, np.asarray(u, dtype=float), np.asarray(d, dtype=float)
            )
            self._state = RigState.RUNNING

    def advance(self, dt: float) -> None:
        with self._lock:
            self._need(RigState.RUNNING, what="advance")
            if not dt > 0:
                raise RigError(f"rig {self.name}: advance needs dt > 0, got {dt}")
            self._call("advance", self.driver.advance, float(dt))

    def read(self) -> Array:
        with self._lock:
            self._need(RigState.ARMED, RigState.RUNNING, what="read")
            return np.asarray(self._call("read", self.driver.read), dtype=float)

    def finish(self) -> None:
        with self._lock:
            self._need(RigState.ARMED, RigState.RUNNING, what="finish")
            self._state, self.sample = RigState.IDLE, None

    def recover(self) -> None:
        with self._lock:
            self._need(RigState.FAULTED, what="recover")
            log.info("rig %s recovered from: %s", self.name, self.fault)
            self._state, self.fault, self.sample = RigState.IDLE, "", None

    def close(self) -> None:
        with self._lock:
            if self._state is not RigState.CLOSED:
                self._state = RigState.CLOSED
                self.driver.close()

    def rollout_sample(
        self, sample: int, x0: Array, inputs: Array, disturbances: Array, t0: float, dt: float
    ) -> Array:
        """Outputs (n + 1, ny) of the plan ``inputs`` (n, nu) on one sample; y[k] under u[k]."""
        u = np.atleast_2d(np.asarray(inputs, dtype=float))
        d = np.atleast_2d(np.asarray(disturbances, dtype=float))
        if d.shape[0] < u.shape[0]:
            raise RigError(f"rig {self.name}: need {u.shape[0]} disturbance rows, got {d.shape[0]}")
        with self._lock:
            if self._state is RigState.FAULTED:
                self.recover()
            self.arm(x0, t0, sample)
            try:
                if self.use_trace and isinstance(self.driver, TraceDriver):
                    self._state = RigState.RUNNING
                    ys = np.asarray(
                        self._call("trace", self.driver.trace, u, d[: u.shape[0]], dt), dtype=float
                    )
                else:
                    rows = []
                    for k in range(u.shape[0]):
                        self.apply(u[k], d[k])
                        rows.append(self.read())
                        self.advance(dt)
                    rows.append(self.read())
                    ys = np.vstack(rows)
            finally:
                if self._state in (RigState.ARMED, RigState.RUNNING):
                    self.finish()
        return ys

    def rollout(self, x0: Array, inputs: Array, disturbances: Array, t0: float, dt: float) -> Array:
        """Sample 0: the rig's own draw."""
        return self.rollout_sample(0, x0, inputs, disturbances, t0, dt)
