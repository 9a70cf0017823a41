"""The ``parallelcity`` command.

Exit codes:
    0  done
    1  unexpected internal error (a bug: please report it with the traceback)
    2  bad command line, or a scenario file that does not validate
    3  field equipment unreachable or not as the scenario describes (OPC UA, gateway)
    4  refused for security: the configuration lacks the security it needs
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .errors import (
    DispatchError,
    FieldError,
    JournalError,
    ParallelCityError,
    ScenarioError,
    SecurityError,
)

EXIT_OK, EXIT_INTERNAL, EXIT_INVALID, EXIT_FIELD, EXIT_SECURITY = 0, 1, 2, 3, 4

log = logging.getLogger("parallelcity")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="parallelcity",
        description=(
            "Run a city subsystem's digital twin beside the real one: mirror the field over "
            "OPC UA, decide with MPC in the twin, verify every plan on a test rig, and "
            "dispatch only verified commands over ZeroMQ."
        ),
        epilog="Exit codes: 0 done, 1 internal error, 2 bad usage or invalid scenario, "
        "3 field unreachable or mis-mapped, 4 refused for security.",
    )
    p.add_argument("--version", action="version", version=f"parallelcity {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser(
        "run",
        help="run a scenario's closed loop",
        description=(
            "Run the closed loop of SCENARIO. Without --field, the scenario's rig is started "
            "in-process as the field (a plant simulator behind an OPC UA server on 127.0.0.1) "
            "together with a field gateway, so the whole path runs for real on this machine. "
            "Writes the journal, a CSV time series, a plot and a summary to --out."
        ),
    )
    r.add_argument("scenario", type=Path, help="scenario TOML file")
    r.add_argument("--cycles", type=int, help="number of control cycles (default: scenario)")
    r.add_argument(
        "--speed", type=float, help="simulated seconds per wall second (embedded rig only)"
    )
    r.add_argument("--out", type=Path, default=Path("runs"), help="output folder (default runs/)")
    r.add_argument("--field", metavar="OPC.TCP://…", help="OPC UA endpoint of real equipment")
    r.add_argument("--gateway", metavar="TCP://…", help="ZeroMQ address of a running gateway")
    r.add_argument("--controller", metavar="KIND", help="use this controller kind instead")
    r.add_argument("--quiet", action="store_true", help="no progress lines")

    v = sub.add_parser("validate", help="check scenario files and report every problem")
    v.add_argument("scenarios", type=Path, nargs="+", metavar="SCENARIO")

    s = sub.add_parser("schema", help="print the JSON Schema of scenario files")
    s.add_argument("-o", "--output", type=Path, help="write to this file instead of stdout")

    g = sub.add_parser(
        "gateway",
        help="run a field gateway on its own, in front of an OPC UA server",
        description="Serve commands for SCENARIO's inputs, writing accepted ones over OPC UA.",
    )
    g.add_argument("scenario", type=Path)
    g.add_argument("--bind", required=True, metavar="TCP://…", help="ZeroMQ address to bind")
    g.add_argument("--field", required=True, metavar="OPC.TCP://…", help="PLC's OPC UA endpoint")
    return p


def _fmt_time(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%a %H:%M")


def _cmd_validate(paths: Sequence[Path]) -> int:
    from .scenario import load_scenario

    worst = EXIT_OK
    for path in paths:
        try:
            sc = load_scenario(path)
        except ScenarioError as exc:
            print(exc, file=sys.stderr)
            worst = EXIT_INVALID
            continue
        m = sc.model
        print(
            f"{path}: ok ({sc.meta.name}: model {m.name} with {m.nx} states, {m.nu} inputs; "
            f"{len(sc.field.points)} points; controller {sc.file.controller.kind}, "
            f"fallback {sc.file.fallback.kind}, rig {sc.file.rig.kind})"
        )
    return worst


def _cmd_schema(output: Path | None) -> int:
    from .scenario import json_schema

    text = json.dumps(json_schema(), indent=2) + "\n"
    if output:
        output.write_text(text)
        print(f"wrote {output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:
    from .report import band_violation, write_all
    from .runner import CycleRecord, RunOptions, run
    from .scenario import load_scenario

    if args.cycles is not None and args.cycles < 1:
        raise _UsageError("--cycles must be at least 1")
    if args.speed is not None and not args.speed > 0:
        raise _UsageError("--speed must be positive")
    scenario = load_scenario(args.scenario)
    cycles = args.cycles or scenario.meta.cycles
    every = 1 if sys.stderr.isatty() else max(1, cycles // 12)
    comfort = [0.0]

    def progress(rec: CycleRecord, counts: dict[str, int]) -> None:
        for name, band in rec.bands.items():
            v = band_violation(rec.values.get(name), band)
            if math.isfinite(v):
                comfort[0] += v * scenario.meta.cycle_s / 3600.0
        if args.quiet or ((rec.k + 1) % every and rec.k + 1 != cycles):
            return
        line = (
            f"cycle {rec.k + 1:>4}/{cycles}  {_fmt_time(rec.t)}  comfort {comfort[0]:6.2f} K·h  "
            f"acked {counts['acked']}  refused {counts['refused']}  "
            f"fallback {counts['fallback']}  hold {counts['hold']}  stale {counts['stale']}"
        )
        if sys.stderr.isatty():
            end = "\n" if rec.k + 1 == cycles else ""
            print(f"\r{line}", end=end, file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    options = RunOptions(
        cycles=args.cycles,
        speed=args.speed,
        out_dir=args.out,
        field_endpoint=args.field,
        gateway_endpoint=args.gateway,
        controller_kind=args.controller,
    )
    if args.field and not args.gateway:
        raise _UsageError("--field needs --gateway: real equipment is driven through its gateway")
    where = "embedded rig" if args.field is None else args.field
    print(
        f"running {scenario.meta.name}: {cycles} cycles of {scenario.meta.cycle_s:g} s "
        f"against the {where}",
        file=sys.stderr,
    )
    if not args.verbose and args.gateway is None:
        # the embedded gateway's line per command would drown the progress; the journal has them
        logging.getLogger("parallelcity.gateway").setLevel(logging.WARNING)
    result = asyncio.run(run(scenario, options, progress))
    summary, paths = write_all(result)
    print("\n".join(summary.lines()))
    for what, path in paths.items():
        print(f"{what:<17} {path}")
    return EXIT_OK


def _cmd_gateway(args: argparse.Namespace) -> int:
    import time

    from .clock import SimClock
    from .gateway import serve_gateway
    from .scenario import load_scenario

    scenario = load_scenario(args.scenario)
    clock = SimClock(epoch=time.time(), speed=1.0)
    try:
        asyncio.run(serve_gateway(scenario, bind=args.bind, opcua_endpoint=args.field, clock=clock))
    except KeyboardInterrupt:
        print("gateway stopped", file=sys.stderr)
    return EXIT_OK


class _UsageError(Exception):
    pass


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("asyncua", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING if args.verbose else logging.ERROR)
    try:
        if args.command == "validate":
            return _cmd_validate(args.scenarios)
        if args.command == "schema":
            return _cmd_schema(args.output)
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "gateway":
            return _cmd_gateway(args)
    except _UsageError as exc:
        parser.error(str(exc))
    except ScenarioError as exc:
        print(exc, file=sys.stderr)
        return EXIT_INVALID
    except SecurityError as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return EXIT_SECURITY
    except (FieldError, DispatchError) as exc:
        print(f"field error: {exc}", file=sys.stderr)
        return EXIT_FIELD
    except (JournalError, ParallelCityError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INTERNAL
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
