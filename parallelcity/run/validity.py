"""When a cycle's command may be applied: the times the runtime stamps on it.

Cycle ``k`` starts at ``t_k``; its plan starts from the snapshot taken then and its first
move is meant for the cycle ``[t_k, t_k + cycle_s)``.  The decision must be reached by
``t_k + deadline_s`` (a later one is not sent); the command stays valid until the end of
its cycle, ``t_k + cycle_s``, when the next cycle's plan takes over.  The rest of the
cycle, ``cycle_s - deadline_s``, is the time a command decided just in time has to reach
the gateway, which refuses it as ``expired`` after ``valid_until`` (plus its clock skew
allowance).  All times are simulated seconds; the wall time they take is divided by the
run's speed.
"""

from __future__ import annotations

from dataclasses import dataclass

from parallelcity.gateway.core import DEFAULT_CLOCK_SKEW_S, DEFAULT_MAX_COMMAND_AGE_S

MIN_TRANSIT_WALL_S = 0.2
"""Wall time a command decided at the deadline should have to reach the gateway: on a
loaded 2-core machine the way from a decision to the gateway's ruling (journal, CURVE,
the event loop) took tens of ms typically and up to 0.16 s at a load average of 13."""


@dataclass(frozen=True)
class CommandWindow:
    """The times of one cycle's command, simulated seconds."""

    issued_at: float
    """``t_k``: the cycle's time, which its snapshot and plan start from."""
    decide_by: float
    """``t_k + deadline_s``: a decision reached later is not sent."""
    valid_until: float
    """``t_k + cycle_s``: the end of the cycle the command was computed for."""

    @property
    def transit_s(self) -> float:
        """How long a command decided at ``decide_by`` has to reach the gateway."""
        return self.valid_until - self.decide_by


def command_window(t_k: float, cycle_s: float, deadline_s: float) -> CommandWindow:
    """The command times of the cycle at ``t_k`` (``0 < deadline_s <= cycle_s``)."""
    if not 0 < deadline_s <= cycle_s:
        raise ValueError(f"deadline_s {deadline_s:g} must be in (0, cycle_s {cycle_s:g}]")
    return CommandWindow(t_k, t_k + deadline_s, t_k + cycle_s)


def transit_problem(cycle_s: float, deadline_s: float, speed: float) -> str | None:
    """Why a command decided at the deadline may expire on its way at ``speed``, or None."""
    wall = (cycle_s - deadline_s) / speed
    if wall >= MIN_TRANSIT_WALL_S:
        return None
    return (
        f"a command decided at the deadline has {wall * 1e3:.3g} ms of wall time to reach the "
        f"gateway before it expires (cycle_s {cycle_s:g} - deadline_s {deadline_s:g} at speed "
        f"{speed:g}); a busy machine may see it refused as expired (lower deadline_s or the "
        "speed)"
    )


@dataclass(frozen=True)
class GatewayAllowances:
    """What a gateway must allow for commands stamped by ``command_window``."""

    ramp_slack_s: float
    """Ramp allowance an input carries over: a command lands anywhere from its cycle's
    start to its validity plus the skew, so verified moves of a cycle's worth each, landing
    that unevenly, are never refused for their rate."""
    max_age_s: float
    """How old an ``issued_at`` may be: a valid command is at most ``cycle_s`` old."""


def gateway_allowances(
    cycle_s: float, clock_skew_s: float = DEFAULT_CLOCK_SKEW_S
) -> GatewayAllowances:
    """The embedded gateway's allowances for a run with cycles of ``cycle_s``."""
    return GatewayAllowances(cycle_s + clock_skew_s, max(DEFAULT_MAX_COMMAND_AGE_S, 2 * cycle_s))
