"""The ``parallelcity`` command.

Exit codes:
    0  done
    1  unexpected internal error (a bug: please report it with the traceback)
    2  bad command line, or a scenario file that does not validate
    3  field equipment unreachable or not as the scenario describes (OPC UA, gateway)
    4  refused for security: the configuration lacks the security it needs
    5  `verify`: a safety spec does not hold on some rig sample
    6  `run` ended without achieving control: commands acked on fewer cycles than
       [scenario] min_acked_share (default 0.5), e.g. every command refused
  130  `run` interrupted by SIGINT, 143 by SIGTERM (after writing its outputs)
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
        "3 field unreachable or mis-mapped, 4 refused for security, "
        "5 verify: a spec fails on the rig, 6 run: no control achieved (too few cycles "
        "with acked commands), 130 / 143 run interrupted by SIGINT / SIGTERM.",
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
        description="Serve commands as the gateway CONFIG (TOML) describes, writing accepted "
        "ones to the PLC over OPC UA. --schema prints the JSON Schema of CONFIG files.",
    )
    g.add_argument("config", type=Path, nargs="?", help="gateway config TOML")
    g.add_argument("--schema", action="store_true", help="print the config JSON Schema and exit")

    k = sub.add_parser(
        "keys",
        help="generate CURVE key pairs for the dispatcher and the gateway",
        description="Write NAME.public and NAME.secret (mode 0600) into DIR for each NAME; "
        "never overwrites a secret key.",
    )
    k.add_argument("dir", type=Path, help="folder to write the keys into")
    k.add_argument("names", nargs="+", metavar="NAME", help="e.g. gateway control-room")

    ra = sub.add_parser(
        "rearm",
        help="re-arm a field gateway whose watchdog tripped",
        description="Ask the gateway at ENDPOINT to leave its safe values and accept commands "
        "again; the key must be allowed to re-arm. Prints the gateway's status.",
    )
    ra.add_argument("endpoint", metavar="TCP://…", help="the gateway's ZeroMQ address")
    ra.add_argument("--reason", required=True, help="why it is safe to resume (journaled)")
    ra.add_argument("--key", type=Path, help="your CURVE secret key file")
    ra.add_argument("--gateway-key", type=Path, help="the gateway's CURVE public key file")
    ra.add_argument("--insecure-lab", action="store_true", help="no CURVE (lab gateways only)")
    ra.add_argument(
        "--issuer",
        default="operator",
        help="the issuer the gateway binds to your key (its client name unless set)",
    )

    c = sub.add_parser(
        "certs",
        help="create OPC UA certificates: a client and a server that trust each other",
        description="Write client/, server/ and user/ certificates (DER) and keys (PEM, 0600) "
        "under DIR, each trust list holding its peer, and print the [security.opcua] table. "
        "Refuses to replace existing certificates or keys without --force.",
    )
    c.add_argument("dir", type=Path, help="folder to create the certificates in")
    c.add_argument("--client-uri", default="urn:parallelcity:client")
    c.add_argument("--server-uri", default="urn:parallelcity:field")
    c.add_argument("--host", action="append", help="host name or IP for the certificates")
    c.add_argument("--days", type=int, default=365, help="validity (default 365)")
    c.add_argument(
        "--force", action="store_true", help="replace certificates and keys that exist in DIR"
    )

    b = sub.add_parser(
        "browse",
        help="walk an OPC UA server and print a [[field.points]] table",
        description="Browse ENDPOINT from the Objects folder and print the numeric variables "
        "of one namespace as scenario points.",
    )
    b.add_argument("endpoint", metavar="OPC.TCP://…")
    b.add_argument("--scenario", type=Path, help="take [security.opcua] from this scenario")
    b.add_argument("--namespace", help="namespace URI (default: the first with variables)")
    b.add_argument("--max-age", type=float, default=60.0, help="max_age_s to write")
    b.add_argument("-o", "--output", type=Path, help="write to this file instead of stdout")
    b.add_argument(
        "--insecure-lab", action="store_true", help="allow security policy None (lab only)"
    )
    vr = sub.add_parser(
        "verify",
        help="run a controller against a test rig offline and report every spec",
        description="A HIL campaign: the controller in closed loop with the rig KIND on each "
        "of its uncertainty samples; prints pass/fail and robustness per spec and KPIs, and "
        "writes a plot to --out. Exit code 5 if a spec fails on some sample.",
    )
    vr.add_argument("scenario", type=Path, help="scenario TOML file")
    vr.add_argument("--rig", required=True, metavar="KIND", help="rig kind, e.g. simulated")
    vr.add_argument(
        "--rig-config", type=Path, metavar="FILE", help="TOML table for a kind not in [rig]"
    )
    vr.add_argument("--samples", type=int, help="uncertainty samples (default: the rig's)")
    vr.add_argument("--cycles", type=int, help="cycles per sample (default: one horizon)")
    vr.add_argument("--controller", metavar="KIND", help="controller kind (default: scenario)")
    vr.add_argument("--out", type=Path, default=Path("runs"), help="plot folder (default runs/)")
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
    from .controller_choice import controller_settings
    from .lifecycle import speed_problem
    from .report import band_violation, write_all
    from .runner import CycleRecord, RunOptions, run
    from .scenario import load_scenario

    if args.cycles is not None and args.cycles < 1:
        raise _UsageError("--cycles must be at least 1")
    if args.speed is not None and not (math.isfinite(args.speed) and args.speed > 0):
        raise _UsageError(f"--speed {args.speed}: must be a positive finite number")
    for opt, url, scheme in (
        ("--field", args.field, "opc.tcp"),
        ("--gateway", args.gateway, "tcp"),
    ):
        if url is not None and not _is_url(url, scheme):
            raise _UsageError(f"{opt} {url!r} is not an {scheme}:// URL (HOST:PORT needed)")
    if args.field and not args.gateway:
        raise _UsageError("--field needs --gateway: real equipment is driven through its gateway")
    scenario = load_scenario(args.scenario)
    controller_settings(scenario, args.controller)  # the same rule `run` applies; exit 2 here
    if args.field is None:
        problem = speed_problem(scenario.meta.cycle_s, args.speed or scenario.meta.speed)
        if problem is not None:
            raise _UsageError(f"--speed: {problem}" if args.speed else problem)
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
        handle_signals=True,
    )
    where = "embedded rig" if args.field is None else args.field
    print(
        f"running {scenario.meta.name}: {cycles} cycles of {scenario.meta.cycle_s:g} s "
        f"against the {where}",
        file=sys.stderr,
    )
    gateway_log = logging.getLogger("parallelcity.gateway")
    level = gateway_log.level
    if not args.verbose and args.gateway is None:
        # the embedded gateway's line per command would drown the progress; the journal has them
        gateway_log.setLevel(logging.WARNING)
    try:
        result = asyncio.run(run(scenario, options, progress))
    finally:
        gateway_log.setLevel(level)
    summary, paths = write_all(result)
    print("\n".join(summary.lines()))
    for what, path in paths.items():
        print(f"{what:<17} {path}")
    if not summary.success and summary.end == "completed":
        print(summary.verdict, file=sys.stderr)
    return summary.exit_code


def _is_url(url: str, scheme: str) -> bool:
    """``scheme://host:port[/path]`` with a host and a numeric port (OPC UA: 4840 if none)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return False
    if scheme == "opc.tcp" and port is None:
        port = 4840  # the registered OPC UA port
    return parts.scheme == scheme and bool(parts.hostname) and port is not None


