"""The rows ``GatewayStore`` keeps, as a restart reads them, and its WAL checkpoints."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from parallelcity.dispatch.wire import Command
from parallelcity.gateway import store as gateway_store
from parallelcity.gateway.store import AppliedMark, GatewayStore
from parallelcity.gateway.watchdog import Lease


def _cmd(seq: int, setpoints: Mapping[str, float]) -> Command:
    return Command.create(
        issuer="ops",
        seq=seq,
        issued_at=100.0 + seq,
        valid_until=200.0 + seq,
        setpoints=setpoints,
        verdict="ab" * 32,
    )


def _apply(
    store: GatewayStore, cmd: Command, leases: Mapping[str, Lease], *, durable: bool = True
) -> None:
    store.begin_batch([cmd], [0])
    mark = AppliedMark(cmd.id, cmd.issuer, cmd.seq, cmd.issued_at, cmd.setpoints, cmd.issued_at)
    store.mark_applied([mark], leases, durable=durable)


def test_leases_are_renewed_in_place_and_ended_ones_deleted(tmp_path: Path) -> None:
    path = tmp_path / "gw.sqlite"
    store = GatewayStore(path)
    both = {"plant": Lease("ops", 160.0), "apartment": Lease("ops", 160.0)}
    _apply(store, _cmd(1, {"plant.T": 70.0}), both)
    assert store.load(100).leases == both
    store.save_leases({"plant": Lease("other", 200.0)})
    assert store.load(100).leases == {"plant": Lease("other", 200.0)}
    store.save_leases({})
    assert store.load(100).leases == {}
    # Deferred marks ride in the next commit, leases included.
    _apply(store, _cmd(2, {"plant.T": 71.0}), {"apartment": Lease("ops", 300.0)}, durable=False)
    _apply(store, _cmd(3, {"plant.T": 72.0}), {"plant": Lease("ops", 400.0)}, durable=False)
    store.close()
    again = GatewayStore(path)
    try:
        assert again.load(100).leases == {"plant": Lease("ops", 400.0)}
    finally:
        again.close()


def test_inputs_and_issuer_rows_follow_the_marks(tmp_path: Path) -> None:
    path = tmp_path / "gw.sqlite"
    store = GatewayStore(path)
    first = _cmd(5, {"plant.T": 70.0, "apartment.m": 0.3})
    _apply(store, first, {})
    later = _cmd(7, {"plant.T": 71.5})
    _apply(store, later, {}, durable=False)
    older = _cmd(6, {"apartment.m": 0.4})  # an older seq marked last keeps the highest
    _apply(store, older, {})
    store.close()
    again = GatewayStore(path)
    try:
        loaded = again.load(100)
    finally:
        again.close()
    assert loaded.last_seq == {"ops": 7}
    assert loaded.inputs == {"plant.T": (71.5, 107.0), "apartment.m": (0.4, 106.0)}
    assert list(loaded.applied_ids) == [first.id, later.id, older.id]
    assert loaded.pending == []


def _wait(cond: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def test_commits_never_checkpoint_the_checkpoint_thread_does(tmp_path: Path) -> None:
    store = GatewayStore(tmp_path / "gw.sqlite")
    try:
        (auto,) = store._db.execute("PRAGMA wal_autocheckpoint").fetchone()
        assert auto == 0  # no COMMIT of the writer runs a checkpoint
        ck = store.checkpointer
        assert ck is not None
        for k in range(3 * gateway_store.CHECKPOINT_EVERY_COMMITS):
            _apply(store, _cmd(k, {"plant.T": 70.0 + k}), {}, durable=False)
        # The thread catches up once the commits stop; then the writer reuses the WAL.
        n = store.commits
        assert _wait(lambda: ck.covered == n and ck.behind == 0), (ck.covered, n, ck.behind)
        size = ck.wal_bytes()
        for k in range(100, 110):
            _apply(store, _cmd(k, {"plant.T": 70.0}), {}, durable=False)
        assert ck.wal_bytes() <= size
        assert ck.inline_runs == 0 and ck.failures == 0
    finally:
        store.close()
    again = GatewayStore(tmp_path / "gw.sqlite")
    try:
        assert len(again.load(1000).applied_ids) == 3 * gateway_store.CHECKPOINT_EVERY_COMMITS + 10
    finally:
        again.close()


def test_an_idle_store_truncates_a_grown_wal_and_the_writer_bounds_it_under_a_flood(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gateway_store, "WAL_LIMIT_BYTES", 1)
    store = GatewayStore(tmp_path / "gw.sqlite")
    try:
        ck = store.checkpointer
        assert ck is not None
        for k in range(20):
            _apply(store, _cmd(k, {"plant.T": 70.0 + k}), {})
        assert _wait(lambda: ck.truncated >= 1 and ck.wal_bytes() == 0)
        # Commits back to back past the hard limit: the writer checkpoints what is left.
        monkeypatch.setattr(gateway_store, "WAL_HARD_LIMIT_BYTES", 1)
        for k in range(20, 20 + 2 * gateway_store.CHECKPOINT_EVERY_COMMITS):
            _apply(store, _cmd(k, {"plant.T": 70.0}), {})
        assert ck.inline_runs >= 1
    finally:
        store.close()


def test_pending_setpoints_are_read_back_exactly(tmp_path: Path) -> None:
    values = {"plant.T": 70.000001, "a.small": 1e-06, "apartment.m": -0.0, "x.big": 1e300}
    store = GatewayStore(tmp_path / "gw.sqlite")
    try:
        store.begin_batch([_cmd(1, values)], [0])
        (pending,) = store.load(10).pending
    finally:
        store.close()
    assert pending.setpoints == values
    assert [repr(v) for v in pending.setpoints.values()] == [repr(v) for v in values.values()]


def test_under_commits_back_to_back_the_wal_is_restarted_and_rewritten_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gateway_store, "RESTART_FRAMES", 16)
    store = GatewayStore(tmp_path / "gw.sqlite")
    try:
        ck = store.checkpointer
        assert ck is not None
        sizes = []
        for k in range(40 * gateway_store.CHECKPOINT_EVERY_COMMITS):
            _apply(store, _cmd(k, {"plant.T": 70.0 + k * 1e-3}), {}, durable=False)
            sizes.append(ck.wal_bytes())
            if ck.tails >= 3 and k % gateway_store.CHECKPOINT_EVERY_COMMITS == 0:
                break
        assert ck.tails >= 1 and ck.inline_runs == 0, (ck.tails, ck.passive)
        # Restarted: later commits rewrite the file instead of growing it without end.
        assert sizes[-1] < 40 * gateway_store.CHECKPOINT_EVERY_COMMITS * 4096
    finally:
        store.close()
