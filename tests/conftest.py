from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DH = ROOT / "scenarios" / "district_heating.toml"


@pytest.fixture(scope="session")
def dh_text() -> str:
    return DH.read_text()


@pytest.fixture(scope="session")
def dh():
    from parallelcity.scenario import load_scenario

    return load_scenario(DH)
