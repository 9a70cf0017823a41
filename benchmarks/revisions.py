"""The demo and the main benchmarks of two revisions, side by side, in one run.

    python -m benchmarks.revisions BASE [HEAD] [--rounds 3] [--quick] [--json FILE]

BASE and HEAD are git revisions of this repository (HEAD defaults to the working tree as it
is, uncommitted edits included).  BASE is the named baseline.  Each revision gets a
throw-away git worktree in a temporary folder and a venv there with its own editable
install; every other package comes from the interpreter running this script, through a
``.pth`` line to its site-packages.  Then, alternating the order every round so the
machine's load hits both alike, each revision runs its OWN code:

1. the demo: ``parallelcity run scenarios/district_heating.toml --cycles N`` (embedded rig,
   OPC UA, gateway, all real), cycle time and solve time p50 / p99 from the run's
   ``summary.json`` (from its journal if the summary lacks them);
2. ``benchmarks.mirror_ingest``: the mirror's snapshot time at 1,000 points, p99, from the
   module's own ``Server`` and ``mirror_cycles`` (without its ingest and polling parts);
3. ``benchmarks.dispatch_roundtrip``: command + ack round trip p99 with one command in
   flight, CURVE, with and without the durable store, from the module's own gateway process
   and ``bench_dispatcher``.

A revision whose benchmark module lacks those names runs the module as a command instead,
with reduced counts, and its figures are read from what it prints.

The table gives each metric's median over the rounds, and HEAD / BASE.  Absolute times on a
shared machine are noise; the ratio from one run is the result.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUBPROCESS_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Settings:
    rounds: int
    demo_cycles: int
    mirror_cycles: int
    dispatch_n: int


FULL = Settings(rounds=3, demo_cycles=24, mirror_cycles=150, dispatch_n=1000)
QUICK = Settings(rounds=1, demo_cycles=16, mirror_cycles=100, dispatch_n=500)

METRICS = (
    ("demo cycle p50 ms", "cycle_p50"),
    ("demo cycle p99 ms", "cycle_p99"),
    ("demo solve p50 ms", "solve_p50"),
    ("demo solve p99 ms", "solve_p99"),
    ("mirror snapshot p99 ms (1,000 points)", "mirror_p99"),
    ("dispatch p99 ms (CURVE + durable store)", "dispatch_p99"),
    ("dispatch p99 ms (CURVE, no store)", "dispatch_curve_p99"),
)


@dataclass
class Revision:
    label: str  # BASE or HEAD
    spec: str  # what the user named
    tree: Path
    python: Path = Path()
    results: dict[str, list[float]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def add(self, key: str, value: float) -> None:
        self.results.setdefault(key, []).append(value)


# ------------------------------------------------------------------------- set-up


def _git(*args: str, cwd: Path = ROOT) -> str:
    out = subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True)
    return out.stdout.strip()


def _site_dirs() -> list[str]:
    """Where this interpreter's packages live: its purelib, and any site-packages folder on
    its path (a venv whose own site-packages only points at another one through a .pth)."""
    dirs = [sysconfig.get_paths()["purelib"]]
    for p in sys.path:
        if p.endswith(("site-packages", "dist-packages")) and Path(p).is_dir() and p not in dirs:
            dirs.append(p)
    return dirs


def make_venv(tree: Path, venv: Path) -> Path:
    """A venv with an editable install of ``tree``, other packages from this interpreter."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    python = venv / "bin" / "python"
    purelib = _run_text(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
    )
    Path(purelib.strip(), "zz_parent_site.pth").write_text("\n".join(_site_dirs()) + "\n")
    pip = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "-e", str(tree)],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )
    if pip.returncode != 0:
        raise RuntimeError(f"{tree}: pip install -e failed:\n{pip.stderr[-2000:]}")
    # run outside the tree, so the import shows what the install resolves to
    where = _run_text(
        [str(python), "-c", "import parallelcity; print(parallelcity.__file__)"], venv
    )
    if not Path(where.strip()).resolve().is_relative_to(tree.resolve()):
        raise RuntimeError(f"{tree}: its venv imports parallelcity from {where.strip()}")
    return python


def _run_text(cmd: Sequence[str], cwd: Path | None = None) -> str:
    out = subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True, env=_env())
    return out.stdout


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


# ------------------------------------------------------------------------- measurements


def _run(rev: Revision, args: Sequence[str], cwd: Path) -> str:
    proc = subprocess.run(
        [str(rev.python), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
        env=_env(),
    )
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-5:])
        raise RuntimeError(f"{' '.join(args[:3])} exited {proc.returncode}:\n{tail}")
    return proc.stdout + proc.stderr


