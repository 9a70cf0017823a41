"""A field stand-in that speaks Modbus TCP: a plant's outputs as registers, its inputs written.

Every tick (``tick_ms`` wall milliseconds) the plant is advanced to the clock's
time and each point's register (or bit) is rewritten with the encoded output;
whatever a client writes to an input's holding register or coil is decoded,
recorded in ``applied`` and applied to the plant at once.  The plant is anything
with the ``parallelcity.field.protocol.Plant`` interface, made at start by
``make_plant(t0)`` (the rig kind supplies the factory).

Modbus TCP has no security: the stand-in serves 127.0.0.1 by default and
refuses another host unless ``allow_insecure_lab()`` was called.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping, Sequence
from types import TracebackType

from parallelcity.aio import cancel_and_wait
from parallelcity.clock import Clock
from parallelcity.errors import SecurityError
from parallelcity.field.protocol import Plant, PlantFactory
from parallelcity.verify.rig import ReceivedWrite

from .codec import CodecError, ModbusAddress, Table, decode
from .server import HOST, ModbusFieldServer, RegisterMap

_log = logging.getLogger(__name__)

ADVANCE_WALL_S = 0.02
"""Wall time one catch-up of the plant may take (a slower plant falls behind, its points
go stale, rather than block the event loop)."""


class ModbusStandIn:
    """A running plant behind a Modbus TCP server; ``async with`` starts and stops it.

    ``points`` and ``inputs`` map model output / input names to their addresses;
    ``outputs`` (the model's ``point_signals``) and ``input_names`` are the orders of the
    plant's vectors.  ``endpoint`` and ``applied`` make it a ``FieldStandIn``.
    """

    def __init__(
        self,
        points: Mapping[str, ModbusAddress],
        inputs: Mapping[str, ModbusAddress],
        *,
        outputs: Sequence[str],
        input_names: Sequence[str],
        make_plant: PlantFactory,
        clock: Clock,
        tick_ms: float = 50.0,
        host: str = HOST,
        port: int = 0,
        insecure_lab: bool = False,
    ) -> None:
        if not tick_ms > 0:
            raise ValueError(f"tick_ms must be positive, got {tick_ms}")
        self.points = dict(points)
        self.inputs = dict(inputs)
        self._out_index = {name: list(outputs).index(name) for name in self.points}
        self._in_index = {name: list(input_names).index(name) for name in self.inputs}
        self._make_plant = make_plant
        self.clock = clock
        self.tick_ms = float(tick_ms)
        self.registers = RegisterMap()
        self.registers.on_write = self._on_write
        self._server = ModbusFieldServer(self.registers, host, port)
        self._insecure_lab = insecure_lab
        self._plant: Plant | None = None
        self._task: asyncio.Task[None] | None = None
        self._frozen: set[str] = set()
        self.applied: list[ReceivedWrite] = []
        self.ticks = 0
        self.tick_error: BaseException | None = None
        self.lag_warned = False

    # -- FieldStandIn / ServedStandIn --------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return self._server.endpoint

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def server(self) -> ModbusFieldServer:
        return self._server

    @property
    def plant(self) -> Plant:
        if self._plant is None:
            raise RuntimeError("the field stand-in is not running")
        return self._plant

    def listen_on(self, host: str, port: int) -> None:
        if self._server.running:
            raise RuntimeError("set the address before starting the stand-in")
        self._server.host, self._server.port = host, port

    def allow_insecure_lab(self) -> None:
        self._insecure_lab = True

    # -- fault injection for tests -------------------------------------------------------------

    def freeze(self, point: str) -> None:
        """Stop updating ``point``: its register keeps its last value (and keeps answering)."""
        self._frozen.add(self._known(point))

    def fail(self, point: str) -> None:
        """Answer reads of ``point`` with a device-failure exception from now on."""
        self.registers.fail(self.points[self._known(point)])

    def silence(self, unit: int) -> None:
        """Unit ``unit`` stops answering at all (requests time out), as a device gone."""
        self.registers.silent_units.add(unit)

    def restore(self, point: str | None = None, unit: int | None = None) -> None:
        if point is not None:
            self._frozen.discard(point)
            self.registers.heal(self.points[self._known(point)])
        if unit is not None:
            self.registers.silent_units.discard(unit)

    async def outage(self, down_s: float) -> None:
        """Drop every connection and stop listening for ``down_s`` wall seconds."""
        await self._server.outage(down_s)

    def _known(self, point: str) -> str:
        if point not in self.points:
            raise KeyError(f"{point!r} is not a point of the scenario")
        return point

    # -- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> ModbusStandIn:
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
        if self._plant is not None:
            raise RuntimeError("the field stand-in is already running")
        loopback = self._server.host in ("127.0.0.1", "::1", "localhost")
        if not loopback and not self._insecure_lab:
            raise SecurityError(
                f"Modbus TCP has no authentication: the stand-in serves {self._server.host} "
                "only in an insecure lab run ([security] insecure_lab = true or --insecure-lab)"
            )
        plant = self._make_plant(self.clock.now())
        self._plant = plant
        y = plant.outputs()
        u = plant.input_vector
        for name, addr in self.points.items():
            self.registers.define(addr, float(y[self._out_index[name]]))
        for name, addr in self.inputs.items():
            self.registers.define(addr, float(u[self._in_index[name]]))
        try:
            await self._server.start()
        except BaseException:
            self._plant = None
            raise
        if not loopback:
            _log.warning(
                "INSECURE LAB MODE: the Modbus stand-in serves %s: anyone who reaches the "
                "port can write its inputs",
                self.endpoint,
            )
        self._task = asyncio.create_task(self._run(), name=f"modbus field {self.endpoint}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
        await self._server.stop()
        self._plant = None

    # -- the plant loop ------------------------------------------------------------------------

    async def _run(self) -> None:
        period = self.tick_ms / 1000.0
        next_tick = time.monotonic()
        try:
            while True:
                self.tick()
                next_tick += period
                delay = next_tick - time.monotonic()
                if delay < 0:
                    next_tick = time.monotonic()
                    delay = 0.0
                await asyncio.sleep(delay)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.tick_error = exc
            _log.exception("the Modbus stand-in's plant loop failed; points will go stale")

    def tick(self) -> None:
        """Advance the plant to now and rewrite every live point's registers."""
        plant = self.plant
        self._advance(self.clock.now())
        y = plant.outputs()
        for name, addr in self.points.items():
            if name in self._frozen:
                continue
            try:
                self.registers.put(addr, float(y[self._out_index[name]]))
            except CodecError as exc:  # an output its register cannot hold: leave it stale
                _log.debug("point %s not updated: %s", name, exc)
        self.ticks += 1

    def _advance(self, t: float) -> None:
        plant = self.plant
        stop = time.perf_counter() + ADVANCE_WALL_S
        chunk = 16 * plant.max_step_s
        while t - plant.t > 1e-9 and time.perf_counter() < stop:
            plant.advance(min(t, plant.t + chunk))
        if t - plant.t > 1e-9 and not self.lag_warned:
            self.lag_warned = True
            _log.warning(
                "the field plant lags the clock by %.0f s (simulated); its points will go stale",
                t - plant.t,
            )

    def _on_write(self, unit: int, table: Table, start: int, words: list[int]) -> None:
        """Apply every input a client's write covered completely."""
        plant = self._plant
        if plant is None:
            return
        end = start + len(words)
        for name, addr in self.inputs.items():
            if addr.unit != unit or addr.table != table:
                continue
            if not (start <= addr.address and addr.address + addr.words <= end):
                continue
            value = float(decode(addr, self.registers.words(addr)))
            if not math.isfinite(value):
                continue
            now = self.clock.now()
            self.applied.append(ReceivedWrite(now, name, value))
            try:
                self._advance(now)  # the old input acted until now; the new one from now on
                plant.set_input(name, value)
            except (ValueError, FloatingPointError) as exc:
                _log.error("applying %s = %r to the plant failed: %s", name, value, exc)
