"""The field gateway's durable memory (SQLite, WAL, ``synchronous=FULL``).

What must survive a crash or ``kill -9`` of the gateway, so that a command is
never applied twice and a restarted dispatcher can continue:

* every applied command id with its issuer, seq and time (duplicates);
* the highest applied seq per issuer (stale sequences; told to dispatchers);
* the last applied value of each input and the cycle time it was for (ramps);
* equipment leases; the watchdog's state; an event log (trips, re-arms, leases).

Applying a command is two commits around the field write: ``begin`` records
the command as *pending* before anything is written; ``commit_applied`` marks
it applied (with seq, input values and leases) before the ack is sent.  A
crash between the two leaves one pending command whose write may or may not
have landed; at the next start the gateway reads the field back and settles
it (``settle_pending``): the values are there -> applied, else -> forgotten,
so a resend is applied once.
"""

from __future__ import annotations

import json
import sqlite3
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import JournalError
from .watchdog import Lease
from .wire import Command, WatchdogState

SCHEMA = """
CREATE TABLE IF NOT EXISTS applied (
    id TEXT PRIMARY KEY,
    issuer TEXT NOT NULL,
    seq INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'applied')),
    issued_at REAL NOT NULL,
    applied_at REAL,
    setpoints TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS issuer (issuer TEXT PRIMARY KEY, last_seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS input (name TEXT PRIMARY KEY, value REAL NOT NULL,
                                  issued_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS lease (equipment TEXT PRIMARY KEY, holder TEXT NOT NULL,
                                  until REAL NOT NULL);
CREATE TABLE IF NOT EXISTS watchdog (k INTEGER PRIMARY KEY CHECK (k = 0), state TEXT NOT NULL,
                                     detail TEXT NOT NULL, since REAL NOT NULL);
CREATE TABLE IF NOT EXISTS event (n INTEGER PRIMARY KEY AUTOINCREMENT, t REAL NOT NULL,
                                  kind TEXT NOT NULL, detail TEXT NOT NULL);
"""


@dataclass(frozen=True)
class Pending:
    """A command recorded before its write whose outcome the store does not know."""

    command_id: str
    issuer: str
    seq: int
    issued_at: float
    setpoints: dict[str, float]


@dataclass
class Loaded:
    applied_ids: OrderedDict[str, float]
    last_seq: dict[str, int]
    inputs: dict[str, tuple[float, float]]
    leases: dict[str, Lease]
    watchdog: tuple[WatchdogState, str, float] | None
    pending: list[Pending]


