"""Secure OPC UA sessions, shared by the mirror, the gateway's writer, ``browse`` and ``hil``.

Client side: ``ClientSecurity`` says how to connect (security policy and
certificate, the trust list the server's certificate must be in, the user
token); ``connect_client(endpoint, security)`` returns a connected asyncua
``Client`` or raises one of ours:

* ``SecurityError`` - the server's certificate is not trusted (the message
  says which file to copy into which trust folder), the server refused our
  certificate (which certificate to add to which server trust list), the
  server offers no endpoint with the required policy, or the user was refused;
* ``FieldConnectionError`` - unreachable, timed out, dropped.

Server side: ``ServerSecurity`` and ``configure_server(server, security)``
give an asyncua ``Server`` SignAndEncrypt endpoints only (Basic256Sha256 and
Aes256_Sha256_RsaPss), a client-certificate trust list, and user tokens
(username/password or an X.509 user certificate; never anonymous).  Such a
server answers only discovery (GetEndpoints, FindServers) on a channel that is
not SignAndEncrypt, as the specification asks; every other request on it (a
session, a password, a read or a write) is refused and the connection closed.

Policy ``None`` exists only as ``ClientSecurity.insecure()`` /
``configure_server(server, None)``; the runtime uses it only when the scenario
says ``insecure_lab = true``.  Private keys that the group or others may read
are refused (``keys.check_owner_only``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import hmac
import logging
import os
import secrets
import time
import weakref
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from asyncua import ua
from asyncua.client.client import Client
from asyncua.common.utils import ServiceError
from asyncua.crypto import security_policies
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.internal_server import InternalServer
from asyncua.server.server import Server
from asyncua.server.uaprocessor import UaProcessor
from asyncua.server.user_managers import UserManager
from asyncua.ua.object_ids import ObjectIdNames, ObjectIds
from asyncua.ua.status_codes import StatusCodes
from asyncua.ua.uaerrors import UaError, UaStatusCodeError
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding

from parallelcity.dispatch.keys import check_owner_only
from parallelcity.errors import FieldConnectionError, SecurityError
from parallelcity.field.opcua.certs import application_uri_of, describe, load_certificate
from parallelcity.field.opcua.config import endpoint_problem
from parallelcity.field.opcua.node_id import scenario_node

if TYPE_CHECKING:
    from parallelcity.scenario.definition import OpcUaSecurity, Scenario

_log = logging.getLogger(__name__)

_NETWORK_ERRORS: tuple[type[BaseException], ...] = (OSError, TimeoutError, ConnectionError)
"""The network's own failures (asyncio.TimeoutError is TimeoutError)."""
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (*_NETWORK_ERRORS, UaError)
"""What asyncua and the network raise when the server could not be reached or stopped
answering (the one list the reader and the writer translate into ``FieldError``s)."""
SHUTDOWN_ERRORS: tuple[type[BaseException], ...] = (*TRANSPORT_ERRORS, RuntimeError)
"""... plus what asyncua raises when used on a connection it already considers closed."""

Policy = Literal["Basic256Sha256", "Aes256_Sha256_RsaPss"]
POLICIES: dict[str, type[security_policies.SecurityPolicy]] = {
    "Basic256Sha256": security_policies.SecurityPolicyBasic256Sha256,
    "Aes256_Sha256_RsaPss": security_policies.SecurityPolicyAes256Sha256RsaPss,
}
SERVER_POLICIES = (
    ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
    ua.SecurityPolicyType.Aes256Sha256RsaPss_SignAndEncrypt,
)

_CERT_REFUSALS = {
    StatusCodes.BadCertificateUntrusted,
    StatusCodes.BadCertificateInvalid,
    StatusCodes.BadCertificateTimeInvalid,
    StatusCodes.BadCertificateUriInvalid,
    StatusCodes.BadCertificateUseNotAllowed,
    StatusCodes.BadCertificateRevoked,
    StatusCodes.BadSecurityChecksFailed,
    StatusCodes.BadSecurityPolicyRejected,
}
_USER_REFUSALS = {
    StatusCodes.BadUserAccessDenied,
    StatusCodes.BadIdentityTokenRejected,
    StatusCodes.BadIdentityTokenInvalid,
}


