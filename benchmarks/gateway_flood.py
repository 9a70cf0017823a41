"""A gateway under a flood from an allowed key: a legitimate runtime's round trips and the
watchdog's latency, against the same gateway without the flood, in one run.

    .venv/bin/python -m benchmarks.gateway_flood [--seconds 5] [--heartbeat 0.5]

Every trial starts a fresh ``python -m parallelcity gateway CONFIG`` process
(CURVE on) in front of an in-process OPC UA server, and a runtime in this
process sends commands one at a time (each written to the server) for
``--seconds``, then falls silent until the watchdog writes the safe value.
Trials: no flood (baseline); a flooder process with the operator's key (may
drive nothing) sending non-JSON bytes, refused commands and heartbeats at full
speed with the default quota (500 messages/s per
key); the same with the quota off (fair service alone).  Printed per trial:
the runtime's p50 / p99 / max round trip and unanswered commands, a new
client's first round trip (its handshake needs the ZAP handler), the time from
the last reply to the safe value against the window, and the ratios to the
baseline.  The test suite's version is ``tests/test_gateway_flood.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

from tests.gateway_site import FloodTrial, TimedServer, flood_trial, make_site
from tests.test_gateway import free_port

NO_QUOTA = "max_messages_per_s = 1e9\nmax_burst_messages = 1000000000"


async def trial(
    folder: Path, heartbeat_s: float, seconds: float, flood: bool, extra: str
) -> FloodTrial:
    field = TimedServer(free_port())
    site = make_site(
        folder, field.endpoint, free_port(), heartbeat_s=heartbeat_s, gateway_extra=extra
    )
    await field.start()
    try:
        return await flood_trial(
            site,
            field,
            folder / "gateway.log",
            flood=flood,
            command_s=seconds,
            margin_s=heartbeat_s,
        )
    finally:
        await field.stop()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gateway_flood")
    p.add_argument("--seconds", type=float, default=5.0, help="runtime command phase")
    p.add_argument(
        "--heartbeat", type=float, default=0.5, help="heartbeat interval (s); 3 missed trip"
    )
    args = p.parse_args()
    window = 3 * args.heartbeat
    rows: list[tuple[str, FloodTrial]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, (name, flood, extra) in enumerate(
            [("no flood", False, ""), ("flood, default quota", True, ""),
             ("flood, no quota", True, NO_QUOTA)]
        ):  # fmt: skip
            folder = Path(tmp) / str(k)
            folder.mkdir()
            rows.append(
                (name, asyncio.run(trial(folder, args.heartbeat, args.seconds, flood, extra)))
            )
    base = rows[0][1]
    print(f"watchdog window {window:.2f} s (3 x {args.heartbeat:g} s); times in ms")
    head = ("trial", "flood msgs", "cmds", "lost", "p50", "p99", "max", "p99/base", "new client",
            "revert", "-window")  # fmt: skip
    widths = (-22, 10, 6, 5, 7, 7, 7, 8, 10, 8, 8)
    print(
        " ".join(f"{h:<{-w}}" if w < 0 else f"{h:>{w}}" for h, w in zip(head, widths, strict=True))
    )
    for name, t in rows:
        lat = t.watchdog_latency
        new = "none" if t.new_client_s is None else f"{t.new_client_s * 1e3:.1f}"
        print(
            f"{name:<22} {t.flood_sent:>10} {len(t.rtts):>6} {t.lost:>5} "
            f"{t.pct(0.5) * 1e3:>7.2f} {t.pct(0.99) * 1e3:>7.2f} {t.pct(1.0) * 1e3:>7.2f} "
            f"{t.pct(0.99) / base.pct(0.99):>8.2f} {new:>10} "
            f"{'never' if lat is None else f'{lat * 1e3:.0f}':>8} "
            f"{'-' if lat is None else f'{(lat - window) * 1e3:+.0f}':>8}"
        )


if __name__ == "__main__":
    main()
