"""A field write that times out but lands is answered ``applied``, with real processes.

The field is an OPC UA server in its own process that applies a write at once
and then stalls 6.5 s before answering (a busy PLC).  The gateway process has
``write_timeout_s = 5``.  Its OPC UA client used to time the request out first
(after its own 4 s), declare the session lost, and then refuse its own read-back
("session down"), so a write that had landed was answered ``write_failed``.
Now the OPC UA requests time out with ``write_timeout_s`` and a request that
merely timed out leaves the session up: after 5 s the field is read back (the
answer comes when the stall ends), the value is there, and the ack says
``applied``.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

from parallelcity.dispatch.dispatcher import Dispatcher
from parallelcity.dispatch.wire import AckStatus

from .gateway_site import INPUT, ROOT, VERDICT, GatewayProcess, make_site
from .test_gateway import free_port

DELAY_S = 6.5


@pytest.mark.slow
def test_a_timed_out_write_that_landed_is_answered_applied(tmp_path: Path) -> None:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tests.gateway_site", str(port), str(DELAY_S)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    assert server.stdout is not None
    site = make_site(
        tmp_path,
        f"opc.tcp://127.0.0.1:{port}/site/",
        free_port(),
        write_timeout_s=5.0,
        heartbeat_s=10.0,  # the stall is no silence of the runtime
    )

    async def main() -> None:
        assert server.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(server.stdout.readline), 30)
        assert line.strip() == "up", line
        gw = GatewayProcess(site.config, tmp_path / "gateway.log")
        try:
            await gw.wait_for("serving on", 30.0)
            async with Dispatcher(
                site.endpoint, "runtime", curve=site.curve("runtime"), timeout_s=20.0, retries=0
            ) as rt:
                now = time.time()
                t0 = time.monotonic()
                ack = await rt.send(
                    {INPUT: 0.77}, issued_at=now, valid_until=now + 600, verdict_digest=VERDICT
                )
                took = time.monotonic() - t0
            print(f"\nack {ack.status.value} after {took:.2f} s: {ack.detail}")
            assert ack.status is AckStatus.APPLIED, (ack, gw.text())
            line = await asyncio.wait_for(asyncio.to_thread(server.stdout.readline), 5)
            assert line.strip() == "write 0.77"
        finally:
            gw.stop()

    try:
        asyncio.run(asyncio.wait_for(main(), 90))
    finally:
        server.kill()
        server.wait()
