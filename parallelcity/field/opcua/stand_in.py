"""The OPC UA field stand-in: a plant served by an asyncua server on 127.0.0.1.

One variable per scenario point (the plant's outputs, written every tick with
the simulated time as source and server timestamp) and one writable Double
variable per scenario input.  Whatever a client writes to an input node is
recorded in ``applied`` (through a server-side PostWrite callback, so no write
is missed) and applied to the plant at once.

Security: with ``use_opcua_security(ServerSecurity)`` the server offers only
SignAndEncrypt endpoints (Basic256Sha256, Aes256_Sha256_RsaPss) with a client
trust list and user tokens (``parallelcity.field.opcua.session.configure_server``).  Without
it the stand-in offers ``NoSecurity`` (and logs ``INSECURE LAB MODE``), and starts only
if the scenario says ``insecure_lab = true`` or ``allow_insecure_lab()`` was called.

The plant is anything with the ``parallelcity.field.protocol.Plant`` interface, made at
start by ``make_plant(t0)`` (the rig kind supplies the factory: the simulated rig's
``PlantSimulator``).  ``parallelcity field`` (``parallelcity.field.serve``) serves it on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import errno
import logging
import math
import socket
import time
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

from asyncua import ua
from asyncua.common.callback import CallbackType, ServerItemCallback
from asyncua.server.server import Server
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.status_codes import StatusCodes

from parallelcity.aio import cancel_and_wait
from parallelcity.clock import Clock
from parallelcity.errors import FieldConnectionError, SecurityError
from parallelcity.field.opcua.config import as_opcua
from parallelcity.field.opcua.session import ServerSecurity, configure_server, parse_node_id
from parallelcity.field.protocol import Plant, PlantFactory
from parallelcity.twin.model import Array
from parallelcity.verify.rig import ReceivedWrite

if TYPE_CHECKING:
    from parallelcity.scenario.definition import Scenario

_log = logging.getLogger(__name__)

HOST = "127.0.0.1"
PORT_ATTEMPTS = 8
FOLDER_CHUNK = 256  # nodes without a '/' path are grouped this many per folder
YIELD_EVERY = 64  # point writes between two yields to the event loop
ADVANCE_WALL_S = 0.02
"""Wall time one catch-up of the plant may take: a plant slower than the clock's speed
falls behind (its points go stale) instead of blocking the event loop for good."""


class _Mode:
    LIVE = "live"
    FROZEN = "frozen"
    BAD = "bad"


@dataclass(frozen=True)
class _Var:
    name: str  # model signal
    node: str  # scenario NodeId string
    nodeid: ua.NodeId
    index: int  # position in the model's point signals / inputs


def free_port(host: str = HOST) -> int:
    """A TCP port nobody listens on right now (it may be taken again before we bind it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


async def stop_server(server: Server) -> int:
    """``server.stop()``, also closing connections accepted while it stops; how many it closed.

    asyncua closes the connections open when ``stop()`` begins and then waits for every
    connection to end, so a client reconnecting in between (a mirror's backoff on a
    loaded machine) would keep ``stop()`` waiting for as long as its session lives.
    """
    stopping = asyncio.ensure_future(server.stop())
    late = 0
    while not stopping.done():
        await asyncio.wait({stopping}, timeout=0.1)
        if not stopping.done():
            for transport in list(server.iserver.asyncio_transports):
                if not transport.is_closing():
                    transport.close()
                    late += 1
    await stopping
    return late


def _folder_key(nodeid: ua.NodeId, position: int) -> tuple[str, ...]:
    ident = nodeid.Identifier
    if isinstance(ident, str) and "/" in ident:
        return tuple(ident.split("/")[:-1])
    return (f"nodes_{position // FOLDER_CHUNK}",)


def _browse_name(nodeid: ua.NodeId) -> str:
    ident = nodeid.Identifier
    return ident.rsplit("/", 1)[-1] if isinstance(ident, str) else str(ident)


class EmbeddedField:
    """A running plant behind an OPC UA server; ``async with`` starts and stops it.

    ``endpoint``, ``applied`` satisfy ``parallelcity.field.protocol.FieldStandIn``; ``trace``
    holds the plant's true outputs each tick, ``plant`` the plant ``make_plant`` made.
    """

    def __init__(
        self,
        scenario: Scenario,
        clock: Clock,
        *,
        make_plant: PlantFactory,
        tick_ms: float = 50.0,
        host: str = HOST,
        port: int = 0,
        security: ServerSecurity | None = None,
    ) -> None:
        if not tick_ms > 0:
            raise ValueError(f"tick_ms must be positive, got {tick_ms}")
        self.scenario = scenario
        self.field = as_opcua(scenario.field)
        self.model = scenario.model
        self.clock = clock
        self.tick_ms = float(tick_ms)
        self.host = host
        self.port = port  # 0: a free port
        self._insecure_lab = scenario.insecure_lab
        self._make_plant = make_plant
        self._plant: Plant | None = None
        self._server: Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._endpoint = ""
        self._points: dict[str, _Var] = {}
        self._inputs: dict[str, _Var] = {}
        self._inputs_by_id: dict[ua.NodeId, _Var] = {}
        self._mode: dict[str, str] = {}
        self.applied: list[ReceivedWrite] = []
        self.trace: list[tuple[float, Array]] = []
        self.ticks = 0
        self.tick_error: BaseException | None = None
        self.lag_warned = False
        self._security = security
        self.security_description = ""

    def use_opcua_security(self, security: ServerSecurity) -> None:
        """Serve SignAndEncrypt endpoints only, with these certificates and users."""
        if self._server is not None:
            raise RuntimeError("set the security before starting the stand-in")
        self._security = security

    def listen_on(self, host: str, port: int) -> None:
        """Serve on ``host:port`` (port 0: a free one) instead of a free loopback port."""
        if self._server is not None:
            raise RuntimeError("set the address before starting the stand-in")
        self.host, self.port = host, port

    def allow_insecure_lab(self) -> None:
        """Serve without security although the scenario does not say ``insecure_lab``."""
        if self._server is not None:
            raise RuntimeError("choose the security before starting the stand-in")
        self._insecure_lab = True

    # -- FieldStandIn ----------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        if not self._endpoint:
            raise RuntimeError("the field stand-in is not running")
        return self._endpoint

    @property
    def plant(self) -> Plant:
        if self._plant is None:
            raise RuntimeError("the field stand-in is not running")
        return self._plant

    @property
    def server(self) -> Server:
        if self._server is None:
            raise RuntimeError("the field stand-in is not running")
        return self._server

    def nodeid(self, name: str) -> ua.NodeId:
        """The server NodeId of a point or input, by model signal name."""
        var = self._points.get(name) or self._inputs.get(name)
        if var is None:
            raise KeyError(f"{name!r} is neither a point nor an input of the scenario")
        return var.nodeid

    # -- fault injection for tests -------------------------------------------------------------

    def freeze(self, point: str) -> None:
        """Stop updating ``point``: it keeps its last value and source timestamp."""
        self._mode[self._point(point).name] = _Mode.FROZEN

    def set_bad(self, point: str) -> None:
        """Report ``point`` as BadSensorFailure (fresh timestamps, no value) from now on."""
        self._mode[self._point(point).name] = _Mode.BAD

    def restore(self, point: str) -> None:
        """Resume normal updates of ``point``."""
        self._mode[self._point(point).name] = _Mode.LIVE

    async def outage(self, down_s: float) -> None:
        """Drop every OPC UA connection and stop listening for ``down_s`` wall seconds.

        The plant keeps running; the same endpoint comes back afterwards, as after
        a network outage or a restart of the server's OPC UA stack.
        """
        server = self.server
        await stop_server(server)
        await asyncio.sleep(down_s)
        await server.start()

    def _point(self, name: str) -> _Var:
        try:
            return self._points[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a point of the scenario") from None

    # -- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> EmbeddedField:
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
        if self._server is not None:
            raise RuntimeError("the field stand-in is already running")
        if self._security is None and not self._insecure_lab:
            raise SecurityError(
                f"scenario {self.scenario.meta.name!r}: the field stand-in has no OPC UA "
                "certificates (use_opcua_security) and the scenario does not allow a lab run "
                "without them ([security] insecure_lab = true)"
            )
        if self._security is None:
            _log.warning(
                "INSECURE LAB MODE: the field stand-in of %r serves OPC UA without encryption "
                "or authentication: anyone who reaches the port can write its inputs",
                self.scenario.meta.name,
            )
        server = Server()
        await server.init()
        server.disable_clock()  # its 1 s wall-clock loop only slows down stop()
        server.set_server_name(f"parallelcity field stand-in ({self.scenario.meta.name})")
        self._server = server
        try:
            self.security_description = await configure_server(server, self._security)
            ns = await server.register_namespace(self.field.namespace)
            self._plant = self._make_plant(self.clock.now())
            await self._build_address_space(server, ns)
            server.subscribe_server_callback(CallbackType.PostWrite, self._on_post_write)
            await self._listen(server)
            self._task = asyncio.create_task(self._run(), name=f"field-plant {self._endpoint}")
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
        server, self._server = self._server, None
        if server is not None:
            with contextlib.suppress(Exception):
                server.unsubscribe_server_callback(CallbackType.PostWrite, self._on_post_write)
            try:
                await stop_server(server)
            except Exception as exc:  # a half-started server may fail to stop; nothing to keep
                _log.debug("stopping the stand-in server raised %r", exc)

    async def _listen(self, server: Server) -> None:
        last: OSError | None = None
        for _ in range(PORT_ATTEMPTS if self.port == 0 else 1):
            port = self.port or free_port(self.host)
            endpoint = f"opc.tcp://{self.host}:{port}"
            server.set_endpoint(endpoint)
            try:
                await server.start()
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or self.port:
                    raise FieldConnectionError(
                        f"the field stand-in cannot listen on {endpoint}: {exc}"
                    ) from exc
                last = exc  # someone took the port between our probe and the bind
                continue
            self._endpoint = endpoint
            _log.info("field stand-in listening on %s (%s)", endpoint, self.security_description)
            return
        raise FieldConnectionError(
            f"the field stand-in found no free port on {self.host} after {PORT_ATTEMPTS} tries"
        ) from last

    async def _build_address_space(self, server: Server, ns: int) -> None:
        model = self.model
        field = self.field
        plant = self.plant
        y = plant.outputs()
        now = self._timestamp(plant.t)
        objects = server.nodes.objects
        folders: dict[tuple[str, ...], Any] = {}

        async def folder_for(key: tuple[str, ...]) -> Any:
            if key in folders:
                return folders[key]
            parent = objects if len(key) == 1 else await folder_for(key[:-1])
            node = await parent.add_folder(
                ua.NodeId(ua.String("folder:" + "/".join(key)), ua.Int16(ns)),
                ua.QualifiedName(key[-1], ns),
            )
            folders[key] = node
            return node

        for k, p in enumerate(field.points):
            nodeid = parse_node_id(p.node, ns)
            var = _Var(p.name, p.node, nodeid, model.index("point_signals", p.name))
            parent = await folder_for(_folder_key(nodeid, k))
            node = await parent.add_variable(
                nodeid, ua.QualifiedName(_browse_name(nodeid), ns), 0.0, ua.VariantType.Double
            )
            await server.write_attribute_value(node.nodeid, self._good(y[var.index], now))
            self._points[p.name] = var
            self._mode[p.name] = _Mode.LIVE
        u = plant.input_vector
        for k, i in enumerate(field.inputs):
            nodeid = parse_node_id(i.node, ns)
            var = _Var(i.name, i.node, nodeid, model.index("inputs", i.name))
            parent = await folder_for(_folder_key(nodeid, len(field.points) + k))
            node = await parent.add_variable(
                nodeid,
                ua.QualifiedName(_browse_name(nodeid), ns),
                float(u[var.index]),
                ua.VariantType.Double,
            )
            await node.set_writable()
            self._inputs[i.name] = var
            self._inputs_by_id[nodeid] = var

    # -- the plant loop ------------------------------------------------------------------------

    @staticmethod
    def _timestamp(t: float) -> ua.DateTime:
        return ua.DateTime.fromtimestamp(t, dt.UTC)

    @staticmethod
    def _good(value: float, when: ua.DateTime) -> ua.DataValue:
        return ua.DataValue(
            Value=ua.Variant(float(value), ua.VariantType.Double),
            StatusCode=ua.StatusCode(ua.UInt32(StatusCodes.Good)),
            SourceTimestamp=when,
            ServerTimestamp=when,
        )

    @staticmethod
    def _bad(when: ua.DateTime) -> ua.DataValue:
        return ua.DataValue(
            Value=ua.Variant(None, ua.VariantType.Null),
            StatusCode=ua.StatusCode(ua.UInt32(StatusCodes.BadSensorFailure)),
            SourceTimestamp=when,
            ServerTimestamp=when,
        )

    async def _run(self) -> None:
        period = self.tick_ms / 1000.0
        next_tick = time.monotonic()
        try:
            while True:
                await self.tick()
                next_tick += period
                delay = next_tick - time.monotonic()
                if delay < 0:  # fell behind: do not try to catch up with a burst of ticks
                    next_tick = time.monotonic()
                    delay = 0.0
                await asyncio.sleep(delay)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.tick_error = exc
            _log.exception("the field stand-in's plant loop failed; points will go stale")

    async def tick(self) -> None:
        """Apply the input nodes, advance the plant to now, publish every live point."""
        server = self.server
        plant = self.plant
        for var in self._inputs.values():
            dv = server.read_attribute_value(var.nodeid)
            raw = dv.Value.Value if dv.Value is not None else None
            if isinstance(raw, int | float) and math.isfinite(raw):
                current = plant.input_vector[var.index]
                if raw != current:
                    plant.set_input(var.name, float(raw))
        self._advance(self.clock.now())
        y = plant.outputs()
        self.trace.append((plant.t, y))
        when = self._timestamp(plant.t)
        for k, var in enumerate(self._points.values()):
            mode = self._mode[var.name]
            if mode == _Mode.LIVE:
                await server.write_attribute_value(var.nodeid, self._good(y[var.index], when))
            elif mode == _Mode.BAD:
                await server.write_attribute_value(var.nodeid, self._bad(when))
            if k % YIELD_EVERY == YIELD_EVERY - 1:
                await asyncio.sleep(0)
        self.ticks += 1

    def _advance(self, t: float) -> None:
        """Advance the plant towards ``t`` for at most ``ADVANCE_WALL_S`` of wall time.

        Each catch-up costs wall time in proportion to the simulated time it covers; at a
        speed the machine cannot simulate, an unbounded one grows with every call and
        starves the event loop (servers, gateway, cycles) for good.
        """
        plant = self.plant
        stop = time.perf_counter() + ADVANCE_WALL_S
        chunk = 16 * plant.max_step_s
        while t - plant.t > 1e-9 and time.perf_counter() < stop:
            plant.advance(min(t, plant.t + chunk))
        if t - plant.t > 1e-9 and not self.lag_warned:
            self.lag_warned = True
            _log.warning(
                "the field plant cannot keep up with the clock's speed %g: it lags by %.0f s "
                "(simulated) and its points will go stale; choose a lower speed",
                self.clock.speed,
                t - plant.t,
            )

    def _on_post_write(self, event: ServerItemCallback, dispatcher: Any) -> None:
        """Record (and apply at once) every successful client write to an input node."""
        request = event.request_params
        results = event.response_params or []
        plant = self._plant
        if plant is None:
            return
        for k, wv in enumerate(request.NodesToWrite):
            var = self._inputs_by_id.get(wv.NodeId)
            if var is None or wv.AttributeId != AttributeIds.Value:
                continue
            if k < len(results) and not results[k].is_good():
                continue
            raw = wv.Value.Value.Value if wv.Value is not None and wv.Value.Value else None
            if not isinstance(raw, int | float) or not math.isfinite(raw):
                continue
            now = self.clock.now()
            self.applied.append(ReceivedWrite(now, var.name, float(raw)))
            try:
                self._advance(now)  # the old input acted until now; the new one from now on
                plant.set_input(var.name, float(raw))
            except (ValueError, FloatingPointError) as exc:  # the tick loop will stop on it too
                _log.error("applying %s = %r to the plant failed: %s", var.name, raw, exc)
