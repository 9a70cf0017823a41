"""An allowed client key turned hostile, in its own process: floods a gateway at full speed.

``python -m tests.gateway_flooder ENDPOINT SECRET GATEWAY_PUBLIC --issuer NAME --mode M
--seconds S``

* ``refused``: in turn bytes that are not JSON, well-formed commands the
  gateway refuses (a value far above the input's bound) and heartbeats;
* ``multipart``: messages of ``--frames`` frames of ``--frame-bytes`` bytes.

It sends as fast as ZeroMQ takes the messages (blocking sends, 1 s send
timeout), never reads a reply, and prints ``sent N`` when the time is up.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import zmq

from parallelcity.dispatch.keys import read_public_key, read_secret_key
from parallelcity.dispatch.wire import Command, Heartbeat


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m tests.gateway_flooder")
    p.add_argument("endpoint")
    p.add_argument("secret", type=Path)
    p.add_argument("server_public", type=Path)
    p.add_argument("--issuer", default="flooder")
    p.add_argument("--mode", choices=["refused", "multipart"], default="refused")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--frames", type=int, default=1000)
    p.add_argument("--frame-bytes", type=int, default=1024 * 1024)
    args = p.parse_args()
    keys = read_secret_key(args.secret)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, 1000)
    sock.setsockopt(zmq.CURVE_SERVERKEY, read_public_key(args.server_public))
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
    sock.connect(args.endpoint)
    if args.mode == "refused":
        now = time.time()
        bad = Command.create(
            issuer=args.issuer,
            seq=1,
            issued_at=now,
            valid_until=now + 3600,
            setpoints={"apartment.m_flow": 5000.0},
            verdict="ab" * 32,
        ).encode()
        beat = Heartbeat.create(args.issuer, now).encode()
        messages = [[b"{not json"], [bad], [beat]]
    else:
        frame = b"x" * args.frame_bytes
        messages = [[frame] * args.frames]
    sent = 0
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        try:
            sock.send_multipart(messages[sent % len(messages)], copy=False)
        except zmq.Again:
            continue
        sent += 1
    print(f"sent {sent}", flush=True)
    sock.close(linger=0)
    ctx.term()


if __name__ == "__main__":
    main()
