"""How reliably and how fast the mirror starts on a large server that another client keeps busy.

    .venv/bin/python -m benchmarks.mirror_start [--points 10000] [--starts 10] [--baseline 3]

One asyncua server in its own process holds ``--points`` Double variables
(folders of 100) and rewrites all of them every ``--period-ms``.  A second
client in another process subscribes to every one of them and keeps taking the
changes.  Then, in this process, against that server:

1. the mirror as ``run`` starts it (default budget: 5 s plus 4 ms per point),
   ``--starts`` times: successes, start time p50/max, and the time until every
   point has a value;
2. baseline "bare asyncua, one call": a plain asyncua client (default 4 s request
   timeout) subscribing to every point in one ``subscribe_data_change`` call,
   ``--baseline`` times;
3. baseline "mirror with a fixed 5 s start": the same mirror with
   ``start_timeout_s = 5``, which is what a start was bounded by before,
   ``--baseline`` times.

Absolute times depend on the machine and its load; successes are the result.
``serve`` and ``busy`` are the two helper processes (also used by the tests).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import selectors
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from asyncua import Client, Server, ua
from parallelcity.hil.field import POINT_NAMESPACE, free_port, point_node

from parallelcity.clock import SimClock
from parallelcity.errors import ParallelCityError
from parallelcity.field.mirror import Mirror
from parallelcity.field.opcua.config import OpcUaField as FieldConfig
from parallelcity.field.opcua.config import OpcUaInput as InputMap
from parallelcity.field.opcua.config import OpcUaPoint as PointMap
from parallelcity.field.opcua.session import configure_server, parse_node_id

ROOT = Path(__file__).resolve().parents[1]
FOLDER = 100  # variables per folder: asyncua adds a child in time linear in its siblings
BUSY_BATCH = 1000


def field_config(n: int, start_timeout_s: float | None = None) -> FieldConfig:
    return FieldConfig(
        namespace=POINT_NAMESPACE,
        sampling_interval_ms=100.0,
        start_timeout_s=start_timeout_s,
        points=[PointMap(name=f"p{i}", node=point_node(i), max_age_s=60.0) for i in range(n)],
        inputs=[InputMap(name="p0", node=point_node(0))],
    )


# -- the helper processes ------------------------------------------------------------------------


async def _stdin_closed() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while (line := await reader.readline()) and line.strip() != b"quit":
        pass


async def serve(port: int, n: int, period_s: float) -> None:
    """``n`` Double points rewritten every ``period_s``; prints ``up PORT``; stdin quits."""
    server = Server()
    await server.init()
    server.disable_clock()
    await configure_server(server, None)
    ns = await server.register_namespace(POINT_NAMESPACE)
    nodeids = [parse_node_id(point_node(i), ns) for i in range(n)]
    for f in range(0, n, FOLDER):
        folder = await server.nodes.objects.add_folder(
            ua.NodeId(ua.String(f"folder:pts{f}"), ua.Int16(ns)), ua.QualifiedName(f"pts{f}", ns)
        )
        for i in range(f, min(n, f + FOLDER)):
            await folder.add_variable(
                nodeids[i], ua.QualifiedName(f"p{i:05d}", ns), 0.0, ua.VariantType.Double
            )
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}")
    await server.start()

    async def rewrite() -> None:
        tick = 0
        while True:
            tick += 1
            now = dt.datetime.now(dt.UTC)
            for k, nodeid in enumerate(nodeids):
                dv = ua.DataValue(
                    Value=ua.Variant(float(tick), ua.VariantType.Double),
                    SourceTimestamp=now,
                    ServerTimestamp=now,
                )
                await server.write_attribute_value(nodeid, dv)
                if k % 500 == 499:
                    await asyncio.sleep(0)
            await asyncio.sleep(period_s)

    task = asyncio.create_task(rewrite())
    print(f"up {port}", flush=True)
    try:
        await _stdin_closed()
    finally:
        task.cancel()
        await server.stop()


class _Count:
    changes = 0

    def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
        self.changes += 1


async def busy(endpoint: str, n: int) -> None:
    """A second client subscribed to every point; prints ``busy N``; stdin quits."""
    ns_uri = POINT_NAMESPACE
    # asyncua drops a connection whose 1 s health probe times out: too short for a busy server
    async with Client(endpoint, timeout=60, watchdog_intervall=30.0) as client:
        ns = await client.get_namespace_index(ns_uri)
        handler = _Count()
        sub = await client.create_subscription(100, handler)
        nodes = [client.get_node(parse_node_id(point_node(i), ns)) for i in range(n)]
        for i in range(0, n, BUSY_BATCH):
            await sub.subscribe_data_change(nodes[i : i + BUSY_BATCH], queuesize=1)
        print(f"busy {n}", flush=True)
        await _stdin_closed()
        print(f"changes {handler.changes}", flush=True)


class Helper:
    """One helper process (``serve`` or ``busy``), waited for until it prints ``expect``."""

    def __init__(self, args: list[str], expect: str, timeout_s: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.mirror_start", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        self.expect, self.timeout_s = expect, timeout_s

    def wait(self) -> str:
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(self.timeout_s):
                self.close()
                raise RuntimeError(f"helper did not print {self.expect!r} in {self.timeout_s} s")
        line = self.proc.stdout.readline()
        if not line.startswith(self.expect):
            self.close()
            raise RuntimeError(f"helper said {line!r}, not {self.expect!r}")
        return line

    def close(self) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


def start_busy_field(n: int, period_ms: float) -> tuple[Helper, Helper, str]:
    """A server of ``n`` points and a second client subscribed to all of them."""
    port = free_port()
    serve = ["serve", "--port", str(port), "--points", str(n), "--period-ms", str(period_ms)]
    server = Helper(serve, "up", 120.0)
    try:
        server.wait()
        endpoint = f"opc.tcp://127.0.0.1:{port}"
        client = Helper(["busy", endpoint, "--points", str(n)], "busy", 120.0)
        client.wait()
    except BaseException:
        server.close()
        raise
    return server, client, endpoint


# -- the measurements ----------------------------------------------------------------------------


async def start_mirror(endpoint: str, cfg: FieldConfig) -> tuple[bool, float, float, str]:
    """(ok, start s, start to every point received s, error) for one mirror start."""
    mirror = Mirror(cfg, SimClock(epoch=time.time(), speed=1.0), endpoint=endpoint)
    t0 = time.perf_counter()
    try:
        await mirror.start()
    except ParallelCityError as exc:
        return False, time.perf_counter() - t0, float("nan"), str(exc)
    started = time.perf_counter() - t0
    try:
        complete = await mirror.wait_all_received(60.0)
        return complete, started, time.perf_counter() - t0, "" if complete else "values missing"
    finally:
        await mirror.stop()


async def start_bare(endpoint: str, n: int) -> tuple[bool, float, float, str]:
    t0 = time.perf_counter()
    client = Client(endpoint)  # asyncua's defaults: 4 s per request
    try:
        await client.connect()
        ns = await client.get_namespace_index(POINT_NAMESPACE)
        sub = await client.create_subscription(100, _Count())
        nodes = [client.get_node(parse_node_id(point_node(i), ns)) for i in range(n)]
        await sub.subscribe_data_change(nodes, queuesize=1)
        return True, time.perf_counter() - t0, float("nan"), ""
    except Exception as exc:  # a baseline: whatever asyncua raises is its result
        return False, time.perf_counter() - t0, float("nan"), repr(exc)
    except asyncio.CancelledError as exc:  # wait_for2 lets its own subclass escape
        return False, time.perf_counter() - t0, float("nan"), repr(exc)
    finally:
        try:
            await asyncio.wait_for(client.disconnect(), 10)
        except BaseException:  # leaving anyway
            client.disconnect_socket()


def report(name: str, results: list[tuple[bool, float, float, str]]) -> None:
    ok = [r for r in results if r[0]]
    times = sorted(r[1] for r in ok)
    line = f"{name:<34} {len(ok):>2}/{len(results)} ok"
    if times:
        line += f"  start p50 {statistics.median(times):6.2f} s  max {times[-1]:6.2f} s"
    full = sorted(r[2] for r in ok if r[2] == r[2])
    if full:
        line += f"  all values p50 {statistics.median(full):6.2f} s"
    print(line, flush=True)
    for r in results:
        if not r[0]:
            print(f"    failed after {r[1]:.2f} s: {r[3][:200]}", flush=True)


async def measure(endpoint: str, n: int, starts: int, baseline: int) -> None:
    cfg = field_config(n)
    probe = Mirror(cfg, SimClock(epoch=time.time(), speed=1.0), endpoint=endpoint)
    print(f"mirror start budget for {n} points: {probe.start_budget_s:.0f} s", flush=True)
    mirror = [await start_mirror(endpoint, cfg) for _ in range(starts)]
    report("mirror (derived budget)", mirror)
    bare = [await start_bare(endpoint, n) for _ in range(baseline)]
    report("baseline: bare asyncua, one call", bare)
    fixed = [await start_mirror(endpoint, field_config(n, 5.0)) for _ in range(baseline)]
    report("baseline: mirror, fixed 5 s start", fixed)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.mirror_start", description=__doc__)
    sub = p.add_subparsers(dest="mode")
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--points", type=int, default=10_000)
    s.add_argument("--period-ms", type=float, default=1000.0)
    b = sub.add_parser("busy")
    b.add_argument("endpoint")
    b.add_argument("--points", type=int, default=10_000)
    p.add_argument("--points", type=int, default=10_000)
    p.add_argument("--starts", type=int, default=10)
    p.add_argument("--baseline", type=int, default=3)
    p.add_argument("--period-ms", type=float, default=1000.0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("asyncua").setLevel(logging.CRITICAL)
    if args.mode == "serve":
        asyncio.run(serve(args.port, args.points, args.period_ms / 1000.0))
        return
    if args.mode == "busy":
        asyncio.run(busy(args.endpoint, args.points))
        return
    t0 = time.perf_counter()
    server, client, endpoint = start_busy_field(args.points, args.period_ms)
    print(
        f"{args.points} points at {endpoint}, rewritten every {args.period_ms:g} ms, a second "
        f"client subscribed to all of them (ready in {time.perf_counter() - t0:.1f} s)",
        flush=True,
    )
    try:
        asyncio.run(measure(endpoint, args.points, args.starts, args.baseline))
    finally:
        client.close()
        server.close()


if __name__ == "__main__":
    main()
