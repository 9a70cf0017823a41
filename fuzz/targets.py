"""What each fuzz target feeds, what it may raise, and where its seeds come from.

A target's ``body`` takes the raw bytes a decoder would get from the network or a
file.  It may raise only the target's declared ``allowed`` exceptions (the decoder's
documented error types); anything else, including a failed oracle (``AssertionError``),
is a finding.  Nothing here imports atheris, so the test suite can drive the same
bodies with hypothesis.  The decoder modules are imported inside the bodies so the
atheris worker can instrument them before their first import.
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ZAP_DOMAIN = "gw-fuzz"
# A fixed, fuzz-only client key so captured ZAP requests stay valid seeds across runs.
CLIENT_SECRET = bytes(range(32))


@dataclass(frozen=True)
class Target:
    name: str
    body: Callable[[bytes], None]
    allowed: tuple[type[BaseException], ...]
    seeds: Callable[[], list[bytes]]
    modules: tuple[str, ...]
    """The decoder's modules: the atheris worker imports them instrumented."""


def run_one(target: Target, data: bytes) -> None:
    """The body on one input; the declared exceptions are the decoder saying no."""
    with contextlib.suppress(*target.allowed):
        target.body(data)


# --------------------------------------------------------------------------- wire


def _wire(data: bytes) -> None:
    from parallelcity.dispatch.wire import (
        MAX_SEQ,
        NULL_ID,
        decode_reply,
        decode_request,
        recover_id,
    )
    from parallelcity.errors import WireFormatError

    for decode in (decode_request, decode_reply):
        try:
            msg: Any = decode(data)
        except WireFormatError:
            continue
        try:
            again = msg.encode()
        except WireFormatError:
            continue  # re-encoding may only be refused for size (floats print longer)
        assert decode(again) == msg, "a decoded message does not survive encode/decode"
        assert decode(again).encode() == again, "the canonical encoding is not stable"
    msg_id, seq = recover_id(data)  # documented: never raises
    assert (msg_id == NULL_ID or re.fullmatch(r"[0-9a-f]{32}", msg_id)) and 0 <= seq <= MAX_SEQ


def _doc_json_blocks() -> Iterator[str]:
    text = (ROOT / "docs" / "wire-protocol.md").read_text(encoding="utf-8")
    for m in re.finditer(r"```json[^\n]*\n(.*?)```", text, re.S):
        yield m.group(1).strip()


def _wire_seeds() -> list[bytes]:
    import json

    from parallelcity.dispatch.wire import Command, Heartbeat, Rearm

    seeds = []
    for block in _doc_json_blocks():
        seeds.append(block.encode())
        try:
            compact = json.dumps(json.loads(block), separators=(",", ":"), sort_keys=True)
            seeds.append(compact.encode())
        except ValueError:
            pass
    cmd = Command.create(
        issuer="district-heating/cycle",
        seq=3,
        issued_at=1768179600.0,
        valid_until=1768180500.0,
        setpoints={"plant.T_supply_set": 70.5, "apartment.m_flow": 0.25},
        verdict="ab" * 32,
    )
    exotic = Command.create(  # exponent forms, -0, raw UTF-8 names sorted by UTF-16 units
        issuer="Zürich Süd 😀",
        seq=2**53 - 1,
        issued_at=0.0,
        valid_until=1e-7,
        setpoints={"\uffe0.x": 1e21, "😀.y": -0.0, "é.z": 5e-324, "a.b": 1.7976931348623157e308},
        verdict="cd" * 32,
    )
    seeds += [
        cmd.encode(),
        exotic.encode(),
        Heartbeat.create("district-heating/cycle", 1768179600.0, release=True).encode(),
        Rearm.create("operator", "valve checked").encode(),
    ]
    return seeds


# --------------------------------------------------------------------------- zap


def frames_of(data: bytes) -> list[bytes]:
    """Bytes -> ZAP frames: each frame is a 2-byte big-endian length, then its bytes
    (the last frame takes what is left if it is short)."""
    frames, i = [], 0
    while i + 2 <= len(data) and len(frames) < 64:
        (n,) = struct.unpack_from(">H", data, i)
        frames.append(data[i + 2 : i + 2 + n])
        i += 2 + n
    return frames


def bytes_of(frames: list[bytes]) -> bytes:
    return b"".join(struct.pack(">H", len(f)) + f for f in frames)


_zap_handler: Any = None


def _handler() -> Any:
    global _zap_handler
    if _zap_handler is None:
        import zmq
        import zmq.asyncio

        from parallelcity.gateway.grants import Grant
        from parallelcity.gateway.zap import AllowList, ZapHandler

        public = zmq.curve_public(_z85(CLIENT_SECRET))
        allow = AllowList.of([(public, Grant.everything("fuzz-client"))])
        _zap_handler = ZapHandler(zmq.asyncio.Context(), ZAP_DOMAIN, allow)
    return _zap_handler


def _z85(raw: bytes) -> bytes:
    from zmq.utils import z85

    return z85.encode(raw)


