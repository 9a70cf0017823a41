"""Reading a journal back: a run's cycle records, counts, end state and end, for
``parallelcity report``.

The file is opened read-only and never written.  Journals without the ``cycle_result``
table (older ones), and a last cycle cut short by a crash, are rebuilt from the cycle,
plan, command and ack rows: the cycle's wall time then leaves out its dispatch, and the
applied inputs are unknown (NaN) until the first acknowledged command.  Journals without
the end-state event (older ones, and runs that did not complete) have no end state.
"""

from __future__ import annotations

import json
import math
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from parallelcity.errors import JournalError, ScenarioError
from parallelcity.record.records import (
    CycleRecord,
    EndState,
    RunResult,
    count_cycle,
    new_counts,
)

if TYPE_CHECKING:  # imported where used: a file that is no journal is refused at once
    from parallelcity.scenario.definition import Scenario

LOCK_TIMEOUT_S = 2.0
"""How long opening waits for a journal another process holds locked."""


@dataclass(frozen=True)
class RunEnd:
    """The run-end event: how and after how many cycles the run ended."""

    cause: str  # "completed" | "interrupted" | "error"
    signal: str | None
    cycles: int
    k: int
    detail: str
    planned: int | None = None  # absent from the first journals with a run-end event
    abandoned: str = ""

    def describe(self) -> str:
        if self.cause == "completed":
            return f"completed after {self.cycles} cycles"
        if self.cause == "interrupted":
            by = f" by {self.signal}" if self.signal else ""
            return f"interrupted{by} at cycle {self.k} ({self.cycles} cycles run)"
        return f"ended by an error at cycle {self.k} ({self.cycles} cycles run): {self.detail}"


NO_END = "ended without a run-end record (crashed or still running)"


@dataclass
class JournalRun:
    """The rows of one run, as read."""

    path: Path
    run_id: int
    scenario_name: str
    started_at: float
    info: dict[str, Any]
    cycles: list[sqlite3.Row]
    solve_s: dict[int, float]
    commands: list[sqlite3.Row]
    acks: dict[str, sqlite3.Row]
    results: dict[int, sqlite3.Row]
    end: RunEnd | None
    tripped_at_start: bool = False  # the gateway's watchdog was tripped when the run began
    alarms: list[dict[str, Any]] = field(default_factory=list)  # diagnosis alarms, in order
    end_state: sqlite3.Row | None = None  # the field at the run's end (completed runs)

    def describe_end(self) -> str:
        return self.end.describe() if self.end else NO_END


def journal_path(path: Path) -> Path:
    """``path``, or the journal in it when it is a run's folder."""
    if path.is_dir() and (path / "journal.sqlite").is_file():
        return path / "journal.sqlite"
    return path


def _connect(path: Path) -> sqlite3.Connection:
    if not path.exists():
        raise JournalError(f"{path}: no such file")
    if not path.is_file():
        raise JournalError(f"{path}: not a file, nor a run folder holding a journal.sqlite")
    uri = f"file:{quote(str(path.resolve()))}?mode=ro"
    try:
        db = sqlite3.connect(uri, uri=True, timeout=LOCK_TIMEOUT_S)
        db.row_factory = sqlite3.Row
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            raise JournalError(f"{path}: the journal is locked by another process") from exc
        raise JournalError(f"{path}: cannot read the journal: {exc}") from exc
    except sqlite3.DatabaseError as exc:
        raise JournalError(f"{path}: not a journal (not an SQLite database: {exc})") from exc
    missing = {"run", "cycle", "plan", "command", "ack", "event"} - tables
    if missing:
        db.close()
        raise JournalError(
            f"{path}: not a parallelcity journal (no {', '.join(sorted(missing))} table)"
        )
    db.row_factory = sqlite3.Row
    return db


def _run_end(db: sqlite3.Connection, run_id: int) -> RunEnd | None:
    rows = list(
        db.execute(
            "SELECT k, detail, data FROM event WHERE run_id = ? AND source = 'run' "
            "AND kind = 'end' ORDER BY rowid DESC LIMIT 1",
            (run_id,),
        )
    )
    if not rows:
        return None
    data = json.loads(rows[0]["data"] or "{}")
    if not isinstance(data, dict):
        raise ValueError(f"run-end event data is not an object: {data!r}")
    cycles, planned = data.get("cycles"), data.get("planned")
    return RunEnd(
        cause=str(data.get("cause") or "completed"),
        signal=data.get("signal"),
        cycles=int(cycles) if isinstance(cycles, int) else 0,
        k=int(rows[0]["k"]),
        detail=str(rows[0]["detail"]),
        planned=int(planned) if isinstance(planned, int) else None,
        abandoned=str(data.get("abandoned") or ""),
    )


