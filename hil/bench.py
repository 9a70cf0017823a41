"""The ``bench`` rig kind: a rig in another process reached over OPC UA, like a physical HIL bench.

Two halves:

* ``BenchServer`` wraps any rig driver (behind its own ``RigMachine``) in an
  asyncua server.  Address space, in the namespace ``BENCH_NS``::

      Bench/
        InputNames, DisturbanceNames, OutputNames, StateNames   String[]  (signal order)
        Samples                                                 Int32
        StepCount                                               UInt32    (advances so far)
        RigState                                                String    (idle/armed/...)
        Outputs/<output name>                                   Double    (after every call)
        Reset(x0 Double[], t0 Double, sample Int32)
        Apply(u Double[], d Double[])
        Advance(dt Double, step UInt32) -> UInt32               the step handshake
        Finish()

  The bench never advances on its own: only ``Advance`` moves it, and only when
  the caller names the step count it expects to leave (a repeated or stale
  request is refused with BadInvalidState), so a retried call can never advance
  the bench twice.  Outputs are refreshed after every call.

* ``BenchDriver`` is the client: a rig driver whose calls are those methods.
  Signals are mapped by name from the bench's name lists, so the bench may
  order (or lack) signals differently from the model; a model input the bench
  lacks is an error at connect, an output it lacks reads as NaN.

``python -m parallelcity.hil.bench SCENARIO [--rig KIND] [--port N]`` serves the scenario's
rig (or ``KIND`` with its defaults) on 127.0.0.1 and prints its endpoint.

Only OPC UA without security is implemented here, so both halves refuse to run
unless told ``insecure_lab`` (the scenario's for the server, the rig config's for
the client) and then log a warning.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import sys
import threading
from typing import Any

import numpy as np
from asyncua import ua
from asyncua.common.methods import uamethod
from asyncua.server.server import Server
from asyncua.ua.status_codes import StatusCodes
from asyncua.ua.uaerrors import UaStatusCodeError
from pydantic import BaseModel, ConfigDict, Field

from parallelcity.errors import PluginError, RigError, ScenarioError, SecurityError
from parallelcity.twin.model import Array, SubsystemModel
from parallelcity.verify.machine import RigMachine
from parallelcity.verify.rig import DrivenRigKind, RigDriver

log = logging.getLogger(__name__)

BENCH_NS = "urn:parallelcity:hil-bench"
INSECURE = (
    "INSECURE LAB MODE: HIL bench over OPC UA without encryption or authentication "
    "(insecure_lab = true). Never expose a bench this way outside a lab."
)


class Config(BaseModel):
    """``[rig]`` section of a scenario with ``kind = "bench"``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: str = "bench"
    endpoint: str = Field(description="the bench's OPC UA endpoint, opc.tcp://HOST:PORT")
    timeout_s: float = Field(10.0, gt=0, description="per request")
    insecure_lab: bool = Field(
        False, description="talk to the bench without OPC UA security (lab only)"
    )


def _invalid_state() -> UaStatusCodeError:
    """The status a refused bench call answers with (asyncua leaves this constructor untyped)."""
    return UaStatusCodeError(StatusCodes.BadInvalidState)  # type: ignore[no-untyped-call]


def _nid(ns: int, name: str) -> ua.NodeId:
    return ua.NodeId(ua.String(f"bench/{name}"), ua.Int16(ns))


