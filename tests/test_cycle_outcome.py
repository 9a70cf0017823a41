"""The cycle's end in pure code: one outcome enum, ``finish_cycle``, a gate without a lock.

The solve thread plans against a copy of the gate; only the loop thread changes the
run's gate, so a solve that comes back busy, late or abandoned changes nothing.
"""

from __future__ import annotations

import numpy as np
import pytest

from parallelcity.decide.control import SolveStatus
from parallelcity.decide.cycle import Decision, Outcome, Unsolved, finish_cycle
from parallelcity.decide.gate import GateState, Mode, SimplexGate
from parallelcity.record.plot import cycle_events
from parallelcity.record.records import CycleRecord, count_cycle, new_counts

from .test_verify import Scripted, fresh_snapshot, logic_with

X = np.array([21.0, 21.5, 21.0, 70.0])
U = np.array([70.0, 0.3, 0.12, 0.2])


def never(_action: object) -> None:
    return None


def test_the_enum_keeps_the_journals_strings() -> None:
    assert [o.value for o in Outcome] == ["dispatch", "hold", "stale", "busy", "deadline"]
    assert {o for o in Outcome if o.sends_nothing_by_time} == {Outcome.BUSY, Outcome.DEADLINE}
    counts = new_counts()
    for stored in ("hold", "busy", "deadline", "stale", "dispatch"):  # as an old journal has
        count_cycle(counts, stored, "")
    assert (counts["hold"], counts["busy"], counts["deadline"], counts["stale"]) == (3, 1, 1, 1)
    with pytest.raises(ValueError):
        count_cycle(counts, "acted", "")


@pytest.mark.parametrize(
    ("outcome", "trips", "strip"),
    [
        (Outcome.BUSY, True, {"deadline/busy"}),
        (Outcome.DEADLINE, True, {"deadline/busy"}),
        (Outcome.HOLD, False, {"hold"}),
    ],
)
def test_no_decision_sends_nothing(outcome: Outcome, trips: bool, strip: set[str]) -> None:
    step = finish_cycle(
        Unsolved(outcome, "why"), decided_at=0.0, deadline_at=1.0, check_dispatch=never
    )
    assert (step.outcome, step.action, step.adopt) == (outcome, None, False)
    assert (step.trip is not None) is trips and step.decision.outcome is Outcome.HOLD
    rec = CycleRecord(0, 0.0, step.outcome, step.decision.source, step.reason, {}, {}, {}, "", 0, 0)
    assert cycle_events(rec) == strip


def test_a_decision_is_sent_only_in_time_and_within_the_specs(dh) -> None:
    t = dh.meta.start_epoch + 10 * 3600
    logic = logic_with(dh, Scripted(), Scripted())
    d = logic.plan(t, fresh_snapshot(dh, t, X), U, gate=logic.gate.state)
    assert d.outcome is Outcome.DISPATCH and d.gate == GateState(3)
    sent = finish_cycle(d, decided_at=t, deadline_at=t + 1, check_dispatch=never)
    assert sent.outcome is Outcome.DISPATCH and sent.adopt and sent.trip is None
    np.testing.assert_array_equal(sent.action, d.action)
    late = finish_cycle(d, decided_at=t + 2, deadline_at=t + 1, check_dispatch=never)
    assert (late.outcome, late.action) == (Outcome.DEADLINE, None)
    assert late.reason == "decided too late: controller plan approved" and late.trip
    refused = finish_cycle(d, decided_at=t, deadline_at=t + 1, check_dispatch=lambda a: "ramp")
    assert (refused.outcome, refused.action, refused.trip) == (Outcome.HOLD, None, None)
    assert refused.reason == "refused at dispatch: ramp"
    held = Decision(Outcome.HOLD, "no plan passed")
    assert finish_cycle(held, decided_at=t, deadline_at=t + 1, check_dispatch=never).adopt


def test_planning_leaves_the_runs_gate_alone(dh) -> None:
    """A plan that is never used (busy, late, abandoned) does not move the gate."""
    t = dh.meta.start_epoch + 10 * 3600
    logic = logic_with(dh, Scripted(status=SolveStatus.FAILED), Scripted())
    gate = logic.gate
    d = logic.plan(t, fresh_snapshot(dh, t, X), U, gate=gate.state)
    assert d.mode is Mode.FALLBACK and [s.to for s in d.switches] == [Mode.FALLBACK]
    assert gate.mode is Mode.CONTROLLER and gate.switches == []
    gate.adopt(d.gate, d.switches)  # the loop thread takes the decision it uses
    assert gate.mode is Mode.FALLBACK and len(gate.switches) == 1
    # In FALLBACK, verified shadow plans count only when their decision is adopted.
    logic.controller = Scripted()
    logic.controller.setup(logic.problem)
    for _ in range(5):
        d = logic.plan(t, fresh_snapshot(dh, t, X), U, gate=gate.state)
        assert d.gate == GateState(3, Mode.FALLBACK, 1)
    assert gate.streak == 0


def test_the_gate_is_a_value_with_no_lock() -> None:
    gate = SimplexGate(2)
    assert not any("lock" in name.lower() for name in vars(gate))
    assert gate.trip(1.0, "deadline") is not None and gate.trip(2.0, "again") is None
    assert gate.controller_verified(3.0) is None
    back = gate.controller_verified(4.0)
    assert back is not None and back.to is Mode.CONTROLLER and gate.state == GateState(2)
    assert [s.t for s in gate.switches] == [1.0, 4.0]
