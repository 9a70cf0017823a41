"""Networks a user brings, as SUMO's own tools make them: left-turn phases on turn pockets,
short cycles, odd offsets, random trips scaled up.  Each is generated at test time."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

sumo = pytest.importorskip("sumo")
SUMO_HOME = Path(sumo.SUMO_HOME)
SUMOCFG = """<configuration>
    <input><net-file value="{net}"/><route-files value="{routes}"/></input>
</configuration>
"""


def _netgenerate(folder: Path, name: str, *args: str) -> Path:
    subprocess.run(
        [str(SUMO_HOME / "bin" / "netgenerate"), *args, "-o", name],
        cwd=folder,
        check=True,
        capture_output=True,
        timeout=120,
    )
    return folder / name


def _random_trips(folder: Path, net: str, routes: str, end_s: int, period_s: float) -> None:
    subprocess.run(
        [
            sys.executable, str(SUMO_HOME / "tools" / "randomTrips.py"),
            "-n", net, "-o", routes + ".trips.xml", "-r", routes,
            "-b", "0", "-e", str(end_s), "-p", str(period_s), "--seed", "5",
            "--fringe-factor", "max", "--validate",
        ],
        cwd=folder,
        env={**os.environ, "SUMO_HOME": str(SUMO_HOME)},
        check=True,
        capture_output=True,
        timeout=120,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pockets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2x2 grid with left-turn pockets and protected left-turn phases (four green phases,
    6 s each for the lefts) in a 50 s cycle; one junction's offset is negative."""
    folder = tmp_path_factory.mktemp("pockets")
    net = _netgenerate(
        folder, "pockets.net.xml",
        "--grid", "--grid.number", "2", "--grid.length", "200", "--grid.attach-length", "150",
        "--default-junction-type", "traffic_light", "--no-turnarounds", "true",
        "--default.lanenumber", "2", "--turn-lanes", "1", "--turn-lanes.length", "60",
        "--tls.left-green.time", "6", "--tls.cycle.time", "50",
    )  # fmt: skip
    text = net.read_text()
    text, n = re.subn(r'(<tlLogic id="A0"[^>]*offset=")0(")', r"\g<1>-10\g<2>", text)
    assert n == 1
    net.write_text(text)
    _random_trips(folder, "pockets.net.xml", "pockets.rou.xml", 1800, 4.0)
    (folder / "pockets.sumocfg").write_text(
        SUMOCFG.format(net="pockets.net.xml", routes="pockets.rou.xml")
    )
    return folder


def test_the_skeleton_of_short_cycles_left_phases_and_odd_offsets_validates(
    pockets: Path,
) -> None:
    from parallelcity.cli import main
    from parallelcity.models.traffic.network import read_network

    net = read_network(pockets / "pockets.net.xml")
    a0 = net.junction("A0")
    assert len(a0.green) == 4 and a0.cycle_s == 50
    assert a0.offset_s == 40  # SUMO's -10 s, modulo the cycle
    out = pockets / "pockets.toml"
    assert main(["skeleton", str(pockets / "pockets.sumocfg"), "-o", str(out)]) == 0
    # the program's own plan (the inputs' safe values: a 6 s left green, a 50 s cycle, the
    # offset) lies inside the bounds the skeleton writes, so the scenario validates as it is
    assert main(["validate", str(out)]) == 0


def test_a_plant_with_demand_scaled_up_reloads_its_state_after_originals_arrive(
    pockets: Path,
) -> None:
    """randomTrips' vehicles carry their routes inside; SUMO's copies (``--scale`` 2) share
    them, and once an original arrived the state saved at a reset could not be loaded."""
    import numpy as np

    from parallelcity.models.traffic.network import read_network
    from parallelcity.models.traffic.sumo_plant import PlantConfig, SumoPlant

    net = read_network(pockets / "pockets.net.xml")
    config = PlantConfig(
        sumocfg=pockets / "pockets.sumocfg", begin=0.0, seed=1, parameters=("demand.scale",)
    )
    plant = SumoPlant(net, config, np.array([2.0]))
    u = np.array([v for j in net.junctions for v in (*j.splits, j.cycle_s, j.offset_s)])
    try:
        for k in range(10):  # a verification sample: reset at each cycle, run on beyond it
            plant.reset(np.full(len(net.approaches), np.nan), 100.0 + 50.0 * k)
            for _ in range(10):
                plant.step(u, np.zeros(0), 10.0)
        assert plant.kpis()["throughput_veh"] > 0
    finally:
        plant.close()