# =========================================================================== helpers


@contextlib.asynccontextmanager
async def deadline(seconds: float) -> AsyncIterator[None]:
    """``asyncio.timeout(seconds)`` that always ends in ``TimeoutError`` when it expires.

    Python 3.11's ``asyncio.timeout`` converts only the exact ``CancelledError`` type;
    asyncua's ``wait_for2`` raises its subclass ``CancelledWithResultError`` when the
    deadline hits just as a reply arrives, and that would escape as a cancellation.
    """
    task = asyncio.current_task()
    before = task.cancelling() if task is not None else 0
    timeout = asyncio.timeout(seconds)
    try:
        async with timeout:
            yield
    except asyncio.CancelledError as exc:
        # ours only if nobody else asked to cancel the task meanwhile
        if timeout.expired() and task is not None and task.cancelling() <= before:
            raise TimeoutError(f"no answer within {seconds:g} s") from exc
        raise


def raised_by_asyncua(exc: BaseException) -> bool:
    """Whether ``exc`` was raised inside asyncua (or its ``wait_for2``), not by our code."""
    tb = exc.__traceback__
    module = ""
    while tb is not None:
        module = tb.tb_frame.f_globals.get("__name__", "")
        tb = tb.tb_next
    return module.split(".", 1)[0] in ("asyncua", "wait_for2")


def parse_node_id(text: str, ns_index: int = 0) -> ua.NodeId:
    """A scenario NodeId (``node_id.scenario_node``) in namespace ``ns_index``: the
    namespace comes from ``field.namespace``, never from the text.  Raises ``NodeIdError``
    (a ``ScenarioError`` and a ``ValueError``)."""
    ref = scenario_node(text)
    ns = ua.Int16(ns_index)
    if ref.type == "s":
        return ua.NodeId(ua.String(ref.identifier), ns)
    if ref.type == "i":
        return ua.NodeId(ua.Int32(ref.identifier), ns)
    if ref.type == "g":
        return ua.NodeId(ua.Guid(str(ref.identifier)), ns, ua.NodeIdType.Guid)
    assert isinstance(ref.identifier, bytes)
    return ua.NodeId(ua.ByteString(ref.identifier), ns, ua.NodeIdType.ByteString)


# =========================================================================== trust lists


class TrustList:
    """Certificates in a folder (DER or PEM): a peer is trusted if its certificate is one of
    them, or is signed by one of them that is a CA.  Loaded once, at construction."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        if not folder.is_dir():
            raise SecurityError(f"trust list folder {folder} does not exist")
        self._certs: list[x509.Certificate] = []
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() not in (".der", ".pem", ".crt", ".cer"):
                continue
            try:
                self._certs.append(load_certificate(path))
            except ValueError as exc:
                raise SecurityError(f"trust list {folder}: {path.name} is no certificate") from exc
        self._ders = {c.public_bytes(Encoding.DER) for c in self._certs}
        self.refused: x509.Certificate | None = None  # the last certificate this list refused

    def __len__(self) -> int:
        return len(self._certs)

    def __bool__(self) -> bool:
        # asyncua skips validation when ``if validator:`` is false: an empty list must
        # still refuse every certificate, not let them all in.
        return True

    def problem(self, cert: x509.Certificate, application_uri: str | None) -> int | None:
        """The OPC UA status code that refuses ``cert``, or None if it is acceptable."""
        now = dt.datetime.now(dt.UTC)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            return StatusCodes.BadCertificateTimeInvalid
        if not self._trusted(cert):
            return StatusCodes.BadCertificateUntrusted
        if application_uri is not None and application_uri_of(cert) != application_uri:
            return StatusCodes.BadCertificateUriInvalid
        return None

    def _trusted(self, cert: x509.Certificate) -> bool:
        if cert.public_bytes(Encoding.DER) in self._ders:
            return True
        for ca in self._certs:
            if ca.subject != cert.issuer or not _is_ca(ca):
                continue
            if _signed_by(cert, ca):
                return True
        return False

    async def __call__(self, cert: x509.Certificate, app: ua.ApplicationDescription) -> None:
        """asyncua's certificate validator hook: raise ``ServiceError`` to refuse."""
        code = self.problem(cert, app.ApplicationUri if app is not None else None)
        if code is not None:
            self.refused = cert
            _log.warning(
                "refused certificate %s (%s); trusted certificates are in %s",
                describe(cert),
                ua.StatusCode(ua.UInt32(code)).name,
                self.folder,
            )
            raise ServiceError(code)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    key = ca.public_key()
    if not isinstance(key, rsa.RSAPublicKey) or cert.signature_hash_algorithm is None:
        return False
    try:
        key.verify(
            cert.signature,
            cert.tbs_certificate_bytes,
            padding.PKCS1v15(),
            cert.signature_hash_algorithm,
        )
    except InvalidSignature:
        return False
    return True


