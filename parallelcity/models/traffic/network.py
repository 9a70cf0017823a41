"""A signalised road network as the traffic domain sees it, read from a SUMO ``.net.xml``.

Everything the twin, the controllers and the SUMO plant share about a network lives
here, derived from the network file and nothing typed by hand:

* a **junction** is a traffic light system (``tlLogic``) with at least two green
  phases; its program's phases split into *green phases* (no yellow, some green) and
  *intergreens* (yellow and all-red), whose durations are the junction's lost time;
* an **approach** is an edge entering a junction, with the edges that alone feed it back
  to the previous junction (through nodes that only join two edges: a lane-count change,
  the start of a turn pocket): its lanes, length and speed give its storage (vehicles
  standing on it) and its saturation flow (vehicles per hour leaving it on green), and
  its **movements** say which outgoing edge each turn goes to and in which green phases
  it has right of way.

The signal plan a controller writes is, per junction, the cycle length ``C``, the
offset, and the *splits*: green phase ``k < P - 1`` gets ``split_k`` of the effective
green ``C - L`` (``L`` the lost time), the last green phase the remainder.
``greens`` turns a plan into green times that always keep every minimum green; the
SUMO plant applies exactly these, and the queue model plans with the same formula.

Signal names (``signal_names``) are derived from SUMO ids, so a scenario's points and
inputs name approaches by their edge id and junctions by their tls id; the one
network-wide output, ``network.queued`` (vehicles queued on all approaches), comes last.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Jam spacing of a standing passenger car (SUMO's default length 5 m + minGap 2.5 m).
JAM_SPACING_M = 7.5
# Default Krauss car-following: reaction time tau (s); the discharge headway at the
# stop line is about tau plus the time to cover a jam spacing at discharge speed.
TAU_S = 1.0
DISCHARGE_SPEED_MPS = 10.0  # speed a queue leaves the stop line with, capped by the lane's
DEFAULT_MIN_GREEN_S = 5.0  # where the program does not set minDur
QUEUED = "network.queued"  # output: vehicles queued on all approaches together
TELEPORTS = "network.teleports"  # output: vehicles teleported (jammed); the model predicts 0
# the model parameters after saturation and storage per approach, with their nominal values
GLOBAL_PARAMETERS = ("demand.scale", "driver.sigma", "driver.tau")


@dataclass(frozen=True)
class SignalPhase:
    state: str  # one character per link index: G g y r s o O u
    duration_s: float
    min_s: float  # 0 where the program does not set it
    max_s: float  # inf where the program does not set it

    @property
    def is_green(self) -> bool:
        """A main phase: some movement has green and none is clearing (yellow)."""
        return "y" not in self.state.lower() and any(c in "Gg" for c in self.state)


@dataclass(frozen=True)
class Movement:
    """A turn from an approach to an outgoing edge."""

    to_edge: str
    link_indices: tuple[int, ...]  # the tls link indices (one per lane-to-lane connection)
    green_phases: tuple[int, ...]  # k: positions in ``Junction.green`` where all its links have G/g
    lanes: int  # lane-to-lane connections serving it


@dataclass(frozen=True)
class Feeder:
    """An edge before an approach's stop-line edge, joined to it by a node that only links
    the two (a change of lane count or speed, the start of a turn pocket)."""

    edge: str
    lanes: int
    length_m: float


@dataclass(frozen=True)
class Approach:
    """An edge entering a junction (``edge``, named after it), with the edges that feed
    it alone back to the previous junction (``feeders``, in driving order)."""

    edge: str
    junction: str  # tls id
    lanes: int  # at the stop line
    length_m: float  # of the stop-line edge
    speed_mps: float
    movements: tuple[Movement, ...]
    upstream: str | None  # tls id of the corridor junction this edge leaves, if any
    feeders: tuple[Feeder, ...] = ()

    @property
    def edges(self) -> tuple[str, ...]:
        """The approach's edges in driving order, the stop-line edge last."""
        return (*(f.edge for f in self.feeders), self.edge)

    @property
    def total_length_m(self) -> float:
        """From the previous junction (or the network's edge) to the stop line."""
        return self.length_m + sum(f.length_m for f in self.feeders)

    @property
    def edge_lane_m(self) -> tuple[tuple[str, float], ...]:
        """Per edge of the approach, in driving order: its lanes times its length."""
        stop_line = (self.edge, self.lanes * self.length_m)
        return (*((f.edge, f.lanes * f.length_m) for f in self.feeders), stop_line)

    @property
    def storage_veh(self) -> float:
        """Vehicles standing on the approach when it is jammed end to end."""
        return sum(m for _, m in self.edge_lane_m) / JAM_SPACING_M

    @property
    def saturation_veh_h(self) -> float:
        """Vehicles per hour leaving on green, all lanes: one per discharge headway."""
        headway = TAU_S + JAM_SPACING_M / min(self.speed_mps, DISCHARGE_SPEED_MPS)
        return self.lanes * 3600.0 / headway

    @property
    def is_entry(self) -> bool:
        """Traffic enters the corridor here (no corridor junction upstream)."""
        return self.upstream is None


