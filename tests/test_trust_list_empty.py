"""An empty trust list refuses every peer (asyncua skips a validator that is falsy).

Found while testing the stand-alone gateway: ``TrustList`` had ``__len__``, so
an empty one was falsy, and asyncua's ``if validator:`` then skipped validation
altogether - on the client (any server accepted) and on the server (any client
accepted).  Both sides are shown here against real asyncua endpoints.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from asyncua import Server
from parallelcity.hil.field import free_port

from parallelcity.errors import SecurityError
from parallelcity.field.opcua.certs import make_lab_pki
from parallelcity.field.opcua.session import (
    ClientSecurity,
    ServerSecurity,
    TrustList,
    configure_server,
    connect_client,
    hash_password,
)


def test_an_empty_trust_list_is_still_a_validator(tmp_path: Path) -> None:
    empty = TrustList(tmp_path)
    assert len(empty) == 0 and bool(empty)


@pytest.mark.slow
@pytest.mark.parametrize("side", ["client", "server"])
def test_an_empty_trust_list_refuses_the_peer(tmp_path: Path, side: str) -> None:
    pki = make_lab_pki(tmp_path / "pki")
    empty = tmp_path / "empty"
    empty.mkdir()
    password = "pw-" + side

    async def body() -> None:
        server = Server()
        await server.init()
        server.disable_clock()
        await configure_server(
            server,
            ServerSecurity(
                pki.server.certificate,
                pki.server.private_key,
                empty if side == "server" else pki.server_trusted,
                users={"u": hash_password(password)},
            ),
        )
        endpoint = f"opc.tcp://127.0.0.1:{free_port()}"
        server.set_endpoint(endpoint)
        await server.start()
        try:
            sec = ClientSecurity(
                "Basic256Sha256",
                pki.client.certificate,
                pki.client.private_key,
                empty if side == "client" else pki.client_trusted,
                username="u",
                password=password,
            )
            with pytest.raises(SecurityError) as info:
                client = await connect_client(endpoint, sec, timeout_s=5.0)
                await client.disconnect()
            if side == "client":
                assert "presented a certificate we do not trust" in str(info.value)
            else:
                assert str(pki.client.certificate) in str(info.value)
        finally:
            await server.stop()

    async def bounded() -> None:
        async with asyncio.timeout(60.0):
            await body()

    asyncio.run(bounded())
