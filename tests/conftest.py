from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DH = ROOT / "scenarios" / "district_heating.toml"


def lab_text() -> str:
    """The shipped scenario as an insecure lab copy, for tests that wire the parts by hand
    without certificates or keys (the shipped file is secure by default)."""
    text = DH.read_text()
    assert "insecure_lab = false" in text
    return text.replace("insecure_lab = false", "insecure_lab = true")


@pytest.fixture(scope="session")
def dh_text() -> str:
    """Text of the lab copy of the district-heating scenario."""
    return lab_text()


@pytest.fixture(scope="session")
def dh():
    """The lab copy of the district-heating scenario (insecure_lab = true)."""
    from parallelcity.scenario.definition import parse_scenario

    return parse_scenario(lab_text(), DH)


@pytest.fixture(scope="session")
def dh_shipped():
    """The district-heating scenario exactly as shipped (secure)."""
    from parallelcity.scenario.definition import load_scenario

    return load_scenario(DH)


@pytest.fixture(scope="module")
def scenario():
    """The district-heating scenario, loaded afresh per test module."""
    from parallelcity.scenario.definition import load_scenario

    return load_scenario(DH)


@pytest.fixture(scope="module")
def specs(scenario):

    return scenario.safety_specs()


@pytest.fixture(scope="module")
def problem(scenario, specs):
    return specs.control_problem(scenario.model, scenario.meta.cycle_s, scenario.meta.horizon_steps)
