"""The mirror: a live, timestamped copy of the field's points, whatever protocol reads them.

``async with Mirror(field, clock, endpoint=..., security=..., **options) as mirror``
asks the protocol ``field.protocol`` names for a reader (``field.protocol.FieldReader``;
``options`` are that reader's tuning keywords) and opens it: the reader connects,
checks the mapping and then hands every reading to the mirror's sink.  What a reading
must be to be believed (declared type, plausible range, a source time not beyond the
clock skew, order per point with recovery from a source clock stepping back) is
decided by the pure ``point_table``; a refused reading makes its point stale and is
journaled through ``take_events``.  ``snapshot()`` judges freshness against the clock.

Connection gaps.  The mirror watches the link through the reader's ``problem()`` (a
closed socket, a silent link, whatever the protocol can tell), from a watcher task
and from ``snapshot()`` itself, so a lost link shows in the very next snapshot,
however late the watcher runs on a loaded machine.  On a problem it records a
``LinkEvent``, marks every point as held from before the gap (stale, whatever its
age), closes the reader and reopens it with exponential backoff (``backoff.Backoff``),
each time with a fresh sink: readings a closed session still delivers are dropped.
After the gap a point is fresh again only once a reading arrives whose source time is
newer than the last one before the gap (or its source clock is seen to have stepped
back, see ``point_table``): data from before a gap is never handed out as fresh.

The first ``open`` must succeed: a wrong endpoint or mapping is an error to report
(``FieldConnectionError``, ``NodeMappingError``, ``SecurityError``), not a gap to wait
out; ``reconnect`` False leaves a gap open (tests, ``browse``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

from parallelcity.aio import cancel_and_wait
from parallelcity.backoff import Backoff
from parallelcity.clock import Clock
from parallelcity.errors import FieldConnectionError, FieldError, SecurityError
from parallelcity.field.config import FieldConfig
from parallelcity.field.point_table import PointEvent
from parallelcity.field.protocol import FieldReader
from parallelcity.field.protocols import protocol_of
from parallelcity.field.snapshot import Reading, Snapshot, assess

_log = logging.getLogger(__name__)

WATCH_PERIOD_S = 0.05  # how often the watcher asks the reader for a problem


@dataclass(frozen=True)
class LinkEvent:
    """A change of the mirror's link to the field (the start or the end of a gap), or of
    what it believes of a point ("refused", "accepted", "clock_step"; see ``point_table``)."""

    kind: Literal["lost", "restored", "refused", "accepted", "clock_step"]
    t: float  # clock time
    gap: int  # gap number, from 1 (for point events: gaps so far)
    detail: str
    attempts: int = 0  # reconnect attempts it took ("restored" only)


class _Sink:
    """The mirror's side of one reader session; dead once the session is given up."""

    def __init__(self, mirror: Mirror) -> None:
        self._mirror: Mirror | None = mirror

    def offer(self, name: str, raw: object, source: float, status: int) -> None:
        if self._mirror is not None:
            self._mirror._offer(name, raw, source, status)

    def alive(self) -> None:
        if self._mirror is not None:
            self._mirror._alive_at = self._mirror.clock.now()

    def kill(self) -> None:
        self._mirror = None