def _zap(data: bytes) -> None:
    from zmq.utils import z85

    frames = frames_of(data)
    code, text, user = _handler().decide(frames)
    assert code in (b"200", b"400") and len(text) <= 255, (code, text)
    if code == b"200":
        # Only the allowed key, over CURVE, in this gateway's domain gets in.
        domain, _address, _routing, mechanism, *creds = frames
        assert domain == ZAP_DOMAIN.encode() and mechanism == b"CURVE" and len(creds) == 1
        assert creds[0] == z85.decode(_allowed_public()) and user == b"fuzz-client"
    else:
        assert user == b""


def _allowed_public() -> bytes:
    import zmq

    return bytes(zmq.curve_public(_z85(CLIENT_SECRET)))


def _zap_seeds() -> list[bytes]:
    """ZAP requests as libzmq sends them, captured from real handshakes on 127.0.0.1
    (an allowed CURVE key, an unknown one, PLAIN and NULL), without version and request id."""
    import zmq

    requests: list[list[bytes]] = []
    ctx = zmq.Context()
    try:
        zap = ctx.socket(zmq.REP)
        zap.linger, zap.rcvtimeo = 0, 3000
        zap.bind("inproc://zeromq.zap.01")
        server_public, server_secret = zmq.curve_keypair()
        unknown_public, unknown_secret = zmq.curve_keypair()
        clients: list[tuple[str, Callable[[zmq.Socket[bytes]], None]]] = []

        def curve(public: bytes, secret: bytes) -> Callable[[zmq.Socket[bytes]], None]:
            def setup(s: zmq.Socket[bytes]) -> None:
                s.curve_serverkey, s.curve_publickey, s.curve_secretkey = (
                    server_public,
                    public,
                    secret,
                )

            return setup

        def plain(s: zmq.Socket[bytes]) -> None:
            s.plain_username, s.plain_password = b"operator", b"secret"

        clients = [
            ("curve", curve(_allowed_public(), _z85(CLIENT_SECRET))),
            ("curve", curve(unknown_public, unknown_secret)),
            ("plain", plain),
            ("null", lambda s: None),
        ]
        for mechanism, setup in clients:
            server = ctx.socket(zmq.REP)
            client = ctx.socket(zmq.REQ)
            try:
                server.linger = client.linger = 0
                server.zap_domain = ZAP_DOMAIN.encode()
                if mechanism == "curve":
                    server.curve_server, server.curve_secretkey = True, server_secret
                elif mechanism == "plain":
                    server.plain_server = True
                port = server.bind_to_random_port("tcp://127.0.0.1")
                setup(client)
                client.connect(f"tcp://127.0.0.1:{port}")
                try:
                    msg = zap.recv_multipart()
                except zmq.Again:
                    continue  # this libzmq asks nothing for this mechanism
                requests.append(msg[2:])
                zap.send_multipart([msg[0], msg[1], b"400", b"seed capture", b"", b""])
            finally:
                server.close(0)
                client.close(0)
        zap.close(0)
    finally:
        ctx.term()
    seeds = [bytes_of(r) for r in requests]
    if requests:
        seeds.append(bytes_of(requests[0][:-1]))  # no credentials
        seeds.append(bytes_of([b"other", *requests[0][1:]]))
    return seeds


# --------------------------------------------------------------------------- files


def _scratch(name: str) -> Path:
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    return base / f"parallelcity-fuzz-{os.getpid()}-{name}.toml"


def _gateway_config(data: bytes) -> None:
    from parallelcity.gateway.config import load_gateway_config

    path = _scratch("gateway")
    path.write_bytes(data)
    try:
        cfg = load_gateway_config(path)
    finally:
        path.unlink()
    cfg.core()  # a config that validates must build the gateway's decision core


def _gateway_config_seeds() -> list[bytes]:
    return [(ROOT / "docs" / "gateway.example.toml").read_bytes()]


def _scenario(data: bytes) -> None:
    from parallelcity.scenario.definition import load_scenario

    path = _scratch("scenario")
    path.write_bytes(data)
    try:
        load_scenario(path)
    finally:
        path.unlink()


def _scenario_seeds() -> list[bytes]:
    seeds = []
    for p in sorted((ROOT / "scenarios").glob("*.toml")):
        text = p.read_bytes()
        seeds.append(text)
        seeds.append(text.replace(b"insecure_lab = false", b"insecure_lab = true"))
    return seeds


def _errors(*names: str) -> tuple[type[BaseException], ...]:
    from parallelcity import errors

    return tuple(getattr(errors, n) for n in names)


def targets() -> dict[str, Target]:
    return {
        "wire": Target("wire", _wire, _errors(), _wire_seeds, ("parallelcity.dispatch.wire",)),
        "zap": Target("zap", _zap, _errors(), _zap_seeds, ("parallelcity.gateway.zap",)),
        "gateway_config": Target(
            "gateway_config",
            _gateway_config,
            _errors("ScenarioError"),
            _gateway_config_seeds,
            ("parallelcity.gateway.config",),
        ),
        "scenario": Target(
            "scenario",
            _scenario,
            _errors("ScenarioError"),
            _scenario_seeds,
            ("parallelcity.scenario.definition",),
        ),
    }
