"""Modbus scenario keys: loaded through the installed entry point, checked with key paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from parallelcity import plugins
from parallelcity.cli import main
from parallelcity.errors import SecurityError
from parallelcity.field.modbus.protocol import PROTOCOL, ModbusField, host_port
from parallelcity.scenario.definition import load_scenario

from .conftest import ROOT

DH_MODBUS = ROOT / "scenarios" / "district_heating_modbus.toml"


def test_the_modbus_protocol_is_installed_and_its_scenario_loads() -> None:
    assert plugins.load_protocol("modbus") is PROTOCOL
    scenario = load_scenario(DH_MODBUS)
    field = scenario.field
    assert isinstance(field, ModbusField)
    rows = {name: address for name, address, _ in PROTOCOL.describe(field)}
    assert rows["plant.fuel_kw"] == "unit 1 input 18 (float32)"
    assert rows["apartment.m_flow"] == "unit 1 holding 102 (uint16)"
    assert field.points[0].modbus_address().scale == 0.01


@pytest.mark.parametrize(
    ("edit", "path", "why"),
    [
        (('address = 10\n', 'address = 70000\n'), "field.points[3].address", "65535"),
        (('table = "holding"', 'table = "input"'), "field.inputs[0]", "read-only"),
        (('table = "holding"', 'table = "holdings"'), "field.inputs[0].table", "'holding'"),
        (('scale = 0.01 ', 'scale = 0.0 '), "field.points[0]", "scale must not be 0"),
        (('data_type = "int16"', 'data_type = "bool"'), "field.points[0]", "coils"),
        (('poll_interval_ms = 50', 'poll_interval_ms = 0'), "field.poll_interval_ms", "greater"),
        (('protocol = "modbus"', 'protocol = "modbus"\nregister = 3'),
         "field.register", "unknown key"),
        (('max_age_s = 1800\nmin = -20.0', 'max_age_s = 1800\ntype = "int"\nmin = -20.0'),
         "field.points[0]", "type int needs an integer data_type"),
    ],
)  # fmt: skip
def test_validate_refuses_a_bad_address_with_its_key_path_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], edit: tuple[str, str], path: str, why: str
) -> None:
    text = DH_MODBUS.read_text()
    assert edit[0] in text
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace(edit[0], edit[1], 1))
    assert main(["validate", str(bad)]) == 2
    out = capsys.readouterr()
    text_out = out.out + out.err
    assert f"{path}:" in text_out and why in text_out, text_out
    assert "Traceback" not in text_out


def test_endpoints() -> None:
    assert host_port("modbus://10.0.0.7:1502") == ("10.0.0.7", 1502)
    assert host_port("plc-3") == ("plc-3", 502)
    assert host_port("[::1]:5020") == ("::1", 5020)
    for bad in ("opc.tcp://plc:4840", "plc:0", "plc:99999", "a b"):
        with pytest.raises(ValueError, match="is not modbus://HOST:PORT"):
            host_port(bad)


def test_modbus_refuses_security_it_cannot_honour() -> None:
    field = load_scenario(DH_MODBUS).field

    class Secure:
        secure = True

    with pytest.raises(SecurityError, match="no authentication"):
        PROTOCOL.writer(field, endpoint="127.0.0.1:5020", security=Secure())