def _end_state_row(db: sqlite3.Connection, run_id: int) -> sqlite3.Row | None:
    rows = list(
        db.execute(
            "SELECT t, data FROM event WHERE run_id = ? AND source = 'run' "
            "AND kind = 'end_state' ORDER BY rowid DESC LIMIT 1",
            (run_id,),
        )
    )
    return rows[0] if rows else None


def read_journal(path: Path) -> JournalRun:
    """The last run in the journal at ``path`` (or in the run folder ``path``);
    ``JournalError`` if it is not one."""
    path = journal_path(path)
    db = _connect(path)
    try:
        db.execute("BEGIN")  # one snapshot of a journal that a running run still writes
        runs = list(db.execute("SELECT * FROM run ORDER BY id DESC LIMIT 1"))
        if not runs:
            raise JournalError(
                f"{path}: the journal holds no run (stopped or still starting before its "
                "first cycle)"
            )
        run = runs[0]
        rid = int(run["id"])
        info = json.loads(run["info"] or "{}")
        if not isinstance(info, dict):
            raise ValueError(f"run info is not an object: {info!r}")
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        results: dict[int, sqlite3.Row] = {}
        if "cycle_result" in tables:
            q = "SELECT * FROM cycle_result WHERE run_id = ?"
            results = {int(r["k"]): r for r in db.execute(q, (rid,))}
        solve: dict[int, float] = {}
        for r in db.execute(
            "SELECT k, solve_time_s FROM plan WHERE run_id = ? ORDER BY rowid", (rid,)
        ):
            solve[int(r["k"])] = solve.get(int(r["k"]), 0.0) + float(r["solve_time_s"] or 0.0)
        return JournalRun(
            path=path,
            run_id=rid,
            scenario_name=str(run["scenario"]),
            started_at=float(run["started_at"]),
            info=info,
            cycles=list(db.execute("SELECT * FROM cycle WHERE run_id = ? ORDER BY k", (rid,))),
            solve_s=solve,
            commands=list(
                db.execute("SELECT * FROM command WHERE run_id = ? ORDER BY k, seq", (rid,))
            ),
            acks={
                str(r["command_id"]): r
                for r in db.execute("SELECT * FROM ack WHERE run_id = ? ORDER BY rowid", (rid,))
            },
            results=results,
            end=_run_end(db, rid),
            tripped_at_start=any(
                db.execute(
                    "SELECT 1 FROM event WHERE run_id = ? AND source = 'gateway' "
                    "AND kind = 'tripped_at_start' LIMIT 1",
                    (rid,),
                )
            ),
            alarms=[
                json.loads(r["data"] or "{}")
                for r in db.execute(
                    "SELECT data FROM event WHERE run_id = ? AND source = 'diagnosis' "
                    "AND kind = 'alarm' ORDER BY rowid",
                    (rid,),
                )
            ],
            end_state=_end_state_row(db, rid),
        )
    except sqlite3.Error as exc:
        raise JournalError(f"{path}: cannot read the journal: {exc}") from exc
    except (ValueError, TypeError, AttributeError) as exc:  # rows the runtime never writes
        raise JournalError(f"{path}: the journal holds a malformed row: {exc}") from exc
    finally:
        db.close()


def scenario_of(run: JournalRun, override: Path | None = None) -> Scenario:
    """The scenario the run used: ``override`` if given, else the copy the journal holds,
    else the file the journal names (older journals)."""
    from parallelcity.scenario.definition import load_scenario, parse_scenario

    if override is not None:
        return load_scenario(override)
    origin = str(run.info.get("path") or "<journal>")
    text = run.info.get("scenario_toml")
    try:
        if isinstance(text, str):
            return parse_scenario(text, origin)
        if run.info.get("path"):
            return load_scenario(origin)
    except ScenarioError as exc:
        where = "the copy in the journal" if isinstance(text, str) else origin
        raise ScenarioError(
            str(run.path),
            [f"the scenario the run used ({where}) does not load; give one with --scenario FILE"]
            + exc.problems,
        ) from exc
    raise ScenarioError(
        str(run.path), ["the journal names no scenario file: give it with --scenario FILE"]
    )


