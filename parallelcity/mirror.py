"""The mirror: a live, timestamped copy of the field's points, fed by one OPC UA subscription.

``async with Mirror(field, clock) as mirror`` connects to the field's endpoint,
resolves the scenario's namespace, checks that every point and input node
exists (reporting every missing one at once), and creates a single
subscription with one monitored item per point.  Notifications only update a
dictionary of ``Reading``; ``snapshot()`` judges freshness against the clock.

The data-change filter uses the ``StatusValueTimestamp`` trigger, so a point
whose value does not change but whose source timestamp advances still counts
as fresh.  There is no per-point polling; ``read_inputs()`` reads the input
nodes once, in one request, to learn what the field currently applies.

Errors of asyncua and the network are translated here: ``FieldConnectionError``
(unreachable endpoint, timeout, lost session) and ``NodeMappingError`` (a
namespace or NodeId of the scenario is not on the server).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from asyncua import ua
from asyncua.client.client import Client
from asyncua.common.node import Node
from asyncua.common.subscription import DataChangeNotif, Subscription
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.uaerrors import UaError

from .clock import Clock
from .errors import FieldConnectionError, FieldError, NodeMappingError
from .scenario import FieldConfig
from .snapshot import PointSpec, Reading, Snapshot, assess

_log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 5.0
BATCH_SIZE = 500  # monitored items / attribute reads per request
KEEPALIVE_MS = 2000.0  # an idle subscription still sends a keep-alive this often
SESSION_TIMEOUT_MS = 60000  # asyncua asks for an hour by default; servers cap it anyway
LIFETIME_MS = 60000.0  # the server drops the subscription after this long without the client

# Errors that mean "the server could not be reached or stopped answering".
_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncio.TimeoutError,
    ConnectionError,
    UaError,
)
# ... plus what asyncua raises when used on a connection it already considers closed.
_SHUTDOWN_ERRORS: tuple[type[BaseException], ...] = (*_TRANSPORT_ERRORS, RuntimeError)


def parse_node_id(node: str, ns_index: int) -> ua.NodeId:
    """A scenario NodeId (``'s=dh/plant/T_supply'`` or ``'i=1001'``) in namespace ``ns_index``."""
    kind, sep, ident = node.partition("=")
    if not sep or not ident:
        raise ValueError(f"NodeId {node!r} must look like 's=<string>' or 'i=<integer>'")
    if kind == "s":
        return ua.NodeId(ua.String(ident), ua.Int16(ns_index))
    if kind == "i":
        try:
            number = int(ident)
        except ValueError:
            raise ValueError(f"NodeId {node!r}: 'i=' needs an integer identifier") from None
        if number < 0:
            raise ValueError(f"NodeId {node!r}: numeric identifiers are unsigned")
        return ua.NodeId(ua.Int32(number), ua.Int16(ns_index))
    raise ValueError(f"NodeId {node!r}: only 's=' and 'i=' identifiers are supported")


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


@dataclass(frozen=True)
class _Mapped:
    name: str  # scenario point / input name (a model signal)
    node: str  # NodeId as written in the scenario
    nodeid: ua.NodeId


class _Handler:
    """Subscription callbacks: store the latest reading per point, count notifications."""

    def __init__(self, mirror: Mirror) -> None:
        self._mirror = mirror

    def datachange_notification(self, node: Node, val: Any, data: DataChangeNotif) -> None:
        self._mirror._on_datachange(
            data.monitored_item.ClientHandle, val, data.monitored_item.Value
        )

    def status_change_notification(self, status: ua.StatusChangeNotification) -> None:
        self._mirror._on_status_change(status)


class Mirror:
    """A live copy of the field's points over one OPC UA subscription.

    ``endpoint`` overrides ``field.endpoint``; ``queue_size`` is the monitored
    items' server-side queue (1: only the latest value per publishing interval,
    0: the server's default); ``timeout_s`` bounds connecting and each request
    batch; ``batch_size`` caps the items per CreateMonitoredItems / Read request.
    """

    def __init__(
        self,
        field: FieldConfig,
        clock: Clock,
        *,
        endpoint: str | None = None,
        queue_size: int = 1,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        batch_size: int = BATCH_SIZE,
    ) -> None:
        url = endpoint if endpoint is not None else field.endpoint
        if not url:
            raise ValueError(
                "Mirror needs an endpoint: the field config has none and none was given"
            )
        if queue_size < 0:
            raise ValueError(f"queue_size must be >= 0, got {queue_size}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.field = field
        self.clock = clock
        self._endpoint = url
        self.queue_size = int(queue_size)
        self.timeout_s = float(timeout_s)
        self.batch_size = max(1, int(batch_size))
        self.specs: dict[str, PointSpec] = {
            p.name: PointSpec(p.name, p.max_age_s, p.required) for p in field.points
        }
        self._readings: dict[str, Reading] = {}
        self._server_time_fallback: set[str] = set()
        self._handles: dict[int, str] = {}
        self._points: list[_Mapped] = []
        self._inputs: list[_Mapped] = []
        self._client: Client | None = None
        self._subscription: Subscription | None = None
        self._ns_index: int | None = None
        self._all_received = asyncio.Event()
        self.notifications = 0
        self.last_status_change: int | None = None

    # -- public API ----------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return self._endpoint

    @property
    def namespace_index(self) -> int:
        if self._ns_index is None:
            raise RuntimeError("the mirror is not connected")
        return self._ns_index

    @property
    def readings(self) -> Mapping[str, Reading]:
        """The latest reading per point (points without one are absent)."""
        return dict(self._readings)

    @property
    def server_time_fallback(self) -> frozenset[str]:
        """Points whose latest reading had no SourceTimestamp (ServerTimestamp used instead)."""
        return frozenset(self._server_time_fallback)

    def snapshot(self) -> Snapshot:
        """Every point, fresh or stale, judged at the clock's current time."""
        return assess(self.specs, self._readings, self.clock.now())

    async def wait_all_received(self, timeout_s: float | None = None) -> bool:
        """Wait until every point has at least one reading; False on timeout."""
        try:
            async with asyncio.timeout(self.timeout_s if timeout_s is None else timeout_s):
                await self._all_received.wait()
        except TimeoutError:
            return False
        return True

    async def read_inputs(self) -> dict[str, float]:
        """The values the input nodes hold now, read once in one request per batch."""
        client = self._connected()
        values: dict[str, float] = {}
        bad: list[str] = []
        try:
            async with asyncio.timeout(self.timeout_s):
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
        except _TRANSPORT_ERRORS as exc:
            raise FieldConnectionError(
                f"reading the input nodes from {self._endpoint} failed: {exc!r}"
            ) from exc
        if bad:
            raise FieldError(
                f"input nodes on {self._endpoint} hold no usable value: {'; '.join(bad)}"
            )
        return values

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
        """Connect, check the mapping and subscribe; on any failure leave nothing open."""
        if self._client is not None:
            raise RuntimeError("the mirror is already started")
        client = Client(self._endpoint, timeout=self.timeout_s)
        client.session_timeout = SESSION_TIMEOUT_MS
        self._client = client
        try:
            await self._connect(client)
            await self._resolve(client)
            await self._subscribe(client)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Delete the subscription and disconnect; errors on the way out are only logged."""
        client, self._client = self._client, None
        sub, self._subscription = self._subscription, None
        if client is None:
            return
        try:
            async with asyncio.timeout(self.timeout_s):
                if sub is not None:
                    await sub.delete()
        except _SHUTDOWN_ERRORS as exc:
            _log.debug("deleting the subscription on %s failed: %r", self._endpoint, exc)
        try:
            async with asyncio.timeout(self.timeout_s):
                await client.disconnect()
        except _SHUTDOWN_ERRORS as exc:
            _log.debug("disconnecting from %s failed: %r", self._endpoint, exc)

    # -- internals -----------------------------------------------------------------------------

    def _connected(self) -> Client:
        if self._client is None or self._subscription is None:
            raise RuntimeError("the mirror is not connected (use `async with Mirror(...)`)")
        return self._client

    async def _connect(self, client: Client) -> None:
        try:
            async with asyncio.timeout(self.timeout_s):
                await client.connect()
        except _TRANSPORT_ERRORS as exc:
            # No session to close; drop the socket (a timeout may have cut connect short).
            client.disconnect_socket()
            self._client = None
            raise FieldConnectionError(
                f"cannot connect to the OPC UA endpoint {self._endpoint} "
                f"within {self.timeout_s:g} s: {exc!r}"
            ) from exc

    async def _resolve(self, client: Client) -> None:
        uri = self.field.namespace
        try:
            async with asyncio.timeout(self.timeout_s):
                namespaces = await client.get_namespace_array()
        except _TRANSPORT_ERRORS as exc:
            raise FieldConnectionError(
                f"reading the namespace array of {self._endpoint} failed: {exc!r}"
            ) from exc
        if uri not in namespaces:
            raise NodeMappingError(
                f"namespace {uri!r} is not on the server at {self._endpoint} "
                f"(server namespaces: {', '.join(map(repr, namespaces))})"
            )
        ns = self._ns_index = namespaces.index(uri)

        problems: list[str] = []
        self._points = self._map("point", [(p.name, p.node) for p in self.field.points], problems)
        self._inputs = self._map("input", [(i.name, i.node) for i in self.field.inputs], problems)
        if problems:
            raise NodeMappingError(
                f"{len(problems)} scenario NodeId(s) are malformed: " + "; ".join(problems)
            )

        checks = [("point", m) for m in self._points] + [("input", m) for m in self._inputs]
        missing: list[str] = []
        try:
            async with asyncio.timeout(self.timeout_s):
                for batch in _batches(checks, self.batch_size):
                    nodes = [client.get_node(m.nodeid) for _, m in batch]
                    results = await client.read_attributes(nodes, AttributeIds.NodeClass)
                    for (role, m), dv in zip(batch, results, strict=True):
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
        except _TRANSPORT_ERRORS as exc:
            raise FieldConnectionError(
                f"checking the scenario's nodes on {self._endpoint} failed: {exc!r}"
            ) from exc
        if missing:
            raise NodeMappingError(
                f"{len(missing)} scenario node(s) not found in namespace {uri!r} "
                f"(index {ns}) on {self._endpoint}: " + "; ".join(missing)
            )

    def _map(self, role: str, pairs: list[tuple[str, str]], problems: list[str]) -> list[_Mapped]:
        assert self._ns_index is not None
        mapped: list[_Mapped] = []
        for name, node in pairs:
            try:
                mapped.append(_Mapped(name, node, parse_node_id(node, self._ns_index)))
            except ValueError as exc:
                problems.append(f"{role} {name!r}: {exc}")
        return mapped

    async def _subscribe(self, client: Client) -> None:
        interval = float(self.field.sampling_interval_ms)
        trigger = ua.DataChangeFilter(
            Trigger=ua.DataChangeTrigger.StatusValueTimestamp,
            DeadbandType=ua.DeadbandType.None_,
            DeadbandValue=0.0,
        )
        failed: list[str] = []
        try:
            async with asyncio.timeout(self.timeout_s):
                sub = await client.create_subscription(self._parameters(interval), _Handler(self))
                self._subscription = sub
                for first, batch in enumerate(_batches(self._points, self.batch_size)):
                    requests = []
                    for k, m in enumerate(batch):
                        # Client handles are ours: 1..n in point order.  Nothing else
                        # subscribes on this subscription, so they cannot collide.
                        handle = first * self.batch_size + k + 1
                        self._handles[handle] = m.name
                        requests.append(self._request(m.nodeid, handle, interval, trigger))
                    results = await sub.create_monitored_items(requests)
                    for m, res in zip(batch, results, strict=True):
                        if isinstance(res, ua.StatusCode):
                            failed.append(f"point {m.name!r}: NodeId {m.node!r} ({res.name})")
        except _TRANSPORT_ERRORS as exc:
            raise FieldConnectionError(
                f"subscribing to the points on {self._endpoint} failed: {exc!r}"
            ) from exc
        if failed:
            raise NodeMappingError(
                f"the server at {self._endpoint} refused to monitor {len(failed)} point(s): "
                + "; ".join(failed)
            )

    @staticmethod
    def _parameters(interval_ms: float) -> ua.CreateSubscriptionParameters:
        """Keep-alive about every 2 s, lifetime at least a minute (and three keep-alives)."""
        keepalive = max(1, math.ceil(KEEPALIVE_MS / interval_ms))
        params = ua.CreateSubscriptionParameters()
        params.RequestedPublishingInterval = interval_ms
        params.RequestedMaxKeepAliveCount = keepalive
        params.RequestedLifetimeCount = max(3 * keepalive, math.ceil(LIFETIME_MS / interval_ms))
        params.MaxNotificationsPerPublish = 0  # no limit
        params.PublishingEnabled = True
        params.Priority = 0
        return params

    def _request(
        self, nodeid: ua.NodeId, handle: int, interval: float, flt: ua.DataChangeFilter
    ) -> ua.MonitoredItemCreateRequest:
        params = ua.MonitoringParameters()
        params.ClientHandle = handle
        params.SamplingInterval = interval
        params.QueueSize = self.queue_size
        params.DiscardOldest = True
        params.Filter = flt
        request = ua.MonitoredItemCreateRequest()
        request.ItemToMonitor = ua.ReadValueId(NodeId=nodeid, AttributeId=AttributeIds.Value)
        request.MonitoringMode = ua.MonitoringMode.Reporting
        request.RequestedParameters = params
        return request

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
        self._readings[name] = Reading(_as_float(val), source, status)
        if not self._all_received.is_set() and len(self._readings) == len(self.specs):
            self._all_received.set()

    def _on_status_change(self, status: ua.StatusChangeNotification) -> None:
        code = status.Status.value if status.Status is not None else 0
        self.last_status_change = code
        _log.warning("subscription status on %s changed: 0x%08X", self._endpoint, code)
