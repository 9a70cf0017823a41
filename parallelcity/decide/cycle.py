"""One control cycle's decision, pure and synchronous: snapshot in, decision out.

    stale required point ──────────────────────────────► STALE (nothing sent; gate → fallback)
    controller plan ── usable? ── verified? ── yes ────► DISPATCH (controller)
          │ no                       │ no
          ▼                          ▼                   gate → fallback (the switch journaled)
    fallback plan ─── usable? ── verified? ── yes ─────► DISPATCH (fallback)
                          │ no       │ no
                          ▼          ▼
                         HOLD: nothing sent, the field keeps its last approved inputs

The simplex gate (``gate.py``) remembers who is in control.  While the fallback
is, its plan is made and verified first, then the controller plans and is
verified in the shadow; the fallback's plan is the one dispatched until the
controller has been verified on ``reverify_cycles`` consecutive cycles (if the
fallback's own plan is rejected, an approved shadow plan is used rather than
holding).  Only a plan with an
approving verdict can become an action, and the action is always the first row
of the verified plan.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from parallelcity.decide.control import (
    ControlInput,
    Controller,
    ControlProblem,
    ControlResult,
    SolveStatus,
)
from parallelcity.decide.gate import GateState, Mode, SimplexGate, Switch
from parallelcity.field.snapshot import Snapshot
from parallelcity.twin.model import Array
from parallelcity.twin.twin import Twin
from parallelcity.verify.verifier import Verdict, Verifier


class Outcome(StrEnum):
    """What one cycle came to; the values are the journal's stored strings."""

    DISPATCH = "dispatch"  # a verified action was sent (its ack is recorded beside)
    HOLD = "hold"  # nothing sent: no plan passed, refused at dispatch, or stopped mid-solve
    STALE = "stale"  # nothing computed: a required point is stale
    BUSY = "busy"  # nothing sent: the previous cycle's solve is still running
    DEADLINE = "deadline"  # nothing sent: the decision missed the cycle's deadline

    @property
    def sends_nothing_by_time(self) -> bool:
        """Busy and deadline cycles: a hold caused by time, which trips the gate."""
        return self in (Outcome.BUSY, Outcome.DEADLINE)


@dataclass(frozen=True, eq=False)
class Attempt:
    role: str  # "controller" | "fallback"
    result: ControlResult
    verdict: Verdict | None  # None when the result was not usable, so never tried


@dataclass(frozen=True, eq=False)
class Decision:
    outcome: Outcome
    reason: str
    attempts: tuple[Attempt, ...] = ()
    x0: Array | None = None
    inp: ControlInput | None = None
    chosen: str | None = None  # role whose approved plan is the action (default: first approved)
    switches: tuple[Switch, ...] = ()  # gate switches this cycle, in order
    gate: GateState | None = None  # the gate after this cycle (None: not planned)

    @property
    def mode(self) -> Mode:
        """Who is in control after this cycle."""
        return Mode.CONTROLLER if self.gate is None else self.gate.mode

    @property
    def approved(self) -> Attempt | None:
        for a in self.attempts:
            ok = a.verdict is not None and a.verdict.approved
            if ok and (self.chosen is None or a.role == self.chosen):
                return a
        return None

    @property
    def source(self) -> str:
        a = self.approved
        return a.role if a else ""

    @property
    def verdict(self) -> Verdict | None:
        """The approving verdict, if any plan passed."""
        a = self.approved
        return a.verdict if a else None

    @property
    def action(self) -> Array | None:
        """First row of the verified plan: the only thing that may be sent."""
        v = self.verdict
        return None if v is None else np.array(v.u_plan[0], dtype=float)


def _safe_step(controller: Controller, inp: ControlInput, problem: ControlProblem) -> ControlResult:
    """A controller that raises is a failed solve, not a crashed cycle."""
    started = time.perf_counter()
    try:
        return controller.step(inp)
    except Exception as exc:
        return ControlResult.failure(
            SolveStatus.FAILED,
            problem,
            f"controller raised {type(exc).__name__}: {exc}",
            time.perf_counter() - started,
        )


