"""The pure detector: its threshold keeps the false-alarm target, and it finds a shift."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from parallelcity.diagnose.detect import (
    FROZEN_MIN_CYCLES,
    WEEK_S,
    CusumDetector,
    DetectorSettings,
    FrozenDetector,
    alarm_rate,
    threshold,
)

DT = 900.0


def test_the_threshold_is_the_smallest_meeting_the_rate() -> None:
    for k, n, rate in ((1.0, 16, 1e-4), (0.5, 32, 1e-5), (2.0, 4, 1e-3)):
        h = threshold(k, n, rate)
        assert alarm_rate(h, k, n) <= rate
        assert alarm_rate(0.95 * h, k, n) > rate


@settings(max_examples=8, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    channels=st.integers(1, 6),
    per_week=st.sampled_from([0.5, 1.0, 4.0]),
    offset=st.floats(-5.0, 5.0),
)
def test_fault_free_residuals_stay_within_the_false_alarm_target(
    seed: int, channels: int, per_week: float, offset: float
) -> None:
    """Residuals exactly as declared (Gaussian, the declared sigma, any constant model
    mismatch) over 20 simulated weeks: the alarms stay within the target, Poisson margin
    included.  A threshold that forgot the channels, both sides or the learnt baseline's
    own error raises 2.5 to 25 times as many."""
    weeks = 20
    sigma = {f"y{i}": 0.1 * (i + 1) for i in range(channels)}
    det = CusumDetector(DetectorSettings(sigma, DT, per_week))
    rng = np.random.default_rng(seed)
    n = int(weeks * WEEK_S / DT)
    scale = np.array(list(sigma.values()))
    noise = rng.normal(size=(n, channels)) * scale + offset * scale
    alarms = 0
    for k in range(n):
        if det.update(k, dict(zip(sigma, noise[k], strict=True))) is not None:
            alarms += 1
            det.reset()  # as the diagnoser does once a detection is dealt with
    expected = per_week * weeks
    assert alarms <= expected + 3 * math.sqrt(expected) + 2


@settings(max_examples=30, deadline=None)
@given(
    warm=st.lists(st.floats(-1.0, 1.0), min_size=16, max_size=16),
    later=st.lists(st.floats(-1.0, 1.0), min_size=1, max_size=300),
)
def test_residuals_within_the_allowance_never_alarm(warm: list[float], later: list[float]) -> None:
    """With a fixed baseline, residuals within k sigmas of it never move the statistics."""
    s = DetectorSettings({"y": 0.2}, DT, 1.0, k=1.0, warmup=16, baseline_cycles=0)
    det = CusumDetector(s)
    for k, r in enumerate(warm):
        assert det.update(k, {"y": 0.2 * r}) is None
    base = float(np.mean([0.2 * r for r in warm]))
    assert math.isclose(det.baseline()["y"], base, abs_tol=1e-12)
    for k, u in enumerate(later, start=len(warm)):
        assert det.update(k, {"y": base + 0.2 * u * s.k}) is None


@settings(max_examples=40, deadline=None)
@given(shift=st.floats(1.5, 20.0), at=st.integers(0, 50), sign=st.sampled_from([1, -1]))
def test_a_shift_is_detected_within_its_bound_and_dated(shift: float, at: int, sign: int) -> None:
    """A step of ``shift`` sigmas is found after at most ceil(h / (shift - k)) cycles, on the
    right side, with the change dated to its first cycle."""
    s = DetectorSettings({"a": 1.0, "b": 0.5}, DT, 1.0, k=1.0, warmup=16)
    det = CusumDetector(s)
    for k in range(16 + at):
        assert det.update(k, {"a": 0.0, "b": 0.0}) is None
    first = 16 + at
    bound = math.ceil(det.h / (shift - s.k))
    for k in range(first, first + bound + 1):
        found = det.update(k, {"a": 0.0, "b": sign * shift * 0.5})
        if found is not None:
            break
    assert found is not None and found.k - first + 1 <= bound
    assert (found.channel, found.direction, found.start_k) == ("b", sign, first)


def test_one_outlier_does_not_alarm_a_clipped_cusum_but_a_shift_does() -> None:
    s = DetectorSettings({"q": 1.0}, 3600.0, 0.5, warmup=16, clip=3.5)
    det = CusumDetector(s)
    assert det.h > s.clip - s.k  # one outlier alone stays below
    for k in range(16):
        assert det.update(k, {"q": 0.0}) is None
    assert det.update(16, {"q": 500.0}) is None  # a cycle of a regime the twin misses
    assert det.update(17, {"q": -300.0}) is None
    found = None
    for k in range(18, 18 + 20):
        found = found or det.update(k, {"q": 2.5})
    assert found is not None and found.direction == 1


def _frozen_run(expected: list[float], reading: float, resolution: float = 0.0) -> int | None:
    det = FrozenDetector({"x": 0.1}, {"x": resolution})
    for k, e in enumerate(expected):
        found = det.update(k, {"x": reading}, {"x": e})
        if found is not None:
            assert found.channel == "x" and found.start_k == 0
            return k
    return None


def test_a_frozen_reading_is_detected_while_the_twin_expects_it_to_move() -> None:
    # the twin expects the level to rise 0.15 (1.5 sigma) per cycle: a CUSUM with k = 1
    # needs far longer; repeats bit for bit are judged after FROZEN_MIN_CYCLES
    rising = [5.0 + 0.15 * i for i in range(12)]
    k = _frozen_run(rising, 5.0)
    assert k is not None and FROZEN_MIN_CYCLES <= k <= 6
    # an idle pump's flow reads exactly 0 and the twin expects 0: not frozen
    assert _frozen_run([0.0] * 20, 0.0) is None
    # expected within noise of the repeated value: not frozen
    assert _frozen_run([5.0 + 0.02 * (-1) ** i for i in range(20)], 5.0) is None
    # a register of 0.5 m resolution may repeat while the value moves 0.15 per cycle
    assert _frozen_run(rising[:6], 5.0, resolution=0.5) is None
    # a reading that changes starts a new run
    det = FrozenDetector({"x": 0.1}, {})
    for k in range(10):
        assert det.update(k, {"x": 5.0 + 1e-9 * k}, {"x": 5.0 + 0.5 * k}) is None


def test_a_partial_reset_relearns_one_channel_and_keeps_the_others_baselines() -> None:
    det = CusumDetector(DetectorSettings({"a": 1.0, "b": 1.0}, DT, 1.0, warmup=4))
    for k in range(4):
        det.update(k, {"a": 2.0, "b": 3.0})
    det.update(4, {"a": 9.0, "b": 9.0})
    det.reset(["a"])
    assert det.channels["a"].n == 0 and det.channels["b"].n == 4
    assert det.baseline()["b"] == 3.0
    assert det.channels["b"].g_up == det.channels["b"].g_down == 0.0
