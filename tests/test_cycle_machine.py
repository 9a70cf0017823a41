"""Stateful property test of the safety chain: cycle logic and simplex gate, dispatch check,
then the gateway's own checks.

Random controller and fallback outputs (good, out of bounds, too fast, NaN, failed,
timed out, raising), random plant states, stale data, missed cycle deadlines,
verification deadlines that cannot be met, outside fallback reasons and random time
steps, on the simulated rig with two uncertainty samples.  Invariants: the field only
ever receives inputs within bounds and ramp limits; every dispatched action is the
first row of a plan with an approving verdict and passes the dispatch check; the gate
follows the simplex rules exactly (checked against a reference model of them).

Steps: ``PARALLELCITY_MACHINE_STEPS`` rule steps at least (default 1,500), run in
rounds of examples until that many steps have really executed;
``PARALLELCITY_MACHINE_STEPS=100000`` is the long run.
"""

from __future__ import annotations

import math
import os
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)
from parallelcity.hil.simulated import KIND

from parallelcity import plugins
from parallelcity.decide.control import ControlResult, SolveStatus
from parallelcity.decide.cycle import CycleLogic, Outcome
from parallelcity.decide.gate import Mode, SimplexGate
from parallelcity.dispatch.wire import Command
from parallelcity.field.snapshot import PointSpec, Reading, assess
from parallelcity.gateway.core import GatewayCore, RulingKind
from parallelcity.scenario.definition import parse_scenario
from parallelcity.specs import TOLERANCE
from parallelcity.twin.twin import Twin
from parallelcity.verify.verifier import Verifier

from .conftest import DH

SCENARIO = parse_scenario(
    re.sub(r"(?m)^(samples|sample_forecast_error) = .*\n", "", DH.read_text()).replace(
        "field_seed = 11", "field_seed = 11\nsamples = 2"
    ),
    "machine.toml",
)
SPECS = SCENARIO.safety_specs()
N = SCENARIO.meta.horizon_steps
DT = SCENARIO.meta.cycle_s
LO, HI = SPECS.u_min, SPECS.u_max
STEP = SPECS.du_max(DT)
REVERIFY = 3
STEPS = int(os.environ.get("PARALLELCITY_MACHINE_STEPS", "1500"))
STEPS_PER_EXAMPLE = 50
EXECUTED = {"steps": 0, "cycles": 0, "dispatched": 0, "switches": 0}


class Puppet:
    """A controller whose next answer the state machine chooses: the scenario's real PI
    baseline's plan, that plan nudged, or a scripted plan or failure."""

    def __init__(self) -> None:
        self.next: tuple[str, float] = ("hold", 0.0)
        self.pi = plugins.controller_kind(SCENARIO.file.fallback.kind).create(
            SCENARIO.fallback_config
        )

    def setup(self, problem) -> None:
        self.problem = problem
        self.pi.setup(problem)

    def step(self, inp):
        kind, amount = self.next
        m = self.problem.model
        if kind == "raise":
            raise RuntimeError("controller bug")
        if kind in ("failed", "timeout", "infeasible"):
            return ControlResult.failure(SolveStatus(kind), self.problem, "scripted")
        if kind in ("pi", "pi+"):
            r = self.pi.step(inp)
            if kind == "pi" or not r.status.usable:
                return r
            steps = np.where(np.isfinite(STEP), STEP, 0.1 * (HI - LO))
            plan = r.u_plan + amount * steps  # may break a bound or a ramp, or just the bands
            xs, ys = m.simulate(inp.x0, plan, inp.disturbances, m.nominal, DT)
            return ControlResult(SolveStatus.SOLVED, plan, xs, ys, 0.0, 1, 0.0)
        plan = np.tile(inp.u_prev, (N, 1))
        if kind == "ramp":  # a move of `amount` times the allowed step on every input
            steps = np.where(np.isfinite(STEP), STEP, 0.2 * (HI - LO))
            plan = np.clip(inp.u_prev + amount * steps, LO - 1, HI + 1)
            plan = np.tile(plan, (N, 1))
        elif kind == "jump":  # anywhere, in or out of bounds
            plan = np.tile(LO + amount * (HI - LO), (N, 1))
        elif kind == "nan":
            plan[min(N - 1, int(amount * N)), 0] = math.nan
        xs, ys = m.simulate(inp.x0, np.nan_to_num(plan), inp.disturbances, m.nominal, DT)
        return ControlResult(SolveStatus.SOLVED, plan, xs, ys, 0.0, 1, 0.0)


