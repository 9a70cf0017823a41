"""Which readings of the field the mirror believes, point by point.  Pure: time is passed in.

A reading is refused, and its point is stale until a later reading is accepted, when:

* its source time is more than ``max_clock_skew_s`` ahead of the clock (a timestamp
  from the future would otherwise count as fresh and hide every later reading);
* its status is good but its value is not of the declared type (``float``: a Float
  or Double; ``int``: an integer type; ``bool``: a Boolean, read as 0 or 1), not
  finite, or outside the declared plausible range ``[min, max]``.

Order is judged per point: a reading older than the point's latest is dropped (the
latest value is kept), unless ``CLOCK_STEP_CONFIRM`` consecutive older readings
arrive with strictly increasing source times: then the source clock has stepped
back, the newest of them is accepted as the new timebase and that is journaled.
The same holds for a point held from before a connection gap: it is current again
once a reading newer than its last one before the gap arrives, or after
``CLOCK_STEP_CONFIRM`` advancing readings on a new timebase.

Refusals and timebase changes become ``PointEvent``s: one per run of refusals
(a stuck bad value makes one event, not one per sample), and per point at most
``EVENT_BURST`` at once, then one per ``EVENT_INTERVAL_S`` of clock time (plus the
"accepted" that ends a journaled refusal); the events left out are counted in the
next one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from parallelcity.field.snapshot import Reading

PointType = Literal["float", "int", "bool"]
EventKind = Literal["refused", "accepted", "clock_step"]
DEFAULT_MAX_CLOCK_SKEW_S = 5.0  # clock seconds a source time may lie ahead of the mirror's
CLOCK_STEP_CONFIRM = 3  # advancing readings older than the latest: accept the new timebase
EVENT_BURST = 8  # events one point may make at once ...
EVENT_INTERVAL_S = 60.0  # ... and then one per this many clock seconds


@dataclass(frozen=True)
class PointRule:
    """What a plausible reading of one point looks like."""

    type: PointType = "float"
    min: float | None = None
    max: float | None = None
    max_clock_skew_s: float = DEFAULT_MAX_CLOCK_SKEW_S


@dataclass(frozen=True)
class PointEvent:
    kind: EventKind
    point: str
    t: float  # clock time
    detail: str


def value_problem(rule: PointRule, raw: object) -> str:
    """Why ``raw`` (as decoded by asyncua) is not a plausible value of the point, or ''."""
    if rule.type == "bool":
        ok = isinstance(raw, bool)
    elif rule.type == "int":
        ok = isinstance(raw, int) and not isinstance(raw, bool)
    else:
        ok = isinstance(raw, float)
    if not ok:
        return f"value {_show(raw)} of type {type(raw).__name__} where {rule.type} is declared"
    assert isinstance(raw, int | float)
    if isinstance(raw, float) and not math.isfinite(raw):
        return f"value {raw!r} is not finite"
    if rule.min is not None and raw < rule.min:
        return f"value {_show(raw)} is below the plausible min {rule.min:g}"
    if rule.max is not None and raw > rule.max:
        return f"value {_show(raw)} is above the plausible max {rule.max:g}"
    return ""


def _show(raw: object) -> str:
    text = repr(raw)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass
class _Limiter:
    tokens: float = EVENT_BURST
    last: float = -math.inf
    suppressed: int = 0
    open: bool = False  # a journaled refusal awaits its "accepted"


@dataclass
class PointTable:
    """The latest believed reading per point, with refusals, gap holds and timebase steps."""

    rules: Mapping[str, PointRule]
    confirm: int = CLOCK_STEP_CONFIRM
    event_interval_s: float = EVENT_INTERVAL_S
    event_burst: int = EVENT_BURST
    readings: dict[str, Reading] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)  # point -> why its latest was refused
    out_of_order: int = 0
    refusals: int = 0
    _current: set[str] = field(default_factory=set)  # points with a reading since the last gap
    _before_gap: dict[str, float] = field(default_factory=dict)  # point -> source time
    _steps: dict[str, list[float]] = field(default_factory=dict)  # older, advancing source times
    _refusing: dict[str, str] = field(default_factory=dict)  # point -> "clock" or "value"
    _limits: dict[str, _Limiter] = field(default_factory=dict)
    _events: list[PointEvent] = field(default_factory=list)

    def offer(self, name: str, raw: object, source: float, status: int, now: float) -> bool:
        """Judge one reading; True if it became the point's latest."""
        rule = self.rules[name]
        if source > now + rule.max_clock_skew_s:
            why = (
                f"source time {source - now:.3g} s ahead of the clock "
                f"(max_clock_skew_s {rule.max_clock_skew_s:g})"
            )
            self._refuse(name, "clock", why, now)
            return False
        why = value_problem(rule, raw) if (status >> 30) == 0 else ""
        if why:
            self._refuse(name, "value", why, now)
            return False
        latest = self.readings.get(name)
        newest = self._before_gap.get(name)
        if newest is None and latest is not None:
            newest = latest.source_time
        if newest is not None and (
            source < newest or (name in self._before_gap and source == newest)
        ):
            steps = self._steps.setdefault(name, [])
            if steps and source <= steps[-1]:
                steps.clear()
            steps.append(source)
            if len(steps) < self.confirm:
                self.out_of_order += 1
                return False
            self._emit(
                "clock_step",
                name,
                now,
                f"source clock stepped back {newest - source:.3g} s; new timebase accepted "
                f"after {len(steps)} advancing readings",
            )
        self._accept(name, _number(raw, status), source, status, now)
        return True

    def hold(self) -> None:
        """A connection gap began: every current reading is held from before it."""
        for name in self._current:
            self._before_gap[name] = self.readings[name].source_time
        self._current.clear()
        self._steps.clear()

    def held(self) -> set[str]:
        """Points whose reading is from before the last gap."""
        return set(self.readings) - self._current

    def take_events(self) -> list[PointEvent]:
        events, self._events = self._events, []
        return events

    def _accept(self, name: str, value: float, source: float, status: int, now: float) -> None:
        self.readings[name] = Reading(value, source, status)
        self._current.add(name)
        self._before_gap.pop(name, None)
        self._steps.pop(name, None)
        why = self.refused.pop(name, None)
        self._refusing.pop(name, None)
        limit = self._limits.get(name)
        if why is not None and limit is not None and limit.open:
            limit.open = False  # the refusal was journaled, so is its end: no limit here
            self._events.append(
                PointEvent("accepted", name, now, f"{name}: a plausible reading again ({why})")
            )

    def _refuse(self, name: str, kind: str, why: str, now: float) -> None:
        """The point is stale until a reading is accepted; one event per run of refusals."""
        self.refusals += 1
        if self._refusing.get(name) != kind:
            opened = self._emit("refused", name, now, why)
            self._limits[name].open = opened
        self._refusing[name] = kind
        self.refused[name] = why

    def _emit(self, kind: EventKind, name: str, now: float, detail: str) -> bool:
        """Record an event unless this point had one within ``event_interval_s``."""
        limit = self._limits.setdefault(name, _Limiter(float(self.event_burst)))
        if limit.last > -math.inf:
            refill = (now - limit.last) / self.event_interval_s
            limit.tokens = min(float(self.event_burst), limit.tokens + max(0.0, refill))
        limit.last = now
        if limit.tokens < 1.0:
            limit.suppressed += 1
            return False
        limit.tokens -= 1.0
        if limit.suppressed:
            detail += f" ({limit.suppressed} earlier event(s) of this point not journaled)"
            limit.suppressed = 0
        self._events.append(PointEvent(kind, name, now, f"{name}: {detail}"))
        return True


def _number(raw: object, status: int) -> float:
    if isinstance(raw, bool | int | float) and (status >> 30) == 0:
        return float(raw)
    return math.nan
