"""A bare OPC UA point server for reconnect tests and benchmarks, and the stand-in command.

``PointServer`` (``python -m parallelcity.hil.field --port P --points N``) serves N Double
points, restartable.  ``python -m parallelcity.hil.field SCENARIO [options]`` is
``parallelcity field``: a scenario's field stand-in (the OPC UA one lives in
``parallelcity.field.opcua.stand_in``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time

from asyncua import ua
from asyncua.server.server import Server
from asyncua.ua.status_codes import StatusCodes

from parallelcity.aio import cancel_and_wait
from parallelcity.field.opcua.session import configure_server, parse_node_id
from parallelcity.field.opcua.stand_in import HOST, YIELD_EVERY, free_port, stop_server

__all__ = [
    "POINT_NAMESPACE",
    "PointServer",
    "free_port",
    "generation_of",
    "main",
    "point_node",
    "point_value",
    "stop_server",
]

POINT_NAMESPACE = "urn:parallelcity:points"


def point_node(i: int) -> str:
    """Scenario NodeId of point ``i`` on a ``PointServer``."""
    return f"s=pts/p{i:05d}"


def point_value(generation: int, tick: int) -> float:
    """What a ``PointServer`` of ``generation`` writes at ``tick``: the generation is readable."""
    return generation * 1_000_000.0 + float(tick % 1_000_000)


def generation_of(value: float) -> int:
    return int(value // 1_000_000.0)


class PointServer:
    """``n`` Double points in ``POINT_NAMESPACE`` rewritten every ``period_s`` (wall clock),
    on a fixed port.  ``restart(down_s, full=True)`` replaces the server with a new
    instance, as a PLC reboot would; ``full=False`` stops and restarts its network
    listener only, which drops every connection (as a stack restart or a switch
    reboot would) in a fraction of the time.  Either way ``generation`` goes up, and
    with it every value written.  Used out of process by the reconnect tests and the
    ingest benchmark: ``python -m parallelcity.hil.field --port P --points N``.
    """

    def __init__(self, port: int, n: int, period_s: float, host: str = HOST) -> None:
        self.port, self.n, self.period_s, self.host = port, n, period_s, host
        self.generation = 0
        self.ticks = 0
        self.changes = 0
        self.down_at = 0.0  # time.monotonic() when the last restart had closed every connection
        self.late_closed = 0  # connections accepted while stopping, closed by stop_server
        self._server: Server | None = None
        self._nodeids: list[ua.NodeId] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.generation += 1
        server = Server()
        await server.init()
        server.disable_clock()
        server.set_server_name(f"parallelcity point server (generation {self.generation})")
        await configure_server(server, None)
        ns = await server.register_namespace(POINT_NAMESPACE)
        folder = await server.nodes.objects.add_folder(
            ua.NodeId(ua.String("folder:pts"), ua.Int16(ns)), ua.QualifiedName("pts", ns)
        )
        self._nodeids = []
        for i in range(self.n):
            nodeid = parse_node_id(point_node(i), ns)
            await folder.add_variable(
                nodeid, ua.QualifiedName(f"p{i:05d}", ns), 0.0, ua.VariantType.Double
            )
            self._nodeids.append(nodeid)
        server.set_endpoint(f"opc.tcp://{self.host}:{self.port}")
        await server.start()
        self._server = server
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
        server, self._server = self._server, None
        if server is not None:
            self.late_closed += await stop_server(server)

    async def restart(self, down_s: float, *, full: bool = True) -> None:
        if full:
            await self.stop()
            self.down_at = time.monotonic()
            await asyncio.sleep(down_s)
            await self.start()
            return
        server = self._server
        assert server is not None
        task, self._task = self._task, None
        await cancel_and_wait(task)
        self.late_closed += await stop_server(server)
        self.down_at = time.monotonic()
        await asyncio.sleep(down_s)
        self.generation += 1
        await server.start()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        server = self._server
        assert server is not None
        next_tick = time.monotonic()
        while True:
            self.ticks += 1
            now = ua.DateTime.fromtimestamp(time.time(), dt.UTC)
            value = point_value(self.generation, self.ticks)
            for k, nodeid in enumerate(self._nodeids):
                dv = ua.DataValue(
                    Value=ua.Variant(value, ua.VariantType.Double),
                    StatusCode=ua.StatusCode(ua.UInt32(StatusCodes.Good)),
                    SourceTimestamp=now,
                    ServerTimestamp=now,
                )
                await server.write_attribute_value(nodeid, dv)
                if k % YIELD_EVERY == YIELD_EVERY - 1:
                    await asyncio.sleep(0)
            self.changes += len(self._nodeids)
            next_tick += self.period_s
            await asyncio.sleep(max(0.0, next_tick - time.monotonic()))
            if next_tick < time.monotonic():
                next_tick = time.monotonic()


async def _serve_points(port: int, n: int, period_s: float) -> None:
    """Serve points; stdin lines ``restart SECONDS``, ``stats`` and ``quit`` control it.

    A restart answers ``down T LATE`` (``time.monotonic()`` once every connection was
    closed, the same clock as any process on this host; connections closed late so far,
    see ``stop_server``) and then ``up GENERATION PORT``.
    """
    import sys

    points = PointServer(port, n, period_s)
    await points.start()
    print(f"up {points.generation} {port}", flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = (await reader.readline()).decode().split()
        if not line or line[0] == "quit":
            break
        if line[0] == "restart":
            down = float(line[1]) if len(line) > 1 else 0.0
            await points.restart(down, full=len(line) < 3 or line[2] != "soft")
            print(f"down {points.down_at:.6f} {points.late_closed}", flush=True)
            print(f"up {points.generation} {port}", flush=True)
        elif line[0] == "stats":
            print(f"stats {points.generation} {points.ticks} {points.changes}", flush=True)
    await points.stop()


def main(argv: list[str] | None = None) -> None:
    """``python -m parallelcity.hil.field SCENARIO [options]`` serves a scenario's stand-in,
    as ``parallelcity field`` does; ``python -m parallelcity.hil.field --port P`` a bare point
    server."""
    import argparse
    import sys

    args_in = sys.argv[1:] if argv is None else argv
    if args_in and not args_in[0].startswith("-"):
        from parallelcity.cli import main as cli_main

        sys.exit(cli_main(["field", *args_in]))
    p = argparse.ArgumentParser(
        prog="python -m parallelcity.hil.field", description=PointServer.__doc__
    )
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--points", type=int, default=100)
    p.add_argument("--period-ms", type=float, default=100.0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("asyncua").setLevel(logging.ERROR)
    asyncio.run(_serve_points(args.port, args.points, args.period_ms / 1000.0))


if __name__ == "__main__":
    main()
