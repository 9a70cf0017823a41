"""Scenario files: the shipped ones validate; bad ones name the file, key path and expectation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from parallelcity.cli import main
from parallelcity.errors import ScenarioError
from parallelcity.scenario.definition import json_schema, load_scenario, parse_scenario

from .conftest import DH, ROOT


def problems_of(text: str, name: str = "bad.toml") -> list[str]:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(text, name)
    assert str(info.value).startswith(f"{name}: invalid scenario")
    return info.value.problems


def test_every_shipped_scenario_validates() -> None:
    files = sorted((ROOT / "scenarios").glob("*.toml"))
    assert files
    for f in files:
        sc = load_scenario(f)
        assert sc.model.nx > 0


def test_district_heating_scenario_describes_the_site(dh) -> None:
    assert len([s for s in dh.model.states if s.endswith("T_zone")]) >= 3
    assert dh.model.inputs[0] == "plant.T_supply_set"
    assert dh.meta.cycle_s == 900 and dh.meta.horizon_steps == 24


def test_unknown_key_is_named_with_its_path(dh_text: str) -> None:
    text = dh_text.replace("cycle_s = 900", "cycle_s = 900\ncycle_seconds = 900")
    assert problems_of(text) == ["scenario.cycle_seconds: unknown key (not allowed here)"]


def test_unknown_key_inside_a_plugin_section(dh_text: str) -> None:
    text = dh_text.replace("tau_min = 20.0", "tau_min = 20.0\ntau_max = 3.0")
    assert problems_of(text) == ["model.plant.tau_max: unknown key (not allowed here)"]


def test_wrong_type_says_what_was_expected(dh_text: str) -> None:
    text = dh_text.replace("horizon_steps = 24", 'horizon_steps = "six hours"')
    (problem,) = problems_of(text)
    assert problem.startswith("scenario.horizon_steps: Input should be a valid integer")
    assert "'six hours'" in problem


def test_wrong_type_in_a_list_item_names_its_index(dh_text: str) -> None:
    text = dh_text.replace("max_rate_per_h = 10.0", "max_rate_per_h = -10.0")
    (problem,) = problems_of(text)
    assert problem.startswith("specs.inputs[0].max_rate_per_h: Input should be greater than 0")


def test_missing_point_for_a_state_is_reported(dh_text: str) -> None:
    text = dh_text.replace(
        '[[field.points]]\nname = "school.T_zone"\nnode = "s=dh/school/T_zone"\nmax_age_s = 1800\n'
        "min = -20.0\nmax = 50.0\n",
        "",
    )
    assert problems_of(text) == [
        "field.points: state 'school.T_zone' needs a point measuring output 'school.T_zone'"
    ]


def test_point_naming_no_model_output(dh_text: str) -> None:
    text = dh_text.replace('name = "weather.T_out"', 'name = "weather.wind"')
    (problem,) = problems_of(text)
    assert problem.startswith("field.points[9].name: 'weather.wind' is not an output of model")


def test_the_shipped_scenario_declares_a_plausible_range_for_every_point(dh) -> None:
    for p in dh.field.points:
        assert p.type == "float" and p.min is not None and p.max is not None, p.name
        assert p.min < p.max
    assert dh.field.max_clock_skew_s == 5.0


def test_point_type_range_and_skew_are_checked_with_key_paths(dh_text: str) -> None:
    first = 'node = "s=dh/apartment/T_zone"\nmax_age_s = 1800\nmin = -20.0\nmax = 50.0\n'
    supply = 'node = "s=dh/plant/T_supply"\nmax_age_s = 1800\nmin = 0.0\nmax = 130.0\n'
    assert first in dh_text and supply in dh_text
    text = (
        dh_text.replace(
            first, first.replace("max_age_s = 1800", 'max_age_s = 1800\ntype = "double"')
        )
        .replace(supply, supply.replace("min = 0.0", "min = 140.0"))
        .replace("max_clock_skew_s = 5.0", "max_clock_skew_s = -1.0")
        .replace('name = "weather.T_out"', 'name = "weather.T_out"\nmax_clock_skew_s = "soon"')
        .replace("min = 0.0\nmax = 200.0", "min = 0.0\nmax = inf")
    )
    problems = problems_of(text)
    assert len(problems) == 5, problems
    assert problems[0].startswith("field.max_clock_skew_s: Input should be greater than or equal")
    assert problems[1].startswith("field.points[0].type: Input should be 'float', 'int' or 'bool'")
    assert "field.points[3]: min 140 is above max 130" in problems
    assert any(
        p.startswith("field.points[9].max_clock_skew_s: Input should be a valid number")
        for p in problems
    )
    assert "field.points[8].max: must be a finite number, not inf or nan" in problems


def test_missing_required_key(dh_text: str) -> None:
    text = dh_text.replace("cycle_s = 900 ", "")
    assert "scenario.cycle_s: required key is missing" in problems_of(text)


def test_unknown_kind_lists_installed_kinds(dh_text: str) -> None:
    text = dh_text.replace('kind = "nmpc"', 'kind = "fuzzy"')
    (problem,) = problems_of(text)
    assert problem.startswith("controller.kind: unknown controller kind 'fuzzy' (installed: ")
    assert "nmpc" in problem and "pi" in problem


def test_several_problems_reported_at_once(dh_text: str) -> None:
    text = dh_text.replace("cycle_s = 900", "cycle_s = -1").replace(
        "seed = 7", "seed = 7\ncolour = 'red'"
    )
    problems = problems_of(text)
    assert len(problems) == 2


def test_not_toml_is_reported() -> None:
    (problem,) = problems_of("[scenario\nname=")
    assert problem.startswith("not valid TOML")


def test_missing_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="cannot read the file"):
        load_scenario(tmp_path / "nope.toml")


def test_cli_validate_prints_problems_and_exits_2(tmp_path: Path, dh_text: str, capsys) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(dh_text.replace("cycle_s = 900", "cycle_s = 900\ncycle_seconds = 900"))
    assert main(["validate", str(DH), str(bad)]) == 2
    out = capsys.readouterr()
    assert f"{DH}: ok" in out.out
    assert f"{bad}: invalid scenario" in out.err
    assert "scenario.cycle_seconds: unknown key" in out.err


@pytest.mark.slow
def test_run_with_an_invalid_file_starts_nothing(tmp_path: Path, dh_text: str) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(dh_text.replace("speed = 1440", 'speed = "fast"'))
    proc = subprocess.run(
        [sys.executable, "-m", "parallelcity", "run", str(bad), "--out", str(tmp_path / "runs")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "scenario.speed: Input should be a valid number" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_schema_validates_the_shipped_scenario_and_rejects_a_bad_one(dh_text: str) -> None:
    import tomllib

    jsonschema = pytest.importorskip("jsonschema")
    schema = json_schema()
    json.dumps(schema)
    data = tomllib.loads(dh_text)
    jsonschema.validate(json.loads(json.dumps(data, default=str)), schema)
    data["controller"]["comfort_wieght"] = 3
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(json.loads(json.dumps(data, default=str)), schema)
    point = schema["$defs"]["PointMap"]["properties"]
    assert point["type"]["enum"] == ["float", "int", "bool"] and point["type"]["default"] == "float"
    assert {"min", "max", "max_clock_skew_s"} <= point.keys()
    assert "max_clock_skew_s" in schema["$defs"]["FieldConfig"]["properties"]
    data = tomllib.loads(dh_text)
    data["field"]["points"][0]["type"] = "double"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(json.loads(json.dumps(data, default=str)), schema)


def test_cli_schema_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "schema.json"
    assert main(["schema", "-o", str(out)]) == 0
    schema = json.loads(out.read_text())
    assert schema["title"] == "parallelcity scenario"
    kinds = [v["properties"]["kind"]["const"] for v in schema["properties"]["controller"]["oneOf"]]
    assert {"nmpc", "pi", "hold"} <= set(kinds)


@pytest.mark.parametrize(
    ("name", "words"),
    [("x" * 56, "56 UTF-8 bytes, at most 55"), ("plant\tnorth", "U+0009 (category Cc)")],
)
def test_the_name_must_be_an_issuer_a_run_can_speak_as(dh_text: str, name: str, words: str) -> None:
    """The run's commands carry ``<name>-<8 hex>``: a name the wire refuses would only fail
    once the run starts sending."""
    text = dh_text.replace('name = "district-heating"', f'name = "{name}"', 1)
    assert text != dh_text
    assert any(p.startswith("scenario.name:") and words in p for p in problems_of(text))
    ok = dh_text.replace('name = "district-heating"', f'name = "{"x" * 55}"', 1)
    assert parse_scenario(ok).meta.name == "x" * 55
