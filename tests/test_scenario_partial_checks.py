"""A section that fails must not make a sound controller table fail too.

When a file does not validate as a whole, the controllers are checked against a problem
built from what did validate.  That problem used to have a cycle of 1 s whatever the file
said, so a discrete-time model stepped every 300 s (`pump_tank`) made `milp_pump` report
"a period of 1 s is not a whole number of its steps" beside any unrelated mistake (a
missing `start`, a wrong Modbus table): a problem the file does not have.
"""

from __future__ import annotations

import re

import pytest

from parallelcity.errors import ScenarioError
from parallelcity.scenario.definition import parse_scenario

from .conftest import ROOT

PUMP_TANK = (ROOT / "scenarios" / "pump_tank.toml").read_text()


def _problems(text: str) -> list[str]:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(text, "site.toml")
    return info.value.problems


def test_a_missing_start_is_the_only_problem_reported() -> None:
    text = re.sub(r"(?m)^start = .*$", "", PUMP_TANK)
    assert _problems(text) == ["scenario.start: required key is missing"]


def test_a_bad_field_entry_is_the_only_problem_reported() -> None:
    text = PUMP_TANK.replace('node = "s=pt/pump/on"', 'node = "ns=2;s=pt/pump/on"')
    problems = _problems(text)
    assert len(problems) == 1 and problems[0].startswith("field.inputs[0].node"), problems


def test_a_cycle_the_model_cannot_take_is_still_named_as_the_cycle() -> None:
    text = PUMP_TANK.replace("cycle_s = 900", "cycle_s = 1000")
    problems = _problems(text)
    assert any(p.startswith("scenario.cycle_s:") for p in problems), problems
