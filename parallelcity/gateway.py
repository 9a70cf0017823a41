"""The field gateway: the last check before setpoints reach field equipment.

Two halves:

* ``GatewayCore`` is the pure decision: given a ``Command``, the client's
  ``Grant`` and the time, it accepts, refuses (with a ``RefusalCode`` and a
  human reason) or recognises a duplicate.  It also owns the equipment leases
  and the heartbeat ``Watchdog``.  Its memory (last sequence number per
  issuer, ids already applied, last applied value per input) lives in a
  ``GatewayState`` value that ``GatewayStore`` persists.
* ``FieldGateway`` is the I/O shell: a ZeroMQ ROUTER socket (CURVE with a ZAP
  allow-list unless the configuration says ``insecure_lab``) that decodes
  requests, asks the core, records accepted commands durably *before* they
  are written or acked (a batch of waiting messages at a time: group commit),
  writes accepted setpoints through a ``SetpointWriter`` (``OpcUaWriter`` in
  production), reverts to safe values when the watchdog trips, and answers
  every message - including bytes it cannot read.

The rules, in order, are documented in ``docs/wire-protocol.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from types import TracebackType

import zmq
import zmq.asyncio

from .clock import Clock
from .errors import (
    DispatchError,
    FieldUnavailableError,
    ParallelCityError,
    SecurityError,
    WireFormatError,
)
from .field_writer import OpcUaWriter as OpcUaWriter  # re-exported: the old import path
from .field_writer import SetpointWriter
from .gateway_store import AppliedMark, GatewayStore, Pending, landed
from .keys import KeyPair
from .mirror import Backoff
from .specs import TOLERANCE, InputLimit
from .watchdog import Lease, LeaseTable, Watchdog
from .wire import (
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
from .zap import AllowList, Grant, ZapHandler

log = logging.getLogger("parallelcity.gateway")

MAX_REMEMBERED_IDS = 65_536
"""Applied ids kept in memory for duplicate detection; older ones are refused by sequence."""
TRANSPORT_MAX_MESSAGE_BYTES = 1024 * 1024
"""ZeroMQ drops peers sending more than this; smaller oversized messages get a refusal."""
DEFAULT_LEASE_S = 60.0
DEFAULT_MAX_BATCH = 64
"""Messages taken from the socket as one batch (one pending commit, one reply burst)."""
DEFAULT_APPLIED_FLUSH_DELAY_S = 0.002
"""With nothing waiting, deferred applied marks are committed after this (wall seconds)."""
INSECURE_GRANT = Grant.everything("insecure-lab")
IN_DOUBT_BACKOFF = Backoff(initial=0.05, maximum=1.0)
"""Wall-second waits between read-backs of a write whose outcome is unknown."""
LINK_POLL_S = 0.05
"""While in doubt, how often the writer's link is looked at (a read-back follows its return)."""


# =========================================================================== decision core


class Outcome(Enum):
    ACCEPT = "accept"
    REFUSE = "refuse"
    DUPLICATE = "duplicate"


@dataclass(frozen=True)
class Decision:
    """What the gateway does with one command."""

    outcome: Outcome
    code: RefusalCode | None = None
    detail: str = ""
    applied_at: float | None = None
    """For a duplicate: when the id was first applied."""

    @property
    def accepted(self) -> bool:
        return self.outcome is Outcome.ACCEPT

    @classmethod
    def accept(cls) -> Decision:
        return cls(Outcome.ACCEPT)

    @classmethod
    def refuse(cls, code: RefusalCode, detail: str) -> Decision:
        return cls(Outcome.REFUSE, code, detail)

    @classmethod
    def duplicate(cls, applied_at: float) -> Decision:
        return cls(Outcome.DUPLICATE, None, "already applied; not written again", applied_at)


@dataclass(frozen=True)
class AppliedInput:
    """The last value written to one input, and the cycle time it was computed for."""

    value: float
    issued_at: float


