"""The field protocol a ``[field]`` table names, its config model, and its writer.

``field_model(raw)`` picks the protocol's ``FieldConfig`` subclass from a raw table
(``protocol`` key, default ``"opcua"``); ``validate_field(raw)`` validates with it, so
errors carry the table's key paths (``points[3].node``); an unknown protocol is an
error at ``protocol``.  ``open_writer`` and ``field_json_schema`` are what the gateway
and ``parallelcity schema`` need, without naming any protocol.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from parallelcity import plugins
from parallelcity.errors import PluginError
from parallelcity.field.config import DEFAULT_PROTOCOL, FieldConfig
from parallelcity.field.protocol import FieldProtocol, FieldWriter, LinkListener


def protocol_of(field: FieldConfig) -> FieldProtocol:
    return plugins.load_protocol(field.protocol)


def protocol_name(raw: object) -> str | None:
    """The protocol a raw ``[field]`` table names (the default when it names none)."""
    if not isinstance(raw, dict):
        return None
    name = raw.get("protocol", DEFAULT_PROTOCOL)
    return name if isinstance(name, str) else None


def field_model(raw: object) -> type[FieldConfig]:
    """The ``FieldConfig`` subclass of the protocol ``raw`` names; a pydantic
    ``ValidationError`` at ``protocol`` when no such protocol is installed."""
    name = protocol_name(raw)
    if name is None:
        return FieldConfig  # not a table, or a protocol that is not a string: it reports it
    try:
        return plugins.load_protocol(name).field_model
    except PluginError as exc:
        error = PydanticCustomError("unknown_protocol", "{why}", {"why": str(exc)})
        raise ValidationError.from_exception_data(
            "FieldConfig", [InitErrorDetails(type=error, loc=("protocol",), input=name)]
        ) from None


def validate_field(raw: object) -> object:
    """``raw`` validated by its protocol's model (an instance passes as it is)."""
    if isinstance(raw, FieldConfig) or not isinstance(raw, dict):
        return raw
    return field_model(raw).model_validate(raw)


def open_writer(
    field: FieldConfig,
    endpoint: str,
    *,
    security: object | None = None,
    on_link: LinkListener | None = None,
    **options: Any,
) -> FieldWriter:
    """The writer of ``field``'s protocol (not yet connected: ``async with`` it)."""
    return protocol_of(field).writer(
        field, endpoint=endpoint, security=security, on_link=on_link, **options
    )


def field_json_schema(defs: dict[str, Any]) -> dict[str, Any]:
    """``[field]`` for every installed protocol: one variant each, told apart by
    ``protocol`` (absent means the default).  Definitions are added to ``defs``."""
    variants: list[dict[str, Any]] = []
    for name in plugins.protocol_names():
        try:
            model = plugins.load_protocol(name).field_model
        except PluginError:
            continue
        sub = model.model_json_schema(ref_template="#/$defs/{model}")
        defs.update(sub.pop("$defs", {}))
        props = sub.setdefault("properties", {})
        props["protocol"] = {
            "const": name,
            "description": props.get("protocol", {}).get("description", "field protocol"),
        }
        if name == DEFAULT_PROTOCOL:
            props["protocol"]["default"] = name
        else:
            sub["required"] = sorted(set(sub.get("required", [])) | {"protocol"})
        sub["additionalProperties"] = False
        variants.append(sub)
    return {"oneOf": variants}
