"""The dispatcher: delivers approved setpoints to the field gateway and waits for the ack.

A ZeroMQ DEALER socket talks to the gateway's ROUTER.  Each command gets a
fresh id and the issuer's next sequence number; when no ack arrives within
``timeout_s`` (wall seconds) the socket is closed and re-opened and the
*same* bytes (same id, same seq) are sent again - the "Lazy Pirate" pattern -
up to ``retries`` times.  Because the gateway remembers the ids it applied,
a resend of a command whose ack was lost comes back as ``duplicate`` and is
not written twice.  A refusal is an ``Ack`` value, not an exception;
``DispatchError`` means no ack at all.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType

import zmq
import zmq.asyncio

from .errors import DispatchError, WireFormatError
from .wire import MAX_SEQ, Ack, AckStatus, Command, decode_ack

log = logging.getLogger("parallelcity.dispatcher")


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


class Dispatcher:
    """Sends commands to one field gateway; ``async with`` connects and closes.

    ``first_seq`` is the first sequence number used: an issuer that restarts
    under the same name must continue above the last seq the gateway applied.
    """

    def __init__(
        self,
        endpoint: str,
        issuer: str,
        *,
        timeout_s: float = 2.0,
        retries: int = 2,
        first_seq: int = 0,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        if not (math.isfinite(timeout_s) and timeout_s > 0):
            raise ValueError(f"timeout_s must be a positive number, got {timeout_s}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        if not 0 <= first_seq <= MAX_SEQ:
            raise ValueError(f"first_seq must be in 0..2**63-1, got {first_seq}")
        self.endpoint = endpoint
        self.issuer = issuer
        self.timeout_s = timeout_s
        self.retries = retries
        self.counters = DispatcherCounters()
        self._next_seq = first_seq
        self._ctx = context if context is not None else zmq.asyncio.Context.instance()
        self._sock: zmq.asyncio.Socket | None = None
        self._lock = asyncio.Lock()
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
        if self._sock is not None:
            return
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        # Without a connected peer a DEALER send blocks; bound it.
        sock.setsockopt(zmq.SNDTIMEO, max(1, round(self.timeout_s * 1000)))
        # Queue only on completed connections, so nothing waits for a gateway that is down.
        sock.setsockopt(zmq.IMMEDIATE, 1)
        try:
            sock.connect(self.endpoint)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise DispatchError(f"cannot connect to the gateway at {self.endpoint}: {exc}") from exc
        self._sock = sock

    async def aclose(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close(linger=0)

    def _reconnect(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close(linger=0)
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
        ``WireFormatError`` if the command would not be valid.
        """
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
        async with self._lock:
            return await self._deliver(cmd)

    async def _deliver(self, cmd: Command) -> Ack:
        data = cmd.encode()
        attempts = 1 + self.retries
        self.counters.sent += 1
        problems: list[str] = []
        for attempt in range(1, attempts + 1):
            if self._sock is None:
                self.connect()
            if attempt > 1:
                self.counters.resent += 1
                log.info("dispatcher: resending %s (attempt %d/%d)", cmd.id, attempt, attempts)
            ack = await self._attempt(cmd, data, problems)
            if ack is not None:
                self._count(ack)
                return ack
            self.counters.timeouts += 1
            # Lazy Pirate: the socket may hold a half-delivered exchange; start afresh.
            self._reconnect()
        self.counters.failed += 1
        raise DispatchError(
            f"command {cmd.id} (issuer {cmd.issuer!r}, seq {cmd.seq}) got no ack from "
            f"{self.endpoint} after {attempts} attempt(s) of {self.timeout_s:g} s: "
            + "; ".join(dict.fromkeys(problems))
        )

    async def _attempt(self, cmd: Command, data: bytes, problems: list[str]) -> Ack | None:
        sock = self._sock
        assert sock is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        try:
            async with asyncio.timeout(self.timeout_s + 0.5):  # SNDTIMEO bounds this already
                await sock.send(data)
        except (zmq.Again, TimeoutError):
            problems.append("could not send (no gateway connected)")
            return None
        except zmq.ZMQError as exc:
            problems.append(f"send failed: {exc}")
            return None
        poller = zmq.asyncio.Poller()
        poller.register(sock, zmq.POLLIN)
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                problems.append("no ack in time")
                return None
            ready = dict(await poller.poll(max(1, math.ceil(remaining * 1000))))
            if not ready.get(sock, 0) & zmq.POLLIN:
                continue
            frames = await sock.recv_multipart()
            if len(frames) != 1:
                log.warning("dispatcher: ignoring a reply of %d frames", len(frames))
                continue
            try:
                ack = decode_ack(frames[0])
            except WireFormatError as exc:
                log.warning("dispatcher: ignoring an unreadable reply: %s", exc)
                continue
            if ack.id != cmd.id:
                log.info("dispatcher: ignoring an ack for another command (%s)", ack.id)
                continue
            return ack

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
        if ack.insecure_lab and not self._warned_insecure:
            self._warned_insecure = True
            log.warning(
                "dispatcher: the field gateway at %s runs in INSECURE LAB MODE "
                "(no authentication or encryption)",
                self.endpoint,
            )
