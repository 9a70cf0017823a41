"""``parallelcity field``: lab mode is loud, Ctrl-C ends it cleanly, certificates not guessed."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from parallelcity.hil.simulated import KIND

from parallelcity.clock import SimClock
from parallelcity.errors import SecurityError
from parallelcity.field.opcua.certs import lab_pki_files
from parallelcity.field.opcua.stand_in import EmbeddedField, free_port
from parallelcity.field.serve import ensure_pki, pki_root
from parallelcity.scenario.definition import Scenario, parse_scenario

from .conftest import DH, ROOT, lab_text


@pytest.mark.slow
def test_the_stand_in_in_lab_mode_says_insecure_lab_mode(
    dh: Scenario, caplog: pytest.LogCaptureFixture
) -> None:
    field = KIND.field_stand_in(dh.rig_config, dh, SimClock(epoch=time.time()))
    assert isinstance(field, EmbeddedField)

    async def body() -> None:
        async with asyncio.timeout(60):
            async with field:
                pass

    with caplog.at_level(logging.WARNING):
        asyncio.run(body())
    logger = "parallelcity.field.opcua.stand_in"
    lines = [r.getMessage() for r in caplog.records if r.name == logger]
    assert any(line.startswith("INSECURE LAB MODE: the field stand-in") for line in lines)


def test_a_partial_certificate_folder_is_refused_and_an_empty_one_is_made(
    tmp_path: Path,
) -> None:
    root = tmp_path / "pki"
    assert ensure_pki(root, "127.0.0.1") is True
    assert all(p.exists() for p in lab_pki_files(root))
    assert ensure_pki(root, "127.0.0.1") is False  # kept, not replaced
    (root / "server" / "own" / "server.key.pem").unlink()
    with pytest.raises(SecurityError, match=r"server\.key\.pem"):
        ensure_pki(root, "127.0.0.1")


def test_the_certificate_folder_is_the_scenarios_own(tmp_path: Path) -> None:
    site = parse_scenario(
        (ROOT / "docs" / "site" / "scenario.toml").read_text(), tmp_path / "s.toml"
    )
    assert pki_root(site, None) == tmp_path / "pki"
    assert pki_root(site, Path("elsewhere")) == Path("elsewhere")
    shipped = parse_scenario(DH.read_text(), DH)  # no [security.opcua]
    assert pki_root(shipped, None) == Path("field-pki")


@pytest.mark.slow
def test_field_insecure_lab_warns_and_ctrl_c_ends_it_with_exit_0(tmp_path: Path) -> None:
    scenario = tmp_path / "lab.toml"
    scenario.write_text(lab_text())
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "parallelcity.hil.field",
            str(scenario),
            "--port",
            str(port),
            "--insecure-lab",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        seen: list[str] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if "stop with Ctrl-C" in line:
                break
        text = "".join(seen)
        assert f"serving opc.tcp://127.0.0.1:{port}" in text, text
        assert "INSECURE LAB MODE" in text
        assert "--insecure-lab" in text  # the browse line of what to do next
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, text + out
        assert "field stand-in stopped" in out and "Traceback" not in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
