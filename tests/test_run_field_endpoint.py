"""`run` against real equipment: the field and gateway come from `--field` / `--gateway`
or, without them, from the scenario's `[field] endpoint` / `gateway`; each is checked for
the scenario's protocol before anything starts.

Each case points at a 127.0.0.1 port nobody listens on: reaching for it (exit 3, naming
the endpoint) is what shows the run went to that address and not to the embedded rig.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from parallelcity.cli import main

from .conftest import DH, ROOT

DH_MODBUS = ROOT / "scenarios" / "district_heating_modbus.toml"


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _modbus_lab(tmp_path: Path, field_keys: str = "") -> Path:
    text = DH_MODBUS.read_text()
    assert "insecure_lab = false" in text and 'protocol = "modbus"\n' in text
    text = text.replace("insecure_lab = false", "insecure_lab = true")
    text = text.replace('protocol = "modbus"\n', f'protocol = "modbus"\n{field_keys}', 1)
    path = tmp_path / "site.toml"
    path.write_text(text)
    return path


def _run(argv: list[str]) -> int:
    try:
        return main(["run", *argv])
    except SystemExit as exc:  # argparse's usage error
        return int(exc.code or 0)


def test_the_scenarios_endpoint_and_gateway_are_where_run_goes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = _unused_port()
    keys = f'endpoint = "modbus://127.0.0.1:{port}"\ngateway = "tcp://127.0.0.1:9"\n'
    site = _modbus_lab(tmp_path, keys)
    rc = _run([str(site), "--out", str(tmp_path / "runs"), "--cycles", "1"])
    err = capsys.readouterr().err
    assert rc == 3, err
    assert f"against the modbus://127.0.0.1:{port}" in err
    assert "embedded rig" not in err and "stand-in" not in err
    assert f"127.0.0.1:{port}" in err.splitlines()[-1]


def test_field_takes_the_scenarios_protocol_endpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = _unused_port()
    site = _modbus_lab(tmp_path)
    argv = ["--field", f"modbus://127.0.0.1:{port}", "--gateway", "tcp://127.0.0.1:9"]
    rc = _run([str(site), "--out", str(tmp_path / "runs"), "--cycles", "1", *argv])
    err = capsys.readouterr().err
    assert rc == 3, err
    assert f"127.0.0.1:{port}" in err.splitlines()[-1]
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("scenario", "argv", "message"),
    [
        # another protocol's URL: a usage error naming the protocol, not a traceback
        (
            "modbus",
            ["--field", "opc.tcp://127.0.0.1:9", "--gateway", "tcp://127.0.0.1:9"],
            "is not modbus://HOST:PORT or HOST:PORT (Modbus TCP field)",
        ),
        (
            "opcua",
            ["--field", "modbus://127.0.0.1:9", "--gateway", "tcp://127.0.0.1:9"],
            "is not an opc.tcp://HOST:PORT URL",
        ),
        # simulated readings must not drive a gateway in front of real equipment
        ("opcua", ["--gateway", "tcp://127.0.0.1:9"], "--gateway needs a field"),
        ("modbus", ["--gateway", "tcp://127.0.0.1:9"], "--gateway needs a field"),
        ("modbus", ["--field", "modbus://127.0.0.1:9"], "--field needs a gateway"),
    ],
)
def test_field_and_gateway_are_checked_before_anything_starts(
    scenario: str,
    argv: list[str],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = DH if scenario == "opcua" else _modbus_lab(tmp_path)
    out = tmp_path / "runs"
    rc = _run([str(path), "--out", str(out), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert "Traceback" not in err
    assert not out.exists()  # nothing started


def test_a_scenario_endpoint_without_a_gateway_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = _modbus_lab(tmp_path, 'endpoint = "modbus://127.0.0.1:9"\n')
    rc = _run([str(site), "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert rc == 2 and "field.endpoint needs a gateway" in err, err