def test_an_entry_behind_an_unsignalised_junction_counts_the_traffic_reaching_it(
    tmp_path: Path,
) -> None:
    """Signals at A0 and C0, a priority junction B0 between them: B0C0 is an entry of
    the corridor, and the flow from A0 that reaches it is an arrival there (it was counted
    nowhere: the twin saw a third of the traffic at C0)."""
    from parallelcity.models.traffic.demand import read_demand
    from parallelcity.models.traffic.network import read_network

    _netgenerate(
        tmp_path, "row.net.xml",
        "--grid", "--grid.x-number", "3", "--grid.y-number", "1", "--grid.length", "200",
        "--grid.attach-length", "150", "--default-junction-type", "priority",
        "--tls.set", "A0,C0", "--no-turnarounds", "true",
    )  # fmt: skip
    (tmp_path / "row.rou.xml").write_text(
        "<routes>\n"
        '  <flow id="through" from="left0A0" to="C0right0" begin="0" end="3600" '
        'vehsPerHour="600"/>\n'
        '  <flow id="side" from="top1B0" to="C0right0" begin="0" end="3600" '
        'vehsPerHour="300"/>\n'
        "</routes>\n"
    )
    net = read_network(tmp_path / "row.net.xml")
    assert net.approach("B0C0").is_entry and net.approach("left0A0").is_entry
    demand = read_demand([tmp_path / "row.rou.xml"], net)
    rates = demand.mean_rates(["left0A0", "B0C0"], [0.0], 3600.0)[0]
    assert rates[0] == pytest.approx(600.0)
    assert rates[1] == pytest.approx(900.0)  # the through flow and the side street's
    assert demand.unattributed_veh == 0


def test_turn_pockets_do_not_cut_the_links_between_junctions(pockets: Path) -> None:
    """netconvert starts a turn pocket with a node of its own (A1A0 -> A1A0.140.00): the
    approach to A0 is both edges, from junction A1, not an entry of 44 m; the flow A1
    sends on reaches it, and the skeleton bands its spillback."""
    from controllers.webster import approach_flows
    from parallelcity.models.traffic.demand import read_demand
    from parallelcity.models.traffic.network import read_network
    from parallelcity.models.traffic.skeleton import skeleton

    net = read_network(pockets / "pockets.net.xml")
    a = net.approach("A1A0.140.00")
    assert a.upstream == "A1" and not a.is_entry
    assert a.edges == ("A1A0", "A1A0.140.00") and a.lanes == 3
    assert a.total_length_m > 150 and a.storage_veh > 40
    feeding = [m for b in net.approaches for m in b.movements if m.to_edge == "A1A0"]
    assert feeding and all(net.downstream(m) == a for m in feeding)
    entries = [b.edge for b in net.approaches if b.is_entry]
    assert len(entries) == 8 and all(
        e.startswith(("left", "right", "top", "bottom")) for e in entries
    )
    demand = read_demand([pockets / "pockets.rou.xml"], net)
    flows = approach_flows(net, demand.shares, dict.fromkeys(entries, 100.0))
    assert flows["A1A0.140.00"] > 10  # carried on from A1's approaches
    text = skeleton(pockets / "pockets.sumocfg")
    assert "A1A0.140.00 -> A0 (from A1, via A1A0 (2 lanes))" in text
    assert 'output = "A1A0.140.00.queue"' in text  # a spillback band: a link, not an entry


