"""The verifier: try a plan on a rig and judge the trace against the safety specs.

Pure apart from the rig it is handed.  A ``Verdict`` is a value carrying its
evidence (the rig's output trace and every violation) and a digest that the
command sent to the field refers to.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import numpy as np

from .model import Array
from .rig import Rig
from .specs import SafetySpecs, Violation


@dataclass(frozen=True, eq=False)
class Verdict:
    approved: bool
    source: str  # which controller proposed the plan
    rig: str
    t0: float
    u_plan: Array
    y_rig: Array  # evidence: the rig's outputs under the plan (empty if not run)
    violations: tuple[Violation, ...]
    note: str = ""

    @property
    def digest(self) -> str:
        """sha256 of the verdict's canonical JSON; commands carry it to the field."""
        body = {
            "approved": self.approved,
            "source": self.source,
            "rig": self.rig,
            "t0": self.t0,
            "u_plan": np.round(self.u_plan, 9).tolist(),
            "violations": [v.describe() for v in self.violations],
            "note": self.note,
        }
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def summary(self) -> str:
        if self.approved:
            return f"approved on {self.rig}"
        shown = "; ".join(v.describe() for v in self.violations[:3])
        more = f" (+{len(self.violations) - 3} more)" if len(self.violations) > 3 else ""
        return f"rejected on {self.rig}: {self.note or shown}{more}"


class Verifier:
    """Checks input bounds and rate limits on the plan, output bands on the rig's trace."""

    def __init__(self, specs: SafetySpecs, rig: Rig, dt: float) -> None:
        self.specs = specs
        self.rig = rig
        self.dt = dt

    def verify(
        self,
        *,
        source: str,
        t0: float,
        x0: Array,
        u_prev: Array,
        u_plan: Array,
        disturbances: Array,
    ) -> Verdict:
        plan = np.atleast_2d(np.asarray(u_plan, dtype=float))
        empty = np.empty((0, len(self.specs.output_names)))
        violations = self.specs.check_inputs(u_prev, plan, self.dt)
        if not np.all(np.isfinite(plan)):
            return Verdict(
                False,
                source,
                self.rig.name,
                t0,
                plan,
                empty,
                tuple(violations),
                note="plan contains non-finite inputs",
            )
        try:
            y = np.asarray(self.rig.rollout(x0, plan, disturbances, t0, self.dt), dtype=float)
        except Exception as exc:  # any rig failure means the plan is untried: reject it
            return Verdict(
                False,
                source,
                self.rig.name,
                t0,
                plan,
                empty,
                tuple(violations),
                note=f"rig failed: {type(exc).__name__}: {exc}",
            )
        if y.shape != (plan.shape[0] + 1, len(self.specs.output_names)) or not all(
            math.isfinite(v) for v in y.ravel()
        ):
            return Verdict(
                False,
                source,
                self.rig.name,
                t0,
                plan,
                y,
                tuple(violations),
                note=f"rig returned an unusable trace of shape {y.shape}",
            )
        violations += self.specs.check_outputs(t0, y, self.dt)
        return Verdict(not violations, source, self.rig.name, t0, plan, y, tuple(violations))
