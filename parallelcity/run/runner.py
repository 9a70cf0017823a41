"""The loop's I/O shell: start what the scenario needs, run cycles on the clock, record everything.

Structure (one task group owns every task):

    field stand-in (embedded only) ─ OPC UA ─► mirror ─► CycleLogic (worker thread)
                                                             │ verified action
    plant ◄─ OPC UA ─ field gateway (embedded only) ◄─ ZeroMQ ─ dispatcher

The pure decision lives in ``decide/cycle.py`` (``CycleLogic.plan`` on the worker
thread, ``finish_cycle`` on the loop thread, which alone owns the simplex gate); this
module only moves data between the clock, the sockets, the worker thread and the
journal.  Set-up is one small function per part (``_prepare``, ``_start_field``,
``_start_gateway``, ``_open_mirror``); ``_Loop.cycle`` is one cycle's I/O.  Every task
is the run's task group's; the worker thread is joined when idle and abandoned (a
daemon) only when a solve is stuck.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import shlex
import time
from concurrent.futures import Future
from contextlib import AsyncExitStack, suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from parallelcity import plugins
from parallelcity.clock import SimClock
from parallelcity.decide.assemble import cycle_logic, divergence_monitor
from parallelcity.decide.cycle import (
    CycleLogic,
    CycleStep,
    Decision,
    Outcome,
    Unsolved,
    finish_cycle,
)
from parallelcity.diagnose.diagnoser import Diagnoser
from parallelcity.diagnose.runtime import diagnoser_for, report_events
from parallelcity.dispatch.dispatcher import Dispatcher
from parallelcity.dispatch.wire import AckStatus, Status, WatchdogState
from parallelcity.errors import (
    DispatchError,
    JournalError,
    ParallelCityError,
    ScenarioError,
)
from parallelcity.field.mirror import Mirror
from parallelcity.field.protocol import LinkSecurity
from parallelcity.field.protocols import protocol_of
from parallelcity.field.snapshot import Snapshot
from parallelcity.gateway.config import open_gateway
from parallelcity.gateway.core import GatewayCore
from parallelcity.gateway.server import ServerCurve
from parallelcity.gateway.watchdog import readable_times
from parallelcity.record.journal import Journal
from parallelcity.record.records import (
    CycleRecord,
    EndState,
    ProgressFn,
    RunResult,
    count_cycle,
    end_state,
    new_counts,
)
from parallelcity.run.lifecycle import (
    SolveWorker,
    Stopped,
    StopRequest,
    enter_bounded,
    speed_problem,
    unless_stopped,
)
from parallelcity.run.security import check_zmq_security as _check_zmq_security
from parallelcity.run.security import issuer_name as _issuer
from parallelcity.run.security import zmq_security as _zmq_security
from parallelcity.run.validity import command_window, gateway_allowances, transit_problem
from parallelcity.scenario.definition import Scenario
from parallelcity.scenario.text import scenario_toml
from parallelcity.specs import SafetySpecs
from parallelcity.twin.divergence import DivergenceMonitor, fresh_readings
from parallelcity.twin.model import Array
from parallelcity.verify.rig import FieldStandIn
from parallelcity.verify.verifier import PoolSamples, RigRecipe

__all__ = ["CycleRecord", "RunOptions", "RunResult", "count_cycle", "rearm_command", "run"]

log = logging.getLogger("parallelcity.run.runner")

MIN_WATCHDOG_WALL_S = 0.5
"""An embedded watchdog window shorter than this in wall time gets a warning."""
INSECURE_BANNER = (
    "INSECURE LAB MODE: {field} without encryption and ZeroMQ without CURVE "
    "([security] insecure_lab = true). Never point this at real equipment."
)


@dataclass
class RunOptions:
    cycles: int | None = None  # default: the scenario's
    speed: float | None = None  # default: the scenario's (embedded only)
    out_dir: Path = Path("runs")
    field_endpoint: str | None = None  # None: start the rig's field stand-in
    gateway_endpoint: str | None = None  # None: start a field gateway in-process
    controller_kind: str | None = None  # the scenario's table of this kind (controller_choice)
    handle_signals: bool = False  # SIGINT / SIGTERM end the run cleanly (the CLI sets it)


async def run(
    scenario: Scenario, options: RunOptions, progress: ProgressFn | None = None
) -> RunResult:
    """Run the scenario's closed loop; returns every cycle's record.

    Raises the ``ParallelCityError`` that stopped the run (not the task group's
    ``ExceptionGroup``), so callers see one error with its message.
    """
    try:
        return await _run(scenario, options, progress)
    except ExceptionGroup as group:
        leaves = _leaves(group)
        first = next((e for e in leaves if isinstance(e, ParallelCityError)), None)
        if first is not None:
            raise first from group
        raise


def _watch_divergence(
    monitor: DivergenceMonitor,
    journal: Journal,
    k: int,
    t: float,
    snap: Snapshot,
    decision: Decision,
    u_now: Array,
) -> None:
    """Compare the field at ``t`` with the twin's prediction; the alarm, while up, sends
    the next cycles to the verified fallback."""
    x = decision.x0 if snap.link_up else None
    check = monitor.observe(t, snap, x, u_now)
    if check.change == "alarm":
        log.warning("cycle %d: %s; using the verified fallback", k, check.reason)
    elif check.change == "clear":
        log.warning("cycle %d: the twin agrees with the field again", k)
    if check.change is not None:
        detail = check.reason or "the twin agrees with the field again"
        journal.record_event(
            k, t, "divergence", check.change, detail, {"residuals": dict(check.residuals)}
        )


async def _diagnose(
    diagnoser: Diagnoser,
    journal: Journal,
    k: int,
    t: float,
    snap: Snapshot,
    decision: Decision,
    u_now: Array,
    banded: frozenset[str],
) -> list[dict[str, Any]]:
    """One cycle of diagnosis, journaled; the alarms it raised.  It only reports: what is
    dispatched stays the controller's and the fallback's business.  An isolation fits every
    hypothesis (a few hundred ms on a loaded machine), so it runs off the event loop."""
    x = decision.x0 if snap.link_up else None
    events = await asyncio.to_thread(diagnoser.observe, t, fresh_readings(snap), x, u_now)
    return report_events(diagnoser, events, k, banded, journal)


def _embedded_core(scenario: Scenario, specs: SafetySpecs, speed: float) -> GatewayCore:
    """The embedded gateway's rules: the specs' limits, and the scenario's watchdog if any.

    Its ramp slack and command age allow for the commands' validity (``run.validity``).
    """
    meta = scenario.meta
    allow = gateway_allowances(meta.cycle_s)
    core = partial(
        GatewayCore,
        specs.limits,
        lease_s=2 * meta.cycle_s,
        ramp_slack_s=allow.ramp_slack_s,
        max_age_s=allow.max_age_s,
    )
    wd = scenario.field.watchdog
    if wd is None:
        return core()
    safe = {i.name: i.safe for i in scenario.field.inputs if i.safe is not None}
    window_s = wd.heartbeat_interval_s * wd.missed_heartbeats
    log.info(
        "embedded gateway watchdog: %g s (simulated) of silence reverts to %s",
        window_s,
        ", ".join(f"{k}={v:g}" for k, v in safe.items()),
    )
    if window_s / speed < MIN_WATCHDOG_WALL_S:
        log.warning(
            "the embedded gateway's watchdog window is %.2f s of wall time at speed %g: "
            "a busy machine may trip it (raise [field.watchdog] heartbeat_interval_s)",
            window_s / speed,
            speed,
        )
    return core(
        safe=safe,
        heartbeat_interval_s=wd.heartbeat_interval_s,
        missed_heartbeats=wd.missed_heartbeats,
    )


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out


@dataclass
class _Setup:
    """What a run is, decided before any I/O: clock, speed, the decision logic."""

    scenario: Scenario
    options: RunOptions
    embedded: bool
    speed: float
    clock: SimClock
    cycles: int
    specs: SafetySpecs
    logic: CycleLogic
    monitor: DivergenceMonitor | None
    diagnoser: Diagnoser | None
    pool: PoolSamples | None
    controller_kind: str
    rig_kind: Any


def _prepare(scenario: Scenario, options: RunOptions) -> _Setup:
    """Refuse what cannot run, load the plug-ins and build the cycle's pure logic."""
    meta = scenario.meta
    field_protocol = protocol_of(scenario.field)
    field_protocol.check_security(scenario, embedded=options.field_endpoint is None)
    _check_zmq_security(scenario, options.gateway_endpoint is None)
    if scenario.insecure_lab:
        log.warning(INSECURE_BANNER.format(field=field_protocol.label))
    embedded = options.field_endpoint is None
    speed = (options.speed or meta.speed) if embedded else 1.0
    if embedded and (problem := speed_problem(meta.cycle_s, speed)) is not None:
        raise ValueError(problem)
    if (late := transit_problem(meta.cycle_s, meta.deadline, speed)) is not None:
        log.warning("%s", late)
    # Embedded: the simulated day stands at the scenario's start until the loop is ready
    # (set-up takes machine-dependent wall time); the plant starts there too.
    if embedded:
        clock = SimClock(epoch=meta.start_epoch, speed=speed, held=True)
    else:
        clock = SimClock(epoch=time.time(), speed=1.0)
    specs = scenario.safety_specs()
    rig_kind = plugins.rig_kind(scenario.file.rig.kind)
    vcfg = scenario.file.verification
    pool = PoolSamples(RigRecipe.from_scenario(scenario), vcfg.workers) if vcfg.workers else None
    cycles = options.cycles or meta.cycles
    try:
        controller_kind, logic = cycle_logic(
            scenario,
            options.controller_kind,
            runner=pool,
            deadline_s=None if vcfg.deadline_s is None else vcfg.deadline_s / speed,
            # embedded, the first cycle is at the scenario's start; else when the clock says
            end_t=meta.start_epoch + cycles * meta.cycle_s if embedded else None,
        )
    except BaseException:
        if pool is not None:
            pool.close()
        raise
    return _Setup(
        scenario,
        options,
        embedded,
        speed,
        clock,
        cycles,
        specs,
        logic,
        divergence_monitor(scenario),
        diagnoser_for(scenario),
        pool,
        controller_kind,
        rig_kind,
    )