class BenchServer:
    """A rig driver served over OPC UA with a step handshake (runs in an asyncio loop)."""

    def __init__(
        self,
        driver: RigDriver,
        model: SubsystemModel,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        insecure_lab: bool = False,
    ) -> None:
        if not insecure_lab:
            raise SecurityError(
                "the HIL bench server only speaks OPC UA without security; it starts only "
                "for a scenario with [security] insecure_lab = true"
            )
        self.rig = RigMachine(driver, use_trace=False)
        self.model = model
        self.host, self.port = host, port
        self._server: Server | None = None
        self._step = 0
        self._outputs: list[Any] = []
        self._lock = asyncio.Lock()

    @property
    def endpoint(self) -> str:
        return f"opc.tcp://{self.host}:{self.port}"

    async def start(self) -> None:
        log.warning(INSECURE)
        if self.port == 0:
            from .field import free_port

            self.port = free_port(self.host)
        server = Server()
        await server.init()
        server.disable_clock()
        server.set_endpoint(self.endpoint)
        server.set_server_name(f"parallelcity HIL bench ({self.rig.name})")
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        ns = await server.register_namespace(BENCH_NS)
        bench = await server.nodes.objects.add_object(_nid(ns, "Bench"), "Bench")
        m = self.model
        for label, names in (
            ("InputNames", m.inputs),
            ("DisturbanceNames", m.disturbances),
            ("OutputNames", m.outputs),
            ("StateNames", m.states),
        ):
            await bench.add_variable(
                _nid(ns, label), label, ua.Variant(list(names), ua.VariantType.String)
            )
        await bench.add_variable(
            _nid(ns, "Samples"), "Samples", ua.Variant(self.rig.samples, ua.VariantType.Int32)
        )
        self._step_var = await bench.add_variable(
            _nid(ns, "StepCount"), "StepCount", ua.Variant(0, ua.VariantType.UInt32)
        )
        self._state_var = await bench.add_variable(
            _nid(ns, "RigState"), "RigState", ua.Variant("idle", ua.VariantType.String)
        )
        folder = await bench.add_folder(_nid(ns, "Outputs"), "Outputs")
        self._outputs = [
            await folder.add_variable(
                _nid(ns, f"Outputs/{name}"), name, ua.Variant(math.nan, ua.VariantType.Double)
            )
            for name in m.outputs
        ]
        dbl, arr = ua.VariantType.Double, ua.VariantType.Double
        await bench.add_method(
            _nid(ns, "Reset"), "Reset", uamethod(self._reset), [arr, dbl, ua.VariantType.Int32], []
        )
        await bench.add_method(_nid(ns, "Apply"), "Apply", uamethod(self._apply), [arr, arr], [])
        await bench.add_method(
            _nid(ns, "Advance"),
            "Advance",
            uamethod(self._advance),
            [dbl, ua.VariantType.UInt32],
            [ua.VariantType.UInt32],
        )
        await bench.add_method(_nid(ns, "Finish"), "Finish", uamethod(self._finish), [], [])
        await server.start()
        self._server = server
        log.info("HIL bench %s listening on %s", self.rig.name, self.endpoint)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            with contextlib.suppress(Exception):
                await server.stop()
        self.rig.close()

    async def __aenter__(self) -> BenchServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _publish(self) -> None:
        try:
            y = self.rig.read()
        except RigError:
            y = np.full(self.model.ny, np.nan)
        for node, v in zip(self._outputs, y, strict=True):
            await node.write_value(ua.Variant(float(v), ua.VariantType.Double))
        await self._state_var.write_value(ua.Variant(self.rig.state.value, ua.VariantType.String))
        await self._step_var.write_value(ua.Variant(self._step, ua.VariantType.UInt32))

    async def _call(self, what: str, fn: Any, *args: Any) -> Any:
        async with self._lock:
            try:
                result = fn(*args)
            except RigError as exc:
                log.warning("bench %s refused: %s", what, exc)
                await self._state_var.write_value(
                    ua.Variant(self.rig.state.value, ua.VariantType.String)
                )
                raise _invalid_state() from exc
            await self._publish()
            return result

    async def _reset(self, parent: Any, x0: list[float], t0: float, sample: int) -> None:
        def go() -> None:
            if self.rig.state.value in ("armed", "running"):
                self.rig.finish()
            elif self.rig.state.value == "faulted":
                self.rig.recover()
            self.rig.arm(np.array(x0, dtype=float), float(t0), int(sample))

        await self._call("reset", go)

    async def _apply(self, parent: Any, u: list[float], d: list[float]) -> None:
        await self._call("apply", self.rig.apply, np.array(u), np.array(d))

    async def _advance(self, parent: Any, dt: float, step: int) -> int:
        if int(step) != self._step:
            log.warning("bench advance refused: expected step %d, asked from %d", self._step, step)
            raise _invalid_state()

        def go() -> int:
            self.rig.advance(float(dt))
            self._step += 1
            return self._step

        result: int = await self._call("advance", go)
        return result

    async def _finish(self, parent: Any) -> None:
        await self._call("finish", self.rig.finish)


