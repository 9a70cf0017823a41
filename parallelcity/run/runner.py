"""The loop's I/O shell: start what the scenario needs, run cycles on the clock, record everything.

Structure (one task group owns every task):

    field stand-in (embedded only) ─ OPC UA ─► mirror ─► CycleLogic (worker thread)
                                                             │ verified action
    plant ◄─ OPC UA ─ field gateway (embedded only) ◄─ ZeroMQ ─ dispatcher

The pure decision lives in ``cycle.py``; this module only moves data between
the clock, the sockets, the worker thread and the journal.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import shlex
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import AsyncExitStack, suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from parallelcity import plugins
from parallelcity.clock import SimClock
from parallelcity.decide.choice import controller_settings
from parallelcity.decide.cycle import CycleLogic, Decision, Outcome
from parallelcity.decide.gate import SimplexGate
from parallelcity.dispatch.dispatcher import ClientCurve, Dispatcher
from parallelcity.dispatch.keys import KeyPair, read_public_key, read_secret_key
from parallelcity.dispatch.wire import AckStatus, Status, WatchdogState
from parallelcity.errors import DispatchError, JournalError, ParallelCityError, SecurityError
from parallelcity.field.mirror import Mirror
from parallelcity.field.protocols import open_writer, protocol_of
from parallelcity.field.snapshot import Snapshot
from parallelcity.gateway.core import DEFAULT_MAX_COMMAND_AGE_S, GatewayCore
from parallelcity.gateway.server import FieldGateway, ServerCurve, new_zap_domain
from parallelcity.gateway.store import GatewayStore
from parallelcity.gateway.watchdog import readable_times
from parallelcity.gateway.zap import AllowList, Grant
from parallelcity.record.journal import Journal
from parallelcity.run.lifecycle import (
    SolveWorker,
    Stopped,
    StopRequest,
    speed_problem,
    unless_stopped,
)
from parallelcity.scenario.definition import Scenario
from parallelcity.scenario.text import scenario_toml
from parallelcity.specs import SafetySpecs
from parallelcity.twin.divergence import DivergenceMonitor, DivergenceSettings
from parallelcity.twin.estimate import ExtendedKalmanFilter
from parallelcity.twin.model import Array
from parallelcity.twin.twin import Twin
from parallelcity.verify.rig import FieldStandIn
from parallelcity.verify.verifier import PoolSamples, RigRecipe, Verifier

log = logging.getLogger("parallelcity.run.runner")

MIN_WATCHDOG_WALL_S = 0.5
"""An embedded watchdog window shorter than this in wall time gets a warning."""
INSECURE_BANNER = (
    "INSECURE LAB MODE: OPC UA without encryption and ZeroMQ without CURVE "
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


@dataclass
class CycleRecord:
    k: int
    t: float
    outcome: str
    source: str
    reason: str
    values: dict[str, float | None]
    bands: dict[str, tuple[float, float]]
    applied: dict[str, float]  # inputs in force after this cycle, as acknowledged
    ack: str  # "applied" | "refused:<code>" | "duplicate" | "undelivered" | ""
    solve_time_s: float
    wall_s: float


@dataclass
class RunResult:
    scenario: Scenario
    records: list[CycleRecord]
    journal_path: Path
    out_dir: Path
    stand_in: FieldStandIn | None
    counts: dict[str, int] = field(default_factory=dict)
    controller_kind: str = ""  # the kind that ran (``--controller`` may override the scenario's)
    gateway_tripped_at_start: bool = False
    """The gateway's watchdog was tripped when the run began: its commands were refused
    until someone re-armed it (``counts["refused"]``); not a successful run."""
    planned_cycles: int = 0
    end: str = "completed"  # "completed" | "interrupted" | "error" (rebuilt from a journal)
    signal: str | None = None  # "SIGINT" | "SIGTERM" when interrupted
    abandoned: str = ""  # what the stop left unfinished, if anything
    first_cycle_t: float | None = None  # simulated time of the first cycle


ProgressFn = Callable[[CycleRecord, dict[str, int]], None]


def _counts() -> dict[str, int]:
    keys = (
        "cycles",
        "sent",
        "acked",
        "refused",
        "undelivered",
        "fallback",
        "hold",
        "stale",
        "deadline",
        "busy",
    )
    return dict.fromkeys(keys, 0)


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


def _estimator(scenario: Scenario) -> ExtendedKalmanFilter | None:
    est = scenario.file.estimation
    if est is None:
        return None
    return ExtendedKalmanFilter(
        scenario.model,
        scenario.meta.cycle_s,
        biases=est.biases,
        state_std=est.state_std,
        bias_std=est.bias_std,
        measurement_std=est.measurement_std,
    )


def _divergence_monitor(scenario: Scenario) -> DivergenceMonitor | None:
    cfg = scenario.file.divergence
    if cfg is None:
        return None
    settings = DivergenceSettings(
        cfg.thresholds, cfg.window_cycles, cfg.persist_cycles, cfg.clear_cycles
    )
    return DivergenceMonitor(scenario.model, scenario.meta.cycle_s, settings)


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


def _check_zmq_security(scenario: Scenario, embedded_gateway: bool = True) -> None:
    """Refuse to dispatch over ZeroMQ without CURVE unless the scenario asks for a lab run.

    The embedded gateway gets key pairs generated for the run (``_zmq_security``);
    a separate gateway (``--gateway``) needs ``[security.zmq]``.
    """
    if scenario.insecure_lab or embedded_gateway:
        return
    if scenario.file.security.zmq is None:
        raise SecurityError(
            "dispatching to a gateway needs [security.zmq] (client_secret_key, "
            "gateway_public_key; `parallelcity keys DIR NAME` makes key pairs), or "
            "[security] insecure_lab = true for a lab run"
        )


def _issuer(scenario: Scenario, embedded_gateway: bool) -> str:
    """The issuer name this run's commands carry.

    A separate gateway binds each client key to one issuer: with CURVE the run
    speaks as ``[security.zmq] issuer`` (default: the scenario's name).
    Otherwise a name of its own for this run (the embedded gateway binds it).
    """
    cfg = scenario.file.security.zmq
    if not embedded_gateway and cfg is not None:
        return cfg.issuer or scenario.meta.name
    return f"{scenario.meta.name}-{uuid.uuid4().hex[:8]}"


def _zmq_security(
    scenario: Scenario, embedded_gateway: bool, issuer: str
) -> tuple[ClientCurve | None, ServerCurve | None]:
    """CURVE for the dispatcher, and for the embedded gateway (``None``: no CURVE).

    Embedded and not a lab run: a server and a client key pair made in memory for
    this run; the gateway allows exactly that client key, bound to ``issuer``.
    """
    cfg = scenario.file.security.zmq
    if not embedded_gateway:
        if cfg is None:
            return None, None  # insecure_lab, checked by _check_zmq_security
        base = scenario.path.parent
        keys = read_secret_key(base / cfg.client_secret_key)
        return ClientCurve(keys, read_public_key(base / cfg.gateway_public_key)), None
    if scenario.insecure_lab:
        return None, None
    server, client = KeyPair.generate(), KeyPair.generate()
    allow = AllowList.of(
        [(client.public, Grant.everything("embedded-runtime", frozenset({issuer})))]
    )
    log.info("embedded gateway: ZeroMQ CURVE with key pairs generated for this run")
    return ClientCurve(client, server.public), ServerCurve(server, allow, new_zap_domain())


def _embedded_core(scenario: Scenario, specs: SafetySpecs, speed: float) -> GatewayCore:
    """The embedded gateway's rules: the specs' limits, and the scenario's watchdog if any.

    A command reaches the gateway up to its deadline after its cycle time, so the
    ramp carries up to a cycle of unused allowance (arrival jitter, gateway clock).
    """
    meta = scenario.meta
    core = partial(
        GatewayCore,
        specs.limits,
        lease_s=2 * meta.cycle_s,
        ramp_slack_s=max(meta.cycle_s, meta.deadline),
        max_age_s=max(DEFAULT_MAX_COMMAND_AGE_S, 2 * meta.deadline),
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


async def _run(scenario: Scenario, options: RunOptions, progress: ProgressFn | None) -> RunResult:
    meta = scenario.meta
    field_protocol = protocol_of(scenario.field)
    field_protocol.check_security(scenario, embedded=options.field_endpoint is None)
    _check_zmq_security(scenario, options.gateway_endpoint is None)
    if scenario.insecure_lab:
        log.warning(INSECURE_BANNER)
    embedded = options.field_endpoint is None
    speed = (options.speed or meta.speed) if embedded else 1.0
    if embedded and (problem := speed_problem(meta.cycle_s, speed)) is not None:
        raise ValueError(problem)
    # Embedded: the simulated day stands at the scenario's start until the loop is ready
    # (set-up takes machine-dependent wall time); the plant starts there too.
    if embedded:
        clock = SimClock(epoch=meta.start_epoch, speed=speed, held=True)
    else:
        clock = SimClock(epoch=time.time(), speed=1.0)
    cycles = options.cycles or meta.cycles
    specs = SafetySpecs.from_scenario(scenario)
    model = scenario.model

    rig_kind = plugins.load("rig", scenario.file.rig.kind)
    controller_kind, controller_cfg = controller_settings(scenario, options.controller_kind)
    controller = plugins.load("controller", controller_kind).create(controller_cfg)
    fallback = plugins.load("controller", scenario.file.fallback.kind).create(
        scenario.fallback_config
    )
    twin = Twin(model, specs, meta.cycle_s, meta.horizon_steps, _estimator(scenario))
    vcfg = scenario.file.verification
    pool = PoolSamples(RigRecipe.from_scenario(scenario), vcfg.workers) if vcfg.workers else None
    verifier = Verifier(
        specs,
        rig_kind.verification_rig(scenario.rig_config, model),
        meta.cycle_s,
        runner=pool,
        deadline_s=None if vcfg.deadline_s is None else vcfg.deadline_s / speed,
    )
    logic = CycleLogic(twin, controller, fallback, verifier, SimplexGate(vcfg.reverify_cycles))
    logic.setup()
    monitor = _divergence_monitor(scenario)

    out_dir = _new_out_dir(options.out_dir, meta.name)
    journal = Journal(out_dir / "journal.sqlite")
    records: list[CycleRecord] = []
    counts = _counts()
    stand_in: FieldStandIn | None = None
    abandoned = ""
    t_first: float | None = None
    link_security = field_protocol.security(scenario, embedded=embedded, out_dir=out_dir)
    issuer = _issuer(scenario, options.gateway_endpoint is None)
    zmq_client, zmq_server = _zmq_security(scenario, options.gateway_endpoint is None, issuer)

    stop = StopRequest()
    async with AsyncExitStack() as stack, asyncio.TaskGroup() as tasks:
        stack.callback(journal.close)
        if options.handle_signals:
            stop.install()
            stack.callback(stop.uninstall)
        endpoint = options.field_endpoint
        if endpoint is None:
            stand_in_cm = rig_kind.field_stand_in(scenario.rig_config, scenario, clock)
            if link_security.server is not None:
                field_protocol.secure_stand_in(stand_in_cm, link_security.server)
            field_stand_in = await stack.enter_async_context(stand_in_cm)
            stand_in, endpoint = field_stand_in, field_stand_in.endpoint
            log.info("field stand-in serving %s at %s", scenario.field.protocol, endpoint)
        gateway_endpoint = options.gateway_endpoint
        gateway_task = None
        if gateway_endpoint is None:
            store = GatewayStore(out_dir / "gateway.sqlite")
            stack.callback(store.close)
            writer = await stack.enter_async_context(
                open_writer(
                    scenario.field,
                    endpoint,
                    security=link_security.client,
                    on_link=lambda kind, detail: store.record_event(clock.now(), kind, detail),
                )
            )
            gateway = await stack.enter_async_context(
                FieldGateway(
                    _embedded_core(scenario, specs, speed),
                    writer,
                    clock,
                    bind="tcp://127.0.0.1:0",
                    curve=zmq_server,
                    insecure_lab=scenario.insecure_lab,
                    store=store,
                )
            )
            gateway_endpoint = gateway.endpoint
            gateway_task = tasks.create_task(gateway.serve(), name="field-gateway")
            log.info("field gateway listening at %s", gateway_endpoint)
        mirror = await stack.enter_async_context(
            Mirror(scenario.field, clock, endpoint=endpoint, security=link_security.client)
        )
        dispatcher = await stack.enter_async_context(
            Dispatcher(
                gateway_endpoint,
                issuer=issuer,
                timeout_s=max(0.5, 0.2 * meta.cycle_s / speed),
                curve=zmq_client,
                insecure_lab=scenario.insecure_lab,
            )
        )
        applied_now = await mirror.read_inputs()
        u_prev = np.array([applied_now[n] for n in model.inputs], dtype=float)
        if not await mirror.wait_all_received(timeout_s=10.0):
            missing = [n for n, p in mirror.snapshot().points.items() if p.reading is None]
            log.warning("no value yet from %s; cycles needing them count as stale", missing)

        journal.start_run(
            meta.name,
            clock.now(),
            {
                "path": str(scenario.path),
                "speed": speed,
                "cycles": cycles,
                "embedded": embedded,
                "field": endpoint,
                "gateway": gateway_endpoint,
                "controller": controller_kind,
                "scenario_toml": scenario_toml(scenario),
            },
        )
        ended = [False]
        stack.push(partial(_journal_failed_end, journal, clock, records, cycles, ended))
        # First heartbeat: the gateway tells where this issuer's seq stands and how often
        # it expects heartbeats; then they go on beside the cycles.
        cycle_k = [0]
        first = await dispatcher.heartbeat(sent_at=clock.now())
        journal.record_event(0, clock.now(), "gateway", first.watchdog.value, first.detail)
        tripped_at_start = first.watchdog is WatchdogState.TRIPPED
        if tripped_at_start:
            _report_tripped(scenario, gateway_endpoint, issuer, first, journal, clock.now())
        beat_s = first.heartbeat_s / 2 if first.heartbeat_s > 0 else meta.cycle_s / 4
        watchdog_seen = [first.watchdog]

        def on_status(status: Status) -> None:
            if status.watchdog is not watchdog_seen[0]:
                watchdog_seen[0] = status.watchdog
                journal.record_event(
                    cycle_k[0], clock.now(), "gateway", status.watchdog.value, status.detail
                )

        # Everything is ready: the simulated day begins now, at the scenario's start.
        clock.start()
        if embedded:
            t_first = meta.start_epoch
        else:
            t_first = meta.start_epoch + math.ceil(
                (clock.now() - meta.start_epoch) / meta.cycle_s
            ) * (meta.cycle_s)
        log.info("first cycle at %s", _iso(t_first))
        heartbeats = tasks.create_task(
            dispatcher.heartbeat_loop(max(0.02, beat_s / speed), on_status, now=clock.now),
            name="heartbeats",
        )
        worker = SolveWorker()
        busy: Future[Decision] | None = None
        busy_k = 0
        try:
            for k in range(cycles):
                if stop.requested:
                    break
                t_k = t_first + k * meta.cycle_s
                cycle_k[0] = k
                try:
                    await unless_stopped(clock.sleep_until(t_k), stop)
                except Stopped:
                    break
                wall0 = time.perf_counter()
                snap = mirror.snapshot()
                for event in mirror.take_events():
                    journal.record_event(
                        k, event.t, "mirror", event.kind, event.detail, {"gap": event.gap}
                    )
                deadline_at = t_k + meta.deadline
                if busy is not None and not busy.done():
                    decision = Decision(Outcome.HOLD, "previous cycle's solve is still running")
                    outcome, reason = "busy", decision.reason
                else:
                    budget = max(0.0, (deadline_at - clock.now()) / speed)
                    diverged = monitor.reason if monitor is not None and monitor.alarm else None
                    busy_k = k
                    busy = worker.submit(
                        partial(
                            logic.decide,
                            t_k,
                            snap,
                            u_prev,
                            0.8 * budget,
                            verify_by=time.monotonic() + budget,
                            fallback_reason=diverged,
                        )
                    )
                    try:
                        decision = await unless_stopped(
                            asyncio.wrap_future(busy), stop, timeout=budget
                        )
                        outcome, reason = decision.outcome.value, decision.reason
                    except TimeoutError:
                        decision = Decision(Outcome.HOLD, "deadline missed while deciding")
                        outcome, reason = "deadline", decision.reason
                    except Stopped:
                        reason = f"{stop.signal} while deciding: the solve was abandoned"
                        decision = Decision(Outcome.HOLD, reason)
                        outcome = "hold"
                        abandoned = f"cycle {k}'s solve (nothing sent for it)"
                action = decision.action
                if action is not None and clock.now() > deadline_at:
                    outcome, reason = "deadline", f"decided too late: {reason}"
                    action = None
                if action is not None and outcome == Outcome.DISPATCH:
                    broken = specs.check_dispatch(u_prev, action, meta.cycle_s)
                    if broken:  # the same specs, once more on what is about to leave
                        outcome = "hold"
                        reason = f"refused at dispatch: {broken[0].describe()}"
                        log.error("cycle %d: %s", k, reason)
                        action = None
                journal.record_cycle(
                    k, t_k, snap, decision, time.perf_counter() - wall0, outcome, reason
                )
                if outcome in ("deadline", "busy"):
                    switch = logic.gate.trip(t_k, f"deadline: {reason}")
                    if switch is not None:
                        journal.record_switch(k, switch)
                ack_text = ""
                verdict = decision.verdict
                if action is not None and verdict is not None and outcome == Outcome.DISPATCH:
                    ack_text, u_prev = await _dispatch(
                        dispatcher,
                        journal,
                        k,
                        model.inputs,
                        action,
                        u_prev,
                        issued_at=t_k,
                        valid_until=deadline_at,
                        digest=verdict.digest,
                        counts=counts,
                    )
                if monitor is not None:
                    _watch_divergence(monitor, journal, k, t_k, snap, decision, u_prev)
                count_cycle(counts, outcome, decision.source)
                rec = _record(
                    k,
                    t_k,
                    snap,
                    decision,
                    outcome,
                    reason,
                    specs,
                    model.inputs,
                    u_prev,
                    ack_text,
                    time.perf_counter() - wall0,
                )
                journal.record_result(
                    k,
                    ack=rec.ack,
                    applied=rec.applied,
                    bands=rec.bands,
                    solve_time_s=rec.solve_time_s,
                    wall_s=rec.wall_s,
                )
                records.append(rec)
                if progress:
                    progress(rec, counts)
            heartbeats.cancel()
            with suppress(DispatchError):  # a clean end hands the equipment leases back
                await dispatcher.heartbeat(release=True, sent_at=clock.now())
        finally:
            if worker.close() and not abandoned:
                abandoned = f"cycle {busy_k}'s solve, still running at the end"
            if abandoned:
                log.warning("abandoned %s", abandoned)
            if pool is not None:
                pool.close()
            heartbeats.cancel()
            if gateway_task is not None:
                gateway_task.cancel()
        end = "interrupted" if stop.requested else "completed"
        _journal_end(journal, clock.now(), end, stop.signal, len(records), cycles, abandoned)
        ended[0] = True
    return RunResult(
        scenario,
        records,
        journal.path,
        out_dir,
        stand_in,
        counts,
        controller_kind,
        gateway_tripped_at_start=tripped_at_start,
        planned_cycles=cycles,
        end=end,
        signal=stop.signal,
        abandoned=abandoned,
        first_cycle_t=t_first,
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


def _journal_failed_end(
    journal: Journal,
    clock: SimClock,
    records: list[CycleRecord],
    planned: int,
    ended: list[bool],
    exc_type: type[BaseException] | None,
    exc: BaseException | None,
    tb: object,
) -> None:
    """Exit callback: journal an end by an exception (an error, or Ctrl-C unhandled)."""
    if exc is None or ended[0]:
        return
    ended[0] = True
    interrupted = isinstance(exc, KeyboardInterrupt)
    with suppress(Exception):  # the original exception is what matters
        _journal_end(
            journal,
            clock.now(),
            "interrupted" if interrupted else "error",
            "SIGINT" if interrupted else None,
            len(records),
            planned,
            "" if interrupted else _describe(exc),
        )


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


def count_cycle(counts: dict[str, int], outcome: str, source: str) -> None:
    """Add one cycle to the run's counters (the runner live, ``parallelcity report`` after)."""
    counts["cycles"] += 1
    if outcome in counts:
        counts[outcome] += 1
    if outcome in ("busy", "deadline"):  # sent nothing, as a hold; also counted by kind
        counts["hold"] += 1
    if source == "fallback":
        counts["fallback"] += 1


def _record(
    k: int,
    t: float,
    snap: Snapshot,
    decision: Decision,
    outcome: str,
    reason: str,
    specs: SafetySpecs,
    inputs: tuple[str, ...],
    u_prev: Array,
    ack: str,
    wall_s: float,
) -> CycleRecord:
    solve = sum(a.result.solve_time_s for a in decision.attempts)
    return CycleRecord(
        k=k,
        t=t,
        outcome=outcome,
        source=decision.source,
        reason=reason,
        values=snap.values(),
        bands={b.output: b.limits(t) for b in specs.bands},
        applied={n: float(v) for n, v in zip(inputs, u_prev, strict=True)},
        ack=ack,
        solve_time_s=solve,
        wall_s=wall_s,
    )
