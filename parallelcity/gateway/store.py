"""The field gateway's durable memory (SQLite, WAL, ``synchronous=FULL``).

What must survive a crash or ``kill -9`` of the gateway, so that a command is
never applied twice and a restarted dispatcher can continue:

* every applied command id with its issuer, seq and time (duplicates);
* the highest applied seq per issuer (stale sequences; told to dispatchers);
* the last applied value of each input and the gateway time it was written (ramps);
* equipment leases; the watchdog's state; an event log (trips, re-arms, leases).

Group commit
------------
The gateway applies commands in **batches** (everything that was waiting on
its socket, bounded).  A batch's accepted commands are recorded *pending* in
one commit (``begin_batch``, fsync) before anything is written; then their
setpoints go to the field in **write groups** (consecutive commands whose
inputs do not overlap share one write call; a command touching an input
already in the group starts the next group), in order, stopping at the first
failure.  After the writes the commands are *applied* (``mark_applied``).
After a failed write the gateway settles the batch at once (``settle``: one
commit marking what landed applied and forgetting the rest) before it
decides or writes anything else.

Writes in doubt
---------------
A write that failed for sure (``FieldUnavailableError``: nothing was sent)
landed nowhere.  Any other failure (timeout, a session dropped mid-request,
an unexpected error) has an unknown outcome: the gateway reads the group's
inputs back and settles by ``landed`` as below.  When that read fails too,
``settle`` marks the groups before it applied, forgets the groups after it
(never written) and leaves *that group pending* - the state a crash leaves -
with an ``in_doubt`` event.  The gateway then writes no command until it has
read the field back and settled the group exactly as at a restart (one
``settle`` commit with ``settled`` events and ``in_doubt_settled``), so the
invariant below holds while it runs in doubt.  The one write it does not hold
back is the watchdog's revert to safe values: when the safe values touch an
input of the group in doubt they would hide what the group left, so the
gateway settles the group *first* - by a last read-back, or, if the field
still cannot be read, by counting it applied (never twice; the rate-limit
base of those inputs becomes the safe values anyway) - and commits that
before it writes the safe values.  A revert on other inputs leaves the group
pending: it does not disturb its read-back.

The applied mark need not cost an fsync of its own: by default it is
*deferred* and rides in the next transaction the store commits, whatever it
is - normally the next batch's ``begin_batch``.  The gateway bounds how long
a mark may wait: it commits the marks after a short idle delay (2 ms) and
before any field write of its own that is not a batch; ``close`` commits them
too.

Why exactly once still holds after ``kill -9`` at any point
------------------------------------------------------------
Invariant: *at most one batch is pending at any time, and its writes are the
last writes this gateway made to those inputs.*  A batch is written only
after its pending commit, and that commit also carries the applied marks of
the batch before it (or they were flushed earlier); the watchdog's revert,
the only other gateway write, flushes the marks first (and settles a group in
doubt on the same inputs first, above).

Where the kill can fall, for the batch B being handled:

1. Before B's pending commit is durable: B left no trace and nothing of B
   was written (writes come after that commit); no ack was sent.  A resend is
   decided afresh and applied once.  The batch before B, whose applied marks
   were to ride in that commit, is still pending: it is settled as in 2 (its
   writes are still the last ones, since B wrote nothing).
2. After the pending commit, during or after the writes, before or after the
   acks, before B's applied marks are durable: B is pending at the restart.
   The gateway reads the field back *before it binds* and settles B with
   ``landed``: what landed is a prefix of B's write groups and perhaps part of
   the next group (writes are in order and stop at the first failure), and
   because of the invariant nothing else of this gateway wrote those inputs
   since.  The largest prefix consistent with the values read is taken as
   applied (a larger one only when values coincide - then the field holds
   them anyway); within the partly written group each command counts as
   applied when all its values are there.  A command outside it whose
   inputs all still hold values this gateway wrote there (the value before the
   batch, or one an earlier group wrote) did not land: it is forgotten, so its
   resend is applied once.  A command outside it with an input holding
   anything else (``judge``) either never landed or was overwritten by a third
   party (a PLC program, an operator) since; the field cannot tell which, so it
   counts as applied - at most once, never overwriting the third party - with
   a ``conflict`` event naming the command, the input, our value and the
   field's.  Applied commands become duplicates for every resend or replay.
   An ack is only ever sent after B's writes succeeded, so every acked command
   counts as applied: its replay is a ``duplicate``.  If the field cannot be
   read at the restart, the whole batch counts as applied: never twice.  (A
   running gateway stays in doubt instead, above; a kill while in doubt is
   case 2.)
3. After B's applied marks are durable: B is plain history.

So the record that makes the replay of an acked command a duplicate - the
pending row, settled against the field - is durable before the ack is sent;
the applied mark only saves the read-back.  A third party changing one of B's
inputs between the write and the restart turns a would-be exactly-once into
at-most-once with a journaled ``conflict``: the restart never writes over it.
That window lasts from the write to the applied commit: by default the marks
ride in the next commit (at most the idle flush delay, milliseconds, or one
batch later); a gateway built with ``ack_after_applied_commit=True`` (config
key of the same name) commits the marks before every ack, so an acked command
is never pending, at one more fsync per batch.

Checkpoints
-----------
The writer connection never checkpoints the WAL (``wal_autocheckpoint=0``);
``_Checkpointer`` does, from its own thread and connection (PASSIVE beside the
writer while commits come; the last few frames holding the writer back, every
``RESTART_FRAMES``, so that the WAL is rewritten in place; TRUNCATE after a
burst when idle), so no COMMIT copies the WAL.
Durability does not depend on it: with ``synchronous=FULL`` every COMMIT
fsyncs its WAL frames before it returns, and a checkpoint only copies committed
frames into the database file and syncs that file before the WAL may be
reused; a crash at any point of a checkpoint leaves the frames in the WAL, and
the next open replays them.  So the pending commit before a write and the
marks before an ack are as durable as with SQLite's automatic checkpoint.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parallelcity.dispatch.wire import Command, WatchdogState
from parallelcity.errors import JournalError
from parallelcity.gateway.watchdog import Lease

log = logging.getLogger("parallelcity.gateway.server")

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
CHECKPOINT_EVERY_COMMITS = 16
"""The checkpoint thread is woken after this many commits (and every ``CHECKPOINT_POLL_S``)."""
CHECKPOINT_POLL_S = 0.25
RESTART_FRAMES = 4096
"""WAL frames (pages) after which the checkpoint thread copies the last few while holding
the writer back, so that the writer starts the WAL over (rewriting the file in place)."""
WAL_LIMIT_BYTES = 32 * 1024 * 1024
"""An idle store whose WAL file is larger is checkpointed with TRUNCATE."""
WAL_HARD_LIMIT_BYTES = 64 * 1024 * 1024
"""Beyond this (commits back to back, the thread never caught up) the writer checkpoints
what is left itself before its next transaction: a bounded stall instead of a WAL that grows."""
# Added with group commit; a store written before gets the columns on open.
BATCH_COLUMNS = (("batch", "INTEGER"), ("grp", "INTEGER NOT NULL DEFAULT 0"), ("digest", "TEXT"))
"""``digest``: the command's payload digest (``Command.digest``); NULL in rows
written before it existed (such an id's resend counts as a duplicate whatever its payload)."""


@dataclass(frozen=True)
class Pending:
    """A command recorded before its write whose outcome the store does not know."""

    command_id: str
    issuer: str
    seq: int
    issued_at: float
    setpoints: dict[str, float]
    batch: int | None = None
    """The batch it was recorded with (``None``: recorded alone, before group commit)."""
    group: int = 0
    """Its write group within the batch (groups are written in order)."""
    digest: str | None = None
    """Its payload digest, when recorded."""


@dataclass(frozen=True)
class AppliedMark:
    """A command whose setpoints landed: what ``mark_applied`` records about it."""

    command_id: str
    issuer: str
    seq: int
    issued_at: float
    setpoints: Mapping[str, float]
    applied_at: float


@dataclass
class Loaded:
    applied_ids: OrderedDict[str, float]
    last_seq: dict[str, int]
    inputs: dict[str, tuple[float, float]]
    leases: dict[str, Lease]
    watchdog: tuple[WatchdogState, str, float] | None
    pending: list[Pending]
    digests: dict[str, str] = field(default_factory=dict)
    """Applied id -> payload digest, for the ids in ``applied_ids`` that have one."""

    def pending_batches(self) -> list[list[Pending]]:
        """The pending commands by batch, in the order they were recorded."""
        out: dict[object, list[Pending]] = {}
        for k, p in enumerate(self.pending):
            out.setdefault(("alone", k) if p.batch is None else p.batch, []).append(p)
        return list(out.values())


@dataclass(frozen=True)
class Conflict:
    """An input of a pending command that holds a value this gateway did not write there."""

    command_id: str
    name: str
    ours: float
    field: float | None
    """What the field holds (``None``: the input could not be read)."""

    def describe(self) -> str:
        seen = "could not be read" if self.field is None else f"holds {self.field!r}"
        return (
            f"{self.command_id}: input {self.name}: ours {self.ours!r}, the field {seen}; "
            "it never landed or a third party changed it since: counted as applied, "
            "not written again"
        )


@dataclass(frozen=True)
class Verdict:
    """How a pending command is settled against the field (``judge``)."""

    applied: bool
    """True: remembered as applied (a resend is a duplicate); False: forgotten."""
    conflicts: tuple[Conflict, ...] = ()
    """Non-empty: counted as applied although the field does not hold its values."""


def judge(
    batch: Sequence[Pending],
    field: Mapping[str, float] | None,
    before: Mapping[str, float],
) -> list[Verdict]:
    """Settle a pending batch against ``field`` read back; ``before``: inputs' last values
    this gateway applied before the batch.  Pure.

    A command counts as applied when ``landed`` says so or all its values are in the
    field.  Otherwise it is forgotten (a resend writes it) only when every input
    still holds a value this gateway wrote there - its value before the batch, one
    an earlier write group of the batch wrote, or the command's own: then nothing
    it would overwrite came from anyone else.  An input holding anything else (or
    unreadable, or never written by this gateway) means the write never landed or
    a third party changed it since, which the field cannot tell apart: the command
    counts as applied (at most once, never overwriting the third party), with a
    ``Conflict`` per such input.  ``field`` ``None``: all count as applied.
    """
    if field is None:
        return [Verdict(True)] * len(batch)
    ours: dict[str, set[float]] = {}
    earlier: dict[int, dict[str, set[float]]] = {}
    for g in sorted({p.group for p in batch}):
        earlier[g] = {n: set(vs) for n, vs in ours.items()}
        for p in batch:
            if p.group == g:
                for n, v in p.setpoints.items():
                    ours.setdefault(n, set()).add(v)
    out: list[Verdict] = []
    for p, ok in zip(batch, landed(batch, field), strict=True):
        if ok or all(field.get(n) == v for n, v in p.setpoints.items()):
            out.append(Verdict(True))
            continue
        conflicts = []
        for n, v in p.setpoints.items():
            mine = earlier[p.group].get(n, set()) | {v}
            if n in before:
                mine.add(before[n])
            if field.get(n) not in mine:
                conflicts.append(Conflict(p.command_id, n, v, field.get(n)))
        out.append(Verdict(bool(conflicts), tuple(conflicts)))
    return out


def landed(batch: Sequence[Pending], field: Mapping[str, float] | None) -> list[bool]:
    """Which commands of a pending batch reached the field, judged from ``field`` read back.

    Pure.  The groups of a batch were written in order, stopping at the first
    failure: what landed is a prefix of whole groups, then perhaps part of the
    next group.  The largest prefix that agrees with ``field`` is taken (an
    input of the prefix must show its last value in the prefix, or the value
    the next group writes to it); in the next group, a command counts when all
    its values are there.  ``field`` ``None`` (could not be read): all count,
    so that nothing is ever applied twice.
    """
    if field is None:
        return [True] * len(batch)
    order = sorted({p.group for p in batch})
    groups = [[p for p in batch if p.group == g] for g in order]
    merged = [{n: v for p in grp for n, v in p.setpoints.items()} for grp in groups]
    for full in range(len(groups), -1, -1):
        expected: dict[str, float] = {}
        for values in merged[:full]:
            expected.update(values)
        nxt = merged[full] if full < len(groups) else {}
        if all(
            n in field and (field[n] == v or nxt.get(n) == field[n]) for n, v in expected.items()
        ):
            break
    out: dict[str, bool] = {}
    for g, grp in enumerate(groups):
        for p in grp:
            if g < full:
                out[p.command_id] = True
            elif g == full:
                out[p.command_id] = all(field.get(n) == v for n, v in p.setpoints.items())
            else:
                out[p.command_id] = False
    return [out[p.command_id] for p in batch]


class GatewayStore:
    """One SQLite file; every method is one transaction, committed with fsync.

    Applied marks given to ``mark_applied(..., durable=False)`` wait in memory
    and are written first in the next transaction (see the module docstring);
    ``flush`` commits them on their own, ``close`` flushes.
    """

    def __init__(self, path: str | Path, *, checkpoint_thread: bool = True) -> None:
        """``checkpoint_thread`` False: SQLite's automatic checkpoint inside the COMMIT that
        crosses 1000 WAL pages, as before the thread (the benchmark compares the two)."""
        self.path = Path(path)
        self._deferred: list[AppliedMark] = []
        self._deferred_leases: dict[str, Lease] | None = None
        self.deferred_since = 0.0
        """``time.monotonic()`` when the oldest deferred mark was given."""
        self.commits = 0
        """Transactions committed (each one fsync'd) by this object."""
        try:
            if str(path) != ":memory:":
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            # Checkpoints run in their own thread (_Checkpointer), never inside a COMMIT.
            if checkpoint_thread:
                self._db.execute("PRAGMA wal_autocheckpoint=0")
            self._db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT_BYTES}")
            self._db.executescript(SCHEMA)
            have = {str(r[1]) for r in self._db.execute("PRAGMA table_info(applied)")}
            for name, decl in BATCH_COLUMNS:
                if name not in have:
                    self._db.execute(f"ALTER TABLE applied ADD COLUMN {name} {decl}")
            row = self._db.execute(
                "SELECT max(batch) FROM applied WHERE state = 'pending'"
            ).fetchone()
            self._next_batch = 1 + int(row[0] or 0)
        except (OSError, sqlite3.Error) as exc:
            raise JournalError(f"cannot open the gateway store {self.path}: {exc}") from exc
        self._writing = threading.Lock()
        """Held by every transaction; the checkpoint thread holds it for a WAL's last frames."""
        self.checkpointer = None
        if checkpoint_thread and str(path) != ":memory:":
            self.checkpointer = _Checkpointer(self.path, self._writing)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        # The checkpoint thread holds _writing while it copies a WAL's last frames.
        with self._writing:
            ck = self.checkpointer
            if ck is not None and ck.over_hard_limit(self.commits):
                ck.inline(self._db)
            with self._commit() as db:
                yield db

    @contextmanager
    def _commit(self) -> Iterator[sqlite3.Connection]:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            if self._deferred or self._deferred_leases is not None:
                _write_marks(self._db, self._deferred, self._deferred_leases)
            yield self._db
            self._db.execute("COMMIT")
        except (sqlite3.Error, ValueError) as exc:  # ValueError: e.g. text SQLite cannot encode
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise JournalError(f"gateway store write failed ({self.path}): {exc}") from exc
        except BaseException:  # never leave the transaction open for the next write
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        self._deferred = []
        self._deferred_leases = None
        self.commits += 1
        if self.checkpointer is not None:
            self.checkpointer.committed()

    def load(self, max_ids: int) -> Loaded:
        db = self._db
        try:
            rows = db.execute(
                "SELECT id, applied_at, digest FROM applied WHERE state = 'applied' "
                "ORDER BY rowid DESC LIMIT ?",
                (max_ids,),
            ).fetchall()
            ids: OrderedDict[str, float] = OrderedDict((i, float(t)) for i, t, _ in reversed(rows))
            digests = {str(i): str(d) for i, _, d in rows if d is not None}
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
                Pending(
                    str(i),
                    str(iss),
                    int(seq),
                    float(ia),
                    _floats(sp),
                    None if b is None else int(b),
                    int(g),
                    None if d is None else str(d),
                )
                for i, iss, seq, ia, sp, b, g, d in db.execute(
                    "SELECT id, issuer, seq, issued_at, setpoints, batch, grp, digest FROM applied "
                    "WHERE state = 'pending' ORDER BY rowid"
                )
            ]
        except (sqlite3.Error, ValueError) as exc:
            raise JournalError(f"cannot read the gateway store {self.path}: {exc}") from exc
        wd = None
        if wd_row is not None:
            wd = (WatchdogState(wd_row[0]), str(wd_row[1]), float(wd_row[2]))
        return Loaded(ids, last_seq, inputs, leases, wd, pending, digests)

    # ------------------------------------------------------------------ commands

    def begin(self, cmd: Command) -> None:
        """Record ``cmd`` as pending, alone: called before its setpoints are written."""
        self.begin_batch([cmd], [0])

    def begin_batch(self, cmds: Sequence[Command], groups: Sequence[int]) -> int:
        """Record a batch as pending in one commit, before any of it is written.

        ``groups[k]`` is the write group of ``cmds[k]``.  Deferred applied
        marks of the previous batch are committed in the same transaction.
        Returns the batch number.
        """
        if len(groups) != len(cmds):
            raise ValueError("one write group per command")
        batch, self._next_batch = self._next_batch, self._next_batch + 1
        with self._tx() as db:
            db.executemany(
                "INSERT OR REPLACE INTO applied (id, issuer, seq, state, issued_at, applied_at, "
                "setpoints, batch, grp, digest) VALUES (?, ?, ?, 'pending', ?, NULL, ?, ?, ?, ?)",
                [
                    (
                        c.id,
                        c.issuer,
                        c.seq,
                        c.issued_at,
                        json.dumps(dict(c.setpoints)),
                        batch,
                        g,
                        c.digest,
                    )
                    for c, g in zip(cmds, groups, strict=True)
                ],
            )
        return batch

    def mark_applied(
        self, marks: Sequence[AppliedMark], leases: Mapping[str, Lease], *, durable: bool = True
    ) -> None:
        """Mark commands applied, with what follows (seqs, inputs, ``leases`` now in force).

        ``durable=False`` defers the commit to the next transaction (group
        commit; see the module docstring for why that is safe).
        """
        if not self._deferred:
            self.deferred_since = time.monotonic()
        self._deferred.extend(marks)
        self._deferred_leases = dict(leases)
        if durable:
            self.flush()

    def settle(
        self,
        marks: Sequence[AppliedMark],
        abandoned: Sequence[str],
        leases: Mapping[str, Lease],
        *,
        events: Sequence[tuple[float, str, str]] = (),
    ) -> None:
        """One commit: ``marks`` applied, the pending ``abandoned`` ids forgotten, ``events``."""
        self._deferred.extend(marks)
        self._deferred_leases = dict(leases)
        with self._tx() as db:
            db.executemany(
                "DELETE FROM applied WHERE id = ? AND state = 'pending'",
                [(i,) for i in abandoned],
            )
            db.executemany("INSERT INTO event (t, kind, detail) VALUES (?, ?, ?)", list(events))

    @property
    def deferred(self) -> int:
        """Applied marks waiting for the next commit."""
        return len(self._deferred)

    def flush(self) -> None:
        """Commit the deferred applied marks now (nothing when there are none)."""
        if self._deferred or self._deferred_leases is not None:
            with self._tx():
                pass

    # ------------------------------------------------------------------ the rest

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
        try:
            self.flush()
        finally:
            if self.checkpointer is not None:
                self.checkpointer.stop()
            self._db.close()


