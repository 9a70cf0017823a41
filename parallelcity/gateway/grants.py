"""What one client key may do at a field gateway: equipment, inputs, value ranges, re-arm,
and the issuers it speaks for.  Pure: the gateway's decision checks it, the ZAP handler
names it, and neither needs the other's imports.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from parallelcity.dispatch.wire import show_number
from parallelcity.gateway.watchdog import equipment_of


@dataclass(frozen=True)
class Grant:
    """What one client may do.

    ``equipment`` and ``inputs`` are unions: an input is allowed when it is
    listed or its equipment is.  ``None`` for both means every input the
    gateway drives.  ``ranges`` narrows an input's values further than the
    gateway's own bounds.

    ``issuers`` binds the key to the issuer names it speaks for: a command,
    heartbeat or re-arm naming any other issuer is refused.  Empty (the
    default) means the grant's own name; ``None`` means any issuer, which only
    makes sense without CURVE (insecure lab), where there is no key to bind.
    """

    name: str
    equipment: frozenset[str] | None = None
    inputs: frozenset[str] | None = None
    ranges: Mapping[str, tuple[float, float]] = field(default_factory=dict, hash=False)
    rearm: bool = False
    issuers: frozenset[str] | None = frozenset()

    def __post_init__(self) -> None:
        if self.issuers is not None and not self.issuers:
            object.__setattr__(self, "issuers", frozenset({self.name}))

    @classmethod
    def everything(cls, name: str, issuers: frozenset[str] | None = frozenset()) -> Grant:
        return cls(name, None, None, {}, rearm=True, issuers=issuers)

    def check_issuer(self, issuer: str) -> str | None:
        """``None`` if this key speaks for ``issuer``; otherwise why not (naming only its own)."""
        if self.issuers is None or issuer in self.issuers:
            return None
        own = ", ".join(repr(i) for i in sorted(self.issuers))
        return f"client {self.name!r} is bound to issuer {own}; it may not speak for another"

    def allows_input(self, name: str) -> bool:
        if self.equipment is None and self.inputs is None:
            return True
        return (self.inputs is not None and name in self.inputs) or (
            self.equipment is not None and equipment_of(name) in self.equipment
        )

    def check(self, setpoints: Mapping[str, float]) -> str | None:
        """``None`` if every setpoint is allowed; otherwise why not."""
        problems = []
        for name, value in setpoints.items():
            if not self.allows_input(name):
                problems.append(f"{name} is not among the inputs client {self.name!r} may drive")
                continue
            rng = self.ranges.get(name)
            if rng is not None and not rng[0] <= value <= rng[1]:
                problems.append(
                    f"{name} = {show_number(value)} is outside "
                    f"[{show_number(rng[0])}, {show_number(rng[1])}] allowed "
                    f"to client {self.name!r}"
                )
        return "; ".join(problems) if problems else None
