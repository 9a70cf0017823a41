"""EPANET as a plant: the network's hydraulics stepped in-process by its toolkit.

Each ``EpanetPlant`` is its own EPANET 2.2 project (WNTR's ``ENepanet`` binding creates a
project handle per object), so any number coexist in one process: the verification rig
holds one per uncertainty sample, the field stand-in one more.

The file is opened as WNTR rewrites it: in SI units (flows m3/h, heads and pressures m),
with the network's own controls and rules removed, because the controller decides
(the ``inp_rules`` controller runs them instead).  Junction demands are set each step
from the disturbances (one multiplier per demand group, times the ``demand.scale``
parameter); the file's demand patterns are not used, so the plant's demand follows the
scenario's clock through the model's forecast.  Remaining patterns (reservoir heads)
are aligned by setting EPANET's pattern start at ``reset``.

Times: EPANET counts whole seconds; ``step`` carries the fraction to the next call.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from parallelcity.twin.model import Array

from .districts import fault_layout
from .network import Network, read_wntr, resolve

# EPANET toolkit codes (epanet2_enums.h)
EN_BASEDEMAND, EN_EMITTER, EN_DEMAND, EN_HEAD, EN_PRESSURE, EN_TANKLEVEL = 1, 3, 9, 10, 11, 8
EN_FLOW, EN_STATUS, EN_SETTING, EN_ENERGY, EN_PUMP_HCURVE = 8, 11, 12, 13, 19
EN_DURATION, EN_HYDSTEP, EN_PATTERNSTART, EN_REPORTSTEP = 0, 1, 4, 5
LONG_RUN_S = 10 * 365 * 86400  # the plant never reaches the end of its run
ON_THRESHOLD = 0.5  # an on/off input at or above this is on
HEAD_FACTORS = tuple(round(0.5 + 0.02 * k, 2) for k in range(26))  # worn pumps: 0.5 .. 1.0

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layout:
    """Where a model's signals sit in its vectors (names come from the network)."""

    network: Network
    critical: tuple[str, ...]  # critical nodes, in output order

    @property
    def inputs(self) -> tuple[str, ...]:
        n = self.network
        return (
            tuple(f"{p.name}.on" for p in n.pumps)
            + tuple(f"{v.name}.setting" for v in n.valves)
            + tuple(f"{s}.open" for s in n.switched_pipes)
        )

    @property
    def switches(self) -> tuple[str, ...]:
        """Links switched on/off by an input: pumps, then switched pipes."""
        n = self.network
        return tuple(p.name for p in n.pumps) + n.switched_pipes

    def switch_columns(self) -> list[int]:
        nv = len(self.network.valves)
        npump = len(self.network.pumps)
        return list(range(npump)) + [
            npump + nv + i for i in range(len(self.network.switched_pipes))
        ]

    @property
    def disturbances(self) -> tuple[str, ...]:
        return tuple(f"demand.{g}" for g in self.network.groups) + ("tariff.price",)

    @property
    def outputs(self) -> tuple[str, ...]:
        n = self.network
        return (
            tuple(f"{t.name}.level" for t in n.tanks)
            + tuple(f"{p.name}.flow" for p in n.pumps)
            + tuple(f"{p.name}.kw" for p in n.pumps)
            + tuple(f"{r}.supply" for r in n.reservoirs)  # node and link ids may repeat
            + tuple(f"{c}.pressure" for c in self.critical)
            + ("pumps.kw", "tariff.cost_per_h")
        )


