"""A Modbus TCP server over a register map (pymodbus' server, our datastore).

``RegisterMap`` holds the four tables of each unit: only the addresses defined
in it exist, every other one answers "illegal address", as a real device does.
Writes by clients go to ``on_write`` (the field stand-in applies them to its
plant).  For tests it can make a unit stop answering (no response at all, as a
device gone from a gateway) or make addresses answer with a device failure.

``ModbusFieldServer`` serves a map on ``host:port`` (port 0: a free one) and can
drop every connection and stop listening for a while (``outage``), as a PLC
restart would.  Modbus TCP has no authentication or encryption: whoever reaches
the port can write; the stand-in listens on 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

from pymodbus.constants import ExcCodes
from pymodbus.exceptions import NoSuchIdException
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import SimData, SimDevice

from parallelcity.errors import FieldConnectionError

from .codec import BIT_TABLES, ModbusAddress, Table, encode
from .link import endpoint_of

_log = logging.getLogger(__name__)

HOST = "127.0.0.1"

# function code -> (table, writes)
_FUNCTIONS: dict[int, tuple[Table, bool]] = {
    1: ("coil", False),
    2: ("discrete", False),
    3: ("holding", False),
    4: ("input", False),
    5: ("coil", True),
    6: ("holding", True),
    15: ("coil", True),
    16: ("holding", True),
}

WriteListener = Callable[[int, Table, int, list[int]], None]
"""``on_write(unit, table, start, values)`` after a client wrote (bits as 0/1)."""


class RegisterMap:
    """The tables of each unit: address -> 16-bit word (registers) or 0/1 (bits)."""

    def __init__(self) -> None:
        self._tables: dict[tuple[int, Table], dict[int, int]] = {}
        self.silent_units: set[int] = set()  # units that do not answer at all
        self.failing: set[tuple[int, Table, int]] = set()  # addresses answering device failure
        self.on_write: WriteListener | None = None
        self.requests = 0

    def define(self, address: ModbusAddress, value: float = 0.0) -> None:
        """Create the registers (or bit) of ``address`` holding ``value``."""
        self.put(address, value)

    def put(self, address: ModbusAddress, value: float) -> None:
        table = self._tables.setdefault((address.unit, address.table), {})
        for k, word in enumerate(encode(address, value)):
            table[address.address + k] = int(word)

    def words(self, address: ModbusAddress) -> list[int]:
        table = self._tables[(address.unit, address.table)]
        return [table[address.address + k] for k in range(address.words)]

    def fail(self, address: ModbusAddress) -> None:
        """Answer every request touching ``address`` with a device failure exception."""
        for k in range(address.words):
            self.failing.add((address.unit, address.table, address.address + k))

    def heal(self, address: ModbusAddress) -> None:
        for k in range(address.words):
            self.failing.discard((address.unit, address.table, address.address + k))

    # -- what pymodbus' request handlers call (the datastore interface) ------------------------

    def device_ids(self) -> list[int]:
        return sorted({unit for unit, _ in self._tables})

    def _lookup(
        self, device_id: int, func_code: int, address: int, count: int
    ) -> tuple[dict[int, int], Table, bool] | ExcCodes:
        self.requests += 1
        if device_id in self.silent_units or device_id not in self.device_ids():
            raise NoSuchIdException(f"unit {device_id} does not answer")
        if func_code not in _FUNCTIONS:
            return ExcCodes.ILLEGAL_FUNCTION
        table_name, writes = _FUNCTIONS[func_code]
        table = self._tables.get((device_id, table_name), {})
        span = range(address, address + count)
        if any(a not in table for a in span):
            return ExcCodes.ILLEGAL_ADDRESS
        if any((device_id, table_name, a) in self.failing for a in span):
            return ExcCodes.DEVICE_FAILURE
        return table, table_name, writes

    async def async_getValues(
        self, device_id: int, func_code: int, address: int, count: int = 1
    ) -> list[int] | list[bool] | ExcCodes:
        found = self._lookup(device_id, func_code, address, count)
        if isinstance(found, ExcCodes):
            return found
        table, table_name, _ = found
        values = [table[a] for a in range(address, address + count)]
        if table_name in BIT_TABLES:
            return [bool(v) for v in values]
        return values

    async def async_setValues(
        self, device_id: int, func_code: int, address: int, values: Sequence[int] | Sequence[bool]
    ) -> ExcCodes | None:
        found = self._lookup(device_id, func_code, address, len(values))
        if isinstance(found, ExcCodes):
            return found
        table, table_name, writes = found
        if not writes:
            return ExcCodes.ILLEGAL_FUNCTION
        words = [int(v) & 0xFFFF for v in values]
        for k, word in enumerate(words):
            table[address + k] = word
        if self.on_write is not None:
            self.on_write(device_id, table_name, address, words)
        return None


class ModbusFieldServer:
    """Serves a ``RegisterMap`` over Modbus TCP on ``host:port`` (0: a free port)."""

    def __init__(self, registers: RegisterMap, host: str = HOST, port: int = 0) -> None:
        self.registers = registers
        self.host, self.port = host, port
        self._server: ModbusTcpServer | None = None

    @property
    def endpoint(self) -> str:
        """Where it serves (or served, once stopped)."""
        if self._server is None and self.port == 0:
            raise RuntimeError("the Modbus server has not been started")
        return endpoint_of(self.host, self.port)

    @property
    def running(self) -> bool:
        return self._server is not None

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("the Modbus server is already running")
        placeholder = SimDevice(0, simdata=SimData(0))
        server = ModbusTcpServer(
            placeholder, address=(self.host, self.port), ignore_missing_devices=True
        )
        server.context = self.registers  # type: ignore[assignment]
        try:
            await server.serve_forever(background=True)
        except (OSError, RuntimeError) as exc:
            with contextlib.suppress(Exception):
                await server.shutdown()  # type: ignore[no-untyped-call]
            raise FieldConnectionError(
                f"the Modbus server cannot listen on {self.host}:{self.port}: {exc}"
            ) from exc
        transport: Any = server.transport
        sockets = getattr(transport, "sockets", None) or []
        if sockets:
            self.port = int(sockets[0].getsockname()[1])
        self._server = server
        _log.info("Modbus server listening on %s", self.endpoint)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            try:
                await server.shutdown()  # type: ignore[no-untyped-call]
            except Exception as exc:  # nothing to keep of a server that fails to stop
                _log.debug("stopping the Modbus server raised %r", exc)
            await asyncio.sleep(0)

    async def outage(self, down_s: float) -> None:
        """Drop every connection and stop listening for ``down_s`` wall seconds, then serve
        again on the same port."""
        await self.stop()
        await asyncio.sleep(down_s)
        await self.start()
