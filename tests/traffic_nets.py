"""Small SUMO networks generated for the traffic tests (netgenerate + a flows file), so no
test depends on the shipped corridor."""

from __future__ import annotations

import subprocess
from pathlib import Path

import sumolib

GRID_ARGS = (
    "--grid",
    "--grid.x-number=3",
    "--grid.y-number=2",
    "--grid.length=200",
    "--grid.attach-length=150",
    "--default-junction-type=traffic_light",
    "--tls.allred.time=2",
    "--tls.left-green.time=0",
    "--default.lanenumber=2",
    "--no-turnarounds=true",
)


def grid(
    folder: Path, veh_per_h: float = 300.0, end_s: int = 7200, tls_type: str = "static"
) -> Path:
    """A 3 x 2 grid of signalised junctions with through and turning flows from every
    fringe edge; returns its ``.sumocfg``."""
    folder.mkdir(parents=True, exist_ok=True)
    net_file = folder / "grid.net.xml"
    subprocess.run(
        [
            sumolib.checkBinary("netgenerate"),
            *GRID_ARGS,
            f"--tls.default-type={tls_type}",
            "-o",
            str(net_file),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    net = sumolib.net.readNet(str(net_file))
    entries = [e for e in net.getEdges() if not e.getIncoming() and e.getToNode().getType()]
    exits = [e for e in net.getEdges() if not e.getOutgoing()]
    flows = ["<routes>"]
    for e in sorted(entries, key=lambda e: e.getID()):
        ends = [x for x in exits if x.getToNode() != e.getFromNode()]
        for k, x in enumerate(sorted(ends, key=lambda x: x.getID())):
            rate = veh_per_h / len(ends)
            flows.append(
                f'  <flow id="f_{e.getID()}_{k}" from="{e.getID()}" to="{x.getID()}" '
                f'begin="0" end="{end_s}" vehsPerHour="{rate:.1f}" departLane="best"/>'
            )
    flows.append("</routes>")
    (folder / "grid.rou.xml").write_text("\n".join(flows) + "\n")
    cfg = folder / "grid.sumocfg"
    cfg.write_text(
        "<configuration>\n  <input>\n"
        '    <net-file value="grid.net.xml"/>\n    <route-files value="grid.rou.xml"/>\n'
        "  </input>\n</configuration>\n"
    )
    return cfg


def plain_model(cfg: Path, begin: float, seed: int = 0, extra_outputs: tuple[str, ...] = ()):
    """A stand-in ``signal_corridor``-like model of a generated network: the SUMO plant as
    its simulator, the hold-everything map as its CasADi form (enough for the rig and the
    gate; the queue model is the model kind's)."""
    import casadi as ca
    import numpy as np

    from parallelcity.models.traffic.network import read_network, signal_names
    from parallelcity.models.traffic.sumo_plant import PlantConfig, plant_factory
    from parallelcity.twin.model import ModelForm, SubsystemModel

    net = read_network(cfg.parent / "grid.net.xml")
    names = signal_names(net)
    outputs = names["outputs"] + tuple(n for n in extra_outputs if n not in names["outputs"])
    params = (
        tuple(f"{a.edge}.saturation" for a in net.approaches)
        + tuple(f"{a.edge}.storage" for a in net.approaches)
        + ("demand.scale", "driver.sigma", "driver.tau")
    )
    nominal = np.array(
        [a.saturation_veh_h for a in net.approaches]
        + [a.storage_veh for a in net.approaches]
        + [1.0, 0.5, 1.0]
    )
    nx, nu, nd = len(names["states"]), len(names["inputs"]), len(names["disturbances"])
    x, u = ca.SX.sym("x", nx), ca.SX.sym("u", nu)
    d, p = ca.SX.sym("d", nd), ca.SX.sym("p", len(params))
    f = ca.Function("f", [x, u, d, p], [x])
    qidx = {f"{a.edge}.queue": i for i, a in enumerate(net.approaches)}
    h = ca.Function(
        "h", [x, u, d, p], [ca.vertcat(*[x[qidx[n]] if n in qidx else 0 for n in outputs])]
    )
    u0 = np.array([v for j in net.junctions for v in (*j.splits, j.cycle_s, j.offset_s)])
    plant = PlantConfig(sumocfg=cfg, begin=begin, seed=seed, parameters=params, outputs=outputs)

    def forecast(t0: float, n: int, dt: float):
        return np.zeros((n, nd))

    model = SubsystemModel(
        name="grid",
        states=names["states"],
        inputs=names["inputs"],
        disturbances=names["disturbances"],
        outputs=outputs,
        parameters=params,
        nominal=nominal,
        f=f,
        h=h,
        forecast=forecast,
        x0=np.zeros(nx),
        u0=u0,
        state_outputs={s: s for s in names["states"]},
        form=ModelForm.DISCRETE,
        step_s=1.0,
        simulator=plant_factory(net, plant),
    )
    return net, model
