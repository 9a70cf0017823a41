"""The protocol-free part of a scenario's ``[field]`` table.  Pure: pydantic models only.

Every field protocol shares these keys; a protocol (``parallelcity.field.protocol``)
subclasses ``PointMap``, ``InputMap`` and ``FieldConfig`` to add its address keys
per point and input and its protocol-wide settings.  ``[field] protocol`` names the
protocol (default ``"opcua"``), so a scenario written before protocols were
plug-ins still loads unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from parallelcity.field.point_table import (
    DEFAULT_MAX_CLOCK_SKEW_S,
    PointRule,
    PointTable,
    PointType,
)
from parallelcity.field.snapshot import PointSpec

DEFAULT_PROTOCOL = "opcua"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class PointMap(Strict):
    """One measured point: the keys every protocol shares."""

    name: str = Field(description="model output this point measures")
    max_age_s: float = Field(gt=0, description="older than this (simulated s) counts as stale")
    required: bool = Field(True, description="a stale required point stops the cycle's action")
    type: PointType = Field(
        "float",
        description="value type the point must carry: float, int or bool (read as 0/1); "
        "other types are refused",
    )
    min: float | None = Field(
        None, description="plausible minimum: a lower value is refused and the point is stale"
    )
    max: float | None = Field(
        None, description="plausible maximum: a higher value is refused and the point is stale"
    )
    max_clock_skew_s: float | None = Field(
        None,
        ge=0,
        description="a source time further ahead of the clock (s) is refused; "
        "default field.max_clock_skew_s",
    )

    @property
    def on_change_only(self) -> bool:
        """The protocol reports this point only when it changes (a deadband, an event-driven
        setpoint): its age counts from the reader's last sign of life, not its last change."""
        return False

    def address_text(self) -> str:
        """The point's address as a person reads it (listings, messages)."""
        return self.name

    @model_validator(mode="after")
    def _range(self) -> PointMap:
        if self.min is not None and self.max is not None and not self.min <= self.max:
            raise ValueError(f"min {self.min:g} is above max {self.max:g}")
        return self


class InputMap(Strict):
    """One model input the gateway writes: the keys every protocol shares."""

    name: str = Field(description="model input this address drives")
    safe: float | None = Field(
        None,
        description="the embedded gateway's watchdog reverts this input to this value "
        "(within its specs.inputs bounds); needs [field.watchdog]",
    )

    def address_text(self) -> str:
        return self.name


class FieldWatchdog(Strict):
    """The embedded gateway's heartbeat watchdog (a separate gateway has its own config)."""

    heartbeat_interval_s: float = Field(
        gt=0, description="expected heartbeat period (simulated s); the runtime beats twice as fast"
    )
    missed_heartbeats: int = Field(
        3, ge=1, description="this many intervals of silence revert the inputs to their safe values"
    )


class FieldConfig(Strict):
    """``[field]``: where the field is and which model signal each address carries.

    A protocol's subclass sets ``point_model`` and ``input_model`` to its own
    ``PointMap`` / ``InputMap`` subclasses and narrows ``points`` / ``inputs`` to them.
    """

    point_model: ClassVar[type[PointMap]] = PointMap
    input_model: ClassVar[type[InputMap]] = InputMap

    protocol: str = Field(
        DEFAULT_PROTOCOL,
        description="field protocol (entry point group parallelcity.protocols): opcua, modbus, ...",
    )
    endpoint: str | None = Field(None, description="field endpoint; none runs the embedded rig")
    gateway: str | None = Field(None, description="field gateway ZeroMQ address")
    max_clock_skew_s: float = Field(
        DEFAULT_MAX_CLOCK_SKEW_S,
        ge=0,
        description="clock seconds a point's source time may lie ahead of the runtime's "
        "clock; a reading stamped further ahead is refused (per point: max_clock_skew_s)",
    )
    points: Sequence[PointMap] = Field(min_length=1)
    inputs: Sequence[InputMap] = Field(min_length=1)
    watchdog: FieldWatchdog | None = Field(
        None, description="heartbeat watchdog of the embedded gateway (safe values per input)"
    )

    @model_validator(mode="after")
    def _unique(self) -> FieldConfig:
        for what, items in (("points", self.points), ("inputs", self.inputs)):
            seen: set[str] = set()
            for item in items:
                if item is None:  # a lenient partial config (see scenario.definition)
                    continue
                if item.name in seen:
                    raise ValueError(f"{what}: {item.name!r} is mapped twice")
                seen.add(item.name)
        return self

    def point_specs(self) -> dict[str, PointSpec]:
        """Each point's freshness rule (its age limit, whether it is required)."""
        return {
            p.name: PointSpec(p.name, p.max_age_s, p.required, event_driven=p.on_change_only)
            for p in self.points
        }

    def point_table(self) -> PointTable:
        """Each point's plausibility rule (type, range, clock skew)."""
        skew = self.max_clock_skew_s
        return PointTable(
            {
                p.name: PointRule(
                    p.type, p.min, p.max, skew if p.max_clock_skew_s is None else p.max_clock_skew_s
                )
                for p in self.points
            }
        )
