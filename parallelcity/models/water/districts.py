"""The network's fault layout: its districts (junctions grouped by their nearest tank along
the pipes, each with the junction a leak is planted at) and its pumps with a head curve,
and where their fault parameters sit in the model's parameter vector."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from parallelcity.twin.model import Array

from .network import Network, read_wntr, resolve


@dataclass(frozen=True)
class District:
    name: str  # "district_<tank or source>"
    anchor: str  # the tank or source it is nearest to
    junctions: tuple[str, ...]
    leak_node: str


@dataclass(frozen=True)
class FaultLayout:
    """Where the fault parameters sit after ``demand.scale`` and how the plant applies them."""

    districts: tuple[District, ...]
    pumps: tuple[str, ...]  # pumps with a head curve

    @property
    def parameters(self) -> tuple[str, ...]:
        return tuple(f"{d.name}.leak" for d in self.districts) + tuple(
            f"{p}.head_scale" for p in self.pumps
        )

    @property
    def nominal(self) -> Array:
        return np.concatenate([np.zeros(len(self.districts)), np.ones(len(self.pumps))])

    def deviation(self, p: Array) -> Array:
        """Fault parameters as the twin's sensitivities count them: leak flows, head losses."""
        nd = len(self.districts)
        q = np.asarray(p, dtype=float)
        return np.concatenate([q[:nd], 1.0 - q[nd:]])


_LAYOUTS: dict[str, FaultLayout] = {}


def fault_layout(net: Network) -> FaultLayout:
    """The network's districts and head-curve pumps (cached per file)."""
    found = _LAYOUTS.get(net.source)
    if found is None:
        found = _LAYOUTS[net.source] = _fault_layout(net)
    return found


def _fault_layout(net: Network) -> FaultLayout:
    import networkx as nx

    wn = read_wntr(resolve(net.source))
    g = nx.Graph()
    for name in wn.link_name_list:
        link = wn.get_link(name)
        length = float(getattr(link, "length", 1.0) or 1.0)
        a, b = link.start_node_name, link.end_node_name
        if not g.has_edge(a, b) or g[a][b]["w"] > length:
            g.add_edge(a, b, w=length)
    # tanks only: a junction beside a source is fed straight from it, and its leak reads
    # the same as one in the nearest tank's district (Net3's lake and river stations)
    anchors = [t.name for t in net.tanks] or list(net.reservoirs)
    members: dict[str, list[str]] = {a: [] for a in anchors}
    sources = [a for a in anchors if a in g]
    if sources:
        _, paths = nx.multi_source_dijkstra(g, sources, weight="w")
    else:
        paths = {}
    demand = {j.name: sum(b for b, _ in j.demands) for j in net.junctions}
    for j in net.junctions:
        path = paths.get(j.name)
        if path:
            members[path[0]].append(j.name)
    districts = []
    for anchor in anchors:
        js = sorted(members[anchor])
        if not js:
            continue
        leak_node = min(js, key=lambda n: (-demand[n], n))
        districts.append(District(f"district_{anchor}", anchor, tuple(js), leak_node))
    pumps = tuple(p.name for p in net.pumps if p.curve)
    return FaultLayout(tuple(districts), pumps)
