"""A secure asyncua server with writable input nodes, for the field writer's reconnect test.

``python -m tests.opcua_input_server --port P --pki DIR`` serves the inputs
``s=w/a`` and ``s=w/b`` in ``NAMESPACE`` on 127.0.0.1:P, SignAndEncrypt only,
with the certificates of ``parallelcity.field.opcua.certs.make_lab_pki(DIR)`` and the user
``gateway`` whose password is in ``$PARALLELCITY_TEST_OPC_PASSWORD``.  It prints
``up P`` once listening and ``write <node> <value>`` for every value a client
wrote (before the write is answered), so a test can count what landed, across
``kill -9`` and a fresh process on the same port.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from pathlib import Path
from typing import Any

from asyncua import Server, ua
from asyncua.common.callback import CallbackType, ServerItemCallback
from asyncua.ua.attribute_ids import AttributeIds

from parallelcity.field.opcua.session import ServerSecurity, configure_server, hash_password

NAMESPACE = "urn:parallelcity:writer-test"
INPUTS = {"a": "s=w/a", "b": "s=w/b"}
USER = "gateway"
PASSWORD_ENV = "PARALLELCITY_TEST_OPC_PASSWORD"


async def serve(port: int, pki: Path) -> None:
    server = Server()
    await server.init()
    server.disable_clock()
    security = ServerSecurity(
        pki / "server" / "own" / "server.der",
        pki / "server" / "own" / "server.key.pem",
        pki / "server" / "trusted",
        users={USER: hash_password(os.environ[PASSWORD_ENV])},
    )
    await configure_server(server, security)
    ns = await server.register_namespace(NAMESPACE)
    names: dict[ua.NodeId, str] = {}
    for name, node in INPUTS.items():
        nodeid = ua.NodeId(ua.String(node.removeprefix("s=")), ua.Int16(ns))
        var = await server.nodes.objects.add_variable(
            nodeid, ua.QualifiedName(name, ns), 0.0, ua.VariantType.Double
        )
        await var.set_writable()
        names[nodeid] = node

    def on_write(event: ServerItemCallback, _dispatcher: Any) -> None:
        results = event.response_params or []
        for k, wv in enumerate(event.request_params.NodesToWrite):
            node = names.get(wv.NodeId)
            if node is None or wv.AttributeId != AttributeIds.Value:
                continue
            if k < len(results) and not results[k].is_good():
                continue
            print(f"write {node} {wv.Value.Value.Value!r}", flush=True)

    server.subscribe_server_callback(CallbackType.PostWrite, on_write)
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}")
    await server.start()
    print(f"up {port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m tests.opcua_input_server")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--pki", type=Path, required=True)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("asyncua").setLevel(logging.CRITICAL)
    asyncio.run(serve(args.port, args.pki))


if __name__ == "__main__":
    main()
