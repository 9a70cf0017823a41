"""SUMO as the plant of a signalised network: one ``sumo`` process per plant, stepped through
TraCI, behind the ``Simulator`` protocol (``parallelcity.twin.model``).

* Time: SUMO second ``s`` is scenario time ``begin + s`` (epoch seconds).
* Demand: SUMO's own route files (the ``.sumocfg``), scaled by the parameter
  ``demand.scale`` (``--scale``).  The arrival disturbance ``d`` the twin forecasts is not
  fed in: the route file is the demand truth.
* Drivers: ``driver.sigma`` and ``driver.tau`` set the default vehicle type (and every type
  the routes define, when the plant starts or loads a state).
* Random seed: derived from the whole parameter vector and ``PlantConfig.seed``, so every
  parameter draw runs its own reproducible traffic.
* Signals: each junction's ``SignalController`` (pure) decides every cycle; the plant
  installs it as a fixed-time program at the cycle boundary (one ``setProgramLogic`` a
  junction a cycle), or hands the junction back to its own actuated program.
* Measurements: queue = halting vehicles on the approach's edges (all lanes), sampled every
  ``probe_s``; flow = vehicles over stop-line induction loops the plant adds on every
  approach lane (veh/h over the last step); occupancy = the edge's occupancy averaged over
  the probes of the last step (%); ``network.teleports`` = teleports since the last reset.
* Signal state (measured only: the field serves it, the queue model does not predict it):
  ``<tls>.phase`` = index of the program phase the junction shows, ``<tls>.cycle_second``
  = seconds since its current cycle began (``junction_points``).
* Verification samples (``reset`` again after running): the plant loads the state it saved
  one step after its previous reset, runs on to ``t0`` if needed, starts a fresh cycle on
  every junction, then adds or removes standing vehicles on each approach to match ``x0``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import math
import os
import re
import shutil
import subprocess
import tempfile
import weakref
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import Any

import numpy as np

from parallelcity.twin.model import Array

from .network import QUEUED, TELEPORTS, Network, signal_names
from .signal_controller import CycleProgram, SignalController

log = logging.getLogger(__name__)

GLOBAL_PARAMETERS = ("demand.scale", "driver.sigma", "driver.tau")
NOMINAL = {"demand.scale": 1.0, "driver.sigma": 0.5, "driver.tau": 1.0}
PLAN_PROGRAM = "parallelcity"  # program id of the plans the plant installs
STOP_LINE_GAP_M = 1.0  # loops this far before the stop line
LOOP_FREQ_S = 10_000_000  # one detector interval for the whole run: counts are cumulative
JAM_SPACING_M = 7.5
HALTING_MPS = 0.1  # SUMO's halting speed
MAX_CATCH_UP_S = 3600.0  # a verification reset further than this past the saved state restarts
_labels = count()
PHASE = "phase"
CYCLE_SECOND = "cycle_second"


def junction_points(network: Network) -> tuple[str, ...]:
    """The measured-only signals of the junctions: running phase and cycle second of each."""
    return tuple(f"{j.tls}.{p}" for j in network.junctions for p in (PHASE, CYCLE_SECOND))


@dataclass(frozen=True)
class PlantConfig:
    """What a SUMO plant needs besides the network and its parameters."""

    sumocfg: Path  # absolute: net + routes (+ the scenario's own detectors)
    begin: float  # scenario epoch seconds of SUMO second 0
    seed: int = 0
    parameters: tuple[str, ...] = GLOBAL_PARAMETERS  # the model's parameter names, in order
    outputs: tuple[str, ...] | None = None  # None: signal_names(network)["outputs"]
    max_cycle_s: float = 120.0
    probe_s: float = 5.0  # measurement period (queues, occupancy, loop counts, teleports)
    window_s: float = 90.0  # flow and occupancy are averaged over this much of the past
    time_to_teleport_s: float = 300.0
    gap_out_s: float = 0.0  # > 0: coordinated-actuated (signal_controller); loops' gap, s
    sumo_binary: str | None = None  # None: the eclipse-sumo package's
    extra_args: tuple[str, ...] = field(default_factory=tuple)


@dataclass
class Received:
    """Inputs as the plant received them (what reached the field)."""

    t: float
    u: Array


def plant_factory(network: Network, config: Any) -> Callable[[Array], SumoPlant]:
    """``params -> SumoPlant``: the ``SubsystemModel.simulator`` of a signal_corridor model.
    ``config`` is a ``PlantConfig`` or the model kind's ``[model]`` table (``sumocfg``
    resolved, ``begin`` a datetime, ``seed``)."""
    cfg = config if isinstance(config, PlantConfig) else plant_config(network, config)

    def make(params: Array) -> SumoPlant:
        return SumoPlant(network, cfg, params)

    return make


def plant_config(network: Network, model_config: Any) -> PlantConfig:
    """The plant's configuration from a signal_corridor ``[model]`` table."""
    begin = model_config.begin
    names = signal_names(network)
    parameters = names.get("parameters") or (
        *(f"{a.edge}.{p}" for a in network.approaches for p in ("saturation", "storage")),
        *GLOBAL_PARAMETERS,
    )
    return PlantConfig(
        sumocfg=Path(model_config.sumocfg),
        begin=begin.timestamp() if hasattr(begin, "timestamp") else float(begin),
        seed=int(getattr(model_config, "seed", 0)),
        parameters=tuple(parameters),
        gap_out_s=float(getattr(model_config, "gap_out_s", 0.0)),
    )


