"""The field gateway's I/O shell: the last check before setpoints reach field equipment.

``FieldGateway`` holds a ZeroMQ ROUTER socket (CURVE with a ZAP allow-list
unless the configuration says ``insecure_lab``), decodes requests, asks the
pure ``gateway_core.GatewayCore`` for each decision, records accepted commands
durably *before* they are written or acked (a batch of waiting messages at a
time: group commit), writes accepted setpoints through a ``SetpointWriter``
(``field_writer.OpcUaWriter`` in production), settles a write whose outcome is
unknown, reverts to safe values when the watchdog trips, and answers every
message - including bytes it cannot read.

The rules, in order, are documented in ``docs/wire-protocol.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType

import zmq
import zmq.asyncio

from parallelcity.backoff import Backoff
from parallelcity.clock import Clock
from parallelcity.dispatch.keys import KeyPair
from parallelcity.dispatch.wire import (
    MAX_MESSAGE_BYTES,
    Ack,
    AckStatus,
    Command,
    Heartbeat,
    Rearm,
    RefusalCode,
    Status,
    decode_request,
    recover_id,
    truncate_detail,
)
from parallelcity.errors import (
    DispatchError,
    FieldUnavailableError,
    ParallelCityError,
    SecurityError,
    WireFormatError,
)
from parallelcity.field.protocol import SetpointWriter
from parallelcity.gateway.core import (
    MAX_REMEMBERED_IDS,
    AppliedInput,
    Decision,
    GatewayCore,
    Outcome,
)
from parallelcity.gateway.loglimit import LogLimiter
from parallelcity.gateway.store import AppliedMark, GatewayStore, Pending, judge
from parallelcity.gateway.watchdog import readable_times
from parallelcity.gateway.zap import AllowList, Grant, ZapHandler

log = logging.getLogger("parallelcity.gateway.server")

TRANSPORT_MAX_FRAME_BYTES = 2 * MAX_MESSAGE_BYTES
"""ZeroMQ disconnects a peer sending a frame over this (before buffering it); a frame over
``MAX_MESSAGE_BYTES`` but under this gets a ``malformed`` refusal."""
TRANSPORT_RCVHWM = 256
"""Complete messages ZeroMQ queues per peer before it stops reading that peer's socket."""
DEFAULT_MAX_BATCH = 64
"""Messages taken from the socket as one batch (one pending commit, one reply burst); the
event loop runs (watchdog, ZAP, flusher) between two batches."""
DEFAULT_APPLIED_FLUSH_DELAY_S = 0.002
"""With nothing waiting, deferred applied marks are committed after this (wall seconds)."""
INSECURE_GRANT = Grant.everything("insecure-lab", issuers=None)
"""Without CURVE there is no key to bind an issuer to: any issuer name is taken as given."""
IN_DOUBT_BACKOFF = Backoff(initial=0.05, maximum=1.0)
"""Wall-second waits between read-backs of a write whose outcome is unknown."""
LINK_POLL_S = 0.05
"""While in doubt, how often the writer's link is looked at (a read-back follows its return)."""


# =========================================================================== I/O shell


@dataclass(frozen=True)
class KeyQuota:
    """Messages one client key may send: ``rate_per_s`` on average, ``burst`` at once.

    A message over its key's quota is dropped unread and unanswered (counted,
    logged in aggregate): a flooding key costs the gateway one receive per
    message and never a decode, a decision, a log line or a reply.
    """

    rate_per_s: float
    burst: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rate_per_s) and self.rate_per_s > 0):
            raise ValueError(f"rate_per_s must be > 0, got {self.rate_per_s}")
        if not (math.isfinite(self.burst) and self.burst >= 1):
            raise ValueError(f"burst must be >= 1, got {self.burst}")


class _Buckets:
    """Token buckets per client key (monotonic seconds); pure apart from the clock read."""

    MAX_KEYS = 10_000

    def __init__(self, quota: KeyQuota) -> None:
        self.quota = quota
        self._tokens: dict[bytes | str, tuple[float, float]] = {}

    def take(self, key: bytes | str, now: float) -> bool:
        q = self.quota
        tokens, at = self._tokens.get(key, (q.burst, now))
        tokens = min(q.burst, tokens + (now - at) * q.rate_per_s)
        if tokens < 1.0:
            self._tokens[key] = (tokens, now)
            return False
        if key not in self._tokens and len(self._tokens) >= self.MAX_KEYS:
            self._prune(now)
        self._tokens[key] = (tokens - 1.0, now)
        return True

    def _prune(self, now: float) -> None:
        q = self.quota
        full = [
            k for k, (t, at) in self._tokens.items() if t + (now - at) * q.rate_per_s >= q.burst
        ]
        for k in full:
            del self._tokens[k]


@dataclass(frozen=True)
class ServerCurve:
    """CURVE for a gateway: its own key pair and the clients it accepts, with their grants."""

    keys: KeyPair
    allow: AllowList
    domain: str = "parallelcity"
    """ZAP domain; the ZAP handler answers for exactly this string."""


@dataclass
class GatewayCounters:
    received: int = 0
    """Messages that reached the command handler (after authentication)."""
    applied: int = 0
    duplicates: int = 0
    refused: Counter[RefusalCode] = field(default_factory=Counter)
    over_quota: Counter[str] = field(default_factory=Counter)
    """Client name -> messages dropped unanswered because the key was over its quota."""
    oversized: int = 0
    """Messages of more than one frame (their frames after the first dropped uncopied)."""
    heartbeats: int = 0
    rearms: int = 0
    trips: int = 0
    reverts: int = 0
    batches: int = 0
    """Batches of messages handled (``handle_batch`` calls)."""
    largest_batch: int = 0
    in_doubt: int = 0
    """Times a field write's outcome could not be settled at once (the gateway went in doubt)."""

    @property
    def malformed(self) -> int:
        return self.refused[RefusalCode.MALFORMED]

    @property
    def refused_total(self) -> int:
        return sum(self.refused.values())