class GatewayStore:
    """One SQLite file; every method is one transaction, committed with fsync."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            if str(path) != ":memory:":
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise JournalError(f"cannot open the gateway store {self.path}: {exc}") from exc

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            yield self._db
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise JournalError(f"gateway store write failed ({self.path}): {exc}") from exc

    def load(self, max_ids: int) -> Loaded:
        db = self._db
        try:
            rows = db.execute(
                "SELECT id, applied_at FROM applied WHERE state = 'applied' "
                "ORDER BY rowid DESC LIMIT ?",
                (max_ids,),
            ).fetchall()
            ids: OrderedDict[str, float] = OrderedDict((i, float(t)) for i, t in reversed(rows))
            last_seq = {
                str(i): int(s) for i, s in db.execute("SELECT issuer, last_seq FROM issuer")
            }
            inputs = {
                str(n): (float(v), float(t))
                for n, v, t in db.execute("SELECT name, value, issued_at FROM input")
            }
            leases = {
                str(e): Lease(str(h), float(u))
                for e, h, u in db.execute("SELECT equipment, holder, until FROM lease")
            }
            wd_row = db.execute("SELECT state, detail, since FROM watchdog WHERE k = 0").fetchone()
            pending = [
                Pending(str(i), str(iss), int(seq), float(ia), _floats(sp))
                for i, iss, seq, ia, sp in db.execute(
                    "SELECT id, issuer, seq, issued_at, setpoints FROM applied "
                    "WHERE state = 'pending' ORDER BY rowid"
                )
            ]
        except (sqlite3.Error, ValueError) as exc:
            raise JournalError(f"cannot read the gateway store {self.path}: {exc}") from exc
        wd = None
        if wd_row is not None:
            wd = (WatchdogState(wd_row[0]), str(wd_row[1]), float(wd_row[2]))
        return Loaded(ids, last_seq, inputs, leases, wd, pending)

    def begin(self, cmd: Command) -> None:
        """Record ``cmd`` as pending: called before its setpoints are written."""
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO applied (id, issuer, seq, state, issued_at, applied_at, "
                "setpoints) VALUES (?, ?, ?, 'pending', ?, NULL, ?)",
                (cmd.id, cmd.issuer, cmd.seq, cmd.issued_at, json.dumps(dict(cmd.setpoints))),
            )

    def abandon(self, command_id: str) -> None:
        """The write failed for sure: forget the pending command (a resend is decided afresh)."""
        with self._tx() as db:
            db.execute("DELETE FROM applied WHERE id = ? AND state = 'pending'", (command_id,))

    def commit_applied(
        self,
        command_id: str,
        issuer: str,
        seq: int,
        issued_at: float,
        setpoints: Mapping[str, float],
        applied_at: float,
        leases: Mapping[str, Lease],
    ) -> None:
        """Mark a command applied, with everything that follows from it, in one commit."""
        with self._tx() as db:
            db.execute(
                "UPDATE applied SET state = 'applied', applied_at = ? WHERE id = ?",
                (applied_at, command_id),
            )
            db.execute(
                "INSERT INTO issuer (issuer, last_seq) VALUES (?, ?) ON CONFLICT(issuer) "
                "DO UPDATE SET last_seq = max(last_seq, excluded.last_seq)",
                (issuer, seq),
            )
            db.executemany(
                "INSERT OR REPLACE INTO input (name, value, issued_at) VALUES (?, ?, ?)",
                [(n, float(v), issued_at) for n, v in setpoints.items()],
            )
            _write_leases(db, leases)

    def save_leases(self, leases: Mapping[str, Lease]) -> None:
        with self._tx() as db:
            _write_leases(db, leases)

    def save_watchdog(
        self,
        state: WatchdogState,
        detail: str,
        since: float,
        *,
        event: str,
        inputs: Mapping[str, float] | None = None,
        leases: Mapping[str, Lease] | None = None,
    ) -> None:
        """A watchdog transition, its event, and (after a revert) the inputs now in force."""
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO watchdog (k, state, detail, since) VALUES (0, ?, ?, ?)",
                (state.value, detail, since),
            )
            db.execute(
                "INSERT INTO event (t, kind, detail) VALUES (?, ?, ?)", (since, event, detail)
            )
            if inputs:
                db.executemany(
                    "INSERT OR REPLACE INTO input (name, value, issued_at) VALUES (?, ?, ?)",
                    [(n, float(v), since) for n, v in inputs.items()],
                )
            if leases is not None:
                _write_leases(db, leases)

    def record_event(self, t: float, kind: str, detail: str) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO event (t, kind, detail) VALUES (?, ?, ?)", (t, kind, detail))

    def events(self) -> list[tuple[float, str, str]]:
        rows = self._db.execute("SELECT t, kind, detail FROM event ORDER BY n").fetchall()
        return [(float(t), str(k), str(d)) for t, k, d in rows]

    def close(self) -> None:
        self._db.close()


def _write_leases(db: sqlite3.Connection, leases: Mapping[str, Lease]) -> None:
    db.execute("DELETE FROM lease")
    db.executemany(
        "INSERT INTO lease (equipment, holder, until) VALUES (?, ?, ?)",
        [(eq, lease.holder, lease.until) for eq, lease in leases.items()],
    )


def _floats(text: Any) -> dict[str, float]:
    obj = json.loads(text)
    if not isinstance(obj, dict):
        raise ValueError("setpoints of a pending command are not an object")
    return {str(k): float(v) for k, v in obj.items()}
