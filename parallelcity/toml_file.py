"""TOML files users bring (scenarios, gateway configs, rig configs), read with bounds.

Every failure is a ``ValueError`` whose text says what is wrong, for the caller to
report under the file's name: too large, binary, not UTF-8, not TOML, nested too deeply.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

MAX_FILE_BYTES = 1 << 20


def read_text_bounded(path: Path, limit: int = MAX_FILE_BYTES) -> str:
    """A UTF-8 text file of at most ``limit`` bytes.  Reads at most ``limit + 1`` bytes, so
    /dev/zero or a huge file cannot hold it up; ``OSError`` when it cannot be read."""
    with path.open("rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"file is larger than {_size(limit)}")
    nul = data.find(b"\0")
    if nul >= 0:
        raise ValueError(f"binary data, not text: a NUL byte at byte offset {nul}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text: {exc.reason} at byte offset {exc.start}") from None


def parse_toml(text: str) -> dict[str, Any]:
    """TOML text as tables; the parser's recursion limit becomes a plain error."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"not valid TOML: {exc}") from None
    except RecursionError:
        raise ValueError("not valid TOML: arrays or tables are nested too deeply") from None


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n % (1 << 20) == 0 else f"{n} bytes"
