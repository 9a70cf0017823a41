"""Command + ack round trips: parallelcity's dispatcher and gateway against raw pyzmq REQ/REP.

    .venv/bin/python -m benchmarks.dispatch_roundtrip [--n 5000] [--pipeline 20000]
                                                       [--runtimes 4] [--quick] [--dir DIR]

Every server runs in its own process (spawned), the client in this one, all on
127.0.0.1.  In one run:

1. baseline: a raw pyzmq REQ/REP echo of the same command bytes (no decoding,
   no rules), without and with CURVE;
2. parallelcity: ``Dispatcher.send`` -> ``FieldGateway`` (decode, authorise,
   every rule, write to an in-memory field, encode the ack) -> ``Ack``, without
   CURVE (insecure lab), with CURVE (ZAP allow-list), and with CURVE plus the
   durable SQLite store (group commit: one fsync'd pending commit per batch,
   applied marks riding in the next commit), and the same with
   ``ack_after_applied_commit`` (the applied marks committed before the acks).

For each: round-trip p50 / p99 / p99.9 / max with one command in flight, and commands per
second (sequential, one in flight as the dispatcher works; pipelined: a raw
CURVE DEALER keeps ``--window`` commands in flight, what one gateway process
can take; and ``--runtimes`` dispatchers, each its own issuer driving its own
equipment, one command in flight each). The gateway process reports its store
commits per applied command (one in flight; pipelined) and its mean batch size
when pipelined (messages per batch), and where a round trip's time goes with one
in flight: ``handle_batch`` (decode, decide, store commit, write, encode) and,
of that, the store's pending commit (``begin_batch``: p50 / p99 / p99.9 / max).
These are timed by wrapping those two calls in the benchmark's gateway process
only. The store's WAL checkpoints run in a thread of their own (never inside a
COMMIT); the run counts them, and any the writer had to run itself. The OPC UA
write is not included (the field is in memory).

The same run measures one fsync on the store's file system (``--dir``, default
the temporary folder the stores live in): 16 KiB written in place and
``fdatasync``'d, what a small WAL commit costs the disk.  The targets, checked
for the CURVE + durable store rows and printed as met or as the gap: one
command in flight, p99 <= 2 ms and p50 <= 3 x (raw CURVE REQ/REP p50 + fsync
p50); pipelined >= 10,000 commands/s; p99.9 free of checkpoint stalls (store
commit p99.9 <= 2 x fsync p99.9, and no checkpoint inside a commit).  Absolute
numbers depend on the machine and its load: compare within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import multiprocessing as mp
import os
import signal
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from parallelcity.clock import SimClock
from parallelcity.dispatch.dispatcher import ClientCurve, Dispatcher
from parallelcity.dispatch.keys import KeyPair
from parallelcity.dispatch.wire import AckStatus, Command, decode_ack
from parallelcity.gateway.core import GatewayCore
from parallelcity.gateway.grants import Grant
from parallelcity.gateway.server import FieldGateway, ServerCurve, new_zap_domain
from parallelcity.gateway.store import AppliedMark, GatewayStore
from parallelcity.gateway.zap import AllowList
from parallelcity.specs import InputLimit

LIMITS = {
    "plant.T_supply_set": InputLimit("plant.T_supply_set", 0.0, 1e9),
    "apartment.m_flow": InputLimit("apartment.m_flow", 0.0, 1e9),
    **{f"site{k}.valve": InputLimit(f"site{k}.valve", 0.0, 1e9) for k in range(16)},
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


def _gateway_server(
    q: Any, mode: str, keys: tuple[bytes, bytes] | None, client_pub: bytes, folder: str
) -> None:
    async def main() -> None:
        curve = None
        if keys is not None:
            issuers = frozenset({"bench", *(f"site{k}" for k in range(16))})
            allow = AllowList.of([(client_pub, Grant.everything("bench", issuers))])
            curve = ServerCurve(KeyPair(*keys), allow, new_zap_domain())
        store = None
        tmp = tempfile.TemporaryDirectory(dir=folder)
        if mode.startswith("durable"):
            store = GatewayStore(Path(tmp.name) / "state.sqlite")
        gw = FieldGateway(
            GatewayCore(LIMITS),
            MemoryField(),
            SimClock(epoch=time.time()),
            bind="tcp://127.0.0.1:0",
            curve=curve,
            insecure_lab=curve is None,
            store=store,
            ack_after_applied_commit=mode == "durable-strict",
        )

        # Where a round trip's time goes, measured in this process (public calls only):
        # handle_batch = decode, decide, store commit, field write, encode the replies.
        phases: dict[str, list[int]] = {"handle": [], "commit": []}
        _timed(gw, "handle_batch", phases["handle"])
        if store is not None:
            _timed(store, "begin_batch", phases["commit"])

        def snapshot() -> None:  # on SIGUSR1: the client computes per-phase figures
            c = gw.counters
            summary = {k: _quantiles(v) for k, v in phases.items()}
            for v in phases.values():
                v.clear()
            ck = store.checkpointer if store is not None else None
            checkpoints = (0, 0, 0, 0, 0)
            if ck is not None:
                checkpoints = (ck.passive, ck.tails, ck.truncated, ck.inline_runs, ck.wal_bytes())
            q.put((store.commits if store is not None else 0, c.applied, c.received, c.batches,
                   summary, checkpoints))  # fmt: skip

        async with gw:
            task = asyncio.create_task(gw.serve())
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGTERM, task.cancel)
            loop.add_signal_handler(signal.SIGUSR1, snapshot)
            q.put(gw.endpoint)
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if store is not None:
            store.close()

    import logging

    logging.basicConfig(level=logging.ERROR)
    asyncio.run(main())


def bench_checkpoints(folder: str, n: int) -> dict[str, dict[str, float]]:
    """Store commits one at a time (pending commit of one command, its mark deferred to the
    next), interleaved on two stores: WAL checkpoints in the store's thread, and SQLite's
    automatic checkpoint inside a COMMIT (``checkpoint_thread=False``)."""
    samples: dict[str, list[float]] = {"thread": [], "inside COMMIT": []}
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        stores = {
            "thread": GatewayStore(Path(tmp) / "thread.sqlite"),
            "inside COMMIT": GatewayStore(Path(tmp) / "auto.sqlite", checkpoint_thread=False),
        }
        t0 = time.perf_counter()
        for i in range(n):
            cmd = _command(i)
            mark = AppliedMark(cmd.id, cmd.issuer, cmd.seq, cmd.issued_at, cmd.setpoints, 1.0)
            for name, store in stores.items():
                t = time.perf_counter()
                store.begin_batch([cmd], [0])
                samples[name].append(time.perf_counter() - t)
                store.mark_applied([mark], {}, durable=False)
            time.sleep(0.0005)  # a round trip's worth of idle, as with one command in flight
        elapsed = time.perf_counter() - t0
        for store in stores.values():
            store.close()
    return {name: _stats(xs, elapsed) for name, xs in samples.items()}


# --------------------------------------------------------------------------- clients


def _stats(samples: list[float], elapsed: float) -> dict[str, float]:
    samples = sorted(samples)
    return {
        "p50_ms": statistics.median(samples) * 1e3,
        "p99_ms": samples[int(0.99 * (len(samples) - 1))] * 1e3,
        "p99.9_ms": samples[int(0.999 * (len(samples) - 1))] * 1e3,
        "max_ms": samples[-1] * 1e3,
        "per_s": len(samples) / elapsed,
    }


def bench_fsync(folder: str, n: int, size: int = 16 * 1024) -> dict[str, float]:
    """``size`` bytes written in place and ``fdatasync``'d, ``n`` times, in ``folder``.

    What a small WAL commit of the store costs the disk (SQLite syncs with
    fdatasync; the WAL is rewritten in place once a checkpoint caught up).
    """
    fd, name = tempfile.mkstemp(dir=folder, prefix="fsync-")
    try:
        block = os.urandom(size)
        for k in range(64):
            os.pwrite(fd, block, k * size)
        os.fsync(fd)
        samples = []
        t0 = time.perf_counter()
        for k in range(n):
            t = time.perf_counter()
            os.pwrite(fd, block, (k % 64) * size)
            os.fdatasync(fd)
            samples.append(time.perf_counter() - t)
        return _stats(samples, time.perf_counter() - t0)
    finally:
        os.close(fd)
        os.unlink(name)


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


async def bench_runtimes(endpoint: str, n: int, runtimes: int, curve: ClientCurve | None) -> float:
    """Commands/s from ``runtimes`` dispatchers at once, each its own issuer and equipment."""
    ctx = zmq.asyncio.Context()
    disps = [
        Dispatcher(endpoint, f"site{k}", curve=curve, insecure_lab=curve is None, context=ctx)
        for k in range(runtimes)
    ]

    async def run(k: int, count: int) -> None:
        for _ in range(count):
            now = time.time()
            ack = await disps[k].send(
                {f"site{k}.valve": 1.0 + disps[k].next_seq * 1e-6},
                issued_at=now,
                valid_until=now + 3600,
                verdict_digest=VERDICT,
            )
            assert ack.status is AckStatus.APPLIED, ack

    for d in disps:
        await d.__aenter__()
    await asyncio.gather(*(run(k, 50) for k in range(runtimes)))  # warm-up
    t0 = time.perf_counter()
    await asyncio.gather(*(run(k, n // runtimes) for k in range(runtimes)))
    elapsed = time.perf_counter() - t0
    for d in disps:
        await d.__aexit__(None, None, None)
    ctx.destroy(linger=0)
    return runtimes * (n // runtimes) / elapsed


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


def _start(target: Any, *args: Any) -> tuple[Any, str, Any]:
    spawn = mp.get_context("spawn")
    q = spawn.Queue()
    proc = spawn.Process(target=target, args=(q, *args), daemon=True)
    proc.start()
    return proc, q.get(timeout=30), q


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=5000, help="round trips per configuration")
    p.add_argument("--pipeline", type=int, default=20000, help="commands in the pipelined run")
    p.add_argument("--window", type=int, default=64, help="commands in flight when pipelined")
    p.add_argument("--runtimes", type=int, default=4, help="concurrent dispatchers (<= 16)")
    p.add_argument("--quick", action="store_true", help="--n 1000 --pipeline 5000 (a smoke run)")
    p.add_argument(
        "--dir", default=tempfile.gettempdir(), help="folder of the store files and the fsync test"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.pipeline = 1000, 5000
    server, client = KeyPair.generate(), KeyPair.generate()
    rows: list[Row] = []

    for label, curve in (("raw REQ/REP", None), ("raw REQ/REP + CURVE", (client, server.public))):
        proc, ep, _ = _start(
            _rep_server, None if curve is None else (server.public, server.secret, b"")
        )
        rows.append(Row(label, bench_req_rep(ep, args.n, curve)))
        proc.join(5)
    fsync = bench_fsync(args.dir, min(args.n, 2000))
    checkpoints = bench_checkpoints(args.dir, min(args.n, 3000))

    for label, mode, use_curve in (
        ("parallelcity, no CURVE", "memory", False),
        ("parallelcity + CURVE", "memory", True),
        ("parallelcity + CURVE + durable store", "durable", True),
        ("  same, acks after the applied commit", "durable-strict", True),
    ):
        keys = (server.public, server.secret) if use_curve else None
        proc, ep, q = _start(_gateway_server, mode, keys, client.public, args.dir)
        ccurve = ClientCurve(client, server.public) if use_curve else None
        # The disk of a shared machine changes by the minute: its fsync right before the row.
        row_fsync = bench_fsync(args.dir, min(args.n, 1000)) if mode != "memory" else None
        snaps = [_snapshot(proc, q)]
        stats, seq = asyncio.run(bench_dispatcher(ep, args.n, ccurve, 0))
        snaps.append(_snapshot(proc, q))
        piped = bench_pipelined(ep, args.pipeline, args.window, ccurve, seq)
        snaps.append(_snapshot(proc, q))
        several = asyncio.run(bench_runtimes(ep, args.n, args.runtimes, ccurve))
        snaps.append(_snapshot(proc, q))
        proc.terminate()
        proc.join(5)
        gateway_stats = {
            "commits_1": _per(snaps[0], snaps[1], 0, 1),
            "commits_pipe": _per(snaps[1], snaps[2], 0, 1),
            "batch_pipe": _per(snaps[1], snaps[2], 2, 3),
        }
        row = Row(label, stats, piped, several, gateway_stats, snaps[1][4])
        row.checkpoints = tuple(int(x) for x in snaps[-1][5])
        row.fsync = row_fsync
        rows.append(row)

    base, base_curve, no_store = rows[0].stats, rows[1].stats, rows[3]
    print(f"\n{args.n} round trips each, one in flight; pipelined: {args.pipeline} commands, "
          f"window {args.window}; {args.runtimes} runtimes: one in flight each; loopback; "
          "servers in their own process\n")  # fmt: skip
    print(f"{'configuration':<40}{'p50 ms':>8}{'p99 ms':>8}{'p99.9':>8}{'max ms':>9}{'cmds/s':>8}"
          f"{'pipelined/s':>12}{f'{args.runtimes} rt/s':>8}{'commits/cmd':>12}{'piped':>7}"
          f"{'batch':>7}{'p99 / REQ-REP':>14}")  # fmt: skip
    for row in rows:
        st = row.stats
        ref = base_curve if "CURVE" in row.label else base
        srv = row.server or {}
        print(
            f"{row.label:<40}{st['p50_ms']:>8.3f}{st['p99_ms']:>8.3f}{st['p99.9_ms']:>8.3f}"
            f"{st['max_ms']:>9.3f}{st['per_s']:>8.0f}"
            f"{_opt(row.piped):>12}{_opt(row.several):>8}"
            f"{_opt(srv.get('commits_1'), '.2f'):>12}{_opt(srv.get('commits_pipe'), '.3f'):>7}"
            f"{_opt(srv.get('batch_pipe'), '.1f'):>7}"
            f"{st['p99_ms'] / ref['p99_ms']:>13.2f}x"
        )
    print(
        f"{'fsync: 16 KiB in place + fdatasync':<40}{fsync['p50_ms']:>8.3f}{fsync['p99_ms']:>8.3f}"
        f"{fsync['p99.9_ms']:>8.3f}{fsync['max_ms']:>9.3f}{fsync['per_s']:>8.0f}"
        f"   (in {args.dir})"
    )
    print(f"\ndurable store against the no-store CURVE row ({no_store.label!r}), same run:")
    for row in rows[4:]:
        assert row.piped is not None and no_store.piped is not None
        assert row.several is not None and no_store.several is not None
        print(
            f"  {row.label:<40} p50 {row.stats['p50_ms'] / no_store.stats['p50_ms']:.2f}x  "
            f"p99 {row.stats['p99_ms'] / no_store.stats['p99_ms']:.2f}x  "
            f"one-in-flight cmds/s {row.stats['per_s'] / no_store.stats['per_s']:.2f}x  "
            f"pipelined {row.piped / no_store.piped:.2f}x  "
            f"{args.runtimes} runtimes {row.several / no_store.several:.2f}x"
        )
    print(
        "\nin the gateway process, one in flight (ms; handle = decode, decide, store commit, "
        "write, encode;\nthe rest of the round trip: sockets, CURVE, event loops, the client):"
    )
    for row in rows[2:]:
        ph = row.phases or {}
        hd, cm = ph.get("handle", {}), ph.get("commit", {})
        line = f"  {row.label:<40} handle p50 {_opt(hd.get('p50'), '.3f')}"
        line += f" p99 {_opt(hd.get('p99'), '.3f')}"
        if cm:
            line += (f"; store commit p50 {cm['p50']:.3f} p99 {cm['p99']:.3f} "
                     f"p99.9 {cm['p99.9']:.3f} max {cm['p100']:.3f}")  # fmt: skip
        if hd:
            line += f"; round trip - handle, p50 {row.stats['p50_ms'] - hd['p50']:.3f}"
        print(line)
    for row in rows[4:]:
        passive, tails, truncated, inline, wal = row.checkpoints
        print(
            f"  {row.label:<40} WAL checkpoints: {passive} in the checkpoint thread "
            f"({tails} holding the writer for the last frames), "
            f"{truncated} truncations when idle, {inline} by the writer (hard limit); "
            f"WAL file {wal / 2**20:.1f} MiB at the end"
        )
    print(f"\nstore commits alone, one at a time, {min(args.n, 3000)} each, interleaved (ms):")
    for name, st in checkpoints.items():
        print(
            f"  WAL checkpoint {name:<16} p50 {st['p50_ms']:.3f}  p99 {st['p99_ms']:.3f}  "
            f"p99.9 {st['p99.9_ms']:.3f}  max {st['max_ms']:.3f}"
        )
    _print_targets(rows[1].stats, fsync, rows[4:])


def _print_targets(raw_curve: dict[str, float], fsync: dict[str, float], rows: list[Row]) -> None:
    """The issue's targets for the CURVE + durable store rows: met, or the gap.

    The fsync of each row is the one measured right before it (``fsync`` if none).
    """
    print(
        "\ntargets (CURVE + durable store; p50 bound = 3 x (raw CURVE REQ/REP p50 "
        f"{raw_curve['p50_ms']:.3f} ms + fsync p50 measured right before the row)):"
    )
    print(f"  {'configuration':<40}{'target':<54}{'measured':>12}  verdict")
    for row in rows:
        st, cm = row.stats, (row.phases or {}).get("commit", {})
        fs = row.fsync or fsync
        p50_bound = 3 * (raw_curve["p50_ms"] + fs["p50_ms"])
        stall_bound = 2 * fs["p99.9_ms"]
        checks = [
            ("one in flight p99 <= 2 ms", st["p99_ms"], 2.0, True),
            (
                f"one in flight p50 <= {p50_bound:.3f} ms (fsync p50 {fs['p50_ms']:.3f})",
                st["p50_ms"],
                p50_bound,
                True,
            ),
            ("pipelined >= 10,000 commands/s", row.piped or 0.0, 10_000.0, False),
            (
                f"store commit p99.9 <= 2 x fsync p99.9 ({stall_bound:.3f} ms)",
                cm.get("p99.9", math.inf),
                stall_bound,
                True,
            ),
            ("no checkpoint inside a commit", float(row.checkpoints[3]), 0.0, True),
        ]
        for k, (what, got, bound, upper) in enumerate(checks):
            ok = got <= bound if upper else got >= bound
            gap = "met" if ok else f"gap {got / bound:.2f}x" if bound else "gap"
            label = row.label.strip() if k == 0 else ""
            print(f"  {label:<40}{what:<54}{got:>12.3f}  {gap}")


@dataclass
class Row:
    label: str
    stats: dict[str, float]
    piped: float | None = None
    several: float | None = None
    server: dict[str, float | None] | None = None
    phases: dict[str, dict[str, float]] | None = None
    checkpoints: tuple[int, ...] = (0, 0, 0, 0, 0)
    fsync: dict[str, float] | None = None
    """One fsync on the store's file system, measured right before the row."""
    """Checkpoints: by the thread, of those holding the writer, idle TRUNCATEs, by the
    writer; WAL bytes."""