class CycleLogic:
    def __init__(
        self,
        twin: Twin,
        controller: Controller,
        fallback: Controller,
        verifier: Verifier,
        gate: SimplexGate | None = None,
        end_t: float | None = None,
    ) -> None:
        self.twin = twin
        self.controller = controller
        self.fallback = fallback
        self.verifier = verifier
        self.gate = gate if gate is not None else SimplexGate()
        self.problem = twin.specs.control_problem(twin.model, twin.dt, twin.horizon, end_t)

    def setup(self) -> None:
        self.controller.setup(self.problem)
        self.fallback.setup(self.problem)

    def _attempt(
        self, role: str, controller: Controller, inp: ControlInput, verify_by: float | None
    ) -> Attempt:
        result = _safe_step(controller, inp, self.problem)
        if not result.status.usable:
            return Attempt(role, result, None)
        verdict = self.verifier.verify(
            source=role,
            t0=inp.t0,
            x0=inp.x0,
            u_prev=inp.u_prev,
            u_plan=result.u_plan,
            disturbances=inp.disturbances,
            deadline_s=None if verify_by is None else max(0.0, verify_by - time.monotonic()),
        )
        return Attempt(role, result, verdict)

    def decide(
        self,
        t0: float,
        snapshot: Snapshot,
        u_prev: Array,
        deadline_s: float = math.inf,
        *,
        fallback_reason: str | None = None,
        verify_by: float | None = None,
    ) -> Decision:
        """``plan`` against this logic's gate, and adopt the gate's state after it."""
        d = self.plan(
            t0,
            snapshot,
            u_prev,
            deadline_s,
            gate=self.gate.state,
            fallback_reason=fallback_reason,
            verify_by=verify_by,
        )
        if d.gate is not None:
            self.gate.adopt(d.gate, d.switches)
        return d

    def plan(
        self,
        t0: float,
        snapshot: Snapshot,
        u_prev: Array,
        deadline_s: float = math.inf,
        *,
        gate: GateState,
        fallback_reason: str | None = None,
        verify_by: float | None = None,
    ) -> Decision:
        """Decide one cycle with the gate at ``gate``; the run's gate is not touched (the
        solve thread calls this; the loop thread adopts ``Decision.gate`` if it uses it).

        ``fallback_reason`` skips the controller (e.g. the twin diverges from the
        field) and goes straight to the verified fallback; it also trips the gate, so
        the controller must be verified again before it takes over.  ``verify_by`` (a
        ``time.monotonic()`` instant) is when verification must be done."""
        scratch = SimplexGate.scratch(gate)
        return self._plan(t0, snapshot, u_prev, deadline_s, scratch, fallback_reason, verify_by)

    def _plan(
        self,
        t0: float,
        snapshot: Snapshot,
        u_prev: Array,
        deadline_s: float,
        gate: SimplexGate,
        fallback_reason: str | None,
        verify_by: float | None,
    ) -> Decision:
        switches: list[Switch] = []

        x0: Array | None = None
        inp: ControlInput | None = None

        def done(
            outcome: Outcome, reason: str, *attempts: Attempt, chosen: str | None = None
        ) -> Decision:
            return Decision(
                outcome,
                reason,
                attempts,
                x0,
                inp,
                chosen=chosen,
                switches=tuple(switches),
                gate=gate.state,
            )

        def trip(reason: str) -> None:
            sw = gate.trip(t0, reason)
            if sw is not None:
                switches.append(sw)

        stale = snapshot.stale_required
        if stale:
            why = "; ".join(f"{n}: {snapshot.points[n].why}" for n in stale)
            trip(f"stale data: {why}")
            return done(Outcome.STALE, f"stale required points: {why}")
        try:
            x0 = self.twin.estimate(snapshot)
        except ValueError as exc:
            trip(f"stale data: {exc}")
            return done(Outcome.STALE, str(exc))
        inp = self.twin.control_input(t0, x0, u_prev, deadline_s)
        if fallback_reason is not None:
            trip(fallback_reason)
            only = self._attempt("fallback", self.fallback, inp, verify_by)
            if only.verdict is not None and only.verdict.approved:
                return done(Outcome.DISPATCH, f"fallback: {fallback_reason}", only)
            return done(Outcome.HOLD, f"hold: {fallback_reason}; fallback {_why(only)}", only)
        if gate.mode is Mode.FALLBACK:
            return self._shadow(t0, inp, verify_by, gate, done, switches)
        first = self._attempt("controller", self.controller, inp, verify_by)
        if first.verdict is not None and first.verdict.approved:
            return done(Outcome.DISPATCH, "controller plan approved", first)
        why_first = _why(first)
        trip(why_first)
        second = self._attempt("fallback", self.fallback, inp, verify_by)
        if second.verdict is not None and second.verdict.approved:
            return done(
                Outcome.DISPATCH, f"fallback: {why_first}", first, second, chosen="fallback"
            )
        return done(Outcome.HOLD, f"hold: {why_first}; fallback {_why(second)}", first, second)

    def _shadow(
        self,
        t0: float,
        inp: ControlInput,
        verify_by: float | None,
        gate: SimplexGate,
        done: Callable[..., Decision],
        switches: list[Switch],
    ) -> Decision:
        """The fallback is in control: its plan first (it is what will be sent), then the
        controller's in the shadow, which counts towards handing control back."""
        fb = self._attempt("fallback", self.fallback, inp, verify_by)
        fb_ok = fb.verdict is not None and fb.verdict.approved
        ctrl = self._attempt("controller", self.controller, inp, verify_by)
        if ctrl.verdict is not None and ctrl.verdict.approved:
            back = gate.controller_verified(t0)
            if back is not None:
                switches.append(back)
                return done(
                    Outcome.DISPATCH,
                    f"controller back in control: {back.reason}",
                    ctrl,
                    fb,
                    chosen="controller",
                )
            if fb_ok:
                why = f"controller verified {gate.streak}/{gate.reverify_cycles} in the shadow"
                return done(Outcome.DISPATCH, f"fallback: {why}", ctrl, fb, chosen="fallback")
            return done(
                Outcome.DISPATCH,
                f"fallback {_why(fb)}; the controller's verified plan is used",
                ctrl,
                fb,
                chosen="controller",
            )
        gate.controller_unverified()
        if fb_ok:
            return done(Outcome.DISPATCH, f"fallback: {_why(ctrl)}", ctrl, fb, chosen="fallback")
        return done(Outcome.HOLD, f"hold: {_why(ctrl)}; fallback {_why(fb)}", ctrl, fb)


