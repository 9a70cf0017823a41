"""CURVE key pairs for the dispatcher <-> gateway link: make, write, read.

A key is 32 bytes, written as 40 characters of Z85 (ZeroMQ's base-85).  On
disk a pair is two text files, one key per file plus a newline:

* ``NAME.public``: the public key, mode 0644; give it to the other side;
* ``NAME.secret``: the secret key, mode 0600, created exclusively so an
  existing secret is never overwritten; the reader refuses a secret file that
  the group or others may read.

The public key is always derivable from the secret one (``curve_public``), so
a secret file alone is enough to run; the public file is what an allow-list
names.  File I/O on top of libzmq's key functions (an I/O shell); no sockets here.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import zmq

from parallelcity.errors import SecurityError

PUBLIC_SUFFIX = ".public"
SECRET_SUFFIX = ".secret"
_Z85 = re.compile(r"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")


@dataclass(frozen=True, repr=False)
class KeyPair:
    """A CURVE key pair, both keys as 40-byte Z85."""

    public: bytes
    secret: bytes

    def __repr__(self) -> str:  # never print a secret key
        return f"KeyPair(public={self.public.decode()!r}, secret=<hidden>)"

    @classmethod
    def generate(cls) -> KeyPair:
        if not zmq.has("curve"):
            raise SecurityError("this libzmq was built without CURVE support")
        public, secret = zmq.curve_keypair()
        return cls(public, secret)

    @classmethod
    def from_secret(cls, secret: bytes) -> KeyPair:
        secret = check_z85(secret, "secret key")
        try:
            public = zmq.curve_public(secret)
        except zmq.ZMQError as exc:
            raise SecurityError(f"not a CURVE secret key: {exc}") from exc
        return cls(public, secret)


def check_z85(key: bytes | str, what: str = "key") -> bytes:
    """``key`` as 40 Z85 bytes, or ``SecurityError`` saying why it is not a CURVE key."""
    text = key.decode("ascii", "replace") if isinstance(key, bytes) else key
    text = text.strip()
    if not _Z85.fullmatch(text):
        raise SecurityError(
            f"{what} is not a CURVE key: expected 40 Z85 characters, got {len(text)} characters"
        )
    return text.encode("ascii")


def key_paths(folder: Path, name: str) -> tuple[Path, Path]:
    """``(public, secret)`` file paths of the key pair ``name`` in ``folder``."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"bad key name {name!r}: use letters, digits, '-' or '_'")
    return folder / f"{name}{PUBLIC_SUFFIX}", folder / f"{name}{SECRET_SUFFIX}"


def write_keypair(folder: Path, name: str, pair: KeyPair | None = None) -> tuple[Path, Path]:
    """Write a (new) key pair as ``NAME.public`` and ``NAME.secret`` (0600) in ``folder``.

    Refuses (``SecurityError``) to overwrite an existing secret file.
    """
    pair = pair if pair is not None else KeyPair.generate()
    public_path, secret_path = key_paths(folder, name)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise SecurityError(f"{secret_path} exists; not overwriting a secret key") from exc
    except OSError as exc:
        raise SecurityError(f"cannot create {secret_path}: {exc.strerror or exc}") from exc
    try:
        os.fchmod(fd, 0o600)  # in case the umask or the filesystem widened it
        os.write(fd, pair.secret + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        public_path.write_bytes(pair.public + b"\n")
        public_path.chmod(0o644)
    except OSError as exc:
        raise SecurityError(f"cannot write {public_path}: {exc.strerror or exc}") from exc
    return public_path, secret_path


def read_public_key(path: Path) -> bytes:
    """The Z85 public key in ``path`` (``SecurityError`` if unreadable or not a key)."""
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise SecurityError(f"cannot read public key {path}: {exc.strerror or exc}") from exc
    return check_z85(text, f"public key file {path}")


def check_owner_only(path: Path, what: str = "secret key") -> None:
    """``SecurityError`` if the key file ``path`` is missing or the group or others may
    access it (the message says which chmod fixes it).  Used for every private key."""
    try:
        st = path.stat()
    except OSError as exc:
        raise SecurityError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecurityError(
            f"{what} {path} is accessible by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}"
        )


def read_secret_key(path: Path) -> KeyPair:
    """The key pair from the secret file ``path``; refuses a file others may read."""
    check_owner_only(path)
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise SecurityError(f"cannot read secret key {path}: {exc.strerror or exc}") from exc
    return KeyPair.from_secret(check_z85(text, f"secret key file {path}"))
