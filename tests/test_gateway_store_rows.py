"""The rows ``GatewayStore`` keeps for applied marks and leases, as a restart reads them."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from parallelcity.gateway_store import AppliedMark, GatewayStore
from parallelcity.watchdog import Lease
from parallelcity.wire import Command


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
