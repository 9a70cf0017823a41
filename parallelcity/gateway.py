"""The field gateway: the last check before setpoints reach field equipment.

Two halves:

* ``GatewayCore`` is the pure decision: given a ``Command`` and the time, it
  accepts, refuses (with a ``RefusalCode`` and a human reason) or recognises a
  duplicate.  Its state (last sequence number per issuer, ids already applied,
  last applied value per input) lives in a ``GatewayState`` value so a durable
  store can persist and restore it later without touching the rules.
* ``FieldGateway`` is the I/O shell: a ZeroMQ ROUTER socket that decodes
  commands, asks the core, writes accepted setpoints through a
  ``SetpointWriter`` (``OpcUaWriter`` in production) and answers every message
  with an ``Ack`` - including bytes it cannot read.

The rules, in order, are documented in ``docs/wire-protocol.md``.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import Counter, OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import TracebackType
from typing import Any, Protocol

import zmq
import zmq.asyncio
from asyncua import ua
from asyncua.client.client import Client
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.uaerrors import UaError

from .clock import Clock
from .errors import (
    DispatchError,
    FieldConnectionError,
    NodeMappingError,
    ParallelCityError,
    SecurityError,
    WireFormatError,
)
from .scenario import FieldConfig, Scenario
from .specs import TOLERANCE, InputLimit, SafetySpecs
from .wire import (
    Ack,
    AckStatus,
    Command,
    RefusalCode,
    decode_command,
    recover_id,
    truncate_detail,
)

log = logging.getLogger("parallelcity.gateway")

MAX_REMEMBERED_IDS = 65_536
"""Applied ids kept for duplicate detection; older ones are still refused by sequence."""
TRANSPORT_MAX_MESSAGE_BYTES = 1024 * 1024
"""ZeroMQ drops peers sending more than this; smaller oversized messages get a refusal."""


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
    """Everything the core remembers; plain values so it can be persisted later."""

    last_seq: dict[str, int] = field(default_factory=dict)
    """Highest applied ``seq`` per issuer."""
    applied_ids: OrderedDict[str, float] = field(default_factory=OrderedDict)
    """Applied command id -> gateway time it was applied, oldest first."""
    last_applied: dict[str, AppliedInput] = field(default_factory=dict)
    """Per input."""


class GatewayCore:
    """The gateway's rules, with no I/O: ``decide`` then, after a good write, ``record_applied``.

    ``clock_skew_s`` (simulated seconds) is how far the issuer's clock may
    disagree with the gateway's: a command still counts as valid that long
    after ``valid_until``, and an ``issued_at`` further ahead than that does
    not buy a larger rate-limit allowance.
    """

    def __init__(
        self,
        limits: Mapping[str, InputLimit],
        *,
        clock_skew_s: float = 5.0,
        state: GatewayState | None = None,
        max_remembered_ids: int = MAX_REMEMBERED_IDS,
    ) -> None:
        if not (math.isfinite(clock_skew_s) and clock_skew_s >= 0):
            raise ValueError(f"clock_skew_s must be finite and >= 0, got {clock_skew_s}")
        if max_remembered_ids < 1:
            raise ValueError(f"max_remembered_ids must be >= 1, got {max_remembered_ids}")
        self.limits: Mapping[str, InputLimit] = dict(limits)
        self.clock_skew_s = clock_skew_s
        self.state = state if state is not None else GatewayState()
        self._max_ids = max_remembered_ids

    def decide(self, cmd: Command, now: float) -> Decision:
        """Accept, refuse, or recognise a duplicate; does not change any state."""
        st = self.state
        # 1. sequence: a repeated id is a duplicate; otherwise seq must move forward.
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
        # 2. expiry.
        if now > cmd.valid_until + self.clock_skew_s:
            return Decision.refuse(
                RefusalCode.EXPIRED,
                f"valid until {cmd.valid_until:.3f}, gateway time is {now:.3f} "
                f"({now - cmd.valid_until:.3f} s late, skew allowance {self.clock_skew_s:g} s)",
            )
        # 3. every input known.
        unknown = sorted(n for n in cmd.setpoints if n not in self.limits)
        if unknown:
            return Decision.refuse(
                RefusalCode.UNKNOWN_INPUT,
                f"unknown input(s) {', '.join(map(repr, unknown))}; this gateway drives "
                f"{', '.join(sorted(self.limits))}",
            )
        # 4. bounds.
        problems = []
        for name, value in cmd.setpoints.items():
            lim = self.limits[name]
            if value < lim.min - TOLERANCE or value > lim.max + TOLERANCE:
                problems.append(f"{name} = {value:.6g} outside [{lim.min:g}, {lim.max:g}]")
        if problems:
            return Decision.refuse(RefusalCode.OUT_OF_BOUNDS, "; ".join(problems))
        # 5. rate limits against the last applied value of each input.
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
        st = self.state
        when = cmd.issued_at if applied_at is None else applied_at
        st.applied_ids[cmd.id] = when
        st.applied_ids.move_to_end(cmd.id)
        while len(st.applied_ids) > self._max_ids:
            st.applied_ids.popitem(last=False)
        st.last_seq[cmd.issuer] = max(cmd.seq, st.last_seq.get(cmd.issuer, cmd.seq))
        for name, value in cmd.setpoints.items():
            st.last_applied[name] = AppliedInput(value, cmd.issued_at)


# =========================================================================== writers


class SetpointWriter(Protocol):
    """Where accepted setpoints go. Raise a ``FieldError`` when they could not be written."""

    async def write(self, setpoints: Mapping[str, float]) -> None: ...


class OpcUaWriter:
    """Writes setpoints to the scenario's input nodes on an OPC UA server.

    ``async with`` connects, resolves the field namespace and checks that every
    input node exists and is a variable (``NodeMappingError`` naming each one
    that is not); ``write`` writes all values as Doubles in one request.
    Security: none yet - the endpoint must be a lab endpoint (see FieldGateway).
    """

    def __init__(self, endpoint: str, field: FieldConfig, *, timeout_s: float = 4.0) -> None:
        self.endpoint = endpoint
        self.field = field
        self.timeout_s = timeout_s
        self._client: Client | None = None
        self._nodes: dict[str, Any] = {}
        self._node_ids: dict[str, str] = {m.name: m.node for m in field.inputs}

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

    async def connect(self) -> None:
        client = Client(self.endpoint, timeout=self.timeout_s)
        try:
            async with asyncio.timeout(self.timeout_s * 2):
                await client.connect()
        except (OSError, TimeoutError, UaError) as exc:
            raise FieldConnectionError(
                f"cannot connect to OPC UA endpoint {self.endpoint}: {exc or type(exc).__name__}"
            ) from exc
        self._client = client
        try:
            await self._resolve(client)
        except BaseException:
            await self.aclose()
            raise

    async def _resolve(self, client: Client) -> None:
        uri = self.field.namespace
        try:
            namespaces = await client.get_namespace_array()
        except (OSError, TimeoutError, UaError) as exc:
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
                parsed = ua.NodeId.from_string(text)
            except UaError as exc:
                problems.append(f"input {name!r}: NodeId {text!r} does not parse ({exc})")
                continue
            nodes[name] = client.get_node(
                ua.NodeId(parsed.Identifier, ua.Int16(ns), parsed.NodeIdType)
            )
        if nodes:
            try:
                results = await client.read_attributes(list(nodes.values()), AttributeIds.NodeClass)
            except (OSError, TimeoutError, UaError) as exc:
                raise FieldConnectionError(
                    f"cannot read the input nodes on {self.endpoint}: {exc}"
                ) from exc
            for (name, _node), dv in zip(nodes.items(), results, strict=True):
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
        if problems:
            raise NodeMappingError(
                f"{self.endpoint}: {len(problems)} input node(s) cannot be used:\n"
                + "\n".join(f"  - {p}" for p in problems)
            )
        self._nodes = nodes

    async def write(self, setpoints: Mapping[str, float]) -> None:
        client = self._client
        if client is None:
            raise FieldConnectionError(f"not connected to {self.endpoint}")
        unmapped = sorted(n for n in setpoints if n not in self._nodes)
        if unmapped:
            raise NodeMappingError(f"no field node for input(s) {', '.join(map(repr, unmapped))}")
        names = list(setpoints)
        values = [
            ua.DataValue(ua.Variant(float(setpoints[n]), ua.VariantType.Double)) for n in names
        ]
        try:
            statuses = await client.write_values(
                [self._nodes[n] for n in names], values, raise_on_partial_error=False
            )
        except (OSError, TimeoutError, ConnectionError, UaError) as exc:
            raise FieldConnectionError(
                f"writing {len(names)} setpoint(s) to {self.endpoint} failed: "
                f"{exc or type(exc).__name__}"
            ) from exc
        failed = [
            f"{n} ({s.name})" for n, s in zip(names, statuses, strict=True) if not s.is_good()
        ]
        if failed:
            raise FieldConnectionError(f"{self.endpoint} refused the write of {', '.join(failed)}")

    async def aclose(self) -> None:
        client, self._client = self._client, None
        self._nodes = {}
        if client is not None:
            try:
                await client.disconnect()
            except Exception as exc:  # closing must not mask the reason we are closing
                log.debug("OPC UA disconnect from %s failed: %s", self.endpoint, exc)


# =========================================================================== I/O shell


@dataclass
class GatewayCounters:
    received: int = 0
    applied: int = 0
    duplicates: int = 0
    refused: Counter[RefusalCode] = field(default_factory=Counter)

    @property
    def malformed(self) -> int:
        return self.refused[RefusalCode.MALFORMED]

    @property
    def refused_total(self) -> int:
        return sum(self.refused.values())


class FieldGateway:
    """Serves commands on a ZeroMQ ROUTER socket until cancelled.

    ``async with`` (or ``start()``) binds; ``endpoint`` is then the address
    actually bound (``zmq.LAST_ENDPOINT``, useful with port 0); ``serve()``
    handles one message at a time, forever; ``aclose()`` closes the socket.
    """

    def __init__(
        self,
        core: GatewayCore,
        writer: SetpointWriter,
        clock: Clock,
        *,
        bind: str,
        insecure_lab: bool,
        write_timeout_s: float = 5.0,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        if not insecure_lab:
            raise SecurityError(
                "CURVE is not available yet: the field gateway cannot authenticate or "
                "encrypt its ZeroMQ traffic; set insecure_lab = true in [security] for a "
                "lab run"
            )
        self.core = core
        self.writer = writer
        self.clock = clock
        self.bind = bind
        self.insecure_lab = insecure_lab
        self.write_timeout_s = write_timeout_s
        self.counters = GatewayCounters()
        self._ctx = context if context is not None else zmq.asyncio.Context.instance()
        self._sock: zmq.asyncio.Socket | None = None
        self._endpoint = ""

    @property
    def endpoint(self) -> str:
        """The endpoint actually bound (after ``start``)."""
        if not self._endpoint:
            raise RuntimeError("the gateway is not bound yet: use `async with` or start()")
        return self._endpoint

    async def __aenter__(self) -> FieldGateway:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def start(self) -> None:
        if self._sock is not None:
            return
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, TRANSPORT_MAX_MESSAGE_BYTES)
        try:
            sock.bind(self.bind)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise DispatchError(f"cannot bind the field gateway to {self.bind}: {exc}") from exc
        self._sock = sock
        raw = sock.getsockopt(zmq.LAST_ENDPOINT)
        self._endpoint = raw.decode() if isinstance(raw, bytes) else str(raw)
        log.warning(
            "INSECURE LAB MODE: field gateway on %s accepts commands WITHOUT authentication "
            "or encryption (no CURVE); anyone who can reach this address can move field "
            "equipment within the safety limits. Never run this way outside a lab.",
            self._endpoint,
        )

    async def aclose(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close(linger=0)

    async def serve(self) -> None:
        """Answer commands until cancelled."""
        self.start()
        while True:
            sock = self._sock
            if sock is None:
                raise RuntimeError("the gateway socket was closed")
            frames = await sock.recv_multipart()
            identity, body = frames[0], frames[1:]
            try:
                ack = await self.handle(body)
            except Exception:  # a bug here must not stop the field gateway
                log.exception("gateway: unexpected error handling a message; not answered")
                continue
            try:
                await sock.send_multipart([identity, ack.encode()])
            except zmq.ZMQError as exc:
                log.warning("gateway: could not send ack %s: %s", ack.id, exc)

    async def handle(self, frames: list[bytes]) -> Ack:
        """One received message (its frames after the routing identity) -> the ack to send."""
        c = self.counters
        c.received += 1
        if len(frames) != 1:
            data = frames[-1] if frames else b""
            return self._malformed(data, f"expected exactly one frame, got {len(frames)}")
        data = frames[0]
        try:
            cmd = decode_command(data)
        except WireFormatError as exc:
            return self._malformed(data, str(exc))
        decision = self.core.decide(cmd, self.clock.now())
        if decision.outcome is Outcome.DUPLICATE:
            c.duplicates += 1
            log.info("gateway: %s (seq %d) is a duplicate; not written again", cmd.id, cmd.seq)
            return self._ack(
                cmd, AckStatus.DUPLICATE, applied_at=decision.applied_at, detail=decision.detail
            )
        if decision.outcome is Outcome.REFUSE:
            assert decision.code is not None
            return self._refuse(cmd.id, cmd.seq, decision.code, decision.detail)
        try:
            async with asyncio.timeout(self.write_timeout_s):
                await self.writer.write(cmd.setpoints)
        except TimeoutError:
            return self._refuse(
                cmd.id,
                cmd.seq,
                RefusalCode.WRITE_FAILED,
                f"the field write did not finish within {self.write_timeout_s:g} s "
                "(it may have partly landed)",
            )
        except ParallelCityError as exc:
            return self._refuse(cmd.id, cmd.seq, RefusalCode.WRITE_FAILED, str(exc))
        except Exception as exc:
            log.exception("gateway: the setpoint writer raised unexpectedly")
            return self._refuse(
                cmd.id, cmd.seq, RefusalCode.WRITE_FAILED, f"{type(exc).__name__}: {exc}"
            )
        applied_at = self.clock.now()
        self.core.record_applied(cmd, applied_at)
        c.applied += 1
        log.info(
            "gateway: applied %s (issuer %s, seq %d): %s",
            cmd.id,
            cmd.issuer,
            cmd.seq,
            ", ".join(f"{k}={v:.6g}" for k, v in cmd.setpoints.items()),
        )
        return self._ack(cmd, AckStatus.APPLIED, applied_at=applied_at)

    def _ack(
        self, cmd: Command, status: AckStatus, *, applied_at: float | None, detail: str = ""
    ) -> Ack:
        return Ack(cmd.id, cmd.seq, status, None, detail, applied_at, self.insecure_lab)

    def _refuse(self, msg_id: str, seq: int, code: RefusalCode, detail: str) -> Ack:
        self.counters.refused[code] += 1
        log.warning("gateway: refused %s (seq %d): %s: %s", msg_id, seq, code.value, detail)
        return Ack(
            msg_id, seq, AckStatus.REFUSED, code, truncate_detail(detail), None, self.insecure_lab
        )

    def _malformed(self, data: bytes, reason: str) -> Ack:
        msg_id, seq = recover_id(data)
        return self._refuse(msg_id, seq, RefusalCode.MALFORMED, reason)


async def serve_gateway(
    scenario: Scenario, *, bind: str, opcua_endpoint: str, clock: Clock
) -> None:
    """Run a field gateway for ``scenario`` until cancelled.

    Limits come from the scenario's safety specs (the same ones the controller
    and verifier use); setpoints go to ``opcua_endpoint`` through the
    scenario's input NodeIds.
    """
    core = GatewayCore(SafetySpecs.from_scenario(scenario).limits)
    writer = OpcUaWriter(opcua_endpoint, scenario.field)
    # Built first: refuses to run without security before touching the field.
    gateway = FieldGateway(core, writer, clock, bind=bind, insecure_lab=scenario.insecure_lab)
    async with writer, gateway:
        log.info("gateway: serving %s on %s", scenario.meta.name, gateway.endpoint)
        await gateway.serve()
