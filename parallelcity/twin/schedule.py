"""Weekly schedules: "weekdays 07:00-19:00" style periods, in the scenario's local time.

Used for output bands and time-of-day disturbances (occupancy, tariffs).  A period
whose end is before its start wraps over midnight (23:00-06:00).  Times of day and
weekdays are those of the scenario's time zone (``[scenario] time_zone``, an IANA
name; UTC by default), daylight saving included: a period validated with the context
``{"time_zone": ZoneInfo(...)}`` keeps that zone, one built without a context is in UTC.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

Days = Literal["all", "weekdays", "weekends"]
TIME_ZONE = "time_zone"  # the validation context key of the zone periods are read in
_HHMM = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$|^24:00$")


def zone_of(name: str) -> ZoneInfo:
    """The IANA time zone ``name`` (``Europe/Berlin``, ``UTC``); ValueError if unknown."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:  # OSError: a name too long
        raise ValueError(
            f"unknown time zone {name!r}: expected an IANA name such as 'Europe/Berlin' or 'UTC'"
        ) from exc


def zone_context(name: Any) -> dict[str, dt.tzinfo]:
    """The validation context that reads periods in zone ``name`` (UTC if it is not one)."""
    try:
        return {TIME_ZONE: zone_of(name) if isinstance(name, str) else dt.UTC}
    except ValueError:
        return {TIME_ZONE: dt.UTC}  # the key's own validation reports it


def _minutes(hhmm: str) -> int:
    h, m = hhmm.split(":")
    return int(h) * 60 + int(m)


class Period(BaseModel):
    """One recurring time window, e.g. ``{days = "weekdays", start = "07:00", end = "19:00"}``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    days: Days = "all"
    start: str
    end: str
    _zone: dt.tzinfo = PrivateAttr(default=dt.UTC)

    @model_validator(mode="after")
    def _take_zone(self, info: ValidationInfo) -> Period:
        zone = (info.context or {}).get(TIME_ZONE)
        if isinstance(zone, dt.tzinfo):
            self._zone = zone
        return self

    @property
    def zone(self) -> dt.tzinfo:
        return self._zone

    def in_zone(self, zone: dt.tzinfo) -> Period:
        """This period read in ``zone``."""
        other = self.model_copy()
        other._zone = zone
        return other

    @field_validator("start", "end")
    @classmethod
    def _check_time(cls, v: str) -> str:
        if not _HHMM.match(v):
            raise ValueError(f"expected a time of day as 'HH:MM', got {v!r}")
        return v

    @model_validator(mode="after")
    def _not_empty(self) -> Period:
        start, end = _minutes(self.start), _minutes(self.end)
        if start % 1440 == end % 1440 and (start, end) != (0, 1440):
            raise ValueError(
                f"period {self.start}-{self.end} is empty (it ends when it starts); "
                'for a whole day write start = "00:00", end = "24:00"'
            )
        return self

    def contains(self, t: float) -> bool:
        when = dt.datetime.fromtimestamp(t, self._zone)
        minute = when.hour * 60 + when.minute + when.second / 60
        start, end = _minutes(self.start), _minutes(self.end)
        if start <= end:
            inside, day = start <= minute < end, when.weekday()
        else:  # wraps midnight: the early-morning part belongs to the previous day
            inside = minute >= start or minute < end
            day = when.weekday() if minute >= start else (when.weekday() - 1) % 7
        if not inside:
            return False
        if self.days == "weekdays":
            return day < 5
        if self.days == "weekends":
            return day >= 5
        return True


def active(periods: Sequence[Period], t: float) -> Period | None:
    """The first period containing ``t``, or None."""
    for p in periods:
        if p.contains(t):
            return p
    return None