class FieldGateway:
    """Serves commands on a ZeroMQ ROUTER socket until cancelled.

    ``async with`` (or ``await start()``) restores the durable state from
    ``store`` (settling a write a crash left in doubt), starts the ZAP handler
    and binds; ``endpoint`` is then the address actually bound
    (``zmq.LAST_ENDPOINT``, useful with port 0); ``serve()`` answers messages
    and runs the watchdog, forever; ``aclose()`` closes.

    Group commit: ``serve`` takes everything waiting on the socket (up to
    ``max_batch`` messages) as one batch, decides each command in order (a
    later command sees the earlier ones' effect), records the accepted ones
    pending in one commit, writes them (commands on disjoint inputs share a
    write call), marks them applied and then sends every reply, in the order
    the messages came.  The applied marks ride in the next commit unless
    ``ack_after_applied_commit``; with nothing waiting they are committed
    after ``applied_flush_delay_s`` (wall seconds).  Why that keeps exactly
    once: ``gateway_store``'s docstring.

    A field write whose outcome is unknown (it timed out, the session dropped
    mid-request, the writer raised unexpectedly - anything but
    ``FieldUnavailableError``, which means nothing was sent) is settled by
    reading the field back (retried for up to ``write_timeout_s`` while the
    link comes back).  When that read fails too, the gateway is *in
    doubt* (``in_doubt``): the write group stays pending in the store, every
    command it would otherwise write is refused ``write_failed`` with a detail
    that says so, and the read-back is retried with ``in_doubt_backoff`` (wall
    seconds; at once when the writer's ``available`` comes back) until the
    group is settled, exactly as a pending batch is at start.

    Without ``curve`` the gateway refuses to start unless ``insecure_lab`` is
    true; it then logs a loud warning and every ack says ``insecure_lab``.
    Without ``store`` its memory is in-process only (tests, benchmarks).
    """

    def __init__(
        self,
        core: GatewayCore,
        writer: SetpointWriter,
        clock: Clock,
        *,
        bind: str,
        curve: ServerCurve | None = None,
        insecure_lab: bool = False,
        store: GatewayStore | None = None,
        write_timeout_s: float = 5.0,
        context: zmq.asyncio.Context | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
        ack_after_applied_commit: bool = False,
        applied_flush_delay_s: float = DEFAULT_APPLIED_FLUSH_DELAY_S,
        in_doubt_backoff: Backoff = IN_DOUBT_BACKOFF,
        quota: KeyQuota | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if not (math.isfinite(applied_flush_delay_s) and applied_flush_delay_s >= 0):
            raise ValueError(f"applied_flush_delay_s must be >= 0, got {applied_flush_delay_s}")
        if curve is None and not insecure_lab:
            raise SecurityError(
                "the field gateway needs CURVE keys: a server key pair and an allow-list of "
                "client public keys ([security.zmq]); without them it only runs when "
                "insecure_lab = true in [security] (a lab on loopback)"
            )
        self.core = core
        self.writer = writer
        self.clock = clock
        self.bind = bind
        self.curve = curve
        self.insecure = insecure_lab
        """Every ack and status says ``insecure_lab`` when the configuration does."""
        self.store = store
        self.write_timeout_s = write_timeout_s
        self.max_batch = max_batch
        self.ack_after_applied_commit = ack_after_applied_commit
        self.applied_flush_delay_s = applied_flush_delay_s
        self.counters = GatewayCounters()
        self._own_ctx = context is None
        self._ctx = context
        self._sock: zmq.asyncio.Socket | None = None
        self._zap: ZapHandler | None = None
        self._endpoint = ""
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._marks_deferred = asyncio.Event()
        self._leases_saved_at = -math.inf
        self.last_revert_at: float | None = None
        """Gateway time the safe values last landed in the field."""
        self.in_doubt_backoff = in_doubt_backoff
        self._in_doubt: _InDoubt | None = None
        self._settler: asyncio.Task[None] | None = None
        self._grants: dict[str, Grant] = {}
        if curve is not None:
            self._grants = {g.name: g for g in curve.allow.by_key.values()}
        self.quota = quota
        """Per client key (per connection without CURVE); ``None``: unlimited."""
        self._buckets = _Buckets(quota) if quota is not None else None
        self._stopping: str | None = None
        self._recv_wait: asyncio.Future[zmq.Frame] | None = None
        self.refusals_log = LogLimiter(log, "gateway: refused messages")
        self.drops_log = LogLimiter(log, "gateway: dropped messages", burst=3)

    @property
    def endpoint(self) -> str:
        """The endpoint actually bound (after ``start``)."""
        if not self._endpoint:
            raise RuntimeError("the gateway is not bound yet: use `async with` or start()")
        return self._endpoint

    @property
    def zap(self) -> ZapHandler | None:
        return self._zap

    @property
    def in_doubt(self) -> str | None:
        """Why the gateway is in doubt (refusing commands until a write is settled), or None."""
        doubt = self._in_doubt
        return None if doubt is None else doubt.detail

    async def __aenter__(self) -> FieldGateway:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def start(self) -> None:
        if self._sock is not None:
            return
        await self._restore()
        if self._ctx is None:
            self._ctx = zmq.asyncio.Context()
        ctx = self._ctx
        if self.curve is not None:
            # The handler must answer before the first client can connect: without one,
            # libzmq lets any CURVE client in.
            self._zap = ZapHandler(ctx, self.curve.domain, self.curve.allow)
            await self._zap.start()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, TRANSPORT_MAX_FRAME_BYTES)
        sock.setsockopt(zmq.RCVHWM, TRANSPORT_RCVHWM)
        if self.curve is not None:
            sock.setsockopt(zmq.CURVE_SERVER, 1)
            sock.setsockopt(zmq.CURVE_SECRETKEY, self.curve.keys.secret)
            sock.setsockopt(zmq.ZAP_DOMAIN, self.curve.domain.encode())
            sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        try:
            sock.bind(self.bind)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            await self._close_zap()
            raise DispatchError(f"cannot bind the field gateway to {self.bind}: {exc}") from exc
        self._sock = sock
        raw = sock.getsockopt(zmq.LAST_ENDPOINT)
        self._endpoint = raw.decode() if isinstance(raw, bytes) else str(raw)
        if self.curve is None:
            log.warning(
                "INSECURE LAB MODE: field gateway on %s accepts commands WITHOUT authentication "
                "or encryption (no CURVE); anyone who can reach this address can move field "
                "equipment within the safety limits. Never run this way outside a lab.",
                self._endpoint,
            )
        else:
            log.info(
                "field gateway on %s: CURVE, server key %s, %d client key(s) allowed",
                self._endpoint,
                self.curve.keys.public.decode(),
                len(self.curve.allow),
            )

    async def _close_zap(self) -> None:
        zap, self._zap = self._zap, None
        if zap is not None:
            await zap.aclose()

    async def aclose(self) -> None:
        settler, self._settler = self._settler, None
        if settler is not None:
            settler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await settler
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close(linger=0)
        await self._close_zap()
        if self._own_ctx and self._ctx is not None:
            ctx, self._ctx = self._ctx, None
            ctx.destroy(linger=0)

    # ------------------------------------------------------------------ durable state

    async def _restore(self) -> None:
        store = self.store
        if store is None:
            return
        core, now = self.core, self.clock.now()
        loaded = store.load(MAX_REMEMBERED_IDS)
        st = core.state
        st.applied_ids = loaded.applied_ids
        st.digests = dict(loaded.digests)
        st.last_seq = dict(loaded.last_seq)
        core.restore_inputs(loaded.inputs, now)
        core.leases.leases = dict(loaded.leases)
        if loaded.watchdog is not None:
            core.watchdog.restore(*loaded.watchdog, now=now)
        for batch in loaded.pending_batches():
            names = sorted({n for p in batch for n in p.setpoints})
            values = await self._read_back(names)
            if values is None:
                # Not knowing, never apply twice: count the batch as applied.
                log.error("gateway: cannot read the field back; assuming the writes landed")
            self._settle_batch(batch, values, now, "after a restart")
        if loaded.applied_ids or loaded.pending:
            log.info(
                "gateway: restored %d applied id(s), %d issuer(s), watchdog %s",
                len(st.applied_ids),
                len(st.last_seq),
                core.watchdog.state.value,
            )

    def _settle_batch(
        self,
        batch: Sequence[Pending],
        values: Mapping[str, float] | None,
        now: float,
        when: str,
        events: Sequence[tuple[float, str, str]] = (),
    ) -> None:
        """Settle a pending batch against ``values`` read back (``None``: count it all applied).

        ``gateway_store.judge`` decides: the commands counted as applied are
        remembered and become the inputs' last applied values; the others are
        forgotten (a resend is decided afresh).  A command counted as applied
        although an input holds a value this gateway did not write there is a
        ``conflict`` (event and warning): never written again.  One store
        commit, ``events`` too.
        """
        core, st = self.core, self.core.state
        names = {n for p in batch for n in p.setpoints}
        before = {n: st.last_applied[n].value for n in names if n in st.last_applied}
        marks: list[AppliedMark] = []
        abandoned: list[str] = []
        settled: list[tuple[float, str, str]] = []
        for p, verdict in zip(batch, judge(batch, values, before), strict=True):
            if verdict.applied:
                core._remember(p.command_id, p.issuer, p.seq, now, p.digest)
                for name, value in p.setpoints.items():
                    st.last_applied[name] = AppliedInput(value, now)
                marks.append(
                    AppliedMark(p.command_id, p.issuer, p.seq, p.issued_at, p.setpoints, now)
                )
                what = "its values are in the field: counted as applied"
                if values is None:
                    what = "the field could not be read: counted as applied (never twice)"
                elif verdict.conflicts:
                    what = "the field holds another value: counted as applied, a conflict"
            else:
                abandoned.append(p.command_id)
                what = (
                    "its inputs still hold this gateway's earlier values: it did not land, "
                    "forgotten, a resend is applied"
                )
            for conflict in verdict.conflicts:
                log.warning("gateway: CONFLICT %s: %s", when, conflict.describe())
                settled.append((now, "conflict", conflict.describe()))
            log.warning("gateway: command %s was in doubt %s; %s", p.command_id, when, what)
            settled.append((now, "settled", f"{p.command_id}: {what}"))
        if self.store is not None:
            self.store.settle(marks, abandoned, core.leases.leases, events=[*settled, *events])

    async def _read_back(self, names: Sequence[str]) -> Mapping[str, float] | None:
        """The field's values of ``names``; ``None`` when they cannot be read."""
        try:
            async with asyncio.timeout(self.write_timeout_s):
                return await self.writer.read(list(names))
        except Exception as exc:
            log.error("gateway: reading %d input(s) back from the field failed: %s",
                      len(names), exc)  # fmt: skip
            return None

    async def _read_back_patiently(self, names: Sequence[str]) -> Mapping[str, float] | None:
        """``_read_back``, retried while the link comes back, for up to ``write_timeout_s``.

        A write that timed out often did so because the field stalled, and the
        session may have been dropped meanwhile: a read a moment later tells what
        landed, so the command is answered by what the field holds, not ``write_failed``.
        """
        end = time.monotonic() + self.write_timeout_s
        for delay in self.in_doubt_backoff.delays():
            values = await self._read_back(names)
            left = end - time.monotonic()
            if values is not None or left <= 0:
                return values
            await self._link_or_sleep(min(delay, left))
        return None

    # ------------------------------------------------------------------ serving

    async def serve(self) -> None:
        """Answer requests and run the watchdog until cancelled or ``request_stop``.

        After ``request_stop`` it takes no new message, finishes the batch in
        hand, lets a revert in progress finish, commits the deferred applied
        marks and returns.
        """
        await self.start()
        async with asyncio.TaskGroup() as tasks:
            helpers = [tasks.create_task(self._watch(), name="gateway-watchdog")]
            if self.store is not None:
                helpers.append(
                    tasks.create_task(self._flush_marks(self.store), name="gateway-applied-marks")
                )
            await self._serve_messages()
            async with self._lock:  # nothing holds it: no revert or flush is half done
                for task in helpers:
                    task.cancel()
        async with self._lock:
            if self.store is not None:
                self.store.flush()
        self.refusals_log.summarise()
        self.drops_log.summarise()
        log.warning("gateway: stopped (%s): batch finished, store committed", self._stopping)

    def request_stop(self, why: str = "stop requested") -> None:
        """Make ``serve`` stop taking messages and return cleanly (e.g. on SIGTERM)."""
        if self._stopping is None:
            self._stopping = why
            log.warning("gateway: %s: stopping after the batch in hand", why)
        wait = self._recv_wait
        if wait is not None and not wait.done():
            wait.cancel()

    async def _flush_marks(self, store: GatewayStore) -> None:
        """Commit deferred applied marks that no batch took along within the flush delay."""
        delay = self.applied_flush_delay_s
        while True:
            await self._marks_deferred.wait()
            self._marks_deferred.clear()
            while store.deferred:
                left = delay - (time.monotonic() - store.deferred_since)
                if left > 0:
                    await asyncio.sleep(left)
                    continue
                async with self._lock:
                    store.flush()

    async def _serve_messages(self) -> None:
        sock = self._sock
        if sock is None:
            raise RuntimeError("the gateway socket was closed")
        # Messages already queued are taken without a trip through the event loop ...
        raw: zmq.Socket[bytes] = zmq.Socket.shadow(sock.underlying)
        while self._stopping is None:
            if self._sock is None:
                raise RuntimeError("the gateway socket was closed")
            ident = await self._next_identity(sock)
            if ident is None:
                break
            batch: list[_Received] = []
            taken = 0
            while True:
                taken += 1
                msg = self._take(raw, ident)
                if msg is not None:
                    batch.append(msg)
                if taken >= self.max_batch:
                    break
                try:
                    ident = raw.recv(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
            if batch:
                await self._answer(raw, batch)
            # ... but between batches the event loop runs: a ready receive future does not
            # yield, and the watchdog, the ZAP handler and the flusher must not starve.
            await asyncio.sleep(0)

    async def _next_identity(self, sock: zmq.asyncio.Socket) -> zmq.Frame | None:
        """The first frame (routing identity) of the next message; ``None`` when stopping."""
        wait = asyncio.ensure_future(sock.recv(copy=False))
        self._recv_wait = wait
        try:
            return await wait
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._stopping is not None and task is not None and not task.cancelling():
                return None
            raise
        finally:
            self._recv_wait = None

    def _take(self, raw: zmq.Socket[bytes], ident: zmq.Frame) -> _Received | None:
        """The rest of a message whose identity frame is in hand; ``None``: dropped.

        ZeroMQ hands over only complete messages, so its frames are all there.  Only
        one is copied (the first, or the second after an empty delimiter frame: a REQ
        peer's envelope, answered the same way); the others are released unread.  Over
        quota: dropped.
        """
        first: zmq.Frame | None = None
        frames = 0
        envelope = False
        more = ident.more
        while more:
            f = raw.recv(zmq.NOBLOCK, copy=False)
            more = f.more
            frames += 1
            if first is None:
                first = f
            elif frames == 2 and len(first) == 0:
                envelope, first = True, f
        grant = self._grant(first)
        if self._buckets is not None:
            key: bytes | str = grant.name if grant is not None and self.curve else ident.bytes
            if not self._buckets.take(key, time.monotonic()):
                who = grant.name if grant is not None else "unknown"
                self.counters.over_quota[who] += 1
                self.drops_log.log(
                    who, "gateway: client %r is over its quota; dropping its messages", who
                )
                return None
        if frames - envelope != 1:
            self.counters.oversized += frames > 1
            data = first.bytes[:MAX_MESSAGE_BYTES] if first is not None else b""
            reason = f"expected exactly one frame, got {frames}"
            if envelope:
                reason += " (an empty delimiter frame, as a REQ socket sends, then one more)"
            reply = self._malformed(data, reason)
            return _Received(ident.bytes, [], grant, reply, envelope)
        assert first is not None
        return _Received(ident.bytes, [first.bytes], grant, None, envelope)

    async def _answer(self, raw: zmq.Socket[bytes], batch: list[_Received]) -> None:
        """Handle a batch of received messages and send the replies."""
        todo = [m for m in batch if m.reply is None]
        replies = await self.handle_batch([(m.frames, m.grant) for m in todo])
        for m, reply in zip(todo, replies, strict=True):
            m.reply = reply
        for m in batch:
            if m.reply is None:
                continue
            try:
                # A ROUTER never blocks on send: a reply to a vanished peer is dropped.
                if m.envelope:  # a REQ peer drops a reply without its delimiter
                    raw.send_multipart([m.ident, b"", m.reply], zmq.NOBLOCK)
                else:
                    raw.send_multipart([m.ident, m.reply], zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                log.warning("gateway: could not send a reply: %s", exc)

    def _grant(self, frame: zmq.Frame | None) -> Grant | None:
        if self.curve is None:
            return INSECURE_GRANT
        if frame is None:
            return None
        try:
            user = frame.get("User-Id")
        except zmq.ZMQError:
            return None
        return self._grants.get(str(user))

    async def handle(self, frames: list[bytes], grant: Grant | None = INSECURE_GRANT) -> bytes:
        """One received message (its frames after the routing identity) -> the reply bytes.

        ``grant`` is what the authenticated peer may do; ``None`` refuses everything.
        """
        reply = (await self.handle_batch([(frames, grant)]))[0]
        if reply is None:
            raise RuntimeError("the gateway could not handle the message (see its log)")
        return reply

    async def handle_batch(
        self, messages: Sequence[tuple[list[bytes], Grant | None]]
    ) -> list[bytes | None]:
        """Several received messages, in arrival order -> their replies, in the same order.

        Consecutive commands are applied as one group commit (``_apply``); a
        heartbeat or re-arm between them is handled after the commands before
        it.  ``None``: not answered (an unexpected error, logged).  Raises
        ``ParallelCityError`` when the durable store fails: the gateway must
        stop rather than risk applying twice.
        """
        replies: list[bytes | None] = [None] * len(messages)
        run: list[_Item] = []
        self.counters.batches += 1
        self.counters.largest_batch = max(self.counters.largest_batch, len(messages))
        for k, (frames, grant) in enumerate(messages):
            try:
                parsed = self._parse(frames, grant)
                if isinstance(parsed, bytes):
                    replies[k] = parsed
                    continue
                msg, granted = parsed
                if isinstance(msg, Command):
                    run.append(_Item(k, msg, granted))
                    continue
                commands, run = run, []
                await self._apply_run(commands, replies)
                if isinstance(msg, Heartbeat):
                    replies[k] = (await self._heartbeat(msg, granted)).encode()
                else:
                    replies[k] = (await self._rearm(msg, granted)).encode()
            except ParallelCityError:
                raise
            except Exception:  # a bug here must not stop the field gateway
                log.exception("gateway: unexpected error handling a message; not answered")
        try:
            commands, run = run, []
            await self._apply_run(commands, replies)
            if self.ack_after_applied_commit and self.store is not None and self.store.deferred:
                async with self._lock:
                    self.store.flush()
        except ParallelCityError:
            raise
        except Exception:
            log.exception("gateway: unexpected error applying commands; not answered")
        return replies

    def _parse(
        self, frames: list[bytes], grant: Grant | None
    ) -> bytes | tuple[Command | Heartbeat | Rearm, Grant]:
        """Decode and authenticate one message: the request, or the refusal to send."""
        self.counters.received += 1
        if len(frames) != 1:
            data = frames[-1] if frames else b""
            return self._malformed(data, f"expected exactly one frame, got {len(frames)}")
        data = frames[0]
        try:
            msg = decode_request(data)
        except WireFormatError as exc:
            return self._malformed(data, str(exc))
        if grant is None:
            return self._refuse(
                msg.id, getattr(msg, "seq", 0), RefusalCode.UNAUTHORISED, "unknown client"
            ).encode()
        wrong = grant.check_issuer(msg.issuer)
        if wrong is not None:
            return self._refuse(
                msg.id, getattr(msg, "seq", 0), RefusalCode.UNAUTHORISED, wrong
            ).encode()
        return msg, grant

    async def _apply_run(self, items: list[_Item], replies: list[bytes | None]) -> None:
        """``_apply``, where a bug costs only these commands' replies, not the batch's others."""
        try:
            await self._apply(items, replies)
        except ParallelCityError:
            raise
        except Exception:
            log.exception("gateway: unexpected error applying %d command(s); not answered",
                          len(items))  # fmt: skip

    async def _apply(self, items: list[_Item], replies: list[bytes | None]) -> None:
        """Decide, record, write and mark applied a run of commands; fill in their replies."""
        if not items:
            return
        async with self._lock:
            while items:
                items = await self._apply_once(items, replies)

    async def _apply_once(self, items: list[_Item], replies: list[bytes | None]) -> list[_Item]:
        """One group commit; returns the commands to decide again after a failed write."""
        core, store = self.core, self.store
        cp = core.checkpoint()
        for it in items:
            it.landed, it.decision = False, None
        began = False
        try:
            accepted: list[_Item] = []
            for it in items:
                now = self.clock.now()
                it.decision = d = core.decide(it.cmd, now, it.grant)
                if d.accepted:  # refused traffic is no sign of a healthy control loop
                    self._seen(now, it.cmd.issuer)
                if d.accepted and self._in_doubt is not None:
                    it.decision = d = Decision.refuse(
                        RefusalCode.WRITE_FAILED, self._in_doubt.refusal()
                    )
                if d.accepted:
                    core.record_applied(it.cmd, now)  # later commands see it; undone if not written
                    accepted.append(it)
            groups = _write_groups(accepted)
            batch_no: int | None = None
            if accepted and store is not None:
                batch_no = store.begin_batch(
                    [it.cmd for it in accepted], [it.group for it in accepted]
                )
            began = bool(accepted)
            failed: list[_Item] = []
            failure = ""
            doubt: list[_Item] = []
            for group in groups:
                merged: dict[str, float] = {}
                for it in group:
                    merged.update(it.cmd.setpoints)
                bad = await self._write(merged)
                if bad is None:
                    for it in group:
                        it.landed = True
                    continue
                failure = bad.why
                if not bad.nothing_sent:  # the outcome is unknown: ask the field what landed
                    values = await self._read_back_patiently(sorted(merged))
                    if values is None:
                        doubt = group
                        failure = _in_doubt_failure(bad.why)
                    else:
                        for it in group:
                            it.landed = all(values.get(n) == v for n, v in it.cmd.setpoints.items())
                failed = [it for it in group if not it.landed]
                break
            applied_at = self.clock.now()
            undone = [it for it in accepted if not it.landed]
            landed_items = [it for it in accepted if it.landed]
            if undone:  # back to the true state: what landed, in order
                core.rollback(cp)
                for it in landed_items:
                    core.record_applied(it.cmd, applied_at)
            else:
                core.confirm([it.cmd for it in landed_items], applied_at)
        except BaseException:
            # Once the batch is pending, writes may have landed: keep counting it as
            # applied (never twice); a store settles it against the field at the next start.
            if not began:
                core.rollback(cp)
            raise
        finally:
            core.release(cp)
        if doubt:
            self._enter_doubt(doubt, batch_no, failure, applied_at)
        if store is not None and accepted:
            marks = [
                AppliedMark(it.cmd.id, it.cmd.issuer, it.cmd.seq, it.cmd.issued_at,
                            it.cmd.setpoints, applied_at)
                for it in landed_items
            ]  # fmt: skip
            if undone:
                # The group in doubt stays pending (settled by _settle_in_doubt); the
                # groups after it were never written.
                store.settle(
                    marks,
                    [it.cmd.id for it in undone if it not in doubt],
                    core.leases.leases,
                    events=[(applied_at, "in_doubt", failure)] if doubt else (),
                )
            else:
                # Rides in the next commit, or _flush_marks commits it (gateway_store docstring).
                store.mark_applied(marks, core.leases.leases, durable=False)
                self._marks_deferred.set()
        # Decisions made after the first command that was not applied saw its effect: redo them.
        cut = min((it.index for it in undone), default=math.inf)
        again = [it for it in items if it.index >= cut and not it.landed and it not in failed]
        redo = {id(it) for it in again}
        for it in items:
            if id(it) in redo:
                continue
            replies[it.index] = self._reply(it, applied_at, failure).encode()
        return again

    def _reply(self, it: _Item, applied_at: float, failure: str) -> Ack:
        cmd, d, c = it.cmd, it.decision, self.counters
        assert d is not None
        if it.landed:
            c.applied += 1
            if log.isEnabledFor(logging.INFO):
                log.info(
                    "gateway: applied %s (issuer %s, seq %d): %s",
                    cmd.id,
                    cmd.issuer,
                    cmd.seq,
                    ", ".join(f"{k}={v:.6g}" for k, v in cmd.setpoints.items()),
                )
            return self._ack(cmd, AckStatus.APPLIED, applied_at=applied_at)
        if d.accepted:
            return self._refuse(cmd.id, cmd.seq, RefusalCode.WRITE_FAILED, failure)
        if d.outcome is Outcome.DUPLICATE:
            c.duplicates += 1
            log.info("gateway: %s (seq %d) is a duplicate; not written again", cmd.id, cmd.seq)
            first = self.core.state.applied_ids.get(cmd.id, d.applied_at)
            return self._ack(cmd, AckStatus.DUPLICATE, applied_at=first, detail=d.detail)
        assert d.code is not None
        return self._refuse(cmd.id, cmd.seq, d.code, d.detail)

    async def _write(self, setpoints: Mapping[str, float]) -> _WriteFailure | None:
        """Write to the field; ``None`` when done, else why it failed and whether for sure."""
        try:
            async with asyncio.timeout(self.write_timeout_s):
                await self.writer.write(setpoints)
        except TimeoutError:
            return _WriteFailure(
                f"the field write did not finish within {self.write_timeout_s:g} s "
                "(it may have partly landed)"
            )
        except FieldUnavailableError as exc:
            return _WriteFailure(str(exc), nothing_sent=True)
        except ParallelCityError as exc:
            return _WriteFailure(str(exc))
        except Exception as exc:
            log.exception("gateway: the setpoint writer raised unexpectedly")
            return _WriteFailure(f"{type(exc).__name__}: {exc}")
        return None

    # ------------------------------------------------------------------ in doubt

    def _enter_doubt(
        self, group: Sequence[_Item], batch_no: int | None, why: str, now: float
    ) -> None:
        """A write group's outcome is unknown and the field cannot be read: hold it pending."""
        batch = [
            Pending(it.cmd.id, it.cmd.issuer, it.cmd.seq, it.cmd.issued_at,
                    dict(it.cmd.setpoints), batch_no, it.group, it.cmd.digest)
            for it in group
        ]  # fmt: skip
        self._in_doubt = _InDoubt(batch, now, why)
        self.counters.in_doubt += 1
        log.error(
            "gateway: IN DOUBT since %.3f: %s; refusing commands until the field is read back",
            now,
            why,
        )
        if self._settler is None or self._settler.done():
            self._settler = asyncio.create_task(self._settle_when_readable(), name="gateway-doubt")

    async def settle_in_doubt(self) -> bool:
        """Read the field back once to settle a write in doubt; True when no longer in doubt."""
        doubt = self._in_doubt
        if doubt is None:
            return True
        # Read without the lock, so that a silent link does not hold up heartbeats and the
        # watchdog: nothing writes while in doubt but a revert, which settles the doubt first.
        values = await self._read_doubt(doubt)
        async with self._lock:
            if self._in_doubt is not doubt:
                return self._in_doubt is None
            if values is None:
                return False
            self._leave_doubt(doubt, values)
            return True

    async def _settle_before_revert(self, doubt: _InDoubt) -> None:
        """Under the lock: settle ``doubt`` now, by the field or else as applied."""
        values = await self._read_doubt(doubt)
        if self._in_doubt is doubt:
            self._leave_doubt(doubt, values)

    async def _read_doubt(self, doubt: _InDoubt) -> Mapping[str, float] | None:
        doubt.attempts += 1
        return await self._read_back(sorted({n for p in doubt.batch for n in p.setpoints}))

    def _leave_doubt(self, doubt: _InDoubt, values: Mapping[str, float] | None) -> None:
        self._in_doubt = None
        now = self.clock.now()
        if values is None:
            how = (
                "the watchdog reverts to safe values and the field still cannot be read: "
                "the write in doubt is counted as applied (never twice)"
            )
        else:
            how = f"the field was read back ({doubt.attempts} attempt(s))"
        detail = f"{', '.join(p.command_id for p in doubt.batch)} settled: {how}"
        log.warning("gateway: no longer in doubt (%.3f s): %s", now - doubt.since, detail)
        self._settle_batch(
            doubt.batch, values, now, "after a write of unknown outcome",
            events=[(now, "in_doubt_settled", detail)],
        )  # fmt: skip

    async def _settle_when_readable(self) -> None:
        """Retry the read-back with backoff (at once when the writer's link comes back)."""
        for delay in self.in_doubt_backoff.delays():
            if self._in_doubt is None:
                return
            await self._link_or_sleep(delay)
            try:
                if await self.settle_in_doubt():
                    return
            except Exception:  # the store failed, or a bug: stay in doubt, keep trying
                log.exception("gateway: settling the write in doubt failed; still in doubt")

    async def _link_or_sleep(self, delay: float) -> None:
        """Sleep ``delay`` wall seconds, or less when the writer's link has just come back."""
        was = getattr(self.writer, "available", None)
        if not isinstance(was, bool):
            await asyncio.sleep(delay)
            return
        end = time.monotonic() + delay
        while (left := end - time.monotonic()) > 0:
            await asyncio.sleep(min(left, LINK_POLL_S))
            up = bool(getattr(self.writer, "available", False))
            if up and not was:
                return
            was = up

    def _seen(self, now: float, issuer: str) -> None:
        wd = self.core.watchdog
        before = wd.state
        wd.seen(now, issuer)
        if wd.state is not before:
            self._wake.set()
            if self.store is not None:
                self.store.save_watchdog(wd.state, wd.detail, now, event="watchdog_armed")

    async def _heartbeat(self, hb: Heartbeat, grant: Grant) -> Status:
        self.counters.heartbeats += 1
        async with self._lock:
            now = self.clock.now()
            if not self._drives_something(grant):
                # It holds no lease, and an operator's console must not keep the field on the
                # control loop's setpoints: its heartbeat only asks for the status.
                return self.core.status(hb.id, hb.issuer, now, self.insecure)
            leases = self.core.leases
            before = {eq: lease.holder for eq, lease in leases.leases.items()}
            self._seen(now, hb.issuer)
            idle = self.core.heartbeat(hb, now)
            after = {eq: lease.holder for eq, lease in leases.leases.items()}
            if idle:
                wd = self.core.watchdog
                log.info("gateway: watchdog %s", readable_times(wd.detail, now))
                self._wake.set()
                if self.store is not None:
                    self.store.save_watchdog(wd.state, wd.detail, now, event="watchdog_idle")
            # A renewal only moves `until`: persist it now and then, not on every beat.
            stale = now - self._leases_saved_at >= leases.lease_s / 4
            if self.store is not None and (after != before or (after and stale)):
                self.store.save_leases(leases.leases)
                self._leases_saved_at = now
                if hb.release and after != before:
                    self.store.record_event(now, "lease_released", hb.issuer)
            return self.core.status(hb.id, hb.issuer, now, self.insecure)

    def _drives_something(self, grant: Grant) -> bool:
        return any(grant.allows_input(name) for name in self.core.limits)

    async def _rearm(self, msg: Rearm, grant: Grant) -> Status | Ack:
        if not grant.rearm:
            return self._refuse(
                msg.id, 0, RefusalCode.UNAUTHORISED, f"client {grant.name!r} may not re-arm"
            )
        async with self._lock:
            now = self.clock.now()
            wd = self.core.watchdog
            if wd.tripped:
                self.counters.rearms += 1
                wd.rearm(now, f"{grant.name}/{msg.issuer}", msg.reason)
                log.warning(
                    "gateway: watchdog %s (by %s)", readable_times(wd.detail, now), grant.name
                )
                if self.store is not None:
                    self.store.save_watchdog(wd.state, wd.detail, now, event="watchdog_rearmed")
                self._wake.set()
            return self.core.status(msg.id, msg.issuer, now, self.insecure)

    # ------------------------------------------------------------------ watchdog

    async def _watch(self) -> None:
        wd = self.core.watchdog
        if not wd.enabled:
            return
        while True:
            if wd.tripped and not wd.reverted:
                await self._revert()
                if not wd.reverted:  # the field refused: try again in a heartbeat interval
                    await asyncio.sleep(wd.interval_s / self.clock.speed)
                    continue
            deadline = wd.deadline()
            timeout = None
            if deadline is not None:
                timeout = max(0.0, (deadline - self.clock.now()) / self.clock.speed)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            if wd.due(self.clock.now()):
                await self._trip()

    async def _trip(self) -> None:
        wd = self.core.watchdog
        async with self._lock:
            now = self.clock.now()
            if not wd.due(now):
                return
            reason = wd.trip(now)
            self.core.leases.clear()
            self.counters.trips += 1
            log.error("gateway: WATCHDOG %s", readable_times(reason, now))
            if self.store is not None:
                self.store.save_watchdog(wd.state, reason, now, event="watchdog_tripped", leases={})
            await self._revert_locked()

    async def _revert(self) -> None:
        async with self._lock:
            await self._revert_locked()

    async def _revert_locked(self) -> None:
        wd = self.core.watchdog
        if not wd.tripped or wd.reverted:
            return
        if self.store is not None:
            self.store.flush()  # the pending batch's writes must stay the last (gateway_store)
        doubt = self._in_doubt
        if doubt is not None and any(n in wd.safe for p in doubt.batch for n in p.setpoints):
            # The safe values would hide what the write in doubt left: settle it first.
            await self._settle_before_revert(doubt)
        bad = await self._write(wd.safe)
        now = self.clock.now()
        if bad is not None:
            log.error("gateway: could not write the safe values (will retry): %s", bad.why)
            if self.store is not None:
                self.store.record_event(now, "revert_failed", bad.why)
            return
        self.core.reverted(now)
        self.counters.reverts += 1
        self.last_revert_at = now
        log.error(
            "gateway: equipment reverted to safe values: %s",
            ", ".join(f"{k}={v:g}" for k, v in wd.safe.items()),
        )
        if self.store is not None:
            self.store.save_watchdog(
                wd.state, wd.detail, wd.since, event="reverted", inputs=wd.safe
            )

    # ------------------------------------------------------------------ replies

    def _ack(
        self, cmd: Command, status: AckStatus, *, applied_at: float | None, detail: str = ""
    ) -> Ack:
        return Ack(cmd.id, cmd.seq, status, None, detail, applied_at, self.insecure)

    def _refuse(self, msg_id: str, seq: int, code: RefusalCode, detail: str) -> Ack:
        self.counters.refused[code] += 1
        self.refusals_log.log(
            code.value, "gateway: refused %s (seq %d): %s: %s", msg_id, seq, code.value, detail
        )
        return Ack(
            msg_id, seq, AckStatus.REFUSED, code, truncate_detail(detail), None, self.insecure
        )

    def _malformed(self, data: bytes, reason: str) -> bytes:
        msg_id, seq = recover_id(data)
        return self._refuse(msg_id, seq, RefusalCode.MALFORMED, reason).encode()


@dataclass
class _Received:
    """One message taken from the socket: who sent it, its frame, or the reply already due."""

    ident: bytes
    frames: list[bytes]
    grant: Grant | None
    reply: bytes | None = None
    envelope: bool = False
    """It came as a REQ socket sends: an empty delimiter frame first; so goes the reply."""


@dataclass(frozen=True)
class _WriteFailure:
    why: str
    nothing_sent: bool = False
    """True only when the writer said so (``FieldUnavailableError``): certainly not written."""


@dataclass
class _InDoubt:
    """A write group whose outcome is unknown; pending in the store until settled."""

    batch: list[Pending]
    since: float
    """Gateway time it went in doubt."""
    detail: str
    attempts: int = 0
    """Read-backs tried since."""

    def refusal(self) -> str:
        ids = ", ".join(p.command_id for p in self.batch)
        return (
            f"in doubt: the outcome of an earlier field write ({ids}) is unknown and is being "
            f"settled against the field (since {self.since:.3f}); nothing was written, "
            "commands are refused until the field can be read back"
        )


def _in_doubt_failure(why: str) -> str:
    return (
        f"{why}; the outcome is unknown and the field cannot be read back: the gateway is in "
        "doubt until it can read it (a resend is then a duplicate if it landed, or applied "
        "once if it did not)"
    )


@dataclass(eq=False)
class _Item:
    """A command of a batch on its way through ``FieldGateway._apply``."""

    index: int
    """Its place in the batch (its reply's place)."""
    cmd: Command
    grant: Grant
    decision: Decision | None = None
    group: int = 0
    """Its write group: commands on disjoint inputs share one write call."""
    landed: bool = False


def _write_groups(accepted: Sequence[_Item]) -> list[list[_Item]]:
    """Consecutive commands, cut where an input would be written twice in one call."""
    groups: list[list[_Item]] = []
    touched: set[str] = set()
    for it in accepted:
        names = it.cmd.setpoints.keys()
        if not groups or not touched.isdisjoint(names):
            groups.append([])
            touched = set()
        it.group = len(groups) - 1
        groups[-1].append(it)
        touched.update(names)
    return groups


def new_zap_domain() -> str:
    """A ZAP domain unique to one gateway process."""
    return f"parallelcity-{uuid.uuid4().hex[:12]}"