@dataclass(frozen=True)
class Junction:
    tls: str
    program: str
    offset_s: float
    phases: tuple[SignalPhase, ...]  # the whole program, intergreens included
    green: tuple[int, ...]  # indices into ``phases`` of the green phases, in program order
    approaches: tuple[str, ...]  # edge ids

    @property
    def cycle_s(self) -> float:
        return sum(p.duration_s for p in self.phases)

    @property
    def lost_s(self) -> float:
        """Intergreen time per cycle: the program's yellow and all-red phases."""
        return sum(p.duration_s for i, p in enumerate(self.phases) if i not in self.green)

    @property
    def min_greens_s(self) -> tuple[float, ...]:
        return tuple(
            self.phases[i].min_s if self.phases[i].min_s > 0 else DEFAULT_MIN_GREEN_S
            for i in self.green
        )

    @property
    def min_cycle_s(self) -> float:
        return self.lost_s + sum(self.min_greens_s)

    @property
    def splits(self) -> tuple[float, ...]:
        """The program's own splits (the fixed-time plan it runs with no plan written)."""
        effective = self.cycle_s - self.lost_s
        return tuple(self.phases[i].duration_s / effective for i in self.green[:-1])


@dataclass(frozen=True)
class Network:
    net_file: str
    junctions: tuple[Junction, ...]
    approaches: tuple[Approach, ...]

    def junction(self, tls: str) -> Junction:
        for j in self.junctions:
            if j.tls == tls:
                return j
        raise KeyError(f"no signalised junction {tls!r} (junctions: {self.junction_ids})")

    def approach(self, edge: str) -> Approach:
        for a in self.approaches:
            if a.edge == edge:
                return a
        raise KeyError(f"no approach {edge!r}")

    @property
    def junction_ids(self) -> tuple[str, ...]:
        return tuple(j.tls for j in self.junctions)

    def downstream(self, movement: Movement) -> Approach | None:
        """The corridor approach a movement feeds, or None if it leaves the corridor."""
        for a in self.approaches:
            if a.edges[0] == movement.to_edge:
                return a
        return None


def greens(junction: Junction, splits: Sequence[float], cycle_s: float) -> tuple[float, ...]:
    """Green time of each green phase under ``splits`` (``P - 1`` of them) and ``cycle_s``.

    The plan is made safe, never refused: the cycle is raised to the junction's minimum
    cycle, every split is clipped to ``[0, 1]``, and if the greens so given leave any
    phase below its minimum, the time above the minimums is shared in proportion to
    what the splits asked for.  The result always sums to ``cycle - lost time``."""
    p = len(junction.green)
    if len(splits) != p - 1:
        raise ValueError(f"junction {junction.tls} needs {p - 1} splits, got {len(splits)}")
    mins = junction.min_greens_s
    cycle = max(float(cycle_s), junction.min_cycle_s) if math.isfinite(cycle_s) else None
    if cycle is None:
        raise ValueError(f"junction {junction.tls}: cycle {cycle_s} is not finite")
    effective = cycle - junction.lost_s
    asked = [min(max(float(s), 0.0), 1.0) for s in splits]
    asked.append(max(0.0, 1.0 - sum(asked)))
    spare = effective - sum(mins)
    total = sum(asked)
    weights = [a / total for a in asked] if total > 0 else [1.0 / p] * p
    wanted = [a * effective for a in asked]
    if all(w >= m for w, m in zip(wanted, mins, strict=True)) and total <= 1.0 + 1e-12:
        return tuple(wanted)
    return tuple(m + spare * w for m, w in zip(mins, weights, strict=True))