class BenchDriver:
    """Rig driver for a bench reached over OPC UA (a synchronous asyncua client)."""

    def __init__(self, cfg: Config, model: SubsystemModel) -> None:
        from asyncua.sync import Client, ThreadLoop

        if not cfg.insecure_lab:
            raise SecurityError(
                f"rig bench at {cfg.endpoint}: only OPC UA without security is implemented; "
                "set insecure_lab = true in [rig] for a lab bench"
            )
        log.warning(INSECURE)
        self.model = model
        self.name = f"bench({cfg.endpoint})"
        # the client's event loop runs in this thread: a daemon, so it can never keep the
        # interpreter alive, and stopped by close(); every call waits at most that long
        self._tloop = ThreadLoop(timeout=2 * cfg.timeout_s + 1.0)
        self._tloop.daemon = True
        self._tloop.start()
        try:
            self._client = Client(cfg.endpoint, timeout=cfg.timeout_s, tloop=self._tloop)
            self._client.connect()
        except Exception as exc:
            self._stop_loop()
            raise RigError(f"cannot reach the bench at {cfg.endpoint}: {exc}") from exc
        except BaseException:
            self._stop_loop()
            raise
        try:
            self._bind()
        except BaseException:
            self.close()
            raise

    def _bind(self) -> None:
        c, m = self._client, self.model
        ns = c.get_namespace_index(BENCH_NS)
        self._bench = c.get_node(_nid(ns, "Bench"))
        names = {
            label: list(c.get_node(_nid(ns, label)).read_value())
            for label in ("InputNames", "DisturbanceNames", "OutputNames", "StateNames")
        }
        missing = [n for n in m.inputs if n not in names["InputNames"]]
        if missing:
            raise RigError(f"{self.name}: the bench has no input {', '.join(missing)}")
        self._inputs = [m.inputs.index(n) for n in names["InputNames"] if n in m.inputs]
        self._n_inputs = len(names["InputNames"])
        if len(self._inputs) != self._n_inputs:
            raise RigError(f"{self.name}: the bench has inputs the model lacks")
        self._dist = [
            m.disturbances.index(n) if n in m.disturbances else -1
            for n in names["DisturbanceNames"]
        ]
        self._states = [m.states.index(n) if n in m.states else -1 for n in names["StateNames"]]
        self._outputs = [(m.outputs.index(n), n) for n in names["OutputNames"] if n in m.outputs]
        self._output_nodes = [c.get_node(_nid(ns, f"Outputs/{n}")) for _, n in self._outputs]
        self._samples = int(c.get_node(_nid(ns, "Samples")).read_value())
        self._step = int(c.get_node(_nid(ns, "StepCount")).read_value())
        self._ids = {k: _nid(ns, k) for k in ("Reset", "Apply", "Advance", "Finish")}

    @property
    def samples(self) -> int:
        return self._samples

    def _method(self, name: str, *args: Any) -> Any:
        try:
            return self._bench.call_method(self._ids[name], *args)
        except Exception as exc:
            raise RigError(f"{self.name}: {name} failed: {exc}") from exc

    def reset(self, x0: Array, t0: float, sample: int) -> None:
        x = [float(x0[i]) if i >= 0 else math.nan for i in self._states]
        self._method(
            "Reset",
            ua.Variant(x, ua.VariantType.Double),
            ua.Variant(float(t0), ua.VariantType.Double),
            ua.Variant(int(sample), ua.VariantType.Int32),
        )

    def apply(self, u: Array, d: Array) -> None:
        ub = [float(u[i]) for i in self._inputs]
        db = [float(d[i]) if i >= 0 else math.nan for i in self._dist]
        self._method(
            "Apply", ua.Variant(ub, ua.VariantType.Double), ua.Variant(db, ua.VariantType.Double)
        )

    def advance(self, dt: float) -> None:
        new = self._method(
            "Advance",
            ua.Variant(float(dt), ua.VariantType.Double),
            ua.Variant(self._step, ua.VariantType.UInt32),
        )
        if int(new) != self._step + 1:
            raise RigError(f"{self.name}: handshake broken: step {self._step} -> {new}")
        self._step = int(new)

    def read(self) -> Array:
        y = np.full(self.model.ny, np.nan)
        values = self._client.read_values(self._output_nodes)
        for (i, _), v in zip(self._outputs, values, strict=True):
            y[i] = float(v)
        return y

    def close(self) -> None:
        try:
            with contextlib.suppress(Exception):
                self._client.disconnect()
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        if self._tloop.is_alive():
            self._tloop.stop()


