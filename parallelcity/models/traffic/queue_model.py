"""The corridor's store-and-forward queue model in CasADi, a discrete-time map over ``T``.

For approach ``a`` with queue ``x_a`` (veh), saturation ``s_a`` (veh/s) and turning share
``b_m`` of each movement ``m``:

    cap_a  = s_a * sum_m b_m * G_m / C           G_m: green of the phases serving m
    out_a  = min(cap_a, x_a / T + e_a)           e_a: entry arrivals (0 inside)
    in_a   = sum over upstream approaches u and their movements m into a of b_m * out_u
    x_a+   = x_a + T * (e_a + in_a - out_a)

``G_k`` is ``network.greens`` written symbolically (``greens_sym``): in the normal case
``split_k * (C - L)``, so ``cap_a`` is linear in the splits at a given cycle ``C``.
The ``min`` is exact (piecewise linear, CasADi ``fmin``): where the queue cannot use the
green it gives way to what is queued plus what arrives, so queues never go below zero.
Vehicles reaching an inner approach in a step leave it at the earliest in the next (a
block takes longer than a step to drive), which keeps the map explicit.  Queues are
"vertical": a vehicle joins its approach's queue when it enters the approach.  Storage
is not clipped: spillback is a soft band for the controller (``[specs.bands]``), so the
model says by how much a plan would overfill a link instead of hiding it.

Outputs per approach: queue (veh), flow (veh/h over the stop line: ``out_a``), occupancy
(% of the lane length covered by vehicles, ``x_a / storage_a`` times the share of the jam
spacing a car fills, 5 m of 7.5 m: a queue estimate of what an e2 detector measures; e2
also counts moving vehicles, so it reads higher in free flow); and ``network.queued``, the
vehicles queued on all approaches: the queues above plus, per approach, the vehicles
standing at the red light in an average cycle, ``q_a d_a`` with Webster's uniform delay
``d_a = C (1 - lambda_a)^2 / (2 (1 - q_a / s_a))`` (``lambda_a = cap_a / s_a``, ``q_a`` the
arrivals), and those queued by random overflow, Webster's ``X^2 / (2 (1 - X))`` at the
degree of saturation ``X = q_a / (lambda_a s_a)`` (both ratios capped at 0.95).  A
cycle-averaged queue alone would be zero wherever the green suffices; these terms make
the split and cycle matter below saturation (convex in the splits), and their time
integral is the delay in veh*h the controllers are priced on.
"""

from __future__ import annotations

import casadi as ca

from .network import JAM_SPACING_M, Junction, Network

CAR_LENGTH_M = 5.0
MAX_FLOW_RATIO = 0.95  # q/s and q/(lambda s) in the delay terms are capped here (they diverge at 1)
MIN_GREEN_SHARE = 1e-3  # lambda below this counts as this in the saturation q / (lambda s)


def greens_sym(junction: Junction, splits: list[ca.SX], cycle_s: ca.SX) -> tuple[ca.SX, ca.SX]:
    """``network.greens`` as CasADi expressions: (green of each phase, effective cycle)."""
    mins = junction.min_greens_s
    cycle = ca.fmax(cycle_s, junction.min_cycle_s)
    effective = cycle - junction.lost_s
    asked = [ca.fmin(ca.fmax(s, 0.0), 1.0) for s in splits]
    asked.append(ca.fmax(0.0, 1.0 - sum(asked[1:], asked[0])))
    total = sum(asked[1:], asked[0])
    spare = effective - sum(mins)
    wanted = [a * effective for a in asked]
    normal = total <= 1.0 + 1e-12
    for w, m in zip(wanted, mins, strict=True):
        normal = ca.logic_and(normal, w >= m)
    safe = [m + spare * a / total for a, m in zip(asked, mins, strict=True)]
    return ca.vertcat(*[ca.if_else(normal, w, s) for w, s in zip(wanted, safe, strict=True)]), cycle


