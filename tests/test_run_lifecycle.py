"""How `parallelcity run` begins and ends, against the CLI as a user runs it.

The first cycle is at the scenario's start on an idle and on a loaded machine; a
solve stuck for good does not keep the command alive; SIGINT and SIGTERM end a run
with every output written and the end journaled; the exit code says whether the
run achieved control.
"""

from __future__ import annotations

import asyncio
import json
import math
import multiprocessing
import os
import queue
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest

from parallelcity.cli import main
from parallelcity.clock import SimClock
from parallelcity.decide.choice import controller_settings
from parallelcity.decide.cycle import Decision, Outcome
from parallelcity.errors import ScenarioError
from parallelcity.record.records import CycleRecord, RunResult, count_cycle
from parallelcity.record.report import metrics_text, summarize, summary_json
from parallelcity.run.lifecycle import SolveWorker, enter_bounded, run_bounded, speed_problem

from .conftest import DH, ROOT

SETUP_BOUND_S = 120.0  # certificates, servers and a solver build on a loaded 2-core machine
"""Wall time a run may take to reach its first cycle here; generous, not a guarantee."""


def _burn(until: float) -> None:
    while time.monotonic() < until:
        pass


class Burners:
    """Two processes burning a core each, for at most ``bound_s`` (killed on exit)."""

    def __init__(self, n: int, bound_s: float) -> None:
        ctx = multiprocessing.get_context("spawn")
        until = time.monotonic() + bound_s
        self.procs = [ctx.Process(target=_burn, args=(until,), daemon=True) for _ in range(n)]

    def __enter__(self) -> Burners:
        for p in self.procs:
            p.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            p.kill()
            p.join(timeout=5)


class RunProcess:
    """``python -m parallelcity run ...`` (or ``python PROGRAM...``); output read on threads."""

    def __init__(self, *args: str, program: list[str] | None = None) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(
            [sys.executable, *(program or ["-m", "parallelcity", "run"]), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
        )
        self.err: queue.Queue[str] = queue.Queue()
        self.err_lines: list[str] = []
        self.out_lines: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stderr, self.err.put), daemon=True),
            threading.Thread(
                target=self._read, args=(self.proc.stdout, self.out_lines.append), daemon=True
            ),
        ]
        for t in self._readers:
            t.start()

    @staticmethod
    def _read(stream: Any, put: Any) -> None:
        for line in stream:
            put(line)

    def wait_line(self, pattern: str, timeout_s: float) -> str:
        """The first stderr line matching ``pattern`` within ``timeout_s``."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            try:
                line = self.err.get(timeout=max(0.01, min(1.0, end - time.monotonic())))
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            self.err_lines.append(line)
            if re.search(pattern, line):
                return line
        raise AssertionError(f"no line {pattern!r} in {timeout_s} s: {''.join(self.err_lines)}")

    def finish(self, timeout_s: float) -> tuple[int, str, str]:
        """Exit code, stdout and stderr; the process is killed if it outlives ``timeout_s``."""
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        for t in self._readers:
            t.join(timeout=10)
        while not self.err.empty():
            self.err_lines.append(self.err.get_nowait())
        return self.proc.returncode, "".join(self.out_lines), "".join(self.err_lines)


def _strict_json(path: Path) -> Any:
    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def _out_dir(stdout: str) -> Path:
    m = re.search(r"^summary\s+(\S+)$", stdout, re.M)
    assert m, stdout
    return Path(m.group(1)).parent


def _journal(out: Path) -> tuple[list[tuple[int, float]], list[dict[str, Any]]]:
    db = sqlite3.connect(out / "journal.sqlite")
    try:
        cycles = [(int(k), float(t)) for k, t in db.execute("SELECT k, t FROM cycle ORDER BY k")]
        ends = [
            {"k": k, "t": t, "detail": d, **json.loads(data)}
            for k, t, d, data in db.execute(
                "SELECT k, t, detail, data FROM event WHERE source = 'run' AND kind = 'end'"
            )
        ]
    finally:
        db.close()
    return cycles, ends


# ------------------------------------------------------------------ item 1: the first cycle


@pytest.mark.slow
@pytest.mark.parametrize(("load", "speed"), [("idle", "1440"), ("loaded", "86400")])
def test_first_cycle_at_the_scenarios_start(load: str, speed: str, tmp_path: Path) -> None:
    """The journaled t of every cycle is start + k * cycle_s exactly: the simulated clock
    stands at the start until the loop is ready, so set-up time (longer under load) does
    not move the day (before: 00:45-01:45 at 1440, Friday 16:30 at 86400)."""
    start = 1768176000.0  # 2026-01-12T00:00:00Z, the demo's [scenario] start (a Monday)
    burners = Burners(2 if load == "loaded" else 0, bound_s=SETUP_BOUND_S + 60)
    with burners:
        run = RunProcess(str(DH), "--cycles", "2", "--speed", speed, "--out", str(tmp_path))
        rc, out, err = run.finish(SETUP_BOUND_S + 60)
    assert "Traceback" not in err, err
    assert rc in (0, 6), (rc, out, err)  # control may or may not keep up at 86400: said so
    assert "first cycle at 2026-01-12T00:00:00Z (Mon)" in err
    assert "first cycle at 2026-01-12T00:00:00Z" in out
    out_dir = _out_dir(out)
    cycles, ends = _journal(out_dir)
    assert cycles == [(0, start), (1, start + 900.0)]
    assert [(e["cause"], e["signal"], e["cycles"]) for e in ends] == [("completed", None, 2)]
    summary = _strict_json(out_dir / "summary.json")
    assert summary["first_cycle"] == "2026-01-12T00:00:00Z"
    assert summary["exit_code"] == rc


# ------------------------------------------------------- items 7 and 2: signals, a stuck solve

STUCK_SOLVE = """
import sys, time
from parallelcity.controllers import nmpc

