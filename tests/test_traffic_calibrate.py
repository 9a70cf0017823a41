"""Saturation flows measured on SUMO: below the geometric ones where lanes are shared by
turns, derived once per set of files (cached by their hash), and used by the model."""

from __future__ import annotations

from pathlib import Path

import pytest

from parallelcity.models.traffic import calibrate
from parallelcity.models.traffic.demand import read_demand, sumocfg_files
from parallelcity.models.traffic.network import read_network

from .traffic_nets import grid


@pytest.fixture()
def short(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("PARALLELCITY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(calibrate, "DURATION_S", 300.0)  # a short measuring run
    monkeypatch.setattr(calibrate, "SCALE", 2.5)  # queues form on every approach
    return grid(tmp_path / "grid", veh_per_h=500.0, end_s=1800)


@pytest.mark.slow  # one short SUMO run through TraCI
def test_measured_saturation_is_derived_once_and_cached(
    short: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    net_file, routes, _extra = sumocfg_files(short)
    net = read_network(net_file)
    shares = read_demand(routes, net).shares
    sat = calibrate.measured_saturation(short, net, shares)
    assert set(sat) == {a.edge for a in net.approaches}
    for a in net.approaches:
        # a lane shared by turns (and left turns yielding) discharges below the geometry
        assert 0 < sat[a.edge] < a.saturation_veh_h, a.edge

    def no_sumo(*_args: object) -> dict[str, float]:
        raise AssertionError("measured again although the files did not change")

    monkeypatch.setattr(calibrate, "_measure", no_sumo)
    assert calibrate.measured_saturation(short, net, shares) == sat
    # a scenario ships the figures beside its .sumocfg: used without the user's cache
    calibrate.write_sidecar(short)
    monkeypatch.setenv("PARALLELCITY_CACHE", str(short.parent / "empty"))
    assert calibrate.measured_saturation(short, net, shares) == sat
    routes[0].write_text(routes[0].read_text().replace('vehsPerHour="', 'vehsPerHour="1'))
    with pytest.raises(AssertionError, match="measured again"):
        calibrate.measured_saturation(short, net, shares)