# =========================================================================== client side


@dataclass(frozen=True)
class ClientSecurity:
    """How a client authenticates the server and itself.  ``policy`` None is NoSecurity."""

    policy: Policy | None
    certificate: Path | None = None
    private_key: Path | None = None
    trusted: Path | None = None  # folder of trusted server (or CA) certificates
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    user_certificate: Path | None = None
    user_private_key: Path | None = None
    anonymous: bool = False  # no user token, on a SignAndEncrypt channel all the same

    @classmethod
    def insecure(cls) -> ClientSecurity:
        return cls(policy=None)

    @property
    def secure(self) -> bool:
        return self.policy is not None

    def check(self) -> None:
        """Every file a secure connection needs is named and present."""
        if self.policy is None:
            return
        missing = [
            f"{what} ({path})" if path is not None else what
            for what, path in (
                ("certificate", self.certificate),
                ("private_key", self.private_key),
                ("trusted", self.trusted),
            )
            if path is None or not path.exists()
        ]
        if self.user_certificate is not None and not self.user_certificate.exists():
            missing.append(f"user_certificate ({self.user_certificate})")
        if self.user_certificate is not None and (
            self.user_private_key is None or not self.user_private_key.exists()
        ):
            missing.append(f"user_private_key ({self.user_private_key})")
        if missing:
            raise SecurityError(
                "secure OPC UA needs these files, which are missing: "
                + ", ".join(missing)
                + " (create a set with `parallelcity certs DIR`)"
            )
        assert self.private_key is not None  # checked just above
        check_owner_only(self.private_key, "OPC UA private key")
        if self.user_private_key is not None:
            check_owner_only(self.user_private_key, "OPC UA user private key")
        tokens = (self.username is not None) + (self.user_certificate is not None)
        if self.anonymous and tokens:
            raise SecurityError("an anonymous OPC UA session takes no username or user certificate")
        if not self.anonymous and tokens != 1:
            raise SecurityError(
                "secure OPC UA needs exactly one user token: a username (and password) or a "
                "user_certificate; or anonymous = true for a server that allows only "
                "anonymous sessions"
            )
        if self.username is not None and not self.password:
            raise SecurityError(f"OPC UA user {self.username!r} has no password")

    @classmethod
    def from_scenario(cls, scenario: Scenario) -> ClientSecurity:
        """The scenario's ``[security.opcua]`` table, paths relative to the scenario file;
        NoSecurity without it (the caller decides whether that is allowed)."""
        cfg = scenario.file.security.opcua
        return cls.insecure() if cfg is None else cls.from_table(cfg, scenario.path.parent)

    @classmethod
    def from_table(cls, cfg: OpcUaSecurity, base: Path) -> ClientSecurity:
        """A ``[security.opcua]`` table (of a scenario or a gateway config), relative paths
        against ``base``.  The password is read from the environment variable the table
        names, never from the file."""

        def resolve(p: str | None) -> Path | None:
            if p is None:
                return None
            path = Path(p).expanduser()
            return path if path.is_absolute() else base / path

        password = None
        if cfg.password_env is not None:
            password = os.environ.get(cfg.password_env)
            if password is None:
                raise SecurityError(
                    f"security.opcua.password_env: environment variable {cfg.password_env!r} "
                    "is not set"
                )
        return cls(
            policy=cfg.policy,
            certificate=resolve(cfg.certificate),
            private_key=resolve(cfg.private_key),
            trusted=resolve(cfg.trusted),
            username=cfg.username,
            password=password,
            user_certificate=resolve(cfg.user_certificate),
            user_private_key=resolve(cfg.user_private_key),
            anonymous=cfg.anonymous,
        )


