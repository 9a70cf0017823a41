"""OPC UA's scenario keys: ``[field] namespace``, ``sampling_interval_ms``,
``start_timeout_s``; per point ``node`` (``s=...``, ``i=...``, ``g=...``, ``b=...``, without
``ns=``), ``sampling_interval_ms``, ``deadband``, ``event_driven``; per input ``node``.
Pure: pydantic models only, no OPC UA stack."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, ClassVar
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field

from parallelcity.field.config import FieldConfig, InputMap, PointMap
from parallelcity.field.opcua.node_id import check_scenario_node

NodeText = Annotated[str, AfterValidator(check_scenario_node)]
"""A NodeId as a scenario writes it (``s=...``, ``i=...``, ``g=...``, ``b=...``)."""


class OpcUaPoint(PointMap):
    node: NodeText = Field(description="NodeId in the field namespace, e.g. 's=dh/plant/T_supply'")
    sampling_interval_ms: float | None = Field(
        None, gt=0, description="server sampling of this point; default field.sampling_interval_ms"
    )
    deadband: float | None = Field(
        None, ge=0, description="absolute deadband: smaller changes are not reported"
    )
    event_driven: bool = Field(
        False,
        description="the node changes only when written (a setpoint): its age counts from the "
        "subscription's last sign of life, not from its last change",
    )

    @property
    def on_change_only(self) -> bool:
        return self.deadband is not None or self.event_driven

    def address_text(self) -> str:
        return self.node


class OpcUaInput(InputMap):
    node: NodeText = Field(description="NodeId in the field namespace, e.g. 's=dh/plant/T_set'")

    def address_text(self) -> str:
        return self.node


class OpcUaField(FieldConfig):
    point_model: ClassVar[type[PointMap]] = OpcUaPoint
    input_model: ClassVar[type[InputMap]] = OpcUaInput

    namespace: str = Field(description="OPC UA namespace URI the NodeIds live in")
    sampling_interval_ms: float = Field(100.0, gt=0, description="wall milliseconds")
    start_timeout_s: float | None = Field(
        None,
        gt=0,
        description="wall seconds a mirror start (connect, check and subscribe every point) "
        "may take; default 5 s plus 4 ms per point",
    )
    points: Sequence[OpcUaPoint] = Field(min_length=1)
    inputs: Sequence[OpcUaInput] = Field(min_length=1)


def as_opcua(field: FieldConfig) -> OpcUaField:
    """``field`` as the OPC UA field config it must be (a programming error otherwise)."""
    if not isinstance(field, OpcUaField):
        raise TypeError(f"an OPC UA field config is needed, got {type(field).__name__}")
    return field


def endpoint_problem(url: str) -> str | None:
    """Why ``url`` is not an ``opc.tcp://HOST:PORT`` endpoint URL, or None."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"{url!r} is not an opc.tcp://HOST:PORT URL ({exc})"
    if parts.scheme.lower() != "opc.tcp":
        return f"{url!r} is not an opc.tcp://HOST:PORT URL (scheme {parts.scheme or 'missing'!r})"
    if not parts.hostname:
        return f"{url!r} is not an opc.tcp://HOST:PORT URL (no host)"
    if port is None:
        return f"{url!r} has no port: write opc.tcp://{parts.hostname}:4840 for the default"
    return None
