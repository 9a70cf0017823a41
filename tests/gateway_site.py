"""A real ``parallelcity gateway CONFIG`` process in front of an in-test OPC UA server.

For the attack tests (``test_gateway_flood``, ``test_gateway_shutdown``) and
``benchmarks/gateway_flood.py``: CURVE keys for a ``runtime`` that drives
``apartment.m_flow``, an ``operator`` that may drive nothing but re-arm, and
``other``, which may drive ``apartment`` too (either can be turned hostile); a
watchdog with a safe value; the gateway's log in a file.  The OPC UA server
records the monotonic time of every value written to the input.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asyncua import Server, ua
from asyncua.common.callback import CallbackType, ServerItemCallback

from parallelcity.dispatch.dispatcher import ClientCurve
from parallelcity.dispatch.keys import read_public_key, read_secret_key, write_keypair

ROOT = Path(__file__).resolve().parents[1]
NS = "urn:parallelcity:test:site"
INPUT = "apartment.m_flow"
SAFE = 0.123
VERDICT = "cd" * 32


class TimedServer:
    """An asyncua server with one writable Double input; every write is timed."""

    def __init__(self, port: int, write_delay_s: float = 0.0) -> None:
        self.endpoint = f"opc.tcp://127.0.0.1:{port}/site/"
        self.write_delay_s = write_delay_s
        """A write lands at once, then the server stalls this long before answering."""
        self.echo = False
        """Print ``write VALUE`` for every value written (in a process of its own)."""
        self.writes: list[tuple[float, float]] = []
        """(time.monotonic(), value) of every value written."""
        self.server = Server()
        self._node_id: Any = None

    async def start(self) -> None:
        server = self.server
        await server.init()
        server.set_endpoint(self.endpoint)
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        idx = await server.register_namespace(NS)
        obj = await server.nodes.objects.add_object(ua.NodeId("apartment", idx), "apartment")
        var = await obj.add_variable(
            ua.NodeId("apartment/m_flow", idx), "m_flow", 0.5, varianttype=ua.VariantType.Double
        )
        await var.set_writable()
        self._node_id = var.nodeid
        server.subscribe_server_callback(CallbackType.PostWrite, self._on_write)
        await server.start()

    def _on_write(self, event: ServerItemCallback, _dispatcher: Any) -> None:
        results = event.response_params or []
        ours = False
        for k, wv in enumerate(event.request_params.NodesToWrite):
            if wv.NodeId != self._node_id or (k < len(results) and not results[k].is_good()):
                continue
            ours = True
            self.writes.append((time.monotonic(), float(wv.Value.Value.Value)))
            if self.echo:
                print(f"write {wv.Value.Value.Value!r}", flush=True)
        if ours and self.write_delay_s:
            time.sleep(self.write_delay_s)  # blocks the whole server, as a busy PLC would

    def first_write_of(self, value: float, after: float) -> float | None:
        return next((t for t, v in self.writes if v == value and t >= after), None)

    async def stop(self) -> None:
        await self.server.stop()


@dataclass(frozen=True)
class Site:
    folder: Path
    config: Path
    endpoint: str
    heartbeat_s: float
    missed: int

    @property
    def window_s(self) -> float:
        return self.heartbeat_s * self.missed

    def curve(self, name: str) -> ClientCurve:
        return ClientCurve(
            read_secret_key(self.folder / "keys" / f"{name}.secret"),
            read_public_key(self.folder / "keys" / "gateway.public"),
        )

    def flooder(
        self, mode: str, seconds: float, *extra: str, key: str = "other"
    ) -> subprocess.Popen[str]:
        """``python -m tests.gateway_flooder`` with ``key`` (its own process)."""
        keys = self.folder / "keys"
        return subprocess.Popen(
            [sys.executable, "-m", "tests.gateway_flooder", self.endpoint,
             str(keys / f"{key}.secret"), str(keys / "gateway.public"), "--issuer", key,
             "--mode", mode, "--seconds", str(seconds), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
        )  # fmt: skip


def make_site(
    folder: Path,
    opc_endpoint: str,
    port: int,
    *,
    heartbeat_s: float = 0.5,
    missed: int = 3,
    write_timeout_s: float = 2.0,
    gateway_extra: str = "",
) -> Site:
    for name in ("gateway", "runtime", "operator", "other"):
        write_keypair(folder / "keys", name)
    config = folder / "gateway.toml"
    config.write_text(
        f"""
[gateway]
bind = "tcp://127.0.0.1:{port}"
state = "state.sqlite"
write_timeout_s = {write_timeout_s}
lease_s = 3600
{gateway_extra}

[security]
insecure_lab = true   # OPC UA to the in-test server runs without security; ZeroMQ uses CURVE

[security.zmq]
secret_key = "keys/gateway.secret"
[[security.zmq.clients]]
name = "runtime"
public_key = "keys/runtime.public"
equipment = ["apartment"]
[[security.zmq.clients]]
name = "operator"
public_key = "keys/operator.public"
rearm = true
[[security.zmq.clients]]
name = "other"
public_key = "keys/other.public"
equipment = ["apartment"]