async def connect_client(
    endpoint: str,
    security: ClientSecurity,
    *,
    timeout_s: float,
    session_timeout_ms: int | None = None,
    name: str = "parallelcity",
    request_timeout_s: float | None = None,
    watchdog_s: float = 1.0,
) -> Client:
    """A connected client for ``endpoint``; on any failure nothing is left open.

    ``timeout_s`` bounds connecting; ``request_timeout_s`` (default ``timeout_s``) each
    later request.  asyncua probes the server every ``watchdog_s`` and drops the
    connection when a probe takes longer than that: a client that sends large requests
    to a busy server needs more than asyncua's 1 s.
    """
    if (problem := endpoint_problem(endpoint)) is not None:
        raise FieldConnectionError(problem)
    request_timeout = timeout_s if request_timeout_s is None else request_timeout_s
    client = Client(endpoint, timeout=request_timeout, watchdog_intervall=watchdog_s)
    client.name = client.description = name
    if session_timeout_ms is not None:
        client.session_timeout = session_timeout_ms
    try:
        async with deadline(timeout_s):
            if security.secure:
                await _secure(client, endpoint, security)
            await client.connect()
    except BaseException as exc:
        client.disconnect_socket()
        if isinstance(exc, SecurityError | asyncio.CancelledError):
            raise
        validator = client.certificate_validator
        if isinstance(validator, TrustList) and validator.refused is not None:
            raise _server_untrusted(endpoint, validator) from exc
        raise _translate(exc, endpoint, security, timeout_s) from exc
    if security.secure and security.anonymous:
        _log.warning(
            "OPC UA session to %s is ANONYMOUS on a %s SignAndEncrypt channel: the server "
            "knows this application by its certificate, but no user is authenticated",
            endpoint,
            security.policy,
        )
    elif security.secure:
        _log.info(
            "OPC UA session to %s: %s SignAndEncrypt, user %s",
            endpoint,
            security.policy,
            security.username or "certificate",
        )
    return client


async def _secure(client: Client, endpoint: str, sec: ClientSecurity) -> None:
    sec.check()
    assert sec.policy and sec.certificate and sec.private_key and sec.trusted
    own = load_certificate(sec.certificate)
    uri = application_uri_of(own)
    if uri is None:
        raise SecurityError(
            f"client certificate {sec.certificate} has no application URI in subjectAltName"
        )
    now = dt.datetime.now(dt.UTC)
    if not own.not_valid_before_utc <= now <= own.not_valid_after_utc:
        raise SecurityError(
            f"client certificate {sec.certificate} is not valid now (valid "
            f"{own.not_valid_before_utc:%Y-%m-%d} to {own.not_valid_after_utc:%Y-%m-%d})"
        )
    client.application_uri = uri  # asyncua requires it to equal the certificate's URI
    trust_list = TrustList(sec.trusted)
    client.certificate_validator = trust_list
    try:
        await client.set_security(
            POLICIES[sec.policy],
            str(sec.certificate),
            str(sec.private_key),
            mode=ua.MessageSecurityMode.SignAndEncrypt,
        )
    except UaError as exc:
        if "No matching endpoints" in str(exc):
            raise SecurityError(
                f"the OPC UA server at {endpoint} offers no {sec.policy} SignAndEncrypt endpoint"
            ) from exc
        raise
    except _NETWORK_ERRORS:
        raise
    except (ValueError, TypeError) as exc:
        raise SecurityError(
            f"cannot use certificate {sec.certificate} / key {sec.private_key}: {exc}"
        ) from exc
    if sec.user_certificate is not None:
        await client.load_client_certificate(str(sec.user_certificate))
        assert sec.user_private_key is not None
        await client.load_private_key(sec.user_private_key)
    if sec.username is not None:
        client.set_user(sec.username)
        client.set_password(sec.password or "")


