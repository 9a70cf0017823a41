"""A cycle's command is valid until the end of its cycle: decided in time, it has the rest of
the cycle to reach the gateway; past that (plus the skew allowance) it is refused as expired.

The rule (``run.validity``) against the gateway's pure core, then over real ZeroMQ sockets
on 127.0.0.1 with the embedded gateway's rules and a clock the test moves.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sqlite3

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from parallelcity.clock import FakeClock
from parallelcity.dispatch.wire import AckStatus, Command, RefusalCode
from parallelcity.gateway.core import DEFAULT_CLOCK_SKEW_S, GatewayCore, RulingKind
from parallelcity.gateway.server import FieldGateway
from parallelcity.run.runner import RunOptions, _embedded_core
from parallelcity.run.runner import run as run_loop
from parallelcity.run.validity import (
    MIN_TRANSIT_WALL_S,
    command_window,
    gateway_allowances,
    transit_problem,
)
from parallelcity.specs import InputLimit

from .test_gateway import FakeWriter, lab_dispatcher, run

VERDICT = "cd" * 32
EPOCH = 1768176000.0  # 2026-01-12 00:00 UTC
SKEW = DEFAULT_CLOCK_SKEW_S

cycles = st.floats(1.0, 86_400.0)
shares = st.floats(0.01, 1.0)  # deadline_s / cycle_s
starts = st.integers(0, 10_000)  # cycle index from EPOCH


def cmd(setpoints: dict[str, float], seq: int, issued_at: float, valid_until: float) -> Command:
    return Command.create(
        issuer="cycle",
        seq=seq,
        issued_at=issued_at,
        valid_until=valid_until,
        setpoints=setpoints,
        verdict=VERDICT,
    )


@settings(max_examples=100, deadline=None)
@given(cycle_s=cycles, share=shares, k=starts, when=st.floats(0.0, 1.0), late=st.floats(1e-3, 1e5))
def test_valid_from_the_cycle_to_its_end_and_expired_after(
    cycle_s: float, share: float, k: int, when: float, late: float
) -> None:
    t_k = EPOCH + k * cycle_s
    w = command_window(t_k, cycle_s, share * cycle_s)
    assert w.issued_at == t_k < w.decide_by <= w.valid_until == t_k + cycle_s
    assert w.transit_s == pytest.approx((1 - share) * cycle_s, abs=1e-6)
    # never into the next cycle: its command takes over where this one ends
    assert w.valid_until == command_window(t_k + cycle_s, cycle_s, share * cycle_s).issued_at
    allow = gateway_allowances(cycle_s)
    limits = {"x": InputLimit("x", 0.0, 1.0)}
    c = cmd({"x": 0.5}, 0, w.issued_at, w.valid_until)
    # landing anywhere from the cycle's start to the end of its validity: applied
    at = w.issued_at + when * (w.valid_until + SKEW - w.issued_at)
    core = GatewayCore(limits, ramp_slack_s=allow.ramp_slack_s, max_age_s=allow.max_age_s)
    assert core.decide(c, at).outcome is RulingKind.ACCEPT
    # any later: expired, however late
    refused = core.decide(c, w.valid_until + SKEW + late)
    assert (refused.outcome, refused.code) == (RulingKind.REFUSE, RefusalCode.EXPIRED)


@settings(max_examples=100, deadline=None)
@given(
    cycle_s=st.floats(60.0, 7200.0),
    rate_per_h=st.floats(0.1, 100.0),
    plan=st.lists(
        st.tuples(st.floats(0.0, 1.0), st.sampled_from([-1.0, 1.0]), st.floats(0.0, 1.0)),
        min_size=2,
        max_size=12,
    ),
)
# full moves: one lands at the end of its validity, the next with it, the one after on time
@example(cycle_s=900.0, rate_per_h=10.0, plan=[(0, 1, 1), (1, 1, 1), (0, 1, 1), (0, 1, 1)])
def test_verified_moves_landing_anywhere_in_their_validity_pass_the_ramp(
    cycle_s: float, rate_per_h: float, plan: list[tuple[float, float, float]]
) -> None:
    """Moves of up to a cycle's ramp each (what the verifier lets through), applied in
    order at any time their validity allows, are never refused for their rate."""
    lim = InputLimit("x", -1e9, 1e9, rate_per_h)
    allow = gateway_allowances(cycle_s)
    core = GatewayCore({"x": lim}, ramp_slack_s=allow.ramp_slack_s, max_age_s=allow.max_age_s)
    u, landed = 0.0, -math.inf
    for k, (when, sign, size) in enumerate(plan):
        w = command_window(EPOCH + k * cycle_s, cycle_s, 0.5 * cycle_s)
        u += sign * size * lim.max_step(cycle_s)
        # the loop sends one command at a time: each lands after the one before
        landed = max(landed, w.issued_at + when * (w.valid_until + SKEW - w.issued_at))
        c = cmd({"x": u}, k, w.issued_at, w.valid_until)
        ruling = core.decide(c, landed)
        assert ruling.accepted, (k, ruling.detail)
        core.record_applied(c, landed)


def test_the_shipped_scenario_leaves_a_command_time_to_reach_the_gateway(dh_shipped) -> None:
    meta = dh_shipped.meta
    w = command_window(meta.start_epoch, meta.cycle_s, meta.deadline)
    assert w.transit_s / meta.speed >= MIN_TRANSIT_WALL_S
    assert transit_problem(meta.cycle_s, meta.deadline, meta.speed) is None
    # a deadline at the cycle's end leaves none: the run warns
    problem = transit_problem(meta.cycle_s, meta.cycle_s, meta.speed)
    assert problem is not None and "0 ms of wall time" in problem
    with pytest.raises(ValueError, match="deadline_s"):
        command_window(0.0, 900.0, 901.0)


def test_late_within_the_cycle_applied_once_past_it_expired_over_zeromq(dh_shipped) -> None:
    """The embedded gateway's rules behind a real socket: a command decided at the deadline
    that lands late in its cycle is applied (once, however often resent); the next cycle's
    command landing after its cycle's end is refused as expired and never written."""
    meta = dh_shipped.meta
    w0 = command_window(meta.start_epoch, meta.cycle_s, meta.deadline)
    w1 = command_window(meta.start_epoch + meta.cycle_s, meta.cycle_s, meta.deadline)
    u0 = dict(zip(dh_shipped.model.inputs, map(float, dh_shipped.model.u0), strict=True))
    u1 = {**u0, "apartment.m_flow": u0["apartment.m_flow"] + 0.1}
    # decided at the deadline, landing late in its cycle
    late = meta.start_epoch + meta.deadline + 0.9 * (meta.cycle_s - meta.deadline)
    clock, writer = FakeClock(late), FakeWriter()
    core = _embedded_core(dh_shipped, dh_shipped.safety_specs(), meta.speed)

    async def main() -> None:
        gw = FieldGateway(core, writer, clock, bind="tcp://127.0.0.1:0", insecure_lab=True)
        await gw.start()
        serving = asyncio.create_task(gw.serve())
        try:
            async with lab_dispatcher(gw.endpoint, timeout_s=2.0) as disp:
                first = disp.command(
                    u0, issued_at=w0.issued_at, valid_until=w0.valid_until, verdict_digest=VERDICT
                )
                assert (await disp.deliver(first)).status is AckStatus.APPLIED
                assert (await disp.deliver(first)).status is AckStatus.DUPLICATE
                second = disp.command(
                    u1, issued_at=w1.issued_at, valid_until=w1.valid_until, verdict_digest=VERDICT
                )
                clock.t = w1.valid_until + SKEW + 1.0
                for _ in range(2):  # a resend is as late
                    ack = await disp.deliver(second)
                    assert (ack.status, ack.code) == (AckStatus.REFUSED, RefusalCode.EXPIRED)
        finally:
            serving.cancel()
            with contextlib.suppress(BaseException):
                await serving
            await gw.aclose()

    run(main, timeout_s=20.0)
    assert writer.writes == [u0]


@pytest.mark.slow
def test_run_stamps_each_command_valid_to_the_end_of_its_cycle(dh, tmp_path) -> None:
    """The embedded loop as it runs (lab copy, PI for a quick start): what the journal says
    left for the gateway, and that the gateway applied it."""
    result = asyncio.run(
        run_loop(dh, RunOptions(cycles=2, speed=720, controller_kind="pi", out_dir=tmp_path))
    )
    with sqlite3.connect(result.journal_path) as db:
        rows = db.execute("SELECT issued_at, valid_until FROM command ORDER BY seq").fetchall()
    t0, cycle_s = dh.meta.start_epoch, dh.meta.cycle_s
    assert rows == [(t0 + k * cycle_s, t0 + (k + 1) * cycle_s) for k in range(2)]
    assert result.counts["acked"] == 2, result.counts
