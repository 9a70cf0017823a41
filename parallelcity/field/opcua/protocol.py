"""OPC UA as a field protocol: its reader, writer, stand-in, browse and security hooks.

Its scenario keys are in ``field.opcua.config``.  This module imports no OPC UA stack:
``validate`` and ``schema`` use it as it is, and the reader, writer and stand-in are
imported when they are asked for.
"""

from __future__ import annotations

import logging
import secrets
from typing import TYPE_CHECKING, Any, ClassVar

from parallelcity.errors import SecurityError
from parallelcity.field.config import FieldConfig
from parallelcity.field.opcua.config import OpcUaField, as_opcua, endpoint_problem
from parallelcity.field.protocol import (
    FieldProtocol,
    FieldReader,
    FieldWriter,
    LinkListener,
    LinkSecurity,
    PlantFactory,
)

if TYPE_CHECKING:
    from pathlib import Path

    from parallelcity.clock import Clock
    from parallelcity.field.opcua.session import ClientSecurity, ServerSecurity
    from parallelcity.field.protocol import FieldStandIn
    from parallelcity.scenario.definition import Scenario

_log = logging.getLogger(__name__)


class OpcUaProtocol(FieldProtocol):
    name: ClassVar[str] = "opcua"
    field_model: ClassVar[type[FieldConfig]] = OpcUaField
    title: ClassVar[str] = "OPC UA"
    has_security: ClassVar[bool] = True

    def reader(
        self,
        field: FieldConfig,
        clock: Clock,
        *,
        endpoint: str,
        security: object | None = None,
        **options: Any,
    ) -> FieldReader:
        from parallelcity.field.opcua.reader import OpcUaReader
        from parallelcity.field.opcua.session import ClientSecurity

        sec = _client_security(security, ClientSecurity)
        return OpcUaReader(as_opcua(field), clock, endpoint=endpoint, security=sec, **options)

    def writer(
        self,
        field: FieldConfig,
        *,
        endpoint: str,
        security: object | None = None,
        on_link: LinkListener | None = None,
        **options: Any,
    ) -> FieldWriter:
        from parallelcity.field.opcua.session import ClientSecurity
        from parallelcity.field.opcua.writer import OpcUaWriter

        sec = _client_security(security, ClientSecurity)
        return OpcUaWriter(endpoint, as_opcua(field), security=sec, on_link=on_link, **options)

    def stand_in(
        self,
        scenario: Scenario,
        clock: Clock,
        *,
        make_plant: PlantFactory,
        tick_ms: float = 50.0,
    ) -> FieldStandIn:
        from parallelcity.field.opcua.stand_in import EmbeddedField

        as_opcua(scenario.field)
        served: FieldStandIn = EmbeddedField(
            scenario, clock, make_plant=make_plant, tick_ms=tick_ms
        )
        return served

    def endpoint_problem(self, endpoint: str) -> str | None:
        return endpoint_problem(endpoint)

    def check_security(self, scenario: Scenario, *, embedded: bool) -> None:
        check_opcua_security(scenario, embedded=embedded)

    def security(self, scenario: Scenario, *, embedded: bool, out_dir: Path) -> LinkSecurity:
        self.check_security(scenario, embedded=embedded)
        client, server = opcua_security(scenario, embedded, out_dir)
        return LinkSecurity(client, server)

    def secure_stand_in(self, stand_in: object, server: object) -> None:
        from parallelcity.field.opcua.session import SecureStandIn, ServerSecurity

        if not isinstance(stand_in, SecureStandIn):
            raise SecurityError(
                "this rig kind's field stand-in cannot serve secure OPC UA; "
                "set [security] insecure_lab = true for a lab run"
            )
        if not isinstance(server, ServerSecurity):
            raise TypeError(f"OPC UA needs a ServerSecurity, got {type(server).__name__}")
        stand_in.use_opcua_security(server)

    async def browse(
        self,
        endpoint: str,
        security: object | None = None,
        *,
        max_age_s: float = 60.0,
        **options: Any,
    ) -> str:
        from parallelcity.field.opcua.browse import browse, points_toml
        from parallelcity.field.opcua.session import ClientSecurity

        sec = _client_security(security, ClientSecurity) or ClientSecurity.insecure()
        return points_toml(await browse(endpoint, sec, **options), max_age_s)

    def describe(self, field: FieldConfig) -> list[tuple[str, str, str]]:
        rows = super().describe(field)
        return [
            (n, a, "input (Double, writable)" if r.startswith("input") else r) for n, a, r in rows
        ]

    def summary(self, field: FieldConfig) -> str:
        f = as_opcua(field)
        return f"namespace {f.namespace}: {len(f.points)} points, {len(f.inputs)} inputs"


def check_opcua_security(scenario: Scenario, embedded: bool = True) -> None:
    """Refuse OPC UA without security unless the scenario asks for a lab run.

    Real equipment needs ``[security.opcua]``; the embedded stand-in gets
    certificates generated for the run (``opcua_security``).
    """
    if scenario.insecure_lab or embedded:
        return
    if scenario.file.security.opcua is None:
        raise SecurityError(
            "OPC UA to field equipment needs [security.opcua] (certificate, private_key, "
            "trusted, and a user token; `parallelcity certs DIR` creates a set), or "
            "[security] insecure_lab = true for a lab run"
        )


def opcua_security(
    scenario: Scenario, embedded: bool, out_dir: Path
) -> tuple[ClientSecurity, ServerSecurity | None]:
    """The runtime's OPC UA client security, and the embedded stand-in's server security.

    Embedded and not a lab run: a client and a server certificate that trust each
    other and a random password, generated for this run under ``out_dir/pki``.
    """
    from parallelcity.field.opcua.certs import make_lab_pki
    from parallelcity.field.opcua.session import ClientSecurity, ServerSecurity, hash_password

    if embedded and scenario.insecure_lab:
        return ClientSecurity.insecure(), None
    if not embedded:
        client = ClientSecurity.from_scenario(scenario)
        if not client.secure and not scenario.insecure_lab:
            raise SecurityError("OPC UA policy None needs [security] insecure_lab = true")
        return client, None
    pki = make_lab_pki(out_dir / "pki")
    password = secrets.token_urlsafe(24)
    server = ServerSecurity(
        pki.server.certificate,
        pki.server.private_key,
        pki.server_trusted,
        users={"parallelcity": hash_password(password)},
    )
    client = ClientSecurity(
        "Basic256Sha256",
        pki.client.certificate,
        pki.client.private_key,
        pki.client_trusted,
        username="parallelcity",
        password=password,
    )
    _log.info("embedded OPC UA: Basic256Sha256 SignAndEncrypt, certificates in %s", pki.root)
    return client, server


def _client_security(security: object | None, kind: type[Any]) -> Any:
    if security is not None and not isinstance(security, kind):
        raise TypeError(f"OPC UA needs a ClientSecurity, got {type(security).__name__}")
    return security


PROTOCOL = OpcUaProtocol()
