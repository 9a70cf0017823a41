"""Runs on a local process pool, with resume and a progress line per finished run.

Workers start by ``spawn`` (a simulator's or a solver's state is never forked mid-use)
and receive plain data: the run as a dict and its folder as text.  With one worker the
runs go one after another in this process.  A run that raises is recorded as failed
with its error and the others go on; Ctrl-C stops the pool and keeps the finished runs.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import signal
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parallelcity.experiment.loop import (
    SUMMARY,
    kpis_from_summary,
    read_summary,
    run_one,
)
from parallelcity.experiment.plan import RunSpec

log = logging.getLogger("parallelcity.experiment")

ERROR = "error.txt"
"""A failed run's traceback, in its run folder."""

Say = Callable[[str], None]


def run_dir(out: Path, spec: RunSpec) -> Path:
    return out / "runs" / spec.variant / str(spec.seed)


def is_done(out: Path, spec: RunSpec) -> bool:
    """The run finished before with the same key (same scenario, seed, cycles, verify)."""
    data = read_summary(run_dir(out, spec) / SUMMARY)
    return data is not None and data.get("run", {}).get("key") == spec.key


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is (``terminate_as_interrupt``)."""


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM stops the runs as Ctrl-C does, so the pool's workers are ended too."""

    def on_term(signum: int, frame: object) -> None:
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread: leave SIGTERM alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class PoolResult:
    rows: list[dict[str, Any]] = field(default_factory=list)  # in the runs' order
    units: dict[str, str] = field(default_factory=dict)
    skipped: int = 0
    failed: int = 0
    interrupted: str | None = None  # "SIGINT" or "SIGTERM" when stopped


def _work(spec_data: dict[str, Any], folder: str) -> dict[str, Any]:
    """One run in a worker: plain data in, plain data out (never an exception object)."""
    spec = RunSpec.from_dict(spec_data)
    try:
        got = run_one(spec, Path(folder))
    except Exception as exc:
        trace = traceback.format_exc()
        with suppress(OSError):  # the error's detail beside the run, for whoever looks into it
            Path(folder).mkdir(parents=True, exist_ok=True)
            (Path(folder) / ERROR).write_text(trace)
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "traceback": trace}
    with suppress(OSError):
        (Path(folder) / ERROR).unlink(missing_ok=True)  # from an earlier, failed attempt
    return {
        "status": "done",
        "kpis": got.kpis,
        "units": got.units,
        "wall_s": got.wall_s,
        "plant_kpis": list(got.plant_kpis),
    }


def _worker_init() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    logging.basicConfig(level=logging.WARNING)
    for name in ("asyncua", "matplotlib"):
        logging.getLogger(name).setLevel(logging.ERROR)


def headline(kpis: dict[str, float], names: Sequence[str]) -> str:
    """The first KPIs of a run, for its progress line."""
    shown = [f"{n} {kpis[n]:.4g}" for n in dict.fromkeys(names) if n in kpis][:3]
    return ", ".join(shown)


def run_all(
    runs: Sequence[RunSpec],
    out: Path,
    *,
    workers: int,
    force: bool,
    say: Say,
    headline_kpis: Sequence[str] = (),
) -> PoolResult:
    result = PoolResult()
    rows: dict[str, dict[str, Any]] = {}
    todo: list[RunSpec] = []
    total = len(runs)
    done_n = 0
    for spec in runs:
        if not force and is_done(out, spec):
            data = read_summary(run_dir(out, spec) / SUMMARY) or {}
            rows[spec.run_id] = _row(spec, "done", kpis_from_summary(data))
            result.units.update(data.get("units", {}))
            result.skipped += 1
            done_n += 1
            say(f"[{done_n}/{total}] {spec.variant} seed {spec.seed}: already done, skipped")
        else:
            todo.append(spec)

    def finished(spec: RunSpec, got: dict[str, Any]) -> None:
        nonlocal done_n
        done_n += 1
        where = f"[{done_n}/{total}] {spec.variant} seed {spec.seed}"
        if got["status"] == "done":
            rows[spec.run_id] = _row(spec, "done", got["kpis"])
            result.units.update(got["units"])
            shown = headline(got["kpis"], [*got["plant_kpis"], *headline_kpis])
            say(f"{where}: done in {got['wall_s']:.1f} s ({shown})")
        else:
            result.failed += 1
            rows[spec.run_id] = _row(spec, "failed", {}, got["error"])
            log.debug("%s failed:\n%s", spec.run_id, got.get("traceback", ""))
            say(f"{where}: FAILED: {got['error']}")

    try:
        if workers <= 1 or len(todo) <= 1:
            for spec in todo:
                finished(spec, _work(spec.to_dict(), str(run_dir(out, spec))))
        else:
            _pooled(todo, out, min(workers, len(todo)), finished)
    except KeyboardInterrupt as exc:
        result.interrupted = "SIGTERM" if isinstance(exc, Terminated) else "SIGINT"
    result.rows = [rows[s.run_id] for s in runs if s.run_id in rows]
    return result


def _pooled(
    todo: Sequence[RunSpec],
    out: Path,
    workers: int,
    finished: Callable[[RunSpec, dict[str, Any]], None],
) -> None:
    ctx = multiprocessing.get_context("spawn")
    pool = cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init)
    try:
        futures = {pool.submit(_work, s.to_dict(), str(run_dir(out, s))): s for s in todo}
        for fut in cf.as_completed(futures):
            spec = futures[fut]
            try:
                got = fut.result()
            except Exception as exc:  # the worker died (a crash in a simulator, a kill)
                got = {"status": "failed", "error": f"worker lost: {type(exc).__name__}: {exc}"}
            finished(spec, got)
    except BaseException:
        procs = list((getattr(pool, "_processes", None) or {}).values())  # shutdown drops them
        pool.shutdown(wait=False, cancel_futures=True)
        _stop_workers(procs)
        raise
    pool.shutdown(wait=True)


def _stop_workers(procs: list[multiprocessing.process.BaseProcess]) -> None:
    """End this pool's own worker processes (Ctrl-C must not wait for running runs)."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + 5.0
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))


def _row(spec: RunSpec, status: str, kpis: dict[str, float], error: str = "") -> dict[str, Any]:
    return {
        "variant": spec.variant,
        "seed": spec.seed,
        "status": status,
        "error": error,
        "key": spec.key,
        "kpis": kpis,
    }
