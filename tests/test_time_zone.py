"""``[scenario] time_zone``: periods (bands, occupancy) are read in local time, DST included."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path

import pytest

from parallelcity.scenario.definition import Scenario, parse_scenario
from parallelcity.twin.schedule import Period, zone_of

from .conftest import ROOT, lab_text

OFFICE_BAND = (
    'periods = [{ days = "weekdays", start = "07:00", end = "19:00", low = 20.0, high = 24.0 }]'
)


def berlin(text: str, zone: str = "Europe/Berlin") -> str:
    assert OFFICE_BAND in text
    text = text.replace(OFFICE_BAND, OFFICE_BAND.replace('"19:00"', '"18:00"'))
    assert 'time_zone = "UTC"' in text
    return text.replace('time_zone = "UTC"', f'time_zone = "{zone}"')


def utc(text: str) -> float:
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC).timestamp()


@pytest.fixture(scope="module")
def local() -> Scenario:
    return parse_scenario(berlin(lab_text()), "berlin.toml")


def office_band_on(scenario: Scenario, t: float) -> bool:
    band = next(b for b in scenario.safety_specs().bands if b.output == "office.T_zone")
    return band.limits(t) == (20.0, 24.0)


@pytest.mark.parametrize(
    ("instant", "on"),
    [
        # Monday 12 January 2026, CET = UTC+1: 07:00-18:00 local is 06:00-17:00 UTC
        ("2026-01-12T05:59", False),
        ("2026-01-12T06:00", True),
        ("2026-01-12T16:59", True),
        ("2026-01-12T17:00", False),
        # Monday 13 July 2026, CEST = UTC+2: 05:00-16:00 UTC
        ("2026-07-13T04:59", False),
        ("2026-07-13T05:00", True),
        ("2026-07-13T15:59", True),
        ("2026-07-13T16:00", False),
        # Saturday 11 July 2026, 10:00 local: a weekday band is off
        ("2026-07-11T08:00", False),
        # Sunday 29 March 2026 is the spring change; Monday 30 March 07:00 CEST = 05:00 UTC
        ("2026-03-30T05:00", True),
        ("2026-03-30T04:59", False),
    ],
)
def test_a_berlin_band_is_on_at_the_right_utc_instants(
    local: Scenario, instant: str, on: bool
) -> None:
    assert office_band_on(local, utc(instant)) is on


def test_the_default_zone_is_utc(dh: Scenario) -> None:
    assert dh.meta.time_zone == "UTC"
    assert office_band_on(dh, utc("2026-01-12T07:00")) is True
    assert office_band_on(dh, utc("2026-01-12T06:59")) is False
    assert Period(start="07:00", end="08:00").contains(utc("2026-01-12T07:30"))


def test_occupancy_gains_and_a_start_without_offset_follow_the_zone(local: Scenario) -> None:
    office = local.model.disturbances.index("office.Q_int")
    gains = local.model.forecast(utc("2026-01-12T06:00"), 2, 900.0)[:, office]
    assert gains[0] > 0  # 07:00 in Berlin: the office is occupied (07:00-19:00)
    naive = parse_scenario(
        berlin(lab_text()).replace("start = 2026-01-12T00:00:00Z", "start = 2026-01-12T00:00:00"),
        "naive.toml",
    )
    assert naive.meta.start_epoch == utc("2026-01-11T23:00")  # local midnight
    assert local.meta.start_epoch == utc("2026-01-12T00:00")  # an explicit Z stays UTC


def test_validate_names_scenario_time_zone_for_an_unknown_zone(tmp_path: Path) -> None:
    bad = tmp_path / "bad-zone.toml"
    bad.write_text(berlin(lab_text(), zone="Europe/Atlantis"))
    done = subprocess.run(
        [sys.executable, "-m", "parallelcity", "validate", str(bad)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "scenario.time_zone: " in done.stderr and "IANA" in done.stderr
    assert "Europe/Atlantis" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("name", ["", "Europe", "europe/berlin ", "x" * 5000, "../etc/passwd"])
def test_a_name_that_is_no_zone_is_a_value_error(name: str) -> None:
    with pytest.raises(ValueError, match="IANA"):
        zone_of(name)
