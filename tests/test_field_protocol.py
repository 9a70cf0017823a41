"""The field-protocol boundary: a third protocol, registered through the loader's hook, is
picked from a scenario's ``[field] protocol`` and its address keys validated with key paths."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import pytest
from pydantic import Field

from parallelcity import plugins
from parallelcity.clock import Clock
from parallelcity.errors import PluginError, ScenarioError
from parallelcity.field.config import FieldConfig, InputMap, PointMap
from parallelcity.field.opcua.protocol import OpcUaField
from parallelcity.field.protocol import FieldProtocol, FieldReader, FieldWriter, LinkListener
from parallelcity.scenario.definition import json_schema, parse_scenario

from .conftest import DH


class RegisterPoint(PointMap):
    reg: int = Field(ge=0, le=65535, description="register number")


class RegisterInput(InputMap):
    reg: int = Field(ge=0, le=65535, description="register number")


class RegisterField(FieldConfig):
    point_model: ClassVar[type[PointMap]] = RegisterPoint
    input_model: ClassVar[type[InputMap]] = RegisterInput

    unit: int = Field(1, ge=0, le=247, description="device unit id")
    points: Sequence[RegisterPoint] = Field(min_length=1)
    inputs: Sequence[RegisterInput] = Field(min_length=1)


class RegisterProtocol(FieldProtocol):
    name: ClassVar[str] = "registers"
    field_model: ClassVar[type[FieldConfig]] = RegisterField

    def reader(
        self,
        field: FieldConfig,
        clock: Clock,
        *,
        endpoint: str,
        security: object | None = None,
        **options: Any,
    ) -> FieldReader:
        raise NotImplementedError

    def writer(
        self,
        field: FieldConfig,
        *,
        endpoint: str,
        security: object | None = None,
        on_link: LinkListener | None = None,
        **options: Any,
    ) -> FieldWriter:
        raise NotImplementedError


@pytest.fixture
def registers() -> Iterator[RegisterProtocol]:
    protocol = RegisterProtocol()
    plugins.register_protocol(protocol)
    yield protocol
    plugins.unregister_protocol(protocol.name)


def _on_registers(text: str, first_register: str = "0") -> str:
    """The district-heating scenario with its [field] addressed by register numbers."""
    text = text.replace(
        'namespace = "urn:parallelcity:district-heating"', 'protocol = "registers"\nunit = 3'
    )
    text = text.replace("sampling_interval_ms = 50\n", "")
    count = iter(range(1000))
    text = re.sub(r'node = "s=dh/[^"]*"', lambda _: f"reg = {next(count)}", text)
    return text.replace("reg = 0\n", f"reg = {first_register}\n", 1)


def test_the_builtin_opcua_protocol_loads_typed() -> None:
    opcua = plugins.load_protocol("opcua")
    assert isinstance(opcua, FieldProtocol) and opcua.field_model is OpcUaField
    assert "opcua" in plugins.protocol_names()
    with pytest.raises(PluginError, match="unknown field protocol 'nope'"):
        plugins.load_protocol("nope")


def test_a_registered_protocol_is_picked_from_the_scenario(registers: RegisterProtocol) -> None:
    scenario = parse_scenario(_on_registers(DH.read_text()), DH)
    field = scenario.field
    assert isinstance(field, RegisterField) and field.unit == 3
    assert [p.reg for p in field.points][:2] == [0, 1]  # type: ignore[attr-defined]
    assert isinstance(field.inputs[0], RegisterInput)


def test_its_address_keys_are_validated_with_the_key_path(registers: RegisterProtocol) -> None:
    text = _on_registers(DH.read_text(), first_register="70000")
    text = text.replace("reg = 5\n", 'reg = 5\nnode = "s=x"\n', 1)
    with pytest.raises(ScenarioError) as err:
        parse_scenario(text, DH)
    problems = err.value.problems
    assert any(p.startswith("field.points[0].reg: ") for p in problems), problems
    assert "field.points[5].node: unknown key (not allowed here)" in problems


def test_an_unknown_protocol_is_refused_at_its_key(registers: RegisterProtocol) -> None:
    text = _on_registers(DH.read_text()).replace('protocol = "registers"', 'protocol = "nope"')
    with pytest.raises(ScenarioError) as err:
        parse_scenario(text, DH)
    assert any(
        p.startswith("field.protocol: unknown field protocol 'nope'") for p in err.value.problems
    ), err.value.problems


def test_the_schema_describes_every_installed_protocol(registers: RegisterProtocol) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    import tomllib

    schema = json_schema()
    variants = schema["properties"]["field"]["oneOf"]
    assert {v["properties"]["protocol"]["const"] for v in variants} >= {"opcua", "registers"}
    data = json.loads(json.dumps(tomllib.loads(_on_registers(DH.read_text())), default=str))
    jsonschema.validate(data, schema)
    data["field"]["points"][0]["reg"] = "x"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, schema)
    opcua = json.loads(json.dumps(tomllib.loads(DH.read_text()), default=str))
    jsonschema.validate(opcua, schema)
