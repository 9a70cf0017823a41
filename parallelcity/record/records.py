"""What a run leaves behind, as values: each cycle's record, the field's state at the
run's end, the run's counters and result.

Pure (no I/O): the runner fills these live, ``record.journal_read`` rebuilds them
from a journal, and the report and plot read them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from parallelcity.decide.cycle import Outcome

if TYPE_CHECKING:
    from parallelcity.field.snapshot import Snapshot
    from parallelcity.scenario.definition import Scenario
    from parallelcity.specs import Band
    from parallelcity.verify.rig import FieldStandIn


@dataclass
class CycleRecord:
    k: int
    t: float
    outcome: Outcome
    source: str
    reason: str
    values: dict[str, float | None]
    bands: dict[str, tuple[float, float]]
    applied: dict[str, float]  # inputs in force after this cycle, as acknowledged
    ack: str  # "applied" | "refused:<code>" | "duplicate" | "undelivered" | ""
    solve_time_s: float
    wall_s: float


@dataclass(frozen=True)
class EndState:
    """The field as read at the run's end, once the last cycle's interval has passed.

    Not a cycle: nothing was decided or sent, so it is kept apart from ``records`` and
    no counter or KPI counts it; the CSV and the plot end with it.  Read only when a run
    completes (an interrupted or failed run has none).
    """

    t: float
    values: dict[str, float | None]  # the last readings, as a cycle records them
    bands: dict[str, tuple[float, float]]
    applied: dict[str, float]  # the inputs in force, as the last cycle left them
    stale: tuple[str, ...] = ()  # points whose reading was stale at the end


def end_state(
    t: float,
    snap: Snapshot,
    bands: Sequence[Band],
    inputs: Sequence[str],
    u_in_force: Iterable[float],
) -> EndState:
    """The end state from the snapshot read at the run's end ``t``."""
    return EndState(
        t=t,
        values=snap.values(),
        bands={b.output: b.limits(t) for b in bands},
        applied={n: float(v) for n, v in zip(inputs, u_in_force, strict=True)},
        stale=tuple(n for n, p in snap.points.items() if p.stale),
    )


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
    alarms: list[dict[str, Any]] = field(default_factory=list)  # diagnosis alarms (as_dict)
    # per planted fault: cycles it showed on the diagnosis channels (experiment runs)
    fault_visible_cycles: list[int | None] = field(default_factory=list)
    end_state: EndState | None = None  # the field after the last cycle (completed runs)


ProgressFn = Callable[[CycleRecord, dict[str, int]], None]

COUNTERS = (
    "cycles",
    "sent",
    "acked",
    "refused",
    "undelivered",
    "fallback",
    *(o.value for o in Outcome if o is not Outcome.DISPATCH),
)


def new_counts() -> dict[str, int]:
    return dict.fromkeys(COUNTERS, 0)


def count_cycle(counts: dict[str, int], outcome: Outcome | str, source: str) -> None:
    """Add one cycle to the run's counters (the runner live, ``parallelcity report`` after)."""
    outcome = Outcome(outcome)
    counts["cycles"] += 1
    if outcome.value in counts:
        counts[outcome.value] += 1
    if outcome.sends_nothing_by_time:  # sent nothing, as a hold; also counted by kind
        counts["hold"] += 1
    if source == "fallback":
        counts["fallback"] += 1