async def _start_field(
    stack: AsyncExitStack, run: _Setup, link: LinkSecurity
) -> tuple[str, FieldStandIn | None]:
    """The field's endpoint: the given one, or the rig's stand-in started for this run."""
    scenario = run.scenario
    if run.options.field_endpoint is not None:
        return run.options.field_endpoint, None
    try:
        stand_in_cm = run.rig_kind.field_stand_in(scenario.rig_config, scenario, run.clock)
    except ValueError as exc:  # a rig kind that verifies but cannot stand in
        raise ScenarioError(str(scenario.path), [f"rig.kind: {exc}"]) from exc
    if link.server is not None:
        protocol_of(scenario.field).secure_stand_in(stand_in_cm, link.server)
    stand_in: FieldStandIn = await enter_bounded(stack, stand_in_cm, "the field stand-in")
    log.info("field stand-in serving %s at %s", scenario.field.protocol, stand_in.endpoint)
    return stand_in.endpoint, stand_in


async def _start_gateway(
    stack: AsyncExitStack,
    tasks: asyncio.TaskGroup,
    run: _Setup,
    field_endpoint: str,
    out_dir: Path,
    link_client: object | None,
    curve: ServerCurve | None,
) -> tuple[str, asyncio.Task[None] | None]:
    """The gateway's endpoint: the given one, or a gateway embedded in this run's tasks
    (its task is cancelled at the end; its store commits what it holds as it closes)."""
    if run.options.gateway_endpoint is not None:
        return run.options.gateway_endpoint, None
    scenario = run.scenario
    gateway = await enter_bounded(
        stack,
        open_gateway(
            _embedded_core(scenario, run.specs, run.speed),
            run.clock,
            field_endpoint=field_endpoint,
            field=scenario.field,
            security=link_client,
            state=out_dir / "gateway.sqlite",
            bind="tcp://127.0.0.1:0",
            curve=curve,
            insecure_lab=scenario.insecure_lab,
        ),
        "the embedded gateway",
    )
    task = tasks.create_task(gateway.serve(), name="field-gateway")
    log.info("field gateway listening at %s", gateway.endpoint)
    return gateway.endpoint, task