class EpanetPlant:
    """One EPANET project as a ``Simulator`` of a water network model (see the module
    docstring); ``params`` = (``demand.scale``, then optionally the fault parameters of
    ``faults.FaultLayout``, which need ``leak_coef``: emitter coefficient per m3/h of leak
    of each district)."""

    def __init__(
        self, layout: Layout, params: Array, time0: float, leak_coef: Array | None = None
    ) -> None:
        from wntr.epanet.toolkit import ENepanet

        self.layout = layout
        self.scale = float(np.asarray(params, dtype=float).reshape(-1)[0])
        self.time0 = float(time0)
        self.leak_coef = leak_coef
        self._faults_now: Array | None = None
        net = layout.network
        self._en = ENepanet(version=2.2)
        path = _rewritten(net.source)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._en.ENopen(path, os.devnull, "")
        finally:
            os.unlink(path)
        en = self._en
        self._tanks = [en.ENgetnodeindex(t.name) for t in net.tanks]
        self._pumps = [en.ENgetlinkindex(p.name) for p in net.pumps]
        self._valves = [en.ENgetlinkindex(v.name) for v in net.valves]
        self._pipes = [en.ENgetlinkindex(s) for s in net.switched_pipes]
        self._res = [en.ENgetnodeindex(r) for r in net.reservoirs]
        self._crit = [en.ENgetnodeindex(c) for c in layout.critical]
        self._demands: list[tuple[int, int, float, int]] = []  # node, category, base, group
        groups = list(net.groups)
        for j in net.junctions:
            idx = en.ENgetnodeindex(j.name)
            for cat, (base, group) in enumerate(j.demands, start=1):
                self._demands.append((idx, cat, base, groups.index(group)))
        self._ncat = {i: c for i, c, _, _ in self._demands}
        for node, cat, _, _ in self._demands:
            self._call(
                "EN_setdemandpattern", ctypes.c_int(node), ctypes.c_int(cat), ctypes.c_int(0)
            )
        en.ENsettimeparam(EN_DURATION, LONG_RUN_S)
        en.ENsettimeparam(EN_REPORTSTEP, LONG_RUN_S)
        self._pattern_start0 = int(en.ENgettimeparam(EN_PATTERNSTART))
        en.ENopenH()
        self._d_applied: Array | None = None
        self._u_applied: Array | None = None
        self._x = np.full(len(net.tanks), np.nan)
        self._elapsed = 0.0  # seconds since reset
        self._en_time = 0  # EPANET's whole seconds since reset
        self._solved = False
        self._kwh = 0.0
        self._cost = 0.0
        self._starts = 0
        self._areas = np.array([t.area_m2 for t in net.tanks])
        self._stored0: float | None = None  # m3 in the tanks at the first reset
        self._on_prev: NDArray[np.bool_] | None = None
        if np.asarray(params).size > 1:
            self.set_params(params)

    # ---------------------------------------------------------------- toolkit

    def _call(self, fn: str, *args: Any) -> None:
        code = getattr(self._en.ENlib, fn)(self._en._project, *args)
        if code >= 100:
            raise RuntimeError(f"EPANET {fn} failed with error {code}")

    def close(self) -> None:
        if self._en.fileLoaded:
            self._en.ENcloseH()
            self._en.ENclose()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: the library may be gone
            self.close()

    # ------------------------------------------------------------ simulator

    @property
    def state(self) -> Array:
        return self._x.copy()

    def reset(self, x0: Array, t0: float) -> None:
        en, net = self._en, self.layout.network
        x = np.asarray(x0, dtype=float).reshape(len(net.tanks))
        for idx, tank, level in zip(self._tanks, net.tanks, x, strict=True):
            lo, hi = tank.min_level_m, tank.max_level_m
            en.ENsetnodevalue(idx, EN_TANKLEVEL, float(np.clip(level, lo, hi)))
        start = self._pattern_start0 + round(t0 - self.time0)
        en.ENsettimeparam(EN_PATTERNSTART, max(0, start))
        en.ENinitH(0)
        self._x = np.clip(x, [t.min_level_m for t in net.tanks], [t.max_level_m for t in net.tanks])
        self._elapsed, self._en_time, self._solved = 0.0, 0, False
        self._u_applied = self._d_applied = None
        if self._stored0 is None:
            self._stored0 = float(self._areas @ self._x)

    def step(self, u: Array, d: Array, dt: float) -> None:
        self._apply(u, d)
        en = self._en
        self._elapsed += float(dt)
        target = math.floor(self._elapsed + 1e-6)
        power = 0.0
        while self._en_time < target:
            en.ENsettimeparam(EN_HYDSTEP, target - self._en_time)
            en.ENrunH()
            power = sum(max(0.0, en.ENgetlinkvalue(i, EN_ENERGY)) for i in self._pumps)
            tstep = int(en.ENnextH())
            if tstep <= 0:
                break
            self._kwh += power * tstep / 3600.0
            self._cost += power * float(np.asarray(d)[-1]) * tstep / 3600.0
            self._en_time += tstep
            self._solved = False
        self._x = np.array([self._level(i) for i in self._tanks])
        en.errcodelist.clear()  # the binding keeps every warning; a long run needs none

    def outputs(self, u: Array, d: Array) -> Array:
        self._apply(u, d)
        en = self._en
        if not self._solved:
            en.ENrunH()
            self._solved = True
        pumps_q = [en.ENgetlinkvalue(i, EN_FLOW) for i in self._pumps]
        pumps_kw = [max(0.0, en.ENgetlinkvalue(i, EN_ENERGY)) for i in self._pumps]
        sources = [-en.ENgetnodevalue(i, EN_DEMAND) for i in self._res]
        crit = [en.ENgetnodevalue(i, EN_PRESSURE) for i in self._crit]
        levels = [self._level(i) for i in self._tanks]
        price = float(np.asarray(d, dtype=float).reshape(-1)[-1])
        return np.array(
            levels + pumps_q + pumps_kw + sources + crit + [sum(pumps_kw), sum(pumps_kw) * price],
            dtype=float,
        )

    def tank_inflows(self) -> Array:
        """Net inflow (m3/h) of each tank at the last hydraulic solution."""
        return np.array([self._en.ENgetnodevalue(i, EN_DEMAND) for i in self._tanks])

    def kpis(self) -> dict[str, float]:
        """Energy (kWh), its cost, and pump starts since the plant was made; the water
        stored in the tanks now and its change since the first reset (m3)."""
        stored = float(self._areas @ self._x)
        change = stored - self._stored0 if self._stored0 is not None else math.nan
        return {
            "energy_kwh": self._kwh,
            "cost": self._cost,
            "pump_starts": float(self._starts),
            "stored_m3": stored,
            "stored_change_m3": change,
        }

    # ---------------------------------------------------------------- faults

    def set_params(self, params: Array) -> None:
        """New parameters from now on: ``demand.scale``, leaks and pump head scales (a
        parameter fault; ``faults.FaultLayout``)."""
        p = np.asarray(params, dtype=float).reshape(-1)
        if p[0] != self.scale:
            self.scale, self._d_applied = float(p[0]), None
        flt = fault_layout(self.layout.network)
        q = p[1:]
        if q.size != len(flt.parameters):
            raise ValueError(f"expected {1 + len(flt.parameters)} parameters, got {p.size}")
        old = flt.nominal if self._faults_now is None else self._faults_now
        nd = len(flt.districts)
        for i, dist in enumerate(flt.districts):
            if q[i] != old[i]:
                if self.leak_coef is None:
                    raise ValueError("this plant was made without leak coefficients")
                self.set_leak(dist.leak_node, max(0.0, float(q[i])) * float(self.leak_coef[i]))
        for j, pump in enumerate(flt.pumps):
            if q[nd + j] != old[nd + j]:
                self.scale_pump_head(pump, float(np.clip(q[nd + j], HEAD_FACTORS[0], 1.0)))
        self._faults_now = q.copy()

    def pressure(self, node: str) -> float:
        """Pressure (m) at ``node`` at the last hydraulic solution."""
        return float(self._en.ENgetnodevalue(self._en.ENgetnodeindex(node), EN_PRESSURE))

    def set_leak(self, node: str, coefficient: float) -> None:
        """A leak at ``node``: an emitter of ``coefficient`` (m3/h per m of pressure^0.5;
        0 removes it)."""
        self._en.ENsetnodevalue(self._en.ENgetnodeindex(node), EN_EMITTER, float(coefficient))
        self._solved = False

    def scale_pump_head(self, pump: str, factor: float) -> None:
        """Pump ``pump`` delivers ``factor`` (0.5..1, to the nearest 0.02) times its curve's
        head at every flow (a worn impeller; 1 restores it)."""
        net = self.layout.network
        spec = next((p for p in net.pumps if p.name == pump), None)
        if spec is None or not spec.curve:
            raise ValueError(f"{pump!r} is not a pump with a head curve")
        if not HEAD_FACTORS[0] <= factor <= HEAD_FACTORS[-1]:
            raise ValueError(f"head factor {factor:g} is outside {HEAD_FACTORS[0]}..1")
        i = [p.name for p in net.pumps].index(pump)
        pct = min(HEAD_FACTORS, key=lambda f: abs(f - factor))
        curve = self._curve_index(i, pct)
        self._en.ENsetlinkvalue(self._pumps[i], EN_PUMP_HCURVE, float(curve))
        self._solved = False

    # --------------------------------------------------------------- helpers

    def _curve_index(self, pump: int, factor: float) -> int:
        idx = ctypes.c_int()
        cid = _curve_id(pump, factor).encode("latin-1")
        if self._en.ENlib.EN_getcurveindex(self._en._project, cid, ctypes.byref(idx)):
            raise RuntimeError(f"the plant has no curve {cid!r}")
        return idx.value

    def _level(self, idx: int) -> float:
        return float(self._en.ENgetnodevalue(idx, EN_PRESSURE))

    def _apply(self, u: Array, d: Array) -> None:
        en = self._en
        u = np.asarray(u, dtype=float).reshape(-1)
        d = np.asarray(d, dtype=float).reshape(-1)
        if self._u_applied is None or not np.array_equal(u, self._u_applied):
            npump, nv = len(self._pumps), len(self._valves)
            on = u[:npump] >= ON_THRESHOLD
            if self._on_prev is not None:
                self._starts += int(np.sum(on & ~self._on_prev))
            self._on_prev = on
            for i, idx in enumerate(self._pumps):
                en.ENsetlinkvalue(idx, EN_STATUS, 1.0 if on[i] else 0.0)
            for i, idx in enumerate(self._valves):
                if math.isfinite(u[npump + i]):
                    en.ENsetlinkvalue(idx, EN_SETTING, float(u[npump + i]))
            for i, idx in enumerate(self._pipes):
                open_ = u[npump + nv + i] >= ON_THRESHOLD
                en.ENsetlinkvalue(idx, EN_STATUS, 1.0 if open_ else 0.0)
            self._u_applied = u.copy()
            self._solved = False
        if self._d_applied is None or not np.array_equal(d, self._d_applied):
            for node, cat, base, g in self._demands:
                value = base * max(0.0, float(d[g])) * self.scale
                self._call(
                    "EN_setbasedemand",
                    ctypes.c_int(node),
                    ctypes.c_int(cat),
                    ctypes.c_double(value),
                )
            self._d_applied = d.copy()
            self._solved = False


