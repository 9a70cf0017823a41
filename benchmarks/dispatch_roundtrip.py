"""Command + ack round trips: parallelcity's dispatcher and gateway against raw pyzmq REQ/REP.

    .venv/bin/python -m benchmarks.dispatch_roundtrip [--n 5000] [--pipeline 20000]

Every server runs in its own process (spawned), the client in this one, all on
127.0.0.1.  In one run:

1. baseline: a raw pyzmq REQ/REP echo of the same command bytes (no decoding,
   no rules), without and with CURVE;
2. parallelcity: ``Dispatcher.send`` -> ``FieldGateway`` (decode, authorise,
   every rule, write to an in-memory field, encode the ack) -> ``Ack``, without
   CURVE (insecure lab), with CURVE (ZAP allow-list), and with CURVE plus the
   durable SQLite store (two fsync'd commits per applied command).

For each: round-trip p50 / p99 with one command in flight, and commands per
second (sequential, one in flight as the dispatcher works; and pipelined: a
raw CURVE DEALER keeps ``--window`` commands in flight, what one gateway
process can take).  The OPC UA write is not included (the field is in
memory).  Targets from the issue: p99 <= 1 ms with CURVE, >= 10,000 commands/s.
Absolute numbers depend on the machine and its load: compare the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from parallelcity.clock import SimClock
from parallelcity.dispatcher import ClientCurve, Dispatcher
from parallelcity.gateway import FieldGateway, GatewayCore, ServerCurve, new_zap_domain
from parallelcity.gateway_store import GatewayStore
from parallelcity.keys import KeyPair
from parallelcity.specs import InputLimit
from parallelcity.wire import AckStatus, Command, decode_ack
from parallelcity.zap import AllowList, Grant

LIMITS = {
    "plant.T_supply_set": InputLimit("plant.T_supply_set", 0.0, 1e9),
    "apartment.m_flow": InputLimit("apartment.m_flow", 0.0, 1e9),
}
VERDICT = "ab" * 32


class MemoryField:
    async def write(self, setpoints: Mapping[str, float]) -> None:
        return None

    async def read(self, names: Sequence[str]) -> dict[str, float]:
        return {}


# --------------------------------------------------------------------------- servers


def _rep_server(q: Any, curve: tuple[bytes, bytes, bytes] | None) -> None:
    ctx = zmq.Context()
    auth = None
    if curve is not None:
        from zmq.auth.thread import ThreadAuthenticator

        auth = ThreadAuthenticator(ctx)
        auth.start()
        auth.configure_curve(domain="bench", location=zmq.auth.CURVE_ALLOW_ANY)
    sock = ctx.socket(zmq.REP)
    sock.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        sock.curve_server = True
        sock.curve_secretkey = curve[1]
        sock.zap_domain = b"bench"
    sock.bind("tcp://127.0.0.1:0")
    q.put(sock.getsockopt_string(zmq.LAST_ENDPOINT))
    ack = b'{"applied_at":1.0,"code":"","detail":"","id":"x","insecure_lab":false}'
    while True:
        msg = sock.recv()
        if msg == b"stop":
            sock.send(b"bye")
            break
        sock.send(ack)
    sock.close()
    if auth is not None:
        auth.stop()
    ctx.term()


def _gateway_server(q: Any, mode: str, keys: tuple[bytes, bytes] | None, client_pub: bytes) -> None:
    async def main() -> None:
        curve = None
        if keys is not None:
            allow = AllowList.of([(client_pub, Grant.everything("bench"))])
            curve = ServerCurve(KeyPair(*keys), allow, new_zap_domain())
        store = None
        tmp = tempfile.TemporaryDirectory()
        if mode == "durable":
            store = GatewayStore(Path(tmp.name) / "state.sqlite")
        gw = FieldGateway(
            GatewayCore(LIMITS),
            MemoryField(),
            SimClock(epoch=time.time()),
            bind="tcp://127.0.0.1:0",
            curve=curve,
            insecure_lab=curve is None,
            store=store,
        )
        async with gw:
            q.put(gw.endpoint)
            await gw.serve()

    import logging

    logging.basicConfig(level=logging.ERROR)
    asyncio.run(main())


# --------------------------------------------------------------------------- clients


def _stats(samples: list[float], elapsed: float) -> dict[str, float]:
    samples = sorted(samples)
    return {
        "p50_ms": statistics.median(samples) * 1e3,
        "p99_ms": samples[int(0.99 * (len(samples) - 1))] * 1e3,
        "per_s": len(samples) / elapsed,
    }


def bench_req_rep(endpoint: str, n: int, curve: tuple[KeyPair, bytes] | None) -> dict[str, float]:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        sock.curve_serverkey = curve[1]
        sock.curve_publickey = curve[0].public
        sock.curve_secretkey = curve[0].secret
    sock.connect(endpoint)
    data = _command(0).encode()
    for _ in range(200):  # warm-up
        sock.send(data)
        sock.recv()
    samples = []
    t0 = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        sock.send(data)
        sock.recv()
        samples.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - t0
    sock.send(b"stop")
    sock.recv()
    sock.close()
    ctx.term()
    return _stats(samples, elapsed)


def _command(seq: int) -> Command:
    now = time.time()
    return Command.create(
        issuer="bench",
        seq=seq,
        issued_at=now,
        valid_until=now + 3600,
        setpoints={"plant.T_supply_set": 70.0 + seq * 1e-6, "apartment.m_flow": 0.3},
        verdict=VERDICT,
    )


async def bench_dispatcher(
    endpoint: str, n: int, curve: ClientCurve | None, seq0: int
) -> tuple[dict[str, float], int]:
    ctx = zmq.asyncio.Context()
    samples = []
    async with Dispatcher(
        endpoint, "bench", curve=curve, insecure_lab=curve is None, first_seq=seq0, context=ctx
    ) as disp:
        for _ in range(200):  # warm-up
            await _send(disp)
        t0 = time.perf_counter()
        for _ in range(n):
            t = time.perf_counter()
            ack = await _send(disp)
            samples.append(time.perf_counter() - t)
            assert ack.status is AckStatus.APPLIED, ack
        elapsed = time.perf_counter() - t0
        seq = disp.next_seq
    ctx.destroy(linger=0)
    return _stats(samples, elapsed), seq


async def _send(disp: Dispatcher) -> Any:
    now = time.time()
    return await disp.send(
        {"plant.T_supply_set": 70.0 + disp.next_seq * 1e-6, "apartment.m_flow": 0.3},
        issued_at=now,
        valid_until=now + 3600,
        verdict_digest=VERDICT,
    )


def bench_pipelined(
    endpoint: str, n: int, window: int, curve: ClientCurve | None, seq0: int
) -> float:
    """Commands/s with ``window`` commands in flight on one raw DEALER."""
    cmds = [_command(seq0 + i).encode() for i in range(n)]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        sock.curve_serverkey = curve.server_public
        sock.curve_publickey = curve.keys.public
        sock.curve_secretkey = curve.keys.secret
    sock.connect(endpoint)
    sent = received = 0
    t0 = time.perf_counter()
    while received < n:
        while sent < n and sent - received < window:
            sock.send(cmds[sent])
            sent += 1
        ack = decode_ack(sock.recv())
        assert ack.status is AckStatus.APPLIED, ack
        received += 1
    elapsed = time.perf_counter() - t0
    sock.close()
    ctx.term()
    return n / elapsed


# --------------------------------------------------------------------------- main


def _start(target: Any, *args: Any) -> tuple[Any, str]:
    spawn = mp.get_context("spawn")
    q = spawn.Queue()
    proc = spawn.Process(target=target, args=(q, *args), daemon=True)
    proc.start()
    return proc, q.get(timeout=30)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=5000, help="round trips per configuration")
    p.add_argument("--pipeline", type=int, default=20000, help="commands in the pipelined run")
    p.add_argument("--window", type=int, default=64, help="commands in flight when pipelined")
    args = p.parse_args(argv)
    server, client = KeyPair.generate(), KeyPair.generate()
    rows: list[tuple[str, dict[str, float], float | None]] = []

    for label, curve in (("raw REQ/REP", None), ("raw REQ/REP + CURVE", (client, server.public))):
        proc, ep = _start(
            _rep_server, None if curve is None else (server.public, server.secret, b"")
        )
        rows.append((label, bench_req_rep(ep, args.n, curve), None))
        proc.join(5)

    for label, mode, use_curve in (
        ("parallelcity, no CURVE", "memory", False),
        ("parallelcity + CURVE", "memory", True),
        ("parallelcity + CURVE + durable store", "durable", True),
    ):
        keys = (server.public, server.secret) if use_curve else None
        proc, ep = _start(_gateway_server, mode, keys, client.public)
        ccurve = ClientCurve(client, server.public) if use_curve else None
        stats, seq = asyncio.run(bench_dispatcher(ep, args.n, ccurve, 0))
        n_pipe = args.pipeline if mode == "memory" else max(1000, args.pipeline // 10)
        piped = bench_pipelined(ep, n_pipe, args.window, ccurve, seq)
        rows.append((label, stats, piped))
        proc.terminate()
        proc.join(5)

    base = rows[0][1]
    base_curve = rows[1][1]
    print(f"\n{args.n} round trips each, one in flight; loopback; servers in their own process\n")
    print(f"{'configuration':<40}{'p50 ms':>9}{'p99 ms':>9}{'cmds/s':>10}{'pipelined/s':>13}"
          f"{'p99 / REQ-REP':>15}")  # fmt: skip
    for label, st, piped in rows:
        ref = base_curve if "CURVE" in label else base
        print(
            f"{label:<40}{st['p50_ms']:>9.3f}{st['p99_ms']:>9.3f}{st['per_s']:>10.0f}"
            f"{'' if piped is None else f'{piped:.0f}':>13}{st['p99_ms'] / ref['p99_ms']:>14.2f}x"
        )
    curve_row = rows[3]
    print(
        f"\ntargets (parallelcity + CURVE): p99 <= 1 ms -> {curve_row[1]['p99_ms']:.3f} ms "
        f"({'met' if curve_row[1]['p99_ms'] <= 1.0 else 'NOT met'}); >= 10,000 commands/s -> "
        f"{curve_row[1]['per_s']:.0f} one in flight, {curve_row[2] or 0:.0f} pipelined"
    )


if __name__ == "__main__":
    main()