async def _open_mirror(
    stack: AsyncExitStack, run: _Setup, endpoint: str, security: object | None
) -> tuple[Mirror, Array]:
    """The field's mirror, and the inputs the field holds now."""
    scenario = run.scenario
    mirror = await enter_bounded(
        stack,
        Mirror(scenario.field, run.clock, endpoint=endpoint, security=security),
        "the mirror",
    )
    applied_now = await mirror.read_inputs()
    u_now = np.array([applied_now[n] for n in scenario.model.inputs], dtype=float)
    if not await mirror.wait_all_received(timeout_s=10.0):
        missing = [n for n, p in mirror.snapshot().points.items() if p.reading is None]
        log.warning("no value yet from %s; cycles needing them count as stale", missing)
    return mirror, u_now


async def _run(scenario: Scenario, options: RunOptions, progress: ProgressFn | None) -> RunResult:
    run = _prepare(scenario, options)
    meta, clock = scenario.meta, run.clock
    out_dir = _new_out_dir(options.out_dir, meta.name)
    journal = Journal(out_dir / "journal.sqlite")
    link = protocol_of(scenario.field).security(scenario, embedded=run.embedded, out_dir=out_dir)
    issuer = _issuer(scenario, options.gateway_endpoint is None)
    zmq_client, zmq_server = _zmq_security(scenario, options.gateway_endpoint is None, issuer)
    stop = StopRequest()
    async with AsyncExitStack() as stack, asyncio.TaskGroup() as tasks:
        stack.callback(journal.close)
        if options.handle_signals:
            stop.install()
            stack.callback(stop.uninstall)
        endpoint, stand_in = await _start_field(stack, run, link)
        gateway_endpoint, gateway_task = await _start_gateway(
            stack, tasks, run, endpoint, out_dir, link.client, zmq_server
        )
        mirror, u_now = await _open_mirror(stack, run, endpoint, link.client)
        dispatcher = await enter_bounded(
            stack,
            Dispatcher(
                gateway_endpoint,
                issuer=issuer,
                timeout_s=max(0.5, 0.2 * meta.cycle_s / run.speed),
                curve=zmq_client,
                insecure_lab=scenario.insecure_lab,
            ),
            "the dispatcher",
        )
        journal.start_run(
            meta.name,
            clock.now(),
            {
                "path": str(scenario.path),
                "speed": run.speed,
                "cycles": run.cycles,
                "embedded": run.embedded,
                "field": endpoint,
                "gateway": gateway_endpoint,
                "controller": run.controller_kind,
                "scenario_toml": scenario_toml(scenario),
            },
        )
        loop = _Loop(run, journal, mirror, dispatcher, stop, u_now, progress)
        stack.push(loop.journal_failed_end)
        try:
            await loop.run(tasks, gateway_endpoint, issuer)
        finally:
            loop.close()
            if run.pool is not None:
                run.pool.close()
            if gateway_task is not None:
                gateway_task.cancel()
        end = "interrupted" if stop.requested else "completed"
        loop.journal_end(end, stop.signal)
    return RunResult(
        scenario,
        loop.records,
        journal.path,
        out_dir,
        stand_in,
        loop.counts,
        run.controller_kind,
        gateway_tripped_at_start=loop.tripped_at_start,
        planned_cycles=run.cycles,
        end=end,
        signal=stop.signal,
        abandoned=loop.abandoned,
        first_cycle_t=loop.t_first,
        alarms=loop.alarms,
        end_state=loop.end_state,
    )


