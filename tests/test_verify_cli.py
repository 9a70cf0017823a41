"""``parallelcity verify``: a controller against a rig offline, with a report and a plot."""

from __future__ import annotations

from pathlib import Path

import pytest

from parallelcity.cli import main

from .conftest import DH

IMPOSSIBLE = """
[[specs.temporal]]
name = "office-at-25-within-an-hour"
kind = "eventually"
require = { signal = "office.T_zone", above = 25.0 }
within_s = 3600
"""


@pytest.mark.slow
def test_verify_prints_each_spec_and_kpis_and_writes_a_plot(tmp_path: Path, capsys) -> None:
    rc = main(
        ["verify", str(DH), "--rig", "simulated", "--samples", "2", "--cycles", "4",
         "--controller", "pi", "--out", str(tmp_path)]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "controller pi on simulated(seed=7), 2 sample(s) x 4 cycles" in out
    for spec in ("bound:plant.T_supply_set", "rate:plant.T_supply_set", "band:office.T_zone"):
        line = next(x for x in out.splitlines() if x.startswith(spec))
        assert " pass " in line
    assert "comfort violation" in out and "solver failures    0 of 8 solves" in out
    n_specs = 4 + 1 + 3 + 1 + 1  # bounds, one ramp, bands, the interlock, the temporal spec
    assert f"verdict            PASS: {n_specs} of {n_specs} specs" in out
    for name in ("no-full-school-flow-on-a-cold-supply", "apartment-never-cold-for-two-hours"):
        assert any(x.startswith(name) and " pass " in x for x in out.splitlines())
    (png,) = tmp_path.glob("verify-district-heating-simulated-*.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_verify_fails_with_the_spec_that_does_not_hold(tmp_path: Path, capsys) -> None:
    scenario = tmp_path / "hot.toml"
    scenario.write_text(DH.read_text() + IMPOSSIBLE)
    rc = main(
        ["verify", str(scenario), "--rig", "simulated", "--samples", "1", "--cycles", "4",
         "--controller", "pi", "--out", str(tmp_path)]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 5
    line = next(x for x in out.splitlines() if x.startswith("office-at-25-within-an-hour"))
    assert " FAIL " in line and float(line.split()[2]) < 0
    assert "verdict            FAIL" in out


def test_verify_rejects_a_rig_config_that_does_not_fit(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "fmu.toml"
    cfg.write_text('path = "nowhere.fmu"\n')
    rc = main(["verify", str(DH), "--rig", "fmu", "--rig-config", str(cfg)])
    assert rc == 2
    assert "rig.path: cannot read FMU" in capsys.readouterr().err
