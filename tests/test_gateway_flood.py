"""An allowed key floods a real gateway process: others keep being served, the watchdog trips.

The gateway is ``python -m parallelcity gateway CONFIG`` (CURVE on, default
quotas) in front of an in-test OPC UA server; the flooder is another process
holding the operator's key (allowed, may drive nothing), sending at full speed
bytes that are not JSON, commands the gateway refuses and heartbeats.
Meanwhile the runtime sends commands one at a time, then falls silent.

Bounds, from what the gateway promises:

* a client connecting during the flood is answered (its handshake needs the
  ZAP handler, which runs between batches) within its 2 s timeout;
* the runtime's p99 round trip stays under one heartbeat interval, and no
  command goes unanswered: a runtime that cannot get an answer within a
  heartbeat interval cannot keep a watchdog alive, so that is the least the
  gateway must offer under any flood;
* the safe value lands no earlier than the window after the last sign of life
  was *sent* (the gateway saw it after that) and no later than the window plus
  one heartbeat interval after its reply *arrived* (the gateway saw it before
  that): refused and malformed traffic is no sign of life, and the event loop
  runs the watchdog between batches, and heartbeats from a key that may
  drive nothing do not keep the field driven.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from .gateway_site import TimedServer, flood_trial, make_site
from .test_gateway import free_port


@pytest.mark.slow
def test_a_flooding_key_neither_starves_the_runtime_nor_delays_the_watchdog(
    tmp_path: Path,
) -> None:
    field = TimedServer(free_port())
    site = make_site(tmp_path, field.endpoint, free_port(), heartbeat_s=0.5, missed=3)
    margin = site.heartbeat_s

    async def main() -> None:
        await field.start()
        try:
            t = await flood_trial(
                site, field, tmp_path / "gateway.log", flood=True, command_s=4.0, margin_s=margin
            )
        finally:
            await field.stop()
        lat = t.watchdog_latency
        print(
            f"\nflood: {t.flood_sent} messages sent by the flooder; runtime: {len(t.rtts)} "
            f"commands, p50 {t.pct(0.5) * 1e3:.2f} ms, p99 {t.pct(0.99) * 1e3:.2f} ms, "
            f"{t.lost} unanswered; watchdog window {site.window_s:.2f} s, safe value after "
            f"{'never' if lat is None else f'{lat:.3f} s'} (from the last reply); a new "
            f"client's first round trip {t.new_client_s} s"
        )
        assert t.flood_sent > 1000, "the flooder did not flood"
        assert t.new_client_s is not None, "a new client got no answer in 2 s (ZAP starved)"
        assert t.lost == 0 and len(t.rtts) >= 10
        assert t.pct(0.99) < site.heartbeat_s
        assert t.revert_at is not None, "the watchdog never reverted under the flood"
        assert t.revert_at >= t.last_send + site.window_s - 0.01, "reverted before the window"
        assert t.revert_at <= t.last_reply + site.window_s + margin

    asyncio.run(asyncio.wait_for(main(), 120))
