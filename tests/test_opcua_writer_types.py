"""The gateway's OPC UA writer writes each setpoint as its node's DataType.

A PLC's setpoints are Booleans (a pump's run command), integers and Floats (REAL) as
often as Doubles, and a server refuses a write of another type (BadTypeMismatch): the
writer used to send every value as a Double, so a Boolean run command was refused on
every cycle.  Against a real asyncua server on 127.0.0.1 with inputs of several types:
each lands as its node's type, the read-back gives the values written, a value its node
cannot hold is refused before anything is sent, and a node that holds no number is a
mapping error at connect.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from asyncua import Server, ua
from parallelcity.hil.field import free_port

from parallelcity.errors import FieldError, NodeMappingError
from parallelcity.field.opcua.config import OpcUaField, OpcUaInput, OpcUaPoint
from parallelcity.field.opcua.writer import OpcUaWriter

pytestmark = pytest.mark.slow  # an asyncua server per test

NAMESPACE = "urn:test:typed-inputs"
TYPES = {
    "pump.on": (ua.VariantType.Boolean, False),
    "pump.stage": (ua.VariantType.Int16, 0),
    "valve.steps": (ua.VariantType.UInt16, 0),
    "tank.level_set": (ua.VariantType.Float, 0.0),
    "tank.flow_set": (ua.VariantType.Double, 0.0),
}


def _field(names: list[str]) -> OpcUaField:
    return OpcUaField(
        namespace=NAMESPACE,
        points=[OpcUaPoint(name="x", node=f"s={names[0]}", max_age_s=60.0)],
        inputs=[OpcUaInput(name=n, node=f"s={n}") for n in names],
    )


@asynccontextmanager
async def typed_server(extra: dict[str, Any] | None = None) -> AsyncIterator[tuple[str, dict]]:
    server = Server()
    await server.init()
    endpoint = f"opc.tcp://127.0.0.1:{free_port()}"
    server.set_endpoint(endpoint)
    server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    ns = await server.register_namespace(NAMESPACE)
    nodes = {}
    for name, (variant, initial) in {**TYPES, **(extra or {})}.items():
        node = await server.nodes.objects.add_variable(
            ua.NodeId(name, ns), ua.QualifiedName(name, ns), initial, variant
        )
        await node.set_writable()
        nodes[name] = node
    async with server:
        yield endpoint, nodes


def run(coro: Any) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(60):
            return await coro

    return asyncio.run(bounded())


def test_each_setpoint_lands_as_its_nodes_type_and_reads_back() -> None:
    async def go() -> None:
        async with (
            typed_server() as (endpoint, nodes),
            OpcUaWriter(endpoint, _field(list(TYPES))) as writer,
        ):
            sent = {
                "pump.on": 1.0,
                "pump.stage": 2.6,  # an integer node holds the nearest whole value
                "valve.steps": 40000.0,
                "tank.level_set": 0.1,
                "tank.flow_set": 0.1,
            }
            await writer.write(sent)
            held = {n: await nodes[n].read_data_value() for n in TYPES}
            for name, (variant, _initial) in TYPES.items():
                assert held[name].Value.VariantType == variant, (name, held[name])
            assert held["pump.on"].Value.Value is True
            assert held["pump.stage"].Value.Value == 3
            assert held["valve.steps"].Value.Value == 40000
            assert held["tank.level_set"].Value.Value == pytest.approx(0.1, rel=1e-6)
            assert held["tank.flow_set"].Value.Value == 0.1
            # what the gateway reads back to settle a write in doubt: the values sent
            assert await writer.read(list(TYPES)) == sent
            await writer.write({"pump.on": 0.0})
            assert (await nodes["pump.on"].read_value()) is False
            assert (await writer.read(["pump.on"])) == {"pump.on": 0.0}

    run(go())


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("pump.on", 0.5, "Boolean node: 0 or 1"),
        ("pump.stage", 40000.0, "outside its node's Int16"),
        ("valve.steps", -1.0, "outside its node's UInt16"),
        ("tank.level_set", 1e39, "too large for its node's Float"),
        ("tank.flow_set", float("nan"), "not a finite number"),
    ],
)
def test_a_value_its_node_cannot_hold_is_refused_and_nothing_is_sent(
    name: str, value: float, message: str
) -> None:
    async def go() -> None:
        async with (
            typed_server() as (endpoint, nodes),
            OpcUaWriter(endpoint, _field(list(TYPES))) as writer,
        ):
            with pytest.raises(FieldError, match=message):
                await writer.write({"tank.flow_set": 7.0, name: value})
            assert await nodes["tank.flow_set"].read_value() == 0.0  # not even the good one

    run(go())


def test_an_input_node_without_a_number_is_a_mapping_error_at_connect() -> None:
    async def go() -> None:
        extra = {"pump.label": (ua.VariantType.String, "P1")}
        async with typed_server(extra) as (endpoint, _nodes):
            with pytest.raises(NodeMappingError, match=r"'pump.label'.*DataType.*Boolean"):
                async with OpcUaWriter(endpoint, _field(["pump.on", "pump.label"])):
                    pass

    run(go())
