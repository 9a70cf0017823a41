"""One atheris run of one target: ``python -m fuzz.worker TARGET FINDINGS_DIR [libFuzzer args]``.

Undeclared exceptions are findings: each new one (by exception type and the line that
raised it) is saved with its input and traceback, and the run goes on to its count.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import sys
import traceback
from pathlib import Path

import atheris

from .targets import Target, targets


def _signature(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    where = f"{tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno}" if tb else "?"
    return f"{type(exc).__name__} at {where}"


def main() -> None:
    name, findings_dir, *fuzzer_args = sys.argv[1:]
    target: Target = targets()[name]
    with atheris.instrument_imports(include=["parallelcity", "tomllib"]):
        importlib.import_module("tomllib")
        for module in target.modules:
            importlib.import_module(module)
    logging.disable(logging.CRITICAL)  # refused handshakes and configs log on purpose
    out = Path(findings_dir)
    out.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()

    def one(data: bytes) -> None:
        try:
            target.body(data)
        except target.allowed:
            pass
        except Exception as exc:
            sig = _signature(exc)
            if sig in seen:
                return
            seen.add(sig)
            stem = f"{name}-{hashlib.sha1(sig.encode()).hexdigest()[:12]}"
            (out / f"{stem}.bin").write_bytes(data)
            (out / f"{stem}.txt").write_text(f"{sig}\n\n{traceback.format_exc()}")
            print(f"FINDING {name}: {sig} ({stem}.bin)", file=sys.stderr, flush=True)

    atheris.Setup([sys.argv[0], *fuzzer_args], one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