answers = st.tuples(
    st.sampled_from(
        ["pi"] * 6
        + ["pi+"] * 3
        + ["hold", "ramp", "jump", "nan", "failed", "timeout", "infeasible", "raise"]
    ),
    st.floats(-1.5, 1.5),
)
comfortable = st.tuples(
    st.floats(20.5, 22.0), st.floats(20.5, 22.0), st.floats(20.5, 22.0), st.floats(65.0, 80.0)
)
anywhere = st.tuples(
    st.floats(12.0, 28.0), st.floats(12.0, 28.0), st.floats(12.0, 28.0), st.floats(55.0, 95.0)
)
states = st.one_of(comfortable, comfortable, comfortable, anywhere)


class SafetyChain(RuleBasedStateMachine):
    @initialize(x=states)
    def start(self, x) -> None:
        self.primary, self.fallback = Puppet(), Puppet()
        twin = Twin(SCENARIO.model, SPECS, DT, N)
        rig = KIND.verification_rig(SCENARIO.rig_config, SCENARIO.model)
        self.logic = CycleLogic(
            twin, self.primary, self.fallback, Verifier(SPECS, rig, DT), SimplexGate(REVERIFY)
        )
        self.logic.setup()
        self.gateway = GatewayCore(SPECS.limits)
        self.t = SCENARIO.meta.start_epoch + 8 * 3600
        self.x = np.array(x)
        self.u = SCENARIO.model.u0.copy()  # what the field has
        # the field has held u0 for at least a cycle before the first decision
        self.history: list[tuple[float, np.ndarray]] = [(self.t - DT, self.u.copy())]
        self.seq = 0
        self.dispatched: list[tuple[np.ndarray, np.ndarray, object]] = []
        # reference model of the simplex rules
        self.mode, self.streak = Mode.CONTROLLER, 0
        self.switches_seen = 0

    def snapshot(self, age: float):
        specs = {p.name: PointSpec(p.name, p.max_age_s, p.required) for p in SCENARIO.field.points}
        values = dict(zip(SCENARIO.model.states, self.x, strict=True))
        readings = {n: Reading(values.get(n, 0.0), self.t - age) for n in specs}
        return assess(specs, readings, self.t)

    def _ref_trip(self) -> None:
        self.mode, self.streak = Mode.FALLBACK, 0

    @rule(
        primary=answers,
        fallback=answers,
        age=st.sampled_from([0.0, 0.0, 60.0, 5000.0]),
        outside=st.sampled_from([None, None, None, None, "twin diverges"]),
        verify_in_time=st.sampled_from([True, True, True, True, True, False]),
    )
    def cycle(self, primary, fallback, age, outside, verify_in_time) -> None:
        EXECUTED["steps"] += 1
        EXECUTED["cycles"] += 1
        self.primary.next, self.fallback.next = primary, fallback
        verify_by = None if verify_in_time else -1.0  # already past: nothing can be verified
        mode_before = self.mode
        decision = self.logic.decide(
            self.t, self.snapshot(age), self.u, fallback_reason=outside, verify_by=verify_by
        )
        roles = {a.role: a for a in decision.attempts}
        # the reference model of the gate, from what was tried and approved
        if age > 1800:
            assert decision.outcome is Outcome.STALE and decision.action is None
            assert not decision.attempts
            self._ref_trip()
        elif outside is not None:
            assert set(roles) == {"fallback"}
            self._ref_trip()
        else:
            ctrl = roles["controller"]
            ok = ctrl.verdict is not None and ctrl.verdict.approved
            if not verify_in_time:
                assert not ok, "nothing may be approved after its verification deadline"
            if self.mode is Mode.CONTROLLER:
                if not ok:
                    self._ref_trip()
            elif ok:
                self.streak += 1
                if self.streak >= REVERIFY:
                    self.mode, self.streak = Mode.CONTROLLER, 0
            else:
                self.streak = 0
        assert decision.mode is self.mode, (decision.reason, self.mode, self.streak)
        if decision.mode is not mode_before:
            assert len(decision.switches) >= 1
            assert decision.switches[-1].to is decision.mode and decision.switches[-1].reason
        self.switches_seen += len(decision.switches)
        EXECUTED["switches"] += len(decision.switches)
        # who may act
        action = decision.action
        if action is None:
            assert decision.outcome is not Outcome.DISPATCH
        else:
            fb = roles.get("fallback")
            fb_ok = fb is not None and fb.verdict is not None and fb.verdict.approved
            if decision.source == "controller" and mode_before is Mode.FALLBACK:
                # back in control after enough verified cycles, or the fallback was rejected
                assert decision.mode is Mode.CONTROLLER or not fb_ok
            if mode_before is Mode.CONTROLLER and decision.mode is Mode.FALLBACK:
                assert decision.source == "fallback"
            self._send(action, decision.verdict)
        self.t += DT

    def _send(self, action, verdict) -> None:
        assert verdict is not None and verdict.approved
        np.testing.assert_array_equal(action, verdict.u_plan[0])
        assert SPECS.check_dispatch(self.u, action, DT) == []
        self.dispatched.append((action, self.u.copy(), verdict))
        EXECUTED["dispatched"] += 1
        cmd = Command.create(
            issuer="machine",
            seq=self.seq,
            issued_at=self.t,
            valid_until=self.t + 600,
            setpoints=dict(zip(SCENARIO.model.inputs, map(float, action), strict=True)),
            verdict=verdict.digest,
        )
        self.seq += 1
        gd = self.gateway.decide(cmd, self.t + 1.0)
        if gd.outcome is RulingKind.ACCEPT:
            self.gateway.record_applied(cmd, self.t + 1.0)
            self.u = action
            self.history.append((self.t, action.copy()))

    @rule()
    def missed_cycle_deadline(self) -> None:
        """What the runner does when a decision comes too late: nothing sent, gate tripped."""
        EXECUTED["steps"] += 1
        sw = self.logic.gate.trip(self.t, "deadline: decided too late")
        assert (sw is not None) == (self.mode is Mode.CONTROLLER)
        self._ref_trip()
        self.t += DT

    @rule(x=states)
    def plant_moves(self, x) -> None:
        EXECUTED["steps"] += 1
        self.x = np.array(x)

    @rule(hours=st.integers(1, 12))
    def quiet_hours(self, hours: int) -> None:
        """Time passes with no cycle: the next move may be larger, never beyond the ramp."""
        EXECUTED["steps"] += 1
        self.t += hours * 3600

    @invariant()
    def field_never_sees_an_unsafe_input(self) -> None:
        for (t0, u0), (t1, u1) in zip(self.history, self.history[1:], strict=False):
            assert np.all(u1 >= LO - TOLERANCE) and np.all(u1 <= HI + TOLERANCE)
            allowed = np.array([lim.max_step(t1 - t0) for lim in SPECS.inputs])
            assert np.all(np.abs(u1 - u0) <= allowed + 2 * TOLERANCE)

    @invariant()
    def every_dispatch_was_verified_on_every_sample(self) -> None:
        for action, u_before, verdict in self.dispatched[-3:]:
            assert verdict.approved and not verdict.violations and verdict.samples == 2
            assert np.all(np.isfinite(action))
            assert SPECS.check_inputs(u_before, verdict.u_plan, DT) == []


@pytest.mark.slow
@pytest.mark.endurance
def test_safety_chain() -> None:
    start = dict(EXECUTED)
    rounds = 0
    while EXECUTED["steps"] - start["steps"] < STEPS:
        left = STEPS - (EXECUTED["steps"] - start["steps"])
        run_state_machine_as_test(
            SafetyChain,
            settings=settings(
                max_examples=max(1, min(500, left // 20)),
                stateful_step_count=STEPS_PER_EXAMPLE,
                deadline=None,
                database=None,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )
        rounds += 1
    done = {k: EXECUTED[k] - start[k] for k in EXECUTED}
    print(f"safety chain: {done} in {rounds} rounds")
    assert done["dispatched"] > 0 and done["switches"] > 0, "the machine never got anywhere"
