"""Change detection on residual channels: a two-sided CUSUM per channel.

Each channel's residual is normalised by its declared noise ``sigma`` around a baseline
(the model mismatch a fault-free field shows: learnt over the first ``warmup`` cycles,
then followed by an exponential average while the channel shows no change).  The
threshold ``h`` comes from the false-alarm target shared by the channels: each one's
two-sided test may raise ``rate / channels`` false alarms per cycle under the declared
noise.  A one-sided test's average run length is Siegmund's approximation
``ARL = (exp(-2 mu b) + 2 mu b - 1) / (2 mu^2)``, ``b = h + 1.166``, for increments of
mean ``mu = -k`` (in sigmas); a baseline learnt from ``warmup`` residuals is itself off by
``N(0, 1 / warmup)``, which shifts ``mu`` and is averaged over (it costs far more than it
seems: a baseline a third of a sigma off can multiply the false alarms tenfold).
Residuals may be clipped to ``clip`` sigmas (a winsorised CUSUM): under the declared noise
that only lowers the false alarms, and a lone outlier adds at most ``clip - k``.

Pure: no clock; cycles are counted by the caller's ``k``.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np

WEEK_S = 7 * 86400.0
SIEGMUND_CORRECTION = 1.166  # ARL of a CUSUM with Gaussian increments: b = h + 1.166
HERMITE_NODES = 40


def arl(h: float, mu: float) -> float:
    """Siegmund's average run length of a one-sided CUSUM with threshold ``h`` whose
    increments have mean ``mu`` (negative while all is well) and unit variance."""
    b = h + SIEGMUND_CORRECTION
    if abs(mu) < 1e-9:
        return b * b
    return (math.exp(min(700.0, -2.0 * mu * b)) + 2.0 * mu * b - 1.0) / (2.0 * mu * mu)


def alarm_rate(h: float, k: float, learnt_from: int) -> float:
    """Expected false alarms per cycle of one two-sided test with allowance ``k`` whose
    baseline is the mean of ``learnt_from`` fault-free residuals, so off by a normal error
    of standard deviation ``1 / sqrt(learnt_from)`` (averaged by Gauss-Hermite quadrature)."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(HERMITE_NODES)
    e = nodes / math.sqrt(learnt_from)
    rates = [
        w * (1.0 / arl(h, -k + ei) + 1.0 / arl(h, -k - ei))
        for ei, w in zip(e, weights, strict=True)
    ]
    return float(sum(rates)) / math.sqrt(2.0 * math.pi)


@cache
def threshold(k: float, learnt_from: int, rate: float) -> float:
    """The smallest ``h`` whose ``alarm_rate`` is at most ``rate`` per cycle (bisection)."""
    lo, hi = 0.0, 1.0
    while alarm_rate(hi, k, learnt_from) > rate:
        hi *= 2.0
        if hi > 1e4:
            raise ValueError(f"no CUSUM threshold reaches {rate:g} false alarms per cycle")
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if alarm_rate(mid, k, learnt_from) > rate else (lo, mid)
    return hi


@dataclass(frozen=True)
class DetectorSettings:
    sigma: Mapping[str, float]  # channel -> residual noise standard deviation (fault-free)
    dt: float  # cycle period, simulated seconds
    false_alarms_per_week: float = 1.0
    k: float = 1.0  # drift allowance, in sigmas: shifts below 2 k sigmas are ignored
    warmup: int = 16  # cycles learning each channel's baseline before detecting
    baseline_cycles: float = 96.0  # time constant of the baseline's average; 0: fixed
    # a cycle's normalised residual counts at most this many sigmas (inf: as it is), so one
    # outlier (a regime the twin misses for a cycle) cannot raise an alarm on its own
    clip: float = math.inf

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
        if not self.clip > self.k:
            raise ValueError("clip must exceed the drift allowance k")

    @property
    def rate_per_test(self) -> float:
        """False alarms per cycle each channel's two-sided test may raise."""
        return self.false_alarms_per_week / (WEEK_S / self.dt) / len(self.sigma)

    @property
    def h(self) -> float:
        return threshold(self.k, self.warmup, self.rate_per_test)


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

    def reset(self, relearn: Collection[str] | None = None) -> None:
        """Learn the baselines of ``relearn`` (default: every channel) again and restart
        every statistic from zero (after an alarm the fault is the new normal, only a
        further change is news; after a dismissed change, the channel that crossed)."""
        for name in self.settings.sigma if relearn is None else relearn:
            self.channels[name] = _Channel()
        for c in self.channels.values():
            c.g_up = c.g_down = 0.0

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
            z = min(s.clip, max(-s.clip, (r - c.baseline) / s.sigma[name]))
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


FROZEN_SIGMAS = 3.5  # the twin's expected movement of a repeated reading, in sigma sqrt(n)
FROZEN_MIN_CYCLES = 3  # repeats (after the first reading of the value) before judging


def frozen_moved(departures: Sequence[float], sigma: float, resolution: float) -> bool:
    """Whether a reading repeated bit for bit is a frozen sensor: over its ``n`` repeats the
    twin expected it to depart from the repeated value (``departures``: its prediction
    minus the value, per cycle) by more than a live sensor's repeats
    allow: ``FROZEN_SIGMAS`` prediction errors of the sum, ``sigma sqrt(n)``, plus one
    ``resolution`` step per cycle (a register's scale hides smaller changes; 0 for a
    floating-point reading)."""
    n = len(departures)
    if n < FROZEN_MIN_CYCLES:
        return False
    return abs(math.fsum(departures)) > FROZEN_SIGMAS * sigma * math.sqrt(n) + n * resolution


@dataclass
class _Run:
    value: float
    departures: list[float]


class FrozenDetector:
    """A reading that does not change at all while the twin predicts it moves: per channel,
    the run of bit-for-bit repeats and the twin's departures from the repeated value."""

    def __init__(self, sigma: Mapping[str, float], resolution: Mapping[str, float]) -> None:
        self.sigma = dict(sigma)
        self.resolution = {n: float(resolution.get(n, 0.0)) for n in sigma}
        self.runs: dict[str, _Run] = {}

    def update(
        self, k: int, readings: Mapping[str, float], expected: Mapping[str, float]
    ) -> Detection | None:
        """Cycle ``k``'s readings and what the twin expected each to read (its prediction,
        no baseline: where the twin expects the very value, as an idle pump's 0 or a full
        tank's top, a live sensor may repeat it); a detection on the clearest frozen
        channel, if any."""
        found: Detection | None = None
        for name, sigma in self.sigma.items():
            v, e = readings.get(name), expected.get(name)
            if v is None or e is None or not (math.isfinite(v) and math.isfinite(e)):
                self.runs.pop(name, None)
                continue
            run = self.runs.get(name)
            if run is None or run.value != v:
                self.runs[name] = _Run(v, [])
                continue
            run.departures.append(e - v)
            if not frozen_moved(run.departures, sigma, self.resolution[name]):
                continue
            n = len(run.departures)
            total = math.fsum(run.departures)
            stat = abs(total) / (sigma * math.sqrt(n))
            if found is None or stat > found.statistic:
                found = Detection(k, name, -1 if total > 0 else 1, k - n, stat)
        return found