class _Checkpointer:
    """Copies the WAL into the database file from a thread of its own, on its own connection.

    The writer connection never checkpoints (``wal_autocheckpoint=0``), so no
    COMMIT copies the WAL.  Here: a PASSIVE checkpoint after every
    ``CHECKPOINT_EVERY_COMMITS`` commits and every ``CHECKPOINT_POLL_S`` with
    new commits, beside the writer.  The writer starts the WAL over from its
    beginning (rewriting the file in place, cheaper to sync than appending) only
    when a checkpoint copied every frame before its transaction began, which a
    checkpoint beside a busy writer rarely does; so once the WAL holds
    ``RESTART_FRAMES`` frames, the thread copies the few frames committed since
    its last pass while it holds the writer's lock (a commit arriving then
    waits for that short copy, not for the whole WAL as inside SQLite's own
    checkpoint).  When idle it catches up, and TRUNCATEs a WAL file grown beyond
    ``WAL_LIMIT_BYTES``.  If the WAL still passes ``WAL_HARD_LIMIT_BYTES`` the
    writer checkpoints itself (``inline``, counted).  A failed checkpoint is
    logged and retried; it costs disk space, never durability (module
    docstring).
    """

    def __init__(self, path: Path, writing: threading.Lock) -> None:
        self._path = path
        self._wal = path.parent / (path.name + "-wal")
        self._writing = writing
        self._commits = 0
        self._kick = threading.Event()
        self._stopping = threading.Event()
        self.passive = 0
        """PASSIVE checkpoints run by the thread."""
        self.tails = 0
        """Of those, run holding the writer's lock (the last frames before a WAL restart)."""
        self.truncated = 0
        """TRUNCATE checkpoints run (after a burst, when idle)."""
        self.inline_runs = 0
        """Checkpoints the writer ran itself (the WAL passed the hard limit)."""
        self.failures = 0
        self.behind: int | None = None
        """WAL frames the last PASSIVE checkpoint could not copy (0: it caught up)."""
        self.covered = 0
        """Commits (of ``committed``) the last PASSIVE checkpoint started after."""
        self._thread = threading.Thread(
            target=self._run, name="gateway-store-checkpoint", daemon=True
        )
        self._thread.start()

    def committed(self) -> None:
        """The writer committed (called on its thread, holding nothing; cheap)."""
        self._commits += 1
        if self._commits % CHECKPOINT_EVERY_COMMITS == 0:
            self._kick.set()

    def over_hard_limit(self, commits: int) -> bool:
        """Looked at every ``CHECKPOINT_EVERY_COMMITS`` commits: is the WAL past the hard limit?"""
        return commits % CHECKPOINT_EVERY_COMMITS == 0 and self.wal_bytes() > WAL_HARD_LIMIT_BYTES

    def inline(self, db: sqlite3.Connection) -> None:
        try:
            db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            self.inline_runs += 1
        except sqlite3.Error as exc:
            self._failed(exc)

    def stop(self) -> None:
        self._stopping.set()
        self._kick.set()
        self._thread.join(timeout=10.0)

    def wal_bytes(self) -> int:
        try:
            return self._wal.stat().st_size
        except OSError:
            return 0

    def _failed(self, exc: sqlite3.Error) -> None:
        self.failures += 1
        if self.failures == 1 or self.failures % 100 == 0:
            log.warning("gateway store: checkpoint failed (%d): %s", self.failures, exc)

    def _passive(self, db: sqlite3.Connection) -> int:
        """One PASSIVE checkpoint; the WAL's frames."""
        covered = self._commits
        # All rows fetched: the statement ends and holds no read lock.
        (row,) = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        self.passive += 1
        self.behind, self.covered = int(row[1]) - int(row[2]), covered
        return int(row[1])

    def _run(self) -> None:
        try:
            db = sqlite3.connect(str(self._path), isolation_level=None, timeout=1.0)
            db.execute("PRAGMA synchronous=FULL")  # the database file is synced before reuse
        except sqlite3.Error as exc:
            log.error("gateway store: no checkpoint thread (%s); the WAL file grows", exc)
            return
        try:
            while not self._stopping.is_set():
                self._kick.wait(CHECKPOINT_POLL_S)
                self._kick.clear()
                try:
                    if self._commits != self.covered:
                        if self._passive(db) >= RESTART_FRAMES:  # the bulk, beside the writer
                            with self._writing:  # the last frames: the writer then restarts
                                self._passive(db)
                                self.tails += 1
                    elif self.behind:
                        self._passive(db)  # idle: catch up, the next commit restarts the WAL
                    elif self.wal_bytes() > WAL_LIMIT_BYTES:
                        with self._writing:
                            db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
                        self.truncated += 1
                except sqlite3.Error as exc:
                    self._failed(exc)
        finally:
            db.close()


