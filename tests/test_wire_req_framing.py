"""REQ peers and wrongly framed messages against a real CURVE gateway on 127.0.0.1.

A REQ socket puts an empty delimiter frame before its message and drops any
reply that lacks one.  The gateway answers a message whose first frame is
empty the same way, so a REQ peer sees every answer, refusals included; a
DEALER's one-frame messages are answered with one frame as before.
"""

from __future__ import annotations

import zmq
import zmq.asyncio

from parallelcity.clock import FakeClock
from parallelcity.dispatch.keys import KeyPair
from parallelcity.dispatch.wire import (
    AckStatus,
    Heartbeat,
    RefusalCode,
    WatchdogState,
    decode_ack,
    decode_reply,
)

from .test_curve import Keys, curve_socket, secure_gateway
from .test_gateway import GOOD, T0, FakeWriter, command, run

WAIT_MS = 5000


def req_socket(
    ctx: zmq.asyncio.Context, endpoint: str, client: KeyPair, server: bytes
) -> zmq.asyncio.Socket:
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, WAIT_MS)
    sock.setsockopt(zmq.CURVE_SERVERKEY, server)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, client.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, client.secret)
    sock.connect(endpoint)
    return sock


async def ask(sock: zmq.asyncio.Socket, *frames: bytes) -> list[bytes]:
    await sock.send_multipart(list(frames))
    assert await sock.poll(WAIT_MS), "no answer the peer can see"
    return list(await sock.recv_multipart())


def test_a_req_peer_over_curve_sees_acks_statuses_and_refusals() -> None:
    keys, writer, clock = Keys(), FakeWriter(), FakeClock(T0)

    async def main() -> None:
        ctx = zmq.asyncio.Context()
        try:
            async with secure_gateway(keys, writer, clock) as gw:
                req = req_socket(ctx, gw.endpoint, keys.admin, keys.server.public)
                good = command(issuer="admin")
                [reply] = await ask(req, good.encode())
                ack = decode_ack(reply)
                assert (ack.id, ack.status) == (good.id, AckStatus.APPLIED)
                [reply] = await ask(req, Heartbeat.create("admin", T0).encode())
                assert decode_reply(reply).watchdog in set(WatchdogState)
                # Refusals reach it too: bytes that are not a message, and two frames.
                [reply] = await ask(req, b"\xff not json")
                ack = decode_ack(reply)
                assert ack.code is RefusalCode.MALFORMED and "not UTF-8" in ack.detail
                [reply] = await ask(req, command(issuer="admin", seq=2).encode(), b"extra")
                ack = decode_ack(reply)
                assert ack.code is RefusalCode.MALFORMED and "REQ socket" in ack.detail
                req.close(linger=0)
                # A DEALER's message of two frames gets one refused frame back, no delimiter.
                dealer = curve_socket(ctx, gw.endpoint, keys.admin, keys.server.public)
                await dealer.send_multipart([command(issuer="admin", seq=3).encode(), b""])
                assert await dealer.poll(WAIT_MS), "no answer the peer can see"
                frames = await dealer.recv_multipart()
                assert len(frames) == 1
                ack = decode_ack(frames[0])
                assert ack.code is RefusalCode.MALFORMED and "got 2" in ack.detail
                dealer.close(linger=0)
                assert writer.writes == [GOOD]
                assert gw.counters.applied == 1 and gw.counters.malformed == 3
        finally:
            ctx.destroy(linger=0)

    run(main, timeout_s=60.0)
