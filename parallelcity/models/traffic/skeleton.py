"""A scenario skeleton for any SUMO simulation: ``parallelcity skeleton FILE.sumocfg``.

Everything comes from the files the ``.sumocfg`` names: the signalised junctions (their
phases, green phases, minimum greens and cycle), the approaches (lanes, storage,
saturation), the detectors on them and the demand.  The result is a scenario TOML that
validates as it is, listing what was found in its leading comments; its numbers (bounds,
prices, rates) are starting points to edit.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from .demand import Demand, read_demand, sumo_time, sumocfg_files
from .network import QUEUED, TELEPORTS, Network, read_network, signal_names
from .sumo_plant import CYCLE_SECOND, PHASE

SCENARIO_DAY = dt.datetime(2026, 1, 5, tzinfo=dt.UTC)  # a Monday: SUMO second 0 is its midnight
CYCLE_MIN_S = 60.0  # shortest cycle the specs allow, unless a program needs longer
CYCLE_MAX_S = 120.0
BAND_SHARE = 0.9  # queues are kept below this share of the approach's storage
SPLIT_MOVE_PER_CYCLE = 0.1
CYCLE_MOVE_PER_CYCLE_S = 10.0
HORIZON_CYCLES = 4  # 2 SUMO samples x 4 cycles verify within a cycle's wall time at SPEED
SPEED = 10.0  # simulated seconds per wall second: a 90 s cycle in 9 s


def detectors(additional_files: list[Path]) -> dict[str, list[str]]:
    """Detector ids by the lane they sit on (e1/e2 in any additional file)."""
    found: dict[str, list[str]] = {}
    tags = ("laneAreaDetector", "e2Detector", "inductionLoop", "e1Detector")
    for file in additional_files:
        try:
            root = ET.parse(file).getroot()
        except (OSError, ET.ParseError):
            continue
        for el in root.iter():
            if el.tag in tags and el.get("lane") and el.get("id"):
                found.setdefault(el.get("lane", ""), []).append(el.get("id", ""))
    return found


def _time_window(sumocfg: Path) -> tuple[float, float | None]:
    root = ET.parse(sumocfg).getroot()
    begin = root.find(".//begin")
    end = root.find(".//end")
    b = sumo_time(begin.get("value") if begin is not None else None, 0.0)
    e = sumo_time(end.get("value"), 0.0) if end is not None and end.get("value") else None
    return b, e


def _step_for(cycle_s: int) -> int:
    return next(s for s in (10, 9, 8, 6, 5, 4, 3, 2, 1) if cycle_s % s == 0)


def _point(name: str, cycle: int, low: float, high: float, *, required: bool) -> list[str]:
    """One `[[field.points]]` table, stale after three cycles."""
    lines = [
        "",
        "[[field.points]]",
        f"name = {_q(name)}",
        f"node = {_q('s=tc/' + name)}",
        f"max_age_s = {3 * cycle}",
        f"min = {low:.1f}",
        f"max = {high:.0f}.0",
    ]
    return lines if required else [*lines, "required = false"]


def _q(text: str) -> str:
    """A TOML basic string."""
    return json.dumps(text, ensure_ascii=False)


def _scenario_name(path: Path) -> str:
    name = re.sub(r"[^a-z0-9-]+", "-", path.stem.lower()).strip("-")
    return (name or "traffic")[:40]


def listing(network: Network, demand: Demand, lane_detectors: dict[str, list[str]]) -> list[str]:
    """What was found, one line each (the skeleton's leading comments)."""
    lines = [f"{len(network.junctions)} signalised junctions:"]
    for j in network.junctions:
        mins = ", ".join(f"{m:g}" for m in j.min_greens_s)
        lines.append(
            f"  {j.tls}: program {j.program!r}, {len(j.phases)} phases, green phases "
            f"{list(j.green)}, min greens [{mins}] s, cycle {j.cycle_s:g} s, "
            f"lost time {j.lost_s:g} s"
        )
    lines.append(f"{len(network.approaches)} approaches:")
    for a in network.approaches:
        where = "entry" if a.is_entry else f"from {a.upstream}"
        if a.feeders:
            where += ", via " + " ".join(f"{f.edge} ({f.lanes} lanes)" for f in a.feeders)
        lanes = [f"{a.edge}_{i}" for i in range(a.lanes)]
        lanes += [f"{f.edge}_{i}" for f in a.feeders for i in range(f.lanes)]
        dets = [d for lane in lanes for d in lane_detectors.get(lane, [])]
        lines.append(
            f"  {a.edge} -> {a.junction} ({where}): {a.lanes} lanes, {a.total_length_m:.0f} m, "
            f"storage {a.storage_veh:.1f} veh, saturation {a.saturation_veh_h:.0f} veh/h, "
            f"detectors: {', '.join(dets) if dets else 'NONE'}"
        )
    lines.append(
        f"demand: {demand.vehicles:.0f} vehicles, {demand.unattributed_veh:.0f} of them "
        "depart inside the network (no arrival disturbance carries them)"
    )
    return lines


def skeleton(path: str | Path) -> str:
    """The scenario TOML for ``path`` (a ``.sumocfg``); ``ValueError`` if it cannot be read."""
    sumocfg = Path(path).resolve()
    net_file, route_files, additional = sumocfg_files(sumocfg)
    network = read_network(net_file)
    demand = read_demand(route_files, network)
    found = detectors(additional)
    names = signal_names(network)
    begin_s, end_s = _time_window(sumocfg)
    if end_s is None:
        ends = [s.end_s for segs in demand.arrivals.values() for s in segs]
        end_s = max(ends, default=begin_s + 3600.0)
    cycle = round(max(j.cycle_s for j in network.junctions))
    step = _step_for(cycle)
    cycles = max(1, round((end_s - begin_s) / cycle))
    start = SCENARIO_DAY + dt.timedelta(seconds=begin_s)
    # per junction: CYCLE_MIN_S, or the program's own cycle if shorter (the own program is
    # the inputs' safe value, so it must lie inside the bounds), never below the minimum
    cycle_mins = {
        j.tls: float(max(j.min_cycle_s, min(CYCLE_MIN_S, j.cycle_s))) for j in network.junctions
    }
    cycle_min = min(cycle_mins.values())
    cycle_max = float(max(CYCLE_MAX_S, float(cycle), max(cycle_mins.values())))
    out = ["# Scenario skeleton for " + sumocfg.name + ", from `parallelcity skeleton`."]
    out += ["# " + line for line in listing(network, demand, found)]
    out += [
        "",
        "[scenario]",
        f"name = {_q(_scenario_name(sumocfg))}",
        f"description = {_q('signal control of ' + sumocfg.name)}",
        f"start = {start.strftime('%Y-%m-%dT%H:%M:%SZ')}   # SUMO second {begin_s:g}",
        'time_zone = "UTC"',
        f"cycle_s = {cycle}",
        f"horizon_steps = {HORIZON_CYCLES}",
        f"cycles = {cycles}",
        f"speed = {SPEED:g}",
        "",
        "[security]",
        "insecure_lab = false",
        "",
        "[model]",
        'kind = "signal_corridor"',
        f"sumocfg = {_q(str(sumocfg))}",
        f"begin = {SCENARIO_DAY.strftime('%Y-%m-%dT%H:%M:%SZ')}   # scenario time of SUMO second 0",
        f"step_s = {step}",
        "",
        "[field]",
        f"namespace = {_q('urn:parallelcity:' + _scenario_name(sumocfg))}",
        "sampling_interval_ms = 50",
    ]
    storage = {a.edge: a.storage_veh for a in network.approaches}
    for name in names["outputs"]:
        edge, _, what = name.rpartition(".")
        high = {
            "queue": 2 * storage.get(edge, 0.0) + 10,
            "flow": 20000.0,
            "occupancy": 100.0,
            "queued": 2 * sum(storage.values()) + 100,
            "teleports": 100000.0,
        }[what]
        out += _point(name, cycle, -1.0, high, required=what == "queue")
    out += [
        "",
        "# The signal state each junction's field controller reports (measured only: the twin",
        "# does not predict it): its running phase (index in its program) and cycle second.",
    ]
    for j in network.junctions:
        for name, high in (
            (f"{j.tls}.{PHASE}", len(j.phases) - 1),
            (f"{j.tls}.{CYCLE_SECOND}", 2 * cycle_max),  # an actuated cycle may run long
        ):
            out += _point(name, cycle, 0.0, high, required=False)
    safe = dict(zip(names["inputs"], _program_inputs(network), strict=True))
    for name in names["inputs"]:
        out += [
            "",
            "[[field.inputs]]",
            f"name = {_q(name)}",
            f"node = {_q('s=tc/' + name)}",
            f"safe = {safe[name]:.4f}   # the junction's own fixed-time program",
        ]
    out += [
        "",
        "[field.watchdog]",
        f"heartbeat_interval_s = {cycle}",
        "missed_heartbeats = 3",
        "",
        "[controller]",
        'kind = "linear_mpc"',
        f"output_costs = {{ {_q(QUEUED)} = 20.0 }}  # per vehicle-hour of delay (a value of time)",
        "comfort_weight = 10.0                 # per veh^2 of queue above the storage band",
        "move_weights = { "
        + ", ".join(f"{_q(j.tls + '.cycle_s')} = 0.01" for j in network.junctions)
        + " }   # per s^2: a cycle change upsets the coordination",
        "",
        "[fallback]",
        'kind = "webster"',
        f"cycle_min_s = {cycle_min:g}",
        f"cycle_max_s = {cycle_max:g}",
        "",
        "[rig]",
        'kind = "simulated"',
        "seed = 7",
        "field_seed = 11",
        "parameter_spread = 0.1",
        'spread_parameters = ["demand.scale", "driver.sigma"]',
        "samples = 2                            # verification within the cycle's deadline",
    ]
    per_h = 3600.0 / cycle
    for j in network.junctions:
        j_min = cycle_mins[j.tls]
        effective = j_min - j.lost_s
        mins = [m / effective for m in j.min_greens_s]
        for k in range(len(j.green) - 1):
            # the bounds hold the program's own split (its safe value) even where a short
            # green (a left-turn phase) is below its minimum's share of the shortest cycle
            own = j.splits[k]
            low = min(mins[k], math.floor(own * 1e4) / 1e4)
            high = max(1.0 - (sum(mins) - mins[k]), math.ceil(own * 1e4) / 1e4)
            why = (
                f"min green {j.min_greens_s[k]:g} s at a {j_min:g} s cycle"
                if low == mins[k]
                else f"the program's own split ({own * (j.cycle_s - j.lost_s):g} s green)"
            )
            out += [
                "",
                "[[specs.inputs]]",
                f"name = {_q(f'{j.tls}.split{k}')}",
                f"min = {low:.4f}   # {why}",
                f"max = {high:.4f}",
                f"max_rate_per_h = {SPLIT_MOVE_PER_CYCLE * per_h:g}",
            ]
        out += [
            "",
            "[[specs.inputs]]",
            f"name = {_q(j.tls + '.cycle_s')}",
            f"min = {j_min!r}",
            f"max = {cycle_max!r}",
            f"max_rate_per_h = {CYCLE_MOVE_PER_CYCLE_S * per_h:g}",
            "",
            "[[specs.inputs]]",
            f"name = {_q(j.tls + '.offset_s')}",
            "min = 0.0",
            f"max = {cycle_max!r}",
        ]
    out += [
        "",
        "# No vehicle may teleport (SUMO's way out of a jam) on any verification sample.",
        "",
        "[[specs.bands]]",
        f"output = {_q(TELEPORTS)}",
        "low = -1.0",
        "high = 0.0",
        "margin_k = 0.0",
        "enforce_after_s = 0.0",
        "",
        "# Spillback bands on the links between two junctions, checked over the whole horizon;",
        "# entry queues are delay, priced through network.queued. low = -1: queues are never",
        "# negative, only the upper edge binds.",
    ]
    for a in network.approaches:
        if a.is_entry:
            continue
        out += [
            "",
            "[[specs.bands]]",
            f"output = {_q(a.edge + '.queue')}",
            "low = -1.0",
            f"high = {BAND_SHARE * a.storage_veh:.1f}   # {BAND_SHARE:g} of its storage",
            "enforce_after_s = 0.0",
        ]
    return "\n".join(out) + "\n"


def _program_inputs(network: Network) -> list[float]:
    values: list[float] = []
    for j in network.junctions:
        values += [*j.splits, j.cycle_s, j.offset_s]
    return values
