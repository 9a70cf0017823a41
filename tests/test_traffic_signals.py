"""The field-side signal controller (pure): whatever is written to it, the signal shows only
its program's own phases, keeps every minimum green and every intergreen, changes a plan only
at a cycle boundary and keeps the cycle within its limits; a gap-out (coordinated-actuated)
never shortens a green below its minimum nor moves a cycle's start, length or end."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from parallelcity.models.traffic.network import Junction, SignalPhase
from parallelcity.models.traffic.signal_controller import SignalController

MAX_CYCLE = 120.0


def _junction(three: bool = False) -> Junction:
    g = SignalPhase
    phases = [
        g("GGgrrr" if not three else "GGgrrrrrr", 40, 7, math.inf),
        g("yyyrrr" if not three else "yyyrrrrrr", 3, 0, math.inf),
        g("rrrrrr" if not three else "rrrrrrrrr", 2, 0, math.inf),
        g("rrrGGg" if not three else "rrrGGgrrr", 30, 0, math.inf),
        g("rrryyy" if not three else "rrryyyrrr", 4, 0, math.inf),
    ]
    if three:
        phases += [g("rrrrrrGGG", 15, 6, math.inf), g("rrrrrryyy", 3, 0, math.inf)]
    green = (0, 3, 5) if three else (0, 3)
    return Junction("J", "0", 0.0, tuple(phases), green, approaches=())


def test_own_program_without_a_plan() -> None:
    c = SignalController(_junction(), MAX_CYCLE)
    cyc = c.start(0.0)
    assert cyc.own and cyc.durations_s == (40, 3, 2, 30, 4)


def test_plan_applies_only_at_the_next_boundary_and_reaches_its_offset() -> None:
    c = SignalController(_junction(), MAX_CYCLE)
    first = c.start(0.0)
    c.write([0.6], 90.0, 30.0)
    assert c.current == first  # the running cycle is untouched
    starts = []
    for _ in range(8):
        cyc = c.next_cycle()
        starts.append(cyc.start_s)
        assert not cyc.own
    # shortened or lengthened by at most 20 % a cycle, then aligned on offset 30 s
    assert all(math.isclose((s - 30.0) % 90.0, 0.0) for s in starts[-3:])
    assert c.current.durations_s[1:3] == (3, 2) and c.current.durations_s[4] == 4
    assert c.current.length_s == 90
    assert c.current.durations_s[0] == pytest.approx(0.6 * (90 - 9), abs=1)


def test_garbage_and_watchdog_revert_run_the_own_program() -> None:
    c = SignalController(_junction(), MAX_CYCLE)
    c.start(0.0)
    c.write([0.6], 90.0, 0.0)
    assert not c.next_cycle().own
    c.write([float("nan")], 90.0, 0.0)
    assert c.next_cycle().own
    c.write([0.6], 90.0, 0.0)
    c.next_cycle()
    c.write(list(c.own_plan.splits), c.own_plan.cycle_s, c.own_plan.offset_s)  # the safe values
    assert c.next_cycle().own


def test_actuated_program_is_handed_back() -> None:
    c = SignalController(_junction(), MAX_CYCLE, actuated=True)
    assert c.start(0.0).actuated
    c.write([0.5], 80.0, 0.0)
    cyc = c.restart_at(77.0)
    assert not cyc.actuated and cyc.start_s == 77.0


def test_gap_out_gives_the_time_to_the_coordinated_phase_and_keeps_the_cycle() -> None:
    c = SignalController(_junction(), MAX_CYCLE, gap_out_s=3.0)
    c.start(0.0)
    assert c.current is not None and c.current.coordinated is None  # the own program
    c.write([0.6], 90.0, 0.0)
    cyc = c.next_cycle()  # 90 s from 84 s: realigns, then a plan cycle of 90 s
    while cyc.length_s != 90.0:
        cyc = c.next_cycle()
    assert cyc.coordinated == 0 and cyc.durations_s == (49, 3, 2, 32, 4)
    start3 = cyc.start_s + 54
    assert c.gap_out(start3 + 4.0) is None  # before its minimum green (5 s)
    gapped = c.gap_out(start3 + 12.0)
    assert gapped is not None and gapped.durations_s == (49, 3, 2, 12, 4)
    assert gapped.tail_s == 20 and gapped.length_s == 90 and gapped.end_s == cyc.end_s
    assert gapped.phase_at(12 + 54 + 4 + 1) == 0  # the tail shows the coordinated green
    assert c.gap_out(start3 + 15.0) is None  # that green is over
    assert c.gap_out(cyc.start_s + 20.0) is None  # the coordinated phase never gaps out
    assert c.next_cycle().start_s == cyc.end_s


values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-10, max_value=400),
)


class ControllerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.j = _junction(three=True)
        self.c = SignalController(self.j, MAX_CYCLE, gap_out_s=3.0)
        self.cycle = self.c.start(0.0)
        self.cycles = [self.cycle]

    @rule(s0=values, s1=values, cycle=values, offset=values)
    def write(self, s0: float, s1: float, cycle: float, offset: float) -> None:
        before = self.c.current
        self.c.write([s0, s1], cycle, offset)
        assert self.c.current == before  # only a boundary changes what runs

    @rule(
        s0=st.floats(0.05, 0.6),
        s1=st.floats(0.05, 0.6),
        cycle=st.floats(40, 130),
        offset=st.floats(0, 130),
    )
    def write_plausible(self, s0: float, s1: float, cycle: float, offset: float) -> None:
        self.write(s0, s1, cycle, offset)  # greens above their minimums: room to gap out

    @rule()
    def revert(self) -> None:
        self.c.revert()

    @rule()
    def boundary(self) -> None:
        nxt = self.c.next_cycle()
        assert nxt.start_s == self.cycle.end_s
        self.cycle = nxt

    @rule(at=st.floats(min_value=0.0, max_value=1.0), inside=st.booleans())
    def gap(self, at: float, inside: bool) -> None:
        before = self.cycle
        t = before.start_s + at * before.length_s
        windows = self.c.gap_window(before)
        if inside and windows:  # mostly where a gap-out may happen
            _, start, end = windows[int(at * len(windows)) % len(windows)]
            t = start + (at * len(windows) % 1.0) * (end - start)
        after = self.c.gap_out(t)
        if after is None:
            assert self.c.current == before
            return
        assert before.coordinated is not None and not before.own
        assert (after.start_s, after.length_s, after.end_s) == (
            before.start_s,
            before.length_s,
            before.end_s,
        )
        changed = [
            i
            for i, (a, b) in enumerate(zip(before.durations_s, after.durations_s, strict=True))
            if a != b
        ]
        ended = changed[0]
        assert ended != before.coordinated and ended in self.j.green
        assert before.start_s + sum(after.durations_s[: ended + 1]) == round(t)
        gained = (after.tail_s - before.tail_s) + sum(
            after.durations_s[i] - before.durations_s[i] for i in changed[1:]
        )
        assert changed[1:] in ([], [before.coordinated])
        assert gained == before.durations_s[ended] - after.durations_s[ended] > 0
        self.cycle = after

    @invariant()
    def safe(self) -> None:
        cyc = self.cycle
        d = cyc.durations_s
        assert len(d) == len(self.j.phases)
        for k, i in enumerate(self.j.green):
            assert d[i] >= self.j.min_greens_s[k] - 1e-9
            assert d[i] == round(d[i])
        for i, p in enumerate(self.j.phases):
            if i not in self.j.green:
                assert d[i] == p.duration_s
        assert self.c.min_cycle_s - 1e-9 <= cyc.length_s <= MAX_CYCLE + 1e-9
        assert cyc.tail_s == 0 or cyc.coordinated == 0  # the tail shows the coordinated green
        # shown in order, each state the program's: no conflicting green, every intergreen
        shown = [self.j.phases[i].state for i, x in enumerate(d) if x > 0]
        shown += [self.j.phases[0].state] * (cyc.tail_s > 0)
        assert shown == [p.state for p in self.j.phases] + [self.j.phases[0].state] * (
            cyc.tail_s > 0
        )


TestControllerMachine = ControllerMachine.TestCase
TestControllerMachine.settings = settings(
    max_examples=60,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