@dataclass
class GatewayState:
    """Everything the core remembers about commands; plain values, persisted by the store."""

    last_seq: dict[str, int] = field(default_factory=dict)
    """Highest applied ``seq`` per issuer."""
    applied_ids: OrderedDict[str, float] = field(default_factory=OrderedDict)
    """Applied command id -> gateway time it was applied, oldest first."""
    last_applied: dict[str, AppliedInput] = field(default_factory=dict)
    """Per input."""


@dataclass
class Checkpoint:
    """A point ``GatewayCore.rollback`` returns to (tentative ``record_applied`` calls undone)."""

    last_seq: dict[str, int]
    last_applied: dict[str, AppliedInput]
    leases: dict[str, Lease]
    added: list[str] = field(default_factory=list)
    """Ids remembered since, new to ``applied_ids``."""
    evicted: list[tuple[str, float]] = field(default_factory=list)
    """Ids pushed out of ``applied_ids`` since, oldest first."""


class GatewayCore:
    """The gateway's rules, with no I/O: ``decide`` then, after a good write, ``record_applied``.

    ``clock_skew_s`` (gateway clock seconds) is how far the issuer's clock may
    disagree with the gateway's: a command still counts as valid that long
    after ``valid_until``, and an ``issued_at`` further ahead than that does
    not buy a larger rate-limit allowance.  ``safe`` values enable the
    watchdog (``heartbeat_interval_s`` x ``missed_heartbeats`` of silence trips
    it); ``lease_s`` is how long applying a command reserves its equipment for
    the command's issuer.
    """

    def __init__(
        self,
        limits: Mapping[str, InputLimit],
        *,
        clock_skew_s: float = 5.0,
        state: GatewayState | None = None,
        max_remembered_ids: int = MAX_REMEMBERED_IDS,
        lease_s: float = DEFAULT_LEASE_S,
        safe: Mapping[str, float] | None = None,
        heartbeat_interval_s: float = 1.0,
        missed_heartbeats: int = 3,
    ) -> None:
        if not (math.isfinite(clock_skew_s) and clock_skew_s >= 0):
            raise ValueError(f"clock_skew_s must be finite and >= 0, got {clock_skew_s}")
        if max_remembered_ids < 1:
            raise ValueError(f"max_remembered_ids must be >= 1, got {max_remembered_ids}")
        self.limits: Mapping[str, InputLimit] = dict(limits)
        safe = dict(safe or {})
        for name, value in safe.items():
            lim = self.limits.get(name)
            if lim is None:
                raise ValueError(f"safe value for {name!r}, which this gateway does not drive")
            if not lim.min - TOLERANCE <= value <= lim.max + TOLERANCE:
                raise ValueError(f"safe value {name} = {value:g} is outside [{lim.min}, {lim.max}]")
        self.clock_skew_s = clock_skew_s
        self.state = state if state is not None else GatewayState()
        self._max_ids = max_remembered_ids
        self.leases = LeaseTable(lease_s)
        self.watchdog = Watchdog(heartbeat_interval_s, missed_heartbeats, safe)
        self._checkpoint: Checkpoint | None = None

    def decide(self, cmd: Command, now: float, grant: Grant | None = None) -> Decision:
        """Accept, refuse, or recognise a duplicate; does not change any state.

        ``grant`` is what the authenticated client may do (``None``: no per-client
        restriction, as in a pure unit test).
        """
        st = self.state
        # 1. authorisation of this client for these inputs and values.
        if grant is not None:
            why = grant.check(cmd.setpoints)
            if why is not None:
                return Decision.refuse(RefusalCode.UNAUTHORISED, why)
        # 2. sequence: a repeated id is a duplicate; otherwise seq must move forward.
        first_applied = st.applied_ids.get(cmd.id)
        if first_applied is not None:
            return Decision.duplicate(first_applied)
        last_seq = st.last_seq.get(cmd.issuer)
        if last_seq is not None and cmd.seq <= last_seq:
            return Decision.refuse(
                RefusalCode.STALE_SEQUENCE,
                f"seq {cmd.seq} from issuer {cmd.issuer!r} is not after the last applied "
                f"seq {last_seq}; a restarted issuer must continue above it",
            )
        # 3. expiry.
        if now > cmd.valid_until + self.clock_skew_s:
            return Decision.refuse(
                RefusalCode.EXPIRED,
                f"valid until {cmd.valid_until:.3f}, gateway time is {now:.3f} "
                f"({now - cmd.valid_until:.3f} s late, skew allowance {self.clock_skew_s:g} s)",
            )
        # 4. a tripped watchdog holds the safe values until re-armed.
        if self.watchdog.tripped:
            return Decision.refuse(RefusalCode.WATCHDOG_TRIPPED, self.watchdog.detail)
        # 5. every input known.
        unknown = sorted(n for n in cmd.setpoints if n not in self.limits)
        if unknown:
            return Decision.refuse(
                RefusalCode.UNKNOWN_INPUT,
                f"unknown input(s) {', '.join(map(repr, unknown))}; this gateway drives "
                f"{', '.join(sorted(self.limits))}",
            )
        # 6. one writer per device.
        held = self.leases.conflicts(cmd.issuer, cmd.setpoints, now)
        if held:
            return Decision.refuse(RefusalCode.LEASE_HELD, "; ".join(held))
        # 7. bounds.
        problems = []
        for name, value in cmd.setpoints.items():
            lim = self.limits[name]
            if value < lim.min - TOLERANCE or value > lim.max + TOLERANCE:
                problems.append(f"{name} = {value:.6g} outside [{lim.min:g}, {lim.max:g}]")
        if problems:
            return Decision.refuse(RefusalCode.OUT_OF_BOUNDS, "; ".join(problems))
        # 8. rate limits against the last applied value of each input.
        issued_at = min(cmd.issued_at, now + self.clock_skew_s)
        for name, value in cmd.setpoints.items():
            lim = self.limits[name]
            prev = st.last_applied.get(name)
            if prev is None:
                continue
            elapsed = max(0.0, issued_at - prev.issued_at)
            allowed = lim.max_step(elapsed)
            if not math.isfinite(allowed):
                continue
            move = value - prev.value
            if abs(move) > allowed + TOLERANCE:
                problems.append(
                    f"{name} moves {move:+.6g} from {prev.value:.6g} in {elapsed:g} s; "
                    f"at most {allowed:.6g} allowed ({lim.max_rate_per_h:g}/h)"
                )
        if problems:
            return Decision.refuse(RefusalCode.RATE_LIMIT, "; ".join(problems))
        return Decision.accept()

    def record_applied(self, cmd: Command, applied_at: float | None = None) -> None:
        """Remember a command whose setpoints were written (``applied_at``: gateway time)."""
        when = cmd.issued_at if applied_at is None else applied_at
        self._remember(cmd.id, cmd.issuer, cmd.seq, when)
        for name, value in cmd.setpoints.items():
            self.state.last_applied[name] = AppliedInput(value, cmd.issued_at)
        self.leases.take(cmd.issuer, cmd.setpoints, when)
        self.watchdog.seen(when)

    def _remember(self, command_id: str, issuer: str, seq: int, when: float) -> None:
        st, cp = self.state, self._checkpoint
        if cp is not None and command_id not in st.applied_ids:
            cp.added.append(command_id)
        st.applied_ids[command_id] = when
        st.applied_ids.move_to_end(command_id)
        while len(st.applied_ids) > self._max_ids:
            gone = st.applied_ids.popitem(last=False)
            if cp is not None:
                cp.evicted.append(gone)
        st.last_seq[issuer] = max(seq, st.last_seq.get(issuer, seq))

    def confirm(self, cmds: Sequence[Command], applied_at: float) -> None:
        """Commands recorded (``record_applied``) when decided were written at ``applied_at``.

        The same as recording them again at ``applied_at``, in order, but cheaper.
        """
        ids = self.state.applied_ids
        issuer, names = "", set[str]()
        for cmd in cmds:
            if cmd.id in ids:
                ids[cmd.id] = applied_at
            if cmd.issuer != issuer and names:  # leases in order: one take per run of an issuer
                self.leases.take(issuer, names, applied_at)
                names = set()
            issuer = cmd.issuer
            names.update(cmd.setpoints)
        if names:
            self.leases.take(issuer, names, applied_at)
        if cmds:
            self.watchdog.seen(applied_at)

    def checkpoint(self) -> Checkpoint:
        """Start a batch: ``record_applied`` calls from here on can be undone by ``rollback``.

        The gateway records each accepted command of a batch at once, so that
        later commands of the same batch are decided against its effect
        (sequence, duplicates, leases, ramps), and rolls back what a failed
        field write did not apply.  ``release`` ends the batch.
        """
        st = self.state
        cp = Checkpoint(dict(st.last_seq), dict(st.last_applied), dict(self.leases.leases))
        self._checkpoint = cp
        return cp

    def rollback(self, cp: Checkpoint) -> None:
        """Back to the state at ``checkpoint`` (the watchdog's sign of life is kept)."""
        st = self.state
        added = set(cp.added)
        for command_id in cp.added:
            st.applied_ids.pop(command_id, None)
        for command_id, when in reversed(cp.evicted):
            if command_id not in added:
                st.applied_ids[command_id] = when
                st.applied_ids.move_to_end(command_id, last=False)
        st.last_seq = dict(cp.last_seq)
        st.last_applied = dict(cp.last_applied)
        self.leases.leases = dict(cp.leases)
        cp.added, cp.evicted = [], []

    def release(self, cp: Checkpoint) -> None:
        if self._checkpoint is cp:
            self._checkpoint = None

    def heartbeat(self, hb: Heartbeat, now: float) -> None:
        """A heartbeat from an authorised client: feeds the watchdog, renews or ends leases."""
        self.watchdog.seen(now)
        if hb.release:
            self.leases.release(hb.issuer)
        else:
            self.leases.renew(hb.issuer, now)

    def reverted(self, now: float) -> None:
        """The safe values were written: they are the inputs' last applied values now."""
        for name, value in self.watchdog.safe.items():
            self.state.last_applied[name] = AppliedInput(value, now)
        self.watchdog.reverted = True

    def status(self, request_id: str, issuer: str, now: float, insecure: bool) -> Status:
        wd = self.watchdog
        return Status(
            id=request_id,
            issuer=issuer,
            last_seq=self.state.last_seq.get(issuer),
            watchdog=wd.state,
            detail=truncate_detail(wd.detail),
            leases=self.leases.holders(now),
            gateway_time=now,
            heartbeat_s=wd.interval_s if wd.enabled else 0.0,
            insecure_lab=insecure,
        )