def _rewritten(source: str) -> str:
    """A temporary copy of the network in SI units (m3/h) without its controls and rules."""
    import wntr

    wn = read_wntr(resolve(source))
    for name in list(wn.control_name_list):
        wn.remove_control(name)
    wn.options.hydraulic.demand_multiplier = 1.0  # folded into the base demands (network.py)
    # every pump's curve scaled in head by each of HEAD_FACTORS, ready for a worn pump
    # (the bundled EPANET corrupts its heap when a curve is rewritten with EN_setcurve)
    for i, name in enumerate(wn.pump_name_list):
        pump = wn.get_link(name)
        if pump.pump_type == "HEAD":
            points = wn.get_curve(pump.pump_curve_name).points
            for f in HEAD_FACTORS:
                wn.add_curve(_curve_id(i, f), "HEAD", [(q, h * f) for q, h in points])
    fd, path = tempfile.mkstemp(suffix=".inp", prefix="pc_water_")
    os.close(fd)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wntr.network.write_inpfile(wn, path, units="CMH")
    return path


def _curve_id(pump: int, factor: float) -> str:
    return f"pc{pump}_{round(100 * factor)}"  # EPANET ids are at most 31 characters


def plant_factory(
    layout: Layout, time0: float, leak_coef: Array | None = None
) -> Callable[[Array], EpanetPlant]:
    def make(params: Array) -> EpanetPlant:
        return EpanetPlant(layout, params, time0, leak_coef)

    return make


def solve_snapshot(
    plant: EpanetPlant, levels: Sequence[float], u: Array, d: Array
) -> tuple[Array, Array]:
    """Outputs and tank inflows of one steady hydraulic solution at ``levels`` (no time)."""
    plant.reset(np.asarray(levels, dtype=float), plant.time0)
    y = plant.outputs(u, d)
    return y, plant.tank_inflows()