class _Kind:
    """Entry point object for ``kind = "bench"`` (``parallelcity.rigs``)."""

    Config = Config

    @staticmethod
    def check(config: BaseModel, model: SubsystemModel) -> list[str]:
        return []  # the bench checks its variables against the model when it connects

    @staticmethod
    def driver(config: BaseModel, model: SubsystemModel) -> BenchDriver:
        if not isinstance(config, Config):
            raise TypeError(f"expected a bench rig Config, got {type(config).__name__}")
        return BenchDriver(config, model)

    @staticmethod
    def verification_rig(config: BaseModel, model: SubsystemModel) -> RigMachine:
        return RigMachine(_Kind.driver(config, model))

    @staticmethod
    def field_stand_in(config: BaseModel, scenario: Any, clock: Any) -> Any:
        raise ValueError("rig kind 'bench' verifies plans but cannot stand in for the field")


KIND = _Kind()


# -- the bench process ------------------------------------------------------------------------


async def serve(
    scenario_path: str,
    rig_kind: str | None,
    port: int,
    ready: threading.Event | None = None,
) -> None:
    """Serve the scenario's rig driver as a bench until cancelled; prints the endpoint."""
    from parallelcity import plugins
    from parallelcity.scenario.definition import load_scenario

    scenario = load_scenario(scenario_path)
    kind_name = rig_kind or scenario.file.rig.kind
    kind = plugins.rig_kind(kind_name)
    if not isinstance(kind, DrivenRigKind):
        raise PluginError(f"rig kind {kind_name!r} has no driver a bench can serve")
    cfg = (
        scenario.rig_config
        if kind_name == scenario.file.rig.kind
        else kind.Config.model_validate({})
    )
    driver = kind.driver(cfg, scenario.model)
    async with BenchServer(
        driver, scenario.model, port=port, insecure_lab=scenario.insecure_lab
    ) as bench:
        print(f"bench listening on {bench.endpoint}", flush=True)
        if ready is not None:
            ready.set()
        await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m parallelcity.hil.bench", description=__doc__.split("\n")[0]
    )
    p.add_argument("scenario")
    p.add_argument("--rig", help="rig kind to serve (default: the scenario's)")
    p.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (default: free)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("asyncua").setLevel(logging.ERROR)
    try:
        asyncio.run(serve(args.scenario, args.rig, args.port))
    except KeyboardInterrupt:
        return 0
    except SecurityError as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 4
    except (ScenarioError, PluginError) as exc:
        print(exc, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
