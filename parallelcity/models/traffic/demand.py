"""The demand a SUMO route file describes, as the twin sees it.

``read_demand`` turns the flows, vehicles and trips of route files into

* an **arrival profile** per entry approach: piecewise-constant rates (veh/h) over SUMO
  time, from each flow's rate and interval (single vehicles are counted in bins of
  ``bin_s``); a vehicle counts at every entry approach its route meets (the first
  corridor approach it meets, and any entry reached after leaving the corridor through an
  unsignalised junction: an entry has no modelled inflow);
* **turning shares** per approach: the share of the vehicles passing it that take each
  of its movements, over the whole file (vehicles weighted by how many there are).

Routes come from ``edges`` (inline or by route id); trips and flows given by ``from``/
``to`` (and ``via``) are routed on the network's shortest paths.  Vehicles whose route
meets the corridor first on an approach that is not an entry (they depart inside it)
add to the turning shares but to no arrival; ``Demand.unattributed_veh`` counts them.
"""

from __future__ import annotations

import itertools
import math
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from parallelcity.twin.model import Array

from .network import Network

DEFAULT_BIN_S = 900.0  # single vehicles are counted in bins of this length
DEFAULT_FLOW_S = 3600.0  # a flow without ``end``


@dataclass(frozen=True)
class Segment:
    begin_s: float
    end_s: float
    veh_h: float


@dataclass(frozen=True)
class Demand:
    arrivals: dict[str, tuple[Segment, ...]]  # entry approach -> rate segments (may overlap)
    shares: dict[str, dict[str, float]]  # approach -> to_edge -> share (sums to 1)
    vehicles: float  # vehicles in the files
    unattributed_veh: float  # of them, those that enter the corridor on an inner approach

    def mean_rates(self, entries: Sequence[str], start_s: Array, dt: float) -> Array:
        """Mean arrival rate (veh/h) over ``[t, t + dt)`` for each ``t`` in ``start_s``
        (SUMO seconds) and each entry approach: shape ``(len(start_s), len(entries))``."""
        starts = np.asarray(start_s, dtype=float).reshape(-1, 1)
        out = np.zeros((starts.shape[0], len(entries)))
        for j, entry in enumerate(entries):
            segs = self.arrivals.get(entry, ())
            if not segs:
                continue
            b = np.array([s.begin_s for s in segs])
            e = np.array([s.end_s for s in segs])
            r = np.array([s.veh_h for s in segs])
            overlap = np.clip(np.minimum(e, starts + dt) - np.maximum(b, starts), 0.0, None)
            out[:, j] = overlap @ r / dt
        return out


def sumocfg_files(sumocfg: str | Path) -> tuple[Path, list[Path], list[Path]]:
    """The network, route and additional files a ``.sumocfg`` names, made absolute
    against its folder.  ``ValueError`` if it is not one or names no network."""
    path = Path(sumocfg)
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        raise ValueError(f"{path}: not a readable SUMO configuration ({exc})") from exc

    def values(key: str) -> list[Path]:
        found: list[Path] = []
        for el in root.iter(key):
            for part in (el.get("value") or "").replace(";", ",").split(","):
                if part.strip():
                    p = Path(part.strip()).expanduser()
                    found.append(p if p.is_absolute() else path.parent / p)
        return found

    nets = values("net-file")
    if len(nets) != 1:
        raise ValueError(f"{path}: names {len(nets)} net-file values, expected one")
    routes, additional = values("route-files"), values("additional-files")
    missing = [str(p) for p in (*nets, *routes, *additional) if not p.is_file()]
    if missing:  # SUMO would refuse to start (and say so only in its own log)
        raise ValueError(f"{path}: names files that do not exist: {', '.join(missing)}")
    return nets[0], routes, additional


def sumo_time(text: str | None, default: float) -> float:
    """A SUMO time attribute: seconds, or ``[[d:]h:]m:s``."""
    if text is None or text == "":
        return default
    parts = [float(p) for p in text.split(":")]
    seconds = 0.0
    for p, unit in zip(reversed(parts), (1.0, 60.0, 3600.0, 86400.0), strict=False):
        seconds += p * unit
    return seconds


def _rate_veh_h(el: ET.Element, begin: float, end: float) -> float:
    if el.get("vehsPerHour") is not None:
        return float(el.get("vehsPerHour", "0"))
    if el.get("perHour") is not None:
        return float(el.get("perHour", "0"))
    period = el.get("period")
    if period is not None:
        if period.startswith("exp(") and period.endswith(")"):
            return float(period[4:-1]) * 3600.0
        return 3600.0 / float(period) if float(period) > 0 else 0.0
    if el.get("probability") is not None:
        return float(el.get("probability", "0")) * 3600.0
    if el.get("number") is not None and end > begin:
        return float(el.get("number", "0")) * 3600.0 / (end - begin)
    return 0.0


