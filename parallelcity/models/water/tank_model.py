"""The twin of a water network: tank mass balances with flows identified from EPANET.

No hydraulic relation is typed by hand.  When the model is built, EPANET solves the
network's steady hydraulics at sampled operating points: tank levels across their
ranges, demand multipliers around the patterns' values, every on/off combination of the
switched links (pumps and the pipes the file's controls switch).  For each combination
``c`` a least-squares fit gives every flow, power and pressure as an affine function of

    phi = [1, tank levels, scale * (group total demand * group multiplier), valve settings]

so pump flow comes from the pump curve at the operating head that the tank levels and
demands set.  Across combinations the fits are blended multilinearly in the on/off
inputs (exact at 0/1; with more than ``MAX_COMBINATION_SWITCHES`` switches the blend is
affine: one term per switch).  The tank balance is then

    level+ = clip(level + h * inflow(level, u, d) / (3600 area), min, max)

over substeps ``h`` of at most ``MAX_SUBSTEP_S`` within ``step_s``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import casadi as ca
import numpy as np

from parallelcity.twin.model import Array

from .districts import fault_layout
from .epanet_plant import EpanetPlant, Layout, solve_snapshot

MAX_COMBINATION_SWITCHES = 6
MAX_SUBSTEP_S = 300.0
DEMAND_SPREAD = 0.25  # sampled multipliers within +-25 % of a pattern value
RIDGE = 1e-8
AT_LIMIT_M = 1e-3  # a tank this close to its top (bottom) is full (empty)


@dataclass(frozen=True, eq=False)
class Identified:
    """Fitted relation: ``targets = kron(basis(u_switch), phi) @ theta``; targets are
    tank inflows (m3/h) followed by the model outputs after the tank levels, up to the
    pump power (the two totals are sums).  ``rms``: the fit's residual per target."""

    layout: Layout
    multilinear: bool
    theta: Array  # (nbasis * nphi, ntargets)
    rms: Array
    samples: int
    # fault parameters (``faults.FaultLayout``): targets change by ``deviation @ sens`` blended
    # like theta: sens (nbasis, nfaults, ntargets); sens_cases as measured per combination
    sens: Array | None = None
    sens_cases: Array | None = None
    leak_coef: Array | None = None  # emitter coefficient per m3/h of leak, per district

    def affine(self, switches: Array) -> tuple[Array, Array, Array, Array]:
        """The fit at one on/off combination of ``layout.switches`` as
        ``targets = c + L @ levels + D @ group_demand + V @ valve_settings``: returns
        ``(c, L, D, V)``, ``group_demand`` in m3/h (scale * total * multiplier per group);
        a MILP can plan with these per combination."""
        net = self.layout.network
        nt, ng, nv = len(net.tanks), len(net.groups), len(net.valves)
        nphi = 1 + nt + ng + nv
        w = basis_np(np.asarray(switches, dtype=float), self.multilinear)
        blended = np.tensordot(w, self.theta.reshape(len(w), nphi, -1), axes=1).T
        return (
            blended[:, 0],
            blended[:, 1 : 1 + nt],
            blended[:, 1 + nt : 1 + nt + ng],
            blended[:, 1 + nt + ng :],
        )


def basis_np(u_sw: Array, multilinear: bool) -> Array:
    u = np.asarray(u_sw, dtype=float)
    if not multilinear:
        return np.concatenate([[1.0], u])
    out = np.ones(1)
    for ui in u:
        out = np.concatenate([out * (1.0 - ui), out * ui])
    return out


def basis_ca(u_sw: ca.SX, multilinear: bool) -> ca.SX:
    n = u_sw.numel()
    if not multilinear:
        return ca.vertcat(1.0, u_sw)
    out = ca.SX.ones(1)
    for i in range(n):
        out = ca.vertcat(out * (1.0 - u_sw[i]), out * u_sw[i])
    return out


def phi_np(layout: Layout, x: Array, d: Array, scale: float, valves: Array) -> Array:
    totals = np.array(list(layout.network.group_totals().values()))
    ng = len(totals)
    return np.concatenate([[1.0], x, scale * totals * np.asarray(d)[:ng], valves])


def fit(layout: Layout, plant: EpanetPlant, per_case: int, seed: int) -> Identified:
    net = layout.network
    rng = np.random.default_rng(seed)
    k = len(layout.switches)
    multilinear = k <= MAX_COMBINATION_SWITCHES
    cases: list[tuple[float, ...]]
    if multilinear:
        cases = [tuple(map(float, c)) for c in itertools.product((0, 1), repeat=k)]
    else:
        cases = [tuple(map(float, rng.integers(0, 2, k))) for _ in range(4 * (k + 1))]
    nv, npump = len(net.valves), len(net.pumps)
    lo = np.array([t.min_level_m for t in net.tanks])
    hi = np.array([t.max_level_m for t in net.tanks])
    longest = max(len(v) for v in net.patterns.values())
    rows, targets = [], []
    for case in cases:
        for _ in range(per_case):
            x = lo + (hi - lo) * rng.uniform(0.02, 0.98, len(lo))
            when = rng.integers(0, longest) * net.pattern_step_s
            d = np.array(
                [
                    net.multiplier(g, when) * rng.uniform(1 - DEMAND_SPREAD, 1 + DEMAND_SPREAD)
                    for g in net.groups
                ]
                + [0.0]
            )
            valves = np.array([v.setting * rng.uniform(0.5, 1.5) for v in net.valves])
            u = np.empty(len(layout.inputs))
            u[:npump] = case[:npump]
            u[npump : npump + nv] = valves
            u[npump + nv :] = case[npump:]
            try:
                y, inflow = solve_snapshot(plant, x, u, d)
            except Exception:  # an operating point EPANET cannot solve is left out
                continue
            nt = len(net.tanks)
            rows.append(
                np.kron(basis_np(np.array(case), multilinear), phi_np(layout, x, d, 1.0, valves))
            )
            targets.append(np.concatenate([inflow, y[nt:-2]]))
    a, b = np.array(rows), np.array(targets)
    if a.shape[0] < a.shape[1] // 2:
        raise ValueError(f"{net.source}: EPANET solved too few operating points to fit a twin")
    theta = np.linalg.solve(a.T @ a + RIDGE * np.eye(a.shape[1]), a.T @ b)
    rms = np.sqrt(np.mean((a @ theta - b) ** 2, axis=0))
    return Identified(layout, multilinear, theta, rms, a.shape[0])


