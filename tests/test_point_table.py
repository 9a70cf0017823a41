"""Pure: which readings the mirror believes (point_table) and how the snapshot shows refusals."""

from __future__ import annotations

import math

import pytest

from parallelcity.field.point_table import CLOCK_STEP_CONFIRM, PointRule, PointTable, value_problem
from parallelcity.field.snapshot import PointSpec, Reading, assess

NOW = 1_000_000.0
BAD = 0x80320000  # BadSensorFailure


def table(**rule: object) -> PointTable:
    return PointTable({"p": PointRule(**rule)})  # type: ignore[arg-type]


def snap(t: PointTable, now: float, max_age_s: float = 60.0) -> tuple[bool, str]:
    s = assess(
        {"p": PointSpec("p", max_age_s)},
        t.readings,
        now,
        held=dict.fromkeys(t.held(), "held"),
        refused=t.refused,
    )
    return s.points["p"].stale, s.points["p"].why


def test_a_reading_from_the_future_is_refused_and_does_not_freeze_the_point() -> None:
    t = table(max_clock_skew_s=5.0)
    assert t.offer("p", 70.0, NOW - 1, 0, NOW)
    assert not t.offer("p", 71.0, NOW + 3600, 0, NOW)  # an hour ahead
    stale, why = snap(t, NOW)
    assert stale and "ahead of the clock" in why and "max_clock_skew_s 5" in why
    assert t.readings["p"] == Reading(70.0, NOW - 1, 0)  # never replaced by the future one
    for k in range(6):  # every later genuine reading is taken
        assert t.offer("p", 72.0 + k, NOW + k, 0, NOW + k)
    assert snap(t, NOW + 5) == (False, "")
    assert t.readings["p"].value == 77.0
    kinds = [e.kind for e in t.take_events()]
    assert kinds == ["refused", "accepted"]


def test_within_the_skew_a_future_stamp_counts_as_age_zero() -> None:
    t = table(max_clock_skew_s=5.0)
    assert t.offer("p", 1.0, NOW + 4, 0, NOW)
    s = assess({"p": PointSpec("p", 60.0)}, t.readings, NOW)
    assert s.points["p"].age_s == 0.0 and not s.points["p"].stale


def test_a_source_clock_stepping_back_is_accepted_after_advancing_readings() -> None:
    t = table()
    assert t.offer("p", 1.0, NOW, 0, NOW)
    step = NOW - 30.0  # the PLC's clock is corrected 30 s back
    results = [t.offer("p", 2.0 + k, step + k + 1, 0, NOW + k + 1) for k in range(6)]
    assert results == [False] * (CLOCK_STEP_CONFIRM - 1) + [True] * (7 - CLOCK_STEP_CONFIRM)
    assert t.readings["p"].value == 7.0 and t.out_of_order == CLOCK_STEP_CONFIRM - 1
    events = t.take_events()
    assert [e.kind for e in events] == ["clock_step"]
    assert "stepped back" in events[0].detail and events[0].detail.startswith("p: ")


def test_a_stray_old_reading_is_dropped_and_does_not_start_a_new_timebase() -> None:
    t = table()
    t.offer("p", 1.0, NOW, 0, NOW)
    assert not t.offer("p", 9.0, NOW - 10, 0, NOW)
    assert t.offer("p", 2.0, NOW + 1, 0, NOW + 1)
    # old readings that do not advance never make a timebase
    for _ in range(5):
        assert not t.offer("p", 9.0, NOW - 10, 0, NOW + 2)
    assert t.readings["p"].value == 2.0 and t.take_events() == []


