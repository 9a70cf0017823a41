"""One Modbus TCP connection (pymodbus ``AsyncModbusTcpClient``) with bounded requests.

Every request is bounded by ``timeout_s`` and translated into parallelcity's
errors: ``FieldConnectionError`` when the connection is down or breaks (the
caller opens a gap and reconnects), ``RequestTimeout`` when one request got no
answer (the connection may still be fine), ``DeviceException`` when the device
answered with a Modbus exception (illegal address, device failure, ...).
pymodbus' own reconnecting is switched off: the reader and the writer reconnect
with their own backoff, so a request never silently waits for a connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException

from parallelcity.errors import FieldConnectionError, FieldError

from .codec import ModbusAddress, ReadRequest, Table

_log = logging.getLogger(__name__)

# pymodbus logs every failed connect and unanswered request at ERROR; we report them ourselves.
logging.getLogger("pymodbus").setLevel(logging.CRITICAL)


class RequestTimeout(FieldError):
    """One request got no answer within the timeout."""


class DeviceException(FieldError):
    """The device answered a request with a Modbus exception response."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def endpoint_of(host: str, port: int) -> str:
    return f"modbus://{host}:{port}"


class ModbusLink:
    """A client connection to ``host:port``; ``connect`` and every request are bounded."""

    def __init__(self, host: str, port: int, *, timeout_s: float) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.host, self.port, self.timeout_s = host, port, timeout_s
        self._client: AsyncModbusTcpClient | None = None

    @property
    def endpoint(self) -> str:
        return endpoint_of(self.host, self.port)

    @property
    def connected(self) -> bool:
        return self._client is not None and bool(self._client.connected)

    async def connect(self) -> None:
        self.close()
        client = AsyncModbusTcpClient(
            self.host,
            port=self.port,
            timeout=self.timeout_s,
            retries=0,
            reconnect_delay=0,  # no automatic reconnect: the owner decides
            name=f"parallelcity {self.endpoint}",
        )
        try:
            async with asyncio.timeout(self.timeout_s):
                ok = await client.connect()
        except (TimeoutError, OSError, ModbusException) as exc:
            client.close()
            raise FieldConnectionError(f"cannot connect to {self.endpoint}: {exc!r}") from exc
        if not ok:
            client.close()
            raise FieldConnectionError(f"cannot connect to {self.endpoint}")
        self._client = client

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()

    def _usable(self) -> AsyncModbusTcpClient:
        client = self._client
        if client is None or not client.connected:
            raise FieldConnectionError(f"no connection to {self.endpoint}")
        return client

    async def _call(self, what: str, call: Any) -> Any:
        try:
            async with asyncio.timeout(self.timeout_s):
                response = await call
        except TimeoutError as exc:
            raise RequestTimeout(
                f"{what} on {self.endpoint}: no answer within {self.timeout_s:g} s"
            ) from exc
        except (OSError, ModbusException) as exc:
            if not self.connected:
                raise FieldConnectionError(f"{what} on {self.endpoint}: {exc!r}") from exc
            raise RequestTimeout(f"{what} on {self.endpoint}: {exc!r}") from exc
        if response.isError():
            code = int(getattr(response, "exception_code", 0) or 0)
            raise DeviceException(
                f"{what} on {self.endpoint}: exception response, code {code}", code
            )
        return response

    async def read(self, request: ReadRequest) -> list[int] | list[bool]:
        """The ``request.count`` registers or bits of one read request."""
        client = self._usable()
        kw: dict[str, Any] = {"count": request.count, "device_id": request.unit}
        calls = {
            "holding": client.read_holding_registers,
            "input": client.read_input_registers,
            "coil": client.read_coils,
            "discrete": client.read_discrete_inputs,
        }
        what = f"reading {request.count} {request.table} from {request.start} (unit {request.unit})"
        response = await self._call(what, calls[request.table](request.start, **kw))
        if request.table in ("coil", "discrete"):
            bits = [bool(b) for b in response.bits[: request.count]]
            if len(bits) < request.count:
                raise DeviceException(f"{what}: {len(bits)} bits answered", 0)
            return bits
        regs = [int(r) for r in response.registers]
        if len(regs) != request.count:
            raise DeviceException(f"{what}: {len(regs)} registers answered", 0)
        return regs

    async def write(
        self, unit: int, table: Table, start: int, values: Sequence[int | bool]
    ) -> None:
        """Write consecutive registers (holding) or bits (coil) from ``start``."""
        client = self._usable()
        what = f"writing {len(values)} {table} at {start} (unit {unit})"
        if table == "coil":
            call = client.write_coils(start, [bool(v) for v in values], device_id=unit)
        elif table == "holding":
            call = client.write_registers(start, [int(v) for v in values], device_id=unit)
        else:
            raise FieldError(f"{what}: {table} cannot be written")
        await self._call(what, call)


def write_runs(
    items: Sequence[tuple[ModbusAddress, list[int] | list[bool]]],
) -> list[tuple[int, Table, int, list[int | bool]]]:
    """Encoded values grouped into contiguous runs per unit and table (one write each)."""
    ordered = sorted(items, key=lambda it: (it[0].unit, it[0].table, it[0].address))
    runs: list[tuple[int, Table, int, list[int | bool]]] = []
    for addr, words in ordered:
        last = runs[-1] if runs else None
        if (
            last is not None
            and last[0] == addr.unit
            and last[1] == addr.table
            and last[2] + len(last[3]) == addr.address
            and len(last[3]) + len(words) <= 123
        ):
            last[3].extend(words)
        else:
            runs.append((addr.unit, addr.table, addr.address, list(words)))
    return runs
