"""Faults of a water network: a leak in a district, a pump losing head.

Both are model parameters, so the plant applies them through ``set_params`` and the twin
represents them (the diagnosis fits them):

* ``<district>.leak``: leak flow (m3/h) at the nominal pressure of the district's leak
  node, an EPANET emitter there (coefficient ``leak / sqrt(p_nom)``).  Districts group the
  junctions by their nearest tank along the pipes (length-weighted), so any
  ``.inp`` gets a handful of them; a district's leak node is its junction of largest
  demand (then first by name).
* ``<pump>.head_scale``: the fraction of its curve's head a pump delivers (1 healthy).

The twin adds to its identified flows a sensitivity per fault parameter and on/off
combination, measured on EPANET when the model is built (finite differences at sampled
operating points), so a fault's signature comes from the network, not from a table.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import numpy as np

from parallelcity.twin.model import Array, FaultEffect, FaultKind, FaultTarget

from .districts import FaultLayout, fault_layout
from .epanet_plant import EpanetPlant, Layout, solve_snapshot
from .tank_model import Identified, basis_np, fit

LEAK = "leak"
HEAD_LOSS = "pump_head_loss"
HEAD_STEP = 0.2  # head loss fraction of the finite difference
LEAK_STEP_SHARE = 0.05  # leak of the finite difference: this share of the total base demand
SENS_POINTS = 3  # operating points per on/off combination
MAX_HEAD_LOSS = 0.5  # the plant's worn curves go down to half the head
MIN_HEAD_LOSS = 0.04  # two of the plant's curve steps
# smallest diagnosable fault: its effect on the tank inflows over one cycle, in level units,
# this many times the twin's own fit error (root-sum-square over the tanks)
VISIBLE_SIGMAS = 3.0


def kinds(
    layout: FaultLayout, min_leak: float, max_leak: float, min_head_loss: float
) -> tuple[FaultKind, ...]:
    out = []
    if layout.districts:
        out.append(
            FaultKind(
                LEAK,
                FaultTarget.PARAMETER,
                FaultEffect.ADD,
                min_size=min_leak,
                unit="m3/h",
                components={d.name: (f"{d.name}.leak",) for d in layout.districts},
                max_size=max_leak,
                description="a leak in a district: an emitter at its leak node, sized by its "
                "flow at the node's nominal pressure",
            )
        )
    if layout.pumps:
        out.append(
            FaultKind(
                HEAD_LOSS,
                FaultTarget.PARAMETER,
                FaultEffect.SCALE,
                min_size=min(min_head_loss, MAX_HEAD_LOSS / 2),
                unit="of head lost",
                components={p: (f"{p}.head_scale",) for p in layout.pumps},
                max_size=MAX_HEAD_LOSS,
                description="a pump delivering 1 - size of its curve's head at every flow",
            )
        )
    return tuple(out)


def min_sizes(sens: Array, rms: Array, layout: FaultLayout, power: slice) -> tuple[float, float]:
    """The smallest leak (m3/h) and head loss (fraction) that moves the twin's hydraulic
    targets (tank inflows, pump and source flows, critical pressures; not ``power``, the
    pump powers, which no sensor of a pump station needs) by ``VISIBLE_SIGMAS`` times the
    twin's own fit error, root-sum-square over the targets, for the least visible district
    or pump at the on/off combination where it shows most (``sens``: (cases, faults,
    targets)).  A head loss is at least ``MIN_HEAD_LOSS``: the plant's worn curves come in
    steps of 0.02."""
    keep = np.ones(sens.shape[2], dtype=bool)
    keep[power] = False
    z = sens[:, :, keep] / np.maximum(rms[keep], 1e-9)[None, None, :]
    effect = np.sqrt(np.sum(z * z, axis=2)).max(axis=0)  # (faults,)
    need = VISIBLE_SIGMAS / np.maximum(effect, 1e-12)
    nd = len(layout.districts)
    leak = float(need[:nd].max()) if nd else math.inf
    head = max(MIN_HEAD_LOSS, float(need[nd:].max())) if layout.pumps else math.inf
    return leak, head


def _cases(ident: Identified) -> list[tuple[float, ...]]:
    k = len(ident.layout.switches)
    if ident.multilinear:
        return [tuple(map(float, c)) for c in itertools.product((0, 1), repeat=k)]
    return [tuple(float(i == j) for i in range(k)) for j in range(-1, k)]  # all off, one on


def fault_sensitivity(ident: Identified, plant: EpanetPlant, seed: int) -> Identified:
    """``ident`` with the targets' sensitivity to every fault parameter: per on/off
    combination, finite differences on EPANET averaged over ``SENS_POINTS`` operating
    points, then blended over the combinations like the fit (least squares on the basis)."""
    layout = ident.layout
    net = layout.network
    flt = fault_layout(net)
    nf = len(flt.parameters)
    if nf == 0:
        return ident
    rng = np.random.default_rng([seed, 1])
    nt, npump, nv = len(net.tanks), len(net.pumps), len(net.valves)
    x0 = np.array([t.init_level_m for t in net.tanks])
    d0 = np.array([net.multiplier(g, 0.0) for g in net.groups] + [0.0])
    u0 = np.concatenate(
        [
            [1.0 if p.initial_on else 0.0 for p in net.pumps],
            [v.setting for v in net.valves],
            [1.0 if s in net.initially_open_pipes else 0.0 for s in net.switched_pipes],
        ]
    )
    solve_snapshot(plant, x0.tolist(), u0, d0)
    p_nom = np.array([max(1.0, plant.pressure(d.leak_node)) for d in flt.districts])
    leak_coef = 1.0 / np.sqrt(p_nom)
    leak_step = LEAK_STEP_SHARE * max(1.0, sum(net.group_totals().values()))
    lo = np.array([t.min_level_m for t in net.tanks])
    hi = np.array([t.max_level_m for t in net.tanks])
    longest = max(len(v) for v in net.patterns.values())
    cases = _cases(ident)
    rows, sens_cases = [], []
    for case in cases:
        diffs = []
        for _ in range(SENS_POINTS):
            x = lo + (hi - lo) * rng.uniform(0.2, 0.8, len(lo))
            when = int(rng.integers(0, longest)) * net.pattern_step_s
            d = np.array([net.multiplier(g, when) for g in net.groups] + [0.0])
            u = np.concatenate([case[:npump], [v.setting for v in net.valves], case[npump:]])
            try:
                base = _targets(plant, x, u, d, nt)
                diff = np.empty((nf, len(base)))
                for i, dist in enumerate(flt.districts):
                    plant.set_leak(dist.leak_node, leak_step * leak_coef[i])
                    try:
                        diff[i] = (_targets(plant, x, u, d, nt) - base) / leak_step
                    finally:
                        plant.set_leak(dist.leak_node, 0.0)
                for j, pump in enumerate(flt.pumps):
                    plant.scale_pump_head(pump, 1.0 - HEAD_STEP)
                    try:
                        diff[len(flt.districts) + j] = (
                            _targets(plant, x, u, d, nt) - base
                        ) / HEAD_STEP
                    finally:
                        plant.scale_pump_head(pump, 1.0)
            except Exception:  # an operating point EPANET cannot solve is left out
                continue
            diffs.append(diff)
        if diffs:
            rows.append(basis_np(np.array(case), ident.multilinear))
            sens_cases.append(np.mean(diffs, axis=0))
    del nv
    if not rows:
        return replace(ident, leak_coef=leak_coef)
    b, s = np.array(rows), np.array(sens_cases)
    flat = s.reshape(len(s), -1)
    theta = np.linalg.lstsq(b, flat, rcond=None)[0]
    return replace(
        ident,
        sens=theta.reshape(b.shape[1], nf, -1),
        sens_cases=s,
        leak_coef=leak_coef,
    )


def _targets(plant: EpanetPlant, x: Array, u: Array, d: Array, nt: int) -> Array:
    y, inflow = solve_snapshot(plant, x.tolist(), u, d)
    return np.concatenate([inflow, y[nt:-2]])


def identify(layout: Layout, time0: float, samples_per_case: int, seed: int) -> Identified:
    """The twin's relation fitted on EPANET solutions (``tank_model``), with the effect of
    every fault parameter measured on the same plant."""
    plant = EpanetPlant(layout, np.array([1.0]), time0)
    try:
        return fault_sensitivity(fit(layout, plant, samples_per_case, seed), plant, seed)
    finally:
        plant.close()