class _Loop:
    """The cycles on the clock: each one's I/O around the pure ``plan`` and ``finish_cycle``."""

    def __init__(
        self,
        setup: _Setup,
        journal: Journal,
        mirror: Mirror,
        dispatcher: Dispatcher,
        stop: StopRequest,
        u_now: Array,
        progress: ProgressFn | None,
    ) -> None:
        self.setup, self.journal, self.mirror, self.dispatcher = setup, journal, mirror, dispatcher
        self.stop, self.u_prev, self.progress = stop, u_now, progress
        self.clock = setup.clock
        self.records: list[CycleRecord] = []
        self.end_state: EndState | None = None
        self.counts = new_counts()
        self.worker = SolveWorker()
        self.solving: Future[Decision] | None = None
        self.solving_k = 0
        self.k = 0
        self.abandoned = ""
        self.tripped_at_start = False
        self.t_first: float | None = None
        self.ended = False
        self.watchdog_seen = WatchdogState.ARMED
        self.alarms: list[dict[str, Any]] = []

    async def run(self, tasks: asyncio.TaskGroup, gateway_endpoint: str, issuer: str) -> None:
        meta, clock, stop = self.setup.scenario.meta, self.clock, self.stop
        # First heartbeat: the gateway tells where this issuer's seq stands and how often
        # it expects heartbeats; then they go on beside the cycles.
        first = await self.dispatcher.heartbeat(sent_at=clock.now())
        self.journal.record_event(0, clock.now(), "gateway", first.watchdog.value, first.detail)
        self.watchdog_seen = first.watchdog
        if first.watchdog is WatchdogState.TRIPPED:
            self.tripped_at_start = True
            _report_tripped(
                self.setup.scenario, gateway_endpoint, issuer, first, self.journal, clock.now()
            )
        beat_s = first.heartbeat_s / 2 if first.heartbeat_s > 0 else meta.cycle_s / 4
        # Everything is ready: the simulated day begins now, at the scenario's start.
        clock.start()
        t_first = meta.start_epoch
        if not self.setup.embedded:
            t_first += math.ceil((clock.now() - meta.start_epoch) / meta.cycle_s) * meta.cycle_s
        self.t_first = t_first
        log.info("first cycle at %s", _iso(t_first))
        heartbeats = tasks.create_task(
            self.dispatcher.heartbeat_loop(
                max(0.02, beat_s / self.setup.speed), self._on_status, now=clock.now
            ),
            name="heartbeats",
        )
        try:
            for k in range(self.setup.cycles):
                if stop.requested:
                    break
                t_k = t_first + k * meta.cycle_s
                self.k = k
                try:
                    await unless_stopped(clock.sleep_until(t_k), stop)
                except Stopped:
                    break
                await self.cycle(k, t_k)
            if self.records and not stop.requested:
                await self.read_end(t_first + self.setup.cycles * meta.cycle_s)
            heartbeats.cancel()
            with suppress(DispatchError):  # a clean end hands the equipment leases back
                await self.dispatcher.heartbeat(release=True, sent_at=clock.now())
        finally:
            heartbeats.cancel()

    async def cycle(self, k: int, t_k: float) -> None:
        """One cycle: snapshot, solve on the worker thread, finish in pure code, send, record."""
        run, journal = self.setup, self.journal
        wall0 = time.perf_counter()
        snap = self.mirror.snapshot()
        for event in self.mirror.take_events():
            journal.record_event(k, event.t, "mirror", event.kind, event.detail, {"gap": event.gap})
        meta = run.scenario.meta
        window = command_window(t_k, meta.cycle_s, meta.deadline)
        solved = await self._solve(k, t_k, snap, window.decide_by)
        step = finish_cycle(
            solved,
            decided_at=self.clock.now(),
            deadline_at=window.decide_by,
            check_dispatch=partial(self._check_dispatch, k),
        )
        d = step.decision
        journal.record_cycle(
            k, t_k, snap, d, time.perf_counter() - wall0, step.outcome, step.reason
        )
        gate = run.logic.gate
        if step.adopt and d.gate is not None:
            gate.adopt(d.gate, d.switches)
        if step.trip is not None and (switch := gate.trip(t_k, step.trip)) is not None:
            journal.record_switch(k, switch)
        ack = ""
        if step.action is not None and (verdict := d.verdict) is not None:
            ack, self.u_prev = await _dispatch(
                self.dispatcher,
                journal,
                k,
                run.scenario.model.inputs,
                step.action,
                self.u_prev,
                issued_at=window.issued_at,
                valid_until=window.valid_until,
                digest=verdict.digest,
                counts=self.counts,
            )
        if run.monitor is not None:
            _watch_divergence(run.monitor, journal, k, t_k, snap, d, self.u_prev)
        if run.diagnoser is not None:
            banded = frozenset(b.output for b in run.specs.bands)
            self.alarms += await _diagnose(
                run.diagnoser, journal, k, t_k, snap, d, self.u_prev, banded
            )
        count_cycle(self.counts, step.outcome, d.source)
        rec = _record(
            k, t_k, snap, step, run.specs, run.scenario.model.inputs, self.u_prev, ack, wall0
        )
        journal.record_result(
            k,
            ack=rec.ack,
            applied=rec.applied,
            bands=rec.bands,
            solve_time_s=rec.solve_time_s,
            wall_s=rec.wall_s,
        )
        self.records.append(rec)
        if self.progress:
            self.progress(rec, self.counts)

    async def read_end(self, t_end: float) -> None:
        """Once every cycle ran: wait out the last cycle's interval (heartbeats go on, the
        last command stays in force) and read the field at the run's end.  A stop while
        waiting leaves no end state: the run did not reach its end."""
        try:
            await unless_stopped(self.clock.sleep_until(t_end), self.stop)
        except Stopped:
            return
        k = len(self.records)
        snap = self.mirror.snapshot()
        for event in self.mirror.take_events():
            self.journal.record_event(
                k, event.t, "mirror", event.kind, event.detail, {"gap": event.gap}
            )
        run = self.setup
        end = end_state(t_end, snap, run.specs.bands, run.scenario.model.inputs, self.u_prev)
        self.journal.record_end_state(k, t_end, snap, end.applied, end.bands)
        self.end_state = end

    async def _solve(
        self, k: int, t_k: float, snap: Snapshot, deadline_at: float
    ) -> Decision | Unsolved:
        """The cycle's decision from the worker thread, or why there is none."""
        if self.solving is not None and not self.solving.done():
            return Unsolved(Outcome.BUSY, "previous cycle's solve is still running")
        run = self.setup
        budget = max(0.0, (deadline_at - self.clock.now()) / run.speed)
        monitor = run.monitor
        diverged = monitor.reason if monitor is not None and monitor.alarm else None
        self.solving_k = k
        self.solving = self.worker.submit(
            partial(
                run.logic.plan,
                t_k,
                snap,
                self.u_prev,
                0.8 * budget,
                gate=run.logic.gate.state,
                verify_by=time.monotonic() + budget,
                fallback_reason=diverged,
            )
        )
        try:
            return await unless_stopped(
                asyncio.wrap_future(self.solving), self.stop, timeout=budget
            )
        except TimeoutError:
            return Unsolved(Outcome.DEADLINE, "deadline missed while deciding")
        except Stopped:
            self.abandoned = f"cycle {k}'s solve (nothing sent for it)"
            why = f"{self.stop.signal} while deciding: the solve was abandoned"
            return Unsolved(Outcome.HOLD, why)

    def _check_dispatch(self, k: int, action: Array) -> str | None:
        """The same specs, once more on what is about to leave."""
        broken = self.setup.specs.check_dispatch(
            self.u_prev, action, self.setup.scenario.meta.cycle_s
        )
        if not broken:
            return None
        log.error("cycle %d: refused at dispatch: %s", k, broken[0].describe())
        return broken[0].describe()

    def _on_status(self, status: Status) -> None:
        if status.watchdog is not self.watchdog_seen:
            self.watchdog_seen = status.watchdog
            self.journal.record_event(
                self.k, self.clock.now(), "gateway", status.watchdog.value, status.detail
            )

    def close(self) -> None:
        """Stop the worker thread: joined when idle, abandoned (daemon) when a solve is stuck."""
        if self.worker.close(wait_s=1.0) and not self.abandoned:
            self.abandoned = f"cycle {self.solving_k}'s solve, still running at the end"
        if self.abandoned:
            log.warning("abandoned %s", self.abandoned)

    def journal_end(self, cause: str, signal: str | None, note: str | None = None) -> None:
        """The run's last journal record, written once."""
        if self.ended:
            return
        self.ended = True
        _journal_end(
            self.journal,
            self.clock.now(),
            cause,
            signal,
            len(self.records),
            self.setup.cycles,
            self.abandoned if note is None else note,
        )

    def journal_failed_end(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: object,
    ) -> None:
        """Exit callback: journal an end by an exception (an error, or Ctrl-C unhandled)."""
        if exc is None or self.ended:
            return
        interrupted = isinstance(exc, KeyboardInterrupt)
        with suppress(Exception):  # the original exception is what matters
            self.journal_end(
                "interrupted" if interrupted else "error",
                "SIGINT" if interrupted else None,
                "" if interrupted else _describe(exc),
            )


