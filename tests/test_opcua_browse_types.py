"""`browse` writes each variable's `type`, so the table it prints mirrors as it stands.

A point's `type` defaults to `float` (a Float or Double) and a reading of another type
is refused (the point stale).  `browse` lists Boolean and integer variables too, and
used to print them without a `type`: each such point, mapped as printed, was refused on
every reading.  Against a real asyncua server on 127.0.0.1: the printed table says
`bool` / `int` where it must, and a mirror built from it has every point fresh.
"""

from __future__ import annotations

import asyncio
import time
import tomllib
from typing import Any

import pytest
from asyncua import Server, ua
from parallelcity.hil.field import free_port

from parallelcity.clock import SimClock
from parallelcity.field.mirror import Mirror
from parallelcity.field.opcua.browse import browse, points_toml
from parallelcity.field.opcua.config import OpcUaField
from parallelcity.field.opcua.session import ClientSecurity

pytestmark = pytest.mark.slow  # an asyncua server and a mirror

NAMESPACE = "urn:test:browse-types"
VARIABLES = {
    "Running": (ua.VariantType.Boolean, True, "bool"),
    "Starts": (ua.VariantType.Int16, -3, "int"),
    "Counter": (ua.VariantType.UInt32, 7, "int"),
    "PowerKw": (ua.VariantType.Float, 30.5, None),
    "LevelM": (ua.VariantType.Double, 2.25, None),
}


def test_browsed_types_mirror_fresh() -> None:
    async def go() -> None:
        server = Server()
        await server.init()
        endpoint = f"opc.tcp://127.0.0.1:{free_port()}"
        server.set_endpoint(endpoint)
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        ns = await server.register_namespace(NAMESPACE)
        site = await server.nodes.objects.add_object(ua.NodeId(100, ns), "Site")
        for i, (name, (variant, value, _)) in enumerate(VARIABLES.items()):
            await site.add_variable(ua.NodeId(200 + i, ns), name, value, variant)
        async with server:
            result = await browse(endpoint, ClientSecurity.insecure())
            table = tomllib.loads(points_toml(result, max_age_s=60))
            printed = {p["name"].split(".")[-1]: p for p in table["field"]["points"]}
            assert set(printed) == set(VARIABLES)
            for name, (_, _, kind) in VARIABLES.items():
                assert printed[name].get("type") == kind, printed[name]

            field = OpcUaField.model_validate(
                {
                    "namespace": table["field"]["namespace"],
                    "points": table["field"]["points"],
                    "inputs": [{"name": "x", "node": printed["LevelM"]["node"]}],
                }
            )
            clock = SimClock(epoch=time.time(), speed=1.0)  # a real field: the wall clock
            async with Mirror(field, clock, endpoint=endpoint) as mirror:
                assert await mirror.wait_all_received(10.0)
                snap = mirror.snapshot()
                for point, state in snap.points.items():
                    assert not state.stale, (point, state.why)
                got = {p.split(".")[-1]: s.reading.value for p, s in snap.points.items()}
                assert got == pytest.approx({n: float(v) for n, (_, v, _) in VARIABLES.items()})

    async def bounded() -> Any:
        async with asyncio.timeout(60):
            return await go()

    asyncio.run(bounded())
