"""Saturation flows measured on SUMO itself, for the queue model and the fixed-time plans.

The geometric saturation flow (``Approach.saturation_veh_h``: one car per discharge
headway on every lane) is what an approach could discharge if nothing got in the way; on
SUMO the lanes do not share it evenly (a left turner waiting for a gap blocks its lane,
turning vehicles slow down, a short lane fills), so the real discharge can be half of it.
``measured_saturation`` runs the ``.sumocfg``'s own network and demand, scaled up so that
queues form, under the junctions' own programs, and per approach lane counts the vehicles
that leave it in the seconds it has green with a vehicle standing at its stop line (the
start-up loss and any blocking included): the lane's discharge while queued.  An
approach's saturation is the sum over its lanes; a lane with too few such seconds takes
its geometric flow times the median ratio measured/geometric of the others.

The result depends only on the files and the settings below: it is cached under the
user's cache folder by a hash of them (``PARALLELCITY_CACHE`` overrides the folder).  A
scenario can ship it beside its ``.sumocfg`` (``NAME.saturation.json``, written by
``python -m parallelcity.models.traffic.calibrate NAME.sumocfg``); it is used only while
its hash matches the files.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

from .network import Network

SCALE = 1.3  # demand scale of the measuring run: enough for queues on every approach
DURATION_S = 3600.0  # simulated seconds measured
SEED = 1
MIN_QUEUED_GREEN_S = 60.0  # queued green seconds a lane needs for its own figure
VERSION = 2  # bump when the method changes: old cache entries are then not used


def cache_dir() -> Path:
    base = os.environ.get("PARALLELCITY_CACHE") or os.environ.get("XDG_CACHE_HOME")
    root = Path(base) if base else Path.home() / ".cache"
    return (root if os.environ.get("PARALLELCITY_CACHE") else root / "parallelcity") / "sumo"


def input_files(sumocfg: Path) -> list[Path]:
    """The files a measurement depends on: the ``.sumocfg`` and every file it names."""
    from .demand import sumocfg_files

    net_file, routes, extra = sumocfg_files(sumocfg)
    return [Path(sumocfg), net_file, *routes, *extra]


def file_hash(sumocfg: Path, network: Network, shares: dict[str, dict[str, float]]) -> str:
    h = hashlib.sha256(f"v{VERSION} {SCALE} {DURATION_S} {SEED}".encode())
    for f in input_files(sumocfg):
        h.update(f.read_bytes())
    h.update(json.dumps([j.tls for j in network.junctions]).encode())
    h.update(json.dumps(shares, sort_keys=True).encode())
    return h.hexdigest()[:32]


def measured_saturation(
    sumocfg: Path, network: Network, shares: dict[str, dict[str, float]]
) -> dict[str, float]:
    """Saturation flow (veh/h) per approach edge, from the cache or a SUMO run."""
    digest = file_hash(sumocfg, network, shares)
    edges = {a.edge for a in network.approaches}
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        shipped = json.loads(sidecar(sumocfg).read_text())
        if shipped["hash"] == digest and set(shipped["saturation_veh_h"]) == edges:
            return {k: float(v) for k, v in shipped["saturation_veh_h"].items()}
    path = cache_dir() / f"saturation-{digest}.json"
    with contextlib.suppress(OSError, ValueError):
        cached = json.loads(path.read_text())
        if set(cached) == edges:
            return {k: float(v) for k, v in cached.items()}
    result = _measure(sumocfg, network)
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(result, f, indent=1, sort_keys=True)
        os.replace(tmp, path)  # atomic: parallel builds may race, each writes a whole file
    return result


def sidecar(sumocfg: Path) -> Path:
    return Path(sumocfg).with_name(Path(sumocfg).stem + ".saturation.json")


def write_sidecar(sumocfg: Path) -> Path:
    """Measure (or take from the cache) and write ``NAME.saturation.json`` beside it."""
    from .demand import read_demand, sumocfg_files
    from .network import read_network

    net_file, routes, _extra = sumocfg_files(sumocfg)
    network = read_network(net_file)
    shares = read_demand(routes, network).shares
    out = sidecar(sumocfg)
    with contextlib.suppress(OSError):
        out.unlink()  # a stale one must not answer for the files it no longer matches
    result = measured_saturation(Path(sumocfg), network, shares)
    body = {"hash": file_hash(Path(sumocfg), network, shares), "saturation_veh_h": result}
    out.write_text(json.dumps(body, indent=1, sort_keys=True) + "\n")
    return out


def _measure(sumocfg: Path, network: Network) -> dict[str, float]:
    import sumolib
    import traci
    import traci.constants as tc

    port = sumolib.miscutils.getFreeSocketPort()
    with tempfile.TemporaryDirectory(prefix="parallelcity-cal-") as tmp:
        cmd = [
            str(sumolib.checkBinary("sumo")),
            "-c",
            str(sumocfg),
            "--scale",
            repr(SCALE),
            "--seed",
            str(SEED),
            "--end",
            repr(DURATION_S),
            "--no-step-log",
            "--no-warnings",
            "--duration-log.disable",
            "--tripinfo-output",
            os.devnull,
            "--log",
            str(Path(tmp) / "sumo.log"),
        ]
        label = f"parallelcity-cal-{os.getpid()}-{port}"
        with contextlib.redirect_stdout(io.StringIO()):
            traci.start(cmd, port=port, label=label, numRetries=200)
        conn = traci.getConnection(label)
        try:
            seen = _run(conn, tc, network)
        finally:
            with contextlib.suppress(Exception):
                conn.close()
    geometric = {a.edge: a.saturation_veh_h / a.lanes for a in network.approaches}
    per_lane = {lane: 3600.0 * n / t for lane, (n, t) in seen.items() if t >= MIN_QUEUED_GREEN_S}
    ratio = (
        statistics.median(v / geometric[lane.rsplit("_", 1)[0]] for lane, v in per_lane.items())
        if per_lane
        else 1.0
    )
    return {
        a.edge: round(
            sum(per_lane.get(f"{a.edge}_{k}", geometric[a.edge] * ratio) for k in range(a.lanes)),
            1,
        )
        for a in network.approaches
    }


def _run(conn: Any, tc: Any, network: Network) -> dict[str, tuple[float, float]]:
    """Per approach lane: (vehicles that left it, seconds) over the seconds it had green
    with a vehicle standing at its stop line when the second began."""
    links: dict[str, list[int]] = {}  # lane -> the tls link indices it feeds
    lane_tls: dict[str, str] = {}
    for j in network.junctions:
        for i, conns in enumerate(conn.trafficlight.getControlledLinks(j.tls)):
            for c in conns:
                links.setdefault(str(c[0]), []).append(i)
                lane_tls[str(c[0])] = j.tls
        conn.trafficlight.subscribe(j.tls, [tc.TL_RED_YELLOW_GREEN_STATE])
    lanes = [f"{a.edge}_{k}" for a in network.approaches for k in range(a.lanes)]
    lanes = [lane for lane in lanes if lane in links]
    for lane in lanes:
        conn.lane.subscribe(
            lane, [tc.LAST_STEP_VEHICLE_ID_LIST, tc.LAST_STEP_VEHICLE_HALTING_NUMBER]
        )
    seen: dict[str, tuple[float, float]] = {lane: (0.0, 0.0) for lane in lanes}
    before: dict[str, tuple[set[str], int]] = {lane: (set(), 0) for lane in lanes}
    for _ in range(int(DURATION_S)):
        conn.simulationStep()
        state = conn.trafficlight.getAllSubscriptionResults()
        res = conn.lane.getAllSubscriptionResults()
        for lane in lanes:
            ids = set(res[lane][tc.LAST_STEP_VEHICLE_ID_LIST])
            halting = int(res[lane][tc.LAST_STEP_VEHICLE_HALTING_NUMBER])
            was, stood = before[lane]
            before[lane] = (ids, halting)
            light = state[lane_tls[lane]][tc.TL_RED_YELLOW_GREEN_STATE]
            if stood and any(light[i] in "Gg" for i in links[lane]):
                n, t = seen[lane]
                seen[lane] = (n + len(was - ids), t + 1.0)
    return seen


if __name__ == "__main__":
    import sys

    for name in sys.argv[1:]:
        print(write_sidecar(Path(name).resolve()))