def signal_names(network: Network) -> dict[str, tuple[str, ...]]:
    """The model's signal names by kind, in the order the model and the plant use."""
    states = tuple(f"{a.edge}.queue" for a in network.approaches)
    inputs: list[str] = []
    for j in network.junctions:
        inputs += [f"{j.tls}.split{k}" for k in range(len(j.green) - 1)]
        inputs += [f"{j.tls}.cycle_s", f"{j.tls}.offset_s"]
    disturbances = tuple(f"{a.edge}.arrival" for a in network.approaches if a.is_entry)
    outputs = tuple(
        name
        for a in network.approaches
        for name in (f"{a.edge}.queue", f"{a.edge}.flow", f"{a.edge}.occupancy")
    ) + (QUEUED, TELEPORTS)
    parameters = (
        tuple(
            name
            for a in network.approaches
            for name in (f"{a.edge}.saturation", f"{a.edge}.storage")
        )
        + GLOBAL_PARAMETERS
    )
    return {
        "states": states,
        "inputs": tuple(inputs),
        "disturbances": disturbances,
        "outputs": outputs,
        "parameters": parameters,
    }


def read_network(
    path: str | Path, tls_ids: Iterable[str] | None = None, program: str | None = None
) -> Network:
    """The signalised junctions of a SUMO network file (all with two or more green phases,
    or those named in ``tls_ids``) and their approaches.  ``program``: the program each
    junction runs as its own (default: its first by id).  ``ValueError`` for a file that
    is not a SUMO network, or a named junction or program it lacks."""
    import sumolib  # imported here: reading a network is the only use

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such network file")
    try:
        net = sumolib.net.readNet(str(path), withPrograms=True)
    except Exception as exc:  # sumolib raises whatever its XML parser raises
        raise ValueError(f"{path}: not a readable SUMO network ({exc})") from exc
    wanted = None if tls_ids is None else list(tls_ids)
    by_id = {t.getID(): t for t in net.getTrafficLights()}
    if wanted is not None:
        missing = [t for t in wanted if t not in by_id]
        if missing:
            raise ValueError(f"{path}: no traffic light {missing} (has {sorted(by_id)})")
    junctions: list[Junction] = []
    raw: list[tuple[Junction, object]] = []
    for tls_id in wanted if wanted is not None else sorted(by_id):
        tls = by_id[tls_id]
        programs: Mapping[str, object] = tls.getPrograms()
        if not programs:
            continue
        if program is None:
            program_id, own = sorted(programs.items())[0]
        elif program in programs:
            program_id, own = program, programs[program]
        else:
            raise ValueError(f"{path}: traffic light {tls_id} has no program {program!r}")
        limits = _phase_limits(programs.values())
        phases = tuple(
            SignalPhase(
                state=ph.state,
                duration_s=float(ph.duration),
                min_s=_positive(ph.minDur) or limits.get(ph.state, (0.0, math.inf))[0],
                max_s=_positive(ph.maxDur) or limits.get(ph.state, (0.0, math.inf))[1],
            )
            for ph in own.getPhases()  # type: ignore[attr-defined]
        )
        green = tuple(i for i, ph in enumerate(phases) if ph.is_green)
        if len(green) < 2:
            if wanted is not None:
                raise ValueError(f"{path}: traffic light {tls_id} has fewer than 2 green phases")
            continue
        offset = float(getattr(own, "_offset", 0) or 0)
        cycle = sum(ph.duration_s for ph in phases)
        if cycle > 0:  # SUMO takes any offset (negative, beyond the cycle) modulo the cycle
            offset %= cycle
        junctions.append(Junction(tls_id, str(program_id), offset, phases, green, approaches=()))
        raw.append((junctions[-1], tls))
    corridor = {j.tls for j in junctions}
    tls_of_node = {n: t for t in sorted(by_id) for n in _node_ids(by_id[t])}
    approaches: list[Approach] = []
    final: list[Junction] = []
    for junction, tls in raw:
        links: dict[str, dict[str, list[tuple[int, object]]]] = {}
        for in_lane, out_lane, index in tls.getConnections():  # type: ignore[attr-defined]
            edge = in_lane.getEdge()
            links.setdefault(edge.getID(), {}).setdefault(out_lane.getEdge().getID(), []).append(
                (int(index), edge)
            )
        edges: list[str] = []
        for edge_id in sorted(links):
            edge = net.getEdge(edge_id)
            movements = []
            for to_edge, conns in sorted(links[edge_id].items()):
                indices = tuple(sorted({i for i, _ in conns}))
                served = tuple(
                    k
                    for k, pi in enumerate(junction.green)
                    if all(junction.phases[pi].state[i] in "Gg" for i in indices)
                )
                movements.append(Movement(to_edge, indices, served, len(conns)))
            feeders = _feeders(edge, tls_of_node)
            first = net.getEdge(feeders[0].edge) if feeders else edge
            upstream = tls_of_node.get(first.getFromNode().getID())
            approaches.append(
                Approach(
                    edge=edge_id,
                    junction=junction.tls,
                    lanes=edge.getLaneNumber(),
                    length_m=float(edge.getLength()),
                    speed_mps=float(edge.getSpeed()),
                    movements=tuple(movements),
                    upstream=upstream if upstream in corridor else None,
                    feeders=feeders,
                )
            )
            edges.append(edge_id)
        final.append(
            Junction(
                junction.tls,
                junction.program,
                junction.offset_s,
                junction.phases,
                junction.green,
                tuple(edges),
            )
        )
    if not final:
        raise ValueError(f"{path}: no traffic light with two or more green phases")
    return Network(str(path), tuple(final), tuple(approaches))