class Mirror:
    """A live copy of the field's points through the scenario's protocol, reconnecting on
    gaps.  ``endpoint`` overrides ``field.endpoint``; ``security`` is the protocol's own
    security object (None: an unauthenticated lab link); ``reader`` replaces the one the
    protocol would build (tests, embedding)."""

    def __init__(
        self,
        field: FieldConfig,
        clock: Clock,
        *,
        endpoint: str | None = None,
        security: object | None = None,
        reconnect: bool = True,
        backoff: Backoff | None = None,
        reader: FieldReader | None = None,
        **options: Any,
    ) -> None:
        url = endpoint if endpoint is not None else field.endpoint
        if reader is None:
            if not url:
                raise ValueError(
                    "Mirror needs an endpoint: the field config has none and none was given"
                )
            reader = protocol_of(field).reader(
                field, clock, endpoint=url, security=security, **options
            )
        self.field = field
        self.clock = clock
        self.reader = reader
        self.reconnect = reconnect
        self.backoff = backoff or Backoff()
        self.specs = field.point_specs()
        self._table = field.point_table()
        self._sink: _Sink | None = None
        self._held_why = ""
        self._all_received = asyncio.Event()
        self._received: set[str] = set()
        self._watch_task: asyncio.Task[None] | None = None
        self._alive_at: float | None = None  # clock time of the reader's last sign of life
        self._gap_started: float | None = None
        self._events: list[LinkEvent] = []
        self.gaps = 0
        self.reconnects = 0
        self.notifications = 0

    # -- public API ----------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return self.reader.endpoint

    @property
    def start_budget_s(self) -> float:
        return self.reader.start_budget_s

    @property
    def connected(self) -> bool:
        """True while an open session feeds the mirror (no open gap)."""
        return self._gap_started is None and self._sink is not None

    @property
    def readings(self) -> Mapping[str, Reading]:
        """The latest reading per point (points without one are absent)."""
        return dict(self._table.readings)

    @property
    def out_of_order(self) -> int:
        """Readings dropped as older than their point's latest."""
        return self._table.out_of_order

    @property
    def refusals(self) -> int:
        """Readings refused (implausible value or type, source time beyond the skew)."""
        return self._table.refusals

    def snapshot(self) -> Snapshot:
        """Every point, fresh or stale, judged at the clock's current time."""
        readings = self._table.readings
        held = dict.fromkeys(self._table.held(), self._held_why)
        link_why = ""
        if self._gap_started is not None:
            link_why = f"connection gap #{self.gaps} since {self._gap_started:.0f}"
        elif self._watch_task is not None and (problem := self.reader.problem()) is not None:
            # the watcher has not run yet; the snapshot must not wait for it
            link_why = f"link lost ({problem}), gap not yet opened"
        up = self.connected and not link_why
        if link_why:
            held = dict.fromkeys(readings, link_why)
        return assess(
            self.specs,
            readings,
            self.clock.now(),
            held=held,
            refused=self._table.refused,
            alive_at=self._alive_at if up else None,
            link_up=up,
            gaps=self.gaps,
            link_why=link_why,
        )

    def take_events(self) -> list[LinkEvent]:
        """Link and point events since the last call (the runner journals them every cycle)."""
        events, self._events = self._events, []
        events.extend(self._point_event(e) for e in self._table.take_events())
        events.sort(key=lambda e: e.t)
        return events

    def _point_event(self, event: PointEvent) -> LinkEvent:
        return LinkEvent(event.kind, event.t, self.gaps, event.detail)

    async def wait_all_received(self, timeout_s: float | None = None) -> bool:
        """Wait until every point has at least one reading; False on timeout (default: the
        reader's start budget)."""
        try:
            async with asyncio.timeout(self.start_budget_s if timeout_s is None else timeout_s):
                await self._all_received.wait()
        except TimeoutError:
            return False
        return True

    async def read_inputs(self) -> dict[str, float]:
        """The values the input addresses hold now."""
        if not self.connected:
            raise FieldConnectionError(
                f"the mirror has no session to {self.endpoint} right now"
                + (f" (gap #{self.gaps})" if self._gap_started is not None else "")
            )
        return await self.reader.read_inputs()

    # -- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> Mirror:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Open the reader (it leaves nothing open on failure), then watch the link."""
        if self._sink is not None or self._watch_task is not None:
            raise RuntimeError("the mirror is already started")
        await self._open()
        self._watch_task = asyncio.create_task(self._watch(), name=f"mirror {self.endpoint}")

    async def stop(self) -> None:
        """Stop watching and close the reader; errors are only logged."""
        task, self._watch_task = self._watch_task, None
        await cancel_and_wait(task)
        await self._close()

    # -- the link ------------------------------------------------------------------------------

    async def _open(self) -> None:
        sink = _Sink(self)
        try:
            await self.reader.open(sink)
        except BaseException:
            sink.kill()
            raise
        self._sink = sink

    async def _close(self) -> None:
        sink, self._sink = self._sink, None
        if sink is not None:
            sink.kill()
        await self.reader.close()

    def _offer(self, name: str, raw: object, source: float, status: int) -> None:
        if name not in self.specs:
            _log.warning("reading for unknown point %r from %s", name, self.endpoint)
            return
        self.notifications += 1
        self._table.offer(name, raw, source, status, self.clock.now())
        if not self._all_received.is_set():
            self._received.add(name)  # a refused reading counts: the point did answer
            if len(self._received) == len(self.specs):
                self._all_received.set()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_PERIOD_S)
            problem = self.reader.problem()
            if problem is None:
                continue
            self._begin_gap(problem)
            if not self.reconnect:
                await self._close()
                return
            attempts = await self._reconnect()
            self._end_gap(attempts)

    def _begin_gap(self, problem: str) -> None:
        now = self.clock.now()
        self.gaps += 1
        self._gap_started = now
        if self._sink is not None:
            self._sink.kill()  # whatever the old session still delivers is ignored
        self._table.hold()
        self._held_why = f"held from before connection gap #{self.gaps} ({problem})"
        self._events.append(LinkEvent("lost", now, self.gaps, problem))
        _log.warning(
            "mirror: lost the field at %s (%s); every point is stale until it reconnects",
            self.endpoint,
            problem,
        )

    def _end_gap(self, attempts: int) -> None:
        now = self.clock.now()
        started = self._gap_started if self._gap_started is not None else now
        self._gap_started = None
        self.reconnects += 1
        detail = (
            f"resubscribed {len(self.specs)} points after {now - started:.1f} s "
            f"(clock) and {attempts} attempt(s)"
        )
        self._events.append(LinkEvent("restored", now, self.gaps, detail, attempts))
        _log.warning("mirror: field at %s is back: %s", self.endpoint, detail)

    async def _reconnect(self) -> int:
        await self._close()
        for attempts, delay in enumerate(self.backoff.delays(), start=1):
            try:
                await self._open()
                return attempts
            except (FieldError, SecurityError) as exc:
                _log.info(
                    "mirror: reconnect attempt %d to %s failed: %s; next in %.2f s",
                    attempts,
                    self.endpoint,
                    exc,
                    delay,
                )
            await asyncio.sleep(delay)
        raise AssertionError("unreachable: the backoff never ends")
