"""What a run leaves behind, as values: one record per cycle, the run's result and its
counters.  The runner writes them live; ``parallelcity report`` rebuilds them from a
journal; the report and the plot read them.  Pure.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from parallelcity.scenario.definition import Scenario
    from parallelcity.verify.rig import FieldStandIn


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


def new_counts() -> dict[str, int]:
    """Every counter of a run, at zero."""
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


def count_cycle(counts: dict[str, int], outcome: str, source: str) -> None:
    """Add one cycle to the run's counters (the runner live, ``parallelcity report`` after)."""
    counts["cycles"] += 1
    if outcome in counts:
        counts[outcome] += 1
    if outcome in ("busy", "deadline"):  # sent nothing, as a hold; also counted by kind
        counts["hold"] += 1
    if source == "fallback":
        counts["fallback"] += 1