def _cmd_gateway(args: argparse.Namespace) -> int:
    import time

    from .clock import SimClock
    from .gateway_config import gateway_json_schema, load_gateway_config, serve_gateway

    if args.schema:
        sys.stdout.write(json.dumps(gateway_json_schema(), indent=2) + "\n")
        return EXIT_OK
    if args.config is None:
        raise _UsageError("gateway needs a CONFIG file (or --schema)")
    config = load_gateway_config(args.config)
    clock = SimClock(epoch=time.time(), speed=1.0)
    try:
        asyncio.run(serve_gateway(config, clock))
    except KeyboardInterrupt:
        print("gateway stopped", file=sys.stderr)
    return EXIT_OK


def _cmd_rearm(args: argparse.Namespace) -> int:
    from .dispatcher import ClientCurve, Dispatcher
    from .keys import read_public_key, read_secret_key

    curve = None
    if not args.insecure_lab:
        if args.key is None or args.gateway_key is None:
            raise _UsageError("rearm needs --key and --gateway-key (or --insecure-lab)")
        curve = ClientCurve(read_secret_key(args.key), read_public_key(args.gateway_key))

    async def go() -> str:
        async with Dispatcher(
            args.endpoint, args.issuer, curve=curve, insecure_lab=args.insecure_lab
        ) as disp:
            status = await disp.rearm(args.reason)
        return f"watchdog {status.watchdog.value}: {status.detail}"

    print(asyncio.run(go()))
    return EXIT_OK


