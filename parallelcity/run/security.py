"""A run's security set-up: refuse what is not secure unless it is a lab run, and make
the embedded gateway's CURVE keys for the run."""

from __future__ import annotations

import logging
import uuid

from parallelcity.dispatch.dispatcher import ClientCurve
from parallelcity.dispatch.keys import KeyPair, read_public_key, read_secret_key
from parallelcity.errors import SecurityError
from parallelcity.gateway.grants import Grant
from parallelcity.gateway.server import ServerCurve, new_zap_domain
from parallelcity.gateway.zap import AllowList
from parallelcity.scenario.definition import Scenario

log = logging.getLogger("parallelcity.run.runner")


def check_zmq_security(scenario: Scenario, embedded_gateway: bool = True) -> None:
    """Refuse to dispatch over ZeroMQ without CURVE unless the scenario asks for a lab run.

    The embedded gateway gets key pairs generated for the run (``zmq_security``);
    a separate gateway (``--gateway``) needs ``[security.zmq]``.
    """
    if scenario.insecure_lab or embedded_gateway:
        return
    if scenario.file.security.zmq is None:
        raise SecurityError(
            "dispatching to a gateway needs [security.zmq] (client_secret_key, "
            "gateway_public_key; `parallelcity keys DIR NAME` makes key pairs), or "
            "[security] insecure_lab = true for a lab run"
        )


def issuer_name(scenario: Scenario, embedded_gateway: bool) -> str:
    """The issuer name this run's commands carry.

    A separate gateway binds each client key to one issuer: with CURVE the run
    speaks as ``[security.zmq] issuer`` (default: the scenario's name).
    Otherwise a name of its own for this run (the embedded gateway binds it).
    """
    cfg = scenario.file.security.zmq
    if not embedded_gateway and cfg is not None:
        return cfg.issuer or scenario.meta.name
    return f"{scenario.meta.name}-{uuid.uuid4().hex[:8]}"


def zmq_security(
    scenario: Scenario, embedded_gateway: bool, issuer: str
) -> tuple[ClientCurve | None, ServerCurve | None]:
    """CURVE for the dispatcher, and for the embedded gateway (``None``: no CURVE).

    Embedded and not a lab run: a server and a client key pair made in memory for
    this run; the gateway allows exactly that client key, bound to ``issuer``.
    """
    cfg = scenario.file.security.zmq
    if not embedded_gateway:
        if cfg is None:
            return None, None  # insecure_lab, checked by check_zmq_security
        base = scenario.path.parent
        keys = read_secret_key(base / cfg.client_secret_key)
        return ClientCurve(keys, read_public_key(base / cfg.gateway_public_key)), None
    if scenario.insecure_lab:
        return None, None
    server, client = KeyPair.generate(), KeyPair.generate()
    allow = AllowList.of(
        [(client.public, Grant.everything("embedded-runtime", frozenset({issuer})))]
    )
    log.info("embedded gateway: ZeroMQ CURVE with key pairs generated for this run")
    return ClientCurve(client, server.public), ServerCurve(server, allow, new_zap_domain())
