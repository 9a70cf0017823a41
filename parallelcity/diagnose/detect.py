"""Change detection on residual channels: a two-sided CUSUM per channel.

Each channel's residual is normalised by its declared noise ``sigma`` around a baseline
(the model mismatch a fault-free field shows: learnt over the first ``warmup`` cycles,
then followed by an exponential average while the channel shows no change).  The
threshold ``h`` comes from the false-alarm target: with ``2 * channels`` one-sided tests,
each must have an average run length of ``2 * channels * cycles_per_week / rate`` cycles
under the declared noise, by Siegmund's approximation
``ARL0 = (exp(2 k b) - 2 k b - 1) / (2 k^2)`` with ``b = h + 1.166``.

Pure: no clock; cycles are counted by the caller's ``k``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

WEEK_S = 7 * 86400.0
SIEGMUND_CORRECTION = 1.166  # ARL of a CUSUM with Gaussian increments: b = h + 1.166


def arl0(h: float, k: float) -> float:
    """Siegmund's average run length of a one-sided CUSUM (drift allowance ``k`` in
    noise standard deviations, threshold ``h``) on fault-free unit-variance residuals."""
    b = 2.0 * k * (h + SIEGMUND_CORRECTION)
    return (math.exp(b) - b - 1.0) / (2.0 * k * k)


def threshold(k: float, arl: float) -> float:
    """The smallest ``h`` whose ``arl0`` reaches ``arl`` (bisection)."""
    lo, hi = 0.0, 1.0
    while arl0(hi, k) < arl:
        hi *= 2.0
        if hi > 1e4:
            raise ValueError(f"no CUSUM threshold reaches an average run length of {arl:g}")
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if arl0(mid, k) < arl else (lo, mid)
    return hi


@dataclass(frozen=True)
class DetectorSettings:
    sigma: Mapping[str, float]  # channel -> residual noise standard deviation (fault-free)
    dt: float  # cycle period, simulated seconds
    false_alarms_per_week: float = 1.0
    k: float = 0.5  # drift allowance, in sigmas: shifts below 2 k sigmas are ignored
    warmup: int = 8  # cycles learning each channel's baseline before detecting
    baseline_cycles: float = 96.0  # time constant of the baseline's average; 0: fixed

    def __post_init__(self) -> None:
        if not self.sigma:
            raise ValueError("diagnosis needs at least one residual channel with its noise")
        for name, s in self.sigma.items():
            if not (math.isfinite(s) and s > 0):
                raise ValueError(f"noise of {name!r} must be positive, got {s}")
        if not (self.false_alarms_per_week > 0 and self.dt > 0 and self.k > 0):
            raise ValueError("false_alarms_per_week, dt and k must be positive")
        if self.warmup < 1 or self.baseline_cycles < 0:
            raise ValueError("warmup must be at least 1 and baseline_cycles at least 0")

    @property
    def arl(self) -> float:
        """Average run length each one-sided test needs, in cycles."""
        tests = 2 * len(self.sigma)
        return tests * (WEEK_S / self.dt) / self.false_alarms_per_week

    @property
    def h(self) -> float:
        return threshold(self.k, self.arl)


@dataclass(frozen=True)
class Detection:
    """A channel's CUSUM crossed its threshold at cycle ``k``."""

    k: int
    channel: str
    direction: int  # +1: the field reads above the twin, -1 below
    start_k: int  # the change's estimated first cycle (after the statistic last left zero)
    statistic: float


@dataclass
class _Channel:
    n: int = 0
    baseline: float = 0.0
    g_up: float = 0.0
    g_down: float = 0.0
    zero_up: int = 0  # last cycle each statistic was zero
    zero_down: int = 0


class CusumDetector:
    """Two-sided CUSUM per channel around a learnt baseline (state in ``channels``)."""

    def __init__(self, settings: DetectorSettings) -> None:
        self.settings = settings
        self.h = settings.h
        self.channels = {name: _Channel() for name in settings.sigma}

    def reset(self) -> None:
        """Forget everything: learn the baselines again (after an alarm, the fault is the
        new normal; only a further change is news)."""
        self.channels = {name: _Channel() for name in self.settings.sigma}

    def baseline(self) -> dict[str, float]:
        return {n: c.baseline for n, c in self.channels.items()}

    def update(self, k: int, residuals: Mapping[str, float]) -> Detection | None:
        """Add cycle ``k``'s residuals (channels without one are left as they are); the
        strongest crossing, if any channel crossed."""
        s = self.settings
        found: Detection | None = None
        for name, r in residuals.items():
            c = self.channels.get(name)
            if c is None or not math.isfinite(r):
                continue
            if c.n < s.warmup:
                c.n += 1
                c.baseline += (r - c.baseline) / c.n
                c.zero_up = c.zero_down = k
                continue
            z = (r - c.baseline) / s.sigma[name]
            c.g_up = max(0.0, c.g_up + z - s.k)
            c.g_down = max(0.0, c.g_down - z - s.k)
            if c.g_up == 0.0:
                c.zero_up = k
            if c.g_down == 0.0:
                c.zero_down = k
            if c.g_up == 0.0 and c.g_down == 0.0 and s.baseline_cycles > 0:
                c.baseline += (r - c.baseline) / s.baseline_cycles
            for g, direction, zero in ((c.g_up, 1, c.zero_up), (c.g_down, -1, c.zero_down)):
                if g > self.h and (found is None or g / self.h > found.statistic / self.h):
                    found = Detection(k, name, direction, zero + 1, g)
        return found