def rearm_command(scenario: Scenario, endpoint: str, issuer: str) -> str:
    """The ``parallelcity rearm`` line that re-arms the run's gateway with the run's keys."""
    cfg = scenario.file.security.zmq
    if cfg is None:
        keys = "--insecure-lab"
    else:
        base = scenario.path.parent
        keys = (
            f"--key {shlex.quote(str(base / cfg.client_secret_key))} "
            f"--gateway-key {shlex.quote(str(base / cfg.gateway_public_key))}"
        )
    return (
        f"parallelcity rearm {shlex.quote(endpoint)} --reason 'field checked' {keys} "
        f"--issuer {shlex.quote(issuer)}"
    )


def _report_tripped(
    scenario: Scenario, endpoint: str, issuer: str, status: Status, journal: Journal, now: float
) -> None:
    """Say at once, and in the journal, that this run's commands will be refused."""
    line = rearm_command(scenario, endpoint, issuer)
    log.error(
        "the field gateway at %s has TRIPPED its watchdog: it holds its safe values and will "
        "refuse every command of this run until re-armed (%s). Once the field is checked, "
        "re-arm it with a key allowed to: %s",
        endpoint,
        readable_times(status.detail, status.gateway_time),
        line,
    )
    journal.record_event(0, now, "gateway", "tripped_at_start", f"{status.detail}; {line}")


