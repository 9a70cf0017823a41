"""Multi-frame and oversized messages against a real gateway process: its memory stays bounded.

A valid message is one frame of at most 64 KiB.  ZeroMQ's ``MAXMSGSIZE`` is
per frame, so one message of 1,000 frames of 1 MiB used to be buffered whole
and copied (the gateway grew by gigabytes).  Now the transport disconnects a
peer at the first frame over ``TRANSPORT_MAX_FRAME_BYTES`` (before buffering
it), the gateway copies no frame after the first of a message, and a
multi-frame message is refused as ``malformed``.  The gateway's resident set
size is read from ``/proc/PID/status`` while an allowed key sends such
messages at full speed from its own process.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from parallelcity.dispatch.dispatcher import Dispatcher

from .gateway_site import GatewayProcess, TimedServer, make_site
from .test_gateway import free_port

RSS_HEADROOM_KIB = 100 * 1024


@pytest.mark.slow
@pytest.mark.parametrize(
    ("frames", "frame_bytes"),
    [(1000, 1_000_000), (200, 60 * 1024)],
    ids=["1000x1MB", "200x60KiB"],
)
def test_multi_frame_floods_leave_the_gateway_small_and_responsive(
    tmp_path: Path, frames: int, frame_bytes: int
) -> None:
    field = TimedServer(free_port())
    site = make_site(tmp_path, field.endpoint, free_port())

    async def main() -> None:
        await field.start()
        gw = GatewayProcess(site.config, tmp_path / "gateway.log")
        try:
            await gw.wait_for("serving on", 30.0)
            async with Dispatcher(
                site.endpoint, "runtime", curve=site.curve("runtime"), timeout_s=2.0, retries=0
            ) as rt:
                await rt.heartbeat()
                start = gw.rss_kib()
                flooder = site.flooder(
                    "multipart", 5.0, "--frames", str(frames), "--frame-bytes", str(frame_bytes)
                )
                peak = start
                end = time.monotonic() + 30.0
                while flooder.poll() is None and time.monotonic() < end:
                    peak = max(peak, gw.rss_kib())
                    await asyncio.sleep(0.02)
                out, _ = flooder.communicate(timeout=30)
                t0 = time.monotonic()
                await rt.heartbeat()  # still answering
                answer_s = time.monotonic() - t0
            print(
                f"\n{frames} x {frame_bytes} B frames: flooder {out.strip()}; gateway RSS "
                f"{start / 1024:.0f} MiB at start, peak {peak / 1024:.0f} MiB; heartbeat "
                f"answered in {answer_s * 1e3:.1f} ms after"
            )
            assert peak < start + RSS_HEADROOM_KIB
        finally:
            gw.stop()
            await field.stop()

    asyncio.run(asyncio.wait_for(main(), 120))
