"""Run N executions of each fuzz target and print what they found.

    python -m fuzz [-n N] [--max-seconds S] [--max-len BYTES] [TARGET...]   (default: all)
    python -m fuzz --list

Each target's corpus lives in ``fuzz/corpus/TARGET/`` (seeded from the documented
examples, the shipped scenario and gateway config, and ZAP requests captured on
127.0.0.1); findings (input + traceback) go to ``fuzz/findings/``.  Exit status 1 if
any target has a finding.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys
import time
from pathlib import Path

from .targets import targets

HERE = Path(__file__).resolve().parent
MAX_LEN = {"wire": 4096, "zap": 1024, "gateway_config": 8192, "scenario": 16384}


def seed_corpus(name: str, corpus: Path) -> int:
    corpus.mkdir(parents=True, exist_ok=True)
    seeds = targets()[name].seeds()
    for data in seeds:
        (corpus / f"seed-{hashlib.sha1(data).hexdigest()[:16]}").write_bytes(data)
    return len(seeds)


def run(
    name: str, n: int, max_len: int | None, max_seconds: int
) -> tuple[int, float, int, list[str]]:
    corpus, findings = HERE / "corpus" / name, HERE / "findings"
    seed_corpus(name, corpus)
    before = set(findings.glob(f"{name}-*.txt"))
    cmd = [
        sys.executable, "-m", "fuzz.worker", name, str(findings),
        f"-runs={n}", f"-max_len={max_len or MAX_LEN[name]}", "-print_final_stats=1",
        "-rss_limit_mb=2048", "-timeout=60", "-print_pcs=0",
        f"-artifact_prefix={findings}/{name}-", f"-max_total_time={max_seconds}", str(corpus),
    ]  # fmt: skip
    findings.mkdir(parents=True, exist_ok=True)
    log_path = findings / f"{name}.log"  # libFuzzer's progress lines, readable while it runs
    started = time.monotonic()
    with log_path.open("w") as log_file:
        proc = subprocess.run(cmd, cwd=HERE.parent, stdout=log_file, stderr=subprocess.STDOUT)
    wall = time.monotonic() - started
    log = log_path.read_text(errors="replace")
    m = re.search(r"stat::number_of_executed_units:\s*(\d+)", log)
    progress = re.findall(r"^#(\d+)\s", log, re.M)  # what an interrupted run got through
    execs = int(m.group(1)) if m else int(progress[-1]) if progress else 0
    new = sorted(set(findings.glob(f"{name}-*.txt")) - before)
    problems = [p.read_text().splitlines()[0] for p in new]
    if proc.returncode != 0 or not m:
        problems.append(f"fuzzer exited {proc.returncode}: see fuzz/findings/{name}.log")
    return execs, wall, sum(1 for _ in corpus.iterdir()), problems


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=100_000, help="executions per target")
    ap.add_argument("--max-len", type=int, default=None, help="longest input, bytes")
    ap.add_argument(
        "--max-seconds", type=int, default=0, help="stop a target after this long (0: never)"
    )
    ap.add_argument("--list", action="store_true", help="list the targets")
    ap.add_argument("target", nargs="*", help="default: every target")
    args = ap.parse_args(argv)
    names = list(targets())
    if args.list:
        print("\n".join(names))
        return 0
    unknown = [t for t in args.target if t not in names]
    if unknown:
        ap.error(f"unknown target(s) {', '.join(unknown)}; known: {', '.join(names)}")
    bad = 0
    print(f"{'target':<16}{'executions':>12}{'exec/s':>9}{'corpus':>8}  findings", flush=True)
    for name in args.target or names:
        execs, wall, corpus, problems = run(name, args.n, args.max_len, args.max_seconds)
        rate = execs / wall if wall > 0 else 0.0
        print(f"{name:<16}{execs:>12,}{rate:>9,.0f}{corpus:>8}  {len(problems)}", flush=True)
        for p in problems:
            print(f"    {p}", flush=True)
        bad += bool(problems)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
