"""OPC UA reader: one subscription that feeds the generic mirror (``field.mirror``).

``open(sink)`` connects (through ``session.connect_client``, so security is the same
as everywhere else), resolves the scenario's namespace, checks that every point and
input node exists (reporting every missing one at once), and creates a single
subscription with one monitored item per point, in batches.  A point may be
``event_driven`` (a setpoint that changes only when written): like a deadband point,
its age counts from the subscription's last sign of life.  Each point may set its own
sampling interval and absolute deadband in the scenario.

Starting scales with the point count: monitored items are created in batches of
``BATCH_SIZE`` (fewer if the server's MaxMonitoredItemsPerCall says so), each request
bounded by ``timeout_s`` plus ``START_S_PER_POINT`` per item, the whole start (or
reconnect) by ``start_budget_s`` (``[field] start_timeout_s``, default ``timeout_s``
plus ``START_S_PER_POINT`` per point), with progress logged every
``PROGRESS_EVERY_S``.  A point the server does not know shows in its monitored item's
status; only those are then read to say why.  asyncua's own health probe gets as long
as a request: its default (1 s) drops a busy server's connection.

Notifications are handed synchronously, in the publish callback, to the mirror's
sink (one slot per point that keeps only the latest value): a burst of 10,000
changes costs 10,000 dictionary writes, never a queue that grows.  The data-change
filter uses the ``StatusValueTimestamp`` trigger, so a point whose value does not
change but whose source timestamp advances still counts as fresh.  A reading without
a SourceTimestamp is stamped with its ServerTimestamp (``server_time_fallback``), one
with neither can never be fresh.

``problem()`` reports the session state (a closed socket shows at once), the time
since the last publish response (data or keep-alive; a silent link shows after
``keepalive_ms`` x ``SILENCE_FACTOR``) and a bad subscription status notification.

Errors of asyncua and the network are translated here or in ``session``:
``FieldConnectionError`` (unreachable endpoint, timeout, lost session),
``NodeMappingError`` (a namespace or NodeId of the scenario is not on the server),
``SecurityError`` (certificates, users).
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from asyncua import ua
from asyncua.client.client import Client
from asyncua.client.ua_client import UaClientState
from asyncua.common.subscription import Subscription
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.object_ids import ObjectIds

from parallelcity.clock import Clock
from parallelcity.errors import (
    FieldConnectionError,
    FieldError,
    NodeIdError,
    NodeMappingError,
)
from parallelcity.field.opcua.config import OpcUaField
from parallelcity.field.opcua.session import (
    SHUTDOWN_ERRORS,
    TRANSPORT_ERRORS,
    ClientSecurity,
    connect_client,
    deadline,
    parse_node_id,
    raised_by_asyncua,
)
from parallelcity.field.protocol import ReadingSink

_log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 5.0
BATCH_SIZE = 2000  # monitored items / attribute reads per request (capped by the server's limits)
# Starting costs the server (and the client) time per point; a server that also serves other
# clients takes longer.  The start budget and each request's timeout grow with the count.
START_S_PER_POINT = 0.004
PROGRESS_EVERY_S = 2.0  # how often a long start logs how far it got
KEEPALIVE_MS = 2000.0  # an idle subscription still sends a keep-alive this often
SILENCE_FACTOR = 2.5  # no publish response for this many keep-alive periods: the link is dead
SESSION_TIMEOUT_MS = 60000  # asyncua asks for an hour by default; servers cap it anyway
LIFETIME_MS = 60000.0  # the server drops the subscription after this long without the client


def _epoch(when: dt.datetime) -> float:
    if when.tzinfo is None:  # asyncua decodes UA DateTime as naive UTC in some versions
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def _as_float(value: Any) -> float:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    return math.nan


def _batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class _Progress:
    """Logs "subscribed 4000/10000 points" at most every ``PROGRESS_EVERY_S`` of a long step."""

    def __init__(self, verb: str, what: str, total: int, endpoint: str) -> None:
        self.verb, self.what, self.total, self.endpoint = verb, what, total, endpoint
        self.done = 0
        self._next = time.monotonic() + PROGRESS_EVERY_S

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now >= self._next and self.done < self.total:
            self._next = now + PROGRESS_EVERY_S
            _log.info(
                "mirror: %s %d/%d %s on %s",
                self.verb,
                self.done,
                self.total,
                self.what,
                self.endpoint,
            )


@dataclass(frozen=True)
class _Mapped:
    name: str  # scenario point / input name (a model signal)
    node: str  # NodeId as written in the scenario
    nodeid: ua.NodeId


class _LatestValueSubscription(Subscription):
    """A subscription that hands every publish response straight to the mirror.

    asyncua's handler path starts one task per notification; at thousands of
    points that costs more than the notification itself, so the reader takes the
    whole message synchronously instead.
    """

    def __init__(
        self, session: Any, params: ua.CreateSubscriptionParameters, reader: OpcUaReader
    ) -> None:
        super().__init__(session, params, handler=None, queue_maxsize=1)
        self._mirror = reader

    async def publish_callback(self, publish_result: ua.PublishResult) -> None:
        self.last_publish_at = time.monotonic()
        if self._mirror._subscription is not self:
            return  # a late message of a session the reader has already given up
        message = publish_result.NotificationMessage
        self._mirror._on_publish(self.last_publish_at)
        if message.NotificationData is None:
            return  # a keep-alive: the subscription is alive and nothing changed
        self.last_sequence_number = int(message.SequenceNumber)
        for notif in message.NotificationData:
            if isinstance(notif, ua.DataChangeNotification):
                on_change = self._mirror._on_datachange
                for item in notif.MonitoredItems:
                    value = item.Value
                    raw = value.Value.Value if value is not None and value.Value else None
                    on_change(item.ClientHandle, raw, value)
            elif isinstance(notif, ua.StatusChangeNotification):
                self._mirror._on_status_change(notif)


class OpcUaReader:
    """The scenario's points read over one OPC UA subscription (a ``FieldReader``).

    ``security`` (default NoSecurity: the runtime decides whether that is allowed) is
    passed to ``session.connect_client``; ``queue_size`` is the monitored items'
    server-side queue (1: only the latest value, 0: the server's default);
    ``timeout_s`` bounds connecting and, plus ``START_S_PER_POINT`` per item, each
    request batch; ``start_timeout_s`` bounds a whole open (default
    ``field.start_timeout_s``, else derived from the point count: ``start_budget_s``);
    ``batch_size`` caps the items per CreateMonitoredItems / Read request (the server's
    MaxMonitoredItemsPerCall / MaxNodesPerRead cap it further); ``keepalive_ms`` is the
    longest the server may stay silent on a healthy subscription.
    """

    def __init__(
        self,
        field: OpcUaField,
        clock: Clock,
        *,
        endpoint: str,
        security: ClientSecurity | None = None,
        queue_size: int = 1,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        start_timeout_s: float | None = None,
        batch_size: int = BATCH_SIZE,
        keepalive_ms: float = KEEPALIVE_MS,
    ) -> None:
        if queue_size < 0:
            raise ValueError(f"queue_size must be >= 0, got {queue_size}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        if not keepalive_ms > 0:
            raise ValueError(f"keepalive_ms must be positive, got {keepalive_ms}")
        if start_timeout_s is None:
            start_timeout_s = field.start_timeout_s
        if start_timeout_s is not None and not start_timeout_s > 0:
            raise ValueError(f"start_timeout_s must be positive, got {start_timeout_s}")
        self.field = field
        self.clock = clock
        self.security = security if security is not None else ClientSecurity.insecure()
        self._endpoint = endpoint
        self.queue_size = int(queue_size)
        self.timeout_s = float(timeout_s)
        self.batch_size = self._batch = max(1, int(batch_size))
        items = len(field.points) + len(field.inputs)
        self._start_budget_s = (
            float(start_timeout_s)
            if start_timeout_s is not None
            else self.timeout_s + START_S_PER_POINT * items
        )
        self.keepalive_ms = float(keepalive_ms)
        self._server_time_fallback: set[str] = set()
        self._handles: dict[int, str] = {}
        self._missing: list[str] = []  # inputs that are not Variables on the server
        self._points: list[_Mapped] = []
        self._inputs: list[_Mapped] = []
        self._client: Client | None = None
        self._subscription: _LatestValueSubscription | None = None
        self._sink: ReadingSink | None = None
        self._ns_index: int | None = None
        self._last_publish = 0.0  # monotonic
        self._link_problem: str | None = None
        self.notifications = 0
        self.last_status_change: int | None = None
        self.stage = "not started"  # how far the last open got

    @property
    def endpoint(self) -> str:
        return self._endpoint

    @property
    def start_budget_s(self) -> float:
        return self._start_budget_s

    @property
    def namespace_index(self) -> int:
        if self._ns_index is None:
            raise RuntimeError("the reader is not connected")
        return self._ns_index

    @property
    def server_time_fallback(self) -> frozenset[str]:
        """Points whose latest reading had no SourceTimestamp (ServerTimestamp used instead)."""
        return frozenset(self._server_time_fallback)

    async def read_inputs(self) -> dict[str, float]:
        """The values the input nodes hold now, read once in one request per batch."""
        client = self._connected()
        values: dict[str, float] = {}
        bad: list[str] = []
        try:
            async with deadline(self.timeout_s):
                for batch in _batches(self._inputs, self.batch_size):
                    nodes = [client.get_node(m.nodeid) for m in batch]
                    for m, dv in zip(batch, await client.read_attributes(nodes), strict=True):
                        status = dv.StatusCode.value if dv.StatusCode is not None else 0
                        raw = dv.Value.Value if dv.Value is not None else None
                        value = _as_float(raw)
                        if (status >> 30) != 0 or not math.isfinite(value):
                            bad.append(f"{m.name} ({m.node}): status 0x{status:08X}, value {raw!r}")
                        else:
                            values[m.name] = value
        except TRANSPORT_ERRORS as exc:
            raise FieldConnectionError(
                f"reading the input nodes from {self._endpoint} failed: {exc!r}"
            ) from exc
        if bad:
            raise FieldError(
                f"input nodes on {self._endpoint} hold no usable value: {'; '.join(bad)}"
            )
        return values

    def _connected(self) -> Client:
        if self._client is None or self._subscription is None:
            raise FieldConnectionError(f"the reader has no session to {self._endpoint} right now")
        return self._client

    async def open(self, sink: ReadingSink) -> None:
        """Connect, resolve and subscribe within ``start_budget_s``; translate every failure;
        on any failure leave nothing open."""
        if self._client is not None:
            raise RuntimeError("the reader is already open")
        budget = self.start_budget_s
        self.stage = "connecting"
        started = time.monotonic()
        self._sink = sink
        try:
            async with deadline(budget):
                client = await connect_client(
                    self._endpoint,
                    self.security,
                    timeout_s=self.timeout_s,
                    session_timeout_ms=SESSION_TIMEOUT_MS,
                    name="parallelcity mirror",
                    request_timeout_s=self._request_timeout(self.batch_size),
                    watchdog_s=self._request_timeout(self.batch_size),
                )
                self._client = client
                await self._resolve(client)
                await self._subscribe(client)
        except BaseException as exc:
            await self._close(delete=False)
            if isinstance(exc, TimeoutError):
                raise FieldConnectionError(
                    f"starting the mirror on {self._endpoint} did not finish within its "
                    f"budget of {budget:.0f} s ({self.stage}); a slow or busy server needs "
                    "a larger [field] start_timeout_s"
                ) from exc
            if isinstance(exc, Exception) and raised_by_asyncua(exc):
                raise FieldConnectionError(
                    f"starting the mirror on {self._endpoint} failed ({self.stage}): {exc!r}"
                ) from exc
            raise
        self._last_publish = time.monotonic()
        self._link_problem = None
        self.stage = f"started in {time.monotonic() - started:.1f} s"
        _log.info(
            "mirror: %d points subscribed on %s in %.1f s",
            len(self._points),
            self._endpoint,
            time.monotonic() - started,
        )

    async def close(self) -> None:
        """Delete the subscription when the session still lives, and disconnect."""
        await self._close(delete=True)

    def _request_timeout(self, items: int) -> float:
        return self.timeout_s + START_S_PER_POINT * items

    async def _close(self, *, delete: bool) -> None:
        client, self._client = self._client, None
        sub, self._subscription = self._subscription, None
        self._sink = None
        if client is None:
            return
        alive = client.uaclient.state is UaClientState.CONNECTED
        if delete and sub is not None and alive:
            try:
                async with deadline(self.timeout_s):
                    await sub.delete()
            except SHUTDOWN_ERRORS as exc:
                _log.debug("deleting the subscription on %s failed: %r", self._endpoint, exc)
        try:
            async with deadline(self.timeout_s if alive else 0.5):
                await client.disconnect()
        except SHUTDOWN_ERRORS as exc:
            _log.debug("disconnecting from %s failed: %r", self._endpoint, exc)
        finally:
            client.disconnect_socket()

    def problem(self) -> str | None:
        """Why the link is not healthy now, or None."""
        if self._link_problem is not None:
            return self._link_problem
        client = self._client
        if client is None or self._subscription is None:
            return "no session"
        state = client.uaclient.state
        if state is not UaClientState.CONNECTED:
            return f"session {state.value}"
        silent = time.monotonic() - self._last_publish
        if silent > SILENCE_FACTOR * self.keepalive_ms / 1000.0:
            return f"no publish response or keep-alive for {silent:.1f} s"
        return None

    # -- connecting ----------------------------------------------------------------------------

    async def _resolve(self, client: Client) -> None:
        uri = self.field.namespace
        self.stage = "reading the namespace array and operation limits"
        try:
            async with deadline(self.timeout_s):
                namespaces = await client.get_namespace_array()
                self._batch = await self._batch_limit(client)
        except TRANSPORT_ERRORS as exc:
            raise FieldConnectionError(
                f"reading the namespace array of {self._endpoint} failed: {exc!r}"
            ) from exc
        if uri not in namespaces:
            raise NodeMappingError(
                f"namespace {uri!r} is not on the server at {self._endpoint} "
                f"(server namespaces: {', '.join(map(repr, namespaces))})"
            )
        self._ns_index = namespaces.index(uri)

        problems: list[str] = []
        self._points = self._map("point", [(p.name, p.node) for p in self.field.points], problems)
        self._inputs = self._map("input", [(i.name, i.node) for i in self.field.inputs], problems)
        if problems:
            raise NodeMappingError(
                f"{len(problems)} scenario NodeId(s) are malformed: " + "; ".join(problems)
            )

        # The points are checked by creating their monitored items (the server says which
        # NodeIds it does not know); the inputs are only read, so they are checked here.
        self._missing = await self._check(client, [("input", m) for m in self._inputs])

    async def _check(self, client: Client, checks: list[tuple[str, _Mapped]]) -> list[str]:
        """Why each of ``checks`` is not a Variable on the server (nothing: all fine)."""
        missing: list[str] = []
        progress = _Progress("checked", "nodes", len(checks), self._endpoint)
        try:
            for chunk in _batches(checks, self._batch):
                self.stage = f"checking nodes ({progress.done}/{len(checks)} done)"
                async with deadline(self._request_timeout(len(chunk))):
                    nodes = [client.get_node(m.nodeid) for _, m in chunk]
                    results = await client.read_attributes(nodes, AttributeIds.NodeClass)
                for (role, m), dv in zip(chunk, results, strict=True):
                    status = dv.StatusCode
                    if status is not None and not status.is_good():
                        missing.append(f"{role} {m.name!r}: NodeId {m.node!r} ({status.name})")
                        continue
                    node_class = dv.Value.Value if dv.Value is not None else None
                    if node_class != ua.NodeClass.Variable:
                        missing.append(
                            f"{role} {m.name!r}: NodeId {m.node!r} is not a Variable "
                            f"(node class {node_class!r})"
                        )
                progress.add(len(chunk))
        except TRANSPORT_ERRORS as exc:
            raise FieldConnectionError(
                f"checking the scenario's nodes on {self._endpoint} failed "
                f"({progress.done}/{len(checks)} checked): {exc!r}"
            ) from exc
        return missing

    async def _batch_limit(self, client: Client) -> int:
        """``batch_size``, capped by the server's MaxMonitoredItemsPerCall and MaxNodesPerRead."""
        limits = ObjectIds
        nodes = [
            client.get_node(ua.NodeId(ua.Int32(i)))
            for i in (
                limits.Server_ServerCapabilities_OperationLimits_MaxMonitoredItemsPerCall,
                limits.Server_ServerCapabilities_OperationLimits_MaxNodesPerRead,
            )
        ]
        batch = self.batch_size
        for dv in await client.read_attributes(nodes, AttributeIds.Value):
            value = dv.Value.Value if dv.Value is not None else None
            good = dv.StatusCode is None or dv.StatusCode.is_good()
            if good and isinstance(value, int) and not isinstance(value, bool) and value > 0:
                batch = min(batch, value)  # 0 means "no limit"
        return batch

    def _map(self, role: str, pairs: list[tuple[str, str]], problems: list[str]) -> list[_Mapped]:
        assert self._ns_index is not None
        mapped: list[_Mapped] = []
        for name, node in pairs:
            try:
                mapped.append(_Mapped(name, node, parse_node_id(node, self._ns_index)))
            except NodeIdError as exc:
                problems.append(f"{role} {name!r}: {exc}")
        return mapped

    async def _subscribe(self, client: Client) -> None:
        interval = float(self.field.sampling_interval_ms)
        per_point = {p.name: p for p in self.field.points}
        failed: dict[_Mapped, str] = {}
        total = len(self._points)
        progress = _Progress("subscribed", "points", total, self._endpoint)
        self.stage = "creating the subscription"
        try:
            batch = self._batch
            async with deadline(self.timeout_s):
                sub = _LatestValueSubscription(
                    client.uaclient.session, self._parameters(interval), self
                )
                await sub.init()
            self._subscription = sub
            self._handles = {}
            handle = 0
            for chunk in _batches(self._points, batch):
                self.stage = f"subscribing ({progress.done}/{total} points done)"
                requests = []
                for m in chunk:
                    # Client handles are ours: 1..n in point order.  Nothing else
                    # subscribes on this subscription, so they cannot collide.
                    handle += 1
                    self._handles[handle] = m.name
                    p = per_point[m.name]
                    sampling = p.sampling_interval_ms or interval
                    requests.append(self._request(m.nodeid, handle, sampling, p.deadband))
                async with deadline(self._request_timeout(len(chunk))):
                    results = await sub.create_monitored_items(requests)
                for m, res in zip(chunk, results, strict=True):
                    if isinstance(res, ua.StatusCode):
                        failed[m] = res.name
                progress.add(len(chunk))
        except TRANSPORT_ERRORS as exc:
            raise FieldConnectionError(
                f"subscribing to the points on {self._endpoint} failed "
                f"({progress.done}/{total} subscribed): {exc!r}"
            ) from exc
        if failed or self._missing:
            await self._refuse_mapping(client, failed)

    async def _refuse_mapping(self, client: Client, failed: dict[_Mapped, str]) -> None:
        """Every point the server would not monitor and every unusable input, at once."""
        missing = await self._check(client, [("point", m) for m in failed])
        described = {line.split(":", 1)[0] for line in missing}
        missing += [
            f"point {m.name!r}: NodeId {m.node!r} (monitoring refused: {why})"
            for m, why in failed.items()
            if f"point {m.name!r}" not in described
        ]
        missing += self._missing
        raise NodeMappingError(
            f"{len(missing)} scenario node(s) not found in namespace {self.field.namespace!r} "
            f"(index {self._ns_index}) on {self._endpoint}: " + "; ".join(missing)
        )

    def _parameters(self, interval_ms: float) -> ua.CreateSubscriptionParameters:
        """Keep-alive about every ``keepalive_ms``, lifetime at least a minute."""
        keepalive = max(1, math.ceil(self.keepalive_ms / interval_ms))
        params = ua.CreateSubscriptionParameters()
        params.RequestedPublishingInterval = interval_ms
        params.RequestedMaxKeepAliveCount = keepalive
        params.RequestedLifetimeCount = max(3 * keepalive, math.ceil(LIFETIME_MS / interval_ms))
        params.MaxNotificationsPerPublish = 0  # no limit
        params.PublishingEnabled = True
        params.Priority = 0
        return params

    def _request(
        self, nodeid: ua.NodeId, handle: int, sampling_ms: float, deadband: float | None
    ) -> ua.MonitoredItemCreateRequest:
        flt = ua.DataChangeFilter(
            Trigger=ua.DataChangeTrigger.StatusValueTimestamp,
            DeadbandType=ua.DeadbandType.Absolute if deadband else ua.DeadbandType.None_,
            DeadbandValue=float(deadband or 0.0),
        )
        params = ua.MonitoringParameters()
        params.ClientHandle = handle
        params.SamplingInterval = sampling_ms
        params.QueueSize = self.queue_size
        params.DiscardOldest = True
        params.Filter = flt
        request = ua.MonitoredItemCreateRequest()
        request.ItemToMonitor = ua.ReadValueId(NodeId=nodeid, AttributeId=AttributeIds.Value)
        request.MonitoringMode = ua.MonitoringMode.Reporting
        request.RequestedParameters = params
        return request

    # -- notifications (called synchronously from the publish callback) ---------------------

    def _on_publish(self, monotonic: float) -> None:
        self._last_publish = monotonic
        if self._sink is not None:
            self._sink.alive()

    def _on_datachange(self, handle: int, val: Any, dv: ua.DataValue | None) -> None:
        name = self._handles.get(handle)
        if name is None:
            _log.warning("notification for unknown client handle %s on %s", handle, self._endpoint)
            return
        self.notifications += 1
        status = 0
        source: float
        if dv is not None and dv.StatusCode is not None:
            status = dv.StatusCode.value
        if dv is not None and dv.SourceTimestamp is not None:
            source = _epoch(dv.SourceTimestamp)
            self._server_time_fallback.discard(name)
        elif dv is not None and dv.ServerTimestamp is not None:
            source = _epoch(dv.ServerTimestamp)
            self._server_time_fallback.add(name)
        else:
            # No timestamp at all: the reading's age is unknown, so it can never be fresh.
            source = -math.inf
            self._server_time_fallback.add(name)
        if self._sink is not None:
            self._sink.offer(name, val, source, status)

    def _on_status_change(self, status: ua.StatusChangeNotification) -> None:
        code = status.Status.value if status.Status is not None else 0
        self.last_status_change = code
        _log.warning("subscription status on %s changed: 0x%08X", self._endpoint, code)
        if (code >> 30) != 0:  # bad: the server timed out or shut the subscription down
            self._link_problem = f"subscription status {ua.StatusCode(ua.UInt32(code)).name}"
