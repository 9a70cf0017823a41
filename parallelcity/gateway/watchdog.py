"""Liveness and ownership at the field gateway (pure: time is passed in).

* ``Watchdog``: the runtime proves it is alive with heartbeats (and commands).
  Once it has been heard from, missing ``missed`` heartbeat intervals in a row
  trips the watchdog: the gateway reverts its equipment to safe values and
  refuses commands until someone with the right explicitly re-arms it.  A
  clean goodbye (a heartbeat with ``release``) from the last issuer still
  heard from puts it back to idle instead: nobody is driving, nothing to guard.
* ``LeaseTable``: one writer per device.  Applying a command leases each piece
  of equipment it touches to the command's issuer for ``lease_s``; while the
  lease runs, commands from any other issuer for that equipment are refused.
  The holder's heartbeats renew its leases; a heartbeat with ``release`` ends
  them.

Equipment is the part of an input name before its first dot
(``plant.T_supply_set`` -> ``plant``); an input without a dot is its own
equipment.  Times are gateway clock seconds.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from parallelcity.dispatch.wire import WatchdogState


def equipment_of(input_name: str) -> str:
    return input_name.split(".", 1)[0]


MAX_LIVE_ISSUERS = 256
"""Past this many, issuers not heard from within the window are forgotten (a lab gateway
takes any issuer name)."""

_EPOCH = re.compile(r"(?<![\d.])(\d{9,11}\.\d{1,6})(?![\d.])")


def iso_utc(t: float) -> str:
    """Epoch seconds as ISO 8601 UTC to the millisecond: ``2026-01-12T01:15:00.000Z``."""
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def readable_times(detail: str, now: float) -> str:
    """``detail`` with each epoch time in it (``tripped at 1768179704.512``) written as ISO
    8601 UTC and its age at ``now``, for people; the wire keeps the numbers."""

    def one(m: re.Match[str]) -> str:
        t = float(m.group(1))
        age = now - t
        # Details carry milliseconds: a time that rounded up is not in the future.
        when = f"{max(age, 0.0):.1f} s ago" if age > -0.001 else f"in {-age:.1f} s"
        return f"{iso_utc(t)} ({when})"

    return _EPOCH.sub(one, detail)


def _positive(value: float, name: str) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number, got {value}")


@dataclass
class Watchdog:
    """Heartbeat watchdog state machine: idle -> armed -> tripped -> (re-arm) idle,
    and armed -> (goodbye of the last live issuer) idle.

    ``safe`` empty means no watchdog (state ``disabled``): nothing to revert to.
    """

    interval_s: float
    missed: int
    safe: Mapping[str, float]
    state: WatchdogState = WatchdogState.IDLE
    last_seen: float | None = None
    """Gateway time of the last heartbeat or authorised command."""
    detail: str = ""
    since: float = 0.0
    """When the current state began."""
    reverted: bool = False
    """While tripped: the safe values have been written."""
    live: dict[str, float] = field(default_factory=dict)
    """While armed: issuer -> gateway time it was last heard from."""

    def __post_init__(self) -> None:
        _positive(self.interval_s, "heartbeat interval")
        if self.missed < 1:
            raise ValueError(f"missed heartbeats must be >= 1, got {self.missed}")
        if not self.safe:
            self.state = WatchdogState.DISABLED

    @property
    def window_s(self) -> float:
        """Silence longer than this trips the watchdog."""
        return self.interval_s * self.missed

    @property
    def enabled(self) -> bool:
        return self.state is not WatchdogState.DISABLED

    @property
    def tripped(self) -> bool:
        return self.state is WatchdogState.TRIPPED

    def seen(self, now: float, issuer: str = "") -> None:
        """A heartbeat or an authorised command (from ``issuer``) arrived."""
        if self.state in (WatchdogState.DISABLED, WatchdogState.TRIPPED):
            return
        self.last_seen = now if self.last_seen is None else max(self.last_seen, now)
        if issuer:
            self.live[issuer] = max(now, self.live.get(issuer, now))
            if len(self.live) > MAX_LIVE_ISSUERS:  # issuers gone silent count for nothing
                self.live = {i: t for i, t in self.live.items() if now - t <= self.window_s}
        if self.state is WatchdogState.IDLE:
            self.state, self.since, self.detail = WatchdogState.ARMED, now, ""

    def goodbye(self, issuer: str, now: float) -> bool:
        """``issuer`` ended cleanly (a heartbeat with ``release``); True if now idle.

        Idle when no other issuer has been heard from within the window: an
        issuer silent that long is gone (had it been the only one, the watchdog
        would have tripped), so it does not keep the watchdog armed.
        """
        if self.state is not WatchdogState.ARMED:
            return False
        self.live.pop(issuer, None)
        self.live = {i: t for i, t in self.live.items() if now - t <= self.window_s}
        if self.live:
            return False
        self.state, self.since, self.last_seen = WatchdogState.IDLE, now, None
        self.detail = (
            f"idle since {now:.3f}: the last issuer said goodbye (release); "
            "the inputs keep their last applied values"
        )
        return True

    def deadline(self) -> float | None:
        """Gateway time at which silence trips the watchdog; ``None`` when it cannot trip."""
        if self.state is not WatchdogState.ARMED or self.last_seen is None:
            return None
        return self.last_seen + self.window_s

    def due(self, now: float) -> bool:
        d = self.deadline()
        return d is not None and now > d

    def trip(self, now: float) -> str:
        """Enter ``tripped``; returns the reason (also kept in ``detail``)."""
        last = self.last_seen if self.last_seen is not None else now
        self.state, self.since, self.reverted = WatchdogState.TRIPPED, now, False
        self.live = {}
        self.detail = (
            f"tripped at {now:.3f}: no heartbeat for {now - last:.3f} s "
            f"(> {self.missed} x {self.interval_s:g} s); equipment reverted to safe values; "
            "re-arm required"
        )
        return self.detail

    def rearm(self, now: float, by: str, reason: str) -> None:
        """Back to ``idle``: the next heartbeat or command arms it again.

        ``by`` is for the caller's log: ``detail`` goes to every issuer, so it names no one.
        """
        if self.state is WatchdogState.DISABLED:
            return
        self.state, self.since, self.last_seen, self.reverted = (
            WatchdogState.IDLE,
            now,
            None,
            False,
        )
        self.live = {}
        self.detail = f"re-armed at {now:.3f}: {reason}"

    def restore(self, state: WatchdogState, detail: str, since: float, now: float) -> None:
        """Take over the persisted state of a previous gateway process.

        A trip survives a restart; an armed watchdog starts its window afresh
        at ``now`` so the runtime has time to find the restarted gateway.
        """
        if not self.enabled:
            return
        if state is WatchdogState.TRIPPED:
            self.state, self.detail, self.since = state, detail, since
            self.reverted = False  # write the safe values again: the field may have moved
        elif state is WatchdogState.ARMED:
            self.state, self.since, self.last_seen, self.detail = state, since, now, ""


@dataclass(frozen=True)
class Lease:
    holder: str
    until: float


@dataclass
class LeaseTable:
    """Equipment -> the issuer allowed to drive it, until when."""

    lease_s: float
    leases: dict[str, Lease] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _positive(self.lease_s, "lease_s")

    def conflicts(self, issuer: str, inputs: Iterable[str], now: float) -> list[str]:
        """Human-readable lines for each touched equipment leased to someone else."""
        out = []
        for eq in sorted({equipment_of(n) for n in inputs}):
            lease = self.leases.get(eq)
            if lease is not None and lease.holder != issuer and lease.until >= now:
                # Never the holder's name: issuers do not learn each other's names.
                left = lease.until - now
                out.append(f"{eq} is leased to another issuer for another {left:.3f} s")
        return out

    def take(self, issuer: str, inputs: Iterable[str], now: float) -> None:
        until = now + self.lease_s
        for eq in {equipment_of(n) for n in inputs}:
            self.leases[eq] = Lease(issuer, until)

    def renew(self, issuer: str, now: float) -> bool:
        """Extend every lease ``issuer`` still holds; True if it holds any."""
        held = [eq for eq, lease in self.leases.items() if lease.holder == issuer]
        for eq in held:
            if self.leases[eq].until >= now:
                self.leases[eq] = Lease(issuer, now + self.lease_s)
        return bool(held)

    def release(self, issuer: str) -> list[str]:
        gone = [eq for eq, lease in self.leases.items() if lease.holder == issuer]
        for eq in gone:
            del self.leases[eq]
        return gone

    def clear(self) -> None:
        self.leases.clear()

    def holders(self, now: float) -> dict[str, str]:
        """Equipment -> holder, for leases still running at ``now``."""
        return {eq: lease.holder for eq, lease in self.leases.items() if lease.until >= now}
