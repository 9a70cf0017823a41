"""The gateway's Modbus connection to the field: where accepted setpoints are written.

``ModbusWriter`` satisfies the gateway's ``SetpointWriter``: ``write`` encodes
every setpoint with the codec first (a value that does not fit its register is
refused before anything is sent), then writes contiguous runs of holding
registers or coils, one request each; ``read`` reads the inputs back for the
gateway's read-back check.  A register holds a value rounded to its resolution,
so ``read`` gives back the value last written when the register holds exactly
its encoding (the gateway compares read-backs with what it wrote), and the
decoded value otherwise.  Every request is bounded by ``timeout_s``.

The connection can die (a PLC reboot, a cut link).  The writer watches it and,
on a loss, reconnects with backoff; until it is back, ``write`` and ``read``
fail at once with ``FieldUnavailableError``: nothing is sent, nothing is kept to
be sent later.  Losses and recoveries go to ``on_link`` (the gateway journals them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType

from parallelcity.aio import cancel_and_wait
from parallelcity.backoff import Backoff
from parallelcity.errors import (
    FieldConnectionError,
    FieldError,
    FieldUnavailableError,
    NodeMappingError,
)

from .codec import ModbusAddress, decode, encode, plan_reads, write_problem
from .link import DeviceException, ModbusLink, RequestTimeout, write_runs

log = logging.getLogger("parallelcity.gateway.server")

WATCH_PERIOD_S = 0.1
BACKOFF_MAX_S = 2.0
WRITTEN_KEPT = 8  # written values per input recognised in a read-back

LinkListener = Callable[[str, str], None]
"""``on_link(kind, detail)``: kind ``field_lost`` or ``field_restored``."""


class ModbusWriter:
    """Writes setpoints to holding registers and coils on a Modbus TCP device, reconnecting.

    ``async with`` connects and reads every input once (an address the device refuses
    is a ``NodeMappingError``): the first connection must succeed.
    """

    def __init__(
        self,
        host: str,
        port: int,
        inputs: Mapping[str, ModbusAddress],
        *,
        timeout_s: float = 2.0,
        reconnect: bool = True,
        backoff: Backoff | None = None,
        on_link: LinkListener | None = None,
    ) -> None:
        problems = [f"input {n!r}: {p}" for n, a in inputs.items() if (p := write_problem(a))]
        if problems:
            raise NodeMappingError("; ".join(problems))
        self._link = ModbusLink(host, port, timeout_s=timeout_s)
        self.inputs = dict(inputs)
        self.reconnect = reconnect
        self.backoff = backoff or Backoff(maximum=BACKOFF_MAX_S)
        self.on_link = on_link
        self._down: str | None = None
        self._down_since = 0.0
        self._attempts = 0
        self._wake = asyncio.Event()
        self._watch_task: asyncio.Task[None] | None = None
        self.outages = 0
        self.reconnects = 0
        self.writes = 0
        # per input: the encodings of its last few written values -> the value written
        self._written: dict[str, dict[tuple[int, ...], float]] = {}

    @property
    def endpoint(self) -> str:
        return self._link.endpoint

    async def __aenter__(self) -> ModbusWriter:
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
        """True while the connection is up (a write would be sent)."""
        return self._down is None and self._link.connected

    async def connect(self) -> None:
        if self._watch_task is not None:
            raise RuntimeError("the writer is already connected")
        await self._open()
        if self.reconnect:
            self._watch_task = asyncio.create_task(self._watch(), name=f"writer {self.endpoint}")

    async def _open(self) -> None:
        await self._link.connect()
        try:
            await self._read(list(self.inputs))
        except DeviceException as exc:
            self._link.close()
            raise NodeMappingError(
                f"{self.endpoint} refused reading the inputs back ({exc}): check their addresses"
            ) from exc
        except BaseException:
            self._link.close()
            raise
        self._down = None

    async def aclose(self) -> None:
        task, self._watch_task = self._watch_task, None
        await cancel_and_wait(task)
        self._link.close()

    # ------------------------------------------------------------------ the connection

    def _check(self) -> None:
        if self._down is None and self._link.connected:
            return
        problem = self._down or "the connection closed"
        self._lost(problem)
        down_for = time.monotonic() - self._down_since
        trying = f"reconnect attempt {self._attempts}" if self._attempts else "reconnecting"
        if not self.reconnect:
            trying = "not reconnecting"
        raise FieldUnavailableError(
            f"the Modbus connection to {self.endpoint} is down ({problem}; {down_for:.1f} s, "
            f"{trying}): nothing was written, and nothing is kept to be written later"
        )

    def _lost(self, problem: str) -> None:
        self._wake.set()
        if self._down is not None:
            return
        self._down = problem
        self._down_since = time.monotonic()
        self._attempts = 0
        self.outages += 1
        log.warning(
            "field writer: lost the Modbus connection to %s (%s); commands are refused",
            self.endpoint,
            problem,
        )
        self._emit("field_lost", f"{self.endpoint}: {problem}")

    def _emit(self, kind: str, detail: str) -> None:
        if self.on_link is None:
            return
        try:
            self.on_link(kind, detail)
        except Exception:  # a failing listener must not stop the writer
            log.exception("field writer: the link listener failed on %s", kind)

    async def _watch(self) -> None:
        while True:
            if self._down is None and self._link.connected:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), WATCH_PERIOD_S)
                continue
            self._lost(self._down or "the connection closed")
            await self._reconnect()

    async def _reconnect(self) -> None:
        self._link.close()
        for attempts, delay in enumerate(self.backoff.delays(), start=1):
            self._attempts = attempts
            try:
                await self._open()
            except asyncio.CancelledError:
                raise
            except FieldError as exc:
                log.info(
                    "field writer: reconnect attempt %d to %s failed: %s; next in %.2f s",
                    attempts,
                    self.endpoint,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            down_for = time.monotonic() - self._down_since
            self.reconnects += 1
            detail = (
                f"{self.endpoint}: connection back after {down_for:.1f} s and {attempts} attempt(s)"
            )
            log.warning("field writer: %s", detail)
            self._emit("field_restored", detail)
            return

    # ------------------------------------------------------------------ requests

    def _addresses(self, names: Sequence[str]) -> list[tuple[str, ModbusAddress]]:
        unmapped = sorted(n for n in names if n not in self.inputs)
        if unmapped:
            raise NodeMappingError(
                f"no Modbus address for input(s) {', '.join(map(repr, unmapped))}"
            )
        return [(n, self.inputs[n]) for n in names]

    async def write(self, setpoints: Mapping[str, float]) -> None:
        items = self._addresses(list(setpoints))
        encoded = {name: (addr, encode(addr, float(setpoints[name]))) for name, addr in items}
        self._check()
        for name, (_addr, words) in encoded.items():
            history = self._written.setdefault(name, {})
            key = tuple(int(w) for w in words)
            history.pop(key, None)
            history[key] = float(setpoints[name])
            while len(history) > WRITTEN_KEPT:
                del history[next(iter(history))]
        for unit, table, start, values in write_runs(list(encoded.values())):
            try:
                await self._link.write(unit, table, start, values)
            except (RequestTimeout, DeviceException) as exc:
                raise FieldConnectionError(f"writing setpoints failed: {exc}") from exc
            except FieldConnectionError as exc:
                self._lost(str(exc))
                raise
        self.writes += 1

    async def read(self, names: Sequence[str]) -> Mapping[str, float]:
        """The values the input registers and coils hold now."""
        if self._watch_task is not None:
            self._check()
        return await self._read(names)

    async def _read(self, names: Sequence[str]) -> dict[str, float]:
        items = self._addresses(names)
        out: dict[str, float] = {}
        for request in plan_reads(items):
            try:
                raw = await self._link.read(request)
            except FieldConnectionError as exc:
                if self._watch_task is not None:
                    self._lost(str(exc))
                raise
            except RequestTimeout as exc:
                raise FieldConnectionError(str(exc)) from exc
            for name, addr in request.members:
                words = request.slice(addr, raw)
                written = self._written.get(str(name), {}).get(tuple(words))
                # a register holding exactly what writing a value put there gives that value
                out[str(name)] = written if written is not None else float(decode(addr, words))
        return out
