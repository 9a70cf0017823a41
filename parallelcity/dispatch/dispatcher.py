"""The dispatcher: delivers approved setpoints to the field gateway and waits for the ack.

A ZeroMQ DEALER socket talks to the gateway's ROUTER.  Each command gets a
fresh id and the issuer's next sequence number; when no ack arrives within
``timeout_s`` (wall seconds) the socket is closed and re-opened and the
*same* bytes (same id, same seq) are sent again - the "Lazy Pirate" pattern -
up to ``retries`` times.  Because the gateway remembers the ids it applied,
a resend of a command whose ack was lost comes back as ``duplicate`` and is
not written twice.  A refusal is an ``Ack`` value, not an exception;
``DispatchError`` means no ack at all.

Heartbeats (``heartbeat``, ``heartbeat_loop``) keep the gateway's watchdog
fed and the issuer's equipment leases renewed.  They (and re-arms) go over
a DEALER socket other than the commands', so a command being resent never
holds them up: a heartbeat leaves every interval
whatever the commands are doing, and one that gets no answer is not resent
(the next one is due).  The gateway's ``Status`` answer
also tells a restarted issuer where its sequence numbers stand, so it
continues above them.  ``curve`` (client key pair + gateway public key) is
required unless ``insecure_lab`` is set.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import TracebackType

import zmq
import zmq.asyncio

from parallelcity.dispatch.keys import KeyPair, check_z85
from parallelcity.dispatch.wire import (
    MAX_SEQ,
    Ack,
    AckStatus,
    Command,
    Heartbeat,
    Rearm,
    RefusalCode,
    Reply,
    Status,
    decode_reply,
)
from parallelcity.errors import DispatchError, SecurityError, UnauthorisedError, WireFormatError
from parallelcity.gateway.watchdog import readable_times

log = logging.getLogger("parallelcity.dispatch.dispatcher")


@dataclass
class DispatcherCounters:
    sent: int = 0
    """Commands sent (each counted once, however often it was resent)."""
    resent: int = 0
    acked: int = 0
    """Commands that got their ack (any status)."""
    refused: int = 0
    timeouts: int = 0
    """Attempts that got no ack in time."""
    failed: int = 0
    """Commands given up on (``DispatchError``)."""
    heartbeats: int = 0
    """Heartbeats answered by the gateway."""
    heartbeats_lost: int = 0


class _Link:
    """One DEALER socket to the gateway and the lock that keeps its exchanges one at a time."""

    def __init__(self) -> None:
        self.sock: zmq.asyncio.Socket | None = None
        self.lock = asyncio.Lock()
        # heartbeats the loop sent and awaits a status for: id -> loop time it left
        self.waiting: dict[str, float] = {}

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            sock.close(linger=0)


@dataclass(frozen=True)
class ClientCurve:
    """CURVE for a dispatcher: its own key pair and the gateway's public key."""

    keys: KeyPair
    server_public: bytes

    def __post_init__(self) -> None:
        object.__setattr__(self, "server_public", check_z85(self.server_public, "gateway key"))


