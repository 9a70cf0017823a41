"""The mirror's picture of the field at one instant: value, source time and status per point.

Pure: freshness is judged against a time passed in, never read from a clock here.
A reading the mirror holds from before a connection gap is stale whatever its
age (``held``), and so is a point whose latest reading was refused as implausible
(``refused``, see ``point_table``); the snapshot also says whether the link was
up when it was taken.  A source time ahead of ``now`` (within the allowed clock
skew; beyond it the reading is refused) counts as age 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum


class Quality(StrEnum):
    GOOD = "good"
    UNCERTAIN = "uncertain"
    BAD = "bad"

    @classmethod
    def from_status_code(cls, code: int) -> Quality:
        """OPC UA severity lives in the top two bits: 00 good, 01 uncertain, 1x bad."""
        severity = (code >> 30) & 0b11
        if severity == 0:
            return cls.GOOD
        if severity == 1:
            return cls.UNCERTAIN
        return cls.BAD


@dataclass(frozen=True)
class Reading:
    value: float
    source_time: float  # when the field measured it (simulated epoch seconds)
    status_code: int = 0  # OPC UA severity bits (field.protocol.STATUS_*); protocol detail below

    @property
    def quality(self) -> Quality:
        return Quality.from_status_code(self.status_code)


@dataclass(frozen=True)
class PointSpec:
    name: str
    max_age_s: float
    required: bool = True
    deadband: float | None = None  # changes within it are not reported: age from last sign of life
    event_driven: bool = False  # changes only when written: age from last sign of life too


@dataclass(frozen=True)
class PointState:
    name: str
    reading: Reading | None
    age_s: float | None
    stale: bool
    why: str  # empty when fresh


@dataclass(frozen=True)
class Snapshot:
    taken_at: float
    points: Mapping[str, PointState]

    @property
    def stale_required(self) -> list[str]:
        return [p.name for p in self.points.values() if p.stale and self._required[p.name]]

    _required: Mapping[str, bool]
    link_up: bool = True  # the mirror had a live session and subscription
    gaps: int = 0  # connection gaps so far
    link_why: str = ""  # why the link is down (empty when up)

    def value(self, name: str) -> float:
        reading = self.points[name].reading
        if reading is None:
            raise KeyError(f"point {name!r} has no reading")
        return reading.value

    def values(self) -> dict[str, float | None]:
        return {n: (p.reading.value if p.reading else None) for n, p in self.points.items()}


def assess(
    specs: Mapping[str, PointSpec],
    readings: Mapping[str, Reading],
    now: float,
    *,
    held: Mapping[str, str] | None = None,
    refused: Mapping[str, str] | None = None,
    alive_at: float | None = None,
    link_up: bool = True,
    gaps: int = 0,
    link_why: str = "",
) -> Snapshot:
    """Mark each point fresh or stale at time ``now``.

    ``held`` maps points whose reading is from before a connection gap to why;
    they are stale; ``refused`` maps points whose latest reading was refused to why:
    they are stale too, with the last accepted reading shown.  ``alive_at`` is when the
    subscription last showed life: a point with a deadband, or an event-driven one, is as
    old as the later of its source time and that.
    """
    held = held or {}
    refused = refused or {}
    states: dict[str, PointState] = {}
    for name, spec in specs.items():
        r = readings.get(name)
        if r is None:
            why = link_why or (
                f"latest reading refused: {refused[name]}"
                if name in refused
                else "no value received"
            )
            states[name] = PointState(name, None, None, True, why)
            continue
        seen = r.source_time
        quiet = spec.deadband is not None or spec.event_driven
        if quiet and alive_at is not None and name not in held:
            seen = max(seen, alive_at)
        age = max(0.0, now - seen)
        if name in held:
            why = held[name] or "held from before a connection gap"
        elif name in refused:
            why = f"latest reading refused: {refused[name]}"
        elif r.status_code >> 30:  # not good (see Quality.from_status_code)
            why = f"status {r.quality.value} (0x{r.status_code:08X})"
        elif age > spec.max_age_s:
            why = f"age {age:.0f} s exceeds max_age_s {spec.max_age_s:g}"
        else:
            why = ""
        states[name] = PointState(name, r, age, bool(why), why)
    return Snapshot(now, states, {n: s.required for n, s in specs.items()}, link_up, gaps, link_why)