def bench_demo(rev: Revision, s: Settings, scratch: Path) -> str:
    out = Path(tempfile.mkdtemp(prefix="demo-", dir=scratch))
    scenario = rev.tree / "scenarios" / "district_heating.toml"
    _run(
        rev,
        ["-m", "parallelcity", "run", str(scenario), "--cycles", str(s.demo_cycles)]
        + ["--out", str(out), "--quiet"],
        rev.tree,
    )
    (summary_file,) = out.glob("*/summary.json")
    summary = json.loads(summary_file.read_text())
    keys = ("cycle_wall_p50_ms", "cycle_wall_p99_ms", "solve_p50_ms", "solve_p99_ms")
    if all(isinstance(summary.get(k), int | float) for k in keys):
        figures, how = [float(summary[k]) for k in keys], "ok"
    else:
        figures, how = _journal_figures(summary_file.parent / "journal.sqlite"), "ok (journal)"
    for key, value in zip(
        ("cycle_p50", "cycle_p99", "solve_p50", "solve_p99"), figures, strict=True
    ):
        rev.add(key, value)
    return how


def _journal_figures(journal: Path) -> list[float]:
    """Cycle and solve time p50 / p99 (ms) from the journal's per-cycle results."""
    with sqlite3.connect(journal) as db:
        rows = db.execute("SELECT wall_s, solve_time_s FROM cycle_result").fetchall()
    walls = [r[0] for r in rows]
    solves = [r[1] for r in rows if r[1] is not None and r[1] > 0]
    return [_pct(walls, 50), _pct(walls, 99), _pct(solves, 50), _pct(solves, 99)]


