"""The field gateway's pure decision: accept, refuse or recognise a duplicate.

``GatewayCore`` is given a ``Command``, the client's ``Grant`` and the time; it
answers with a ``Ruling`` (a ``RefusalCode`` and a human reason when it
refuses) and owns the equipment leases and the heartbeat ``Watchdog``.  Its
memory (last sequence number per issuer, ids already applied, last applied
value per input) is a ``GatewayState`` value that ``GatewayStore`` persists.
No I/O: ``server.FieldGateway`` is the shell around it.  The rules, in order,
are documented in ``docs/wire-protocol.md``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

from parallelcity.dispatch.wire import (
    OTHER_ISSUER,
    Command,
    Heartbeat,
    RefusalCode,
    Status,
    show_number,
    truncate_detail,
)
from parallelcity.gateway.grants import Grant
from parallelcity.gateway.watchdog import Lease, LeaseTable, Watchdog
from parallelcity.specs import TOLERANCE, InputLimit

MAX_REMEMBERED_IDS = 65_536
"""Applied ids kept in memory for duplicate detection; older ones are refused by sequence."""
DEFAULT_LEASE_S = 60.0
DEFAULT_RAMP_SLACK_S = 60.0
"""Seconds of ramp allowance an input may carry over (see ``GatewayCore``)."""
DEFAULT_CLOCK_SKEW_S = 5.0
"""Seconds a command counts as valid after its ``valid_until`` (clocks that disagree)."""
DEFAULT_MAX_COMMAND_AGE_S = 3600.0
"""A command whose ``issued_at`` is older than this (gateway clock, plus the skew) is refused."""


class RulingKind(Enum):
    ACCEPT = "accept"
    REFUSE = "refuse"
    DUPLICATE = "duplicate"


@dataclass(frozen=True)
class Ruling:
    """What the gateway does with one command."""

    outcome: RulingKind
    code: RefusalCode | None = None
    detail: str = ""
    applied_at: float | None = None
    """For a duplicate: when the id was first applied."""

    @property
    def accepted(self) -> bool:
        return self.outcome is RulingKind.ACCEPT

    @classmethod
    def accept(cls) -> Ruling:
        return cls(RulingKind.ACCEPT)

    @classmethod
    def refuse(cls, code: RefusalCode, detail: str) -> Ruling:
        return cls(RulingKind.REFUSE, code, detail)

    @classmethod
    def duplicate(cls, applied_at: float) -> Ruling:
        return cls(RulingKind.DUPLICATE, None, "already applied; not written again", applied_at)


@dataclass(frozen=True)
class AppliedInput:
    """The last value written to one input, and the gateway time it was written.

    ``at`` is the base of the next rate-limit check: the gateway's own clock,
    never a time a client stamped.
    """

    value: float
    at: float
    credit: float = 0.0
    """Ramp allowance left unused at the last write, at most the input's ``max_step`` over
    ``ramp_slack_s``: absorbs jitter in when commands arrive without ever accumulating."""


@dataclass
class GatewayState:
    """Everything the core remembers about commands; plain values, persisted by the store."""

    last_seq: dict[str, int] = field(default_factory=dict)
    """Highest applied ``seq`` per issuer."""
    applied_ids: OrderedDict[str, float] = field(default_factory=OrderedDict)
    """Applied command id -> gateway time it was applied, oldest first."""
    digests: dict[str, str] = field(default_factory=dict)
    """Applied command id -> ``Command.digest`` (ids remembered without one: unknown)."""
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
    evicted: list[tuple[str, float, str | None]] = field(default_factory=list)
    """Ids pushed out of ``applied_ids`` since (with their digests), oldest first."""


class GatewayCore:
    """The gateway's rules, with no I/O: ``decide`` then, after a good write, ``record_applied``.

    ``clock_skew_s`` (gateway clock seconds) is how far the issuer's clock may
    disagree with the gateway's: a command still counts as valid that long
    after ``valid_until``, and an ``issued_at`` further ahead than that, or
    older than ``max_age_s`` plus that, is refused (``bad_time``).  Rate
    limits are judged on the gateway's clock alone: the time since the input's
    last write (a command or a watchdog revert), plus the allowance left
    unused at that write, capped at ``ramp_slack_s`` worth of ramp, so that
    over any interval T an input moves at most its rate x (T + ramp_slack_s).

    ``safe`` values enable the watchdog (``heartbeat_interval_s`` x
    ``missed_heartbeats`` of silence trips it); ``lease_s`` is how long applying
    a command reserves its equipment for the command's issuer.
    """

    def __init__(
        self,
        limits: Mapping[str, InputLimit],
        *,
        clock_skew_s: float = DEFAULT_CLOCK_SKEW_S,
        max_age_s: float = DEFAULT_MAX_COMMAND_AGE_S,
        ramp_slack_s: float = DEFAULT_RAMP_SLACK_S,
        state: GatewayState | None = None,
        max_remembered_ids: int = MAX_REMEMBERED_IDS,
        lease_s: float = DEFAULT_LEASE_S,
        safe: Mapping[str, float] | None = None,
        heartbeat_interval_s: float = 1.0,
        missed_heartbeats: int = 3,
    ) -> None:
        if not (math.isfinite(clock_skew_s) and clock_skew_s >= 0):
            raise ValueError(f"clock_skew_s must be finite and >= 0, got {clock_skew_s}")
        if not (math.isfinite(ramp_slack_s) and ramp_slack_s >= 0):
            raise ValueError(f"ramp_slack_s must be finite and >= 0, got {ramp_slack_s}")
        if not (math.isfinite(max_age_s) and max_age_s > 0):
            raise ValueError(f"max_age_s must be finite and > 0, got {max_age_s}")
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
        self.max_age_s = max_age_s
        self.ramp_slack_s = ramp_slack_s
        self.state = state if state is not None else GatewayState()
        self._max_ids = max_remembered_ids
        self.leases = LeaseTable(lease_s)
        self.watchdog = Watchdog(heartbeat_interval_s, missed_heartbeats, safe)
        self._checkpoint: Checkpoint | None = None

    def decide(self, cmd: Command, now: float, grant: Grant | None = None) -> Ruling:
        """Accept, refuse, or recognise a duplicate; does not change any state.

        ``grant`` is what the authenticated client may do (``None``: no per-client
        restriction, as in a pure unit test).
        """
        st = self.state
        # 1. authorisation of this client: its own issuer, these inputs and values.
        if grant is not None:
            why = grant.check_issuer(cmd.issuer) or grant.check(cmd.setpoints)
            if why is not None:
                return Ruling.refuse(RefusalCode.UNAUTHORISED, why)
        # 2. sequence: a repeated id is a duplicate (or a conflict when its payload differs);
        # otherwise seq must move forward.
        first_applied = st.applied_ids.get(cmd.id)
        if first_applied is not None:
            known = st.digests.get(cmd.id)
            # a digest stored before the canonical encoding matches the legacy form
            if known is not None and known not in (cmd.digest, cmd.legacy_digest):
                return Ruling.refuse(
                    RefusalCode.ID_CONFLICT,
                    f"id {cmd.id} was applied at {first_applied:.3f} with a different payload; "
                    "a new command needs a new id",
                )
            return Ruling.duplicate(first_applied)
        last_seq = st.last_seq.get(cmd.issuer)
        if last_seq is not None and cmd.seq <= last_seq:
            return Ruling.refuse(
                RefusalCode.STALE_SEQUENCE,
                f"seq {cmd.seq} from issuer {cmd.issuer!r} is not after the last applied "
                f"seq {last_seq}; a restarted issuer must continue above it",
            )
        # 3. expiry.
        if now > cmd.valid_until + self.clock_skew_s:
            return Ruling.refuse(
                RefusalCode.EXPIRED,
                f"valid until {show_number(cmd.valid_until)}, gateway time is "
                f"{show_number(now)} ({show_number(now - cmd.valid_until)} s late, skew "
                f"allowance {show_number(self.clock_skew_s)} s)",
            )
        # 4. issued_at near the gateway's clock: neither ahead of it nor too old.
        if cmd.issued_at > now + self.clock_skew_s:
            return Ruling.refuse(
                RefusalCode.BAD_TIME,
                f"issued_at {show_number(cmd.issued_at)} is {show_number(cmd.issued_at - now)} "
                f"s ahead of gateway time {show_number(now)} (skew allowance "
                f"{show_number(self.clock_skew_s)} s)",
            )
        if cmd.issued_at < now - self.clock_skew_s - self.max_age_s:
            return Ruling.refuse(
                RefusalCode.BAD_TIME,
                f"issued_at {show_number(cmd.issued_at)} is {show_number(now - cmd.issued_at)} "
                f"s before gateway time {show_number(now)}; at most "
                f"{show_number(self.max_age_s)} s (+ {show_number(self.clock_skew_s)} s skew)",
            )
        # 5. a tripped watchdog holds the safe values until re-armed.
        if self.watchdog.tripped:
            return Ruling.refuse(RefusalCode.WATCHDOG_TRIPPED, self.watchdog.detail)
        # 6. every input known.
        unknown = sorted(n for n in cmd.setpoints if n not in self.limits)
        if unknown:
            return Ruling.refuse(
                RefusalCode.UNKNOWN_INPUT,
                f"unknown input(s) {', '.join(map(repr, unknown))}; this gateway drives "
                f"{', '.join(sorted(self.limits))}",
            )
        # 7. one writer per device.
        held = self.leases.conflicts(cmd.issuer, cmd.setpoints, now)
        if held:
            return Ruling.refuse(RefusalCode.LEASE_HELD, "; ".join(held))
        # 8. bounds.
        problems = []
        for name, value in cmd.setpoints.items():
            lim = self.limits[name]
            if value < lim.min - TOLERANCE or value > lim.max + TOLERANCE:
                problems.append(
                    f"{name} = {show_number(value)} outside "
                    f"[{show_number(lim.min)}, {show_number(lim.max)}]"
                )
        if problems:
            return Ruling.refuse(RefusalCode.OUT_OF_BOUNDS, "; ".join(problems))
        # 9. rate limits against the last applied value of each input, on the gateway's clock.
        for name, value in cmd.setpoints.items():
            prev = st.last_applied.get(name)
            if prev is None:
                continue
            allowed = self._allowed(name, prev, now)
            if not math.isfinite(allowed):
                continue
            move = value - prev.value
            if abs(move) > allowed + TOLERANCE:
                problems.append(
                    f"{name} moves {'+' * (move >= 0)}{show_number(move)} from "
                    f"{show_number(prev.value)} in {show_number(now - prev.at)} s since its "
                    f"last write; at most {show_number(allowed)} allowed "
                    f"({show_number(self.limits[name].max_rate_per_h)}/h)"
                )
        if problems:
            return Ruling.refuse(RefusalCode.RATE_LIMIT, "; ".join(problems))
        return Ruling.accept()

    def _allowed(self, name: str, prev: AppliedInput, now: float) -> float:
        """How far input ``name`` may move from ``prev`` at gateway time ``now``."""
        return self.limits[name].max_step(max(0.0, now - prev.at)) + prev.credit

    def _written(self, name: str, value: float, now: float) -> AppliedInput:
        """The input's record after ``value`` was written at ``now`` (credit carried over)."""
        lim = self.limits.get(name)
        cap = 0.0 if lim is None else lim.max_step(self.ramp_slack_s)
        if not math.isfinite(cap):
            return AppliedInput(value, now)
        prev = self.state.last_applied.get(name)
        left = cap if prev is None else self._allowed(name, prev, now) - abs(value - prev.value)
        return AppliedInput(value, now, min(cap, max(0.0, left)))

    def record_applied(self, cmd: Command, applied_at: float | None = None) -> None:
        """Remember a command whose setpoints were written (``applied_at``: gateway time)."""
        when = cmd.issued_at if applied_at is None else applied_at
        self._remember(cmd.id, cmd.issuer, cmd.seq, when, cmd.digest)
        for name, value in cmd.setpoints.items():
            self.state.last_applied[name] = self._written(name, value, when)
        self.leases.take(cmd.issuer, cmd.setpoints, when)
        self.watchdog.seen(when, cmd.issuer)

    def _remember(
        self, command_id: str, issuer: str, seq: int, when: float, digest: str | None = None
    ) -> None:
        st, cp = self.state, self._checkpoint
        if cp is not None and command_id not in st.applied_ids:
            cp.added.append(command_id)
        st.applied_ids[command_id] = when
        st.applied_ids.move_to_end(command_id)
        if digest is not None:
            st.digests[command_id] = digest
        while len(st.applied_ids) > self._max_ids:
            gone, at = st.applied_ids.popitem(last=False)
            old = st.digests.pop(gone, None)
            if cp is not None:
                cp.evicted.append((gone, at, old))
        st.last_seq[issuer] = max(seq, st.last_seq.get(issuer, seq))

    def confirm(self, cmds: Sequence[Command], applied_at: float) -> None:
        """Commands recorded (``record_applied``) when decided were written at ``applied_at``.

        The same as recording them again at ``applied_at``, in order, but cheaper.
        """
        st = self.state
        ids = st.applied_ids
        issuer, names = "", set[str]()
        for cmd in cmds:
            if cmd.id in ids:
                ids[cmd.id] = applied_at
            for name in cmd.setpoints:
                prev = st.last_applied.get(name)
                if prev is not None and prev.at < applied_at:
                    st.last_applied[name] = AppliedInput(prev.value, applied_at, prev.credit)
            if cmd.issuer != issuer and names:  # leases in order: one take per run of an issuer
                self.leases.take(issuer, names, applied_at)
                names = set()
            issuer = cmd.issuer
            names.update(cmd.setpoints)
        if names:
            self.leases.take(issuer, names, applied_at)
        for who in dict.fromkeys(cmd.issuer for cmd in cmds):
            self.watchdog.seen(applied_at, who)

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
            st.digests.pop(command_id, None)
        for command_id, when, digest in reversed(cp.evicted):
            if command_id not in added:
                st.applied_ids[command_id] = when
                st.applied_ids.move_to_end(command_id, last=False)
                if digest is not None:
                    st.digests[command_id] = digest
        st.last_seq = dict(cp.last_seq)
        st.last_applied = dict(cp.last_applied)
        self.leases.leases = dict(cp.leases)
        cp.added, cp.evicted = [], []

    def release(self, cp: Checkpoint) -> None:
        if self._checkpoint is cp:
            self._checkpoint = None

    def heartbeat(self, hb: Heartbeat, now: float) -> bool:
        """A heartbeat from an authorised client: feeds the watchdog, renews or ends leases.

        Only ``hb.issuer``'s own leases: the shell has checked the key speaks for it.
        With ``release`` it is the issuer's clean goodbye; True when that left the
        watchdog idle (no other issuer live).
        """
        self.watchdog.seen(now, hb.issuer)
        if hb.release:
            self.leases.release(hb.issuer)
            return self.watchdog.goodbye(hb.issuer, now)
        self.leases.renew(hb.issuer, now)
        return False

    def reverted(self, now: float) -> None:
        """The safe values were written: they are the inputs' last applied values now."""
        for name, value in self.watchdog.safe.items():
            self.state.last_applied.pop(name, None)  # a revert is not ramp-limited
            self.state.last_applied[name] = self._written(name, value, now)
        self.watchdog.reverted = True

    def restore_inputs(self, inputs: Mapping[str, tuple[float, float]], now: float) -> None:
        """Last applied values from the store; a write time ahead of ``now`` counts as ``now``
        (a clock that stepped back, or a store from before rate limits used the gateway clock).
        No ramp credit survives a restart."""
        self.state.last_applied = {n: AppliedInput(v, min(t, now)) for n, (v, t) in inputs.items()}

    def status(self, request_id: str, issuer: str, now: float, insecure: bool) -> Status:
        """The answer to ``issuer``: other issuers' leases show as ``OTHER_ISSUER``."""
        wd = self.watchdog
        return Status(
            id=request_id,
            issuer=issuer,
            last_seq=self.state.last_seq.get(issuer),
            watchdog=wd.state,
            detail=truncate_detail(wd.detail),
            leases={
                eq: holder if holder == issuer else OTHER_ISSUER
                for eq, holder in self.leases.holders(now).items()
            },
            gateway_time=now,
            heartbeat_s=wd.interval_s if wd.enabled else 0.0,
            insecure_lab=insecure,
        )