class Dispatcher:
    """Sends commands to one field gateway; ``async with`` connects and closes.

    ``first_seq`` is the first sequence number used: an issuer that restarts
    under the same name must continue above the last seq the gateway applied
    (a ``heartbeat`` learns it from the gateway and moves ``next_seq`` up).
    """

    def __init__(
        self,
        endpoint: str,
        issuer: str,
        *,
        timeout_s: float = 2.0,
        retries: int = 2,
        first_seq: int = 0,
        curve: ClientCurve | None = None,
        insecure_lab: bool = False,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        if curve is None and not insecure_lab:
            raise SecurityError(
                "the dispatcher needs CURVE keys (its key pair and the gateway's public key, "
                "[security.zmq]); without them it only runs with insecure_lab = true"
            )
        if not (math.isfinite(timeout_s) and timeout_s > 0):
            raise ValueError(f"timeout_s must be a positive number, got {timeout_s}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        if not 0 <= first_seq <= MAX_SEQ:
            raise ValueError(f"first_seq must be in 0..{MAX_SEQ}, got {first_seq}")
        self.endpoint = endpoint
        self.issuer = issuer
        self.timeout_s = timeout_s
        self.retries = retries
        self.counters = DispatcherCounters()
        self._next_seq = first_seq
        self._ctx = context if context is not None else zmq.asyncio.Context.instance()
        self._commands = _Link()
        self._beats = _Link()
        """Heartbeats and re-arms: never queued behind a command's resends."""
        self.curve = curve
        self.last_status: Status | None = None
        self._warned_insecure = False

    @property
    def next_seq(self) -> int:
        return self._next_seq

    async def __aenter__(self) -> Dispatcher:
        self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def connect(self) -> None:
        self._connect(self._commands)

    def _connect(self, link: _Link) -> zmq.asyncio.Socket:
        if link.sock is not None:
            return link.sock
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        # Without a connected peer a DEALER send blocks; bound it.
        sock.setsockopt(zmq.SNDTIMEO, max(1, round(self.timeout_s * 1000)))
        # Queue only on completed connections, so nothing waits for a gateway that is down.
        sock.setsockopt(zmq.IMMEDIATE, 1)
        if self.curve is not None:
            sock.setsockopt(zmq.CURVE_SERVERKEY, self.curve.server_public)
            sock.setsockopt(zmq.CURVE_PUBLICKEY, self.curve.keys.public)
            sock.setsockopt(zmq.CURVE_SECRETKEY, self.curve.keys.secret)
        try:
            sock.connect(self.endpoint)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise DispatchError(f"cannot connect to the gateway at {self.endpoint}: {exc}") from exc
        link.sock = sock
        return sock

    async def aclose(self) -> None:
        self._commands.close()
        self._beats.close()

    def _reconnect(self) -> None:
        """A fresh command connection (a resend then comes from a new peer)."""
        self._commands.close()
        self.connect()

    def command(
        self,
        setpoints: Mapping[str, float],
        *,
        issued_at: float,
        valid_until: float,
        verdict_digest: str,
    ) -> Command:
        """Make the next command of this issuer (fresh id, next seq) without sending it.

        Lets the caller journal the command before it leaves.  Raises
        ``WireFormatError`` if the command would not be valid, ``DispatchError``
        when the issuer has no sequence number left.
        """
        if self._next_seq > MAX_SEQ:
            raise DispatchError(self._exhausted())
        cmd = Command.create(
            issuer=self.issuer,
            seq=self._next_seq,
            issued_at=issued_at,
            valid_until=valid_until,
            setpoints=setpoints,
            verdict=verdict_digest,
        )
        self._next_seq += 1
        return cmd

    async def send(
        self,
        setpoints: Mapping[str, float],
        *,
        issued_at: float,
        valid_until: float,
        verdict_digest: str,
    ) -> Ack:
        """Deliver one new command; return the gateway's ack (applied, refused or duplicate).

        Raises ``WireFormatError`` (before sending) if the command is not valid,
        and ``DispatchError`` if no ack came back after ``1 + retries`` attempts.
        """
        cmd = self.command(
            setpoints, issued_at=issued_at, valid_until=valid_until, verdict_digest=verdict_digest
        )
        return await self.deliver(cmd)

    async def deliver(self, cmd: Command) -> Ack:
        """Send ``cmd`` (made by ``command``), resending the same bytes until acked."""
        async with self._commands.lock:
            self.counters.sent += 1
            try:
                reply = await self._exchange(
                    self._commands, cmd.id, cmd.encode(), f"seq {cmd.seq}", 1 + self.retries
                )
            except DispatchError:
                self.counters.failed += 1
                raise
        if not isinstance(reply, Ack):
            raise DispatchError(f"the gateway answered command {cmd.id} with a status, not an ack")
        self._count(reply)
        return reply

    async def heartbeat(self, *, release: bool = False, sent_at: float = 0.0) -> Status:
        """One heartbeat; the gateway's ``Status`` (watchdog, leases, our last seq).

        ``release`` is the clean goodbye: it ends the issuer's leases and, when no
        other issuer is live, leaves the gateway's watchdog idle.  Raises
        ``DispatchError`` when no answer came or the gateway refused it.
        """
        hb = Heartbeat.create(self.issuer, sent_at, release=release)
        status = await self._status_request(hb.id, hb.encode(), "heartbeat")
        self.counters.heartbeats += 1
        return status

    async def rearm(self, reason: str) -> Status:
        """Ask the gateway to re-arm its tripped watchdog (the key must be allowed to)."""
        msg = Rearm.create(self.issuer, reason)
        return await self._status_request(msg.id, msg.encode(), "re-arm")

    async def _status_request(self, msg_id: str, data: bytes, what: str) -> Status:
        async with self._beats.lock:
            reply = await self._exchange(self._beats, msg_id, data, what, 1 + self.retries)
        if isinstance(reply, Ack):
            code = reply.code.value if reply.code else reply.status.value
            # A key that may not re-arm is refused for security (CLI exit code 4).
            unauthorised = what == "re-arm" and reply.code is RefusalCode.UNAUTHORISED
            raise (UnauthorisedError if unauthorised else DispatchError)(
                f"the gateway at {self.endpoint} refused the {what}: {code}: {reply.detail}"
            )
        self._note_status(reply)
        return reply

    def _exhausted(self) -> str:
        return (
            f"issuer {self.issuer!r} has used every sequence number (the gateway at "
            f"{self.endpoint} applied seq {MAX_SEQ}, the maximum): no further command can be "
            "sent under this issuer; bind the key to a new issuer name in the gateway config"
        )

    def _note_status(self, status: Status) -> None:
        previous, self.last_status = self.last_status, status
        if status.last_seq is not None and status.last_seq >= MAX_SEQ:
            self._next_seq = MAX_SEQ + 1
            log.error("dispatcher: %s", self._exhausted())
        elif status.last_seq is not None and status.last_seq >= self._next_seq:
            log.info(
                "dispatcher: the gateway last applied seq %d of %r; continuing at %d",
                status.last_seq,
                self.issuer,
                status.last_seq + 1,
            )
            self._next_seq = status.last_seq + 1
        if previous is None or previous.watchdog is not status.watchdog:
            log.log(
                logging.ERROR if status.watchdog.value == "tripped" else logging.INFO,
                "dispatcher: gateway watchdog is %s%s",
                status.watchdog.value,
                f": {readable_times(status.detail, status.gateway_time)}" if status.detail else "",
            )
        if status.insecure_lab:
            self._warn_insecure()

    async def heartbeat_loop(
        self,
        interval_s: float,
        on_status: Callable[[Status], Awaitable[None] | None] | None = None,
        *,
        now: Callable[[], float] | None = None,
    ) -> None:
        """Heartbeat every ``interval_s`` wall seconds until cancelled; never raises for a
        lost heartbeat (the gateway's watchdog is what acts on silence).

        On the heartbeat socket (never the commands'), heartbeats leave on
        schedule whatever the commands are doing and however late their
        statuses come back: statuses are taken as they arrive, and a heartbeat
        without one within ``timeout_s`` (at least ``interval_s``) counts as
        lost.  None is resent; ZeroMQ reconnects to a restarted gateway by
        itself.  A ``heartbeat`` call (the ``release`` at the end of a run)
        takes the socket between two beats: one connection keeps the
        gateway's view in order, so no beat of the loop lands after the
        goodbye.
        """
        link = self._beats
        loop = asyncio.get_running_loop()
        lost_after = max(self.timeout_s, interval_s)
        waiting = link.waiting
        next_at = loop.time()
        while True:
            statuses: list[Status] = []
            async with link.lock:
                sock = self._connect(link)
                hb = Heartbeat.create(self.issuer, now() if now else 0.0)
                try:
                    await sock.send(hb.encode(), zmq.NOBLOCK)
                    waiting[hb.id] = loop.time()
                except zmq.ZMQError as exc:  # Again: no gateway connected (yet)
                    self._beat_lost(f"could not send: {exc}")
                next_at = max(next_at + interval_s, loop.time())
                while (left := next_at - loop.time()) > 0:
                    try:
                        async with asyncio.timeout(left):
                            frames = await sock.recv_multipart()
                    except TimeoutError:
                        break
                    status = self._beat_answer(frames, waiting)
                    if status is not None:
                        statuses.append(status)
            for beat_id, sent in list(waiting.items()):
                if loop.time() - sent > lost_after:
                    del waiting[beat_id]
                    self._beat_lost(f"no status within {lost_after:g} s")
            if on_status is not None:
                for status in statuses:
                    result = on_status(status)
                    if result is not None:
                        await result

    def _beat_answer(self, frames: list[bytes], waiting: dict[str, float]) -> Status | None:
        """A reply on the heartbeat socket: the status to pass on, if it is one."""
        try:
            reply = decode_reply(frames[-1])
        except WireFormatError as exc:
            log.warning("dispatcher: ignoring an unreadable reply: %s", exc)
            return None
        if waiting.pop(reply.id, None) is None:
            return None  # given up on already
        if isinstance(reply, Ack):
            code = reply.code.value if reply.code else reply.status.value
            self._beat_lost(f"refused: {code}: {reply.detail}")
            return None
        self.counters.heartbeats += 1
        self._note_status(reply)
        return reply

    def _beat_lost(self, why: str) -> None:
        self.counters.heartbeats_lost += 1
        log.warning("dispatcher: heartbeat to %s lost: %s", self.endpoint, why)

    async def _exchange(
        self,
        link: _Link,
        msg_id: str,
        data: bytes,
        what: str,
        attempts: int,
        timeout_s: float | None = None,
    ) -> Reply:
        wait_s = self.timeout_s if timeout_s is None else timeout_s
        problems: list[str] = []
        for attempt in range(1, attempts + 1):
            sock = self._connect(link)
            if attempt > 1:
                self.counters.resent += 1
                log.info("dispatcher: resending %s (attempt %d/%d)", msg_id, attempt, attempts)
            reply = await self._attempt(sock, wait_s, msg_id, data, problems, link.waiting)
            if reply is not None:
                return reply
            self.counters.timeouts += 1
            # Lazy Pirate: the socket may hold a half-delivered exchange; start afresh.
            link.close()
        raise DispatchError(
            f"{what} {msg_id} (issuer {self.issuer!r}) got no answer from "
            f"{self.endpoint} after {attempts} attempt(s) of {wait_s:g} s: "
            + "; ".join(dict.fromkeys(problems))
        )

    async def _attempt(
        self,
        sock: zmq.asyncio.Socket,
        wait_s: float,
        msg_id: str,
        data: bytes,
        problems: list[str],
        beats: dict[str, float],
    ) -> Reply | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        try:
            async with asyncio.timeout(wait_s + 0.5):  # SNDTIMEO bounds this too
                await sock.send(data)
        except (zmq.Again, TimeoutError):
            problems.append("could not send (no gateway connected, or the handshake failed)")
            return None
        except zmq.ZMQError as exc:
            problems.append(f"send failed: {exc}")
            return None
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                problems.append("no answer in time")
                return None
            try:
                # recv under a timeout rather than poll-then-recv: a poll can report a
                # message that the following awaited recv then waits on for good.
                async with asyncio.timeout(remaining):
                    frames = await sock.recv_multipart()
            except TimeoutError:
                continue
            if len(frames) != 1:
                log.warning("dispatcher: ignoring a reply of %d frames", len(frames))
                continue
            try:
                reply = decode_reply(frames[0])
            except WireFormatError as exc:
                log.warning("dispatcher: ignoring an unreadable reply: %s", exc)
                continue
            if reply.id != msg_id:
                if beats.pop(reply.id, None) is not None:
                    # the loop stopped between a beat and its status: expected at a run's end
                    log.debug("dispatcher: a late status to heartbeat %s", reply.id)
                else:
                    log.info("dispatcher: ignoring a reply to another message (%s)", reply.id)
                continue
            return reply

    def _count(self, ack: Ack) -> None:
        self.counters.acked += 1
        if ack.status is AckStatus.REFUSED:
            self.counters.refused += 1
            log.warning(
                "dispatcher: %s (seq %d) refused by the gateway: %s: %s",
                ack.id,
                ack.seq,
                ack.code.value if ack.code else "?",
                ack.detail,
            )
        if ack.insecure_lab:
            self._warn_insecure()

    def _warn_insecure(self) -> None:
        if not self._warned_insecure:
            self._warned_insecure = True
            log.warning(
                "dispatcher: the field gateway at %s runs in INSECURE LAB MODE "
                "(no authentication or encryption)",
                self.endpoint,
            )