def _pct(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile in ms (numpy's default), as the run's summary has it."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return (xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)) * 1000.0


# The revision's own Server and mirror_cycles, without the ingest and polling parts.
MIRROR_SNIPPET = """
import asyncio, json, sys
from benchmarks.mirror_ingest import Server, mirror_cycles
server = Server(1000)
try:
    samples = asyncio.run(mirror_cycles(server.endpoint, 1000, int(sys.argv[1])))
finally:
    server.close()
print("SAMPLES", json.dumps(samples))
"""


def bench_mirror(rev: Revision, s: Settings, scratch: Path) -> str:
    try:
        text = _run(rev, ["-c", MIRROR_SNIPPET, str(s.mirror_cycles)], rev.tree)
        m = re.search(r"^SAMPLES (.*)$", text, re.MULTILINE)
        if m is None:
            raise RuntimeError("no samples printed")
        rev.add("mirror_p99", _nearest_rank_p99(json.loads(m.group(1))) * 1000.0)
        return "ok"
    except RuntimeError as e:  # that revision's module differs: run it as a user does
        first = e
    try:
        text = _run(
            rev,
            ["-m", "benchmarks.mirror_ingest", "--points", "10", "--seconds", "0.5"]
            + ["--cycles", str(s.mirror_cycles), "--poll-cycles", "1"],
            rev.tree,
        )
    except RuntimeError as e:
        raise RuntimeError(f"{first}\nthen, as a command: {e}") from e
    m = re.search(r"mirror snapshot\s+p50\s+([\d.]+) ms\s+p99\s+([\d.]+) ms", text)
    if m is None:
        raise RuntimeError("mirror_ingest: no 'mirror snapshot' line in its output")
    rev.add("mirror_p99", float(m.group(2)))
    return "ok (as a command)"


def _nearest_rank_p99(samples: Sequence[float]) -> float:
    """p99 as benchmarks.mirror_ingest computes it."""
    xs = sorted(samples)
    return xs[min(len(xs) - 1, round(0.99 * (len(xs) - 1)))]


# The revision's own gateway server and dispatcher client, only the two rows reported.
DISPATCH_SNIPPET = """
import asyncio, json, sys
import benchmarks.dispatch_roundtrip as d
n, folder = int(sys.argv[1]), sys.argv[2]
server, client = d.KeyPair.generate(), d.KeyPair.generate()
out = {}
for key, mode in (("dispatch_curve_p99", "memory"), ("dispatch_p99", "durable")):
    proc, ep, _ = d._start(d._gateway_server, mode, (server.public, server.secret),
                           client.public, folder)
    try:
        curve = d.ClientCurve(client, server.public)
        stats, _ = asyncio.run(d.bench_dispatcher(ep, n, curve, 0))
    finally:
        proc.terminate()
        proc.join(5)
    out[key] = stats["p99_ms"]
print("DISPATCH", json.dumps(out))
"""
DISPATCH_ROWS = (
    ("dispatch_p99", "parallelcity + CURVE + durable store"),
    ("dispatch_curve_p99", "parallelcity + CURVE"),
)


def bench_dispatch(rev: Revision, s: Settings, scratch: Path) -> str:
    try:
        text = _run(rev, ["-c", DISPATCH_SNIPPET, str(s.dispatch_n), str(scratch)], rev.tree)
        m = re.search(r"^DISPATCH (.*)$", text, re.MULTILINE)
        if m is None:
            raise RuntimeError("no figures printed")
        figures = json.loads(m.group(1))
        for key, _ in DISPATCH_ROWS:
            rev.add(key, float(figures[key]))
        return "ok"
    except RuntimeError as e:  # that revision's module differs: run it as a user does
        first = e
    try:
        text = _run(
            rev,
            ["-m", "benchmarks.dispatch_roundtrip", "--n", str(s.dispatch_n)]
            + ["--pipeline", "1000", "--runtimes", "2", "--dir", str(scratch)],
            rev.tree,
        )
    except RuntimeError as e:
        raise RuntimeError(f"{first}\nthen, as a command: {e}") from e
    for key, label in DISPATCH_ROWS:
        m = re.search(rf"^{re.escape(label)}\s+([\d.]+)\s+([\d.]+)\s", text, re.MULTILINE)
        if m is None:
            raise RuntimeError(f"dispatch_roundtrip: no {label!r} row in its output")
        rev.add(key, float(m.group(2)))
    return "ok (as a command)"


BENCHES: tuple[tuple[str, Callable[[Revision, Settings, Path], str]], ...] = (
    ("demo", bench_demo),
    ("mirror", bench_mirror),
    ("dispatch", bench_dispatch),
)


# ------------------------------------------------------------------------- main


def _median(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return statistics.median(xs) if xs else math.nan


def report(base: Revision, head: Revision, rounds: int) -> str:
    w = max(len(name) for name, _ in METRICS) + 2
    lines = [
        f"median of {rounds} round(s); BASE is the named baseline: {base.spec}",
        f"{'metric':<{w}}{'BASE':>10}{'HEAD':>10}{'HEAD/BASE':>11}   rounds BASE | HEAD",
    ]
    for name, key in METRICS:
        b, h = _median(base.results.get(key, [])), _median(head.results.get(key, []))
        ratio = h / b if b and not math.isnan(b) else math.nan
        each = " ".join(f"{x:.1f}" for x in base.results.get(key, []))
        each += " | " + " ".join(f"{x:.1f}" for x in head.results.get(key, []))
        lines.append(f"{name:<{w}}{b:>10.2f}{h:>10.2f}{ratio:>10.2f}x   {each}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base", metavar="BASE", help="git revision, the named baseline")
    p.add_argument("head", metavar="HEAD", nargs="?", help="git revision (default: working tree)")
    p.add_argument("--rounds", type=int, help="rounds, alternating the order (default 3; quick 1)")
    p.add_argument("--quick", action="store_true", help="one round, shorter runs (~4 minutes)")
    p.add_argument("--json", type=Path, help="write every round's figures to this file")
    p.add_argument("--keep", action="store_true", help="keep the temporary worktrees and venvs")
    a = p.parse_args(argv)
    if a.rounds is not None and a.rounds < 1:
        p.error("--rounds must be at least 1")
    s = QUICK if a.quick else FULL
    rounds = a.rounds or s.rounds
    started = time.monotonic()

    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the worktrees are removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = Path(tempfile.mkdtemp(prefix="parallelcity-revisions-"))
    revs: list[Revision] = []
    try:
        for label, spec in (("BASE", a.base), ("HEAD", a.head)):
            if spec is None:
                revs.append(Revision(label, "working tree", ROOT))
                continue
            sha = _git("rev-parse", "--verify", f"{spec}^{{commit}}")
            tree = tmp / label.lower()
            _git("worktree", "add", "--detach", str(tree), sha)
            revs.append(Revision(label, f"{spec} ({sha[:9]})", tree))
        print(f"BASE {revs[0].spec}, HEAD {revs[1].spec}; setting up venvs ...", flush=True)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            venvs = [tmp / f"venv-{r.label.lower()}" for r in revs]
            for rev, python in zip(
                revs, pool.map(make_venv, [r.tree for r in revs], venvs), strict=True
            ):
                rev.python = python
        scratch = tmp / "scratch"
        scratch.mkdir()
        for k in range(rounds):
            order = revs if k % 2 == 0 else revs[::-1]
            for name, bench in BENCHES:
                for rev in order:
                    t0 = time.monotonic()
                    try:
                        note = bench(rev, s, scratch)
                    except (RuntimeError, subprocess.SubprocessError, ValueError) as e:
                        note = f"FAILED: {e}"
                        rev.errors.append(f"round {k + 1} {name}: {e}")
                    took = time.monotonic() - t0
                    print(f"round {k + 1}/{rounds} {name:<9}{rev.label} {took:5.1f} s  {note}",
                          flush=True)  # fmt: skip
        print()
        print(report(revs[0], revs[1], rounds))
        for rev in revs:
            for err in rev.errors:
                print(f"{rev.label}: {err}")
        print(f"\ntotal {time.monotonic() - started:.0f} s")
        if a.json is not None:
            a.json.write_text(
                json.dumps({r.label: {"rev": r.spec, **r.results} for r in revs}, indent=2)
            )
        return 1 if any(r.errors for r in revs) else 0
    finally:
        if not a.keep:
            for rev in revs:
                if rev.tree != ROOT:
                    subprocess.run(
                        ["git", "worktree", "remove", "--force", str(rev.tree)],
                        cwd=ROOT,
                        capture_output=True,
                    )
            shutil.rmtree(tmp, ignore_errors=True)
            subprocess.run(["git", "worktree", "prune"], cwd=ROOT, capture_output=True)
        else:
            print(f"kept {tmp}")


if __name__ == "__main__":
    sys.exit(main())