def stuck(self, inp):
    time.sleep(3600)  # a solve that never comes back (as one did on a diverged plant)

nmpc.NmpcController.step = stuck
from parallelcity.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_runs_end_cleanly_on_sigint_sigterm_and_a_stuck_solve(tmp_path: Path) -> None:
    """Three runs at once (one CI cost): two are signalled a few cycles in and must finish
    the cycle in hand, write what a finished run writes, journal the end and exit 130 /
    143 (before: no outputs, nothing journaled, SIGTERM silent).  The third has a solve
    that never returns, as a diverged plant (ua_kw_per_k = inf) caused: the pool thread it
    ran on was joined at exit, so `run` printed its summary and never exited; it must
    exit with 6 (nothing sent) and say it abandoned the solve."""
    script = tmp_path / "stuck.py"
    script.write_text(textwrap.dedent(STUCK_SOLVE))
    stuck = RunProcess(
        str(DH), "--cycles", "3", "--speed", "3600", "--out", str(tmp_path / "stuck"),
        program=[str(script), "run"],
    )  # fmt: skip
    sigs = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM}
    runs = {
        name: RunProcess(
            str(DH), "--cycles", "24", "--speed", "1440", "--out", str(tmp_path / name)
        )
        for name in sigs
    }
    try:
        for run in runs.values():  # three set-ups at once, beside whatever else runs
            run.wait_line(r"first cycle at", 2 * SETUP_BOUND_S)
        for name, run in runs.items():
            run.wait_line(r"cycle +\d+/24", 60)  # non-tty progress: every 2 cycles
            run.proc.send_signal(sigs[name])
        results = {name: run.finish(60) for name, run in runs.items()}
        stuck_result = stuck.finish(2 * SETUP_BOUND_S)
    finally:
        for run in [*runs.values(), stuck]:
            if run.proc.poll() is None:
                run.proc.kill()
    for name, result in results.items():
        _check_interrupted(name, *result)
    rc, out, err = stuck_result
    assert rc == 6, (rc, out, err)
    assert "abandoned cycle 0's solve" in err
    assert "NO CONTROL (exit 6): no command was sent: 3 holds" in out
    assert "Traceback" not in err


def _check_interrupted(name: str, rc: int, out: str, err: str) -> None:
    assert rc == {"SIGINT": 130, "SIGTERM": 143}[name], (rc, out, err)
    assert "Traceback" not in err, err
    m = re.search(rf"interrupted by {name} at cycle (\d+) of 24", out)
    assert m, out
    n = int(m.group(1))
    assert 2 <= n < 24
    out_dir = _out_dir(out)
    for f in ("summary.json", "timeseries.csv", "plot.png", "metrics.prom"):
        assert (out_dir / f).stat().st_size > 0, f
    summary = _strict_json(out_dir / "summary.json")
    assert (summary["end"], summary["signal"], summary["cycles"]) == ("interrupted", name, n)
    assert summary["exit_code"] == rc and summary["success"] is False
    cycles, ends = _journal(out_dir)
    assert cycles == [(k, 1768176000.0 + 900.0 * k) for k in range(n)]
    assert [(e["cause"], e["signal"], e["cycles"]) for e in ends] == [("interrupted", name, n)]
    assert f"interrupted by {name} at cycle {n} of 24" in ends[0]["detail"]
    assert len((out_dir / "timeseries.csv").read_text().splitlines()) == n + 1


# ------------------------------------------------------------------ item 5, 6: fast checks


def _record(k: int, ack: str = "", outcome: str = "dispatch") -> CycleRecord:
    return CycleRecord(k, 1768176000.0 + 900 * k, outcome, "controller", "", {}, {}, {}, ack, 0, 0)


