"""One control cycle's decision, pure and synchronous: snapshot in, decision out.

    stale required point ──────────────────────────────► STALE (nothing sent)
    controller plan ── usable? ── verified? ── yes ────► DISPATCH (controller)
          │ no                       │ no
          ▼                          ▼
    fallback plan ─── usable? ── verified? ── yes ─────► DISPATCH (fallback)
                          │ no       │ no
                          ▼          ▼
                         HOLD: nothing sent, the field keeps its last approved inputs

Only a plan with an approving verdict can become an action, and the action is
always the first row of the verified plan.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from .control import ControlInput, Controller, ControlProblem, ControlResult, SolveStatus
from .model import Array
from .snapshot import Snapshot
from .twin import Twin
from .verify import Verdict, Verifier


class Outcome(StrEnum):
    DISPATCH = "dispatch"
    HOLD = "hold"
    STALE = "stale"


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

    @property
    def approved(self) -> Attempt | None:
        for a in self.attempts:
            if a.verdict is not None and a.verdict.approved:
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


def _safe_step(controller: Controller, inp: ControlInput) -> ControlResult:
    """A controller that raises is a failed solve, not a crashed cycle."""
    started = time.perf_counter()
    try:
        return controller.step(inp)
    except Exception as exc:
        nan = math.nan
        n, nu = inp.disturbances.shape[0], inp.u_prev.shape[0]
        return ControlResult(
            status=SolveStatus.FAILED,
            u_plan=np.full((n, nu), nan),
            x_pred=np.full((n + 1, inp.x0.shape[0]), nan),
            y_pred=np.empty((n + 1, 0)),
            cost=nan,
            iterations=0,
            solve_time_s=time.perf_counter() - started,
            message=f"controller raised {type(exc).__name__}: {exc}",
        )


class CycleLogic:
    def __init__(
        self, twin: Twin, controller: Controller, fallback: Controller, verifier: Verifier
    ) -> None:
        self.twin = twin
        self.controller = controller
        self.fallback = fallback
        self.verifier = verifier

    def setup(self) -> None:
        specs = self.twin.specs
        problem = ControlProblem(
            model=self.twin.model,
            dt=self.twin.dt,
            horizon=self.twin.horizon,
            u_min=specs.u_min,
            u_max=specs.u_max,
            du_max=specs.du_max(self.twin.dt),
            banded_outputs=specs.banded_outputs,
        )
        self.controller.setup(problem)
        self.fallback.setup(problem)

    def _attempt(self, role: str, controller: Controller, inp: ControlInput) -> Attempt:
        result = _safe_step(controller, inp)
        if not result.status.usable:
            return Attempt(role, result, None)
        verdict = self.verifier.verify(
            source=role,
            t0=inp.t0,
            x0=inp.x0,
            u_prev=inp.u_prev,
            u_plan=result.u_plan,
            disturbances=inp.disturbances,
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
    ) -> Decision:
        """Decide one cycle.  ``fallback_reason`` skips the controller (e.g. the twin
        diverges from the field) and goes straight to the verified fallback."""
        stale = snapshot.stale_required
        if stale:
            why = "; ".join(f"{n}: {snapshot.points[n].why}" for n in stale)
            return Decision(Outcome.STALE, f"stale required points: {why}")
        try:
            x0 = self.twin.estimate(snapshot)
        except ValueError as exc:
            return Decision(Outcome.STALE, str(exc))
        inp = self.twin.control_input(t0, x0, u_prev, deadline_s)
        if fallback_reason is not None:
            only = self._attempt("fallback", self.fallback, inp)
            if only.verdict is not None and only.verdict.approved:
                return Decision(Outcome.DISPATCH, f"fallback: {fallback_reason}", (only,), x0, inp)
            return Decision(
                Outcome.HOLD, f"hold: {fallback_reason}; fallback {_why(only)}", (only,), x0, inp
            )
        first = self._attempt("controller", self.controller, inp)
        if first.verdict is not None and first.verdict.approved:
            return Decision(Outcome.DISPATCH, "controller plan approved", (first,), x0, inp)
        why_first = _why(first)
        second = self._attempt("fallback", self.fallback, inp)
        attempts = (first, second)
        if second.verdict is not None and second.verdict.approved:
            return Decision(Outcome.DISPATCH, f"fallback: {why_first}", attempts, x0, inp)
        return Decision(
            Outcome.HOLD, f"hold: {why_first}; fallback {_why(second)}", attempts, x0, inp
        )


def _why(a: Attempt) -> str:
    if a.verdict is None:
        return f"{a.role} {a.result.status.value}: {a.result.message}".rstrip(": ")
    return f"{a.role} plan {a.verdict.summary()}"