def _new_out_dir(parent: Path, name: str) -> Path:
    """A folder of its own for this run: runs started in the same second do not share one."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        for n in range(1, 1000):
            path = parent / (f"{name}-{stamp}" if n == 1 else f"{name}-{stamp}-{n}")
            try:
                path.mkdir()
            except FileExistsError:
                continue
            return path
    except OSError as exc:
        raise JournalError(f"cannot create a run folder in {parent}: {exc}") from exc
    raise JournalError(f"no free run folder for {name}-{stamp} in {parent}")


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ (%a)")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        leaves = _leaves(exc)
        first = next((e for e in leaves if isinstance(e, ParallelCityError)), None)
        exc = first or (leaves[0] if leaves else exc)
    return f"{type(exc).__name__}: {exc}"


def _journal_end(
    journal: Journal,
    t: float,
    cause: str,
    signal: str | None,
    n: int,
    planned: int,
    note: str = "",
) -> None:
    """The run's last journal record, for every end (``parallelcity report`` reads it)."""
    if cause == "completed":
        detail = f"completed {n} of {planned} cycles"
    elif cause == "interrupted":
        detail = f"interrupted by {signal or 'a signal'} at cycle {n} of {planned}"
    else:
        detail = f"ended by an error at cycle {n} of {planned}"
    if note:
        detail += f": {note}" if cause == "error" else f"; abandoned {note}"
    journal.record_event(
        n,
        t,
        "run",
        "end",
        detail,
        {"cause": cause, "signal": signal, "cycles": n, "planned": planned, "abandoned": note},
    )


