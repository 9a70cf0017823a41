"""``parallelcity field SCENARIO``: a scenario's field stand-in served on its own.

The rig kind's plant simulator behind the scenario's field protocol's stand-in on a
fixed port, on the wall clock (as a real plant runs), until SIGINT or SIGTERM.  A
protocol with security (OPC UA) is secure by default: SignAndEncrypt with the server
half of a ``parallelcity certs`` folder (the one the scenario's ``[security.opcua]``
certificate lives in, or ``--pki``; made when it does not exist yet), trusting that
folder's client and user certificates.  A protocol without security (Modbus TCP) serves
loopback with a loud warning, another host only with ``--insecure-lab``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from parallelcity import plugins
from parallelcity.clock import SimClock
from parallelcity.errors import ScenarioError, SecurityError
from parallelcity.field.opcua.certs import lab_pki_files, make_lab_pki
from parallelcity.field.opcua.session import SecureStandIn, ServerSecurity, hash_password
from parallelcity.field.protocols import protocol_of
from parallelcity.scenario.definition import Scenario
from parallelcity.verify.rig import ServedStandIn

DEFAULT_PORT = 4840  # the IANA port of OPC UA
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PKI = Path("field-pki")


@dataclass(frozen=True)
class FieldOptions:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    pki: Path | None = None  # None: the scenario's [security.opcua] folder, else field-pki/
    insecure_lab: bool = False


def pki_root(scenario: Scenario, pki: Path | None) -> Path:
    """The certificate folder: ``pki``, else the ``parallelcity certs`` folder holding the
    scenario's client certificate (``ROOT/client/own/client.der``), else ``field-pki``."""
    if pki is not None:
        return pki
    cfg = scenario.file.security.opcua
    if cfg is not None:
        cert = Path(cfg.certificate).expanduser()
        cert = cert if cert.is_absolute() else scenario.path.parent / cert
        if cert.parent.name == "own" and cert.parent.parent.name == "client":
            return cert.parents[2]
    return DEFAULT_PKI


def ensure_pki(root: Path, host: str) -> bool:
    """Make the certificate set under ``root`` when it holds none of it yet; True if made."""
    files = lab_pki_files(root)
    present = [p for p in files if p.exists()]
    if not present:
        extra = [] if host in ("localhost", "127.0.0.1") else [host]
        make_lab_pki(root, hostnames=["localhost", "127.0.0.1", *extra])
        return True
    if len(present) < len(files):
        missing = ", ".join(str(p) for p in files if not p.exists())
        raise SecurityError(
            f"{root} holds part of a certificate set (missing {missing}); make a whole one "
            "with `parallelcity certs DIR` and give it with --pki DIR"
        )
    return False


def server_security(scenario: Scenario, root: Path) -> ServerSecurity:
    """The server half of the ``parallelcity certs`` folder ``root``, trusting its client
    and user certificates; also the scenario's user name, with the password from its
    ``password_env``, when that variable is set."""
    users: dict[str, str] = {}
    cfg = scenario.file.security.opcua
    if cfg is not None and cfg.username and cfg.password_env:
        password = os.environ.get(cfg.password_env)
        if password:
            users[cfg.username] = hash_password(password)
    own = root / "server" / "own"
    return ServerSecurity(
        own / "server.der",
        own / "server.key.pem",
        root / "server" / "trusted",
        users=users,
        trusted_users=root / "server" / "trusted-users",
    )


def point_table(scenario: Scenario) -> list[str]:
    """One line per point and input: what a client finds where."""
    protocol = protocol_of(scenario.field)
    rows = protocol.describe(scenario.field)
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    head = protocol.summary(scenario.field)
    return [head] + [f"  {a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows]


def next_steps(scenario: Scenario, endpoint: str, insecure: bool) -> list[str]:
    """What to run against this stand-in next: only what its protocol supports."""
    protocol = protocol_of(scenario.field)
    path = scenario.path
    lines = ["next, in other terminals:"]
    if protocol.can_browse:
        browse = "--insecure-lab" if insecure else f"--scenario {path}"
        lines.append(f"  parallelcity browse {endpoint} {browse}")
    lines.append(
        "  parallelcity gateway GATEWAY.toml      ([field] endpoint = "
        f'"{endpoint}"; see docs/site/gateway.toml)'
    )
    run = f"  parallelcity run {path} --field {endpoint} --gateway tcp://127.0.0.1:5555"
    if not protocol.has_security and not scenario.insecure_lab:
        run += "   (needs [security] insecure_lab = true)"
    lines += [run, "stop with Ctrl-C or SIGTERM"]
    return lines


LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


def _unsecured(label: str, options: FieldOptions, say: Callable[[str], None]) -> None:
    """A protocol without security: loopback, or any host with --insecure-lab; said loudly."""
    if options.host not in LOOPBACK and not options.insecure_lab:
        raise SecurityError(
            f"{label} has no authentication or encryption: serving it on {options.host} "
            "needs --insecure-lab (a lab on an isolated network); 127.0.0.1 needs nothing"
        )
    reach = "this machine" if options.host in LOOPBACK else f"anyone who reaches {options.host}"
    say(
        f"WARNING: {label} HAS NO SECURITY (no authentication, no encryption): {reach} "
        "can read the points and write the inputs"
    )


async def serve_field(
    scenario: Scenario,
    options: FieldOptions,
    say: Callable[[str], None],
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until ``stop`` is set, or SIGINT / SIGTERM arrives; then stop cleanly."""
    kind = plugins.rig_kind(scenario.file.rig.kind)
    protocol = protocol_of(scenario.field)
    clock = SimClock(epoch=time.time(), speed=1.0)
    try:
        cm = kind.field_stand_in(scenario.rig_config, scenario, clock)
    except ValueError as exc:  # a rig kind that verifies but cannot stand in for the field
        raise ScenarioError(str(scenario.path), [f"rig.kind: {exc}"]) from exc
    if not isinstance(cm, ServedStandIn):
        raise ScenarioError(
            str(scenario.path),
            [f"rig.kind: the field stand-in of {scenario.file.rig.kind!r} cannot be served"],
        )
    cm.listen_on(options.host, options.port)
    if not protocol.has_security:
        _unsecured(protocol.label, options, say)
    if options.insecure_lab:
        cm.allow_insecure_lab()
    elif protocol.has_security:
        if not isinstance(cm, SecureStandIn):
            raise SecurityError(
                f"the field stand-in of rig kind {scenario.file.rig.kind!r} cannot serve "
                f"{protocol.label} securely; --insecure-lab serves it without "
                "security, in a lab only"
            )
        root = pki_root(scenario, options.pki)
        if ensure_pki(root, options.host):
            say(f"made certificates in {root} (the same layout as `parallelcity certs {root}`)")
        else:
            say(f"certificates from {root}")
        protocol.secure_stand_in(cm, server_security(scenario, root))
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        async with cm as stand_in:
            security = getattr(stand_in, "security_description", "")
            say(f"field stand-in of {scenario.meta.name!r} serving {stand_in.endpoint}")
            if security:
                say(f"security: {security}")
            for line in point_table(scenario) + next_steps(
                scenario, stand_in.endpoint, options.insecure_lab or not protocol.has_security
            ):
                say(line)
            await stop.wait()
            say("stopping the field stand-in")
    finally:
        for sig in signals:
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
