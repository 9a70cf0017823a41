#!/usr/bin/env python3
"""Two commands for a fresh clone; each installs what it needs into .venv first.

    python3 dev.py demo [ARGS...]   run the district-heating closed loop (args go to `run`)
    python3 dev.py test [ARGS...]   run the test suite (pytest), then ruff and mypy; without
                                    ARGS the endurance tests run in a second pytest beside
                                    the rest
    python3 dev.py test --burn N [ARGS...]
                                    the same beside N CPU-burning processes (load test)
    python3 dev.py test -m "not slow"   the fast lane for everyday work

Needs only Python 3.11+ with pip and venv.  Re-installs when pyproject.toml changes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"


def sh(*cmd: str | Path) -> int:
    return subprocess.call([str(c) for c in cmd], cwd=ROOT)


def ensure_env() -> None:
    if not PY.exists():
        print(f"creating {VENV.relative_to(ROOT)}/ ...", file=sys.stderr, flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:16]
    stamp = VENV / f".installed-{digest}"
    if stamp.exists():
        return
    print("installing parallelcity and its dependencies into .venv/ ...", file=sys.stderr)
    steps = [
        (PY, "-m", "pip", "install", "--quiet", "--upgrade", "pip"),
        (PY, "-m", "pip", "install", "--quiet", "-e", ".[test]"),
    ]
    for step in steps:
        if sh(*step) != 0:
            sys.exit(f"install failed: {' '.join(map(str, step))}")
    for old in VENV.glob(".installed-*"):
        old.unlink()
    stamp.touch()
    if hasattr(os, "sync"):
        # the install leaves hundreds of MB to write back; a run's journal commits with
        # fsync, and its first commits would otherwise wait behind them (a missed deadline)
        os.sync()


# Spins until its parent (this script) is gone, so a killed run leaves no burner behind.
BURNER = """
import os
parent = os.getppid()
while os.getppid() == parent:
    for _ in range(1_000_000):
        pass
"""


def burners(n: int) -> list[subprocess.Popen[bytes]]:
    if n:
        print(f"burning {n} CPU(s) for the run ...", file=sys.stderr, flush=True)
    return [subprocess.Popen([sys.executable, "-c", BURNER]) for _ in range(n)]


def take_burn(args: list[str]) -> tuple[int, list[str]]:
    """``--burn N`` out of the arguments (anywhere): (N, the rest)."""
    if "--burn" not in args:
        return 0, args
    i = args.index("--burn")
    if i + 1 >= len(args) or not args[i + 1].isdigit():
        sys.exit("--burn needs a number of processes, e.g. --burn 2")
    return int(args[i + 1]), args[:i] + args[i + 2 :]


def test(rest: list[str]) -> int:
    if rest:  # extra args select tests; lint only runs on a full run
        return sh(PY, "-m", "pytest", *rest)
    rc = full_suite()
    if rc != 0:
        return rc
    print("ruff ...", file=sys.stderr, flush=True)
    rc = sh(BIN / "ruff", "check", ".") or sh(BIN / "ruff", "format", "--check", ".")
    if rc == 0:
        print("mypy ...", file=sys.stderr, flush=True)
        rc = sh(BIN / "mypy")
    return rc


def full_suite() -> int:
    """Every test: the endurance tests (long counts, minutes each, mostly one process's
    CPU) in a second pytest beside the rest, which holds under that load as it must under
    any; then the endurance report after the main one."""
    log = ROOT / ".endurance.log"
    with log.open("w") as out:
        endurance = subprocess.Popen(
            [str(PY), "-m", "pytest", "-m", "endurance", "-p", "no:cacheprovider", "-q"],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            rc = sh(PY, "-m", "pytest", "-m", "not endurance")
            print("endurance tests (run beside the rest) ...", file=sys.stderr, flush=True)
            erc = endurance.wait()
        finally:
            if endurance.poll() is None:
                endurance.kill()
                endurance.wait()
    print(log.read_text(), end="", flush=True)
    return rc or erc


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test"):
        print(__doc__, file=sys.stderr)
        return 2
    ensure_env()
    what, rest = argv[0], argv[1:]
    if what == "demo":
        return sh(BIN / "parallelcity", "run", "scenarios/district_heating.toml", *rest)
    burn, rest = take_burn(rest)
    procs = burners(burn)
    try:
        return test(rest)
    finally:
        for p in procs:
            p.kill()
            p.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
