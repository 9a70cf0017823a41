"""An asyncua server whose point values, types and source timestamps a test chooses.

``python -m tests.field_trust_server --port P`` serves the variables of ``NODES`` (any
data type, a Double at first) in ``NAMESPACE`` on 127.0.0.1:P (NoSecurity, lab only) and prints
``up P``.  Each stdin line ``set NODE VARIANT VALUE OFFSET_S`` writes one
DataValue: ``VALUE`` as the OPC UA ``VARIANT`` type (Double, Int64, Boolean...),
Good status, source timestamp = wall clock + ``OFFSET_S``; the server answers
``ok`` once the value is in its address space.  ``quit`` stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import sys
import time

from asyncua import Server, ua
from asyncua.ua.status_codes import StatusCodes

from parallelcity.field.opcua.session import configure_server, parse_node_id

NAMESPACE = "urn:parallelcity:trust-test"
NODES = ("s=t/temp", "s=t/count", "s=t/flag")


def parse_value(variant: str, text: str) -> object:
    if variant == "Boolean":
        return text == "true"
    if variant in ("Double", "Float"):
        return float(text)
    return int(text)


async def serve(port: int) -> None:
    server = Server()
    await server.init()
    server.disable_clock()
    await configure_server(server, None)
    ns = await server.register_namespace(NAMESPACE)
    ids = {}
    for node in NODES:
        nodeid = parse_node_id(node, ns)
        await server.nodes.objects.add_variable(
            nodeid, ua.QualifiedName(node[2:], ns), 0.0, ua.VariantType.Double
        )
        ids[node] = nodeid
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}")
    async with server:
        print(f"up {port}", flush=True)
        reader = asyncio.StreamReader()
        loop = asyncio.get_running_loop()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while True:
            words = (await reader.readline()).decode().split()
            if not words or words[0] == "quit":
                return
            _, node, variant, text, offset = words
            when = dt.datetime.fromtimestamp(time.time() + float(offset), dt.UTC)
            dv = ua.DataValue(
                Value=ua.Variant(parse_value(variant, text), getattr(ua.VariantType, variant)),
                StatusCode=ua.StatusCode(ua.UInt32(StatusCodes.Good)),
                SourceTimestamp=when,
                ServerTimestamp=when,
            )
            aspace = server.iserver.aspace
            # asyncua refuses a value whose type differs from the one held; forget the held
            # one, so the node serves any type, as a misconfigured or hostile PLC may
            aspace._nodes[ids[node]].attributes[ua.AttributeIds.Value].value = None
            status = await aspace.write_attribute_value(ids[node], ua.AttributeIds.Value, dv)
            print("ok" if status.is_good() else f"refused {status.name}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m tests.field_trust_server")
    p.add_argument("--port", type=int, required=True)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("asyncua").setLevel(logging.ERROR)
    asyncio.run(serve(p.parse_args().port))


if __name__ == "__main__":
    main()