def _ack_text(command_id: str, acks: dict[str, sqlite3.Row]) -> str:
    ack = acks.get(command_id)
    if ack is None:
        return "undelivered"
    if ack["status"] in ("applied", "duplicate"):
        return str(ack["status"])
    return f"refused:{ack['code'] or '?'}"


def _num(v: Any) -> float:
    return math.nan if v is None else float(v)


def records(run: JournalRun, scenario: Scenario) -> tuple[list[CycleRecord], dict[str, int]]:
    """Each cycle's record and the run's counters, as the runner had them."""
    from parallelcity.decide.cycle import Outcome

    inputs = scenario.model.inputs
    bands = scenario.safety_specs().bands
    counts = new_counts()
    by_k: dict[int, list[sqlite3.Row]] = {}
    for cmd in run.commands:
        by_k.setdefault(int(cmd["k"]), []).append(cmd)
        ack = _ack_text(str(cmd["id"]), run.acks)
        counts["sent"] += 1
        key = "acked" if ack in ("applied", "duplicate") else ack.split(":")[0]
        counts[key] += 1
    applied = dict.fromkeys(inputs, math.nan)
    out: list[CycleRecord] = []
    for row in run.cycles:
        k, t = int(row["k"]), float(row["t"])
        outcome = Outcome(str(row["outcome"]))
        count_cycle(counts, outcome, str(row["source"]))
        ack = ""
        for cmd in by_k.get(k, []):
            ack = _ack_text(str(cmd["id"]), run.acks)
            if ack in ("applied", "duplicate"):
                sent = json.loads(cmd["setpoints"])
                applied = {n: _num(sent.get(n)) for n in inputs}
        snap = json.loads(row["snapshot"])
        values = {n: None if p.get("value") is None else float(p["value"]) for n, p in snap.items()}
        rec = CycleRecord(
            k=k,
            t=t,
            outcome=outcome,
            source=str(row["source"]),
            reason=str(row["reason"]),
            values=values,
            bands={b.output: b.limits(t) for b in bands},
            applied=dict(applied),
            ack=ack,
            solve_time_s=run.solve_s.get(k, 0.0),
            wall_s=float(row["wall_s"]),
        )
        res = run.results.get(k)
        if res is not None:
            applied = {n: _num(v) for n, v in json.loads(res["applied"]).items()}
            rec.applied = dict(applied)
            rec.bands = {n: (_num(b[0]), _num(b[1])) for n, b in json.loads(res["bands"]).items()}
            rec.ack = str(res["ack"])
            rec.solve_time_s = float(res["solve_time_s"])
            rec.wall_s = float(res["wall_s"])
        out.append(rec)
    return out, counts


def end_state(run: JournalRun) -> EndState | None:
    """The field at the run's end as the runner read it, or None if the journal has none."""

    if run.end_state is None:
        return None
    data = json.loads(run.end_state["data"])
    snap = data["snapshot"]
    return EndState(
        t=float(run.end_state["t"]),
        values={n: None if p.get("value") is None else float(p["value"]) for n, p in snap.items()},
        bands={n: (_num(b[0]), _num(b[1])) for n, b in data["bands"].items()},
        applied={n: _num(v) for n, v in data["applied"].items()},
        stale=tuple(n for n, p in snap.items() if p.get("stale")),
    )


def run_result(run: JournalRun, scenario: Scenario, out_dir: Path) -> RunResult:
    """The run as ``runner.run`` returned it, to write its outputs into ``out_dir``."""

    try:
        recs, counts = records(run, scenario)
        end_row = end_state(run)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise JournalError(f"{run.path}: the journal holds a malformed row: {exc!r}") from exc
    kind = str(run.info.get("controller") or scenario.file.controller.kind)
    end = run.end
    return RunResult(
        scenario,
        recs,
        run.path,
        out_dir,
        None,
        counts,
        kind,
        gateway_tripped_at_start=run.tripped_at_start,
        planned_cycles=(end.planned if end and end.planned else len(recs)),
        # no run-end record: crashed or still running, not a completed run
        end=end.cause if end else "error",
        signal=end.signal if end else None,
        abandoned=end.abandoned if end else "",
        first_cycle_t=recs[0].t if recs else None,
        alarms=run.alarms,
        end_state=end_row,
    )