class _Router:
    """Shortest paths on the network file, for trips and flows given by from/to."""

    def __init__(self, net_file: str) -> None:
        self.net_file = net_file
        self._net: Any = None

    def route(self, edges: Sequence[str]) -> list[str]:
        import sumolib

        if self._net is None:
            self._net = sumolib.net.readNet(self.net_file)
        net = self._net
        path: list[str] = [edges[0]]
        for a, b in itertools.pairwise(edges):
            found, _cost = net.getShortestPath(net.getEdge(a), net.getEdge(b))
            if not found:
                return []
            path += [e.getID() for e in found[1:]]
        return path


def _edges_of(el: ET.Element, routes: dict[str, list[str]], router: _Router) -> list[str]:
    inner = el.find("route")
    if inner is None:
        dist = el.find("routeDistribution")
        inner = dist.findall("route")[-1] if dist is not None and dist.findall("route") else None
    if inner is not None and inner.get("edges"):
        return (inner.get("edges") or "").split()
    if el.get("route") is not None:
        return routes.get(el.get("route", ""), [])
    if el.get("from") is not None and el.get("to") is not None:
        via = (el.get("via") or "").split()
        try:
            return router.route([el.get("from", ""), *via, el.get("to", "")])
        except Exception:  # an edge the network lacks: the trip is left out
            return []
    return []


def read_demand(
    route_files: Iterable[str | Path], network: Network, bin_s: float = DEFAULT_BIN_S
) -> Demand:
    """See the module docstring.  ``ValueError`` for a file that is not readable XML."""
    approaches = {a.edge: a for a in network.approaches}
    counts: dict[str, dict[str, float]] = {a: {} for a in approaches}
    segments: dict[str, list[Segment]] = {}
    binned: dict[tuple[str, int], float] = {}
    total = unattributed = 0.0
    router = _Router(network.net_file)
    for file in route_files:
        try:
            root = ET.parse(file).getroot()
        except (OSError, ET.ParseError) as exc:
            raise ValueError(f"{file}: not a readable route file ({exc})") from exc
        routes = {
            r.get("id", ""): (r.get("edges") or "").split()
            for r in root.iter("route")
            if r.get("id") is not None
        }
        for el in root:
            if el.tag not in ("flow", "vehicle", "trip"):
                continue
            edges = _edges_of(el, routes, router)
            if el.tag == "flow":
                begin = sumo_time(el.get("begin"), 0.0)
                end = sumo_time(el.get("end"), begin + DEFAULT_FLOW_S)
                rate = _rate_veh_h(el, begin, end)
                weight = rate * max(0.0, end - begin) / 3600.0
            else:
                begin = sumo_time(el.get("depart"), 0.0)
                end, rate, weight = begin, 0.0, 1.0
            if weight <= 0 or not math.isfinite(weight) or not edges:
                continue
            total += weight
            met = [e for e in edges if e in approaches]
            if not met:
                continue
            if not approaches[met[0]].is_entry:
                unattributed += weight
            # an entry has no modelled inflow: every vehicle reaching it arrives there, also
            # one that came from a corridor junction through an unsignalised junction
            for entry in (e for e in met if approaches[e].is_entry):
                if el.tag == "flow":
                    segments.setdefault(entry, []).append(Segment(begin, end, rate))
                else:
                    key = (entry, int(begin // bin_s))
                    binned[key] = binned.get(key, 0.0) + weight
            for a, b in itertools.pairwise(edges):
                if a in counts:
                    counts[a][b] = counts[a].get(b, 0.0) + weight
    for (edge, k), n in sorted(binned.items()):
        segments.setdefault(edge, []).append(Segment(k * bin_s, (k + 1) * bin_s, n * 3600 / bin_s))
    shares: dict[str, dict[str, float]] = {}
    for edge, approach in approaches.items():
        to_edges = [m.to_edge for m in approach.movements]
        seen = sum(counts[edge].get(t, 0.0) for t in to_edges)
        shares[edge] = {
            t: (counts[edge].get(t, 0.0) / seen if seen > 0 else 1.0 / len(to_edges))
            for t in to_edges
        }
    return Demand({k: tuple(v) for k, v in sorted(segments.items())}, shares, total, unattributed)
