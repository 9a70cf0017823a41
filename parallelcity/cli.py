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
       (`experiment`: 1 if any run failed, the others still complete)
  130  `run` interrupted by SIGINT, 143 by SIGTERM (after writing its outputs); `experiment`
       interrupted by Ctrl-C (finished runs kept)
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
from typing import TYPE_CHECKING

from parallelcity import __version__
from parallelcity.errors import (
    DispatchError,
    FieldError,
    JournalError,
    ParallelCityError,
    PluginError,
    ScenarioError,
    SecurityError,
)

if TYPE_CHECKING:
    from parallelcity.field.opcua.session import ClientSecurity

EXIT_OK, EXIT_INTERNAL, EXIT_INVALID, EXIT_FIELD, EXIT_SECURITY = 0, 1, 2, 3, 4

log = logging.getLogger("parallelcity")

SPEED_MIN, SPEED_MAX = 1e-3, 1e6


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seeds such as 3 or 1,2, got {text!r}") from None
    return seeds


def _speed(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not SPEED_MIN <= value <= SPEED_MAX:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(
            f"must be a finite number from {SPEED_MIN:g} to {SPEED_MAX:g} simulated seconds "
            f"per wall second, got {text!r}"
        )
    return value


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
        "with acked commands; experiment: 1 if a run failed), 130 / 143 run or experiment "
        "interrupted by SIGINT / SIGTERM.",
    )
    p.add_argument("--version", action="version", version=f"parallelcity {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser(
        "run",
        help="run a scenario's closed loop",
        description=(
            "Run the closed loop of SCENARIO. Against real equipment: --field and --gateway, "
            "or the scenario's [field] endpoint and gateway. With neither, the scenario's rig "
            "is started in-process as the field (a plant simulator behind the scenario's field "
            "protocol on 127.0.0.1) together with a field gateway, so the whole path runs for "
            "real on this machine. "
            "Writes the journal, a CSV time series, a plot and a summary to --out."
        ),
    )
    r.add_argument("scenario", type=Path, help="scenario TOML file")
    r.add_argument(
        "--cycles", type=_positive_int, help="number of control cycles (default: scenario)"
    )
    r.add_argument(
        "--speed",
        type=_speed,
        help=f"simulated seconds per wall second, {SPEED_MIN:g} to {SPEED_MAX:g} "
        "(embedded rig only)",
    )
    r.add_argument("--out", type=Path, default=Path("runs"), help="output folder (default runs/)")
    r.add_argument(
        "--field",
        metavar="ENDPOINT",
        help="endpoint of real equipment in the scenario's protocol (opc.tcp://HOST:PORT, "
        "modbus://HOST:PORT); default: the scenario's [field] endpoint",
    )
    r.add_argument(
        "--gateway",
        metavar="TCP://…",
        help="ZeroMQ address of a running gateway; default: the scenario's [field] gateway",
    )
    r.add_argument("--controller", metavar="KIND", help="use this controller kind instead")
    r.add_argument("--quiet", action="store_true", help="no progress lines")

    v = sub.add_parser("validate", help="check scenario files and report every problem")
    v.add_argument("scenarios", type=Path, nargs="+", metavar="SCENARIO")

    sk = sub.add_parser(
        "skeleton",
        help="list what a model file holds and write a scenario skeleton for it",
        description="Write a scenario TOML for FILE (e.g. a SUMO .sumocfg), by the model kind "
        "that reads FILE's suffix; its leading comments list what was found.",
    )
    sk.add_argument("file", type=Path, metavar="FILE")
    sk.add_argument("-o", "--output", type=Path, help="write to this file instead of stdout")

    s = sub.add_parser("schema", help="print the JSON Schema of scenario files")
    s.add_argument("-o", "--output", type=Path, help="write to this file instead of stdout")
    s.add_argument(
        "--experiment", action="store_true", help="the schema of experiment files instead"
    )

    e = sub.add_parser(
        "experiment",
        help="compare controllers and settings: a scenario under variants x seeds",
        description="Run EXPERIMENT's base scenario under each variant with each seed, every "
        "run a closed loop on the rig's field plant (no field, gateway or network), in "
        "parallel; write a KPI table (CSV, JSON, Markdown), box plots and a manifest to "
        "--out. Runs already done are skipped. Exit 1 if a run failed.",
    )
    e.add_argument("experiment", type=Path, help="experiment TOML file")
    e.add_argument("--out", type=Path, help="output folder (default experiment-out/NAME/)")
    e.add_argument("--workers", type=_positive_int, help="parallel runs (default: the file's)")
    e.add_argument(
        "--only", action="append", metavar="VARIANT", help="run only this variant (repeatable)"
    )
    e.add_argument("--seeds", type=_seed_list, help="run only these seeds, e.g. 3 or 1,2")
    e.add_argument("--force", action="store_true", help="rerun runs that are already done")

    g = sub.add_parser(
        "gateway",
        help="run a field gateway on its own, in front of a PLC (any field protocol)",
        description="Serve commands as the gateway CONFIG (TOML) describes, writing accepted "
        "ones to the PLC over its [field] protocol (OPC UA by default). --schema prints the "
        "JSON Schema of CONFIG files.",
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
        help="the issuer the gateway binds to your key: that client's `issuer` in the "
        "gateway config, else its `name` (default: %(default)s)",
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
    c.add_argument("--days", type=_positive_int, default=365, help="validity (default 365)")
    c.add_argument(
        "--force", action="store_true", help="replace certificates and keys that exist in DIR"
    )

    b = sub.add_parser(
        "browse",
        help="walk an OPC UA server and print a [[field.points]] table",
        description="Browse ENDPOINT from the Objects folder and print the numeric variables "
        "of one namespace as scenario points. Secure (SignAndEncrypt) by default: give the "
        "security options, or --scenario to take them from a scenario's [security.opcua]; "
        "--insecure-lab allows security policy None.",
    )
    b.add_argument("endpoint", metavar="OPC.TCP://…")
    b.add_argument("--scenario", type=Path, help="take [security.opcua] from this scenario")
    b.add_argument("--namespace", help="namespace URI (default: the first with variables)")
    b.add_argument("--max-age", type=float, default=60.0, help="max_age_s to write")
    b.add_argument("-o", "--output", type=Path, help="write to this file instead of stdout")
    b.add_argument(
        "--insecure-lab", action="store_true", help="allow security policy None (lab only)"
    )
    sec = b.add_argument_group("security (instead of --scenario)")
    sec.add_argument("--certificate", type=Path, help="this client's certificate (DER or PEM)")
    sec.add_argument("--private-key", type=Path, help="this client's private key (PEM, 0600)")
    sec.add_argument(
        "--trust", type=Path, metavar="DIR", help="folder of trusted server (or CA) certificates"
    )
    sec.add_argument(
        "--policy",
        choices=("Basic256Sha256", "Aes256_Sha256_RsaPss"),
        help="security policy (default Basic256Sha256; mode is always SignAndEncrypt)",
    )
    sec.add_argument("--username", help="user name token")
    sec.add_argument(
        "--password-env", metavar="VAR", help="environment variable holding the password"
    )
    sec.add_argument("--user-certificate", type=Path, help="X.509 user token certificate")
    sec.add_argument("--user-private-key", type=Path, help="private key of the user certificate")
    sec.add_argument(
        "--anonymous",
        action="store_true",
        help="no user token (a server that allows only anonymous sessions)",
    )
    f = sub.add_parser(
        "field",
        help="serve a scenario's field stand-in (its plant simulator) over its field protocol "
        "(OPC UA, Modbus TCP) on a port",
        description="Serve the plant simulator of SCENARIO's rig over the scenario's field "
        "protocol on HOST:PORT, on the wall clock, until Ctrl-C or SIGTERM (exit 0). OPC UA is "
        "secure by default: "
        "SignAndEncrypt with the server certificate of a `parallelcity certs` folder (--pki; "
        "default: the folder of the scenario's [security.opcua] certificate, else field-pki/; "
        "made when it does not exist), trusting that folder's client and user certificates. "
        "Modbus TCP has no security: 127.0.0.1 only, another --host needs --insecure-lab. "
        "Prints the endpoint, the point table and what to run next.",
    )
    f.add_argument("scenario", type=Path, help="scenario TOML file")
    f.add_argument("--port", type=int, default=4840, help="TCP port (default 4840; 0: a free one)")
    f.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    f.add_argument("--pki", type=Path, metavar="DIR", help="a `parallelcity certs` folder")
    f.add_argument(
        "--insecure-lab",
        action="store_true",
        help="serve without encryption or authentication (lab only; it says so loudly)",
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
    vr.add_argument(
        "--samples", type=_positive_int, help="uncertainty samples (default: the rig's)"
    )
    vr.add_argument("--cycles", type=_positive_int, help="cycles per sample (default: one horizon)")
    vr.add_argument("--controller", metavar="KIND", help="controller kind (default: scenario)")
    vr.add_argument("--out", type=Path, default=Path("runs"), help="plot folder (default runs/)")

    rp = sub.add_parser(
        "report",
        help="rebuild a run's summary, CSV, plot and metrics from its journal",
        description="Read JOURNAL (the journal.sqlite of a finished, interrupted or crashed "
        "run; never written to) and write summary.json, timeseries.csv, plot.png and "
        "metrics.prom beside it or into --out. Says how the run ended.",
    )
    rp.add_argument(
        "journal", type=Path, metavar="JOURNAL", help="a run's journal.sqlite, or its folder"
    )
    rp.add_argument("--out", type=Path, help="output folder (default: the journal's)")
    rp.add_argument(
        "--scenario",
        type=Path,
        help="scenario file, for journals that hold no copy of theirs (older runs)",
    )
    return p


def _fmt_time(t: float, zone: dt.tzinfo = dt.UTC) -> str:
    return dt.datetime.fromtimestamp(t, zone).strftime("%a %H:%M")


def _cmd_validate(paths: Sequence[Path]) -> int:
    """Each file's verdict; the exit code is the worst of them."""
    from parallelcity.scenario.definition import load_scenario

    worst = EXIT_OK
    for path in paths:
        try:
            sc = load_scenario(path)
        except ScenarioError as exc:
            print(exc, file=sys.stderr)
            worst = max(worst, EXIT_INVALID)
            continue
        m = sc.model
        print(
            f"{path}: ok ({sc.meta.name}: model {m.name} with {m.nx} states, {m.nu} inputs; "
            f"{len(sc.field.points)} points; controller {sc.file.controller.kind}, "
            f"fallback {sc.file.fallback.kind}, rig {sc.file.rig.kind})"
        )
    return worst


def _cmd_schema(output: Path | None, experiment: bool = False) -> int:
    if experiment:
        from parallelcity.experiment.definition import json_schema
    else:
        from parallelcity.scenario.definition import json_schema

    text = json.dumps(json_schema(), indent=2) + "\n"
    if output:
        _write_output(output, text)
        print(f"wrote {output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return EXIT_OK


def _write_output(output: Path, text: str) -> None:
    """``-o FILE``: a usage error (exit 2) if its folder is missing or it cannot be written."""
    folder = output.parent
    if not folder.is_dir():
        raise _UsageError(f"cannot write {output}: the folder {folder} does not exist")
    try:
        output.write_text(text)
    except OSError as exc:
        raise _UsageError(f"cannot write {output}: {exc.strerror or exc}") from exc


def _cmd_run(args: argparse.Namespace) -> int:
    from parallelcity.decide.choice import controller_settings
    from parallelcity.field.protocols import protocol_of
    from parallelcity.record.records import CycleRecord
    from parallelcity.record.report import band_violation, write_all
    from parallelcity.run.lifecycle import run_bounded, speed_problem
    from parallelcity.run.runner import RunOptions, run
    from parallelcity.scenario.definition import load_scenario

    if args.gateway is not None and not _is_url(args.gateway, "tcp"):
        raise _UsageError(f"--gateway {args.gateway!r} is not a tcp:// URL (HOST:PORT needed)")
    scenario = load_scenario(args.scenario)
    # The field and its gateway: the options, else the scenario's [field] endpoint and gateway
    # (a scenario naming neither runs the embedded rig).  Each is checked for the scenario's
    # protocol before anything starts.
    field_url = args.field if args.field is not None else scenario.field.endpoint
    gateway_url = args.gateway if args.gateway is not None else scenario.field.gateway
    field_opt = "--field" if args.field is not None else "field.endpoint"
    gateway_opt = "--gateway" if args.gateway is not None else "field.gateway"
    protocol = protocol_of(scenario.field)
    if field_url is not None and (problem := protocol.endpoint_problem(field_url)) is not None:
        raise _UsageError(f"{field_opt}: {problem} ({protocol.label} field)")
    if gateway_url is not None and not _is_url(gateway_url, "tcp"):
        raise _UsageError(f"{gateway_opt} {gateway_url!r} is not a tcp:// URL (HOST:PORT needed)")
    if field_url is not None and gateway_url is None:
        raise _UsageError(
            f"{field_opt} needs a gateway (--gateway or [field] gateway): real equipment is "
            "driven through its gateway"
        )
    if gateway_url is not None and field_url is None:
        raise _UsageError(
            f"{gateway_opt} needs a field (--field or [field] endpoint): the embedded rig's "
            "simulated readings must not drive a gateway in front of real equipment"
        )
    controller_settings(scenario, args.controller)  # the same rule `run` applies; exit 2 here
    if field_url is None:
        problem = speed_problem(scenario.meta.cycle_s, args.speed or scenario.meta.speed)
        if problem is not None:
            raise _UsageError(f"--speed: {problem}" if args.speed else problem)
    cycles = args.cycles or scenario.meta.cycles
    zone = scenario.meta.zone
    every = 1 if sys.stderr.isatty() else max(1, cycles // 12)
    spec = scenario.model.report  # the model kind's band KPI, summed as the run goes
    outside = [0.0]

    def progress(rec: CycleRecord, counts: dict[str, int]) -> None:
        for name, band in rec.bands.items():
            v = band_violation(rec.values.get(name), band)
            if math.isfinite(v):
                outside[0] += v * scenario.meta.cycle_s / 3600.0
        if args.quiet or ((rec.k + 1) % every and rec.k + 1 != cycles):
            return
        line = (
            f"cycle {rec.k + 1:>4}/{cycles}  {_fmt_time(rec.t, zone)}  "
            f"{spec.band_kpi} {outside[0]:6.2f} {spec.band_unit}  "
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
        field_endpoint=field_url,
        gateway_endpoint=gateway_url,
        controller_kind=args.controller,
        handle_signals=True,
    )
    where = "embedded rig" if field_url is None else field_url
    print(
        f"running {scenario.meta.name}: {cycles} cycles of {scenario.meta.cycle_s:g} s "
        f"against the {where}",
        file=sys.stderr,
    )
    gateway_log = logging.getLogger("parallelcity.gateway.server")
    level = gateway_log.level
    if not args.verbose and gateway_url is None:
        # the embedded gateway's line per command would drown the progress; the journal has them
        gateway_log.setLevel(logging.WARNING)
    try:
        result = run_bounded(run(scenario, options, progress))
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


def _cmd_report(args: argparse.Namespace) -> int:
    from parallelcity.record.journal_read import read_journal, run_result, scenario_of

    try:
        journal = read_journal(args.journal)
    except JournalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    from parallelcity.record.report import write_all

    scenario = scenario_of(journal, args.scenario)
    out = args.out if args.out is not None else journal.path.parent
    try:
        result = run_result(journal, scenario, out)
    except JournalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    try:
        summary, paths = write_all(result)
    except OSError as exc:
        print(f"error: cannot write the report into {out}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_INVALID
    print(f"{journal.scenario_name}: {journal.describe_end()}")
    print("\n".join(summary.lines()))
    for what, path in paths.items():
        print(f"{what:<17} {path}")
    return EXIT_OK


def _cmd_gateway(args: argparse.Namespace) -> int:
    import time

    from parallelcity.clock import SimClock
    from parallelcity.gateway.config import gateway_json_schema, load_gateway_config, serve_gateway

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
    from parallelcity.dispatch.dispatcher import ClientCurve, Dispatcher
    from parallelcity.dispatch.keys import read_public_key, read_secret_key
    from parallelcity.gateway.watchdog import iso_utc, readable_times

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
        detail = readable_times(status.detail, status.gateway_time)
        return (
            f"watchdog {status.watchdog.value}: {detail or '-'}\n"
            f"gateway time {iso_utc(status.gateway_time)}"
        )

    print(asyncio.run(go()))
    return EXIT_OK


def _cmd_keys(args: argparse.Namespace) -> int:
    from parallelcity.dispatch.keys import write_keypair

    for name in args.names:
        try:
            public, secret = write_keypair(args.dir, name)
        except ValueError as exc:
            raise _UsageError(str(exc)) from exc
        print(f"{name}: public {public}  secret {secret} (mode 0600)")
    return EXIT_OK


def _cmd_certs(args: argparse.Namespace) -> int:
    from parallelcity.field.opcua.certs import lab_pki_files, make_lab_pki

    if args.dir.exists() and not args.dir.is_dir():
        raise _UsageError(f"{args.dir} is not a folder: certs needs a folder to write into")
    existing = [str(p) for p in lab_pki_files(args.dir) if p.exists() or p.is_symlink()]
    if existing and not args.force:
        raise _UsageError(
            f"{args.dir} already holds certificates or keys: {', '.join(existing)}; "
            "not replacing them (a replaced private key is gone for good): "
            "choose another folder or add --force"
        )
    try:
        pki = make_lab_pki(
            args.dir,
            client_uri=args.client_uri,
            server_uri=args.server_uri,
            hostnames=args.host,
            days=args.days,
        )
    except OSError as exc:
        raise _UsageError(f"cannot write certificates into {args.dir}: {exc}") from exc
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


_BROWSE_SECURITY = (
    "certificate",
    "private_key",
    "trust",
    "policy",
    "username",
    "password_env",
    "user_certificate",
    "user_private_key",
    "anonymous",
)


def _browse_security(args: argparse.Namespace) -> ClientSecurity:
    """``browse``'s client security: from its options, from --scenario, or None (lab)."""
    import os

    from parallelcity.field.opcua.session import ClientSecurity
    from parallelcity.scenario.definition import load_scenario

    given = [o for o in _BROWSE_SECURITY if getattr(args, o) not in (None, False)]
    flags = ", ".join("--" + o.replace("_", "-") for o in given)
    if given and args.scenario is not None:
        raise _UsageError(f"give either --scenario or the security options ({flags}), not both")
    if given and args.insecure_lab:
        raise _UsageError(f"--insecure-lab contradicts the security options ({flags})")
    if args.scenario is not None:
        return ClientSecurity.from_scenario(load_scenario(args.scenario))
    if not given:
        return ClientSecurity.insecure()
    missing = [o for o in ("certificate", "private_key", "trust") if getattr(args, o) is None]
    if missing:
        names = ", ".join("--" + o.replace("_", "-") for o in missing)
        raise _UsageError(
            f"a secure browse needs --certificate, --private-key and --trust: missing {names}"
        )
    tokens = [o for o in ("username", "user_certificate", "anonymous") if getattr(args, o)]
    if len(tokens) != 1:
        raise _UsageError(
            "give exactly one user token: --username (with --password-env), "
            "--user-certificate (with --user-private-key) or --anonymous"
        )
    if (args.username is None) != (args.password_env is None):
        raise _UsageError("--username and --password-env go together")
    if (args.user_certificate is None) != (args.user_private_key is None):
        raise _UsageError("--user-certificate and --user-private-key go together")
    password = None
    if args.password_env is not None:
        password = os.environ.get(args.password_env)
        if password is None:
            raise _UsageError(
                f"--password-env: environment variable {args.password_env!r} is not set"
            )
    return ClientSecurity(
        policy=args.policy or "Basic256Sha256",
        certificate=args.certificate,
        private_key=args.private_key,
        trusted=args.trust,
        username=args.username,
        password=password,
        user_certificate=args.user_certificate,
        user_private_key=args.user_private_key,
        anonymous=args.anonymous,
    )


def _cmd_browse(args: argparse.Namespace) -> int:
    from parallelcity.field.opcua.browse import browse, points_toml
    from parallelcity.field.opcua.config import endpoint_problem

    if (problem := endpoint_problem(args.endpoint)) is not None:
        raise _UsageError(problem)
    if args.output is not None and not args.output.parent.is_dir():
        raise _UsageError(f"-o {args.output}: the folder {args.output.parent} does not exist")
    security = _browse_security(args)
    if not security.secure:
        if not args.insecure_lab:
            raise SecurityError(
                "browsing without OPC UA security needs --insecure-lab; or give --certificate, "
                "--private-key, --trust and a user token, or --scenario with a "
                "[security.opcua] table"
            )
        log.warning("INSECURE LAB MODE: browsing %s with security policy None", args.endpoint)
    result = asyncio.run(browse(args.endpoint, security, namespace=args.namespace))
    text = points_toml(result, args.max_age)
    if args.output:
        try:
            args.output.write_text(text)
        except OSError as exc:
            raise _UsageError(f"-o {args.output}: cannot write it ({exc.strerror})") from exc
        print(f"wrote {len(result.points)} points to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return EXIT_OK


def _cmd_skeleton(args: argparse.Namespace) -> int:
    """A scenario skeleton from the first installed model kind that reads FILE's suffix."""
    from parallelcity import plugins

    suffix = args.file.suffix.lower()
    kinds = plugins.available("model").values()  # a kind that fails to load is skipped
    makers = [k for k in kinds if suffix in getattr(k, "skeleton_suffixes", ())]
    if not makers:
        raise _UsageError(f"{args.file}: no installed model kind makes a skeleton of {suffix!r}")
    if not args.file.is_file():
        raise _UsageError(f"{args.file}: no such file")
    try:
        text = str(makers[0].skeleton(str(args.file)))  # type: ignore[attr-defined]
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    if args.output is None:
        sys.stdout.write(text)
        return EXIT_OK
    try:
        args.output.write_text(text)
    except OSError as exc:
        raise _UsageError(f"-o {args.output}: cannot write it ({exc.strerror})") from exc
    sys.stdout.write("".join(ln[2:] + "\n" for ln in text.splitlines() if ln.startswith("# ")))
    print(f"wrote {args.output}", file=sys.stderr)
    return EXIT_OK


def _cmd_field(args: argparse.Namespace) -> int:
    from parallelcity.field.serve import FieldOptions, serve_field
    from parallelcity.scenario.definition import load_scenario

    if not 0 <= args.port <= 65535:
        raise _UsageError("--port must be between 0 and 65535")
    scenario = load_scenario(args.scenario)
    options = FieldOptions(args.host, args.port, args.pki, args.insecure_lab)

    def say(line: str) -> None:
        print(line, flush=True)

    asyncio.run(serve_field(scenario, options, say))
    print("field stand-in stopped", flush=True)
    return EXIT_OK


def _cmd_verify(args: argparse.Namespace) -> int:
    from parallelcity.errors import RigError
    from parallelcity.verify.campaign import verify_command

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


def _cmd_experiment(args: argparse.Namespace) -> int:
    from parallelcity.experiment.command import Options, experiment_command

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    opts = Options(args.out, args.workers, args.only, args.seeds, args.force)
    return experiment_command(args.experiment, opts, say)


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
            return _cmd_schema(args.output, args.experiment)
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
        if args.command == "report":
            return _cmd_report(args)
        if args.command == "field":
            return _cmd_field(args)
        if args.command == "skeleton":
            return _cmd_skeleton(args)
        if args.command == "experiment":
            return _cmd_experiment(args)
    except _UsageError as exc:
        parser.error(str(exc))
    except ScenarioError as exc:
        print(exc, file=sys.stderr)
        return EXIT_INVALID
    except PluginError as exc:
        print(f"error: {exc}", file=sys.stderr)
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
