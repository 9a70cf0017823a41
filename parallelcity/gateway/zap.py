"""Who may talk to a field gateway (what each may do is its ``grants.Grant``).

* ``AllowList``: the client public keys a gateway accepts, each with its grant.
* ``ZapHandler``: a ZeroMQ authentication (ZAP, RFC 27) handler on asyncio.  It
  answers libzmq's requests on ``inproc://zeromq.zap.01`` of one context: a
  CURVE client whose public key is on the allow-list, asking for the
  gateway's exact ``zap_domain``, is accepted with the grant's name as its
  ZeroMQ User-Id; everything else (another mechanism, another domain, an
  unknown key) is refused with 400 and never reaches the gateway.

One ZAP handler serves one context, so a secure gateway uses a context of
its own (``FieldGateway`` creates one).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import zmq
import zmq.asyncio
from zmq.utils import z85

from parallelcity.aio import cancel_and_wait
from parallelcity.dispatch.keys import check_z85
from parallelcity.errors import SecurityError
from parallelcity.gateway.grants import Grant
from parallelcity.gateway.loglimit import LogLimiter

log = logging.getLogger("parallelcity.gateway.zap")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_VERSION = b"1.0"


@dataclass(frozen=True)
class AllowList:
    """Client public key (Z85) -> grant.  Grant names are unique: they are the User-Id.
    An issuer is bound to one key at most."""

    by_key: Mapping[bytes, Grant]

    @classmethod
    def of(cls, entries: Iterable[tuple[bytes | str, Grant]]) -> AllowList:
        by_key: dict[bytes, Grant] = {}
        names: set[str] = set()
        issuers: dict[str, str] = {}
        for key, grant in entries:
            k = check_z85(key, f"public key of client {grant.name!r}")
            if k in by_key:
                raise SecurityError(f"client {grant.name!r}: its public key is listed twice")
            if grant.name in names:
                raise SecurityError(f"client name {grant.name!r} is used twice")
            for issuer in sorted(grant.issuers or ()):
                other = issuers.setdefault(issuer, grant.name)
                if other != grant.name:
                    raise SecurityError(
                        f"issuer {issuer!r} is bound to both client {other!r} and {grant.name!r}"
                    )
            by_key[k] = grant
            names.add(grant.name)
        return cls(by_key)

    def by_name(self, name: str) -> Grant | None:
        for grant in self.by_key.values():
            if grant.name == name:
                return grant
        return None

    def __len__(self) -> int:
        return len(self.by_key)


class ZapHandler:
    """Answers ZAP requests for one ZeroMQ context until closed.

    Start it (``await start()`` or ``async with``) *before* binding any CURVE
    server socket of that context: without a handler, libzmq lets every
    CURVE client in.
    """

    def __init__(self, ctx: zmq.asyncio.Context, domain: str, allow: AllowList) -> None:
        if not domain:
            raise ValueError("the ZAP domain must not be empty")
        self.ctx = ctx
        self.domain = domain
        self.allow = allow
        self.accepted: Counter[str] = Counter()
        """Grant name -> handshakes accepted."""
        self.denied: Counter[str] = Counter()
        """Reason -> handshakes refused."""
        self._sock: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task[None] | None = None
        self.denials_log = LogLimiter(log, "zap: refused handshakes")
        """Refused handshakes: the first few per period logged, then a summary by reason."""

    async def __aenter__(self) -> ZapHandler:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        if self._sock is not None:
            return
        sock = self.ctx.socket(zmq.REP)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.bind(ZAP_ENDPOINT)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise SecurityError(
                f"cannot start the ZAP authentication handler ({exc}); another one already "
                "serves this ZeroMQ context: give each gateway its own context"
            ) from exc
        self._sock = sock
        self._task = asyncio.create_task(self._serve(sock), name="zap-handler")

    async def aclose(self) -> None:
        self.denials_log.summarise()
        task, self._task = self._task, None
        await cancel_and_wait(task)
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close(linger=0)

    def decide(self, frames: list[bytes]) -> tuple[bytes, bytes, bytes]:
        """(status code, status text, user id) for one request's frames after the request id."""
        if len(frames) < 4:
            return self._deny("malformed ZAP request")
        domain, address, _routing_id, mechanism, *credentials = frames
        if domain.decode("utf-8", "replace") != self.domain:
            return self._deny(f"ZAP domain {domain!r} is not this gateway's")
        if mechanism != b"CURVE":
            return self._deny(f"mechanism {mechanism.decode('ascii', 'replace')} is not CURVE")
        if len(credentials) != 1 or len(credentials[0]) != 32:
            return self._deny("malformed CURVE credentials")
        key = z85.encode(credentials[0])
        grant = self.allow.by_key.get(key)
        if grant is None:
            where = address.decode("ascii", "replace")
            return self._deny("unknown client key", key.decode(), f"{key.decode()} from {where}")
        self.accepted[grant.name] += 1
        log.debug("zap: accepted client %r from %s", grant.name, address.decode("ascii", "replace"))
        return b"200", b"OK", grant.name.encode("utf-8")

    def _deny(self, reason: str, key: str = "", who: str = "") -> tuple[bytes, bytes, bytes]:
        self.denied[reason] += 1
        self.denials_log.log(
            f"{reason} {key}".strip(),
            "zap: refused a handshake: %s%s",
            reason,
            f" ({who})" * bool(who),
        )
        return b"400", reason.encode("utf-8")[:255], b""

    async def _serve(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            msg = await sock.recv_multipart()
            if len(msg) < 2:
                # A reply still has to go out on a REP socket; there is no request id.
                await sock.send_multipart([ZAP_VERSION, b"", b"400", b"malformed", b"", b""])
                continue
            version, request_id, rest = msg[0], msg[1], msg[2:]
            if version != ZAP_VERSION:
                code, text, user = self._deny("unsupported ZAP version")
            else:
                code, text, user = self.decide(rest)
            await sock.send_multipart([ZAP_VERSION, request_id, code, text, user, b""])
