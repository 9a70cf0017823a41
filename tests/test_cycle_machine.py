"""Stateful property test of the safety chain: cycle logic, then the gateway's own checks.

Random controller and fallback outputs (good, out of bounds, too fast, NaN, failed,
raising), random staleness and random time steps.  Invariants: the field only ever
receives inputs within bounds and ramp limits, and every dispatched action is the
first row of a plan with an approving verdict.
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from parallelcity.control import ControlResult, SolveStatus
from parallelcity.cycle import CycleLogic, Outcome
from parallelcity.gateway import GatewayCore
from parallelcity.gateway import Outcome as GatewayOutcome
from parallelcity.scenario import load_scenario
from parallelcity.snapshot import PointSpec, Reading, assess
from parallelcity.specs import TOLERANCE, SafetySpecs
from parallelcity.twin import Twin
from parallelcity.verify import Verifier
from parallelcity.wire import Command

from .conftest import DH
from .test_verify import ModelRig

SCENARIO = load_scenario(DH)
SPECS = SafetySpecs.from_scenario(SCENARIO)
N = SCENARIO.meta.horizon_steps
DT = SCENARIO.meta.cycle_s
LO, HI = SPECS.u_min, SPECS.u_max
STEP = SPECS.du_max(DT)


class Puppet:
    """A controller whose next answer the state machine chooses."""

    def __init__(self) -> None:
        self.next: tuple[str, float] = ("hold", 0.0)

    def setup(self, problem) -> None:
        self.problem = problem

    def step(self, inp):
        kind, amount = self.next
        m = self.problem.model
        if kind == "raise":
            raise RuntimeError("controller bug")
        if kind in ("failed", "timeout", "infeasible"):
            return ControlResult.failure(SolveStatus(kind), self.problem, "scripted")
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
    st.sampled_from(["hold", "ramp", "jump", "nan", "failed", "timeout", "infeasible", "raise"]),
    st.floats(-1.5, 1.5),
)


class SafetyChain(RuleBasedStateMachine):
    @initialize()
    def start(self) -> None:
        self.primary, self.fallback = Puppet(), Puppet()
        twin = Twin(SCENARIO.model, SPECS, DT, N)
        self.logic = CycleLogic(
            twin, self.primary, self.fallback, Verifier(SPECS, ModelRig(SCENARIO.model), DT)
        )
        self.logic.setup()
        self.gateway = GatewayCore(SPECS.limits)
        self.t = SCENARIO.meta.start_epoch + 8 * 3600
        self.x = np.array([21.0, 21.0, 21.0, 75.0])
        self.u = SCENARIO.model.u0.copy()  # what the field has
        self.history: list[tuple[float, np.ndarray]] = [(self.t, self.u.copy())]
        self.seq = 0
        self.dispatched: list[tuple[np.ndarray, object]] = []

    def snapshot(self, age: float):
        specs = {p.name: PointSpec(p.name, p.max_age_s, p.required) for p in SCENARIO.field.points}
        values = dict(zip(SCENARIO.model.states, self.x, strict=True))
        readings = {n: Reading(values.get(n, 0.0), self.t - age) for n in specs}
        return assess(specs, readings, self.t)

    @rule(primary=answers, fallback=answers, age=st.sampled_from([0.0, 60.0, 5000.0]))
    def cycle(self, primary, fallback, age) -> None:
        self.primary.next, self.fallback.next = primary, fallback
        decision = self.logic.decide(self.t, self.snapshot(age), self.u)
        if age > 1800:
            assert decision.outcome is Outcome.STALE and decision.action is None
        action = decision.action
        if action is None:
            assert decision.outcome is not Outcome.DISPATCH
        else:
            v = decision.verdict
            assert v is not None and v.approved
            np.testing.assert_array_equal(action, v.u_plan[0])
            self.dispatched.append((action, v))
            cmd = Command.create(
                issuer="machine",
                seq=self.seq,
                issued_at=self.t,
                valid_until=self.t + 600,
                setpoints=dict(zip(SCENARIO.model.inputs, map(float, action), strict=True)),
                verdict=v.digest,
            )
            self.seq += 1
            gd = self.gateway.decide(cmd, self.t + 1.0)
            if gd.outcome is GatewayOutcome.ACCEPT:
                self.gateway.record_applied(cmd, self.t + 1.0)
                self.u = action
                self.history.append((self.t, action.copy()))
        self.t += DT

    @rule(hours=st.integers(1, 12))
    def quiet_hours(self, hours: int) -> None:
        """Time passes with no cycle: the next move may be larger, never beyond the ramp."""
        self.t += hours * 3600

    @invariant()
    def field_never_sees_an_unsafe_input(self) -> None:
        for (t0, u0), (t1, u1) in zip(self.history, self.history[1:], strict=False):
            assert np.all(u1 >= LO - TOLERANCE) and np.all(u1 <= HI + TOLERANCE)
            allowed = np.array([lim.max_step(t1 - t0) for lim in SPECS.inputs])
            assert np.all(np.abs(u1 - u0) <= allowed + 2 * TOLERANCE)

    @invariant()
    def every_dispatch_was_verified(self) -> None:
        for action, verdict in self.dispatched:
            assert verdict.approved and not verdict.violations
            assert np.all(np.isfinite(action))


SafetyChain.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
test_safety_chain = SafetyChain.TestCase