def _server_untrusted(endpoint: str, trust_list: TrustList) -> SecurityError:
    """The server's certificate is not in our trust list: keep a copy to review, say where."""
    cert = trust_list.refused
    assert cert is not None
    rejected = trust_list.folder.parent / "rejected"
    copy = rejected / f"{cert.fingerprint(hashes.SHA1()).hex()}.der"
    try:
        rejected.mkdir(parents=True, exist_ok=True)
        copy.write_bytes(cert.public_bytes(Encoding.DER))
        saved = f"a copy is in {copy}; "
    except OSError:
        saved = ""
    return SecurityError(
        f"the OPC UA server at {endpoint} presented a certificate we do not trust "
        f"({describe(cert)}): {saved}if you trust it, copy it into {trust_list.folder}"
    )


def _translate(
    exc: BaseException, endpoint: str, sec: ClientSecurity, timeout_s: float
) -> BaseException:
    if isinstance(exc, UaStatusCodeError) and exc.code in _CERT_REFUSALS:
        name = ua.StatusCode(ua.UInt32(exc.code)).name
        return SecurityError(
            f"the OPC UA server at {endpoint} refused our certificate ({name}): add "
            f"{sec.certificate} ({_describe_file(sec.certificate)}) to the server's trusted "
            "client certificates"
        )
    if isinstance(exc, UaError) and "No matching endpoints" in str(exc):
        wanted = f"{sec.policy} SignAndEncrypt" if sec.policy else "NoSecurity"
        return SecurityError(f"the OPC UA server at {endpoint} offers no {wanted} endpoint")
    if (
        isinstance(exc, UaStatusCodeError)
        and exc.code == StatusCodes.BadSecurityModeInsufficient
        and not sec.secure
    ):
        return SecurityError(
            f"the OPC UA server at {endpoint} offers no NoSecurity endpoint "
            "(it refused a session on an unencrypted channel)"
        )
    if isinstance(exc, UaStatusCodeError) and exc.code in _USER_REFUSALS:
        name = ua.StatusCode(ua.UInt32(exc.code)).name
        who = sec.username if sec.username is not None else "the user certificate"
        if sec.username is None and sec.user_certificate is None:
            who = "an anonymous user"
        return SecurityError(f"the OPC UA server at {endpoint} refused {who} ({name})")
    if isinstance(exc, AssertionError) and sec.secure:
        # asyncua asserts in open_secure_channel when the server closes the channel on us,
        # which is how a server refuses a client certificate it does not trust.
        return SecurityError(
            f"the OPC UA server at {endpoint} closed the secure channel: it most likely does "
            f"not trust our certificate {sec.certificate} ({_describe_file(sec.certificate)}); "
            "add that file to the server's trusted client certificates "
            "(for a parallelcity hil server: its trusted folder; for a PLC: its 'Trusted' store)"
        )
    if isinstance(exc, _NETWORK_ERRORS):
        return FieldConnectionError(
            f"cannot connect to the OPC UA endpoint {endpoint} within {timeout_s:g} s: {exc!r}"
        )
    if isinstance(exc, UaError):
        return FieldConnectionError(f"OPC UA session to {endpoint} failed: {exc!r}")
    return exc


def _describe_file(path: Path | None) -> str:
    if path is None:
        return "none"
    try:
        return describe(load_certificate(path))
    except (OSError, ValueError):
        return "unreadable"