def _result(dh: Any, records: list[CycleRecord], counts: dict[str, int], **kw: Any) -> RunResult:
    return RunResult(dh, records, Path("j"), Path("o"), None, counts, len(records), **kw)


def test_every_command_refused_is_no_control(dh: Any) -> None:
    recs = [_record(k, "refused:watchdog_tripped") for k in range(4)]
    counts = {"cycles": 4, "sent": 4, "acked": 0, "refused": 4}
    s = summarize(_result(dh, recs, counts))
    assert (s.success, s.exit_code) == (False, 6)
    assert s.verdict == (
        "NO CONTROL (exit 6): no command was acked: the gateway refused every command "
        "with watchdog_tripped (4)"
    )


def test_acked_share_decides_success(dh: Any) -> None:
    recs = [_record(k, "applied" if k < 2 else "") for k in range(4)]
    ok = summarize(_result(dh, recs, {"cycles": 4, "sent": 2, "acked": 2}))
    assert (ok.success, ok.exit_code, ok.acked_share) == (True, 0, 0.5)
    short = summarize(_result(dh, recs, {"cycles": 4, "sent": 2, "acked": 1}))
    assert short.exit_code == 6 and "acked on only 1 of 4 cycles" in short.verdict
    term = summarize(_result(dh, recs, {"acked": 2}, end="interrupted", signal="SIGTERM"))
    assert (term.exit_code, term.success) == (143, False)


def test_busy_and_deadline_cycles_count_as_holds() -> None:
    counts = dict.fromkeys(("cycles", "hold", "busy", "deadline", "stale", "fallback"), 0)
    for outcome in ("hold", "busy", "deadline", "stale", "dispatch"):
        count_cycle(counts, outcome, Decision(Outcome.HOLD, "").source)
    assert (counts["hold"], counts["busy"], counts["deadline"], counts["stale"]) == (3, 1, 1, 1)