def _why(a: Attempt) -> str:
    if a.verdict is None:
        return f"{a.role} {a.result.status.value}: {a.result.message}".rstrip(": ")
    return f"{a.role} plan {a.verdict.summary()}"


# ---------------------------------------------------------------- the cycle's end, pure


@dataclass(frozen=True)
class Unsolved:
    """No decision came back for the cycle: ``BUSY`` (the previous solve still runs),
    ``DEADLINE`` (the solve missed the deadline) or ``HOLD`` (a stop arrived mid-solve)."""

    outcome: Outcome
    reason: str


@dataclass(frozen=True, eq=False)
class CycleStep:
    """What the loop does with one cycle: journal ``decision`` as ``outcome``/``reason``,
    adopt its gate state if ``adopt``, trip the gate if ``trip``, send ``action`` if any."""

    outcome: Outcome
    reason: str
    decision: Decision
    action: Array | None = None
    adopt: bool = False
    trip: str | None = None


def finish_cycle(
    solved: Decision | Unsolved,
    *,
    decided_at: float,
    deadline_at: float,
    check_dispatch: Callable[[Array], str | None],
) -> CycleStep:
    """The cycle's outcome from its solve (or its absence), in one place.

    ``check_dispatch(action)`` says why the action must not leave (the specs once
    more on what is about to be sent), or None.  A decision that comes back after
    ``deadline_at`` (simulated) sends nothing; busy and late cycles trip the gate.
    """
    if isinstance(solved, Unsolved):
        held = Decision(Outcome.HOLD, solved.reason)
        trip = f"deadline: {solved.reason}" if solved.outcome.sends_nothing_by_time else None
        return CycleStep(solved.outcome, solved.reason, held, trip=trip)
    d = solved
    action = d.action if d.outcome is Outcome.DISPATCH else None
    if action is None:
        return CycleStep(d.outcome, d.reason, d, adopt=True)
    if decided_at > deadline_at:
        reason = f"decided too late: {d.reason}"
        return CycleStep(Outcome.DEADLINE, reason, d, adopt=True, trip=f"deadline: {reason}")
    broken = check_dispatch(action)
    if broken is not None:
        return CycleStep(Outcome.HOLD, f"refused at dispatch: {broken}", d, adopt=True)
    return CycleStep(Outcome.DISPATCH, d.reason, d, action, adopt=True)
