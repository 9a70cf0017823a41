"""A clean goodbye leaves the watchdog idle; heartbeats go on while a command is resent.

* Pure: a heartbeat with ``release`` from the last issuer heard from within
  the window puts an armed watchdog back to idle; another live issuer keeps it
  armed; a tripped one stays tripped.
* In process, real CURVE sockets: a command's reply is lost, so the
  dispatcher resends it only after longer than the watchdog's window; the heartbeats,
  on their own socket, still reach the gateway at least every ``heartbeat_s``
  and the watchdog stays armed (before, they queued behind the resends and the
  watchdog tripped).
* Stand-alone gateway process: a dispatcher's goodbye leaves the watchdog
  idle past its window (no trip, no revert), ``parallelcity rearm`` shows it
  with ISO 8601 times, the next dispatcher's commands are applied without a
  re-arm, and silence still trips it.
* A run against a tripped gateway logs so at start with the ``rearm`` line
  to use, journals it, and its result shows no command acked.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import sqlite3
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from parallelcity.clock import SimClock
from parallelcity.dispatch.dispatcher import Dispatcher
from parallelcity.dispatch.wire import (
    Ack,
    AckStatus,
    Command,
    Heartbeat,
    Status,
    WatchdogState,
    decode_request,
)
from parallelcity.errors import WireFormatError
from parallelcity.gateway.core import GatewayCore
from parallelcity.gateway.grants import Grant
from parallelcity.gateway.server import FieldGateway
from parallelcity.gateway.watchdog import MAX_LIVE_ISSUERS, Watchdog
from parallelcity.record.records import RunResult
from parallelcity.scenario.definition import Scenario

from .gateway_site import INPUT, ROOT, SAFE, GatewayProcess, TimedServer, make_site
from .gateway_site import VERDICT as SITE_VERDICT
from .test_gateway import GOOD, VERDICT, FakeWriter, free_port, run
from .test_watchdog import SAFE as WD_SAFE
from .test_watchdog import TimedWriter, watched_gateway

# =========================================================================== pure


def test_the_last_live_issuers_goodbye_leaves_the_watchdog_idle() -> None:
    wd = Watchdog(1.0, 3, WD_SAFE)
    assert not wd.goodbye("a", 0.0)  # idle: nothing to do
    wd.seen(10.0, "a")
    wd.seen(10.5, "b")
    assert not wd.goodbye("a", 11.0), "b is still live"
    assert wd.state is WatchdogState.ARMED and wd.deadline() == 13.5
    assert wd.goodbye("b", 11.2)
    assert wd.state is WatchdogState.IDLE and wd.deadline() is None and not wd.due(100.0)
    assert "goodbye" in wd.detail
    wd.seen(200.0, "a")  # the next run arms it again, no re-arm needed
    assert wd.state is WatchdogState.ARMED
    # An issuer silent for longer than the window is gone: it keeps nothing armed.
    wd.seen(205.0, "c")
    assert wd.goodbye("a", 208.5)
    # Many issuer names (a lab gateway takes any): the silent ones are forgotten.
    for k in range(MAX_LIVE_ISSUERS + 1):
        wd.seen(210.0 + 0.01 * k, f"name-{k}")
    wd.seen(240.0, "last")
    assert set(wd.live) == {"last"}
    # A goodbye does not undo a trip.
    wd.seen(300.0, "a")
    wd.trip(304.0)
    assert not wd.goodbye("a", 304.1) and wd.tripped


# =========================================================================== on sockets


def test_heartbeats_keep_the_watchdog_armed_while_a_lost_reply_is_resent() -> None:
    heartbeat_s, missed = 1.0, 3
    writer = TimedWriter()
    beats: list[float] = []
    lost_replies = [1]

    async def main() -> None:
        async with watched_gateway(writer, heartbeat_s, missed) as (gw, _admin, runtime):
            _lose_command_replies(gw, lost_replies)
            _time_heartbeats(gw, beats)
            # The resend leaves after 3.5 s, more than the watchdog's 3 s window.
            async with Dispatcher(
                gw.endpoint, "runtime", curve=runtime, timeout_s=3.5, retries=2
            ) as disp:
                await disp.heartbeat()
                # As the runner does: a heartbeat every heartbeat_s / 2.
                loop = asyncio.create_task(disp.heartbeat_loop(heartbeat_s / 2))
                try:
                    await asyncio.sleep(0.5)
                    t0 = time.monotonic()
                    now = gw.clock.now()
                    ack = await disp.send(
                        GOOD, issued_at=now, valid_until=now + 900, verdict_digest=VERDICT
                    )
                    t1 = time.monotonic()
                    await asyncio.sleep(0.5)
                finally:
                    loop.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await loop
            assert ack.status is AckStatus.DUPLICATE, ack  # applied once; its reply was lost
            assert disp.counters.resent == 1 and lost_replies == [0]
            assert t1 - t0 > missed * heartbeat_s, "the resends outlasted the window"
            during = [t for t in beats if t0 - heartbeat_s <= t <= t1 + heartbeat_s]
            gaps = [b - a for a, b in itertools.pairwise(during)]
            # The doc's promise: one at least every heartbeat_s (sent every heartbeat_s / 2).
            assert gaps and max(gaps) <= heartbeat_s, gaps
            assert gw.counters.trips == 0 and not writer.writes[1:], writer.writes
            assert gw.core.watchdog.state is WatchdogState.ARMED

    run(main)


def _lose_command_replies(gw: FieldGateway, left: list[int]) -> None:
    """The gateway handles commands as usual but sends no reply to the next ``left[0]``."""
    handle = gw.handle_batch

    async def lossy(messages: Sequence[tuple[list[bytes], Grant | None]]) -> list[bytes | None]:
        replies = await handle(messages)
        for k, (frames, _) in enumerate(messages):
            if left[0] > 0 and isinstance(_decoded(frames), Command):
                left[0] -= 1
                replies[k] = None
        return replies

    gw.handle_batch = lossy  # type: ignore[method-assign]


def _decoded(frames: list[bytes]) -> object:
    try:
        return decode_request(frames[0])
    except (WireFormatError, IndexError):
        return None


def _time_heartbeats(gw: FieldGateway, beats: list[float]) -> None:
    """Record when each heartbeat reached the gateway (``time.monotonic``)."""
    beat = gw._heartbeat

    async def timed(hb: Heartbeat, grant: Grant) -> Status:
        beats.append(time.monotonic())
        return await beat(hb, grant)

    gw._heartbeat = timed  # type: ignore[method-assign]


# =========================================================================== stand-alone


@pytest.mark.slow
def test_standalone_gateway_goodbye_leaves_it_idle_and_silence_still_trips(
    tmp_path: Path,
) -> None:
    """``parallelcity gateway CONFIG`` and ``parallelcity rearm`` as processes, as a user runs
    them; a bad config through the CLI on the side."""
    field = TimedServer(free_port())
    site = make_site(tmp_path, field.endpoint, free_port(), heartbeat_s=0.5, missed=3)
    bad = tmp_path / "bad.toml"
    bad.write_text(site.config.read_text().replace("min = 0.0", 'min = "low"'))
    outputs: dict[str, tuple[int, str]] = {}

    async def rearm() -> None:
        keys = site.folder / "keys"
        outputs["idle"] = await _cli(
            "rearm", site.endpoint, "--reason", "valve checked", "--issuer", "operator",
            "--key", str(keys / "operator.secret"), "--gateway-key", str(keys / "gateway.public"),
        )  # fmt: skip

    async def main() -> None:
        await field.start()
        gw = GatewayProcess(site.config, tmp_path / "gateway.log")
        try:
            await gw.wait_for("serving on", 30.0)
            async with Dispatcher(site.endpoint, "runtime", curve=site.curve("runtime")) as rt:
                await rt.heartbeat()
                # As a run ends: beats in flight (every 20 ms), then the goodbye.
                beats = asyncio.create_task(rt.heartbeat_loop(0.02))
                assert (await _send(rt, 1.0)).status is AckStatus.APPLIED
                await asyncio.sleep(0.3)
                beats.cancel()
                bye = await rt.heartbeat(release=True)
                with contextlib.suppress(asyncio.CancelledError):
                    await beats
            assert bye.watchdog is WatchdogState.IDLE and bye.leases == {}, bye
            after_bye = time.monotonic()
            # Longer than the window, with nobody talking (the config check meanwhile).
            outputs["bad"] = await _cli("gateway", str(bad))
            await asyncio.sleep(max(0.0, after_bye + site.window_s + 0.5 - time.monotonic()))
            await rearm()  # the operator's key arms nothing: it only asks
            assert field.first_write_of(SAFE, after=0.0) is None, "a goodbye reverts nothing"
            # The next run needs no re-arm.
            async with Dispatcher(site.endpoint, "runtime", curve=site.curve("runtime")) as rt:
                assert (await rt.heartbeat()).watchdog is WatchdogState.ARMED
                assert (await _send(rt, 1.5)).status is AckStatus.APPLIED
                silent_from = time.monotonic()
            # Silence (no goodbye) still trips it: the safe value lands.
            deadline = silent_from + site.window_s + 10.0
            while field.first_write_of(SAFE, after=silent_from) is None:
                assert time.monotonic() < deadline, gw.text()
                await asyncio.sleep(0.05)
        finally:
            gw.stop()
            await field.stop()
        log = gw.text()
        assert log.count("WATCHDOG tripped") == 1, log
        assert "the last issuer said goodbye" in log

    run(main, timeout_s=90.0)
    code, out = outputs["bad"]
    assert code == 2 and "invalid gateway config" in out and "Traceback" not in out, out
    assert "field.inputs[0].min: Input should be a valid number" in out, out
    code, out = outputs["idle"]
    assert code == 0 and "watchdog idle: idle since 20" in out, out
    assert re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z \(\d+\.\d s ago\)", out), out
    assert not re.search(r"\d{10}\.\d", out), f"raw epoch seconds: {out}"


async def _send(rt: Dispatcher, value: float) -> Ack:
    now = time.time()
    return await rt.send(
        {INPUT: value}, issued_at=now, valid_until=now + 600, verdict_digest=SITE_VERDICT
    )


async def _cli(*argv: str) -> tuple[int, str]:
    """``python -m parallelcity ARGV``: exit code and output (stdout and stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "parallelcity", *argv,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=ROOT,
    )  # fmt: skip
    try:
        async with asyncio.timeout(30.0):
            out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode if proc.returncode is not None else -1, out.decode(errors="replace")


