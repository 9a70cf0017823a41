"""The README's "Try the field side on one machine", command by command, as a user runs it.

The commands are read from the README's code block, so the two cannot drift: the
certificates and keys are made by the CLI, ``parallelcity field`` and ``parallelcity
gateway`` run as processes beside each other on 127.0.0.1 (free ports replace 4840 and
5555), ``browse`` and ``run --field ... --gateway ... --cycles 2`` must exit 0 with what
the README says they show, and SIGTERM ends the field and the gateway with exit code 0.
"""

from __future__ import annotations

import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from parallelcity.hil.field import free_port

from .conftest import ROOT

SECTION = "## Try the field side on one machine"
SERVERS = {"field": "serving opc.tcp://", "gateway": "serving on tcp://"}


def readme_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert SECTION in text, "the README lost its field walkthrough"
    block = re.search(r"```sh\n(.*?)```", text[text.index(SECTION) :], re.S)
    assert block is not None
    return [shlex.split(line, comments=True) for line in block.group(1).splitlines() if line]


class Server:
    """A long-running CLI process whose output lines are collected."""

    def __init__(self, argv: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.append(line)
            self.lines.put(line)

    def wait_for(self, text: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if text in self.lines.get(timeout=0.5):
                    return
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
        raise AssertionError(f"no line with {text!r}; output:\n{''.join(self.log)}")

    def stop(self, timeout_s: float) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running; output:\n{''.join(self.log)}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.mark.slow
def test_the_readme_field_walkthrough_runs_as_written(tmp_path: Path) -> None:
    commands = readme_commands()
    assert [c[1] for c in commands if c[0] == "parallelcity"] == [
        "certs",
        "keys",
        "field",
        "browse",
        "gateway",
        "run",
    ]
    ports = {"4840": str(free_port()), "5555": str(free_port())}

    def local(text: str) -> str:
        if text in ports:  # --port 4840
            return ports[text]
        for old, new in ports.items():
            text = text.replace(f"127.0.0.1:{old}", f"127.0.0.1:{new}")
        return text

    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    servers: dict[str, Server] = {}
    outputs: dict[str, str] = {}
    try:
        for argv in commands:
            if argv[:2] == ["cp", "-r"]:
                shutil.copytree(ROOT / argv[2], tmp_path / argv[3])
                for conf in (tmp_path / argv[3]).glob("*.toml"):
                    conf.write_text(local(conf.read_text()))
                continue
            assert argv[0] == "parallelcity", argv
            args = [local(a) for a in argv[1:]]
            cli = [sys.executable, "-m", "parallelcity", *args]
            if args[0] in SERVERS:
                servers[args[0]] = server = Server(cli, tmp_path, env)
                server.wait_for(SERVERS[args[0]], timeout_s=60)
                continue
            done = subprocess.run(
                cli, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
            )
            outputs[args[0]] = done.stdout + done.stderr
            assert done.returncode == 0, f"{argv}: exit {done.returncode}\n{outputs[args[0]]}"
            assert "Traceback" not in outputs[args[0]]
        field_log = "".join(servers["field"].log)
        assert "Basic256Sha256_SignAndEncrypt" in field_log
        assert "s=dh/plant/T_supply_set  input (Double, writable)" in field_log
        assert "parallelcity browse opc.tcp://" in field_log  # what to do next
        assert 'node = "s=dh/apartment/T_zone"' in outputs["browse"]
        assert "commands          2 sent, 2 acked" in outputs["run"]
        assert "user certificate" in "".join(servers["gateway"].log)
        for name in ("gateway", "field"):
            assert servers.pop(name).stop(timeout_s=30) == 0, name
    finally:
        for server in servers.values():
            server.kill()
