"""The gateway's OPC UA session to the PLC side: where accepted setpoints are written.

``SetpointWriter`` (``field.protocol``) is what the field gateway needs from the
field: write a set of setpoints, read input values back.  ``OpcUaWriter`` is OPC UA's:
one OPC UA session (``opcua.connect_client``, so SignAndEncrypt unless a lab
run) to the server holding the input nodes.

The session can die (a PLC reboot, a cut link).  The writer watches it - the
session state asyncua keeps (a closed socket shows at once; asyncua's own
server-state probe marks a silent link within about two seconds) and every
failed request - and on a loss reconnects with backoff (``backoff.Backoff``),
re-resolving the namespace and every input node.  Until the session is back,
``write`` and ``read`` fail at once with ``FieldUnavailableError``: nothing is
sent, nothing is kept to be sent later, so a refused command can never land
late.  Losses and recoveries go to ``on_link`` (the gateway journals them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import struct
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

from asyncua import ua
from asyncua.client.client import Client
from asyncua.client.ua_client import UaClientState
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.object_ids import ObjectIds

from parallelcity.aio import cancel_and_wait
from parallelcity.backoff import Backoff
from parallelcity.errors import (
    FieldConnectionError,
    FieldError,
    FieldUnavailableError,
    NodeIdError,
    NodeMappingError,
    SecurityError,
)
from parallelcity.field.opcua.config import OpcUaField
from parallelcity.field.opcua.session import (
    SHUTDOWN_ERRORS,
    ClientSecurity,
    connect_client,
    parse_node_id,
)
from parallelcity.field.protocol import LinkListener

log = logging.getLogger("parallelcity.gateway.server")

WATCH_PERIOD_S = 0.1
"""How often the writer looks at its session when nothing else wakes it."""
CLOSE_TIMEOUT_S = 0.5
"""A dead session gets this long to say goodbye before its socket is dropped."""
BACKOFF_MAX_S = 2.0
"""Longest wait between reconnect attempts: every second down refuses commands."""


class OpcUaWriter:
    """Writes setpoints to the scenario's input nodes on an OPC UA server, reconnecting.

    ``async with`` connects, resolves the field namespace and checks that every
    input node exists and is a variable (``NodeMappingError`` naming each one
    that is not, or whose DataType is not a number or a Boolean): the first connection
    must succeed.  ``write`` writes all values in one request, each as its node's
    DataType (``encode``: a Boolean takes 0 or 1, an integer type the nearest whole
    value within its range, a Float a value within its range; anything else is refused,
    nothing sent), and ``read`` gives back the value written when a node holds exactly
    its encoding.  Security: the session is set up by
    ``opcua.connect_client`` with ``security`` (default NoSecurity, which
    callers allow only for an ``insecure_lab`` run), at every reconnect too.

    ``reconnect`` False leaves a lost session down (tests).  While the session
    is down, ``write`` raises ``FieldUnavailableError`` without sending anything.
    """

    def __init__(
        self,
        endpoint: str,
        field: OpcUaField,
        *,
        timeout_s: float = 4.0,
        security: ClientSecurity | None = None,
        reconnect: bool = True,
        backoff: Backoff | None = None,
        on_link: LinkListener | None = None,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.endpoint = endpoint
        self.field = field
        self.timeout_s = timeout_s
        self.security = security if security is not None else ClientSecurity.insecure()
        self.reconnect = reconnect
        self.backoff = backoff or Backoff(maximum=BACKOFF_MAX_S)
        self.on_link = on_link
        self._client: Client | None = None
        self._nodes: dict[str, Any] = {}
        self._node_ids: dict[str, str] = {m.name: m.node for m in field.inputs}
        self._types: dict[str, ua.VariantType] = {}  # each input node's DataType, as resolved
        self._written: dict[str, tuple[object, float]] = {}  # last encoding written, its value
        self._down: str | None = None  # why the session is down, while it is
        self._down_since = 0.0  # monotonic
        self._attempts = 0  # reconnect attempts in the current outage
        self._wake = asyncio.Event()
        self._watch_task: asyncio.Task[None] | None = None
        self.outages = 0
        self.reconnects = 0

    async def __aenter__(self) -> OpcUaWriter:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def available(self) -> bool:
        """True while a session with resolved nodes is up (a write would be sent)."""
        return self._problem() is None

    async def connect(self) -> None:
        """Connect and resolve the nodes; raises on failure.  Then watch the session."""
        if self._client is not None or self._watch_task is not None:
            raise RuntimeError("the writer is already connected")
        self._client, self._nodes = await self._open()
        self._down = None
        if self.reconnect:
            self._watch_task = asyncio.create_task(
                self._watch(), name=f"field writer {self.endpoint}"
            )

    async def _open(self) -> tuple[Client, dict[str, Any]]:
        client = await connect_client(
            self.endpoint, self.security, timeout_s=self.timeout_s, name="parallelcity gateway"
        )
        try:
            async with asyncio.timeout(self.timeout_s):
                nodes = await self._resolve(client)
        except BaseException as exc:
            await _close(client, self.endpoint)
            if isinstance(exc, TimeoutError):
                raise FieldConnectionError(
                    f"resolving the input nodes on {self.endpoint} took more than "
                    f"{self.timeout_s:g} s"
                ) from exc
            raise
        return client, nodes

    async def _resolve(self, client: Client) -> dict[str, Any]:
        uri = self.field.namespace
        try:
            namespaces = await client.get_namespace_array()
        except SHUTDOWN_ERRORS as exc:
            raise FieldConnectionError(
                f"cannot read the namespace array of {self.endpoint}: {exc}"
            ) from exc
        if uri not in namespaces:
            raise NodeMappingError(
                f"namespace {uri!r} is not on the OPC UA server at {self.endpoint} "
                f"(it has: {', '.join(namespaces)})"
            )
        ns = namespaces.index(uri)
        nodes: dict[str, Any] = {}
        problems: list[str] = []
        for name, text in self._node_ids.items():
            try:
                nodes[name] = client.get_node(parse_node_id(text, ns))
            except NodeIdError as exc:
                problems.append(f"input {name!r}: {exc}")
        if nodes:
            try:
                results = await client.read_attributes(list(nodes.values()), AttributeIds.NodeClass)
            except SHUTDOWN_ERRORS as exc:
                raise FieldConnectionError(
                    f"cannot read the input nodes on {self.endpoint}: {exc}"
                ) from exc
            variables: dict[str, Any] = {}
            for (name, node), dv in zip(nodes.items(), results, strict=True):
                text = self._node_ids[name]
                status = dv.StatusCode
                if status is not None and not status.is_good():
                    problems.append(
                        f"input {name!r}: NodeId {text!r} in namespace {uri!r} (ns={ns}) "
                        f"does not exist ({status.name})"
                    )
                elif dv.Value is None or dv.Value.Value != ua.NodeClass.Variable:
                    problems.append(
                        f"input {name!r}: NodeId {text!r} in namespace {uri!r} is not a variable"
                    )
                else:
                    variables[name] = node
            if variables:
                try:
                    kinds = await client.read_attributes(
                        list(variables.values()), AttributeIds.DataType
                    )
                except SHUTDOWN_ERRORS as exc:
                    raise FieldConnectionError(
                        f"cannot read the input nodes' data types on {self.endpoint}: {exc}"
                    ) from exc
                for name, dv in zip(variables, kinds, strict=True):
                    data_type = dv.Value.Value if dv.Value is not None else None
                    variant = variant_of_data_type(data_type)
                    if variant is None:
                        problems.append(
                            f"input {name!r}: NodeId {self._node_ids[name]!r} has DataType "
                            f"{data_type}; an input must be a Boolean, an integer type, Float "
                            "or Double"
                        )
                    else:
                        self._types[name] = variant
        if problems:
            raise NodeMappingError(
                f"{self.endpoint}: {len(problems)} input node(s) cannot be used:\n"
                + "\n".join(f"  - {p}" for p in problems)
            )
        return nodes

    # ------------------------------------------------------------------ the session

    def _problem(self) -> str | None:
        """Why no write can be sent now, or None."""
        if self._down is not None:
            return self._down
        client = self._client
        if client is None:
            return "not connected"
        state = client.uaclient.state
        if state is not UaClientState.CONNECTED:
            return f"session {state.value}"
        return None

    def _usable(self) -> tuple[Client, dict[str, Any]]:
        problem = self._problem()
        if problem is not None or self._client is None:
            self._lost(problem or "not connected")  # now, not when the watcher next looks
            raise FieldUnavailableError(self._unavailable(problem or "not connected"))
        return self._client, self._nodes

    def _unavailable(self, problem: str) -> str:
        down_for = time.monotonic() - self._down_since
        trying = f"reconnect attempt {self._attempts}" if self._attempts else "reconnecting"
        if not self.reconnect:
            trying = "not reconnecting"
        return (
            f"the OPC UA session to {self.endpoint} is down ({problem}; {down_for:.1f} s, "
            f"{trying}): nothing was written, and nothing is kept to be written later"
        )

    def _lost(self, problem: str) -> None:
        """Mark the session down (once per outage) and wake the watcher."""
        self._wake.set()
        if self._down is not None:
            return
        self._down = problem
        self._down_since = time.monotonic()
        self._attempts = 0
        self.outages += 1
        what = "reconnecting" if self.reconnect else "not reconnecting"
        log.warning(
            "field writer: lost the OPC UA session to %s (%s); commands are refused, %s",
            self.endpoint,
            problem,
            what,
        )
        self._emit("field_lost", f"{self.endpoint}: {problem}")

    def _timed_out_or_lost(self, exc: BaseException, what: str) -> None:
        """After a failed request: mark the session lost, unless it merely timed out.

        A slow answer is no lost link (the session watch finds a dead one): marking it
        lost would refuse the read-back that settles the timed-out write.
        """
        if isinstance(exc, TimeoutError) and self._problem() is None:
            log.warning(
                "field writer: a %s to %s got no answer within %g s; the session stays up",
                what,
                self.endpoint,
                self.timeout_s,
            )
            return
        self._lost(f"a {what} failed: {exc or type(exc).__name__}")

    def _emit(self, kind: str, detail: str) -> None:
        if self.on_link is None:
            return
        try:
            self.on_link(kind, detail)
        except Exception:  # a failing listener must not stop the writer
            log.exception("field writer: the link listener failed on %s", kind)

    async def _watch(self) -> None:
        while True:
            problem = self._problem()
            if problem is None:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(WATCH_PERIOD_S):  # not wait_for: see gateway
                        await self._wake.wait()
                continue
            self._lost(problem)
            await self._reconnect()

    async def _reconnect(self) -> None:
        client, self._client = self._client, None
        self._nodes = {}
        if client is not None:
            await _close(client, self.endpoint)
        for attempts, delay in enumerate(self.backoff.delays(), start=1):
            self._attempts = attempts
            try:
                client, nodes = await self._open()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # A wrong mapping or certificate after a PLC restart is worth an error line;
                # an endpoint still down is what an outage looks like.
                level = logging.INFO if isinstance(exc, FieldConnectionError) else logging.ERROR
                if not isinstance(exc, FieldError | SecurityError):
                    level = logging.ERROR
                log.log(
                    level,
                    "field writer: reconnect attempt %d to %s failed: %s; next in %.2f s",
                    attempts,
                    self.endpoint,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            down_for = time.monotonic() - self._down_since
            self._client, self._nodes = client, nodes
            self._down = None
            self.reconnects += 1
            detail = (
                f"{self.endpoint}: session back after {down_for:.1f} s and {attempts} "
                f"attempt(s); {len(nodes)} input node(s) resolved again"
            )
            log.warning("field writer: %s", detail)
            self._emit("field_restored", detail)
            return

    # ------------------------------------------------------------------ requests

    async def write(self, setpoints: Mapping[str, float]) -> None:
        client, nodes = self._usable()
        unmapped = sorted(n for n in setpoints if n not in nodes)
        if unmapped:
            raise NodeMappingError(f"no field node for input(s) {', '.join(map(repr, unmapped))}")
        names = list(setpoints)
        encoded = {
            n: encode(n, self._types.get(n, ua.VariantType.Double), setpoints[n]) for n in names
        }  # every value first: one that does not fit its node's type sends nothing
        for n in names:
            self._written[n] = (encoded[n], float(setpoints[n]))
        values = [ua.DataValue(ua.Variant(encoded[n], self._types.get(n, ua.VariantType.Double)))
                  for n in names]  # fmt: skip
        try:
            statuses = await client.write_values(
                [nodes[n] for n in names], values, raise_on_partial_error=False
            )
        except SHUTDOWN_ERRORS as exc:
            why = f"{exc or type(exc).__name__}"
            self._timed_out_or_lost(exc, "write")
            raise FieldConnectionError(
                f"writing {len(names)} setpoint(s) to {self.endpoint} failed: {why} "
                "(the session is being re-established)"
            ) from exc
        failed = [
            f"{n} ({s.name})" for n, s in zip(names, statuses, strict=True) if not s.is_good()
        ]
        if failed:
            raise FieldConnectionError(f"{self.endpoint} refused the write of {', '.join(failed)}")

    async def read(self, names: Sequence[str]) -> Mapping[str, float]:
        """The current values of the input nodes ``names`` (one read request)."""
        client, nodes = self._usable()
        unmapped = sorted(n for n in names if n not in nodes)
        if unmapped:
            raise NodeMappingError(f"no field node for input(s) {', '.join(map(repr, unmapped))}")
        try:
            values = await client.read_values([nodes[n] for n in names])
        except SHUTDOWN_ERRORS as exc:
            why = f"{exc or type(exc).__name__}"
            self._timed_out_or_lost(exc, "read")
            raise FieldConnectionError(
                f"reading {len(names)} input(s) from {self.endpoint} failed: {why}"
            ) from exc
        out: dict[str, float] = {}
        for name, value in zip(names, values, strict=True):
            if isinstance(value, bool | int | float):
                written = self._written.get(name)
                # a node holding exactly what writing a value put there gives that value
                if written is not None and type(written[0]) is type(value) and written[0] == value:
                    out[name] = written[1]
                else:
                    out[name] = float(value)
        return out

    async def aclose(self) -> None:
        task, self._watch_task = self._watch_task, None
        await cancel_and_wait(task)
        client, self._client = self._client, None
        self._nodes = {}
        if client is not None:
            await _close(client, self.endpoint)


async def _close(client: Client, endpoint: str) -> None:
    alive = client.uaclient.state is UaClientState.CONNECTED
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT_S if not alive else 2.0):
            await client.disconnect()
    except Exception as exc:  # closing must not mask the reason we are closing
        log.debug("OPC UA disconnect from %s failed: %r", endpoint, exc)
    finally:
        client.disconnect_socket()


_NUMERIC_TYPES: dict[int, ua.VariantType] = {
    v.value: v
    for v in (
        ua.VariantType.Boolean,
        ua.VariantType.SByte,
        ua.VariantType.Byte,
        ua.VariantType.Int16,
        ua.VariantType.UInt16,
        ua.VariantType.Int32,
        ua.VariantType.UInt32,
        ua.VariantType.Int64,
        ua.VariantType.UInt64,
        ua.VariantType.Float,
        ua.VariantType.Double,
    )
}  # the built-in DataTypes ns=0;i=1..11 share their VariantType's number
_ABSTRACT_TYPES: dict[int, ua.VariantType] = {
    ObjectIds.BaseDataType: ua.VariantType.Double,
    ObjectIds.Number: ua.VariantType.Double,
    ObjectIds.Integer: ua.VariantType.Int64,
    ObjectIds.UInteger: ua.VariantType.UInt64,
}
_INT_RANGE: dict[ua.VariantType, tuple[int, int]] = {
    ua.VariantType.SByte: (-(2**7), 2**7 - 1),
    ua.VariantType.Byte: (0, 2**8 - 1),
    ua.VariantType.Int16: (-(2**15), 2**15 - 1),
    ua.VariantType.UInt16: (0, 2**16 - 1),
    ua.VariantType.Int32: (-(2**31), 2**31 - 1),
    ua.VariantType.UInt32: (0, 2**32 - 1),
    ua.VariantType.Int64: (-(2**63), 2**63 - 1),
    ua.VariantType.UInt64: (0, 2**64 - 1),
}
_FLOAT_MAX = 3.4028234663852886e38


def variant_of_data_type(data_type: object) -> ua.VariantType | None:
    """The VariantType a setpoint is written as to a node of DataType ``data_type`` (a
    NodeId), or None if it is not a number or a Boolean."""
    if not isinstance(data_type, ua.NodeId) or data_type.NamespaceIndex != 0:
        return None
    ident = data_type.Identifier
    if not isinstance(ident, int):
        return None
    return _NUMERIC_TYPES.get(ident) or _ABSTRACT_TYPES.get(ident)


def encode(name: str, variant: ua.VariantType, value: float) -> bool | int | float:
    """``value`` as a node of ``variant`` holds it: a Boolean is 0 or 1, an integer type
    the nearest whole value, a Float or Double the value; refused (``FieldError``) if not
    finite or outside the type, never wrapped or saturated."""
    if isinstance(value, bool):
        value = float(value)
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise FieldError(f"input {name!r}: {value!r} is not a finite number")
    if variant == ua.VariantType.Boolean:
        if value not in (0.0, 1.0):
            raise FieldError(f"input {name!r} is a Boolean node: 0 or 1, not {value!r}")
        return bool(value)
    if variant in _INT_RANGE:
        whole = round(value)
        lo, hi = _INT_RANGE[variant]
        if not lo <= whole <= hi:
            raise FieldError(
                f"input {name!r}: {value!r} is outside its node's {variant.name} {lo}..{hi}"
            )
        return whole
    if variant == ua.VariantType.Float:
        if abs(value) > _FLOAT_MAX:
            raise FieldError(f"input {name!r}: {value!r} is too large for its node's Float")
        single: float = struct.unpack("<f", struct.pack("<f", value))[0]
        return single  # what the node will hold, so that a read-back matches it exactly
    return float(value)