# =========================================================================== writers

# ``SetpointWriter`` and ``OpcUaWriter`` live in field_writer.py (imported above).


# =========================================================================== I/O shell


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
    reading the field back.  When that read fails too, the gateway is *in
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
        sock.setsockopt(zmq.MAXMSGSIZE, TRANSPORT_MAX_MESSAGE_BYTES)
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
        st.last_seq = dict(loaded.last_seq)
        st.last_applied = {n: AppliedInput(v, t) for n, (v, t) in loaded.inputs.items()}
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

        The commands that landed (``gateway_store.landed``) are remembered as
        applied and become the inputs' last applied values; the others are
        forgotten (a resend is decided afresh).  One store commit, ``events`` too.
        """
        core, st = self.core, self.core.state
        marks: list[AppliedMark] = []
        abandoned: list[str] = []
        settled: list[tuple[float, str, str]] = []
        for p, ok in zip(batch, landed(batch, values), strict=True):
            if ok:
                core._remember(p.command_id, p.issuer, p.seq, now)
                for name, value in p.setpoints.items():
                    st.last_applied[name] = AppliedInput(value, p.issued_at)
                marks.append(
                    AppliedMark(p.command_id, p.issuer, p.seq, p.issued_at, p.setpoints, now)
                )
                what = "its values are in the field: counted as applied"
                if values is None:
                    what = "the field could not be read: counted as applied (never twice)"
            else:
                abandoned.append(p.command_id)
                what = "its values are not in the field: forgotten, a resend is applied"
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

    # ------------------------------------------------------------------ serving

    async def serve(self) -> None:
        """Answer requests and run the watchdog until cancelled."""
        await self.start()
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._watch(), name="gateway-watchdog")
            if self.store is not None:
                tasks.create_task(self._flush_marks(self.store), name="gateway-applied-marks")
            await self._serve_messages()

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
        # Messages already queued are taken without a trip through the event loop.
        raw: zmq.Socket[bytes] = zmq.Socket.shadow(sock.underlying)
        while True:
            if self._sock is None:
                raise RuntimeError("the gateway socket was closed")
            batch = [await sock.recv_multipart(copy=False)]
            while len(batch) < self.max_batch:
                try:
                    batch.append(raw.recv_multipart(zmq.NOBLOCK, copy=False))
                except zmq.Again:
                    break
            await self._answer(raw, batch)

    async def _answer(self, raw: zmq.Socket[bytes], batch: list[list[zmq.Frame]]) -> None:
        """Handle a batch of received messages (routing identity first) and send the replies."""
        messages = [
            ([f.bytes for f in frames[1:]], self._grant(frames[1] if len(frames) > 1 else None))
            for frames in batch
        ]
        replies = await self.handle_batch(messages)
        for frames, reply in zip(batch, replies, strict=True):
            if reply is None:
                continue
            try:
                # A ROUTER never blocks on send: a reply to a vanished peer is dropped.
                raw.send_multipart([frames[0].bytes, reply], zmq.NOBLOCK)
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
                await self._apply(commands, replies)
                if isinstance(msg, Heartbeat):
                    replies[k] = (await self._heartbeat(msg)).encode()
                else:
                    replies[k] = (await self._rearm(msg, granted)).encode()
            except ParallelCityError:
                raise
            except Exception:  # a bug here must not stop the field gateway
                log.exception("gateway: unexpected error handling a message; not answered")
        try:
            commands, run = run, []
            await self._apply(commands, replies)
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
        return msg, grant

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
                if d.code is not RefusalCode.UNAUTHORISED:
                    self._seen(now)
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
                    values = await self._read_back(sorted(merged))
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
                    dict(it.cmd.setpoints), batch_no, it.group)
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

    def _seen(self, now: float) -> None:
        wd = self.core.watchdog
        before = wd.state
        wd.seen(now)
        if wd.state is not before:
            self._wake.set()
            if self.store is not None:
                self.store.save_watchdog(wd.state, wd.detail, now, event="watchdog_armed")

    async def _heartbeat(self, hb: Heartbeat) -> Status:
        self.counters.heartbeats += 1
        async with self._lock:
            now = self.clock.now()
            leases = self.core.leases
            before = {eq: lease.holder for eq, lease in leases.leases.items()}
            self._seen(now)
            self.core.heartbeat(hb, now)
            after = {eq: lease.holder for eq, lease in leases.leases.items()}
            # A renewal only moves `until`: persist it now and then, not on every beat.
            stale = now - self._leases_saved_at >= leases.lease_s / 4
            if self.store is not None and (after != before or (after and stale)):
                self.store.save_leases(leases.leases)
                self._leases_saved_at = now
                if hb.release and after != before:
                    self.store.record_event(now, "lease_released", hb.issuer)
            return self.core.status(hb.id, hb.issuer, now, self.insecure)

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
                log.warning("gateway: watchdog %s", wd.detail)
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
            log.error("gateway: WATCHDOG %s", reason)
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
        log.warning("gateway: refused %s (seq %d): %s: %s", msg_id, seq, code.value, detail)
        return Ack(
            msg_id, seq, AckStatus.REFUSED, code, truncate_detail(detail), None, self.insecure
        )

    def _malformed(self, data: bytes, reason: str) -> bytes:
        msg_id, seq = recover_id(data)
        return self._refuse(msg_id, seq, RefusalCode.MALFORMED, reason).encode()


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
