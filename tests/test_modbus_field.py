"""Modbus reader (through the generic mirror), writer and gateway against a real pymodbus
server on 127.0.0.1.

The server is ``ModbusFieldServer`` over a ``RegisterMap`` (no doubles): points
go stale when a unit stops answering or answers with exceptions, the mirror and
the writer reconnect after the server drops every connection, and the field
gateway writes registers and settles an unanswered write by reading them back.
Every bound below is the guarantee checked (a point's ``max_age_s`` on the run's
clock) or a generous wall limit on waiting for it, never an idle machine's timing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from parallelcity.backoff import Backoff
from parallelcity.clock import FakeClock, SimClock
from parallelcity.dispatch.wire import AckStatus, RefusalCode
from parallelcity.errors import FieldUnavailableError, NodeMappingError, SecurityError
from parallelcity.field.mirror import Mirror
from parallelcity.field.modbus.codec import CodecError, ModbusAddress, decode
from parallelcity.field.modbus.protocol import ModbusField
from parallelcity.field.modbus.server import ModbusFieldServer, RegisterMap
from parallelcity.field.modbus.stand_in import ModbusStandIn
from parallelcity.field.modbus.writer import ModbusWriter
from parallelcity.field.protocol import STATUS_BAD
from parallelcity.gateway.core import GatewayCore
from parallelcity.gateway.server import FieldGateway
from parallelcity.gateway.store import GatewayStore

from .test_gateway import LIMITS, T0, command, run
from .test_gateway_in_doubt import FAST, send

MAX_AGE_S = 0.8  # clock seconds (the clock runs at wall speed here)
POLL_S = 0.05
TIMEOUT_S = 0.25
QUICK = Backoff(initial=0.05, maximum=0.2, jitter=0.0)
WAIT_S = 10.0  # wall limit on waiting for something the guarantee says must happen

T_ZONE = ModbusAddress(unit=1, table="input", address=0, data_type="float32")
T_SUPPLY = ModbusAddress(unit=1, table="input", address=2, data_type="int16", scale=0.1)
PUMP_ON = ModbusAddress(unit=1, table="discrete", address=0)
FLOW = ModbusAddress(unit=2, table="input", address=0, data_type="uint16", scale=0.01)
SETPOINT = ModbusAddress(unit=1, table="holding", address=100, data_type="float32")
M_FLOW = ModbusAddress(unit=1, table="holding", address=102, data_type="uint16", scale=0.001)

POINTS = {"zone": T_ZONE, "supply": T_SUPPLY, "pump": PUMP_ON, "flow": FLOW}
INPUTS = {"plant.T_supply_set": SETPOINT, "apartment.m_flow": M_FLOW}


def registers() -> RegisterMap:
    regs = RegisterMap()
    for addr, value in ((T_ZONE, 20.5), (T_SUPPLY, 70.3), (PUMP_ON, 1), (FLOW, 1.25)):
        regs.define(addr, value)
    regs.define(SETPOINT, 70.0)
    regs.define(M_FLOW, 0.3)
    return regs


def field() -> ModbusField:
    types = {"pump": "bool"}
    return ModbusField.model_validate(
        {
            "protocol": "modbus",
            "poll_interval_ms": POLL_S * 1000,
            "timeout_s": TIMEOUT_S,
            "points": [
                {"name": n, "max_age_s": MAX_AGE_S, "type": types.get(n, "float"),
                 **a.model_dump(exclude_none=True)}
                for n, a in POINTS.items()
            ],
            "inputs": [{"name": n, **a.model_dump(exclude_none=True)} for n, a in INPUTS.items()],
        }
    )  # fmt: skip


def reader(port: int, clock: SimClock) -> Mirror:
    return Mirror(field(), clock, endpoint=f"modbus://127.0.0.1:{port}", backoff=QUICK)


async def until(cond: Callable[[], bool], what: str, wall_s: float = WAIT_S) -> None:
    until_t = time.monotonic() + wall_s
    while not cond():
        assert time.monotonic() < until_t, f"not within {wall_s} s wall: {what}"
        await asyncio.sleep(0.01)


def test_points_are_polled_decoded_and_fresh() -> None:
    async def main() -> None:
        clock = SimClock(T0)
        server = ModbusFieldServer(registers())
        await server.start()
        try:
            async with reader(server.port, clock) as r:
                assert r.reader.requests_per_poll == 3  # type: ignore[attr-defined]
                assert await r.wait_all_received(WAIT_S)
                snap = r.snapshot()
                assert snap.stale_required == [], snap
                assert snap.value("zone") == 20.5
                assert snap.value("supply") == pytest.approx(70.3)
                assert snap.value("pump") == 1.0
                assert snap.value("flow") == pytest.approx(1.25)
                assert await r.read_inputs() == pytest.approx(
                    {"plant.T_supply_set": 70.0, "apartment.m_flow": 0.3}
                )
                server.registers.put(T_ZONE, 21.0)
                await until(lambda: r.snapshot().value("zone") == 21.0, "the new value read")
        finally:
            await server.stop()

    run(main)


def test_an_address_the_device_does_not_have_is_a_mapping_error() -> None:
    async def main() -> None:
        regs = RegisterMap()
        regs.define(T_ZONE, 20.0)  # no T_SUPPLY, PUMP_ON, FLOW, inputs
        server = ModbusFieldServer(regs)
        await server.start()
        try:
            with pytest.raises(NodeMappingError) as err:
                await reader(server.port, SimClock(T0)).start()
            text = str(err.value)
            assert "'supply'" in text and "'pump'" in text and "plant.T_supply_set" in text
            assert "'zone'" not in text
        finally:
            await server.stop()

    run(main)


@pytest.mark.parametrize("fault", ["silent unit", "exception response"])
def test_a_point_that_stops_answering_is_stale_within_its_max_age(fault: str) -> None:
    """Stamped when its request was sent, a reading can only look older than it is: every
    snapshot later than the last answer plus ``max_age_s`` (run's clock) shows it stale."""

    async def main() -> None:
        clock = SimClock(T0)
        server = ModbusFieldServer(registers())
        await server.start()
        try:
            async with reader(server.port, clock) as r:
                assert await r.wait_all_received(WAIT_S)
                await until(lambda: not r.snapshot().points["flow"].stale, "flow fresh")
                t_stop = clock.now()  # no answer of unit 2 after this instant
                if fault == "silent unit":
                    server.registers.silent_units.add(2)
                else:
                    server.registers.fail(FLOW)
                checked = 0
                end = time.monotonic() + WAIT_S
                while time.monotonic() < end:
                    snap = r.snapshot()
                    flow = snap.points["flow"]
                    if snap.taken_at > t_stop + MAX_AGE_S:
                        assert flow.stale, (snap.taken_at - t_stop, flow)
                        checked += 1
                        if checked >= 5:
                            break
                    await asyncio.sleep(0.02)
                assert checked >= 5
                flow = r.snapshot().points["flow"]
                if fault == "exception response":
                    assert flow.reading is not None
                    assert flow.reading.status_code == STATUS_BAD | 4  # device failure
                    assert "status bad" in flow.why
                else:
                    assert "exceeds max_age_s" in flow.why
                assert r.reader.exceptions > 0 or r.reader.timeouts > 0  # type: ignore[attr-defined]
                # the point answers again: fresh again
                server.registers.silent_units.clear()
                server.registers.heal(FLOW)
                await until(lambda: not r.snapshot().points["flow"].stale, "flow fresh again")
        finally:
            await server.stop()

    run(main, timeout_s=40.0)


def test_reader_and_writer_reconnect_after_the_server_restarts() -> None:
    async def main() -> None:
        clock = SimClock(T0)
        server = ModbusFieldServer(registers())
        await server.start()
        port = server.port
        links: list[tuple[str, str]] = []
        writer = ModbusWriter(
            "127.0.0.1", port, INPUTS, timeout_s=TIMEOUT_S, backoff=QUICK,
            on_link=lambda kind, detail: links.append((kind, detail)),
        )  # fmt: skip
        try:
            async with reader(port, clock) as r, writer:
                assert await r.wait_all_received(WAIT_S)
                await writer.write({"plant.T_supply_set": 71.5})
                t_down = clock.now()
                await server.stop()
                await until(lambda: r.gaps == 1, "the reader saw the gap")
                snap = r.snapshot()
                assert not snap.link_up and set(snap.stale_required) == set(POINTS)
                await until(lambda: not writer.available, "the writer saw the loss")
                with pytest.raises(FieldUnavailableError, match="nothing was written"):
                    await writer.write({"plant.T_supply_set": 72.0})
                server.registers.put(T_ZONE, 22.0)
                server = ModbusFieldServer(server.registers, port=port)
                await server.start()
                await until(lambda: r.reconnects == 1, "the reader reconnected")
                await until(lambda: not r.snapshot().stale_required, "fresh after reconnect")
                zone = r.snapshot().points["zone"]
                assert zone.reading is not None and zone.reading.value == 22.0
                assert zone.reading.source_time > t_down  # a new read, not the held one
                kinds = [e.kind for e in r.take_events() if e.kind in ("lost", "restored")]
                assert kinds == ["lost", "restored"], kinds
                await until(lambda: writer.available, "the writer reconnected")
                await writer.write({"plant.T_supply_set": 72.0})
                assert await writer.read(["plant.T_supply_set"]) == {"plant.T_supply_set": 72.0}
                assert [k for k, _ in links] == ["field_lost", "field_restored"]
        finally:
            await server.stop()

    run(main, timeout_s=40.0)


def test_the_writer_refuses_what_its_registers_cannot_hold() -> None:
    async def main() -> None:
        server = ModbusFieldServer(registers())
        await server.start()
        try:
            async with ModbusWriter("127.0.0.1", server.port, INPUTS, timeout_s=TIMEOUT_S) as w:
                with pytest.raises(CodecError, match="outside uint16"):
                    await w.write({"plant.T_supply_set": 75.0, "apartment.m_flow": 70.0})
                # nothing of the refused write was sent, the other setpoint included
                assert await w.read(list(INPUTS)) == pytest.approx(
                    {"plant.T_supply_set": 70.0, "apartment.m_flow": 0.3}
                )
            with pytest.raises(NodeMappingError, match="read-only"):
                ModbusWriter("127.0.0.1", server.port, {"x": T_ZONE})
        finally:
            await server.stop()

    run(main)


def test_the_gateway_writes_registers_and_settles_an_unanswered_write_by_reading_back(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        clock = FakeClock(T0)  # the gateway's rate limits run on command time
        server = ModbusFieldServer(registers())
        await server.start()
        regs = server.registers
        store = GatewayStore(tmp_path / "state.sqlite")
        writer = ModbusWriter("127.0.0.1", server.port, INPUTS, timeout_s=TIMEOUT_S, backoff=QUICK)
        gw = FieldGateway(
            GatewayCore(LIMITS, clock_skew_s=1e9), writer, clock, bind="tcp://127.0.0.1:0",
            insecure_lab=True, store=store, write_timeout_s=2.0, in_doubt_backoff=FAST,
        )  # fmt: skip
        try:
            async with writer, gw:
                first = command({"plant.T_supply_set": 71.0, "apartment.m_flow": 0.45}, seq=1)
                (ack,) = await send(gw, first)
                assert ack.status is AckStatus.APPLIED, ack
                assert regs.words(SETPOINT) == [0x428E, 0x0000]  # 71.0 as float32
                assert regs.words(M_FLOW) == [450]
                regs.silent_units.add(1)  # the next write gets no answer, nor its read-back
                second = command({"plant.T_supply_set": 72.0}, seq=2, issued_at=T0 + 900)
                (ack,) = await send(gw, second)
                assert ack.code is RefusalCode.WRITE_FAILED and "in doubt" in ack.detail, ack
                assert gw.in_doubt is not None
                regs.silent_units.clear()
                await until(lambda: gw.in_doubt is None, "settled by reading back")
                # the unanswered write never landed: the read-back says 71, not 72
                assert gw.core.state.last_applied["plant.T_supply_set"].value == 71.0
                (again,) = await send(gw, second)
                assert again.status is AckStatus.APPLIED, again
                assert regs.words(SETPOINT) == [0x4290, 0x0000]  # 72.0
        finally:
            store.close()
            await server.stop()

    run(main, timeout_s=40.0)


class Doubler:
    """A pure plant for the stand-in: its one output is twice its one input."""

    max_step_s = 60.0

    def __init__(self, t0: float) -> None:
        self.t = t0
        self.u = np.array([1.0])

    @property
    def input_vector(self) -> np.ndarray:
        return self.u.copy()

    def advance(self, t: float) -> None:
        self.t = max(self.t, t)

    def outputs(self) -> np.ndarray:
        return 2.0 * self.u

    def set_input(self, name: str, value: float) -> None:
        assert name == "u"
        self.u = np.array([value])


def stand_in(clock: SimClock, host: str = "127.0.0.1") -> ModbusStandIn:
    return ModbusStandIn(
        {"y": T_ZONE}, {"u": SETPOINT}, outputs=["y"], input_names=["u"],
        make_plant=Doubler, clock=clock, tick_ms=20.0, host=host,
    )  # fmt: skip


def test_the_stand_in_serves_its_plant_and_applies_what_is_written() -> None:
    async def main() -> None:
        clock = SimClock(T0)
        with pytest.raises(SecurityError, match="no authentication"):
            await stand_in(clock, host="0.0.0.0").start()
        async with stand_in(clock) as field:
            host, port = field.endpoint.removeprefix("modbus://").split(":")
            async with ModbusWriter(host, int(port), {"u": SETPOINT}, timeout_s=TIMEOUT_S) as w:
                assert await w.read(["u"]) == {"u": 1.0}
                await w.write({"u": 3.5})
            assert [(a.name, a.value) for a in field.applied] == [("u", 3.5)]
            await until(lambda: decode(T_ZONE, field.registers.words(T_ZONE)) == 7.0, "y = 2u")

    run(main)