def _positive(value: object) -> float:
    """A phase's minDur/maxDur as a float, 0.0 where unset."""
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0.0
    return v if v > 0 and math.isfinite(v) else 0.0


def _phase_limits(programs: Iterable[object]) -> dict[str, tuple[float, float]]:
    """minDur and maxDur by phase state over all programs of a junction: netconvert keeps
    them only on actuated programs, so a fixed-time program's green phases take the minimum
    green of the same phase in the junction's actuated program."""
    limits: dict[str, tuple[float, float]] = {}
    for program in programs:
        for ph in program.getPhases():  # type: ignore[attr-defined]
            lo, hi = _positive(ph.minDur), _positive(ph.maxDur)
            if lo > 0 and ph.state not in limits:
                limits[ph.state] = (lo, hi if hi > 0 else math.inf)
    return limits


def _feeders(edge: Any, tls_of_node: Mapping[str, str]) -> tuple[Feeder, ...]:
    """The edges that alone lead to ``edge``: back through nodes that no traffic light
    controls and that join one road edge to the next only (the opposite direction of a
    two-way road aside), as netconvert makes them where the lane count or the speed
    changes or a turn pocket begins."""

    def road(e: Any) -> bool:
        return bool(e.allows("passenger"))

    chain: list[Feeder] = []
    seen = {edge.getID()}
    cur = edge
    while True:
        node = cur.getFromNode()
        if node.getID() in tls_of_node:
            break
        # the edges connected on to this one (a U-turn from the opposite direction aside)
        ins = [
            e
            for e in node.getIncoming()
            if road(e) and cur in e.getOutgoing() and e.getFromNode() != cur.getToNode()
        ]
        if len(ins) != 1 or ins[0].getID() in seen:
            break
        prev = ins[0]
        # ... and it leads nowhere else (a U-turn aside)
        if any(
            road(e) and e is not cur and e.getToNode() != prev.getFromNode()
            for e in prev.getOutgoing()
        ):
            break
        chain.append(Feeder(prev.getID(), prev.getLaneNumber(), float(prev.getLength())))
        seen.add(prev.getID())
        cur = prev
    return tuple(reversed(chain))


def _node_ids(tls: object) -> set[str]:
    """Ids of the nodes a traffic light system controls (a joined tls controls several)."""
    if tls is None:
        return set()
    nodes: set[str] = set()
    for in_lane, _out, _i in tls.getConnections():  # type: ignore[attr-defined]
        nodes.add(in_lane.getEdge().getToNode().getID())
    return nodes
