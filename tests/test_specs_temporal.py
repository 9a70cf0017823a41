"""Spec semantics: predicates, interlocks and temporal specs against hand-computed robustness,
and the same spec objects in the scenario, the verifier (screen, clip) and at dispatch."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parallelcity.errors import ScenarioError
from parallelcity.scenario.definition import parse_scenario
from parallelcity.specs import Predicate, predicate_robustness, temporal_robustness
from parallelcity.verify.verifier import VerdictStatus, Verifier

DT = 900.0


def r_of(values: list[float]) -> np.ndarray:
    return np.array(values, dtype=float)


# -- predicates -------------------------------------------------------------------------------


def test_predicate_robustness_by_hand() -> None:
    above = Predicate(signal="x", above=20.0)
    np.testing.assert_allclose(
        predicate_robustness(above, r_of([21, 19.5, 22, 18])), [1, -0.5, 2, -2]
    )
    below = Predicate(signal="x", below=62.0)
    np.testing.assert_allclose(predicate_robustness(below, r_of([65, 61])), [-3, 1])
    both = Predicate(signal="x", above=3.0, below=6.0)
    np.testing.assert_allclose(predicate_robustness(both, r_of([5, 2, 7, 4.5])), [1, -1, -1, 1.5])
    assert predicate_robustness(above, r_of([math.nan]))[0] == -math.inf


def test_a_predicate_needs_a_threshold_that_can_hold() -> None:
    with pytest.raises(ValueError, match="above"):
        Predicate(signal="x")
    with pytest.raises(ValueError, match="never holds"):
        Predicate(signal="x", above=5.0, below=4.0)


# -- temporal operators, hand-computed ---------------------------------------------------------


def test_always_is_the_worst_step() -> None:
    assert temporal_robustness("always", r_of([1, -0.5, 2, -2]), DT) == (-2.0, 3)
    # from one step in: step 0 no longer counts
    assert temporal_robustness("always", r_of([-5, 1, 0.5, 2]), DT, from_s=DT) == (0.5, 2)
    # from_s that is not a multiple of dt starts at the next sample
    assert temporal_robustness("always", r_of([-5, -4, 0.5, 2]), DT, from_s=1.2 * DT) == (0.5, 2)


def test_eventually_is_the_best_step_inside_the_deadline() -> None:
    r = r_of([-1, -0.5, 0.25, 3])
    assert temporal_robustness("eventually", r, DT, within_s=2 * DT) == (0.25, 2)
    assert temporal_robustness("eventually", r, DT, within_s=1.5 * DT) == (-0.5, 1)
    assert temporal_robustness("eventually", r, DT, within_s=10 * DT) == (3.0, 3)
    assert temporal_robustness("eventually", r, DT, within_s=0.0) == (-1.0, 0)
    # the window starts at from_s: step 1 and 2 only
    assert temporal_robustness("eventually", r, DT, from_s=DT, within_s=DT) == (0.25, 2)
    # a window that starts beyond the horizon proves nothing: unproven, not vacuous
    assert temporal_robustness("eventually", r, DT, from_s=9 * DT, within_s=DT)[0] == -math.inf


def test_never_longer_is_the_worst_window_longer_than_the_lapse() -> None:
    r = r_of([1, -1, -2, 0.5, -1, -3, -0.5])
    # lapses up to one step are allowed: windows of 3 samples (2 steps) must hold P somewhere;
    # steps 4..6 fail for two steps, the best of them is -0.5
    assert temporal_robustness("never_longer", r, DT, longer_than_s=DT) == (-0.5, 4)
    assert temporal_robustness("never_longer", r, DT, longer_than_s=1.5 * DT) == (-0.5, 4)
    # lapses up to two steps: windows of 4 samples; the worst best-of-window is 0.5
    assert temporal_robustness("never_longer", r, DT, longer_than_s=2 * DT) == (0.5, 1)
    # T = 0: any two consecutive failing samples break it; (-1, -2) at steps 1..2 is worst
    assert temporal_robustness("never_longer", r, DT, longer_than_s=0.0) == (-1.0, 1)
    # a horizon too short to hold a lapse that long cannot break it
    assert temporal_robustness("never_longer", r_of([-1, -1]), DT, longer_than_s=DT) == (
        math.inf,
        0,
    )


def runs_of_failure_longer_than(r: np.ndarray, steps_allowed: float) -> bool:
    """Plain reading of 'P fails for longer than T': consecutive failing samples spanning > T."""
    run = 0
    for v in r:
        run = run + 1 if v < 0 else 0
        if run >= 2 and (run - 1) > steps_allowed + 1e-9:
            return True
    return False


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(
    r=st.lists(st.floats(-5, 5).filter(lambda v: v != 0), min_size=1, max_size=30),
    lapse=st.floats(0, 6),
)
def test_robustness_sign_matches_the_boolean_meaning(r: list[float], lapse: float) -> None:
    arr = np.array(r)
    always, _ = temporal_robustness("always", arr, DT)
    assert (always >= 0) == all(v >= 0 for v in r)
    ev, _ = temporal_robustness("eventually", arr, DT, within_s=lapse * DT)
    within = arr[: math.floor(lapse + 1e-9) + 1]
    assert (ev >= 0) == any(v >= 0 for v in within)
    nl, _ = temporal_robustness("never_longer", arr, DT, longer_than_s=lapse * DT)
    assert (nl >= 0) == (not runs_of_failure_longer_than(arr, lapse))


# -- specs from a scenario file ------------------------------------------------------------------

EXTRA = """
[[specs.interlocks]]
name = "school-flow-needs-hot-supply"
when = { signal = "plant.T_supply", below = 62.0 }
forbid = { signal = "school.m_flow", above = 1.2 }

