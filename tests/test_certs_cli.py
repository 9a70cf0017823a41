"""``parallelcity certs DIR`` in its own process: never replaces keys silently, keys 0600 always."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from parallelcity.field.opcua.certs import lab_pki_files, load_certificate

from .conftest import ROOT

EXIT_USAGE = 2
KEYS = ("client/own/client.key.pem", "server/own/server.key.pem", "user/own/user.key.pem")


def certs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "parallelcity", "certs", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_a_fresh_folder_gets_owner_only_keys(tmp_path: Path) -> None:
    out = certs(str(tmp_path / "pki"))
    assert out.returncode == 0, out.stderr
    for path in lab_pki_files(tmp_path / "pki"):
        assert path.is_file(), path
    for key in KEYS:
        assert mode(tmp_path / "pki" / key) == 0o600, key


def test_a_folder_with_keys_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    assert certs(str(pki)).returncode == 0
    before = {p: p.read_bytes() for p in lab_pki_files(pki)}

    out = certs(str(pki))
    assert out.returncode == EXIT_USAGE, (out.stdout, out.stderr)
    assert "already holds certificates or keys" in out.stderr
    assert str(pki / KEYS[0]) in out.stderr and "--force" in out.stderr
    assert {p: p.read_bytes() for p in lab_pki_files(pki)} == before


def test_one_existing_file_is_enough_to_refuse(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    lone = pki / "server" / "trusted" / "client.der"
    lone.parent.mkdir(parents=True)
    lone.write_bytes(b"someone's certificate")
    out = certs(str(pki))
    assert out.returncode == EXIT_USAGE
    assert str(lone) in out.stderr
    assert lone.read_bytes() == b"someone's certificate"
    assert not (pki / KEYS[0]).exists()


def test_force_replaces_keys_that_others_could_read_with_owner_only_ones(
    tmp_path: Path,
) -> None:
    pki = tmp_path / "pki"
    assert certs(str(pki)).returncode == 0
    old = {key: (pki / key).read_bytes() for key in KEYS}
    old_cert = (pki / "server/own/server.der").read_bytes()
    for key in KEYS:
        (pki / key).chmod(0o644)  # a folder made by hand, or by an older version
    # a key that is a symlink elsewhere: the link is replaced, its target left alone
    elsewhere = tmp_path / "elsewhere.pem"
    elsewhere.write_bytes(b"not ours")
    (pki / KEYS[2]).unlink()
    (pki / KEYS[2]).symlink_to(elsewhere)

    out = certs(str(pki), "--force")
    assert out.returncode == 0, out.stderr
    for key in KEYS:
        path = pki / key
        assert not path.is_symlink()
        assert mode(path) == 0o600, (key, oct(mode(path)))
        assert path.read_bytes() != old[key]
    assert elsewhere.read_bytes() == b"not ours"
    assert (pki / "server/own/server.der").read_bytes() != old_cert
    load_certificate(pki / "client/trusted/server.der")  # the trust copies follow
    assert (pki / "client/trusted/server.der").read_bytes() == (
        pki / "server/own/server.der"
    ).read_bytes()
    assert not [p for p in pki.rglob("*.tmp")]
