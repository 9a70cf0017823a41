"""A stand-alone field gateway's configuration (TOML), and running one from it.

``parallelcity gateway CONFIG`` runs a gateway in front of a PLC (any field
protocol: ``[field] protocol``, default ``"opcua"``) with no scenario, model or
controller: everything it needs is here - where to bind, its CURVE key and the
clients it allows (with what each may do), the inputs it drives with their
addresses (the protocol's input keys: OPC UA ``node``; Modbus ``table``,
``address``, ...), bounds, ramps and safe values, the watchdog, and where its
durable state lives.  The protocol's own config model checks the field keys;
unknown keys are errors; paths are relative to the config file.
``gateway_json_schema()`` is the JSON Schema (``parallelcity gateway --schema``).
``docs/gateway.example.toml`` is a commented example.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from parallelcity.clock import Clock
from parallelcity.dispatch.keys import check_z85, read_public_key, read_secret_key
from parallelcity.dispatch.wire import check_issuer_name
from parallelcity.errors import GatewayConfigError, SecurityError, WireFormatError
from parallelcity.field.config import DEFAULT_PROTOCOL, FieldConfig
from parallelcity.field.opcua.session import ClientSecurity
from parallelcity.field.protocol import FieldProtocol
from parallelcity.field.protocols import field_model, open_writer, protocol_of
from parallelcity.gateway.core import DEFAULT_MAX_COMMAND_AGE_S, DEFAULT_RAMP_SLACK_S, GatewayCore
from parallelcity.gateway.grants import Grant
from parallelcity.gateway.server import FieldGateway, KeyQuota, ServerCurve
from parallelcity.gateway.store import GatewayStore
from parallelcity.gateway.zap import AllowList
from parallelcity.scenario.definition import OpcUaSecurity, _describe
from parallelcity.specs import InputLimit
from parallelcity.toml_file import parse_toml, read_text_bounded

log = logging.getLogger("parallelcity.gateway.server")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GatewaySection(_Strict):
    name: str = Field("gateway", min_length=1, description="shown in logs")
    bind: str = Field(description="ZeroMQ address to bind, e.g. tcp://0.0.0.0:5555")
    state: str = Field(
        "gateway-state.sqlite", description="SQLite file of applied ids, seqs, leases, events"
    )
    clock_skew_s: float = Field(5.0, ge=0, description="allowed disagreement of clocks")
    ramp_slack_s: float = Field(
        DEFAULT_RAMP_SLACK_S,
        ge=0,
        description="seconds of unused ramp an input may carry over (arrival jitter)",
    )
    max_command_age_s: float = Field(
        DEFAULT_MAX_COMMAND_AGE_S,
        gt=0,
        description="a command whose issued_at is older than this (plus the skew) is refused",
    )
    write_timeout_s: float = Field(5.0, gt=0, description="an OPC UA write slower than this fails")
    ack_after_applied_commit: bool = Field(
        False,
        description="commit the applied marks before the acks (one more fsync per batch): "
        "an acked command is then never pending after a crash (docs/wire-protocol.md)",
    )
    lease_s: float = Field(
        60.0, gt=0, description="how long applying a command reserves its equipment"
    )
    max_messages_per_s: float = Field(
        500.0,
        gt=0,
        description="per client key: messages over this average rate are dropped unanswered",
    )
    max_burst_messages: int = Field(
        1000, ge=1, description="per client key: messages it may send at once above the rate"
    )


class ClientEntry(_Strict):
    """One allowed client key and what it may do."""

    name: str = Field(min_length=1, max_length=64, description="unique; logged with its acts")
    issuer: str | None = Field(
        None,
        description="the issuer name this key speaks for (default: name); unique; 1..64 UTF-8 "
        "bytes of letters, marks, numbers, punctuation, symbols and spaces",
    )
    public_key: str = Field(description="40-character Z85 key, or a file holding one")
    equipment: list[str] = Field(
        default_factory=list,
        description='equipment it may drive (input name before the first dot); "*": all',
    )
    inputs: list[str] = Field(default_factory=list, description="single inputs it may drive")
    ranges: dict[str, tuple[float, float]] = Field(
        default_factory=dict, description="input -> [min, max] narrower than the bounds"
    )
    rearm: bool = Field(False, description="may re-arm a tripped watchdog")

    @property
    def bound_issuer(self) -> str:
        return self.name if self.issuer is None else self.issuer

    @model_validator(mode="after")
    def _ordered(self) -> ClientEntry:
        try:
            check_issuer_name(self.bound_issuer, "issuer")
        except WireFormatError as exc:
            raise ValueError(str(exc)) from None
        for name, (lo, hi) in self.ranges.items():
            if not lo <= hi:
                raise ValueError(f"ranges.{name}: {lo} is above {hi}")
        return self


class ZmqServerSecurity(_Strict):
    secret_key: str = Field(description="the gateway's CURVE secret key file (mode 0600)")
    zap_domain: str = Field("parallelcity", min_length=1, description="ZAP domain")
    clients: list[ClientEntry] = Field(min_length=1, description="allowed client keys")


class GatewaySecurity(_Strict):
    insecure_lab: bool = Field(
        False, description="allow running without CURVE / OPC UA security (lab only)"
    )
    zmq: ZmqServerSecurity | None = None
    opcua: OpcUaSecurity | None = Field(
        None, description="the gateway's OPC UA client security towards the PLC"
    )


class GatewayInput(_Strict):
    """One input: the gateway's keys here, the protocol's address keys beside them (OPC UA
    ``node``; Modbus ``unit``, ``table``, ``address``, ``data_type``, ...)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: str = Field(min_length=1, max_length=128)
    min: float
    max: float
    max_rate_per_h: float | None = Field(None, gt=0)
    safe: float | None = Field(None, description="value the watchdog reverts to")

    @model_validator(mode="after")
    def _ordered(self) -> GatewayInput:
        if not self.min <= self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        if self.safe is not None and not self.min <= self.safe <= self.max:
            raise ValueError(f"safe {self.safe} is outside [{self.min}, {self.max}]")
        return self