def queue_functions(
    network: Network, shares: dict[str, dict[str, float]], step_s: float
) -> tuple[ca.Function, ca.Function]:
    """``(f, h)``: ``x+ = f(x, u, d, p)`` over ``step_s`` and ``y = h(x, u, d, p)`` in the
    order of ``network.signal_names`` (parameters: saturation and storage per approach,
    then ``demand.scale``, ``driver.sigma``, ``driver.tau``)."""
    from .network import signal_names

    names = signal_names(network)
    approaches = network.approaches
    na = len(approaches)
    x = ca.SX.sym("x", na)
    u = ca.SX.sym("u", len(names["inputs"]))
    d = ca.SX.sym("d", len(names["disturbances"]))
    p = ca.SX.sym("p", len(names["parameters"]))
    inputs = list(names["inputs"])
    fraction: dict[str, ca.SX] = {}  # tls -> green fractions G_k / C
    cycles: dict[str, ca.SX] = {}
    for j in network.junctions:
        splits = [u[inputs.index(f"{j.tls}.split{k}")] for k in range(len(j.green) - 1)]
        g, cycles[j.tls] = greens_sym(j, splits, u[inputs.index(f"{j.tls}.cycle_s")])
        fraction[j.tls] = g / cycles[j.tls]
    entries = list(names["disturbances"])
    index = {a.edge: i for i, a in enumerate(approaches)}
    out, served = [], []
    for i, a in enumerate(approaches):
        frac = fraction[a.junction]
        lam = ca.SX(0)
        for m in a.movements:
            green = sum((frac[k] for k in m.green_phases), ca.SX(0)) if m.green_phases else 1.0
            lam += shares[a.edge][m.to_edge] * green
        served.append(lam)
        cap = p[2 * i] / 3600.0 * lam
        entry = d[entries.index(f"{a.edge}.arrival")] / 3600.0 if a.is_entry else 0.0
        out.append(ca.fmin(cap, x[i] / step_s + entry))
    x_next, cyclic = [], []
    for i, a in enumerate(approaches):
        inflow = d[entries.index(f"{a.edge}.arrival")] / 3600.0 if a.is_entry else 0.0
        for up in approaches:
            for m in up.movements:
                if m.to_edge == a.edges[0]:
                    inflow += shares[up.edge][m.to_edge] * out[index[up.edge]]
        x_next.append(x[i] + step_s * (inflow - out[i]))
        # Webster's uniform delay per vehicle, C (1 - lambda)^2 / (2 (1 - q/s)), times the
        # arrival rate (Little): the vehicles standing at the red light in an average cycle.
        sat = p[2 * i] / 3600.0
        y_ratio = ca.fmin(inflow / sat, MAX_FLOW_RATIO)
        delay = cycles[a.junction] * (1.0 - served[i]) ** 2 / (2.0 * (1.0 - y_ratio))
        # and Webster's random-overflow term, X^2 / (2 (1 - X)) vehicles at saturation X
        x_ratio = ca.fmin(inflow / (sat * ca.fmax(served[i], MIN_GREEN_SHARE)), MAX_FLOW_RATIO)
        cyclic.append(inflow * delay + x_ratio**2 / (2.0 * (1.0 - x_ratio)))
    y = []
    for i, _a in enumerate(approaches):
        occupancy = 100.0 * x[i] / p[2 * i + 1] * CAR_LENGTH_M / JAM_SPACING_M
        y += [x[i], 3600.0 * out[i], occupancy]
    y.append(ca.sum1(x) + sum(cyclic, ca.SX(0)))
    y.append(ca.SX(0))  # network.teleports: a plan the model accepts jams nothing
    f = ca.Function("F", [x, u, d, p], [ca.vertcat(*x_next)], ["x", "u", "d", "p"], ["x_next"])
    h = ca.Function("h", [x, u, d, p], [ca.vertcat(*y)], ["x", "u", "d", "p"], ["y"])
    return f, h
