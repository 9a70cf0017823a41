"""The mirror against a real asyncua server (another process) serving implausible readings.

The server (``tests.field_trust_server``) writes exactly the DataValues the test
asks for: a Boolean, a huge Int64 and 1e308 where a Double is declared, source
timestamps far in the future, a source clock stepping back.  Checked on every
snapshot the mirror hands out: no refused value ever appears as a point's value,
the point is stale with the reason while its latest reading is refused, later
genuine readings are taken at once, and the journal has one row per run of
refusals (not one per sample).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from parallelcity.hil.field import free_port

from parallelcity.clock import SimClock
from parallelcity.field.mirror import Mirror
from parallelcity.field.opcua.config import OpcUaField as FieldConfig
from parallelcity.field.opcua.config import OpcUaInput as InputMap
from parallelcity.field.opcua.config import OpcUaPoint as PointMap
from parallelcity.field.snapshot import Snapshot
from parallelcity.record.journal import Journal

from .field_trust_server import NAMESPACE

ROOT = Path(__file__).resolve().parents[1]
REFUSED = {1.0, 4.6e18, 1e308, 33.0, 444.0}  # values the test serves that must never be taken


class TrustServer:
    def __init__(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.field_trust_server", "--port", str(self.port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )

    async def expect(self, word: str) -> None:
        assert self.proc.stdout is not None
        line = await asyncio.to_thread(self.proc.stdout.readline)
        assert line.split()[:1] == [word], line

    async def set(self, node: str, variant: str, value: str, offset_s: float = 0.0) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"set {node} {variant} {value} {offset_s}\n")
        self.proc.stdin.flush()
        await self.expect("ok")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


def run(make: Callable[[], Awaitable[Any]], timeout_s: float) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(timeout_s):
            return await make()

    return asyncio.run(bounded())


@pytest.mark.slow
def test_implausible_readings_never_reach_the_twin_and_are_journaled(tmp_path: Path) -> None:
    server = TrustServer()
    journal = Journal(tmp_path / "journal.sqlite")
    journal.start_run("trust", time.time(), {})
    field = FieldConfig(
        namespace=NAMESPACE,
        sampling_interval_ms=10.0,
        max_clock_skew_s=5.0,
        points=[
            PointMap(name="temp", node="s=t/temp", max_age_s=120.0, min=-20.0, max=50.0),
            PointMap(name="count", node="s=t/count", max_age_s=120.0, type="int", max=1000.0),
            PointMap(name="flag", node="s=t/flag", max_age_s=120.0, type="bool"),
        ],
        inputs=[InputMap(name="temp", node="s=t/temp")],
    )
    snaps: list[Snapshot] = []

    async def body() -> None:
        await server.expect("up")
        mirror = Mirror(
            field, SimClock(epoch=time.time()), endpoint=f"opc.tcp://127.0.0.1:{server.port}"
        )

        async def settle(node: str, variant: str, value: str, offset_s: float = 0.0) -> Snapshot:
            """Serve one value; the snapshot once the mirror has judged it."""
            seen = mirror.notifications
            await server.set(node, variant, value, offset_s)
            for _ in range(500):
                if mirror.notifications > seen:
                    break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError(f"no notification for {node} = {value} within 5 s")
            snap = mirror.snapshot()
            snaps.append(snap)
            for ev in mirror.take_events():
                journal.record_event(0, ev.t, "mirror", ev.kind, ev.detail, {"gap": ev.gap})
            return snap

        def temp(snap: Snapshot) -> tuple[bool, str, float]:
            p = snap.points["temp"]
            assert p.reading is not None
            return p.stale, p.why, p.reading.value

        await server.set("s=t/count", "Int64", "7")
        await server.set("s=t/flag", "Boolean", "false")
        async with mirror:
            # the initial values first: a later write must not be folded into their publish
            assert await mirror.wait_all_received(5.0)
            assert temp(await settle("s=t/temp", "Double", "21.0")) == (False, "", 21.0)
            assert mirror.snapshot().stale_required == []

            for variant, value, why in [
                ("Boolean", "true", "of type bool where float is declared"),
                ("Int64", "4600000000000000000", "of type int where float is declared"),
                ("Double", "1e308", "above the plausible max 50"),
            ]:
                stale, reason, seen = temp(await settle("s=t/temp", variant, value))
                assert stale and why in reason and seen == 21.0, (variant, reason, seen)
                assert temp(await settle("s=t/temp", "Double", "21.0")) == (False, "", 21.0)

            # one reading an hour ahead: refused; the next genuine readings are taken at once
            stale, reason, _ = temp(await settle("s=t/temp", "Double", "33.0", 3600.0))
            assert stale and "ahead of the clock" in reason
            for k in range(6):
                assert temp(await settle("s=t/temp", "Double", f"{22 + k}.0")) == (
                    False,
                    "",
                    22.0 + k,
                )

            # the PLC's clock steps back 60 s: after three advancing readings, a new timebase
            values = []
            for k in range(4):
                values.append(temp(await settle("s=t/temp", "Double", f"{40 + k}.0", -60.0 + k)))
            assert [v[2] for v in values] == [27.0, 27.0, 42.0, 43.0]
            assert mirror.out_of_order == 2

            # a stuck implausible value: stale all along, journaled once
            for _ in range(10):
                stale, reason, seen = temp(await settle("s=t/temp", "Double", "444.0"))
                assert stale and "above the plausible max" in reason and seen == 43.0

            # typed points take values of their declared type
            assert (await settle("s=t/count", "Int64", "8")).value("count") == 8.0
            assert (await settle("s=t/flag", "Boolean", "true")).value("flag") == 1.0
            count = (await settle("s=t/count", "Double", "9.0")).points["count"]
            assert count.stale and count.reading is not None and count.reading.value == 8.0

    try:
        run(body, timeout_s=120.0)
    finally:
        server.close()
    for snap in snaps:
        got = {p.reading.value for n, p in snap.points.items() if n == "temp" and p.reading}
        assert not got & REFUSED, got
    rows = journal.query("SELECT kind, detail FROM event ORDER BY rowid")
    journal.close()
    kinds = [r["kind"] for r in rows]
    details = [r["detail"] for r in rows]
    assert (
        kinds.count("clock_step") == 1
        and "temp: source clock stepped back" in details[kinds.index("clock_step")]
    )
    refused = [d for k, d in zip(kinds, details, strict=True) if k == "refused"]
    assert any("bool where float" in d for d in refused)
    assert any("ahead of the clock" in d for d in refused)
    assert any("444.0 is above the plausible max 50" in d for d in refused)
    assert len(refused) <= 7  # bool, int, 1e308, future, stuck 444, count as float: not 10+
    assert any("count: value 9.0 of type float where int is declared" in d for d in refused)