# =========================================================================== server side


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """``scrypt$<salt hex>$<hash hex>``: what a server keeps instead of a password."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=2**14, r=8, p=1, dklen=32)
    return f"scrypt${salt.hex()}${digest.hex()}"


def check_password(password: str, stored: str) -> bool:
    try:
        scheme, salt_hex, digest_hex = stored.split("$")
    except ValueError:
        return False
    if scheme != "scrypt":
        return False
    candidate = hash_password(password, salt=bytes.fromhex(salt_hex))
    return hmac.compare_digest(candidate.split("$")[2], digest_hex)


class _Users(UserManager):
    """asyncua user manager: named users with scrypt password hashes, and user certificates."""

    def __init__(self, users: Mapping[str, str], certificates: TrustList | None) -> None:
        self._users = dict(users)
        self._certificates = certificates

    def get_user(
        self,
        iserver: Any,
        username: str | None = None,
        password: str | None = None,
        certificate: Any = None,
    ) -> User | None:
        if username is not None:
            stored = self._users.get(username)
            if stored is not None and password is not None and check_password(password, stored):
                return User(role=UserRole.User, name=username)
            _log.warning("refused OPC UA user %r (unknown user or wrong password)", username)
            return None
        if certificate is not None and self._certificates is not None:
            cert = (
                certificate
                if isinstance(certificate, x509.Certificate)
                else x509.load_der_x509_certificate(bytes(certificate))
            )
            if self._certificates.problem(cert, None) is None:
                return User(role=UserRole.User, name=describe(cert))
            _log.warning("refused OPC UA user certificate %s", describe(cert))
            return None
        _log.warning("refused an anonymous OPC UA user")
        return None


@dataclass(frozen=True)
class ServerSecurity:
    """A server's identity, its client trust list and its users."""

    certificate: Path
    private_key: Path
    trusted: Path  # folder of trusted client (or CA) certificates
    users: Mapping[str, str] = field(default_factory=dict)  # name -> hash_password(...)
    trusted_users: Path | None = None  # folder of trusted user certificates
    policies: tuple[ua.SecurityPolicyType, ...] = SERVER_POLICIES


async def configure_server(server: Server, security: ServerSecurity | None) -> str:
    """Set up ``server``'s endpoints before ``start()``; returns a one-line description.

    ``None`` offers only NoSecurity: lab use, decided by the caller.  Otherwise the
    server refuses every request but discovery on a channel that is not SignAndEncrypt.
    """
    if security is None:
        _log.warning(
            "INSECURE LAB MODE: OPC UA server with security policy None: no encryption, "
            "no authentication; never outside a lab"
        )
        _SECURE_ONLY.discard(server.iserver)
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        return "NoSecurity, lab only"
    if not security.policies or ua.SecurityPolicyType.NoSecurity in security.policies:
        raise SecurityError("a secure OPC UA server offers SignAndEncrypt policies only")
    check_owner_only(security.private_key, "OPC UA server private key")
    _install_channel_guard()
    _SECURE_ONLY.add(server.iserver)
    own = load_certificate(security.certificate)
    uri = application_uri_of(own)
    if uri is None:
        raise SecurityError(f"server certificate {security.certificate} has no application URI")
    await server.load_certificate(str(security.certificate))
    await server.load_private_key(str(security.private_key))
    await server.set_application_uri(uri)
    server.set_security_policy(list(security.policies))
    tokens: list[type] = []
    if security.users:
        tokens.append(ua.UserNameIdentityToken)
    user_certs = TrustList(security.trusted_users) if security.trusted_users else None
    if user_certs is not None:
        tokens.append(ua.X509IdentityToken)
    if not tokens:
        raise SecurityError("a secure OPC UA server needs users or trusted user certificates")
    server.set_identity_tokens(tokens)
    server.iserver.set_user_manager(_Users(security.users, user_certs))
    server.set_certificate_validator(TrustList(security.trusted))
    names = ", ".join(p.name for p in security.policies)
    return f"{names}; client trust list {security.trusted}"