def _write_marks(
    db: sqlite3.Connection, marks: Sequence[AppliedMark], leases: Mapping[str, Lease] | None
) -> None:
    db.executemany(
        "UPDATE applied SET state = 'applied', applied_at = ? WHERE id = ?",
        [(m.applied_at, m.command_id) for m in marks],
    )
    last_seq: dict[str, int] = {}
    inputs: dict[str, tuple[float, float]] = {}
    for m in marks:
        last_seq[m.issuer] = max(m.seq, last_seq.get(m.issuer, m.seq))
        for n, v in m.setpoints.items():
            inputs[n] = (float(v), m.applied_at)  # the rate-limit base: the gateway's clock
    db.executemany(
        "INSERT INTO issuer (issuer, last_seq) VALUES (?, ?) ON CONFLICT(issuer) "
        "DO UPDATE SET last_seq = max(last_seq, excluded.last_seq)",
        list(last_seq.items()),
    )
    # Upserts update rows in place: only the table's page is written, not its key index
    # (INSERT OR REPLACE and DELETE + INSERT write both), fewer WAL frames per commit.
    db.executemany(
        "INSERT INTO input (name, value, issued_at) VALUES (?, ?, ?) ON CONFLICT(name) "
        "DO UPDATE SET value = excluded.value, issued_at = excluded.issued_at",
        [(n, v, t) for n, (v, t) in inputs.items()],
    )
    if leases is not None:
        _write_leases(db, leases)


def _write_leases(db: sqlite3.Connection, leases: Mapping[str, Lease]) -> None:
    # Only leases that ended are deleted (reading writes no page); the others are updated
    # in place.
    gone = [(str(eq),) for (eq,) in db.execute("SELECT equipment FROM lease") if eq not in leases]
    db.executemany("DELETE FROM lease WHERE equipment = ?", gone)
    db.executemany(
        "INSERT INTO lease (equipment, holder, until) VALUES (?, ?, ?) ON CONFLICT(equipment) "
        "DO UPDATE SET holder = excluded.holder, until = excluded.until",
        [(eq, lease.holder, lease.until) for eq, lease in leases.items()],
    )


def _floats(text: Any) -> dict[str, float]:
    obj = json.loads(text)
    if not isinstance(obj, dict):
        raise ValueError("setpoints of a pending command are not an object")
    return {str(k): float(v) for k, v in obj.items()}