def test_summary_json_is_strict_and_metrics_say_nan(dh: Any) -> None:
    s = summarize(_result(dh, [_record(0, outcome="hold")], {"cycles": 1, "hold": 1}))
    assert math.isnan(s.solve_p50_ms)  # no solve ran
    data = json.loads(summary_json(s), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert data["solve_p50_ms"] is None and data["exit_code"] == 6
    assert 'parallelcity_solve_p99_ms{scenario="district-heating"} NaN' in metrics_text(
        s, "district-heating"
    )


def test_controller_kind_takes_the_scenarios_table_or_is_refused(dh: Any) -> None:
    assert controller_settings(dh, "pi") == ("pi", dh.fallback_config)
    assert controller_settings(dh, None) == ("nmpc", dh.controller_config)
    with pytest.raises(ScenarioError, match=r"no \[controller\] or \[fallback\] table of kind"):
        controller_settings(dh, "linear_mpc")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--field", "garbage", "--gateway", "tcp://127.0.0.1:9"], "opc.tcp://HOST:PORT URL"),
        (["--field", "opc.tcp://127.0.0.1:9", "--gateway", "garbage"], "not a tcp:// URL"),
        (["--speed", "inf"], "finite"),
        (["--speed", "1e-9"], "from 0.001"),
        (["--speed", "0.001"], "days of wall time"),
        (["--speed", "1e6"], "ms of wall time"),
        (["--controller", "linear_mpc"], "no [controller] or [fallback] table of kind"),
    ],
)
def test_run_refuses_bad_options_before_starting(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        rc = main(["run", str(DH), "--out", str(tmp_path), *argv])
    except SystemExit as exc:  # argparse's usage error
        rc = int(exc.code or 0)
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert not any(tmp_path.iterdir())  # nothing started


def test_verify_follows_the_same_controller_rule(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["verify", str(DH), "--rig", "simulated", "--controller", "linear_mpc"])
    assert rc == 2
    assert "no [controller] or [fallback] table of kind 'linear_mpc'" in capsys.readouterr().err


def test_speed_bounds() -> None:
    assert speed_problem(900, 1440) is None and speed_problem(900, 86400) is None
    assert speed_problem(900, 900_000) is None  # 1 ms per cycle
    for bad in (0.0, -1.0, math.inf, math.nan, 1e7, 1e-9):
        assert speed_problem(900, bad) is not None, bad


def test_held_clock_stands_at_its_epoch_until_started() -> None:
    clock = SimClock(epoch=1000.0, speed=1e6, held=True)
    time.sleep(0.01)
    assert clock.now() == 1000.0
    clock.start()
    assert 1000.0 <= clock.now() < 1000.0 + 1e6  # within a second of wall time


def test_solve_worker_abandons_a_stuck_job() -> None:
    worker = SolveWorker("test-stuck")
    release = threading.Event()
    stuck = worker.submit(lambda: release.wait(30))
    queued = worker.submit(lambda: 1)
    time.sleep(0.05)
    assert worker.close() is True  # busy: abandoned, not joined
    assert queued.cancelled() and not stuck.done()
    release.set()


async def _deaf() -> None:
    """A task that swallows its cancellations (as a library loop catching too much can)."""
    while True:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            continue


def test_the_end_of_a_run_is_bounded_whatever_is_left(caplog: pytest.LogCaptureFixture) -> None:
    """asyncio.run would wait for ever here: for a task deaf to its cancellation and for a
    default-executor thread that never returns; run_bounded gives each its grace, says what
    it left behind and returns the run's result."""
    release = threading.Event()

    async def main() -> str:
        asyncio.get_running_loop().create_task(_deaf(), name="deaf")
        asyncio.get_running_loop().run_in_executor(None, release.wait, 60)
        await asyncio.sleep(0)
        return "result"

    t0 = time.monotonic()
    try:
        assert run_bounded(main(), grace_s=0.2) == "result"
        elapsed = time.monotonic() - t0
    finally:
        release.set()
    assert elapsed < 5.0  # two graces of 0.2 s; asyncio.run: never
    assert "left behind at exit" in caplog.text and "deaf" in caplog.text


class _DeafClose:
    async def __aenter__(self) -> str:
        return "open"

    async def __aexit__(self, *exc: object) -> None:
        await _deaf()


def test_a_part_that_does_not_close_is_left_behind(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> str:
        async with AsyncExitStack() as stack:
            assert await enter_bounded(stack, _DeafClose(), "the deaf part", 0.1) == "open"
        return "closed"

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("parallelcity.run.lifecycle.CANCEL_GRACE_S", 0.1)
        assert run_bounded(main(), grace_s=0.2) == "closed"
    assert "closing the deaf part did not end within 0.1 s: left behind" in caplog.text


class _IdleAfterWake:
    """The watchdog as the run's goodbye leaves it: armed until woken, then idle."""

    enabled, tripped, reverted = True, False, True

    def __init__(self, wake: asyncio.Event) -> None:
        self.wake = wake

    def deadline(self) -> float | None:
        return None if self.wake.is_set() else 1e9

    def due(self, now: float) -> bool:
        return False


def test_the_gateway_watchdog_ends_when_cancelled_as_it_is_woken() -> None:
    """The hang of a run at its end: the goodbye heartbeat wakes the gateway's watchdog
    loop in the loop iteration in which the run cancels it.  Python 3.11's wait_for then
    returned the wake-up and dropped the cancellation; the loop went on waiting, idle and
    without a timeout, and the run's task group waited for it for ever."""
    from parallelcity.gateway.server import FieldGateway

    async def main() -> bool:
        wake = asyncio.Event()
        fake = type("G", (), {})()
        fake.core = type("C", (), {"watchdog": _IdleAfterWake(wake)})()
        fake.clock, fake._wake = SimClock(epoch=0.0, speed=1.0), wake
        task = asyncio.create_task(FieldGateway._watch(fake))  # type: ignore[arg-type]
        await asyncio.sleep(0.01)  # parked in the wait for a wake-up
        wake.set()
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=2.0)
        task.cancel()
        return bool(done) and task.cancelled()

    assert asyncio.run(main())


SECOND_SIGNAL = """
import asyncio, os, signal, sys
from parallelcity.run.lifecycle import StopRequest

async def main() -> None:
    stop = StopRequest()
    stop.install()
    os.kill(os.getpid(), signal.SIGINT)
    await asyncio.wait_for(stop.event.wait(), 10)
    print("stopping", stop.signal, flush=True)
    os.kill(os.getpid(), signal.SIGINT)
    await asyncio.sleep(10)
    print("second signal ignored", flush=True)  # exit 0

asyncio.run(main())
sys.exit(0)
"""


def test_a_second_signal_while_stopping_exits_at_once(tmp_path: Path) -> None:
    script = tmp_path / "second.py"
    script.write_text(textwrap.dedent(SECOND_SIGNAL))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=30
    )
    assert done.returncode == 130, done
    assert done.stdout == "stopping SIGINT\n"
    assert "second SIGINT while stopping: exiting at once" in done.stderr


def test_an_unreachable_field_is_exit_3_naming_the_endpoint(
    dh_text: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lab = tmp_path / "lab.toml"
    lab.write_text(dh_text)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = ["--field", f"opc.tcp://127.0.0.1:{port}", "--gateway", "tcp://127.0.0.1:9"]
    rc = main(["run", str(lab), "--out", str(tmp_path / "runs"), *argv])
    err = capsys.readouterr().err
    assert rc == 3, err
    assert f"field error: cannot connect to the OPC UA endpoint opc.tcp://127.0.0.1:{port}" in err
    assert "certificate" not in err
