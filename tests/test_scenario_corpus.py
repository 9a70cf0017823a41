"""The broken-scenario corpus through ``parallelcity validate`` as a user runs it.

Every file in tests/scenario_corpus/ has an entry in its expected.toml: the exit code
and the words (key paths) the message must contain. Each runs in its own process, a
few at a time; none may print a traceback or take longer than 10 s. Huge and deeply
nested files are generated here rather than committed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import ROOT

CORPUS = Path(__file__).parent / "scenario_corpus"
EXPECTED = tomllib.loads((CORPUS / "expected.toml").read_text())["files"]
LIMIT_S = 10.0  # the bound on one validate of one file, in its own CPU seconds
HANG_S = 60.0  # wall bound: a file that holds validate up (a hang) fails here
WORKERS = min(4, os.cpu_count() or 1)  # a few at a time: each is mostly one CPU

pytestmark = pytest.mark.slow  # about 85 processes of half a CPU second each


@dataclass(frozen=True)
class Outcome:
    code: int
    out: str
    cpu_s: float  # the process's own work (user + system), whatever its neighbours do
    wall_s: float


def validate(*paths: Path | str) -> Outcome:
    """Run validate; its CPU time comes from wait4, so a loaded machine does not count."""
    with tempfile.TemporaryFile("w+") as out:
        start = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "parallelcity", "validate", *map(str, paths)],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        deadline = start + HANG_S
        pid, status, usage = 0, 0, None
        while time.monotonic() < deadline:  # bounded: the hang guard
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(0.02)
        if not pid:
            proc.kill()
            os.wait4(proc.pid, 0)
            pytest.fail(f"validate {paths} still running after {HANG_S:g} s")
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        assert usage is not None
        out.seek(0)
        return Outcome(
            proc.returncode, out.read(), usage.ru_utime + usage.ru_stime, time.monotonic() - start
        )


# files too big to commit: name -> (exit code, words the message must contain)
GENERATED = {
    "deep_array.toml": (2, ["nested too deeply"]),
    "deep_tables.toml": (2, ["nested too deeply"]),
    "huge.toml": (2, ["file is larger than 1 MiB"]),
    "huge_one_line.toml": (2, ["file is larger than 1 MiB"]),
    "a_folder.toml": (2, ["cannot read the file"]),
}


def _generate(folder: Path) -> None:
    base = (CORPUS / "valid_base.toml").read_text()
    (folder / "deep_array.toml").write_text("x = " + "[" * 100_000 + "]" * 100_000 + "\n")
    (folder / "deep_tables.toml").write_text("x = " + "{a = " * 50_000 + "1" + "}" * 50_000)
    (folder / "huge.toml").write_text(base + "# padding\n" * 200_000)
    (folder / "huge_one_line.toml").write_text(base + 'description = "' + "x" * 2_000_000 + '"\n')
    (folder / "a_folder.toml").mkdir()


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Outcome]]:
    generated = tmp_path_factory.mktemp("generated")
    _generate(generated)
    paths = {name: CORPUS / name for name in EXPECTED}
    paths |= {name: generated / name for name in GENERATED}
    paths["/dev/zero"] = Path("/dev/zero")
    with ThreadPoolExecutor(WORKERS) as pool:
        done = dict(zip(paths, pool.map(validate, paths.values()), strict=True))
    yield done


def test_the_corpus_holds_at_least_sixty_broken_files() -> None:
    on_disk = {p.name for p in CORPUS.glob("*.toml")} - {"expected.toml"}
    assert on_disk == set(EXPECTED), "every corpus file needs an entry in expected.toml"
    assert sum(1 for e in EXPECTED.values() if e["exit"] != 0) >= 60


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_corpus_file(outcomes: dict[str, Outcome], name: str) -> None:
    expected, got = EXPECTED[name], outcomes[name]
    assert got.code == expected["exit"], got.out
    for words in expected["names"]:
        assert words in got.out, f"{name} ({expected['what']}): {words!r} not in\n{got.out}"
    assert "Traceback" not in got.out, got.out
    assert got.cpu_s < LIMIT_S, f"{name} took {got.cpu_s:.1f} CPU s"


@pytest.mark.parametrize("name", sorted(GENERATED))
def test_generated_file(outcomes: dict[str, Outcome], name: str) -> None:
    (code, words), got = GENERATED[name], outcomes[name]
    assert got.code == code, got.out
    assert all(w in got.out for w in words), got.out
    assert "Traceback" not in got.out, got.out
    assert got.cpu_s < LIMIT_S, f"{name} took {got.cpu_s:.1f} CPU s"


def test_dev_zero_is_refused_without_reading_it_all(outcomes: dict[str, Outcome]) -> None:
    got = outcomes["/dev/zero"]
    assert got.code == 2 and "file is larger than 1 MiB" in got.out, got.out
    assert got.cpu_s < LIMIT_S


def test_validate_goes_on_after_a_bad_file_and_exits_with_the_worst() -> None:
    files = ["binary_garbage.toml", "latin1.toml", "valid_base.toml", "node_negative.toml"]
    got = validate(*(CORPUS / f for f in files))
    assert got.code == 2, got.out
    for f in files[:2] + files[3:]:
        assert f"{CORPUS / f}: invalid scenario" in got.out, got.out
    assert f"{CORPUS / 'valid_base.toml'}: ok" in got.out
    assert "Traceback" not in got.out