def test_after_a_gap_only_newer_or_a_confirmed_new_timebase_makes_a_point_current() -> None:
    t = table()
    t.offer("p", 1.0, NOW, 0, NOW)
    t.hold()
    assert t.held() == {"p"}
    for _ in range(5):  # re-sent copies of the value from before the gap
        assert not t.offer("p", 1.0, NOW, 0, NOW + 1)
    assert t.held() == {"p"}
    assert t.offer("p", 2.0, NOW + 0.5, 0, NOW + 1)
    assert t.held() == set()
    t.hold()
    # the server came back with its clock an hour behind: advancing readings recover it
    for k in range(CLOCK_STEP_CONFIRM):
        t.offer("p", 3.0, NOW - 3600 + k, 0, NOW + 2 + k)
    assert t.held() == set() and t.readings["p"].value == 3.0
    assert snap(t, NOW + 5)[0]  # ... and its readings are an hour old: stale by age


@pytest.mark.parametrize(
    ("rule", "raw", "problem"),
    [
        ({}, True, "of type bool where float is declared"),
        ({}, 4_600_000_000_000_000_000, "of type int where float is declared"),
        ({}, math.nan, "not finite"),
        ({}, math.inf, "not finite"),
        ({"max": 150.0}, 1e308, "above the plausible max 150"),
        ({"min": -40.0}, -41.0, "below the plausible min -40"),
        ({"type": "int", "max": 1000.0}, 4_600_000_000_000_000_000, "above the plausible max"),
        ({"type": "int"}, 1.5, "of type float where int is declared"),
        ({"type": "int"}, False, "of type bool where int is declared"),
        ({"type": "bool"}, 1, "of type int where bool is declared"),
        ({}, "70", "of type str where float is declared"),
        ({}, None, "of type NoneType where float is declared"),
    ],
)
def test_implausible_values_are_refused(rule: dict[str, object], raw: object, problem: str) -> None:
    assert problem in value_problem(PointRule(**rule), raw)  # type: ignore[arg-type]
    t = table(**rule)
    t.offer("p", 20.0 if rule.get("type", "float") == "float" else 1, NOW - 1, 0, NOW)
    assert not t.offer("p", raw, NOW, 0, NOW)
    stale, why = snap(t, NOW)
    assert stale and problem in why


@pytest.mark.parametrize(
    ("rule", "raw", "value"),
    [
        ({"min": 0.0, "max": 150.0}, 70.5, 70.5),
        ({"type": "int", "min": 0.0, "max": 10.0}, 7, 7.0),
        ({"type": "bool"}, True, 1.0),
        ({"type": "bool"}, False, 0.0),
    ],
)
def test_plausible_values_are_taken(rule: dict[str, object], raw: object, value: float) -> None:
    t = table(**rule)
    assert t.offer("p", raw, NOW, 0, NOW)
    assert t.readings["p"].value == value and snap(t, NOW) == (False, "")


def test_a_bad_status_is_not_judged_by_its_value_and_stays_stale_by_status() -> None:
    t = table(max=10.0)
    assert t.offer("p", None, NOW, BAD, NOW)
    stale, why = snap(t, NOW)
    assert stale and why.startswith("status bad") and t.refused == {}


def test_a_stuck_bad_value_makes_one_event_not_one_per_sample() -> None:
    t = table(max=100.0)
    t.offer("p", 50.0, NOW, 0, NOW)
    for k in range(1000):
        t.offer("p", 1e308, NOW + k, 0, NOW + k)
    assert t.refusals == 1000
    events = t.take_events()
    assert [e.kind for e in events] == ["refused"] and "1e+308" in events[0].detail
    # a flapping value: a burst of events, then one per interval, the rest counted
    for k in range(1000):
        t.offer("p", 50.0 if k % 2 else 1e308, NOW + 1000 + k * 0.1, 0, NOW + 1000 + k * 0.1)
    events = t.take_events()
    refused = [e for e in events if e.kind == "refused"]
    # 100 s of flapping (the bucket is full again): the burst, then one after 60 s
    assert len(refused) == t.event_burst + 1
    assert "not journaled" in refused[-1].detail
    assert len(events) == 1 + 2 * len(refused)  # each journaled refusal is closed
