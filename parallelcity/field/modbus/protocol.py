"""Modbus TCP as a field protocol: its scenario keys, and its reader, writer and stand-in.

Scenario keys: ``[field] protocol = "modbus"``, ``endpoint`` (``modbus://host:port`` or
``host:port``, default port 502; none runs the rig's stand-in), ``poll_interval_ms``
(wall milliseconds between two polls of every point), ``timeout_s`` (one request);
per point and input the address keys of ``codec.ModbusAddress``: ``unit``, ``table``
(``holding``, ``input``, ``coil``, ``discrete``), ``address``, ``data_type``,
``word_order``, ``scale``, ``offset``.  An input must be a holding register or a coil;
a point's ``type`` must fit its ``data_type``.  This module imports no Modbus stack:
``validate`` and ``schema`` use it as it is.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field, ValidationError, model_validator

from parallelcity.errors import SecurityError
from parallelcity.field.config import FieldConfig, InputMap, PointMap
from parallelcity.field.protocol import (
    FieldProtocol,
    FieldReader,
    FieldWriter,
    LinkListener,
    PlantFactory,
)

from .codec import AddressKeys, ModbusAddress, type_problem, write_problem

if TYPE_CHECKING:
    from parallelcity.clock import Clock
    from parallelcity.field.protocol import FieldStandIn
    from parallelcity.scenario.definition import Scenario

DEFAULT_PORT = 502
_ENDPOINT = re.compile(
    r"^(?:modbus://)?(?P<host>\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+)(?::(?P<port>\d{1,5}))?$"
)


class _Address(AddressKeys):
    """The address keys of a point or an input; an input must be a holding register or a
    coil."""

    def modbus_address(self) -> ModbusAddress:
        return ModbusAddress(**{key: getattr(self, key) for key in AddressKeys.model_fields})

    def _checked(self) -> ModbusAddress:
        try:
            return self.modbus_address()
        except ValidationError as exc:
            why = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
            raise ValueError(why) from None

    def address_text(self) -> str:
        return self.modbus_address().describe()


class ModbusPoint(PointMap, _Address):
    def address_text(self) -> str:
        return _Address.address_text(self)

    @model_validator(mode="after")
    def _fits(self) -> ModbusPoint:
        why = type_problem(self.type, self._checked())
        if why is not None:
            raise ValueError(why)
        return self


class ModbusInput(InputMap, _Address):
    def address_text(self) -> str:
        return _Address.address_text(self)

    @model_validator(mode="after")
    def _writable(self) -> ModbusInput:
        why = write_problem(self._checked())
        if why is not None:
            raise ValueError(why)
        return self


class ModbusField(FieldConfig):
    point_model: ClassVar[type[PointMap]] = ModbusPoint
    input_model: ClassVar[type[InputMap]] = ModbusInput

    poll_interval_ms: float = Field(
        100.0, gt=0, description="wall milliseconds between two polls of every point"
    )
    timeout_s: float = Field(
        2.0, gt=0, le=60, description="wall seconds one request may take before it counts as lost"
    )
    points: Sequence[ModbusPoint] = Field(min_length=1)
    inputs: Sequence[ModbusInput] = Field(min_length=1)

    @model_validator(mode="after")
    def _endpoint(self) -> ModbusField:
        if self.endpoint is not None:
            host_port(self.endpoint)
        return self


def host_port(endpoint: str) -> tuple[str, int]:
    """``modbus://host:port`` or ``host[:port]`` as (host, port); ValueError otherwise."""
    m = _ENDPOINT.match(endpoint.strip())
    port = int(m["port"]) if m and m["port"] else DEFAULT_PORT
    if m is None or not 0 < port < 65536:
        raise ValueError(f"endpoint {endpoint!r} is not modbus://HOST:PORT or HOST:PORT")
    return m["host"].strip("[]"), port


def as_modbus(field: FieldConfig) -> ModbusField:
    if not isinstance(field, ModbusField):
        raise TypeError(f"a Modbus field config is needed, got {type(field).__name__}")
    return field


def _no_security(security: object | None) -> None:
    """Modbus TCP has none: only None, or another protocol's "insecure" settings (the runtime
    builds one security object for the run), are accepted."""
    if security is not None and getattr(security, "secure", True):
        raise SecurityError(
            "Modbus TCP has no authentication or encryption: it cannot honour secure settings; "
            "a Modbus field runs only as an insecure lab link ([security] insecure_lab = true)"
        )


class ModbusProtocol(FieldProtocol):
    name: ClassVar[str] = "modbus"
    field_model: ClassVar[type[FieldConfig]] = ModbusField
    title: ClassVar[str] = "Modbus TCP"

    def endpoint_problem(self, endpoint: str) -> str | None:
        try:
            host_port(endpoint)
        except ValueError as exc:
            return str(exc)
        return None

    def reader(
        self,
        field: FieldConfig,
        clock: Clock,
        *,
        endpoint: str,
        security: object | None = None,
        **options: Any,
    ) -> FieldReader:
        from .reader import ModbusReader

        _no_security(security)
        f = as_modbus(field)
        host, port = host_port(endpoint)
        options.setdefault("poll_interval_s", f.poll_interval_ms / 1000.0)
        options.setdefault("timeout_s", f.timeout_s)
        points = [(p.name, p.modbus_address(), p.type) for p in f.points]
        inputs = {i.name: i.modbus_address() for i in f.inputs}
        return ModbusReader(points, inputs, clock, host=host, port=port, **options)

    def writer(
        self,
        field: FieldConfig,
        *,
        endpoint: str,
        security: object | None = None,
        on_link: LinkListener | None = None,
        **options: Any,
    ) -> FieldWriter:
        from .writer import ModbusWriter

        _no_security(security)
        f = as_modbus(field)
        host, port = host_port(endpoint)
        options.setdefault("timeout_s", f.timeout_s)
        inputs = {i.name: i.modbus_address() for i in f.inputs}
        return ModbusWriter(host, port, inputs, on_link=on_link, **options)

    def stand_in(
        self,
        scenario: Scenario,
        clock: Clock,
        *,
        make_plant: PlantFactory,
        tick_ms: float = 50.0,
    ) -> FieldStandIn:
        from .stand_in import ModbusStandIn

        f = as_modbus(scenario.field)
        model = scenario.model
        served: FieldStandIn = ModbusStandIn(
            {p.name: p.modbus_address() for p in f.points},
            {i.name: i.modbus_address() for i in f.inputs},
            outputs=model.point_signals,
            input_names=model.inputs,
            make_plant=make_plant,
            clock=clock,
            tick_ms=tick_ms,
            insecure_lab=scenario.insecure_lab,
        )
        return served

    def describe(self, field: FieldConfig) -> list[tuple[str, str, str]]:
        rows = super().describe(field)
        return [(n, a, r.replace("(writable)", "(holding/coil, writable)")) for n, a, r in rows]

    def summary(self, field: FieldConfig) -> str:
        f = as_modbus(field)
        units = sorted({p.unit for p in f.points} | {i.unit for i in f.inputs})
        return (
            f"Modbus TCP, unit(s) {', '.join(map(str, units))}, polled every "
            f"{f.poll_interval_ms:g} ms: {len(f.points)} points, {len(f.inputs)} inputs"
        )


PROTOCOL = ModbusProtocol()
