"""The Modbus reader: polls the scenario's points and hands each reading to the mirror.

Modbus has no subscriptions and no source timestamps, so the reader polls every
point each ``poll_interval_s`` (wall seconds), in as few requests as the codec's
``plan_reads`` allows, and stamps each reading with the run's clock time at which
its request was SENT: the device cannot have measured the value earlier than
that, so the age the snapshot computes is never smaller than the true one, and a
point that stops answering is stale once its ``max_age_s`` has passed since its
last answer, however long answers take on a loaded machine.

What a point that stops answering looks like:

* an exception response (illegal address, device failure, busy, ...): each point
  of that request gets a reading with a bad status (``STATUS_BAD`` plus the Modbus
  exception code in the low byte), so it is stale at once;
* no answer within ``timeout_s``: the point keeps its last reading and goes stale
  by age; a poll in which no request was answered is a lost link;
* the connection is lost: ``problem()`` says so and the mirror opens a connection
  gap (every point held, stale), closes the reader and reopens it with backoff; a
  point is fresh again only after a new successful read.

``open`` connects and polls once to check the mapping: an address the device
refuses as illegal is a ``NodeMappingError`` naming every one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence

from parallelcity.aio import cancel_and_wait
from parallelcity.clock import Clock
from parallelcity.errors import FieldConnectionError, FieldError, NodeMappingError
from parallelcity.field.protocol import STATUS_BAD, ReadingSink

from .codec import ModbusAddress, PointType, ReadRequest, as_point_value, decode, plan_reads
from .link import DeviceException, ModbusLink, RequestTimeout

_log = logging.getLogger(__name__)

ILLEGAL_ADDRESS = 2
DEFAULT_POLL_INTERVAL_S = 0.1
DEFAULT_TIMEOUT_S = 2.0

PolledPoint = tuple[str, ModbusAddress, PointType]
"""A point to poll: name, address, and the type its readings are handed on as."""


class ModbusReader:
    """A ``FieldReader`` polling Modbus TCP points (see the module docstring)."""

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
    ) -> None:
        if not poll_interval_s > 0:
            raise ValueError(f"poll_interval_s must be positive, got {poll_interval_s}")
        self.clock = clock
        self.poll_interval_s = float(poll_interval_s)
        self._link = ModbusLink(host, port, timeout_s=timeout_s)
        self._types = {name: point_type for name, _, point_type in points}
        self._plan = plan_reads([(name, addr) for name, addr, _ in points])
        self._inputs = dict(inputs)
        self._input_plan = plan_reads(list(self._inputs.items()))
        self._sink: ReadingSink | None = None
        self._task: asyncio.Task[None] | None = None
        self._problem: str | None = None
        self.polls = 0
        self.timeouts = 0
        self.exceptions = 0

    # -- FieldReader ---------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return self._link.endpoint

    @property
    def start_budget_s(self) -> float:
        """Connect, then one poll and one read of the inputs, every request bounded."""
        requests = 1 + 2 * (len(self._plan) + len(self._input_plan))
        return self._link.timeout_s * requests

    @property
    def requests_per_poll(self) -> int:
        return len(self._plan)

    def problem(self) -> str | None:
        if self._problem is not None:
            return self._problem
        if self._sink is not None and not self._link.connected:
            return f"the connection to {self.endpoint} closed"
        return None

    async def open(self, sink: ReadingSink) -> None:
        """Connect, check the mapping with a first poll, then poll in the background."""
        if self._task is not None:
            raise RuntimeError("the reader is already open")
        self._problem = None
        await self._link.connect()
        try:
            refused = await self._poll(sink)
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
        self._sink = sink
        self._task = asyncio.create_task(self._run(sink), name=f"modbus reader {self.endpoint}")

    async def close(self) -> None:
        task, self._task = self._task, None
        self._sink = None
        await cancel_and_wait(task)
        self._link.close()

    async def read_inputs(self) -> dict[str, float]:
        """The values the input registers and coils hold now, read once."""
        values: dict[str, float] = {}
        for request in self._input_plan:
            try:
                raw = await self._link.read(request)
            except FieldError as exc:
                raise FieldConnectionError(f"reading the inputs failed: {exc}") from exc
            for name, addr in request.members:
                values[str(name)] = float(decode(addr, request.slice(addr, raw)))
        return values

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
                try:
                    await self._link.read(plan_reads([(name, addr)])[0])
                except DeviceException as exc:
                    if exc.code == ILLEGAL_ADDRESS or len(request.members) == 1:
                        illegal.append(f"{role} {name!r}: {addr.describe()}")
                except RequestTimeout:
                    pass
        return illegal

    async def _poll(self, sink: ReadingSink) -> list[ReadRequest]:
        """Read every point once; the requests refused as asking for an illegal address."""
        illegal: list[ReadRequest] = []
        timeouts = 0
        for request in self._plan:
            sent = self.clock.now()
            try:
                raw = await self._link.read(request)
            except DeviceException as exc:
                self.exceptions += 1
                status = STATUS_BAD | (exc.code & 0xFF)
                for name, _ in request.members:
                    sink.offer(str(name), None, sent, status)
                if exc.code == ILLEGAL_ADDRESS:
                    illegal.append(request)
                continue
            except RequestTimeout:
                self.timeouts += 1
                timeouts += 1
                continue
            for name, addr in request.members:
                value = decode(addr, request.slice(addr, raw))
                sink.offer(str(name), as_point_value(self._types[str(name)], value), sent, 0)
        self.polls += 1
        if self._plan and timeouts == len(self._plan):
            raise FieldConnectionError(f"no request to {self.endpoint} answered in a whole poll")
        sink.alive()
        return illegal

    async def _run(self, sink: ReadingSink) -> None:
        next_poll = time.monotonic()
        while True:
            next_poll += self.poll_interval_s
            await asyncio.sleep(max(0.0, next_poll - time.monotonic()))
            if next_poll < time.monotonic() - self.poll_interval_s:
                next_poll = time.monotonic()  # fell behind: no burst of polls to catch up
            try:
                if not self._link.connected:
                    raise FieldConnectionError(f"the connection to {self.endpoint} closed")
                await self._poll(sink)
            except FieldConnectionError as exc:
                # the mirror sees it through problem(), opens a gap and reopens the reader
                self._problem = str(exc)
                self._link.close()
                _log.warning("modbus reader: %s", exc)
                return
