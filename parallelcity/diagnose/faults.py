"""A fault as the plant has it: one ``FaultKind`` on one component, from a start time on.

Pure: the plant (``hil.plant.PlantSimulator``) asks each ``ActiveFault`` for the
parameters, inputs and readings it should use at simulated time ``t``; the diagnoser
evaluates its hypotheses with the same functions, so the injected fault and the one
the twin explains are one definition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from parallelcity.twin.model import Array, FaultEffect, FaultKind, FaultTarget, SubsystemModel

__all__ = ["ActiveFault", "FaultSpec", "FaultTarget", "check_spec", "targets"]


@dataclass(frozen=True)
class FaultSpec:
    """Which fault, where, how large and from when (simulated epoch seconds)."""

    kind: str
    component: str
    size: float | None
    start: float


def targets(model: SubsystemModel, kind: FaultKind, component: str) -> tuple[int, ...]:
    """Indices the fault perturbs: parameters, inputs or (a sensor fault) the output."""
    if kind.applies_to is FaultTarget.SENSOR:
        return (model.index("outputs", component),)
    names = kind.components.get(component)
    if names is None:
        raise KeyError(
            f"fault {kind.name} has no component {component!r} "
            f"(components: {', '.join(kind.components)})"
        )
    pool = "parameters" if kind.applies_to is FaultTarget.PARAMETER else "inputs"
    return tuple(model.index(pool, n) for n in names)


def check_spec(model: SubsystemModel, spec: FaultSpec) -> FaultKind:
    """The spec's kind, or ValueError saying what is wrong with the spec."""
    try:
        kind = model.fault_kind(spec.kind)
        targets(model, kind, spec.component)
    except KeyError as exc:
        raise ValueError(str(exc.args[0])) from None
    if kind.sized and (spec.size is None or not math.isfinite(spec.size)):
        raise ValueError(f"fault {kind.name} needs a finite size ({kind.unit or 'no unit'})")
    if not kind.sized and spec.size is not None:
        raise ValueError(f"fault {kind.name} has no size: it freezes at its value at the start")
    if kind.effect is FaultEffect.SCALE and spec.size is not None and not 0 < spec.size < 1:
        raise ValueError(f"fault {kind.name}: size is a fraction lost, in (0, 1)")
    return kind


class ActiveFault:
    """One fault applied to the plant's parameters, inputs or readings (explicit state: the
    value a stuck reading or input froze at)."""

    def __init__(self, model: SubsystemModel, spec: FaultSpec) -> None:
        self.kind = check_spec(model, spec)
        self.spec = spec
        self.index = targets(model, self.kind, spec.component)
        self.size = 0.0 if spec.size is None else float(spec.size)
        self.frozen: Array | None = None

    def active(self, t: float) -> bool:
        return t >= self.spec.start

    def params(self, p: Array, t: float) -> Array:
        """Parameters as the faulty plant has them at ``t``."""
        if self.kind.applies_to is not FaultTarget.PARAMETER or not self.active(t):
            return p
        out = np.array(p, dtype=float)
        idx = list(self.index)
        if self.kind.effect is FaultEffect.SCALE:
            out[idx] *= 1.0 - self.size
        else:
            out[idx] += self.size
        return out

    def inputs(self, u: Array, t: float) -> Array:
        """Inputs the plant really gets at ``t`` under commanded ``u``."""
        if self.kind.applies_to is not FaultTarget.INPUT:
            return u
        idx = list(self.index)
        if not self.active(t):
            return u
        if self.frozen is None:
            self.frozen = np.array(u, dtype=float)[idx]
        out = np.array(u, dtype=float)
        out[idx] = self.frozen
        return out

    def readings(self, y: Array, t: float) -> Array:
        """Outputs as the field's sensors report them at ``t``."""
        if self.kind.applies_to is not FaultTarget.SENSOR or not self.active(t):
            return y
        out = np.array(y, dtype=float)
        i = self.index[0]
        if self.kind.effect is FaultEffect.DRIFT:
            out[i] += self.size * (t - self.spec.start) / 3600.0
        else:
            if self.frozen is None:
                self.frozen = np.array([y[i]], dtype=float)
            out[i] = self.frozen[0]
        return out
