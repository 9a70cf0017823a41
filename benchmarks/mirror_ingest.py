"""How fast the mirror takes in data changes, and what a cycle costs it, against baselines.

    .venv/bin/python -m benchmarks.mirror_ingest [--points 1000 10000] [--seconds 5]

One asyncua point server (``python -m parallelcity.hil.field``) in its own process rewrites
every point as fast as it can.  Against that same server, in one run:

1. ingest: data changes per second received by a bare asyncua subscription
   client (``Client.create_subscription`` + ``subscribe_data_change`` with a
   handler: what asyncua gives you) and by the mirror, alternately, at each
   point count.  The server is the bottleneck (asyncua serves a few thousand
   changes per second per core), so the figure that matters is the ratio
   mirror / bare; target >= 0.8.
2. loop overhead per cycle at 1,000 points, excluding the solver: getting an
   assessed snapshot of every point (mirror: from its subscription; baseline: a
   per-tag polling client, one Read per tag as simple integrations do), p50 and
   p99 over the cycles; target mirror p99 <= 5 ms.

Absolute numbers depend on the machine and its load; the ratios are the result.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from asyncua import Client, ua
from parallelcity.hil.field import POINT_NAMESPACE, free_port, point_node

from parallelcity.clock import SimClock
from parallelcity.field.mirror import Mirror
from parallelcity.field.opcua.config import OpcUaField as FieldConfig
from parallelcity.field.opcua.config import OpcUaInput as InputMap
from parallelcity.field.opcua.config import OpcUaPoint as PointMap
from parallelcity.field.opcua.session import parse_node_id
from parallelcity.field.snapshot import PointSpec, Reading, assess

ROOT = Path(__file__).resolve().parents[1]


def field_config(n: int) -> FieldConfig:
    return FieldConfig(
        namespace=POINT_NAMESPACE,
        sampling_interval_ms=100.0,
        points=[PointMap(name=f"p{i}", node=point_node(i), max_age_s=60.0) for i in range(n)],
        inputs=[InputMap(name="p0", node=point_node(0))],
    )


class Server:
    def __init__(self, n: int) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "parallelcity.hil.field",
                "--port",
                str(self.port),
                "--points",
                str(n),
            ]
            + ["--period-ms", "100"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("up"):
            raise RuntimeError(f"point server did not start: {line!r}")

    @property
    def endpoint(self) -> str:
        return f"opc.tcp://127.0.0.1:{self.port}"

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class _Counter:
    def __init__(self) -> None:
        self.n = 0

    def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
        self.n += 1


async def bare_rate(endpoint: str, n: int, seconds: float) -> float:
    """Changes per second through a plain asyncua subscription handler."""
    async with Client(endpoint, timeout=30) as client:
        ns = await client.get_namespace_index(POINT_NAMESPACE)
        nodes = [client.get_node(parse_node_id(point_node(i), ns)) for i in range(n)]
        counter = _Counter()
        sub = await client.create_subscription(100.0, counter, queue_maxsize=0)
        for i in range(0, n, 500):
            await sub.subscribe_data_change(nodes[i : i + 500], queuesize=1)
        await asyncio.sleep(1.0)  # initial values and warm-up
        start_n, start_t = counter.n, time.perf_counter()
        await asyncio.sleep(seconds)
        rate = (counter.n - start_n) / (time.perf_counter() - start_t)
        await sub.delete()
    return rate


async def mirror_rate(endpoint: str, n: int, seconds: float) -> float:
    clock = SimClock(epoch=time.time(), speed=1.0)
    async with Mirror(field_config(n), clock, endpoint=endpoint, timeout_s=30.0) as mirror:
        await mirror.wait_all_received(30.0)
        await asyncio.sleep(1.0)
        start_n, start_t = mirror.notifications, time.perf_counter()
        await asyncio.sleep(seconds)
        return (mirror.notifications - start_n) / (time.perf_counter() - start_t)


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return statistics.median(ordered), p99


async def mirror_cycles(endpoint: str, n: int, cycles: int) -> list[float]:
    clock = SimClock(epoch=time.time(), speed=1.0)
    out = []
    async with Mirror(field_config(n), clock, endpoint=endpoint, timeout_s=30.0) as mirror:
        await mirror.wait_all_received(30.0)
        for _ in range(cycles):
            await asyncio.sleep(0.1)  # notifications keep arriving between cycles
            t0 = time.perf_counter()
            snap = mirror.snapshot()
            _ = snap.stale_required, snap.values()
            out.append(time.perf_counter() - t0)
    return out


async def polling_cycles(endpoint: str, n: int, cycles: int) -> list[float]:
    """One Read per tag, then the same assessment."""
    specs = {f"p{i}": PointSpec(f"p{i}", 60.0) for i in range(n)}
    out = []
    async with Client(endpoint, timeout=30) as client:
        ns = await client.get_namespace_index(POINT_NAMESPACE)
        nodes = [client.get_node(parse_node_id(point_node(i), ns)) for i in range(n)]
        for _ in range(cycles):
            t0 = time.perf_counter()
            readings = {}
            for i, node in enumerate(nodes):
                dv: ua.DataValue = await node.read_data_value()
                st = dv.SourceTimestamp.timestamp() if dv.SourceTimestamp else float("-inf")
                value = dv.Value.Value if dv.Value is not None else float("nan")
                readings[f"p{i}"] = Reading(float(value), st)
            snap = assess(specs, readings, time.time())
            _ = snap.stale_required, snap.values()
            out.append(time.perf_counter() - t0)
    return out


async def main(points: list[int], seconds: float, cycles: int, poll_cycles: int) -> None:
    print(f"ingest: {seconds:g} s per measurement, server rewrites every point as fast as it can")
    for n in points:
        server = Server(n)
        try:
            bare1 = await bare_rate(server.endpoint, n, seconds)
            mine = await mirror_rate(server.endpoint, n, seconds)
            bare2 = await bare_rate(server.endpoint, n, seconds)
        finally:
            server.close()
        bare = (bare1 + bare2) / 2
        print(
            f"  {n:>6} points: bare asyncua {bare:8.0f} changes/s ({bare1:.0f}, {bare2:.0f}), "
            f"mirror {mine:8.0f} changes/s, ratio {mine / bare:.2f} (target >= 0.80)"
        )
    n = 1000
    server = Server(n)
    try:
        mirror_s = await mirror_cycles(server.endpoint, n, cycles)
        poll_s = await polling_cycles(server.endpoint, n, poll_cycles)
    finally:
        server.close()
    m50, m99 = percentiles(mirror_s)
    p50, p99 = percentiles(poll_s)
    print(f"loop overhead per cycle at {n} points, excluding the solver:")
    print(
        f"  mirror snapshot   p50 {m50 * 1e3:7.2f} ms  p99 {m99 * 1e3:7.2f} ms  ({cycles} cycles)"
    )
    print(f"  per-tag polling   p50 {p50 * 1e3:7.2f} ms  p99 {p99 * 1e3:7.2f} ms  ({poll_cycles})")
    print(
        f"  ratio polling / mirror: p50 {p50 / m50:.0f}x, p99 {p99 / m99:.0f}x; target p99 <= 5 ms"
    )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--cycles", type=int, default=200)
    ap.add_argument("--poll-cycles", type=int, default=10)
    a = ap.parse_args()
    asyncio.run(main(a.points, a.seconds, a.cycles, a.poll_cycles))
