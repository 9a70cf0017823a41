"""Weekly schedules: "weekdays 07:00-19:00" style periods, evaluated in UTC.

Used for comfort bands and occupancy gains.  A period whose end is before its
start wraps over midnight (23:00-06:00).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from .model import Array

Days = Literal["all", "weekdays", "weekends"]
_HHMM = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$|^24:00$")


def _minutes(hhmm: str) -> int:
    h, m = hhmm.split(":")
    return int(h) * 60 + int(m)


class Period(BaseModel):
    """One recurring time window, e.g. ``{days = "weekdays", start = "07:00", end = "19:00"}``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    days: Days = "all"
    start: str
    end: str

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
        when = dt.datetime.fromtimestamp(t, dt.UTC)
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


def sample_times(t0: float, n: int, dt_s: float) -> Array:
    return t0 + dt_s * np.arange(n, dtype=float)
