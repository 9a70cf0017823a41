"""The journal: every cycle's snapshot, plans, verdicts, command and ack, in SQLite.

WAL mode so readers never block the writer; ``synchronous=FULL`` because a
command that left must never be missing after a crash.  One transaction per
cycle.  Arrays are stored as JSON lists; NaN is stored as null.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from parallelcity.decide.cycle import Decision
from parallelcity.decide.gate import Switch
from parallelcity.dispatch.wire import Ack, Command
from parallelcity.errors import JournalError
from parallelcity.field.snapshot import Snapshot

SCHEMA = """
CREATE TABLE IF NOT EXISTS run (
    id INTEGER PRIMARY KEY,
    scenario TEXT NOT NULL,
    started_at REAL NOT NULL,
    info TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS cycle (
    run_id INTEGER NOT NULL REFERENCES run(id),
    k INTEGER NOT NULL,
    t REAL NOT NULL,
    outcome TEXT NOT NULL,
    source TEXT NOT NULL,
    reason TEXT NOT NULL,
    wall_s REAL NOT NULL,
    snapshot TEXT NOT NULL,
    PRIMARY KEY (run_id, k)
);
CREATE TABLE IF NOT EXISTS plan (
    run_id INTEGER NOT NULL, k INTEGER NOT NULL, role TEXT NOT NULL,
    status TEXT NOT NULL, cost REAL, iterations INTEGER, solve_time_s REAL,
    message TEXT NOT NULL, u_plan TEXT NOT NULL, y_pred TEXT NOT NULL,
    PRIMARY KEY (run_id, k, role)
);
CREATE TABLE IF NOT EXISTS verdict (
    run_id INTEGER NOT NULL, k INTEGER NOT NULL, role TEXT NOT NULL,
    approved INTEGER NOT NULL, digest TEXT NOT NULL, rig TEXT NOT NULL,
    violations TEXT NOT NULL, note TEXT NOT NULL, y_rig TEXT NOT NULL,
    PRIMARY KEY (run_id, k, role)
);
CREATE TABLE IF NOT EXISTS verdict_evidence (
    run_id INTEGER NOT NULL, k INTEGER NOT NULL, role TEXT NOT NULL,
    digest TEXT NOT NULL, status TEXT NOT NULL, samples INTEGER NOT NULL,
    worst_sample INTEGER NOT NULL, evidence TEXT NOT NULL,
    PRIMARY KEY (run_id, k, role)
);
CREATE TABLE IF NOT EXISTS gate_switch (
    run_id INTEGER NOT NULL, k INTEGER NOT NULL, t REAL NOT NULL,
    from_mode TEXT NOT NULL, to_mode TEXT NOT NULL, reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS command (
    id TEXT PRIMARY KEY, run_id INTEGER NOT NULL, k INTEGER NOT NULL,
    seq INTEGER NOT NULL, issued_at REAL NOT NULL, valid_until REAL NOT NULL,
    setpoints TEXT NOT NULL, verdict_digest TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS ack (
    command_id TEXT NOT NULL REFERENCES command(id), run_id INTEGER NOT NULL,
    status TEXT NOT NULL, code TEXT NOT NULL, detail TEXT NOT NULL,
    applied_at REAL, received_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS cycle_result (
    run_id INTEGER NOT NULL, k INTEGER NOT NULL, ack TEXT NOT NULL, applied TEXT NOT NULL,
    bands TEXT NOT NULL, solve_time_s REAL NOT NULL, wall_s REAL NOT NULL,
    PRIMARY KEY (run_id, k)
);
CREATE TABLE IF NOT EXISTS event (
    run_id INTEGER NOT NULL, k INTEGER NOT NULL, t REAL NOT NULL,
    source TEXT NOT NULL, kind TEXT NOT NULL, detail TEXT NOT NULL, data TEXT NOT NULL
);
"""


def _json(value: Any) -> str:
    def clean(v: Any) -> Any:
        if isinstance(v, np.ndarray):
            return clean(v.tolist())
        if isinstance(v, float):
            return v if math.isfinite(v) else None
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        return v

    return json.dumps(clean(value), separators=(",", ":"))


def _snapshot_dict(s: Snapshot) -> dict[str, dict[str, Any]]:
    return {
        name: {
            "value": p.reading.value if p.reading else None,
            "source_time": p.reading.source_time if p.reading else None,
            "status": p.reading.status_code if p.reading else None,
            "stale": p.stale,
            "why": p.why,
        }
        for name, p in s.points.items()
    }


def _snapshot_json(s: Snapshot) -> str:
    return _json(_snapshot_dict(s))


class Journal:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise JournalError(f"cannot open journal {self.path}: {exc}") from exc
        self.run_id = 0

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        try:
            self._db.execute("BEGIN")
            yield self._db
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._db.execute("ROLLBACK")
            raise JournalError(f"journal write failed ({self.path}): {exc}") from exc

    def start_run(self, scenario: str, started_at: float, info: Mapping[str, Any]) -> int:
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO run (scenario, started_at, info) VALUES (?, ?, ?)",
                (scenario, started_at, _json(dict(info))),
            )
        self.run_id = int(cur.lastrowid or 0)
        return self.run_id

    def record_cycle(
        self,
        k: int,
        t: float,
        snapshot: Snapshot,
        decision: Decision,
        wall_s: float,
        outcome: str | None = None,
        reason: str | None = None,
    ) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO cycle VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    self.run_id,
                    k,
                    t,
                    outcome or decision.outcome.value,
                    decision.source,
                    reason or decision.reason,
                    wall_s,
                    _snapshot_json(snapshot),
                ),
            )
            for a in decision.attempts:
                r = a.result
                db.execute(
                    "INSERT INTO plan VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        self.run_id,
                        k,
                        a.role,
                        r.status.value,
                        r.cost if math.isfinite(r.cost) else None,
                        r.iterations,
                        r.solve_time_s,
                        r.message,
                        _json(r.u_plan),
                        _json(r.y_pred),
                    ),
                )
                if a.verdict is not None:
                    v = a.verdict
                    db.execute(
                        "INSERT INTO verdict VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            self.run_id,
                            k,
                            a.role,
                            int(v.approved),
                            v.digest,
                            v.rig,
                            _json([vi.__dict__ for vi in v.violations]),
                            v.note,
                            _json(v.y_rig),
                        ),
                    )
                    db.execute(
                        "INSERT INTO verdict_evidence VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            self.run_id,
                            k,
                            a.role,
                            v.digest,
                            v.status.value,
                            v.samples,
                            v.worst_sample,
                            _json(v.evidence()),
                        ),
                    )
            for sw in decision.switches:
                self._insert_switch(db, k, sw)

    def _insert_switch(self, db: sqlite3.Connection, k: int, sw: Switch) -> None:
        db.execute(
            "INSERT INTO gate_switch VALUES (?, ?, ?, ?, ?, ?)",
            (self.run_id, k, sw.t, sw.frm.value, sw.to.value, sw.reason),
        )

    def record_switch(self, k: int, sw: Switch) -> None:
        """A gate switch decided outside ``CycleLogic`` (e.g. a missed deadline)."""
        with self._tx() as db:
            self._insert_switch(db, k, sw)

    def record_command(self, k: int, cmd: Command) -> None:
        """Written before the command is sent, so a crash never loses a command that left."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO command VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    cmd.id,
                    self.run_id,
                    k,
                    cmd.seq,
                    cmd.issued_at,
                    cmd.valid_until,
                    _json(cmd.setpoints),
                    cmd.verdict,
                ),
            )

    def record_ack(self, ack: Ack, received_at: float) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO ack VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    ack.id,
                    self.run_id,
                    ack.status.value,
                    ack.code.value if ack.code else "",
                    ack.detail,
                    ack.applied_at,
                    received_at,
                ),
            )

    def record_result(
        self,
        k: int,
        *,
        ack: str,
        applied: Mapping[str, float],
        bands: Mapping[str, tuple[float, float]],
        solve_time_s: float,
        wall_s: float,
    ) -> None:
        """How cycle ``k`` ended, once its command is acknowledged: what ``report`` needs to
        rebuild the run's records exactly (journals without this table are rebuilt from the
        cycle, plan, command and ack rows)."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO cycle_result VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    self.run_id,
                    k,
                    ack,
                    _json(dict(applied)),
                    _json({n: list(b) for n, b in bands.items()}),
                    solve_time_s,
                    wall_s,
                ),
            )

    def record_event(
        self,
        k: int,
        t: float,
        source: str,
        kind: str,
        detail: str,
        data: Mapping[str, Any] | None = None,
    ) -> None:
        """Something that happened between cycles: a field connection gap ("mirror": "lost",
        "restored"), a reading refused or a source clock stepping back ("mirror": "refused",
        "accepted", "clock_step"), a divergence alarm ("divergence": "alarm", "clear"), ...;
        ``k`` is the cycle that noticed it."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO event VALUES (?, ?, ?, ?, ?, ?, ?)",
                (self.run_id, k, t, source, kind, detail, _json(dict(data or {}))),
            )

    def record_end_state(
        self,
        k: int,
        t: float,
        snapshot: Snapshot,
        applied: Mapping[str, float],
        bands: Mapping[str, tuple[float, float]],
    ) -> None:
        """The field at the run's end, after its ``k`` cycles (an event of source "run",
        kind "end_state": journals from before it simply lack it).  The snapshot is stored
        as a cycle's is."""
        data = {
            "snapshot": _snapshot_dict(snapshot),
            "applied": dict(applied),
            "bands": {n: list(b) for n, b in bands.items()},
        }
        self.record_event(k, t, "run", "end_state", "the field after the last cycle", data)

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        self._db.row_factory = sqlite3.Row
        try:
            return list(self._db.execute(sql, params))
        except sqlite3.Error as exc:
            raise JournalError(f"journal read failed ({self.path}): {exc}") from exc
        finally:
            self._db.row_factory = None

    def close(self) -> None:
        self._db.close()
