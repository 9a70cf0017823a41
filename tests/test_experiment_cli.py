"""``parallelcity experiment`` as a user runs it: real controllers, the rig's real plant, a
real spawn pool.

One small experiment (the scenario's NMPC, the field on its own, and a controller plug-in
that fails at set-up; 2 seeds, 4 cycles, 2 workers) runs once as a process and is then
checked from every side: table against the per-run summaries, the failed variant, the
``none`` controller, a run reproduced from the manifest, resume and ``--force``.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path

import pytest

from parallelcity import cli
from parallelcity.errors import ExperimentError
from parallelcity.experiment import definition
from parallelcity.experiment.command import rerun
from parallelcity.experiment.definition import load_experiment

from .conftest import DH, ROOT

SHIPPED = ROOT / "experiments" / "district_heating_controllers.toml"
# KPIs that measure this machine, not the run
MACHINE_KPIS = ("solve_p50_ms", "solve_p99_ms", "wall_s")

BROKEN_PLUGIN = """
from pydantic import BaseModel, ConfigDict


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: str = "broken"


class _Broken:
    def setup(self, problem):
        raise RuntimeError("broken controller: cannot set up")

    def step(self, inp):
        raise AssertionError("never planned")


class _Kind:
    Config = Config

    def check(self, config, problem):
        return []

    def create(self, config):
        return _Broken()