def test_the_plant_counts_a_queue_back_past_the_pocket(pockets: Path) -> None:
    import numpy as np

    from parallelcity.models.traffic.network import read_network
    from parallelcity.models.traffic.sumo_plant import PlantConfig, SumoPlant

    net = read_network(pockets / "pockets.net.xml")
    config = PlantConfig(
        sumocfg=pockets / "pockets.sumocfg", begin=0.0, seed=1, parameters=("demand.scale",)
    )
    plant = SumoPlant(net, config, np.array([0.01]))  # next to no demand of its own
    u = np.array([v for j in net.junctions for v in (*j.splits, j.cycle_s, j.offset_s)])
    i = [a.edge for a in net.approaches].index("A1A0.140.00")
    try:
        plant.reset(np.full(len(net.approaches), np.nan), 0.0)
        conn = plant._conn  # three cars held standing on the feeder, before the pocket
        conn.route.add("held", ["A1A0", "A1A0.140.00", "A0B0"])
        for k in range(3):
            conn.vehicle.add(f"held{k}", "held", departPos=str(20 + 10 * k), departSpeed="0")
        plant.step(u, np.zeros(0), 2.0)
        for k in range(3):
            conn.vehicle.setSpeed(f"held{k}", 0.0)
        plant.step(u, np.zeros(0), 10.0)
        assert plant.state[i] >= 3
        assert plant.outputs(u, np.zeros(0))[3 * i + 2] > 0  # its occupancy too
    finally:
        plant.close()


def test_a_sumocfg_naming_a_missing_file_is_refused_and_sumo_says_why_it_quit(
    pockets: Path, tmp_path: Path
) -> None:
    """A missing additional file passed the skeleton and validation, and the run ended in
    a traceback ("Connection closed by SUMO"); a file SUMO refuses gave no reason."""
    import numpy as np

    from parallelcity.cli import main
    from parallelcity.models.traffic.network import read_network
    from parallelcity.models.traffic.sumo_plant import PlantConfig, SumoPlant

    missing = tmp_path / "missing.sumocfg"
    missing.write_text(
        SUMOCFG.format(net=pockets / "pockets.net.xml", routes=pockets / "pockets.rou.xml").replace(
            "</input>", '<additional-files value="detectors.add.xml"/></input>'
        )
    )
    assert main(["skeleton", str(missing), "-o", str(tmp_path / "x.toml")]) == 2
    assert not (tmp_path / "x.toml").exists()
    (tmp_path / "detectors.add.xml").write_text(
        '<additional><e1Detector id="d" lane="nowhere_0" pos="5" period="60" file="NUL"/>'
        "</additional>\n"
    )
    net = read_network(pockets / "pockets.net.xml")
    plant = SumoPlant(net, PlantConfig(sumocfg=missing, begin=0.0, parameters=()), np.zeros(0))
    with pytest.raises(RuntimeError, match=r"sumo did not start.*nowhere_0"):
        plant.reset(np.full(len(net.approaches), np.nan), 0.0)
    plant.close()


def test_the_plant_leaves_the_users_detector_and_summary_files_alone(
    pockets: Path, tmp_path: Path
) -> None:
    """Every SUMO the plant runs (the field's, each sample's) wrote the detector outputs an
    additional file names, and the .sumocfg's own, into the user's folder, all at once."""
    import numpy as np

    from parallelcity.models.traffic.network import read_network
    from parallelcity.models.traffic.sumo_plant import PlantConfig, SumoPlant

    (tmp_path / "det" / "out").mkdir(parents=True)
    (tmp_path / "det" / "loops.add.xml").write_text(
        '<additional>\n  <e1Detector id="mine" lane="A1A0.140.00_0" pos="30" period="60" '
        'file="out/loops.xml"/>\n</additional>\n'
    )
    cfg = tmp_path / "mine.sumocfg"
    cfg.write_text(
        SUMOCFG.format(net=pockets / "pockets.net.xml", routes=pockets / "pockets.rou.xml")
        .replace("</input>", '<additional-files value="det/loops.add.xml"/></input>')
        .replace("</configuration>", '<output><summary-output value="sum.xml"/></output>\n')
        + "</configuration>\n"
    )
    net = read_network(pockets / "pockets.net.xml")
    plant = SumoPlant(net, PlantConfig(sumocfg=cfg, begin=0.0, parameters=()), np.zeros(0))
    u = np.array([v for j in net.junctions for v in (*j.splits, j.cycle_s, j.offset_s)])
    try:
        plant.reset(np.full(len(net.approaches), np.nan), 0.0)
        for _ in range(6):
            plant.step(u, np.zeros(0), 10.0)
        assert "mine" in plant._conn.inductionloop.getIDList()  # still there, for its users
    finally:
        plant.close()
    names = sorted(p.name for p in tmp_path.rglob("*"))
    assert names == ["det", "loops.add.xml", "mine.sumocfg", "out"]
