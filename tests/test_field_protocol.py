"""The field-protocol boundary: a third protocol, registered through the loader's hook, is
picked from a scenario's ``[field] protocol`` and its address keys validated with key paths."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import pytest
from pydantic import Field

from parallelcity import plugins
from parallelcity.backoff import Backoff
from parallelcity.clock import Clock, FakeClock
from parallelcity.errors import FieldConnectionError, PluginError, ScenarioError
from parallelcity.field.config import FieldConfig, InputMap, PointMap
from parallelcity.field.mirror import Mirror
from parallelcity.field.opcua.config import OpcUaField
from parallelcity.field.protocol import (
    STATUS_BAD,
    STATUS_GOOD,
    FieldProtocol,
    FieldReader,
    FieldWriter,
    LinkListener,
    ReadingSink,
)
from parallelcity.field.protocols import field_json_schema
from parallelcity.scenario.definition import parse_scenario

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


class PolledReader:
    """A reader without source times (the reading is stamped when it was taken), driven by
    the test: ``poll`` offers values, ``down`` makes the link fail."""

    def __init__(self, endpoint: str, clock: Clock) -> None:
        self._endpoint, self.clock = endpoint, clock
        self.sink: ReadingSink | None = None
        self.down: str | None = None
        self.opens = 0

    @property
    def endpoint(self) -> str:
        return self._endpoint

    @property
    def start_budget_s(self) -> float:
        return 1.0

    async def open(self, sink: ReadingSink) -> None:
        if self.down is not None:
            raise FieldConnectionError(f"{self._endpoint}: {self.down}")
        self.sink, self.opens = sink, self.opens + 1

    async def close(self) -> None:
        self.sink = None

    def problem(self) -> str | None:
        return self.down if self.down is not None else (None if self.sink else "closed")

    async def read_inputs(self) -> dict[str, float]:
        return {"u": 1.0}

    def poll(self, values: dict[str, object], status: int = STATUS_GOOD) -> ReadingSink:
        assert self.sink is not None
        for name, raw in values.items():
            self.sink.offer(name, raw, self.clock.now(), status)
        return self.sink


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
        return PolledReader(endpoint, clock)

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
    """The [field] part of `parallelcity schema` (json_schema puts it under field)."""
    jsonschema = pytest.importorskip("jsonschema")
    import tomllib

    defs: dict[str, Any] = {}
    schema = {"$defs": defs, **field_json_schema(defs)}
    variants = schema["oneOf"]
    assert {v["properties"]["protocol"]["const"] for v in variants} >= {"opcua", "registers"}
    data = tomllib.loads(_on_registers(DH.read_text()))["field"]
    jsonschema.validate(data, schema)
    data["points"][0]["reg"] = "x"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, schema)
    jsonschema.validate(tomllib.loads(DH.read_text())["field"], schema)  # no protocol: opcua


def test_a_reader_without_source_times_feeds_the_generic_mirror(
    registers: RegisterProtocol,
) -> None:
    """Freshness from the time a reading was taken, status onto quality, gaps and reopening."""
    field = parse_scenario(_on_registers(DH.read_text()), DH).field
    clock = FakeClock(t=1_000_000.0)
    names = [p.name for p in field.points]
    max_age = {p.name: p.max_age_s for p in field.points}

    async def body() -> None:
        mirror = Mirror(field, clock, endpoint="registers://x", backoff=Backoff(0.01, 0.02))
        reader = mirror.reader
        assert isinstance(reader, PolledReader)
        async with mirror:
            assert not await mirror.wait_all_received(0.01)
            reader.poll(dict.fromkeys(names, 20.0))
            assert await mirror.wait_all_received(1.0)
            assert mirror.snapshot().stale_required == [] and mirror.snapshot().link_up
            assert await mirror.read_inputs() == {"u": 1.0}
            # a point that stops answering is stale once its max age has passed, not before
            first = names[0]
            clock.t += max_age[first] - 1.0
            reader.poll({n: 20.0 for n in names[1:]})
            assert first not in mirror.snapshot().stale_required
            clock.t += 2.0
            assert mirror.snapshot().points[first].why.startswith("age ")
            reader.poll({first: 20.0}, status=STATUS_BAD | 0x02)
            assert "status bad" in mirror.snapshot().points[first].why
            # the link fails: every point is held, the reader reopened with a fresh sink
            old = reader.poll({first: 20.0})
            reader.down = "device gone"
            assert all(p.stale for p in mirror.snapshot().points.values())
            async with asyncio.timeout(5.0):
                while mirror.gaps == 0:
                    await asyncio.sleep(0.01)
                reader.down = None
                while not mirror.connected:
                    await asyncio.sleep(0.01)
            old.offer(first, 21.0, clock.now() + 1.0, STATUS_GOOD)  # the lost session: dropped
            assert mirror.snapshot().points[first].reading.value == 20.0  # type: ignore[union-attr]
            clock.t += 1.0
            reader.poll(dict.fromkeys(names, 22.0))
            snap = mirror.snapshot()
            assert not any(p.stale for p in snap.points.values()) and snap.value(first) == 22.0
            assert [e.kind for e in mirror.take_events()] == ["lost", "restored"]
            assert reader.opens == 2

    asyncio.run(body())
