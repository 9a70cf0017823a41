"""The water domain as a user runs it: the shipped Net3 scenario through the Modbus
stand-in and the gateway, and a second network of wntr's from `skeleton` to a closed
loop.  The two runs are started together to keep the suite's time down."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from parallelcity.cli import main
from parallelcity.models.water.network import resolve

from .conftest import ROOT

NET3 = ROOT / "scenarios" / "water_net3" / "net3.toml"
NET1_FILE = resolve("wntr:Net1.inp")  # EPANET's Net1, as shipped in the wntr package
# the network's own rules at the old pace: the transport is what is tested here (the
# scenario's milp_pump needs its slower speed to plan within the deadline)
NET3_RULES = ["run", str(NET3), "--cycles", "6", "--controller", "inp_rules", "--speed", "1800"]
RUN_TIMEOUT_S = 120  # each run takes ~15 s on an idle machine; a loaded one is slower


def _run(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "parallelcity", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _summary(out: Path) -> dict[str, object]:
    found = sorted(out.glob("*/summary.json"))
    assert len(found) == 1, found
    summary: dict[str, object] = json.loads(found[0].read_text())
    return summary


@pytest.mark.slow
def test_skeleton_lists_the_network_and_validates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["skeleton", str(NET1_FILE)]) == 0
    text = capsys.readouterr().out
    assert "#   pumps: 9" in text and "#   tanks: 2" in text and 'kind = "inp_rules"' in text
    assert 'inp = "wntr:Net1.inp"' in text  # a network wntr ships is named portably
    out = tmp_path / "net1.toml"
    assert main(["skeleton", str(NET1_FILE), "-o", str(out)]) == 0
    assert main(["validate", str(out)]) == 0
    assert main(["skeleton", str(NET1_FILE.with_name("Net2.inp"))]) == 2  # nothing to switch
    err = capsys.readouterr().err
    assert "nothing to control" in err and "Traceback" not in err


@pytest.mark.slow
def test_net3_and_a_skeleton_of_net1_close_the_loop_through_modbus(tmp_path: Path) -> None:
    net1 = tmp_path / "net1.toml"
    assert main(["skeleton", str(NET1_FILE), "-o", str(net1)]) == 0
    start = time.monotonic()
    runs = {
        "net3": (_run(NET3_RULES + ["--out", "net3"], tmp_path), 6),
        "net1": (_run(["run", str(net1), "--cycles", "3", "--out", "net1"], tmp_path), 3),
    }
    for name, (proc, cycles) in runs.items():
        try:
            output, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert proc.returncode == 0, output
        assert "Traceback" not in output
        summary = _summary(tmp_path / name)
        assert summary["cycles"] == cycles and summary["acked"] == cycles, summary
        assert summary["fallbacks"] == 0 and summary["band_violation"] == 0.0, summary
    assert time.monotonic() - start < RUN_TIMEOUT_S
