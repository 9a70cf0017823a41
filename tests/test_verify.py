"""The verifier and the cycle's gate: nothing unverified, nothing out of bounds, gets through."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from parallelcity.decide.control import ControlProblem, ControlResult, SolveStatus
from parallelcity.decide.cycle import CycleLogic, Outcome
from parallelcity.field.snapshot import PointSpec, Reading, assess
from parallelcity.specs import TOLERANCE, SafetySpecs
from parallelcity.twin.twin import Twin
from parallelcity.verify.verifier import Verifier


@dataclass
class ModelRig:
    """A rig that is the twin's own model: enough for pure verifier tests."""

    model: object
    name: str = "model-rig"

    def rollout(self, x0, inputs, disturbances, t0, dt):
        return self.model.simulate(x0, inputs, disturbances, self.model.nominal, dt)[1]


@pytest.fixture(scope="module")
def parts(dh):
    specs = dh.safety_specs()
    dt = dh.meta.cycle_s
    return dh, specs, Verifier(specs, ModelRig(dh.model), dt), dt


def independent_breaks(specs: SafetySpecs, u_prev, plan, dt) -> bool:
    """Bounds and rate limits re-checked from the scenario values, written out plainly."""
    prev = np.asarray(u_prev, dtype=float)
    for row in plan:
        for i, lim in enumerate(specs.inputs):
            v = row[i]
            if not math.isfinite(v) or v < lim.min - TOLERANCE or v > lim.max + TOLERANCE:
                return True
            rate = lim.max_rate_per_h
            if rate is not None and abs(v - prev[i]) > rate * dt / 3600 + TOLERANCE:
                return True
        prev = row
    return False


def plans(horizon: int, specs: SafetySpecs):
    lo = np.array([lim.min for lim in specs.inputs])
    hi = np.array([lim.max for lim in specs.inputs])
    span = hi - lo
    nu = len(specs.inputs)
    # mostly inside the bounds, sometimes a little or a lot outside, sometimes NaN
    frac = arrays(
        np.float64,
        (horizon, nu),
        elements=st.one_of(
            st.floats(0, 1),
            st.floats(-0.2, 1.2),
            st.sampled_from([-1e-7, 1 + 1e-7, 1 + 1e-5, math.nan]),
        ),
    )
    return frac.map(lambda f: lo + f * span)


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_verifier_never_approves_a_plan_that_breaks_a_bound_or_rate(parts, data) -> None:
    dh, specs, verifier, dt = parts
    n = dh.meta.horizon_steps
    plan = data.draw(plans(n, specs))
    u_prev = data.draw(plans(1, specs))[0]
    x0 = dh.model.x0
    d = dh.model.forecast(dh.meta.start_epoch, n, dt)
    verdict = verifier.verify(
        source="test", t0=dh.meta.start_epoch, x0=x0, u_prev=u_prev, u_plan=plan, disturbances=d
    )
    if independent_breaks(specs, u_prev, plan, dt):
        assert not verdict.approved
        assert any(v.spec in ("bound", "rate") for v in verdict.violations) or verdict.note


def test_verifier_approves_a_gentle_plan_and_names_a_band_violation(parts) -> None:
    dh, _specs, verifier, dt = parts
    n = dh.meta.horizon_steps
    t0 = dh.meta.start_epoch + 10 * 3600  # Monday 10:00, every building occupied
    d = dh.model.forecast(t0, n, dt)
    x0 = np.array([21.0, 21.5, 21.0, 70.0])
    u = np.tile([70.0, 0.3, 0.12, 0.2], (n, 1))
    ok = verifier.verify(source="t", t0=t0, x0=x0, u_prev=u[0], u_plan=u, disturbances=d)
    assert ok.approved, ok.summary()
    assert len(ok.digest) == 64
    cold = u.copy()
    cold[:, 1:] = 0.02  # nearly shut every substation for six hours
    bad = verifier.verify(source="t", t0=t0, x0=x0, u_prev=u[0], u_plan=cold, disturbances=d)
    assert not bad.approved
    kinds = {v.spec for v in bad.violations}
    assert "band" in kinds and kinds <= {"band", "rate", "temporal"}
    first = next(v for v in bad.violations if v.spec == "band")
    assert first.value < first.limit
    assert "band on" in bad.summary()


def test_verdict_digest_changes_with_the_plan(parts) -> None:
    dh, _specs, verifier, dt = parts
    n = dh.meta.horizon_steps
    d = dh.model.forecast(dh.meta.start_epoch, n, dt)
    u = np.tile(dh.model.u0, (n, 1))
    a = verifier.verify(source="t", t0=0.0, x0=dh.model.x0, u_prev=u[0], u_plan=u, disturbances=d)
    u2 = u.copy()
    u2[5, 0] += 0.5
    b = verifier.verify(source="t", t0=0.0, x0=dh.model.x0, u_prev=u[0], u_plan=u2, disturbances=d)
    assert a.digest != b.digest


class BrokenRig:
    name = "broken"

    def rollout(self, *args):
        raise RuntimeError("bench lost power")


