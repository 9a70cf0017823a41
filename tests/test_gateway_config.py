"""The stand-alone gateway's config file: validation, schema, grants, and the CLI."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import jsonschema
import pytest

from parallelcity.cli import main as cli_main
from parallelcity.dispatch.keys import write_keypair
from parallelcity.errors import ScenarioError, SecurityError
from parallelcity.gateway.config import (
    gateway_json_schema,
    load_gateway_config,
    parse_gateway_config,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "gateway.example.toml"


def test_the_example_validates_and_matches_the_schema() -> None:
    config = load_gateway_config(EXAMPLE)
    assert config.file.gateway.bind == "tcp://0.0.0.0:5555"
    assert config.safe == {
        "plant.T_supply_set": 70.0,
        "apartment.m_flow": 0.3,
        "office.m_flow": 0.3,
        "school.m_flow": 0.3,
    }
    core = config.core()
    assert core.watchdog.window_s == 3.0 and core.leases.lease_s == 1800
    assert config.limits["plant.T_supply_set"].max_rate_per_h == 10.0
    jsonschema.validate(tomllib.loads(EXAMPLE.read_text()), gateway_json_schema())


def test_grants_come_from_the_key_files(tmp_path: Path) -> None:
    text = EXAMPLE.read_text().replace("[security.opcua]", "[x]", 1)
    text = text[: text.index("[x]")] + text[text.index("[field]") :]
    path = tmp_path / "gw.toml"
    path.write_text(text)
    config = load_gateway_config(path)
    with pytest.raises(SecurityError, match="cannot read secret key"):
        config.curve()
    for name in ("gateway", "control-room", "operator"):
        write_keypair(tmp_path / "keys", name)
    curve = config.curve()
    assert curve is not None and curve.domain == "parallelcity" and len(curve.allow) == 2
    room, op = curve.allow.by_name("control-room"), curve.allow.by_name("operator")
    assert room is not None and op is not None
    assert room.check({"plant.T_supply_set": 91.0}) is not None  # its range is [55, 90]
    assert room.check({"school.m_flow": 1.0}) is None and not room.rearm
    assert op.rearm and op.check({"school.m_flow": 1.0}) is not None


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (("[watchdog]", "[watchdog]\nperiod = 3"), "watchdog.period: unknown key"),
        (("safe = 70.0", "safe = 99.0"), "safe 99.0 is outside [50.0, 95.0]"),
        (("missed_heartbeats = 3", "missed_heartbeats = 0"), "watchdog.missed_heartbeats"),
        (('bind = "tcp://0.0.0.0:5555"', ""), "gateway.bind: required key is missing"),
        (("min = 50.0", 'min = "low"'), "field.inputs[0].min: Input should be a valid number"),
    ],
)
def test_bad_configs_are_reported_with_their_key_path(
    change: tuple[str, str], problem: str
) -> None:
    text = EXAMPLE.read_text().replace(*change, 1)
    with pytest.raises(ScenarioError) as info:
        parse_gateway_config(text, "gw.toml")
    assert any(problem in p for p in info.value.problems), info.value.problems


def test_cli_gateway_schema_and_refusals(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["gateway", "--schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["title"] == "parallelcity field gateway"
    bad = tmp_path / "bad.toml"
    bad.write_text("[gateway]\n")
    assert cli_main(["gateway", str(bad)]) == 2
    # The example without its key files: refused for security, nothing started.
    text = EXAMPLE.read_text()
    path = tmp_path / "gw.toml"
    path.write_text(text)
    assert cli_main(["gateway", str(path)]) == 4
    assert "cannot read secret key" in capsys.readouterr().err
    assert not (tmp_path / "gateway-state.sqlite").exists()