[field]
endpoint = "{opc_endpoint}"
namespace = "{NS}"
[[field.inputs]]
name = "{INPUT}"
node = "s=apartment/m_flow"
min = 0.0
max = 1000.0
safe = {SAFE}

[watchdog]
heartbeat_interval_s = {heartbeat_s}
missed_heartbeats = {missed}
"""
    )
    return Site(folder, config, f"tcp://127.0.0.1:{port}", heartbeat_s, missed)


class GatewayProcess:
    """``python -m parallelcity gateway CONFIG``, its output in ``log``."""

    def __init__(self, config: Path, log: Path) -> None:
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "parallelcity", "gateway", str(config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    async def wait_for(self, text: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while text not in self.text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} in the gateway log:\n{self.text()}")
            await asyncio.sleep(0.05)

    def rss_kib(self) -> int:
        """The gateway's resident set size now (/proc/PID/status VmRSS)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


# =========================================================================== flood trial


@dataclass
class FloodTrial:
    """What one legitimate runtime saw while another allowed key flooded (or did not)."""

    rtts: list[float]
    """Round trips of commands sent one at a time (s)."""
    lost: int
    """Commands without a reply within the dispatcher's timeout."""
    last_send: float
    last_reply: float
    """Monotonic times the last sign of life was sent and its reply came back."""
    revert_at: float | None
    """Monotonic time the safe value reached the field after the runtime fell silent."""
    flood_sent: int
    new_client_s: float | None
    """A new connection's handshake and first heartbeat round trip (None: no answer in 2 s)."""

    def pct(self, q: float) -> float:
        xs = sorted(self.rtts)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("inf")

    @property
    def watchdog_latency(self) -> float | None:
        """From the last sign of life's reply to the revert (an upper bound on the true one)."""
        return None if self.revert_at is None else self.revert_at - self.last_reply


async def flood_trial(
    site: Site, field: TimedServer, log: Path, *, flood: bool, command_s: float, margin_s: float
) -> FloodTrial:
    """Commands one at a time for ``command_s``, then silence until the watchdog reverts.

    With ``flood`` the operator's key (which may drive nothing) floods from before the
    first command until after the revert is due.  The runtime's dispatcher has a 2 s
    timeout and no retries.
    """
    from parallelcity.dispatch.dispatcher import Dispatcher
    from parallelcity.dispatch.wire import AckStatus
    from parallelcity.errors import DispatchError

    gw = GatewayProcess(site.config, log)
    flooder: subprocess.Popen[str] | None = None
    rtts: list[float] = []
    lost = 0
    try:
        await gw.wait_for("serving on", 30.0)
        async with Dispatcher(
            site.endpoint, "runtime", curve=site.curve("runtime"), timeout_s=2.0, retries=0
        ) as rt:
            await rt.heartbeat()
            if flood:
                seconds = 1.0 + command_s + site.window_s + margin_s + 3
                flooder = site.flooder("refused", seconds, key="operator")
                await asyncio.sleep(1.0)  # the flood is under way
            # A new connection needs the ZAP handler to answer its handshake.
            t0 = time.monotonic()
            new_client_s: float | None = None
            async with Dispatcher(
                site.endpoint, "other", curve=site.curve("other"), timeout_s=2.0, retries=0
            ) as op:
                with contextlib.suppress(DispatchError):
                    await op.heartbeat()
                    new_client_s = time.monotonic() - t0
            last_send = last_reply = time.monotonic()
            end = last_send + command_s
            for i in range(100_000):
                if time.monotonic() >= end:
                    break
                now = time.time()
                cmd = rt.command(
                    {INPUT: 1.0 + 0.001 * (i % 500)},
                    issued_at=now,
                    valid_until=now + 600,
                    verdict_digest=VERDICT,
                )
                t0 = time.monotonic()
                try:
                    ack = await rt.deliver(cmd)
                except DispatchError:
                    lost += 1
                    continue
                t1 = time.monotonic()
                assert ack.status is AckStatus.APPLIED, ack
                rtts.append(t1 - t0)
                last_send, last_reply = t0, t1
        # Silence from the runtime: the watchdog must revert within its window.
        deadline = last_reply + site.window_s + margin_s + 2.0
        revert_at = None
        while time.monotonic() < deadline and revert_at is None:
            await asyncio.sleep(0.01)
            revert_at = field.first_write_of(SAFE, after=last_send)
        sent = 0
        if flooder is not None:
            out, _ = flooder.communicate(timeout=30)
            sent = int(out.split()[-1]) if out.startswith("sent") else -1
        return FloodTrial(rtts, lost, last_send, last_reply, revert_at, sent, new_client_s)
    finally:
        if flooder is not None and flooder.poll() is None:
            flooder.kill()
            flooder.wait()
        gw.stop()


async def _serve_field(port: int, write_delay_s: float) -> None:
    field = TimedServer(port, write_delay_s)
    field.echo = True
    await field.start()
    print("up", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    # python -m tests.gateway_site PORT WRITE_DELAY_S: the field server in a process of its own
    asyncio.run(_serve_field(int(sys.argv[1]), float(sys.argv[2])))