def test_a_rig_failure_rejects_the_plan(parts) -> None:
    dh, specs, _, dt = parts
    n = dh.meta.horizon_steps
    v = Verifier(specs, BrokenRig(), dt).verify(
        source="t",
        t0=0.0,
        x0=dh.model.x0,
        u_prev=dh.model.u0,
        u_plan=np.tile(dh.model.u0, (n, 1)),
        disturbances=dh.model.forecast(0.0, n, dt),
    )
    assert not v.approved and "bench lost power" in v.note


# --- the cycle's gate, with scripted controllers --------------------------------------------


class Scripted:
    """A controller that returns a fixed plan (or raises), for driving the gate."""

    def __init__(self, plan=None, status=SolveStatus.SOLVED, raises: bool = False) -> None:
        self.plan, self.status, self.raises = plan, status, raises
        self.calls = 0

    def setup(self, problem: ControlProblem) -> None:
        self.problem = problem

    def step(self, inp):
        self.calls += 1
        if self.raises:
            raise ZeroDivisionError("bug in controller")
        if not self.status.usable:
            return ControlResult.failure(self.status, self.problem, "scripted")
        n = self.problem.horizon
        plan = np.tile(inp.u_prev, (n, 1)) if self.plan is None else self.plan
        m = self.problem.model
        xs, ys = m.simulate(inp.x0, plan, inp.disturbances, m.nominal, self.problem.dt)
        return ControlResult(self.status, plan, xs, ys, 0.0, 1, 0.001)


def fresh_snapshot(dh, t: float, x):
    specs = {p.name: PointSpec(p.name, p.max_age_s, p.required) for p in dh.field.points}
    values = dict(zip(dh.model.states, x, strict=True))
    readings = {n: Reading(values.get(n, 0.0), t - 10.0) for n in specs}
    return assess(specs, readings, t)


def logic_with(dh, primary, fallback):
    specs = dh.safety_specs()
    twin = Twin(dh.model, specs, dh.meta.cycle_s, dh.meta.horizon_steps)
    logic = CycleLogic(
        twin, primary, fallback, Verifier(specs, ModelRig(dh.model), dh.meta.cycle_s)
    )
    logic.setup()
    return logic


def test_gate_sends_the_verified_controller_plan(dh) -> None:
    t = dh.meta.start_epoch + 10 * 3600
    x = np.array([21.0, 21.5, 21.0, 70.0])
    u = np.array([70.0, 0.3, 0.12, 0.2])
    logic = logic_with(dh, Scripted(), Scripted())
    d = logic.decide(t, fresh_snapshot(dh, t, x), u)
    assert d.outcome is Outcome.DISPATCH and d.source == "controller"
    np.testing.assert_allclose(d.action, u)


@pytest.mark.parametrize(
    "primary",
    [
        Scripted(status=SolveStatus.INFEASIBLE),
        Scripted(status=SolveStatus.TIMEOUT),
        Scripted(raises=True),
        Scripted(plan=np.tile([96.0, 0.3, 0.12, 0.2], (24, 1))),  # above the supply bound
    ],
    ids=["infeasible", "timeout", "raises", "out-of-bounds"],
)
def test_gate_falls_back_to_the_verified_baseline(dh, primary) -> None:
    t = dh.meta.start_epoch + 10 * 3600
    x = np.array([21.0, 21.5, 21.0, 70.0])
    u = np.array([70.0, 0.3, 0.12, 0.2])
    logic = logic_with(dh, primary, Scripted())
    d = logic.decide(t, fresh_snapshot(dh, t, x), u)
    assert d.outcome is Outcome.DISPATCH and d.source == "fallback"
    assert d.reason.startswith("fallback: controller")


def test_gate_holds_when_both_plans_fail(dh) -> None:
    t = dh.meta.start_epoch + 10 * 3600
    x = np.array([21.0, 21.5, 21.0, 70.0])
    u = np.array([70.0, 0.3, 0.12, 0.2])
    logic = logic_with(dh, Scripted(status=SolveStatus.FAILED), Scripted(raises=True))
    d = logic.decide(t, fresh_snapshot(dh, t, x), u)
    assert d.outcome is Outcome.HOLD and d.action is None


def test_gate_computes_nothing_on_stale_data(dh) -> None:
    t = dh.meta.start_epoch + 10 * 3600
    primary, fallback = Scripted(), Scripted()
    logic = logic_with(dh, primary, fallback)
    snap = fresh_snapshot(dh, t - 7200, np.array([21.0, 21.5, 21.0, 70.0]))
    snap = assess(
        {p.name: PointSpec(p.name, p.max_age_s, p.required) for p in dh.field.points},
        {n: p.reading for n, p in snap.points.items()},
        t,
    )
    d = logic.decide(t, snap, dh.model.u0)
    assert d.outcome is Outcome.STALE and d.action is None
    assert "apartment.T_zone: age" in d.reason
    assert primary.calls == 0 and fallback.calls == 0


def test_gate_uses_only_the_fallback_when_told_why(dh) -> None:
    t = dh.meta.start_epoch + 10 * 3600
    x = np.array([21.0, 21.5, 21.0, 70.0])
    u = np.array([70.0, 0.3, 0.12, 0.2])
    primary = Scripted()
    logic = logic_with(dh, primary, Scripted())
    d = logic.decide(t, fresh_snapshot(dh, t, x), u, fallback_reason="twin diverges")
    assert d.outcome is Outcome.DISPATCH and d.source == "fallback"
    assert d.reason == "fallback: twin diverges" and primary.calls == 0
