"""Unauthenticated handshakes against a real gateway process: a few log lines, then summaries.

Every refused CURVE handshake used to log one WARNING line (6,917 lines in
12 s from one unknown client).  Now the ZAP handler logs the first few of each
5 s period and then one summary line with the count per reason and key.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import pytest
import zmq

from parallelcity.dispatch.keys import read_public_key

from .gateway_site import GatewayProcess, TimedServer, make_site
from .test_gateway import free_port

BURST = 10  # ZapHandler's LogLimiter: lines per period before it aggregates
PERIOD_S = 5.0


@pytest.mark.slow
def test_refused_handshakes_are_logged_a_few_then_in_summaries(tmp_path: Path) -> None:
    field = TimedServer(free_port())
    site = make_site(tmp_path, field.endpoint, free_port())
    server_public = read_public_key(tmp_path / "keys" / "gateway.public")

    async def main() -> None:
        await field.start()
        gw = GatewayProcess(site.config, tmp_path / "gateway.log")
        ctx = zmq.Context()
        try:
            await gw.wait_for("serving on", 30.0)
            start = time.monotonic()
            # Strangers, 20 new connections every 50 ms for 3 s (libzmq does not retry a
            # handshake the server refused).
            for _ in range(60):
                socks = []
                for _ in range(20):
                    public, secret = zmq.curve_keypair()
                    s = ctx.socket(zmq.DEALER)
                    s.setsockopt(zmq.LINGER, 0)
                    s.setsockopt(zmq.CURVE_SERVERKEY, server_public)
                    s.setsockopt(zmq.CURVE_PUBLICKEY, public)
                    s.setsockopt(zmq.CURVE_SECRETKEY, secret)
                    s.connect(site.endpoint)
                    socks.append(s)
                await asyncio.sleep(0.05)
                for s in socks:
                    s.close(linger=0)
            await gw.wait_for("zap: refused handshakes:", PERIOD_S + 5.0)
            elapsed = time.monotonic() - start
        finally:
            ctx.term()
            gw.stop()
            await field.stop()
        log = gw.text()
        lines = [ln for ln in log.splitlines() if "zap: refused a handshake" in ln]
        summaries = re.findall(r"zap: refused handshakes: (\d+) more in the last", log)
        suppressed = sum(int(n) for n in summaries)
        print(
            f"\n{len(lines) + suppressed} refused handshakes in {elapsed:.1f} s: "
            f"{len(lines)} single lines, {len(summaries)} summary line(s)"
        )
        assert suppressed > 10 * BURST, "too few handshakes were tried to show anything"
        periods = elapsed / PERIOD_S + 1
        assert len(lines) <= BURST * periods
        assert "unknown client key" in lines[0]

    asyncio.run(asyncio.wait_for(main(), 60))
