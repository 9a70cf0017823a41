"""A rig's relative FMU path is relative to the file it is written in, not the current directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from parallelcity.hil.fmu import KIND as FMU

from parallelcity.errors import ScenarioError
from parallelcity.scenario.definition import parse_scenario
from parallelcity.verify.campaign import rig_config_for

from .test_rigs_fmu_bench import FMU_RIG, SLAVE, with_rig


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``site/rigs/DistrictHeating.fmu``, and ``site/elsewhere/`` to run from."""
    root = tmp_path_factory.mktemp("site")
    (root / "rigs").mkdir()
    (root / "elsewhere").mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "pythonfmu", "build", "-f", str(SLAVE), "-d", str(root / "rigs")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert (root / "rigs" / "DistrictHeating.fmu").exists()
    return root


def rig_config_file(rig_table: str) -> str:
    """The scenario's [rig] table as a stand-alone rig-config file (keys at the top level)."""
    return rig_table.replace("[rig]\n", "").replace("[rig.", "[")


def test_a_rig_config_file_path_resolves_against_the_config_files_folder(
    site: Path, dh, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = site / "rigs" / "fmu.toml"
    config.write_text(rig_config_file(FMU_RIG.format(path="DistrictHeating.fmu", samples=1)))
    monkeypatch.chdir(site / "elsewhere")
    cfg = rig_config_for(dh, "fmu", Path("../rigs/fmu.toml"), None)  # checks the FMU's mapping
    assert Path(cfg.path) == site / "rigs" / "DistrictHeating.fmu"
    rig = FMU.verification_rig(cfg, dh.model)
    rig.close()


def test_a_scenario_rig_path_resolves_against_the_scenario_file(
    site: Path, dh_text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(site / "elsewhere")
    text = with_rig(dh_text, FMU_RIG.format(path="rigs/DistrictHeating.fmu", samples=1))
    scenario = parse_scenario(text, site / "scenario.toml")
    assert Path(scenario.rig_config.path) == site / "rigs" / "DistrictHeating.fmu"
    with pytest.raises(ScenarioError, match=r"rig\.path: cannot read FMU") as info:
        parse_scenario(text, site / "elsewhere" / "scenario.toml")
    assert str(site / "elsewhere" / "rigs" / "DistrictHeating.fmu") in str(info.value)
