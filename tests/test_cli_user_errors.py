"""User errors on the command line end in a message and exit 2 (or 3), never a traceback
or a hang: each command runs as a user runs it, all of them at once."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import DH, ROOT

CORPUS = Path(__file__).parent / "scenario_corpus"
pytestmark = pytest.mark.slow  # some 20 processes, four at a time
# refused by `run` before anything starts: one of each family
RUN_REFUSES = [
    "syntax_bad_date.toml",
    "nonfinite_ua_inf.toml",
    "node_garbage.toml",
    "period_empty.toml",
    "cross_milp_on_district_heating.toml",
    "cross_pi_loop_unbanded.toml",  # once a ValueError traceback from setup, exit 1
]
# once verify has said it cannot reach the bench, the process ends: closing the client's
# event-loop thread takes milliseconds; the bound leaves room for a loaded machine
EXIT_AFTER_ERROR_S = 5.0


@dataclass(frozen=True)
class Outcome:
    code: int
    out: str
    seconds: float


def cli(*args: str) -> Outcome:
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "parallelcity", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
    )
    return Outcome(proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start)


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    (root / "a_file").write_text("not a folder\n")
    (root / "binary.toml").write_bytes(bytes(range(256)) * 4)
    (root / "bench.toml").write_text(
        f'endpoint = "opc.tcp://127.0.0.1:{_unused_port()}"\ninsecure_lab = true\ntimeout_s = 2\n'
    )
    return root


def commands(w: Path) -> dict[str, list[str]]:
    out = str(w / "runs")
    dh = str(DH)
    cmds = {
        "certs_into_a_file": ["certs", str(w / "a_file")],
        "schema_into_a_missing_folder": ["schema", "-o", str(w / "missing" / "dir" / "x.json")],
        "verify_unknown_rig": ["verify", dh, "--rig", "wind_tunnel", "--out", out],
        "verify_unknown_controller": [
            "verify", dh, "--rig", "simulated", "--controller", "magic", "--out", out,
        ],
        "verify_mismatched_controller": [
            "verify", dh, "--rig", "simulated", "--controller", "milp_pump", "--out", out,
        ],
        "verify_binary_rig_config": [
            "verify", dh, "--rig", "bench", "--rig-config", str(w / "binary.toml"), "--out", out,
        ],
        "verify_zero_samples": ["verify", dh, "--rig", "simulated", "--samples", "0"],
        "run_unknown_controller": ["run", dh, "--controller", "magic", "--out", out],
        "run_mismatched_controller": ["run", dh, "--controller", "milp_pump", "--out", out],
        "run_speed_inf": ["run", dh, "--speed", "inf", "--out", out],
        "run_speed_nan": ["run", dh, "--speed", "nan", "--out", out],
        "run_speed_tiny": ["run", dh, "--speed", "1e-9", "--out", out],
        "run_cycles_zero": ["run", dh, "--cycles", "0", "--out", out],
    }  # fmt: skip
    for name in RUN_REFUSES:
        cmds[f"run:{name}"] = ["run", str(CORPUS / name), "--cycles", "2", "--out", str(w / name)]
    return cmds


@pytest.fixture(scope="module")
def outcomes(work: Path) -> dict[str, Outcome]:
    cmds = commands(work)
    with ThreadPoolExecutor(4) as pool:
        return dict(zip(cmds, pool.map(lambda a: cli(*a), cmds.values()), strict=True))


EXPECT: dict[str, tuple[int, list[str]]] = {
    "certs_into_a_file": (2, ["a_file is not a folder"]),
    "schema_into_a_missing_folder": (2, ["the folder", "missing/dir does not exist"]),
    "verify_unknown_rig": (2, ["unknown rig kind 'wind_tunnel'"]),
    "verify_unknown_controller": (2, ["--controller: unknown controller kind 'magic'"]),
    "verify_mismatched_controller": (2, ["--controller: 'milp_pump'", "'district_heating'"]),
    "verify_binary_rig_config": (2, ["cannot read the rig config", "byte offset 0"]),
    "verify_zero_samples": (2, ["--samples", "at least 1"]),
    "run_unknown_controller": (2, ["--controller: unknown controller kind 'magic'"]),
    "run_mismatched_controller": (2, ["--controller: 'milp_pump'", "'district_heating'"]),
    "run_speed_inf": (2, ["--speed", "finite"]),
    "run_speed_nan": (2, ["--speed", "finite"]),
    "run_speed_tiny": (2, ["--speed", "0.001"]),
    "run_cycles_zero": (2, ["--cycles", "at least 1"]),
}


@pytest.mark.parametrize("name", sorted(EXPECT))
def test_user_error_exits_with_its_code_and_says_why(
    outcomes: dict[str, Outcome], name: str
) -> None:
    (code, words), got = EXPECT[name], outcomes[name]
    assert got.code == code, got.out
    assert all(w in got.out for w in words), got.out
    assert "Traceback" not in got.out, got.out


def test_an_unreachable_bench_is_exit_3_and_the_command_ends(work: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "parallelcity", "verify", str(DH), "--rig", "bench",
         "--rig-config", str(work / "bench.toml"), "--out", str(work / "runs")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    said: list[float] = []
    lines: list[str] = []

    def read() -> None:  # ends when the process closes stderr
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("rig error:"):
                said.append(time.monotonic())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=60)
        ended = time.monotonic()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    reader.join(timeout=10)
    out = "".join(lines)
    assert code == 3, out
    assert "rig error: cannot reach the bench" in out and "Traceback" not in out, out
    assert ended - said[0] < EXIT_AFTER_ERROR_S, f"exited {ended - said[0]:.1f} s after the error"


@pytest.mark.parametrize("name", RUN_REFUSES)
def test_run_refuses_a_broken_scenario_before_starting_anything(
    outcomes: dict[str, Outcome], work: Path, name: str
) -> None:
    got = outcomes[f"run:{name}"]
    assert got.code == 2, got.out
    assert "invalid scenario" in got.out and "Traceback" not in got.out, got.out
    assert "running" not in got.out, got.out
    assert not (work / name).exists()