# =========================================================================== a run


@pytest.mark.slow
def test_a_run_against_a_tripped_gateway_says_so_at_start_and_is_not_a_success(
    dh: Scenario, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from parallelcity.run.runner import RunOptions
    from parallelcity.run.runner import run as run_scenario

    limits = {i.name: i for i in dh.safety_specs().inputs}
    safe = {name: lim.min for name, lim in limits.items()}
    # A huge clock allowance: the run's simulated times pass, the trip is what refuses.
    core = GatewayCore(limits, safe=safe, clock_skew_s=1e10, heartbeat_interval_s=60.0)
    core.watchdog.seen(1768179400.0, "earlier-run")
    core.watchdog.trip(1768179704.512)

    async def main() -> RunResult:
        gw = FieldGateway(
            core, FakeWriter(), SimClock(epoch=time.time()), bind="tcp://127.0.0.1:0",
            insecure_lab=True,
        )  # fmt: skip
        async with gw:
            serving = asyncio.create_task(gw.serve())
            try:
                options = RunOptions(
                    out_dir=tmp_path, cycles=1, speed=720, gateway_endpoint=gw.endpoint
                )
                return await run_scenario(dh, options)
            finally:
                serving.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await serving

    with caplog.at_level(logging.ERROR, logger="parallelcity"):
        result = asyncio.run(asyncio.wait_for(main(), 120.0))
    assert result.gateway_tripped_at_start
    assert result.counts["acked"] == 0, result.counts  # what makes `run` exit 6
    assert all(r.ack in ("", "refused:watchdog_tripped") for r in result.records), result.records
    said = [r.getMessage() for r in caplog.records if "TRIPPED" in r.getMessage()]
    assert said and f"parallelcity rearm {gw_endpoint(said[0])} --reason" in said[0], said
    assert "--insecure-lab" in said[0] and "tripped at 2026-01-12T01:01:44.512Z" in said[0], said
    db = sqlite3.connect(result.journal_path)
    try:
        events = db.execute("SELECT kind, detail FROM event WHERE kind = 'tripped_at_start'")
        (_, detail), *_ = events.fetchall()
    finally:
        db.close()
    assert "parallelcity rearm" in detail


def gw_endpoint(message: str) -> str:
    match = re.search(r"tcp://127\.0\.0\.1:\d+", message)
    assert match, message
    return match.group(0)
