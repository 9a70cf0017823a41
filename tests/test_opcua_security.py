"""Secure OPC UA: the hil stand-in's endpoints, the trust lists both ways, user tokens.

Real asyncua servers and clients on 127.0.0.1.  "Attackers" are plain asyncua
clients configured by hand, so the refusals shown are the server's, not ours.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from asyncua import Client, ua
from asyncua.crypto import security_policies
from asyncua.ua.uaerrors import UaError, UaStatusCodeError
from parallelcity.hil.simulated import KIND

from parallelcity.clock import SimClock
from parallelcity.errors import FieldConnectionError, SecurityError
from parallelcity.field.mirror import Mirror
from parallelcity.field.opcua.certs import LabPki, make_certificate, make_lab_pki, trust
from parallelcity.field.opcua.protocol import check_opcua_security as _check_opcua_security
from parallelcity.field.opcua.protocol import opcua_security as _opcua_security
from parallelcity.field.opcua.session import (
    ClientSecurity,
    ServerSecurity,
    _translate,
    check_password,
    hash_password,
)
from parallelcity.field.opcua.stand_in import EmbeddedField
from parallelcity.field.opcua.writer import OpcUaWriter
from parallelcity.scenario.definition import Scenario, parse_scenario

from .conftest import lab_text

SCENARIO_PATH = Path(__file__).parents[1] / "scenarios/district_heating.toml"
USER, PASSWORD = "operator", "correct horse battery staple"


def run(make: Callable[[], Awaitable[Any]], timeout_s: float = 30.0) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(timeout_s):
            return await make()

    return asyncio.run(bounded())


@pytest.fixture(scope="module")
def secure_scenario(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    text = lab_text().replace("insecure_lab = true", "insecure_lab = false")
    return parse_scenario(text, tmp_path_factory.mktemp("scn") / "secure.toml")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LabPki:
    return make_lab_pki(tmp_path_factory.mktemp("pki"))


def server_security(pki: LabPki) -> ServerSecurity:
    return ServerSecurity(
        pki.server.certificate,
        pki.server.private_key,
        pki.server_trusted,
        users={USER: hash_password(PASSWORD)},
        trusted_users=pki.server_trusted_users,
    )


def client_security(pki: LabPki, **changes: Any) -> ClientSecurity:
    base: dict[str, Any] = {
        "policy": "Basic256Sha256",
        "certificate": pki.client.certificate,
        "private_key": pki.client.private_key,
        "trusted": pki.client_trusted,
        "username": USER,
        "password": PASSWORD,
    }
    base.update(changes)
    return ClientSecurity(**base)


def secure_field(scenario: Scenario, pki: LabPki) -> tuple[EmbeddedField, SimClock]:
    clock = SimClock(epoch=scenario.meta.start_epoch, speed=scenario.meta.speed)
    field = KIND.field_stand_in(scenario.rig_config, scenario, clock)
    assert isinstance(field, EmbeddedField)
    field.use_opcua_security(server_security(pki))
    return field, clock


async def raw_client(
    endpoint: str,
    cert: Path,
    key: Path,
    uri: str,
    *,
    user: str | None = None,
    password: str | None = None,
) -> Client:
    """A plain asyncua client, set up the way any third-party client would be."""
    client = Client(endpoint, timeout=4)
    client.application_uri = uri
    await client.set_security(
        security_policies.SecurityPolicyBasic256Sha256,
        str(cert),
        str(key),
        mode=ua.MessageSecurityMode.SignAndEncrypt,
    )
    if user is not None:
        client.set_user(user)
        client.set_password(password or "")
    return client


# -- endpoints -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_secure_stand_in_offers_only_sign_and_encrypt_and_no_anonymous(
    secure_scenario: Scenario, pki: LabPki
) -> None:
    async def body() -> None:
        field, _ = secure_field(secure_scenario, pki)
        async with field:
            endpoints = await Client(field.endpoint).connect_and_get_server_endpoints()
        policies = {e.SecurityPolicyUri.rsplit("#", 1)[-1] for e in endpoints}
        assert policies == {"Basic256Sha256", "Aes256_Sha256_RsaPss"}
        assert {e.SecurityMode for e in endpoints} == {ua.MessageSecurityMode.SignAndEncrypt}
        tokens = {t.TokenType for e in endpoints for t in e.UserIdentityTokens}
        assert tokens == {ua.UserTokenType.UserName, ua.UserTokenType.Certificate}
        assert field.security_description.startswith("Basic256Sha256_SignAndEncrypt")

    run(body)


@pytest.mark.slow
def test_policy_none_is_offered_only_in_an_insecure_lab(dh: Scenario) -> None:
    assert dh.insecure_lab

    async def body() -> None:
        clock = SimClock(epoch=dh.meta.start_epoch, speed=dh.meta.speed)
        async with KIND.field_stand_in(dh.rig_config, dh, clock) as field:
            endpoints = await Client(field.endpoint).connect_and_get_server_endpoints()
        assert [e.SecurityMode for e in endpoints] == [ua.MessageSecurityMode.None_]

    run(body)


# -- accepted ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["Basic256Sha256", "Aes256_Sha256_RsaPss"])
def test_mirror_and_gateway_writer_work_over_sign_and_encrypt(
    secure_scenario: Scenario, pki: LabPki, policy: str
) -> None:
    async def body() -> None:
        field, clock = secure_field(secure_scenario, pki)
        sec = client_security(pki, policy=policy)
        async with (
            field,
            Mirror(secure_scenario.field, clock, endpoint=field.endpoint, security=sec) as mirror,
            OpcUaWriter(field.endpoint, secure_scenario.field, security=sec) as writer,
        ):
            assert await mirror.wait_all_received(5.0)
            assert mirror.snapshot().stale_required == []
            await writer.write({"plant.T_supply_set": 77.0})
            assert [(a.name, a.value) for a in field.applied] == [("plant.T_supply_set", 77.0)]
            assert (await mirror.read_inputs())["plant.T_supply_set"] == 77.0

    run(body)


@pytest.mark.slow
def test_a_trusted_user_certificate_is_a_user_token(secure_scenario: Scenario, pki: LabPki) -> None:
    async def body() -> None:
        field, clock = secure_field(secure_scenario, pki)
        sec = client_security(
            pki,
            username=None,
            password=None,
            user_certificate=pki.user.certificate,
            user_private_key=pki.user.private_key,
        )
        async with (
            field,
            Mirror(secure_scenario.field, clock, endpoint=field.endpoint, security=sec) as mirror,
        ):
            assert await mirror.wait_all_received(5.0)

    run(body)


# -- refused -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_refusals_name_the_certificate_and_where_to_trust_it(
    secure_scenario: Scenario, pki: LabPki, tmp_path: Path
) -> None:
    stranger = make_certificate(tmp_path / "own", "stranger", "urn:stranger", role="client")
    expired = make_certificate(
        tmp_path / "own",
        "expired",
        "urn:expired",
        role="client",
        days=1,
        not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=30),
    )
    # Trusted by the server, so the refusal below is for its dates, not for being unknown.
    trust(expired.certificate, pki.server_trusted)
    # A fresh folder that does not hold the server's certificate.
    wrong_trust = tmp_path / "client-trusted"
    trust(stranger.certificate, wrong_trust)

    async def body() -> None:
        field, clock = secure_field(secure_scenario, pki)
        async with field:
            ep = field.endpoint

            async def mirror_with(sec: ClientSecurity) -> None:
                async with Mirror(secure_scenario.field, clock, endpoint=ep, security=sec):
                    pass

            # no certificate at all (policy None): nothing to connect to
            with pytest.raises(SecurityError, match="offers no NoSecurity endpoint"):
                await mirror_with(ClientSecurity.insecure())

            # a self-signed certificate the server does not trust
            sec = client_security(
                pki, certificate=stranger.certificate, private_key=stranger.private_key
            )
            with pytest.raises(SecurityError) as info:
                await mirror_with(sec)
            msg = str(info.value)
            assert "refused our certificate" in msg and "BadCertificateUntrusted" in msg
            assert str(stranger.certificate) in msg and "CN=stranger" in msg

            # an expired certificate, even one in the server's trust list
            client = await raw_client(
                ep, expired.certificate, expired.private_key, "urn:expired", user=USER
            )
            with pytest.raises(UaStatusCodeError) as raw:
                await client.connect()
            assert raw.value.code == ua.StatusCodes.BadCertificateTimeInvalid
            # ... and our own client will not even present it
            sec = client_security(pki, certificate=expired.certificate)
            with pytest.raises(SecurityError, match="is not valid now"):
                await mirror_with(sec)

            # a server certificate we do not trust: say which one and where to put it
            with pytest.raises(SecurityError) as info:
                await mirror_with(client_security(pki, trusted=wrong_trust))
            msg = str(info.value)
            assert "CN=server" in msg and f"copy it into {wrong_trust}" in msg
            rejected = list((tmp_path / "rejected").glob("*.der"))
            assert len(rejected) == 1
            assert rejected[0].read_bytes() == pki.server.certificate.read_bytes()

            # anonymous and wrong-password users, on a trusted certificate
            anon = await raw_client(
                ep, pki.client.certificate, pki.client.private_key, pki.client.application_uri
            )
            with pytest.raises(UaStatusCodeError) as raw:
                await anon.connect()
            assert raw.value.code == ua.StatusCodes.BadIdentityTokenRejected
            with pytest.raises(SecurityError, match=f"refused {USER} .BadUserAccessDenied"):
                await mirror_with(client_security(pki, password="wrong"))
            with pytest.raises(SecurityError, match="refused nobody"):
                await mirror_with(client_security(pki, username="nobody"))

            # the stand-in is still serving trusted clients afterwards
            async with Mirror(
                secure_scenario.field, clock, endpoint=ep, security=client_security(pki)
            ) as mirror:
                assert await mirror.wait_all_received(5.0)

    run(body, timeout_s=60.0)


def test_a_bare_assertion_from_asyncua_becomes_an_error_that_says_what_to_trust(
    pki: LabPki,
) -> None:
    sec = client_security(pki)
    err = _translate(AssertionError(), "opc.tcp://plc:4840", sec, 4.0)
    assert isinstance(err, SecurityError)
    msg = str(err)
    assert str(pki.client.certificate) in msg and "CN=client" in msg
    assert "trusted client certificates" in msg and "opc.tcp://plc:4840" in msg
    # without security an assertion is not a certificate problem
    plain = _translate(UaError("boom"), "opc.tcp://plc:4840", ClientSecurity.insecure(), 4.0)
    assert isinstance(plain, FieldConnectionError)


def test_client_security_checks_its_files_and_user_token(pki: LabPki, tmp_path: Path) -> None:
    with pytest.raises(SecurityError, match="missing: certificate"):
        client_security(pki, certificate=tmp_path / "nope.der").check()
    with pytest.raises(SecurityError, match="user token"):
        client_security(pki, username=None, password=None).check()
    with pytest.raises(SecurityError, match="has no password"):
        client_security(pki, password="").check()
    client_security(pki).check()


def test_passwords_are_stored_as_salted_scrypt_hashes() -> None:
    stored = hash_password("s3cret")
    assert "s3cret" not in stored and stored.startswith("scrypt$")
    assert stored != hash_password("s3cret")  # salted
    assert check_password("s3cret", stored)
    assert not check_password("s3cret!", stored)
    assert not check_password("s3cret", "md5$x$y")


# -- the runtime's rules -------------------------------------------------------------------------


def test_runtime_refuses_policy_none_against_real_equipment_unless_insecure_lab(
    secure_scenario: Scenario, dh: Scenario, tmp_path: Path
) -> None:
    with pytest.raises(SecurityError, match=r"\[security.opcua\]"):
        _check_opcua_security(secure_scenario, embedded=False)
    _check_opcua_security(dh, embedded=False)  # insecure_lab: allowed (and loud elsewhere)
    _check_opcua_security(secure_scenario, embedded=True)  # certificates are generated

    client, server = _opcua_security(secure_scenario, True, tmp_path)
    assert client.secure and client.policy == "Basic256Sha256"
    assert server is not None and server.users
    client.check()
    assert (tmp_path / "pki" / "server" / "trusted" / "client.der").exists()
    client, server = _opcua_security(dh, True, tmp_path / "lab")
    assert not client.secure and server is None


def test_scenario_security_opcua_table(
    tmp_path: Path, pki: LabPki, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = lab_text().replace(
        "insecure_lab = true",
        "insecure_lab = false\n\n[security.opcua]\n"
        'policy = "Aes256_Sha256_RsaPss"\n'
        f'certificate = "{os.path.relpath(pki.client.certificate, tmp_path)}"\n'
        f'private_key = "{pki.client.private_key}"\n'
        f'trusted = "{pki.client_trusted}"\n'
        'username = "operator"\npassword_env = "PC_TEST_OPCUA_PASSWORD"\n',
    )
    scenario = parse_scenario(text, tmp_path / "s.toml")
    with pytest.raises(SecurityError, match="PC_TEST_OPCUA_PASSWORD"):
        ClientSecurity.from_scenario(scenario)
    monkeypatch.setenv("PC_TEST_OPCUA_PASSWORD", "pw")
    sec = ClientSecurity.from_scenario(scenario)
    assert sec.policy == "Aes256_Sha256_RsaPss" and sec.password == "pw"
    assert sec.certificate == tmp_path / os.path.relpath(pki.client.certificate, tmp_path)
    sec.check()
    _check_opcua_security(scenario, embedded=False)

    bad = text.replace('password_env = "PC_TEST_OPCUA_PASSWORD"\n', 'password = "inline"\n')
    with pytest.raises(Exception, match=r"security.opcua.password: unknown key"):
        parse_scenario(bad, tmp_path / "bad.toml")