async def _dispatch(
    dispatcher: Dispatcher,
    journal: Journal,
    k: int,
    names: tuple[str, ...],
    action: Array,
    u_prev: Array,
    *,
    issued_at: float,
    valid_until: float,
    digest: str,
    counts: dict[str, int],
) -> tuple[str, Array]:
    setpoints = {n: float(v) for n, v in zip(names, action, strict=True)}
    cmd = dispatcher.command(
        setpoints, issued_at=issued_at, valid_until=valid_until, verdict_digest=digest
    )
    journal.record_command(k, cmd)
    counts["sent"] += 1
    try:
        ack = await dispatcher.deliver(cmd)
    except DispatchError as exc:
        log.error("cycle %d: %s", k, exc)
        counts["undelivered"] += 1
        return "undelivered", u_prev
    journal.record_ack(ack, time.time())
    if ack.status in (AckStatus.APPLIED, AckStatus.DUPLICATE):
        counts["acked"] += 1
        return ack.status.value, np.asarray(action, dtype=float)
    counts["refused"] += 1
    code = ack.code.value if ack.code else "?"
    log.warning("cycle %d: gateway refused %s: %s", k, code, ack.detail)
    return f"refused:{code}", u_prev


def _record(
    k: int,
    t: float,
    snap: Snapshot,
    step: CycleStep,
    specs: SafetySpecs,
    inputs: tuple[str, ...],
    u_prev: Array,
    ack: str,
    wall0: float,
) -> CycleRecord:
    solve = sum(a.result.solve_time_s for a in step.decision.attempts)
    return CycleRecord(
        k=k,
        t=t,
        outcome=step.outcome,
        source=step.decision.source,
        reason=step.reason,
        values=snap.values(),
        bands={b.output: b.limits(t) for b in specs.bands},
        applied={n: float(v) for n, v in zip(inputs, u_prev, strict=True)},
        ack=ack,
        solve_time_s=solve,
        wall_s=time.perf_counter() - wall0,
    )