def sumo_binary() -> str:
    import sumolib

    return str(sumolib.checkBinary("sumo"))


def derived_seed(params: Array, seed: int) -> int:
    """SUMO's random seed for one parameter draw: stable across runs and platforms."""
    digest = hashlib.sha256(np.asarray(params, dtype="<f8").tobytes() + str(seed).encode())
    return int.from_bytes(digest.digest()[:4], "little") & 0x7FFFFFFF


def config_additionals(sumocfg: Path) -> list[str]:
    """The ``additional-files`` a ``.sumocfg`` names, as absolute paths."""
    root = ET.parse(sumocfg).getroot()
    files: list[str] = []
    for el in root.iter("additional-files"):
        for name in re.split(r"[,\s]+", el.get("value", "")):
            if name:
                files.append(str((sumocfg.parent / name).resolve()))
    return files


# elements of additional files that write a file of their own (detectors, mean data)
OUTPUT_ELEMENTS = frozenset(
    {
        "e1Detector",
        "inductionLoop",
        "instantInductionLoop",
        "e2Detector",
        "laneAreaDetector",
        "e3Detector",
        "entryExitDetector",
        "edgeData",
        "laneData",
        "routeProbe",
        "vTypeProbe",
    }
)
NO_FILE = ("NUL", "nul", os.devnull)


def quiet_additionals(files: list[str], folder: Path) -> list[str]:
    """``files`` with the outputs they would write sent to NUL: every SUMO the plant runs
    (the field's and each sample's) would otherwise write the same detector files beside
    the user's own, all at once.  A file that writes none is used as it is; one that does
    is copied into ``folder``, its other relative paths made absolute."""
    out: list[str] = []
    for k, name in enumerate(files):
        src = Path(name)
        try:
            tree = ET.parse(src)
        except (OSError, ET.ParseError):
            out.append(name)  # SUMO says what is wrong with it
            continue
        writers = [
            el
            for el in tree.getroot().iter()
            if el.tag in OUTPUT_ELEMENTS and el.get("file", "NUL") not in NO_FILE
        ]
        if not writers:
            out.append(name)
            continue
        for el in writers:
            el.set("file", "NUL")
        for el in tree.getroot().iter():
            for attr in ("file", "href"):
                value = el.get(attr)
                if value and value not in NO_FILE and not Path(value).is_absolute():
                    el.set(attr, str((src.parent / value).resolve()))
        copy = folder / f"quiet{k}-{src.name}"
        tree.write(copy, encoding="utf-8", xml_declaration=True)
        out.append(str(copy))
    return out


def config_outputs(sumocfg: Path, own: tuple[str, ...] = ("tripinfo-output",)) -> list[str]:
    """Options sending the outputs a ``.sumocfg`` asks for (``summary-output``, ``fcd-output``
    and the like) to NUL, for the reason ``quiet_additionals`` gives; ``own``: the plant's."""
    args: list[str] = []
    for el in ET.parse(sumocfg).getroot().iter():
        tag, value = el.tag, el.get("value")
        if (
            tag.endswith(("-output", "-dump"))
            and tag not in own
            and value not in (None, "", *NO_FILE)
        ):
            args += [f"--{tag}", "NUL"]
    return args