def _cmd_keys(args: argparse.Namespace) -> int:
    from .keys import write_keypair

    for name in args.names:
        try:
            public, secret = write_keypair(args.dir, name)
        except ValueError as exc:
            raise _UsageError(str(exc)) from exc
        print(f"{name}: public {public}  secret {secret} (mode 0600)")
    return EXIT_OK


def _cmd_certs(args: argparse.Namespace) -> int:
    from .certs import lab_pki_files, make_lab_pki

    if args.days < 1:
        raise _UsageError("--days must be at least 1")
    existing = [str(p) for p in lab_pki_files(args.dir) if p.exists() or p.is_symlink()]
    if existing and not args.force:
        raise _UsageError(
            f"{args.dir} already holds certificates or keys: {', '.join(existing)}; "
            "not replacing them (a replaced private key is gone for good): "
            "choose another folder or add --force"
        )
    pki = make_lab_pki(
        args.dir,
        client_uri=args.client_uri,
        server_uri=args.server_uri,
        hostnames=args.host,
        days=args.days,
    )
    print(f"client  {pki.client.certificate}  key {pki.client.private_key}")
    print(f"server  {pki.server.certificate}  key {pki.server.private_key}")
    print(f"user    {pki.user.certificate}  key {pki.user.private_key}")
    print(f"the server trusts {pki.server_trusted}; the client trusts {pki.client_trusted}")
    print("\n[security.opcua]  # paths are relative to the scenario file")
    print('policy = "Basic256Sha256"')
    print(f'certificate = "{pki.client.certificate}"')
    print(f'private_key = "{pki.client.private_key}"')
    print(f'trusted = "{pki.client_trusted}"')
    print('username = "operator"\npassword_env = "PARALLELCITY_OPCUA_PASSWORD"')
    return EXIT_OK


def _cmd_browse(args: argparse.Namespace) -> int:
    from .browse import browse, points_toml
    from .opcua import ClientSecurity
    from .scenario import load_scenario

    if args.scenario is not None:
        security = ClientSecurity.from_scenario(load_scenario(args.scenario))
    else:
        security = ClientSecurity.insecure()
    if not security.secure:
        if not args.insecure_lab:
            raise SecurityError(
                "browsing without OPC UA security needs --insecure-lab; or give --scenario "
                "with a [security.opcua] table"
            )
        log.warning("INSECURE LAB MODE: browsing %s with security policy None", args.endpoint)
    result = asyncio.run(browse(args.endpoint, security, namespace=args.namespace))
    text = points_toml(result, args.max_age)
    if args.output:
        args.output.write_text(text)
        print(f"wrote {len(result.points)} points to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return EXIT_OK


def _cmd_verify(args: argparse.Namespace) -> int:
    from .campaign import verify_command
    from .errors import RigError

    for opt in ("samples", "cycles"):
        if getattr(args, opt) is not None and getattr(args, opt) < 1:
            raise _UsageError(f"--{opt} must be at least 1")
    try:
        return verify_command(
            args.scenario,
            args.rig,
            rig_config=args.rig_config,
            samples=args.samples,
            cycles=args.cycles,
            controller_kind=args.controller,
            out_dir=args.out,
        )
    except RigError as exc:
        print(f"rig error: {exc}", file=sys.stderr)
        return EXIT_FIELD


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
    # asyncua logs tracebacks for conditions parallelcity reports itself (as FieldError,
    # stale points or journal gaps); its own words are shown with --verbose
    logging.getLogger("asyncua").setLevel(logging.WARNING if args.verbose else logging.CRITICAL)
    logging.getLogger("matplotlib").setLevel(logging.WARNING if args.verbose else logging.ERROR)
    try:
        if args.command == "validate":
            return _cmd_validate(args.scenarios)
        if args.command == "schema":
            return _cmd_schema(args.output)
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "gateway":
            return _cmd_gateway(args)
        if args.command == "keys":
            return _cmd_keys(args)
        if args.command == "rearm":
            return _cmd_rearm(args)
        if args.command == "certs":
            return _cmd_certs(args)
        if args.command == "browse":
            return _cmd_browse(args)
        if args.command == "verify":
            return _cmd_verify(args)
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
