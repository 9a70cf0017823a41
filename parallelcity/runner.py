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
import logging
import math
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import plugins
from .clock import SimClock
from .cycle import CycleLogic, Decision, Outcome
from .dispatcher import Dispatcher
from .errors import DispatchError, ParallelCityError, SecurityError
from .gateway import FieldGateway, GatewayCore, OpcUaWriter
from .journal import Journal
from .mirror import Mirror
from .model import Array
from .rig import FieldStandIn
from .scenario import Scenario
from .snapshot import Snapshot
from .specs import SafetySpecs
from .twin import Twin
from .verify import Verifier
from .wire import AckStatus

log = logging.getLogger("parallelcity.runner")

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
    controller_kind: str | None = None  # override the scenario's controller kind


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


def _check_opcua_security(scenario: Scenario) -> None:
    """Refuse to run OPC UA without security unless the scenario asks for a lab run."""
    if not scenario.insecure_lab:
        raise SecurityError(
            "secure OPC UA is not available in this release; set "
            "[security] insecure_lab = true for a lab run on loopback"
        )


def _check_zmq_security(scenario: Scenario) -> None:
    """Refuse to dispatch over ZeroMQ without CURVE unless the scenario asks for a lab run."""
    if not scenario.insecure_lab:
        raise SecurityError(
            "CURVE for ZeroMQ is not available in this release; set "
            "[security] insecure_lab = true for a lab run on loopback"
        )


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out


async def _run(scenario: Scenario, options: RunOptions, progress: ProgressFn | None) -> RunResult:
    meta = scenario.meta
    _check_opcua_security(scenario)
    _check_zmq_security(scenario)
    if scenario.insecure_lab:
        log.warning(INSECURE_BANNER)
    embedded = options.field_endpoint is None
    speed = (options.speed or meta.speed) if embedded else 1.0
    epoch = meta.start_epoch if embedded else time.time()
    clock = SimClock(epoch=epoch, speed=speed)
    cycles = options.cycles or meta.cycles
    specs = SafetySpecs.from_scenario(scenario)
    model = scenario.model

    rig_kind = plugins.load("rig", scenario.file.rig.kind)
    controller_kind = options.controller_kind or scenario.file.controller.kind
    controller_cfg = scenario.controller_config
    if options.controller_kind and options.controller_kind != scenario.file.controller.kind:
        controller_cfg = plugins.load("controller", controller_kind).Config()
    controller = plugins.load("controller", controller_kind).create(controller_cfg)
    fallback = plugins.load("controller", scenario.file.fallback.kind).create(
        scenario.fallback_config
    )
    twin = Twin(model, specs, meta.cycle_s, meta.horizon_steps)
    verifier = Verifier(specs, rig_kind.verification_rig(scenario.rig_config, model), meta.cycle_s)
    logic = CycleLogic(twin, controller, fallback, verifier)
    logic.setup()

    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = options.out_dir / f"{meta.name}-{stamp}"
    journal = Journal(out_dir / "journal.sqlite")
    records: list[CycleRecord] = []
    counts = _counts()
    stand_in: FieldStandIn | None = None

    async with AsyncExitStack() as stack, asyncio.TaskGroup() as tasks:
        endpoint = options.field_endpoint
        if endpoint is None:
            field_stand_in = await stack.enter_async_context(
                rig_kind.field_stand_in(scenario.rig_config, scenario, clock)
            )
            stand_in, endpoint = field_stand_in, field_stand_in.endpoint
            log.info("field stand-in serving OPC UA at %s", endpoint)
        gateway_endpoint = options.gateway_endpoint
        gateway_task = None
        if gateway_endpoint is None:
            writer = await stack.enter_async_context(OpcUaWriter(endpoint, scenario.field))
            gateway = await stack.enter_async_context(
                FieldGateway(
                    GatewayCore(specs.limits),
                    writer,
                    clock,
                    bind="tcp://127.0.0.1:0",
                    insecure_lab=scenario.insecure_lab,
                )
            )
            gateway_endpoint = gateway.endpoint
            gateway_task = tasks.create_task(gateway.serve(), name="field-gateway")
            log.info("field gateway listening at %s", gateway_endpoint)
        mirror = await stack.enter_async_context(Mirror(scenario.field, clock, endpoint=endpoint))
        dispatcher = await stack.enter_async_context(
            Dispatcher(
                gateway_endpoint,
                issuer=f"{meta.name}-{uuid.uuid4().hex[:8]}",
                timeout_s=max(0.5, 0.2 * meta.cycle_s / speed),
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
            },
        )
        t_first = meta.start_epoch + math.ceil((clock.now() - meta.start_epoch) / meta.cycle_s) * (
            meta.cycle_s
        )
        worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cycle")
        busy: Future[Decision] | None = None
        try:
            for k in range(cycles):
                t_k = t_first + k * meta.cycle_s
                await clock.sleep_until(t_k)
                wall0 = time.perf_counter()
                snap = mirror.snapshot()
                deadline_at = t_k + meta.deadline
                if busy is not None and not busy.done():
                    decision = Decision(Outcome.HOLD, "previous cycle's solve is still running")
                    outcome, reason = "busy", decision.reason
                else:
                    budget = max(0.0, (deadline_at - clock.now()) / speed)
                    busy = worker.submit(logic.decide, t_k, snap, u_prev, 0.8 * budget)
                    try:
                        decision = await asyncio.wait_for(asyncio.wrap_future(busy), budget)
                        outcome, reason = decision.outcome.value, decision.reason
                    except TimeoutError:
                        decision = Decision(Outcome.HOLD, "deadline missed while deciding")
                        outcome, reason = "deadline", decision.reason
                action = decision.action
                if action is not None and clock.now() > deadline_at:
                    outcome, reason = "deadline", f"decided too late: {reason}"
                    action = None
                journal.record_cycle(
                    k, t_k, snap, decision, time.perf_counter() - wall0, outcome, reason
                )
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
                _count(counts, outcome, decision)
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
                records.append(rec)
                if progress:
                    progress(rec, counts)
        finally:
            worker.shutdown(wait=False, cancel_futures=True)
            if gateway_task is not None:
                gateway_task.cancel()
            journal.close()
    return RunResult(scenario, records, journal.path, out_dir, stand_in, counts)


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


def _count(counts: dict[str, int], outcome: str, decision: Decision) -> None:
    counts["cycles"] += 1
    if outcome in counts:
        counts[outcome] += 1
    if decision.source == "fallback":
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