[[specs.interlocks]]
name = "no-full-flow-at-low-setpoint"
when = { signal = "plant.T_supply_set", below = 65.0 }
forbid = { signal = "apartment.m_flow", above = 1.5 }

[[specs.temporal]]
name = "office-warm-within-two-hours"
kind = "eventually"
require = { signal = "office.T_zone", above = 19.0 }
within_s = 7200

[[specs.temporal]]
name = "apartment-never-cold-for-an-hour"
kind = "never_longer"
require = { signal = "apartment.T_zone", above = 19.0 }
longer_than_s = 3600
margin = 0.1
"""


@pytest.fixture(scope="module")
def logic_specs(dh_text: str):
    sc = parse_scenario(dh_text + EXTRA, "extra.toml")
    return sc, sc.safety_specs()


def test_scenario_specs_reach_the_spec_object(logic_specs) -> None:
    _, specs = logic_specs
    assert [il.name for il in specs.interlocks][-2:] == [
        "school-flow-needs-hot-supply",
        "no-full-flow-at-low-setpoint",
    ]
    assert [il.name for il in specs.input_interlocks] == ["no-full-flow-at-low-setpoint"]
    assert {t.name: t.kind for t in specs.temporal}.items() >= {
        "office-warm-within-two-hours": "eventually",
        "apartment-never-cold-for-an-hour": "never_longer",
    }.items()


def test_bad_logic_specs_are_reported_with_their_key_path(dh_text: str) -> None:
    unknown = dh_text + EXTRA.replace('signal = "school.m_flow"', 'signal = "school.flow"')
    with pytest.raises(ScenarioError) as info:
        parse_scenario(unknown, "bad.toml")
    # the scenario's own interlock comes first
    assert "specs.interlocks[1].forbid.signal: 'school.flow'" in str(info.value)
    no_deadline = (
        dh_text + EXTRA + '\n[[specs.temporal]]\nname = "x"\nkind = "eventually"\n'
        'require = { signal = "office.T_zone", above = 1.0 }\n'
    )
    with pytest.raises(ScenarioError, match=r"specs\.temporal\[3\].*needs within_s"):
        parse_scenario(no_deadline, "bad.toml")
    twice = dh_text + EXTRA + EXTRA.split("[[specs.temporal]]")[0]
    with pytest.raises(ScenarioError, match="'school-flow-needs-hot-supply' is used twice"):
        parse_scenario(twice, "bad.toml")


def trace(sc, n: int, **columns: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """A plan and output trace with chosen columns, everything else comfortably inside."""
    m = sc.model
    u = np.tile([75.0, 0.5, 0.5, 0.5], (n, 1))
    y = np.tile(np.full(m.ny, 21.5), (n + 1, 1))
    y[:, m.outputs.index("plant.T_supply")] = 75.0
    for name, values in columns.items():
        name = name.replace("__", ".")
        if name in m.inputs:
            u[:, m.inputs.index(name)] = values
        else:
            y[:, m.outputs.index(name)] = values
    return u, y


def test_interlock_and_temporal_robustness_on_a_trace_by_hand(logic_specs) -> None:
    sc, specs = logic_specs
    t0 = sc.meta.start_epoch + 12 * 3600
    # supply dips below 62 at steps 1..2 while the school's flow is 1.0 then 1.3:
    # step 0: max(65-62, 1.2-1.5)=3; step 1: max(-1, 0.2)=0.2; step 2: max(-2, -0.1)=-0.1;
    # step 3: max(-2, -0.1)=-0.1 (the last input row is held for the final sample)
    u, y = trace(
        sc,
        3,
        school__m_flow=[1.5, 1.0, 1.3],
        plant__T_supply=[65.0, 61.0, 60.0, 60.0],
        office__T_zone=[18.0, 18.5, 19.25, 20.0],
        apartment__T_zone=[20.0, 18.5, 18.0, 19.05],
    )
    res = {r.name: r for r in specs.robustness(t0, u[0], u, y, DT)}
    il = res["school-flow-needs-hot-supply"]
    assert il.robustness == pytest.approx(-0.1) and il.step == 2 and not il.passed
    # office: within 7200 s = 8 steps, best is 20.0 - 19 = 1.0 at step 3
    ev = res["office-warm-within-two-hours"]
    assert ev.robustness == pytest.approx(1.0) and ev.step == 3 and ev.passed
    # apartment above 19: r = [1, -0.5, -1, 0.05]; longer than 3600 s = 4 steps: a window of
    # 6 samples does not fit in 4, so the horizon cannot break it
    nl = res["apartment-never-cold-for-an-hour"]
    assert nl.robustness == math.inf and nl.passed
    # with a longer trace the lapse can be judged: r = [1, -0.5, -1, -1, -1, -1, 0.05]
    u, y = trace(sc, 6, apartment__T_zone=[20.0, 18.5, 18.0, 18.0, 18.0, 18.0, 19.05])
    nl = {r.name: r for r in specs.robustness(t0, u[0], u, y, DT)}[
        "apartment-never-cold-for-an-hour"
    ]
    # windows of 6 samples (5 steps > 4): [1..-1] -> 1, [-0.5..0.05] -> 0.05; margin 0.1
    assert nl.robustness == pytest.approx(0.05) and nl.step == 1 and not nl.passed
    assert specs.check_logic(u, y, DT, sample=3)[0].sample == 3


class CountingRig:
    def __init__(self, model) -> None:
        self.model, self.name, self.calls = model, "counting", 0

    def rollout(self, x0, inputs, disturbances, t0, dt):
        self.calls += 1
        return self.model.simulate(x0, inputs, disturbances, self.model.nominal, dt)[1]


def test_an_input_interlock_is_judged_in_the_twin_and_at_dispatch(logic_specs) -> None:
    sc, specs = logic_specs
    rig = CountingRig(sc.model)
    ver = Verifier(specs, rig, DT)
    n = sc.meta.horizon_steps
    t0 = sc.meta.start_epoch + 10 * 3600
    d = sc.model.forecast(t0, n, DT)
    plan = np.tile([64.0, 1.6, 0.3, 0.3], (n, 1))  # setpoint below 65 with full apartment flow
    v = ver.verify(source="t", t0=t0, x0=sc.model.x0, u_prev=plan[0], u_plan=plan, disturbances=d)
    assert not v.approved and rig.calls == 0, "screened before any rig time"
    assert v.violations[0].spec == "interlock"
    assert v.violations[0].signal == "no-full-flow-at-low-setpoint"
    assert v.violations[0].value == pytest.approx(-0.1)  # max(64-65, 1.5-1.6)
    broken = specs.check_dispatch(plan[0], plan[0], DT)
    assert [b.spec for b in broken] == ["interlock"]
    assert specs.check_dispatch(plan[0], np.array([66.0, 1.6, 0.3, 0.3]), DT) == []


def test_clipping_only_where_the_scenario_allows_it(dh_text: str) -> None:
    allow = dh_text.replace("max_rate_per_h = 10.0", "max_rate_per_h = 10.0\nclip = true", 1)
    n = 24
    for text, clip in ((dh_text, False), (allow, True)):
        sc = parse_scenario(text, "clip.toml")
        specs = sc.safety_specs()
        ver = Verifier(specs, CountingRig(sc.model), DT)
        t0 = sc.meta.start_epoch + 10 * 3600
        u_prev = np.array([70.0, 0.3, 0.12, 0.2])
        plan = np.tile([76.0, 0.3, 0.12, 0.2], (n, 1))  # 6 K at once: 2.5 K per 15 min allowed
        v = ver.verify(
            source="t",
            t0=t0,
            x0=np.array([21.0, 21.5, 21.0, 70.0]),
            u_prev=u_prev,
            u_plan=plan,
            disturbances=sc.model.forecast(t0, n, DT),
        )
        if not clip:
            assert v.status is VerdictStatus.REJECTED
            assert v.violations[0].spec == "rate" and v.violations[0].limit == pytest.approx(72.5)
            continue
        assert v.status is VerdictStatus.CLIPPED and v.approved, v.summary()
        np.testing.assert_allclose(v.u_plan[:4, 0], [72.5, 75.0, 76.0, 76.0])
        np.testing.assert_array_equal(v.u_proposed, plan)
        assert specs.check_inputs(u_prev, v.u_plan, DT) == []
        # a flow out of bounds cannot be clipped: that input does not allow it
        bad = plan.copy()
        bad[3, 1] = 2.5
        w = ver.verify(
            source="t",
            t0=t0,
            x0=np.array([21.0, 21.5, 21.0, 70.0]),
            u_prev=u_prev,
            u_plan=bad,
            disturbances=sc.model.forecast(t0, n, DT),
        )
        assert w.status is VerdictStatus.REJECTED
        assert {x.spec for x in w.violations} >= {"bound", "rate"}
