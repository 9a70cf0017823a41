"""The Modbus reader: polls the scenario's points and feeds the mirror's pure point table.

Modbus has no subscriptions and no source timestamps, so the reader polls every
point each ``poll_interval_s`` (wall seconds), in as few requests as the codec's
``plan_reads`` allows, and stamps each reading with the run's clock time at which
its request was SENT: the device cannot have measured the value earlier than
that, so the age the snapshot computes is never smaller than the true one and a
point that stops answering is stale once its ``max_age_s`` has passed since the
last answer, however long answers take to come back.

What a point that stops answering looks like:

* an exception response (illegal address, device failure, busy, ...): each point
  of that request gets a reading with a bad status (``0x80000000`` plus the
  Modbus exception code), so it is stale at once;
* no answer within ``timeout_s``: the point keeps its last reading and goes stale
  by age; a poll in which no request was answered counts as a lost connection;
* the connection is lost: a link gap.  Every point is held from before the gap
  (stale, whatever its age), the connection is dropped and re-opened with
  backoff, and a point is fresh again only after a new successful read.

The first connection must succeed, and a first poll checks the mapping: an
address the device refuses as illegal is a ``NodeMappingError`` naming every one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType

from parallelcity.clock import Clock
from parallelcity.errors import FieldConnectionError, FieldError, NodeMappingError
from parallelcity.field.mirror import Backoff, LinkEvent
from parallelcity.field.point_table import PointEvent, PointRule, PointTable
from parallelcity.field.snapshot import PointSpec, Reading, Snapshot, assess

from .codec import ModbusAddress, PointType, ReadRequest, as_point_value, decode, plan_reads
from .link import DeviceException, ModbusLink, RequestTimeout

_log = logging.getLogger(__name__)

BAD_EXCEPTION = 0x80000000
"""Status of a reading a device answered with an exception; the low byte is its code."""
ILLEGAL_ADDRESS = 2
DEFAULT_POLL_INTERVAL_S = 0.1
DEFAULT_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class PolledPoint:
    """One point the reader polls: where it lives and what a plausible reading is."""

    spec: PointSpec
    address: ModbusAddress
    rule: PointRule = field(default_factory=PointRule)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def type(self) -> PointType:
        return self.rule.type


class ModbusReader:
    """A live copy of Modbus points, polled, with gaps and reconnects (mirror-like API)."""

    def __init__(
        self,
        points: Sequence[PolledPoint],
        inputs: Mapping[str, ModbusAddress],
        clock: Clock,
        *,
        host: str,
        port: int,
        poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        reconnect: bool = True,
        backoff: Backoff | None = None,
    ) -> None:
        if not poll_interval_s > 0:
            raise ValueError(f"poll_interval_s must be positive, got {poll_interval_s}")
        self.clock = clock
        self.poll_interval_s = float(poll_interval_s)
        self.reconnect = reconnect
        self.backoff = backoff or Backoff(maximum=2.0)
        self._link = ModbusLink(host, port, timeout_s=timeout_s)
        self._points = {p.name: p for p in points}
        self.specs = {p.name: p.spec for p in points}
        self._table = PointTable({p.name: p.rule for p in points})
        self._plan = plan_reads([(p.name, p.address) for p in points])
        self._inputs = dict(inputs)
        self._input_plan = plan_reads(list(self._inputs.items()))
        self._received: set[str] = set()
        self._all_received = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._gap_started: float | None = None
        self._held_why = ""
        self._events: list[LinkEvent] = []
        self.gaps = 0
        self.reconnects = 0
        self.polls = 0
        self.timeouts = 0
        self.exceptions = 0

    # -- public API ----------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return self._link.endpoint

    @property
    def requests_per_poll(self) -> int:
        return len(self._plan)

    @property
    def connected(self) -> bool:
        return self._gap_started is None and self._link.connected

    @property
    def readings(self) -> Mapping[str, Reading]:
        return dict(self._table.readings)

    def snapshot(self) -> Snapshot:
        """Every point, fresh or stale, judged at the clock's current time."""
        readings = self._table.readings
        held = dict.fromkeys(self._table.held(), self._held_why)
        link_why = ""
        if self._gap_started is not None:
            link_why = f"connection gap #{self.gaps} since {self._gap_started:.0f}"
        elif self._task is not None and not self._link.connected:
            link_why = "connection lost, gap not yet opened"
        if link_why:
            held = dict.fromkeys(readings, link_why)
        return assess(
            self.specs,
            readings,
            self.clock.now(),
            held=held,
            refused=self._table.refused,
            link_up=not link_why,
            gaps=self.gaps,
            link_why=link_why,
        )

    def take_events(self) -> list[LinkEvent]:
        events, self._events = self._events, []
        events.extend(self._point_event(e) for e in self._table.take_events())
        events.sort(key=lambda e: e.t)
        return events

    def _point_event(self, event: PointEvent) -> LinkEvent:
        return LinkEvent(event.kind, event.t, self.gaps, event.detail)

    async def wait_all_received(self, timeout_s: float | None = None) -> bool:
        try:
            async with asyncio.timeout(self._link.timeout_s if timeout_s is None else timeout_s):
                await self._all_received.wait()
        except TimeoutError:
            return False
        return True

    async def read_inputs(self) -> dict[str, float]:
        """The values the input registers and coils hold now, read once."""
        if self._gap_started is not None:
            raise FieldConnectionError(f"no connection to {self.endpoint} (gap #{self.gaps})")
        values: dict[str, float] = {}
        for request in self._input_plan:
            try:
                raw = await self._link.read(request)
            except FieldError as exc:
                raise FieldConnectionError(f"reading the inputs failed: {exc}") from exc
            for name, addr in request.members:
                values[str(name)] = float(decode(addr, request.slice(addr, raw)))
        return values

    # -- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> ModbusReader:
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
        """Connect, check the mapping with a first poll, then poll in the background."""
        if self._task is not None:
            raise RuntimeError("the reader is already started")
        await self._link.connect()
        try:
            refused = await self._poll()
            illegal = await self._pinpoint("point", refused)
            illegal += await self._pinpoint("input", await self._check_inputs())
        except BaseException:
            self._link.close()
            raise
        if illegal:
            self._link.close()
            raise NodeMappingError(
                f"{len(illegal)} scenario address(es) refused by {self.endpoint} as illegal: "
                + "; ".join(illegal)
            )
        self._task = asyncio.create_task(self._run(), name=f"modbus reader {self.endpoint}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._link.close()

    # -- polling -------------------------------------------------------------------------------

    async def _check_inputs(self) -> list[ReadRequest]:
        illegal: list[ReadRequest] = []
        for request in self._input_plan:
            try:
                await self._link.read(request)
            except DeviceException as exc:
                if exc.code == ILLEGAL_ADDRESS:
                    illegal.append(request)
            except RequestTimeout:
                pass
        return illegal

    async def _pinpoint(self, role: str, refused: list[ReadRequest]) -> list[str]:
        """Which addresses of requests refused as illegal are illegal on their own."""
        illegal: list[str] = []
        for request in refused:
            for name, addr in request.members:
                alone = plan_reads([(name, addr)])[0]
                try:
                    await self._link.read(alone)
                except DeviceException as exc:
                    if exc.code == ILLEGAL_ADDRESS or len(request.members) == 1:
                        illegal.append(f"{role} {name!r}: {addr.describe()}")
                except RequestTimeout:
                    pass
        return illegal

    async def _poll(self) -> list[ReadRequest]:
        """Read every point once; the requests refused as asking for an illegal address."""
        illegal: list[ReadRequest] = []
        timeouts = 0
        for request in self._plan:
            sent = self.clock.now()
            try:
                raw = await self._link.read(request)
            except DeviceException as exc:
                self.exceptions += 1
                self._refused(request, exc, sent)
                if exc.code == ILLEGAL_ADDRESS:
                    illegal.append(request)
                continue
            except RequestTimeout:
                self.timeouts += 1
                timeouts += 1
                continue
            self._offer(request, raw, sent)
        self.polls += 1
        if self._plan and timeouts == len(self._plan):
            raise FieldConnectionError(f"no request to {self.endpoint} answered in a whole poll")
        return illegal

    def _offer(self, request: ReadRequest, raw: list[int] | list[bool], sent: float) -> None:
        now = self.clock.now()
        for name, addr in request.members:
            point = self._points[str(name)]
            value = as_point_value(point.type, decode(addr, request.slice(addr, raw)))
            self._table.offer(point.name, value, sent, 0, now)
            self._mark_received(point.name)

    def _refused(self, request: ReadRequest, exc: DeviceException, sent: float) -> None:
        now = self.clock.now()
        for name, _addr in request.members:
            self._table.offer(str(name), None, sent, BAD_EXCEPTION | (exc.code & 0xFF), now)
            self._mark_received(str(name))

    def _mark_received(self, name: str) -> None:
        if not self._all_received.is_set():
            self._received.add(name)
            if len(self._received) == len(self._points):
                self._all_received.set()

    async def _run(self) -> None:
        next_poll = time.monotonic()
        while True:
            next_poll += self.poll_interval_s
            await asyncio.sleep(max(0.0, next_poll - time.monotonic()))
            if next_poll < time.monotonic() - self.poll_interval_s:
                next_poll = time.monotonic()  # fell behind: no burst of polls to catch up
            try:
                if not self._link.connected:
                    raise FieldConnectionError(f"the connection to {self.endpoint} closed")
                await self._poll()
            except FieldConnectionError as exc:
                self._begin_gap(str(exc))
                if not self.reconnect:
                    self._link.close()
                    return
                attempts = await self._reconnect()
                self._end_gap(attempts)
                next_poll = time.monotonic() - self.poll_interval_s  # poll at once

    def _begin_gap(self, problem: str) -> None:
        now = self.clock.now()
        self.gaps += 1
        self._gap_started = now
        self._table.hold()
        self._held_why = f"held from before connection gap #{self.gaps} ({problem})"
        self._events.append(LinkEvent("lost", now, self.gaps, problem))
        _log.warning(
            "modbus reader: lost %s (%s); every point is stale until it reconnects",
            self.endpoint,
            problem,
        )

    def _end_gap(self, attempts: int) -> None:
        now = self.clock.now()
        started = self._gap_started if self._gap_started is not None else now
        self._gap_started = None
        self.reconnects += 1
        detail = f"reconnected after {now - started:.1f} s (clock) and {attempts} attempt(s)"
        self._events.append(LinkEvent("restored", now, self.gaps, detail, attempts))
        _log.warning("modbus reader: %s is back: %s", self.endpoint, detail)

    async def _reconnect(self) -> int:
        self._link.close()
        for attempts, delay in enumerate(self.backoff.delays(), start=1):
            try:
                await self._link.connect()
                return attempts
            except FieldError as exc:
                _log.info(
                    "modbus reader: reconnect attempt %d to %s failed: %s; next in %.2f s",
                    attempts,
                    self.endpoint,
                    exc,
                    delay,
                )
            await asyncio.sleep(delay)
        raise AssertionError("unreachable: the backoff never ends")