class GatewayField(_Strict):
    """The field link: the protocol, its endpoint and inputs, and the protocol-wide keys
    beside them (OPC UA ``namespace``; Modbus ``timeout_s``)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    protocol: str = Field(DEFAULT_PROTOCOL, description="field protocol: opcua, modbus, ...")
    endpoint: str = Field(
        description="the PLC's endpoint, e.g. opc.tcp://HOST:PORT/ or modbus://HOST:PORT"
    )
    inputs: list[GatewayInput] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> GatewayField:
        names = [i.name for i in self.inputs]
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise ValueError(f"inputs mapped twice: {', '.join(dups)}")
        return self


class WatchdogSection(_Strict):
    heartbeat_interval_s: float = Field(1.0, gt=0, description="expected heartbeat period")
    missed_heartbeats: int = Field(3, ge=1, description="this many missed in a row trips it")


class GatewayFile(_Strict):
    gateway: GatewaySection
    security: GatewaySecurity = GatewaySecurity()
    field: GatewayField
    watchdog: WatchdogSection = WatchdogSection()


NOT_GATEWAY_KEYS = frozenset({"points", "gateway", "watchdog"})
"""``[field]`` keys of a scenario that mean nothing to a gateway (it has ``[watchdog]``)."""


@cache
def _inputs_only(model: type[FieldConfig]) -> type[FieldConfig]:
    """``model`` with no points: a gateway writes inputs and reads nothing."""
    points: Any = (Sequence[model.point_model], Field(default_factory=list, max_length=0))  # type: ignore[name-defined]
    inputs_only: type[FieldConfig] = create_model(
        f"Gateway{model.__name__}", __base__=model, points=points
    )
    return inputs_only


def field_config_of(field: GatewayField) -> FieldConfig:
    """``field`` checked by its protocol's config model; ``ValidationError`` with key paths
    under ``field`` (an unknown protocol at ``protocol``)."""
    extra = dict(field.model_extra or {})
    raw: dict[str, Any] = {
        **{k: v for k, v in extra.items() if k not in NOT_GATEWAY_KEYS},
        "protocol": field.protocol,
        "endpoint": field.endpoint,
        "inputs": [{"name": i.name, **(i.model_extra or {})} for i in field.inputs],
    }
    model = _inputs_only(field_model(raw))
    config = model.model_validate(raw)
    wrong = sorted(NOT_GATEWAY_KEYS & extra.keys())
    if wrong:
        raise ValueError(f"not gateway keys: {', '.join(wrong)}")
    return config


class GatewayConfig:
    """A validated gateway config file, with its paths resolved."""

    def __init__(self, path: Path, file: GatewayFile, field: FieldConfig | None = None) -> None:
        self.path = path
        self.file = file
        self._field = field_config_of(file.field) if field is None else field

    @property
    def protocol(self) -> FieldProtocol:
        return protocol_of(self._field)

    def resolve(self, relative: str) -> Path:
        p = Path(relative)
        return p if p.is_absolute() else self.path.parent / p

    @property
    def limits(self) -> dict[str, InputLimit]:
        return {
            i.name: InputLimit(i.name, i.min, i.max, i.max_rate_per_h)
            for i in self.file.field.inputs
        }

    @property
    def safe(self) -> dict[str, float]:
        return {i.name: i.safe for i in self.file.field.inputs if i.safe is not None}

    def field_config(self) -> FieldConfig:
        """What the field writer needs (the protocol's settings and input addresses); there
        are no points."""
        return self._field

    def curve(self) -> ServerCurve | None:
        """The CURVE set-up from the key files; ``SecurityError`` if a key is unusable."""
        z = self.file.security.zmq
        if z is None:
            return None
        keys = read_secret_key(self.resolve(z.secret_key))
        entries = []
        for c in z.clients:
            key = c.public_key.strip()
            public = check_z85(key) if len(key) == 40 else read_public_key(self.resolve(key))
            everything = "*" in c.equipment
            grant = Grant(
                c.name,
                None if everything else frozenset(c.equipment),
                None if everything else frozenset(c.inputs),
                dict(c.ranges),
                c.rearm,
                frozenset({c.bound_issuer}),
            )
            entries.append((public, grant))
        return ServerCurve(keys, AllowList.of(entries), z.zap_domain)

    def opcua(self) -> ClientSecurity:
        """OPC UA client security from ``[security.opcua]`` (NoSecurity without it)."""
        cfg = self.file.security.opcua
        if cfg is None:
            return ClientSecurity.insecure()

        sec = ClientSecurity.from_table(cfg, self.path.parent)
        sec.check()
        return sec

    def core(self) -> GatewayCore:
        g, w = self.file.gateway, self.file.watchdog
        return GatewayCore(
            self.limits,
            clock_skew_s=g.clock_skew_s,
            max_age_s=g.max_command_age_s,
            ramp_slack_s=g.ramp_slack_s,
            lease_s=g.lease_s,
            safe=self.safe,
            heartbeat_interval_s=w.heartbeat_interval_s,
            missed_heartbeats=w.missed_heartbeats,
        )


def parse_gateway_config(text: str, path: str | Path = "<string>") -> GatewayConfig:
    path = Path(path)
    try:
        raw = parse_toml(text)
    except ValueError as exc:
        raise GatewayConfigError(str(path), [str(exc)]) from None
    try:
        file = GatewayFile.model_validate(raw)
    except ValidationError as exc:
        # The scenario's wording and key paths (field.inputs[0].min), one function for both.
        raise GatewayConfigError(str(path), [_describe(e) for e in exc.errors()]) from exc
    try:
        field = field_config_of(file.field)
    except ValidationError as exc:
        lines = [_describe(e, ("field",)) for e in exc.errors()]
        raise GatewayConfigError(str(path), lines) from exc
    except ValueError as exc:
        raise GatewayConfigError(str(path), [f"field: {exc}"]) from exc
    protocol = protocol_of(field)
    if file.security.opcua is not None and not protocol.has_security:
        raise GatewayConfigError(
            str(path), [f"security.opcua: {protocol.label} has no security settings"]
        )
    return GatewayConfig(path, file, field)


def load_gateway_config(path: str | Path) -> GatewayConfig:
    path = Path(path)
    try:
        text = read_text_bounded(path)
    except OSError as exc:
        raise GatewayConfigError(
            str(path), [f"cannot read the file: {exc.strerror or exc}"]
        ) from exc
    except ValueError as exc:  # too large, binary, not UTF-8
        raise GatewayConfigError(str(path), [str(exc)]) from exc
    return parse_gateway_config(text, path)


def gateway_json_schema() -> dict[str, Any]:
    schema = GatewayFile.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "parallelcity field gateway"
    return schema


async def serve_gateway(config: GatewayConfig, clock: Clock) -> None:
    """Run the gateway ``config`` describes until cancelled.

    Refuses (``SecurityError``) to start without ``[security.zmq]`` unless
    ``insecure_lab`` is true, before touching the network or the field.  The
    first OPC UA connection must succeed (an untrusted PLC certificate is a
    ``SecurityError`` naming the folder to trust it in); later losses are
    reconnected by the writer, journaled in the state file as ``field_lost`` /
    ``field_restored``, and commands are refused meanwhile.

    SIGTERM and SIGINT stop it cleanly: no new message is taken, the batch in
    hand is finished and committed, the field link is closed, and the
    call returns.
    """
    sec = config.file.security
    curve = config.curve()
    protocol = config.protocol
    opcua = config.opcua() if protocol.has_security else None
    field_secure = opcua is not None and opcua.secure
    field_need = (
        "[security.opcua]" if protocol.has_security else f"a secure field link ({protocol.label})"
    )
    missing = [
        what
        for what, present in (("[security.zmq]", curve), (field_need, field_secure))
        if not present
    ]
    if missing and not sec.insecure_lab:
        how = (
            "OPC UA certificates from `parallelcity certs`"
            if protocol.has_security
            else f"{protocol.label} has no security: keep it on an isolated network"
        )
        raise SecurityError(
            f"{config.path}: the gateway needs {' and '.join(missing)} (CURVE keys from "
            f"`parallelcity keys`, {how}), or insecure_lab = true in [security] for a lab run"
        )
    if missing:
        log.warning(
            "INSECURE LAB MODE: gateway %s runs without %s; never outside a lab",
            config.file.gateway.name,
            " and ".join(missing),
        )
    g = config.file.gateway
    gateway_cm = open_gateway(
        config.core(),
        clock,
        field_endpoint=config.file.field.endpoint,
        field=config.field_config(),
        security=opcua,
        state=config.resolve(g.state),
        bind=g.bind,
        curve=curve,
        insecure_lab=sec.insecure_lab,
        write_timeout_s=g.write_timeout_s,
        ack_after_applied_commit=g.ack_after_applied_commit,
        quota=KeyQuota(g.max_messages_per_s, g.max_burst_messages),
    )
    loop = asyncio.get_running_loop()
    signals = [signal.SIGTERM, signal.SIGINT]
    running: list[FieldGateway] = []
    early: list[str] = []  # a signal while connecting stops the gateway as soon as it is up

    def on_signal(name: str) -> None:
        if running:
            running[0].request_stop(name)
        else:
            early.append(name)

    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig.name)
    try:
        async with gateway_cm as gateway:
            running.append(gateway)
            if early:
                gateway.request_stop(early[0])
            log.info("gateway %s serving on %s", g.name, gateway.endpoint)
            await gateway.serve()
        log.warning("gateway %s: stopped cleanly; the field link is closed", g.name)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


EMBEDDED_WRITER_TIMEOUT_S = 4.0
"""Without ``write_timeout_s``: the writer's connect and request timeout ..."""
EMBEDDED_WRITE_TIMEOUT_S = 5.0
"""... and the gateway's bound on one write, which allows for it."""


@asynccontextmanager
async def open_gateway(
    core: GatewayCore,
    clock: Clock,
    *,
    field_endpoint: str,
    field: FieldConfig,
    security: object | None,
    state: Path,
    bind: str,
    curve: ServerCurve | None,
    insecure_lab: bool,
    write_timeout_s: float | None = None,
    ack_after_applied_commit: bool = False,
    quota: KeyQuota | None = None,
) -> AsyncIterator[FieldGateway]:
    """A started gateway with its durable store and its field writer, closed on exit.

    The one set-up for both a stand-alone gateway (``serve_gateway``) and the one a run
    embeds: the caller runs ``serve()`` (and ``request_stop`` ends it cleanly).
    """
    store = GatewayStore(state)
    try:
        writer = open_writer(
            field,
            field_endpoint,
            security=security,
            on_link=lambda kind, detail: store.record_event(clock.now(), kind, detail),
            timeout_s=write_timeout_s or EMBEDDED_WRITER_TIMEOUT_S,
        )
        gateway = FieldGateway(
            core,
            writer,
            clock,
            bind=bind,
            curve=curve,
            insecure_lab=insecure_lab,
            ack_after_applied_commit=ack_after_applied_commit,
            store=store,
            quota=quota,
            write_timeout_s=write_timeout_s or EMBEDDED_WRITE_TIMEOUT_S,
        )
        async with writer, gateway:
            yield gateway
    finally:
        store.close()
