"""Stopping and refusing at the command line, with real processes.

* SIGTERM during traffic: the gateway takes no new message, finishes the
  batch in hand, commits its store (no pending batch; every command acked
  ``applied`` is recorded applied), closes the OPC UA session, says so in its
  log and exits 0 (it used to die like ``kill -9``).
* ``parallelcity rearm`` with a key that may not re-arm exits 4, "refused for
  security" (it used to exit 3, as if the field were unreachable).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from parallelcity.dispatch.dispatcher import Dispatcher
from parallelcity.dispatch.wire import AckStatus
from parallelcity.errors import DispatchError
from parallelcity.gateway.core import MAX_REMEMBERED_IDS
from parallelcity.gateway.store import GatewayStore

from .gateway_site import INPUT, ROOT, VERDICT, GatewayProcess, TimedServer, make_site
from .test_gateway import free_port


@pytest.mark.slow
def test_sigterm_during_traffic_finishes_commits_closes_and_exits_0(tmp_path: Path) -> None:
    field = TimedServer(free_port())
    site = make_site(tmp_path, field.endpoint, free_port(), heartbeat_s=5.0)
    acked: list[str] = []

    async def main() -> None:
        await field.start()
        gw = GatewayProcess(site.config, tmp_path / "gateway.log")
        try:
            await gw.wait_for("serving on", 30.0)
            async with Dispatcher(
                site.endpoint, "runtime", curve=site.curve("runtime"), timeout_s=1.0, retries=0
            ) as rt:

                async def traffic() -> None:
                    for i in range(100_000):
                        now = time.time()
                        cmd = rt.command(
                            {INPUT: 1.0 + 0.001 * (i % 500)},
                            issued_at=now,
                            valid_until=now + 600,
                            verdict_digest=VERDICT,
                        )
                        try:
                            ack = await rt.deliver(cmd)
                        except DispatchError:
                            return  # the gateway has stopped
                        assert ack.status is AckStatus.APPLIED, ack
                        acked.append(cmd.id)

                task = asyncio.create_task(traffic())
                await asyncio.sleep(1.0)
                gw.proc.send_signal(signal.SIGTERM)
                code = await asyncio.to_thread(gw.proc.wait, 20)
                async with asyncio.timeout(5):
                    await task
        finally:
            gw.stop()
            await field.stop()
        log = gw.text()
        assert code == 0, log
        assert "SIGTERM: stopping after the batch in hand" in log
        assert "stopped cleanly; the field link is closed" in log
        assert len(acked) > 5
        store = GatewayStore(tmp_path / "state.sqlite")
        try:
            loaded = store.load(MAX_REMEMBERED_IDS)
        finally:
            store.close()
        assert loaded.pending == []
        assert set(acked) <= set(loaded.applied_ids)

    asyncio.run(asyncio.wait_for(main(), 60))


def test_rearm_refused_for_security_exits_4(tmp_path: Path) -> None:
    key = "runtime"  # may drive, may not re-arm
    field = TimedServer(free_port())
    site = make_site(tmp_path, field.endpoint, free_port())
    keys = tmp_path / "keys"

    async def main() -> subprocess.CompletedProcess[str]:
        await field.start()
        gw = GatewayProcess(site.config, tmp_path / "gateway.log")
        try:
            await gw.wait_for("serving on", 30.0)
            argv = [sys.executable, "-m", "parallelcity", "rearm", site.endpoint,
                    "--reason", "valve checked", "--issuer", key,
                    "--key", str(keys / f"{key}.secret"),
                    "--gateway-key", str(keys / "gateway.public")]  # fmt: skip
            return await asyncio.to_thread(
                subprocess.run, argv, capture_output=True, text=True, cwd=ROOT, timeout=60
            )
        finally:
            gw.stop()
            with contextlib.suppress(Exception):
                await field.stop()

    done = asyncio.run(asyncio.wait_for(main(), 90))
    assert done.returncode == 4, done.stderr
    assert "may not re-arm" in done.stderr