def casadi_functions(
    ident: Identified,
    step_s: float,
    areas: Array,
    lo: Array,
    hi: Array,
    close_full_tanks: bool = False,
) -> tuple[ca.Function, ca.Function]:
    """``f(x, u, d, p)`` (levels after ``step_s``) and ``h(x, u, d, p)`` (outputs); ``p`` is
    ``demand.scale`` then the fault parameters (``faults.FaultLayout``).  With
    ``close_full_tanks`` a full (empty) tank is closed to inflow (outflow) as EPANET
    closes it (``closed_levels``)."""
    layout = ident.layout
    net = layout.network
    nt, npump, nv = len(net.tanks), len(net.pumps), len(net.valves)
    nu, nd = len(layout.inputs), len(layout.disturbances)
    flt = fault_layout(net)
    nf = len(flt.parameters)
    x, u, d = ca.SX.sym("x", nt), ca.SX.sym("u", nu), ca.SX.sym("d", nd)
    p = ca.SX.sym("p", 1 + nf)
    cols = layout.switch_columns()
    u_sw = ca.vertcat(*[u[i] for i in cols]) if cols else ca.SX(0, 1)
    valves = ca.vertcat(*[u[npump + i] for i in range(nv)]) if nv else ca.SX(0, 1)
    basis = basis_ca(u_sw, ident.multilinear)
    totals = np.array(list(net.group_totals().values()))
    ng = len(totals)
    theta = ca.DM(ident.theta)

    nd_leak = len(flt.districts)
    dev = ca.vertcat(*[p[1 + i] if i < nd_leak else 1.0 - p[1 + i] for i in range(nf)])

    def open_targets(level: ca.SX) -> ca.SX:
        phi = ca.vertcat(1.0, level, p[0] * totals * d[:ng], valves)
        feats = ca.kron(basis, phi)
        out = ca.mtimes(theta.T, feats)
        if ident.sens is not None and nf:
            for i in range(nf):
                out += dev[i] * ca.mtimes(ca.DM(ident.sens[:, i, :]).T, basis)
        return out

    # d inflow_i / d level_i at this combination (the fit is affine in the levels)
    nphi = 1 + nt + ng + nv
    theta3 = ident.theta.reshape(-1, nphi, ident.theta.shape[1])
    slope = [ca.dot(basis, ca.DM(theta3[:, 1 + i, i])) for i in range(nt)]

    def targets(level: ca.SX) -> ca.SX:
        if not close_full_tanks:
            return open_targets(level)
        return open_targets(closed_levels(level, open_targets(level)[:nt], slope, lo, hi))

    n_sub = max(1, math.ceil(step_s / MAX_SUBSTEP_S - 1e-9))
    h_s = step_s / n_sub
    level = x
    for _ in range(n_sub):
        inflow = targets(level)[:nt]
        level = ca.fmin(ca.fmax(level + h_s * inflow / (3600.0 * areas), lo), hi)
    f = ca.Function("F", [x, u, d, p], [level], ["x", "u", "d", "p"], ["x_next"])
    rest = targets(x)[nt:]
    kw = rest[npump : 2 * npump]
    total = ca.sum1(kw) if npump else ca.SX(0)
    y = ca.vertcat(x, rest, total, total * d[nd - 1])
    h = ca.Function("h", [x, u, d, p], [y], ["x", "u", "d", "p"], ["y"])
    return f, h


def closed_levels(level: ca.SX, inflow: ca.SX, slope: list[ca.SX], lo: Array, hi: Array) -> ca.SX:
    """Levels as the rest of the network sees them: EPANET closes a full tank to inflow and
    an empty one to outflow, and a closed tank is hydraulically a tank whose head stands
    where its inflow is zero (``level - inflow / slope`` on the affine fit)."""
    out = []
    for i in range(level.numel()):
        s = slope[i]
        stop = ca.logic_or(
            ca.logic_and(level[i] >= hi[i] - AT_LIMIT_M, inflow[i] > 0),
            ca.logic_and(level[i] <= lo[i] + AT_LIMIT_M, inflow[i] < 0),
        )
        usable = ca.logic_and(stop, s < -1e-9)
        out.append(ca.if_else(usable, level[i] - inflow[i] / ca.fmin(s, -1e-9), level[i]))
    return ca.vertcat(*out)