def _snapshot(proc: Any, q: Any) -> tuple[Any, ...]:
    """The gateway process's (store commits, applied, received, batches, phase times) now."""
    os.kill(proc.pid, signal.SIGUSR1)
    snap: tuple[Any, ...] = q.get(timeout=30)
    return snap


def _timed(obj: Any, name: str, out: list[int]) -> None:
    """Record the wall time (ns) of every call of ``obj.name`` (sync or async) in ``out``."""
    fn = getattr(obj, name)
    if asyncio.iscoroutinefunction(fn):

        async def timed_async(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter_ns()
            try:
                return await fn(*args, **kwargs)
            finally:
                out.append(time.perf_counter_ns() - t)

        setattr(obj, name, timed_async)
    else:

        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter_ns()
            try:
                return fn(*args, **kwargs)
            finally:
                out.append(time.perf_counter_ns() - t)

        setattr(obj, name, timed)


def _quantiles(ns: list[int]) -> dict[str, float]:
    """p50 / p99 / p99.9 / max (p100) in ms."""
    if not ns:
        return {}
    xs = sorted(ns)
    return {f"p{q * 100:g}": xs[int(q * (len(xs) - 1))] / 1e6 for q in (0.5, 0.99, 0.999, 1.0)}


def _per(a: tuple[Any, ...], b: tuple[Any, ...], num: int, den: int) -> float | None:
    """Change of field ``num`` per change of field ``den`` between two snapshots."""
    d = b[den] - a[den]
    return (b[num] - a[num]) / d if d else None


def _opt(x: float | None, fmt: str = ".0f") -> str:
    return "" if x is None else format(x, fmt)


if __name__ == "__main__":
    main()