# -- the channel guard ---------------------------------------------------------------------
#
# asyncua serves a None channel even when no None endpoint is offered (a SecurityPolicy None
# OpenSecureChannel falls back to the connection's initial None policy), and it processes
# messages on a channel that was never opened (channel and token id 0).  A client without a
# certificate could then activate a session with the password in plaintext and write.  The
# guard sits where asyncua dispatches every service request of a connection.

_SECURE_ONLY: weakref.WeakSet[InternalServer] = weakref.WeakSet()
# Discovery is what a client may ask over a None channel (OPC UA Part 4, 5.4): it needs the
# server's certificate and endpoints before it can open a secure channel.
_DISCOVERY = frozenset(
    ua.NodeId(ua.Int32(i))
    for i in (
        ObjectIds.GetEndpointsRequest_Encoding_DefaultBinary,
        ObjectIds.FindServersRequest_Encoding_DefaultBinary,
        ObjectIds.CloseSecureChannelRequest_Encoding_DefaultBinary,
    )
)
_REFUSAL_LOG_EVERY_S = 10.0


class _RefusalLog:
    """One warning line per ``every_s`` at most; the lines in between are counted."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self._next_at = 0.0
        self._suppressed = 0

    def warn(self, message: str) -> None:
        now = time.monotonic()
        if now < self._next_at:
            self._suppressed += 1
            return
        more = f" (and {self._suppressed} more since the last line)" if self._suppressed else ""
        self._next_at, self._suppressed = now + self.every_s, 0
        _log.warning("%s%s", message, more)


_refusals = _RefusalLog(_REFUSAL_LOG_EVERY_S)


def channel_problem(
    channel_open: bool, mode: ua.MessageSecurityMode, typeid: ua.NodeId
) -> str | None:
    """Why a secure-only server refuses request ``typeid`` on its channel, or None."""
    if not channel_open:
        return "on a channel that was never opened"
    if mode != ua.MessageSecurityMode.SignAndEncrypt and typeid not in _DISCOVERY:
        return (
            f"on a channel with security mode {mode.name.rstrip('_')} "
            "(only discovery is served without SignAndEncrypt)"
        )
    return None


def _request_name(typeid: ua.NodeId) -> str:
    ident = typeid.Identifier
    name = (
        ObjectIdNames.get(ident) if isinstance(ident, int) and typeid.NamespaceIndex == 0 else None
    )
    return name.removesuffix("_Encoding_DefaultBinary") if name is not None else str(typeid)


def _install_channel_guard() -> None:
    original = getattr(UaProcessor, "_process_message", None)
    if getattr(original, "parallelcity_guard", False):
        return
    if original is None or not asyncio.iscoroutinefunction(original):
        # Fail closed: without the guard a secure server would serve None channels.
        raise SecurityError(
            "this asyncua version has no UaProcessor._process_message to guard: a secure "
            "OPC UA server cannot refuse SecurityPolicy None channels with it"
        )

    async def guarded(
        self: UaProcessor, typeid: ua.NodeId, requesthdr: Any, seqhdr: Any, body: Any
    ) -> Any:
        if self.iserver in _SECURE_ONLY:
            channel = self._connection
            problem = channel_problem(channel.is_open(), channel.security_policy.Mode, typeid)
            if problem is not None:
                _refusals.warn(f"refused OPC UA {_request_name(typeid)} from {self.name} {problem}")
                fault = ua.ServiceFault()
                fault.ResponseHeader.ServiceResult = ua.StatusCode(
                    ua.UInt32(StatusCodes.BadSecurityModeInsufficient)
                )
                self.send_response(requesthdr.RequestHandle, seqhdr, fault)  # type: ignore[no-untyped-call]
                return False  # asyncua closes the connection
        return await original(self, typeid, requesthdr, seqhdr, body)

    guarded.parallelcity_guard = True  # type: ignore[attr-defined]
    setattr(UaProcessor, "_process_message", guarded)  # noqa: B010


@runtime_checkable
class SecureStandIn(Protocol):
    """A field stand-in that can serve secure OPC UA.

    ``parallelcity.field.opcua.stand_in.EmbeddedField`` can."""

    def use_opcua_security(self, security: ServerSecurity) -> None: ...