class SumoPlant:
    """One SUMO simulation of the network (see the module docstring)."""

    def __init__(self, network: Network, config: PlantConfig, params: Array) -> None:
        self.network = network
        self.config = config
        self.params = np.asarray(params, dtype=float).reshape(-1)
        if len(self.params) != len(config.parameters):
            raise ValueError(f"{len(self.params)} parameters for {len(config.parameters)} names")
        names = signal_names(network)
        self.inputs = names["inputs"]
        self.outputs_names = config.outputs or names["outputs"]
        self.seed = derived_seed(self.params, config.seed)
        self.scale = self._param("demand.scale")
        self.sigma = self._param("driver.sigma")
        self.tau = self._param("driver.tau")
        self.received: list[Received] = []
        self.cycles: list[tuple[str, CycleProgram]] = []  # installed programs, newest last
        self._dir = Path(tempfile.mkdtemp(prefix="parallelcity-sumo-"))
        self._conn: Any = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._label = f"parallelcity-sumo-{os.getpid()}-{next(_labels)}"
        self._now = 0.0  # SUMO seconds reached (whole steps)
        self._t = 0.0  # SUMO seconds asked for (may lie between steps)
        self._ctrl: dict[str, SignalController] = {}
        self._actuated: dict[str, bool] = {}
        self._phase: dict[str, int | None] = {}  # actuated junctions: phase at the last probe
        self._actuated_since: dict[str, float] = {}  # actuated junctions: last return to phase 0
        self._links: dict[str, list[list[tuple[str, str, str]]]] = {}
        self._loops: dict[str, list[str]] = {}  # approach edge -> its stop-line loops
        self._phase_loops: dict[str, list[set[str]]] = {}  # tls -> per phase, its green loops
        self._halting = np.zeros(len(network.approaches))
        self._edge_weights = {a.edge: a.edge_lane_m for a in network.approaches}
        # probes since the last reset: (SUMO second, loop counts, occupancy %), oldest first
        self._probes: deque[tuple[float, Array, Array]] = deque()
        self._pending_check = False
        self._max_queue = 0.0
        self._teleports0 = 0
        self._teleports = 0
        self._saved: tuple[float, Path] | None = None
        self._routes: set[str] = set()
        self._added = count()
        self._last_u: Array | None = None
        self._write_additionals()

    # -- Simulator protocol ------------------------------------------------------------------

    @property
    def state(self) -> Array:
        return self._halting.copy()

    def reset(self, x0: Array, t0: float) -> None:
        s0 = float(t0) - self.config.begin
        to = math.floor(s0 + 1e-9)
        saved = self._saved
        if self._conn is None:
            self._start(to)
        elif saved is not None and 0 <= to - saved[0] <= MAX_CATCH_UP_S:
            self._conn.simulation.loadState(str(saved[1]))
            self._now = saved[0]
            self._routes.clear()  # routes added after the save are gone
            self._subscribe()  # a loaded state drops subscriptions
            self._set_drivers()
            self._run_to(to)
        else:
            self._kill()
            self._start(to)
        self._t = max(s0, self._now)
        path = self._dir / "state.xml.gz"
        self._keep_routes()
        self._conn.simulation.saveState(str(path))
        self._saved = (self._now, path)
        for tls, ctrl in self._ctrl.items():
            self._install(tls, ctrl.restart_at(self._now))
        self._teleports0 = self._teleports_total()
        self._teleports = 0
        self._probes.clear()
        self._read_probe(direct=True)
        self._match_queues(np.asarray(x0, dtype=float).reshape(-1))
        self._pending_check = True

    def _keep_routes(self) -> None:
        """Make every vehicle's route one the saved state will hold.  With ``--scale`` above
        1, SUMO's copies of a vehicle share its route (``!id`` for a route given inside the
        vehicle); once the original has arrived that route is gone from SUMO's route
        table and the state saved next cannot be loaded ("route '!id' ... is not known").
        Adding it back under its id (same edges) keeps the state loadable."""
        if self.scale <= 1.0:
            return
        conn = self._conn
        known = set(conn.route.getIDList())
        for v in (*conn.vehicle.getIDList(), *conn.simulation.getPendingVehicles()):
            rid = conn.vehicle.getRouteID(v)
            if rid not in known:
                conn.route.add(rid, conn.vehicle.getRoute(v))
                known.add(rid)

    def step(self, u: Array, d: Array, dt: float) -> None:
        if self._conn is None:
            raise RuntimeError("reset() the plant before stepping it")
        u = np.asarray(u, dtype=float).reshape(-1)
        if self._last_u is None or not np.array_equal(u, self._last_u, equal_nan=True):
            self.received.append(Received(self.config.begin + self._t, u.copy()))
            self._last_u = u.copy()
        self._write_plans(u)
        self._t += float(dt)
        self._run_to(math.floor(self._t + 1e-9))
        if self._pending_check and self._now > self._saved_at():
            self._drop_pending()
            self._pending_check = False

    def outputs(self, u: Array, d: Array) -> Array:
        values = {TELEPORTS: float(self._teleports), QUEUED: float(self._halting.sum())}
        flow, occ = self._window()
        for i, a in enumerate(self.network.approaches):
            values[f"{a.edge}.queue"] = float(self._halting[i])
            values[f"{a.edge}.flow"] = float(flow[i])
            values[f"{a.edge}.occupancy"] = float(occ[i])
        return np.array([values.get(n, math.nan) for n in self.outputs_names], dtype=float)

    def measured_only(self) -> dict[str, float]:
        """Each junction's running phase (index in its program) and cycle second, as its
        field-side signal controller has them (an actuated cycle: SUMO's phase, seconds
        since it last returned to phase 0); NaN before the first reset."""
        values: dict[str, float] = {}
        for tls, ctrl in self._ctrl.items():
            phase, second = math.nan, math.nan
            cur = ctrl.current
            if self._conn is not None and cur is not None:
                if cur.actuated:
                    p = self._phase.get(tls)
                    phase = math.nan if p is None else float(p)
                    second = self._now - max(cur.start_s, self._actuated_since.get(tls, -math.inf))
                else:
                    second = self._now - cur.start_s
                    # as SUMO shows it: a phase ending at this second still shows
                    phase = float(cur.phase_at(second))
            values[f"{tls}.{PHASE}"] = phase
            values[f"{tls}.{CYCLE_SECOND}"] = second
        return values

    # -- results ------------------------------------------------------------------------------

    def kpis(self) -> dict[str, float]:
        """From SUMO's own tripinfo output, at the end of the run: a plant still running is
        ended first (SUMO then writes the vehicles still in the network and those still
        waiting to be inserted).  ``time_loss_s`` is per vehicle due by the end, arrived or
        not: its time loss driving plus its insertion delay (``departDelay``), so a program
        that leaves traffic queued in the network or at its edge is charged for it."""
        if self._conn is not None:
            self.close()
        loss, stops, due, arrived, waiting = 0.0, 0.0, 0, 0, 0
        trip = self._dir / "tripinfo.xml"
        if trip.is_file():
            text = trip.read_text(errors="replace")
            for m in re.finditer(r"<tripinfo ([^>]*)", text):
                attrs = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
                if "timeLoss" not in attrs:
                    continue
                loss += float(attrs["timeLoss"]) + max(0.0, float(attrs.get("departDelay", 0)))
                stops += float(attrs.get("waitingCount", 0))
                due += 1
                if float(attrs.get("arrival", -1)) >= 0:
                    arrived += 1
                elif float(attrs.get("depart", -1)) < 0:
                    waiting += 1
        return {
            "time_loss_s": loss / due if due else math.nan,
            "stops": stops / due if due else math.nan,
            "throughput_veh": float(arrived),
            "max_queue_veh": self._max_queue,
            "teleports": float(self._teleports),
            "in_network_veh": float(due - arrived - waiting),
            "not_inserted_veh": float(waiting),
        }

    def _release(self) -> tuple[Any, subprocess.Popen[bytes] | None]:
        """Let go of the simulation (its teleports counted, the finalizer off): the
        connection and process, for the caller to end."""
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._teleports = self._teleports_total() - self._teleports0
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        conn, proc = self._conn, self._proc
        self._conn, self._proc, self._saved = None, None, None
        return conn, proc

    def close(self) -> None:
        """End the simulation as SUMO ends it, then the process: its outputs (tripinfo, the
        unfinished trips among them) are whole when this returns and stay readable until
        the plant is collected."""
        conn, proc = self._release()
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close(wait=False)
        if proc is not None:
            try:
                proc.wait(timeout=30)  # SUMO writes the unfinished trips as it exits
            except subprocess.TimeoutExpired:
                _shutdown(None, proc, None)

    def _kill(self) -> None:
        """End the SUMO process now, its outputs as they are (a restart replaces them)."""
        conn, proc = self._release()
        _shutdown(conn, proc, None)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._kill()
            shutil.rmtree(self._dir, ignore_errors=True)

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        return self._proc

    # -- SUMO process -------------------------------------------------------------------------

    def _start(self, begin_s: int) -> None:
        import sumolib
        import traci

        cfg = self.config.sumocfg.resolve()
        adds = [
            *quiet_additionals(config_additionals(cfg), self._dir),
            str(self._dir / "plant.add.xml"),
        ]
        port = sumolib.miscutils.getFreeSocketPort()
        cmd = [
            self.config.sumo_binary or sumo_binary(),
            "-c",
            str(cfg),
            "--begin",
            str(begin_s),
            "--seed",
            str(self.seed),
            "--scale",
            repr(self.scale),
            "--additional-files",
            ",".join(adds),
            "--tripinfo-output",
            str(self._dir / "tripinfo.xml"),
            "--tripinfo-output.write-unfinished",
            "--tripinfo-output.write-undeparted",
            "--time-to-teleport",
            repr(self.config.time_to_teleport_s),
            "--route-steps",
            "0",  # routes read once: a loaded state would otherwise run the flows twice
            "--no-step-log",
            "--duration-log.disable",
            "--log",
            str(self._dir / "sumo.log"),  # warnings (teleports among them) go here
            "--remote-port",
            str(port),
            *config_outputs(cfg),
            *self.config.extra_args,
        ]
        self._proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL
        )
        self._finalizer = weakref.finalize(self, _shutdown, None, self._proc, None)
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # traci prints its retries
                self._conn = traci.connect(
                    port, numRetries=200, proc=self._proc, waitBetweenRetries=0.05, label=None
                )
            self._now = float(self._conn.simulation.getTime())  # SUMO loads its files first
        except Exception as exc:
            _shutdown(self._conn, self._proc, None)
            self._conn, self._proc = None, None
            raise RuntimeError(f"sumo did not start ({exc}){self._log_errors()}") from exc
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _shutdown, self._conn, self._proc, None)
        self._setup()

    def _log_errors(self) -> str:
        """SUMO's own error lines from its log (the folder goes with the plant)."""
        try:
            lines = (self._dir / "sumo.log").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        errors = [line.strip() for line in lines if line.startswith("Error")][:5]
        return ": " + " ".join(errors) if errors else ""

    def _setup(self) -> None:

        conn = self._conn
        for j in self.network.junctions:
            logics = conn.trafficlight.getAllProgramLogics(j.tls)
            own = next((lg for lg in logics if lg.programID == j.program), logics[0])
            self._actuated[j.tls] = int(own.type) != 0
            self._links[j.tls] = [
                [(str(x[0]), str(x[1]), str(x[2])) for x in link]
                for link in conn.trafficlight.getControlledLinks(j.tls)
            ]
            self._ctrl[j.tls] = SignalController(
                j,
                self.config.max_cycle_s,
                actuated=self._actuated[j.tls],
                gap_out_s=self.config.gap_out_s,
            )
            self._phase_loops[j.tls] = self._green_loops(j.tls)
        self._subscribe()
        self._set_drivers()

    def _subscribe(self) -> None:
        import traci.constants as tc

        conn = self._conn
        for a in self.network.approaches:
            for edge in a.edges:
                conn.edge.subscribe(
                    edge, [tc.LAST_STEP_VEHICLE_HALTING_NUMBER, tc.LAST_STEP_OCCUPANCY]
                )
        for loops in self._loops.values():
            for loop in loops:
                conn.inductionloop.subscribe(
                    loop, [tc.VAR_INTERVAL_NUMBER, tc.LAST_STEP_TIME_SINCE_DETECTION]
                )
        for tls, actuated in self._actuated.items():
            if actuated:
                conn.trafficlight.subscribe(tls, [tc.TL_CURRENT_PHASE])

    def _set_drivers(self) -> None:
        conn = self._conn
        for vtype in conn.vehicletype.getIDList():
            with contextlib.suppress(Exception):  # types of other vehicle classes may refuse
                conn.vehicletype.setImperfection(vtype, self.sigma)
                conn.vehicletype.setTau(vtype, self.tau)

    def _write_additionals(self) -> None:
        """Stop-line loops on every approach lane and the default vehicle type's drivers."""
        lines = ["<additional>"]
        lines.append(f'  <vType id="DEFAULT_VEHTYPE" sigma="{self.sigma!r}" tau="{self.tau!r}"/>')
        for a in self.network.approaches:
            ids = []
            for lane in range(a.lanes):
                loop = f"pc_loop_{a.edge}_{lane}"
                pos = max(0.0, a.length_m - STOP_LINE_GAP_M)
                lines.append(
                    f'  <inductionLoop id="{_xml(loop)}" lane="{_xml(a.edge)}_{lane}" '
                    f'pos="{pos:.2f}" period="{LOOP_FREQ_S}" file="{_xml(os.devnull)}"/>'
                )
                ids.append(loop)
            self._loops[a.edge] = ids
        lines.append("</additional>")
        (self._dir / "plant.add.xml").write_text("\n".join(lines) + "\n")

    # -- stepping -----------------------------------------------------------------------------

    def _run_to(self, target: float) -> None:
        """Advance SUMO to whole second ``target``: probing queues every ``probe_s``, and
        installing each junction's next cycle at its boundary."""
        conn = self._conn
        while self._now < target - 1e-9:
            ends = [
                c.current.end_s
                for tls, c in self._ctrl.items()
                if c.current is not None and not c.current.actuated
            ]
            nxt = min([target, self._now + self.config.probe_s, *ends, *self._gap_times()])
            nxt = max(nxt, self._now + 1.0)
            conn.simulationStep(float(nxt))
            self._now = float(nxt)
            self._read_probe()
            for tls, ctrl in self._ctrl.items():
                cur = ctrl.current
                if cur is None:
                    continue
                if cur.actuated:
                    self._actuated_boundary(tls, ctrl)
                elif cur.end_s <= self._now + 1e-9:
                    self._install(tls, ctrl.next_cycle())
                elif cur.coordinated is not None:
                    self._check_gap(tls, ctrl)

    def _gap_times(self) -> list[float]:
        """Seconds to stop at for gap-out: the next second inside a gap window, else the
        windows' starts ahead."""
        times: list[float] = []
        for ctrl in self._ctrl.values():
            cur = ctrl.current
            if cur is None or cur.coordinated is None:
                continue
            for _, start, end in ctrl.gap_window(cur):
                if start <= self._now + 1e-9 < end:
                    times.append(self._now + 1.0)
                elif start > self._now:
                    times.append(start)
        return times

    def _green_loops(self, tls: str) -> list[set[str]]:
        """Per program phase, the stop-line loops on the lanes it shows green."""
        j = self.network.junction(tls)
        known = {loop for loops in self._loops.values() for loop in loops}
        out: list[set[str]] = []
        for p in j.phases:
            loops = set()
            for i, link in enumerate(self._links[tls]):
                if link and i < len(p.state) and p.state[i] in "Gg":
                    loop = f"pc_loop_{link[0][0]}"
                    if loop in known:
                        loops.add(loop)
            out.append(loops)
        return out

    def _check_gap(self, tls: str, ctrl: SignalController) -> None:
        """Gap out the running non-coordinated green when its own loops (not those the
        coordinated phase serves too) saw no vehicle for ``gap_out_s``."""
        import traci.constants as tc

        cur = ctrl.current
        assert cur is not None and cur.coordinated is not None
        windows = [w for w in ctrl.gap_window(cur) if w[1] <= self._now + 1e-9 < w[2]]
        if not windows:
            return
        phase = windows[0][0]
        per_phase = self._phase_loops[tls]
        loops = per_phase[phase] - per_phase[cur.coordinated]
        if not loops:
            return
        res = self._conn.inductionloop.getAllSubscriptionResults()  # this step's
        for loop in loops:
            r = res.get(loop)
            since = (
                float(self._conn.inductionloop.getTimeSinceDetection(loop))
                if r is None
                else float(r[tc.LAST_STEP_TIME_SINCE_DETECTION])
            )
            if since < ctrl.gap_out_s:
                return
        cyc = ctrl.gap_out(self._now)
        if cyc is not None:
            self._install_rest(tls, cyc, phase)

    def _install_rest(self, tls: str, cyc: CycleProgram, ended: int) -> None:
        """The rest of a cycle after phase ``ended`` gapped out, from now on."""
        import traci

        j = self.network.junction(tls)
        # the whole cycle, so SUMO's phase index stays the program's; the tail (phase 0's
        # state) runs after the last phase, and the next cycle is installed at its end
        shown = [(d, p.state) for d, p in zip(cyc.durations_s, j.phases, strict=True)]
        shown.append((cyc.tail_s, j.phases[0].state))
        phases = [traci.trafficlight.Phase(max(d, 1.0), s, d, d) for d, s in shown]
        tl = self._conn.trafficlight
        tl.setProgramLogic(tls, traci.trafficlight.Logic(PLAN_PROGRAM, 0, ended + 1, phases))
        tl.setProgram(tls, PLAN_PROGRAM)
        tl.setPhase(tls, ended + 1)
        for k in range(len(self.cycles) - 1, -1, -1):
            if self.cycles[k][0] == tls:
                self.cycles[k] = (tls, cyc)
                break

    def _actuated_boundary(self, tls: str, ctrl: SignalController) -> None:
        """An actuated cycle ends when its logic returns to phase 0 and a plan waits."""
        import traci.constants as tc

        phase = self._conn.trafficlight.getSubscriptionResults(tls).get(tc.TL_CURRENT_PHASE)
        last = self._phase.get(tls)
        self._phase[tls] = phase
        if phase == 0 and last not in (None, 0):
            self._actuated_since[tls] = self._now
        if phase == 0 and last not in (None, 0) and ctrl.plan is not None:
            self._install(tls, ctrl.restart_at(self._now))

    def _install(self, tls: str, cyc: CycleProgram) -> None:
        import traci

        tl = self._conn.trafficlight
        j = self.network.junction(tls)
        if cyc.actuated:
            tl.setProgram(tls, j.program)
            tl.setPhase(tls, 0)
        else:
            phases = [
                traci.trafficlight.Phase(d, p.state, d, d)
                for d, p in zip(cyc.durations_s, j.phases, strict=True)
            ]
            logic = traci.trafficlight.Logic(PLAN_PROGRAM, 0, 0, phases)
            tl.setProgramLogic(tls, logic)
            tl.setProgram(tls, PLAN_PROGRAM)
            tl.setPhase(tls, 0)
        self.cycles.append((tls, cyc))
        if len(self.cycles) > 20_000:
            del self.cycles[:10_000]

    def _write_plans(self, u: Array) -> None:
        k = 0
        for j in self.network.junctions:
            n = len(j.green) - 1
            splits = [float(v) for v in u[k : k + n]]
            cycle, offset = float(u[k + n]), float(u[k + n + 1])
            self._ctrl[j.tls].write(splits, cycle, offset)
            k += n + 2

    def _read_probe(self, direct: bool = False) -> None:
        """Queues, occupancies, loop counts and teleports now; kept for ``window_s``.
        ``direct``: ask SUMO, not the subscriptions (none since a start or a loaded state)."""
        import traci.constants as tc

        res = {} if direct else self._conn.edge.getAllSubscriptionResults()
        occ = np.zeros(len(self.network.approaches))
        for i, a in enumerate(self.network.approaches):
            halting = occupied = 0.0
            for edge, lane_m in self._edge_weights[a.edge]:
                r = res.get(edge)
                if r is None:
                    halting += float(self._conn.edge.getLastStepHaltingNumber(edge))
                    occupied += lane_m * float(self._conn.edge.getLastStepOccupancy(edge))
                else:
                    halting += float(r[tc.LAST_STEP_VEHICLE_HALTING_NUMBER])
                    occupied += lane_m * float(r[tc.LAST_STEP_OCCUPANCY])
            self._halting[i] = halting
            # SUMO gives a fraction; over the approach's edges, weighted by lane metres
            occ[i] = 100.0 * occupied / max(sum(w for _, w in self._edge_weights[a.edge]), 1e-9)
        self._max_queue = max(self._max_queue, float(self._halting.max(initial=0.0)))
        self._teleports = self._teleports_total() - self._teleports0
        self._probes.append((self._now, self._loop_counts(direct), occ))
        while len(self._probes) > 2 and self._probes[1][0] <= self._now - self.config.window_s:
            self._probes.popleft()

    def _window(self) -> tuple[Array, Array]:
        """Flow (veh/h over the loops) and mean occupancy (%) over the last ``window_s``."""
        n = len(self.network.approaches)
        if not self._probes:
            return np.zeros(n), np.zeros(n)
        t1, c1, _ = self._probes[-1]
        t0, c0, _ = self._probes[0]
        flow = (c1 - c0) * 3600.0 / (t1 - t0) if t1 > t0 else np.zeros(n)
        inside = [o for t, _, o in self._probes if t > t1 - self.config.window_s] or [
            self._probes[-1][2]
        ]
        return flow, np.mean(inside, axis=0)

    def _saved_at(self) -> float:
        return self._saved[0] if self._saved is not None else -math.inf

    def _loop_counts(self, direct: bool = False) -> Array:
        """Vehicles over each approach's stop-line loops since SUMO started (or loaded)."""
        import traci.constants as tc

        il = self._conn.inductionloop
        res = {} if direct else il.getAllSubscriptionResults()

        def count(loop: str) -> float:
            r = res.get(loop)
            if r is None:
                return float(il.getIntervalVehicleNumber(loop))
            return float(r[tc.VAR_INTERVAL_NUMBER])

        return np.array(
            [sum(count(loop) for loop in self._loops[a.edge]) for a in self.network.approaches]
        )

    def _teleports_total(self) -> int:
        return int(self._conn.simulation.getParameter("", "stats.teleports.total") or 0)

    # -- verification: matching a state --------------------------------------------------------

    def _match_queues(self, x0: Array) -> None:
        """Add standing vehicles behind each approach's queue, or remove the last ones, so
        its queue is ``x0`` (NaN entries are left alone)."""
        conn = self._conn
        for i, a in enumerate(self.network.approaches):
            if i >= len(x0) or not math.isfinite(x0[i]):
                continue
            want = max(0, round(float(x0[i])))
            have = sum(int(conn.edge.getLastStepHaltingNumber(e)) for e in a.edges)
            if have > want:
                halting = [  # (edge in driving order, position): the rearmost first
                    (k, conn.vehicle.getLanePosition(v), v)
                    for k, e in enumerate(a.edges)
                    for v in conn.edge.getLastStepVehicleIDs(e)
                    if conn.vehicle.getSpeed(v) < HALTING_MPS
                ]
                for _k, _pos, v in sorted(halting)[: have - want]:
                    conn.vehicle.remove(v)
                have = want
            elif want > have:
                have += self._add_standing(a.edge, a.junction, want - have, a.length_m)
            self._halting[i] = float(have)  # added vehicles enter at the next step

    def _add_standing(self, edge: str, tls: str, n: int, length: float) -> int:
        """Adds up to ``n`` standing vehicles behind the queue; returns how many fit."""
        conn = self._conn
        a = self.network.approach(edge)
        if not a.movements:
            return 0
        rear: dict[int, float] = {}  # lane -> position of its rearmost vehicle
        for lane in range(a.lanes):
            ids = conn.lane.getLastStepVehicleIDs(f"{edge}_{lane}")  # rearmost first
            if ids:
                rear[lane] = float(conn.vehicle.getLanePosition(ids[0]))
        targets: list[tuple[str, int]] = []  # (route id, lane) per movement
        for m in a.movements:
            rid = f"pc_route_{edge}_{m.to_edge}"
            if rid not in self._routes:
                with contextlib.suppress(Exception):  # already there after a loaded state
                    conn.route.add(rid, [edge, m.to_edge])
                self._routes.add(rid)
            lanes = {
                int(self._links[tls][i][0][0].rsplit("_", 1)[1])
                for i in m.link_indices
                if i < len(self._links[tls]) and self._links[tls][i]
            }
            targets += [(rid, lane) for lane in sorted(lanes)]
        if not targets:
            return 0
        added = 0
        for k in range(n):
            rid, lane = targets[k % len(targets)]
            pos = min(rear.get(lane, length + JAM_SPACING_M / 2), length) - JAM_SPACING_M
            if pos < JAM_SPACING_M:
                continue
            rear[lane] = pos
            vid = f"pc_{next(self._added)}"
            conn.vehicle.add(
                vid,
                rid,
                depart="now",
                departLane=str(lane),
                departPos=f"{pos:.2f}",
                departSpeed="0",
            )
            added += 1
        return added

    def _drop_pending(self) -> None:
        """Vehicles added to match a state that found no room are dropped, not held back."""
        for v in self._conn.simulation.getPendingVehicles():
            if v.startswith("pc_"):
                with contextlib.suppress(Exception):
                    self._conn.vehicle.remove(v)

    def _param(self, name: str) -> float:
        if name in self.config.parameters:
            return float(self.params[self.config.parameters.index(name)])
        return NOMINAL[name]


def _xml(s: str) -> str:
    return s.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;")


def _shutdown(conn: Any, proc: subprocess.Popen[bytes] | None, _unused: object) -> None:
    if conn is not None:
        with contextlib.suppress(Exception):
            conn.close(wait=False)
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