KIND = _Kind()
"""


def small_experiment(folder: Path, seeds: str = "[1, 2]") -> Path:
    path = folder / "small.toml"
    path.write_text(
        textwrap.dedent(
            f"""\
            [experiment]
            name = "small"
            base = "{DH.as_posix()}"
            seeds = {seeds}
            cycles = 4
            workers = 2
            series_run = "nmpc/2"

            [[variant]]
            name = "nmpc"

            [[variant]]
            name = "field"
            [variant.set]
            "controller" = {{ kind = "none" }}

            [[variant]]
            name = "broken"
            [variant.set]
            "controller" = {{ kind = "broken" }}
            """
        )
    )
    return path


def plugin_path(folder: Path) -> Path:
    """A controller kind installed the way any plug-in is: an entry point in a dist-info."""
    site = folder / "site"
    dist = site / "broken_ctrl-0.1.dist-info"
    dist.mkdir(parents=True)
    (site / "broken_ctrl.py").write_text(BROKEN_PLUGIN)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-ctrl\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[parallelcity.controllers]\nbroken = broken_ctrl:KIND\n"
    )
    return site


@pytest.fixture(scope="module")
def done(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    folder = tmp_path_factory.mktemp("experiment")
    exp = small_experiment(folder)
    site = plugin_path(folder)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "parallelcity",
            "experiment",
            str(exp),
            "--out",
            str(folder / "out"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])},
        timeout=300,
    )
    return proc, folder


def test_the_shipped_example_validates() -> None:
    exp = load_experiment(SHIPPED)
    assert [v.name for v in exp.variants] == ["nmpc", "linear_mpc", "pi"]
    assert len(exp.runs()) == 15
    assert {exp.scenarios[v].file.controller.kind for v in exp.scenarios} == {
        "nmpc",
        "linear_mpc",
        "pi",
    }


def test_the_schema_describes_experiment_files(capsys: pytest.CaptureFixture[str]) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    assert cli.main(["schema", "--experiment"]) == 0
    schema = json.loads(capsys.readouterr().out)
    data = tomllib.loads(SHIPPED.read_text())
    jsonschema.validate(data, schema)
    data["experiment"]["sedes"] = 3
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, schema)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            '[experiment]\nname = "x"\nbase = "B"\nseeds = 0\n[[variant]]\nname = "a"\n',
            ["experiment.seeds: Value error, a number of seeds must be from 1"],
        ),
        (
            '[experiment]\nname = "x"\nbase = "B"\nseeds = 2\nworkrs = 2\n'
            '[[variant]]\nname = "a"\n',
            ["experiment.workrs: Extra inputs are not permitted"],
        ),
        (
            '[experiment]\nname = "x"\nbase = "B"\nseeds = 2\n'
            '[[variant]]\nname = "a"\n[variant.set]\n"model.plant.tau_min" = -5.0\n'
            '"controller.comfort_weigth" = 1.0\n'
            '[[variant]]\nname = "b"\n[variant.set]\n"model.buildings[9].ua_kw_per_k" = 1.0\n',
            [
                "variant[0] (a): model.plant.tau_min:",
                "variant[0] (a): controller.comfort_weigth:",
                'variant[1] (b).set."model.buildings[9].ua_kw_per_k": no item [9]',
            ],
        ),
        (
            '[experiment]\nname = "x"\nbase = "B"\nseeds = 2\nseries_run = "a/3"\n'
            '[[variant]]\nname = "a"\n[[variant]]\nname = "a"\n',
            [
                "variant[1].name: 'a' is variant[0]'s name too",
                "experiment.series_run: 'a/3' is not VARIANT/SEED",
            ],
        ),
        (
            '[experiment]\nname = "x"\nbase = "missing.toml"\nseeds = 2\n[[variant]]\nname = "a"\n',
            ["experiment.base: cannot read missing.toml"],
        ),
    ],
    ids=["seed_count", "unknown_key", "variant_scenarios", "names", "missing_base"],
)
def test_bad_experiment_files_exit_2_with_key_paths(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], body: str, expected: list[str]
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(body.replace('"B"', json.dumps(DH.as_posix())))
    assert cli.main(["experiment", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "invalid experiment" in err and "Traceback" not in err
    for line in expected:
        assert line in err
    assert not (tmp_path / "out").exists()  # nothing started


def test_a_selection_outside_the_experiment_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["experiment", str(SHIPPED), "--out", str(tmp_path / "o"), "--only", "mpc"]
    assert cli.main([*args, "--seeds", "6"]) == 2
    err = capsys.readouterr().err
    assert "--only: no variant 'mpc' (variants: nmpc, linear_mpc, pi)" in err
    assert "--seeds: 6 is not a seed of the experiment" in err
    assert not (tmp_path / "o").exists()


def test_a_rig_kind_without_a_field_plant_cannot_run_an_experiment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    exp = load_experiment(SHIPPED)
    sc = exp.scenarios["pi"]

    class _ServesOnly:
        Config = type(sc.rig_config)

    monkeypatch.setattr(definition.plugins, "rig_kind", lambda name: _ServesOnly())
    (problem,) = definition.experiment_problems(sc)
    assert problem.startswith("rig.kind: rig kind 'simulated' has no field plant")


@pytest.mark.slow
def test_a_small_experiment_end_to_end(done: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    proc, folder = done
    out = folder / "out"
    assert proc.returncode == 1, proc.stderr  # the broken variant failed
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("[")]
    assert len(lines) == 6
    assert sum("FAILED: RuntimeError: broken controller: cannot set up" in ln for ln in lines) == 2
    assert sum(": done in " in ln for ln in lines) == 4
    trace = (out / "runs" / "broken" / "1" / "error.txt").read_text()
    assert "RuntimeError: broken controller: cannot set up" in trace
    assert "| KPI | nmpc (n=2) | field (n=2) | broken (n=0) |" in proc.stdout
    # the table is the per-run summaries'
    rows = list(csv.DictReader((out / "kpis.csv").open()))
    assert [(r["variant"], r["seed"], r["status"]) for r in rows] == [
        ("nmpc", "1", "done"),
        ("nmpc", "2", "done"),
        ("field", "1", "done"),
        ("field", "2", "done"),
        ("broken", "1", "failed"),
        ("broken", "2", "failed"),
    ]
    table = json.loads((out / "kpis.json").read_text())
    for row in rows[:4]:
        summary = json.loads(
            (out / "runs" / row["variant"] / row["seed"] / "summary.json").read_text()
        )
        for k, v in summary["kpis"].items():
            assert row[k] == ("" if v is None else repr(float(v)))
        assert summary["kpis"]["comfort_violation"] == summary["summary"]["band_violation"]
        assert summary["kpis"]["energy"] == summary["summary"]["totals"]["energy"]
    energy = [
        json.loads((out / "runs/nmpc" / s / "summary.json").read_text())["kpis"]["energy"]
        for s in "12"
    ]
    assert table["variants"]["nmpc"]["energy"]["mean"] == pytest.approx(sum(energy) / 2, rel=1e-12)
    assert table["variants"]["broken"]["energy"]["n"] == 0
    assert (out / "boxplot_energy.png").stat().st_size > 0
    assert (out / "series_nmpc_2.png").stat().st_size > 0
    assert (out / "table.md").read_text() in proc.stdout


@pytest.mark.slow
def test_the_none_controller_never_applies_a_command(
    done: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    _, folder = done
    run = folder / "out" / "runs" / "field" / "1"
    summary = json.loads((run / "summary.json").read_text())["summary"]
    assert summary["sent"] == 0 and summary["acked"] == 0 and summary["holds"] == 4
    series = list(csv.DictReader((run / "series.csv").open()))
    assert [r["outcome"] for r in series] == ["hold"] * 4 + ["end"]  # 4 cycles, the end
    assert {r["ack"] for r in series} == {""}
    applied = [c for c in series[0] if c.endswith(".applied")]
    # the plant keeps its initial inputs: the model's u0, as the scenario's plant starts
    assert all(r[c] == series[0][c] for r in series for c in applied)
    *nmpc, _ = csv.DictReader((folder / "out/runs/nmpc/1/series.csv").open())
    assert {r["ack"] for r in nmpc} == {"applied"}


@pytest.mark.slow
def test_the_manifest_reproduces_a_run_bit_for_bit(
    done: tuple[subprocess.CompletedProcess[str], Path], tmp_path: Path
) -> None:
    _, folder = done
    manifest = json.loads((folder / "out" / "manifest.json").read_text())
    assert manifest["base_sha256"] and manifest["experiment_sha256"]
    assert set(manifest["runs"]) == {
        f"{v}/{s}" for v in ("nmpc", "field", "broken") for s in (1, 2)
    }
    assert manifest["runs"]["field/2"]["overrides"] == {"controller": {"kind": "none"}}
    first = json.loads((folder / "out/runs/nmpc/2/summary.json").read_text())["kpis"]
    again = rerun(folder / "out" / "manifest.json", "nmpc/2", tmp_path / "again").kpis
    for k, v in first.items():
        if k not in MACHINE_KPIS:
            assert again[k] == v, k
    with pytest.raises(ExperimentError, match="no run 'nmpc/7'"):
        rerun(folder / "out" / "manifest.json", "nmpc/7", tmp_path)


@pytest.mark.slow
def test_resume_skips_done_runs_and_force_reruns_them(
    done: tuple[subprocess.CompletedProcess[str], Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, folder = done
    monkeypatch.syspath_prepend(str(folder / "site"))  # the broken variant still validates
    out = folder / "out"
    exp = folder / "small.toml"
    summary = out / "runs/field/1/summary.json"
    before = summary.stat().st_mtime_ns
    args = ["experiment", str(exp), "--out", str(out), "--only", "field", "--workers", "1"]
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert err.count("already done, skipped") == 2
    assert summary.stat().st_mtime_ns == before
    time.sleep(0.01)
    assert cli.main([*args, "--seeds", "1", "--force"]) == 0
    err = capsys.readouterr().err
    assert "[1/1] field seed 1: done in" in err and "skipped" not in err.splitlines()[1]
    assert summary.stat().st_mtime_ns > before
    # another cycle count is another run: not skipped
    small_text = exp.read_text().replace("cycles = 4", "cycles = 3")
    exp.write_text(small_text)
    assert cli.main([*args, "--seeds", "2"]) == 0
    assert "already done, skipped" not in capsys.readouterr().err
    assert json.loads((out / "runs/field/2/summary.json").read_text())["cycles"] == 3


@pytest.mark.slow
def test_ctrl_c_stops_the_pool_keeps_finished_runs_and_exits_130(tmp_path: Path) -> None:
    exp = tmp_path / "long.toml"
    exp.write_text(
        textwrap.dedent(
            f"""\
            [experiment]
            name = "long"
            base = "{DH.as_posix()}"
            seeds = 4
            cycles = 96
            workers = 2

            [[variant]]
            name = "field"
            [variant.set]
            "controller" = {{ kind = "none" }}
            """
        )
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "parallelcity",
            "experiment",
            str(exp),
            "--out",
            str(tmp_path / "o"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proc.stderr is not None
        lines = []
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:  # bounded: one line per run, four runs
            line = proc.stderr.readline()
            lines.append(line)
            if line.startswith("[1/4]") or not line:
                break
        assert lines[-1].startswith("[1/4] field seed"), lines
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 130, err
    assert "interrupted by SIGINT: finished runs kept" in err and "Traceback" not in err
    rows = list(csv.DictReader((tmp_path / "o" / "kpis.csv").open()))
    assert 1 <= len(rows) < 4 and {r["status"] for r in rows} == {"done"}
    for r in rows:
        assert (tmp_path / "o" / "runs" / "field" / r["seed"] / "summary.json").exists()
