"""Run an experiment's pending units in several worker processes or as cluster jobs.

The parent (which holds the output folder's lock) extracts every feature store the pending
units read, once, then hands the units out round-robin to ``workers`` workers: local processes
(one device each, round-robin over the visible GPUs) or jobs through submitit (SLURM, or its
local executor). Each worker plans the same experiment, runs its units and writes its own
results shard ``OUTPUT_DIR/shards/<name>.db``; the parent merges the shards into
``results.db`` when they finish (and ``medprobe run``/``report`` merge shards left by a parent
that was killed). Unit keys are derived from the configuration only, so a worker's results are
those of a sequential run.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medprobe.errors import ConfigError

LAUNCHERS = ("processes", "slurm", "submitit-local")


@dataclass
class ClusterOptions:
    """Resources of each cluster job (``--launcher slurm``)."""

    partition: str | None = None
    time_min: int = 240
    gpus: int = 1
    cpus: int = 8
    mem_gb: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # any other submitit slurm_* parameter


def split_round_robin(keys: list[str], workers: int) -> list[list[str]]:
    """``keys`` dealt out to ``workers`` lists (empty lists dropped)."""
    chunks = [keys[i::workers] for i in range(workers)]
    return [c for c in chunks if c]


def worker_devices(count: int) -> list[str | None]:
    """One device per local worker: round-robin over the visible GPUs, else the CPU."""
    import torch
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [f"cuda:{i % n}" if n else "cpu" for i in range(count)]


def worker_main(config: Any, keys: list[str], shard: str, device: str | None, threads: int | None) -> dict[str, Any]:
    """Entry point of a worker: plan ``config``, run the units in ``keys``, write them to ``shard``."""
    import torch

    from medprobe.experiment.runner import RunSummary, plan_experiment, run_units
    from medprobe.results.store import ResultsStore
    if threads:
        torch.set_num_threads(threads)
    plan = plan_experiment(config)
    wanted = set(keys)
    units = [u for u in plan.units if u.key in wanted]
    if len(units) != len(wanted):
        raise ConfigError(f"worker: {len(wanted) - len(units)} unit(s) handed out are not in the plan; the "
                          "experiment changed while it ran")
    summary = RunSummary()
    results = ResultsStore(shard)
    try:
        run_units(plan, units, results, summary, progress=False, log=lambda s: None,
                  device=torch.device(device) if device else None)
    finally:
        results.close()
    return {"done": summary.done, "failed": summary.failed}


def run_workers(config: Any, keys: list[str], output_dir: Path, workers: int, launcher: str,
                cluster: ClusterOptions | None, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Run ``keys`` in ``workers`` workers; returns each worker's ``{"done", "failed"}``."""
    if launcher not in LAUNCHERS:
        raise ConfigError(f"launcher: {launcher!r} is not one of {', '.join(LAUNCHERS)}")
    chunks = split_round_robin(keys, workers)
    shards = output_dir / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    if launcher == "processes":
        import multiprocessing as mp
        devices = worker_devices(len(chunks))
        threads = max(1, (os.cpu_count() or 1) // len(chunks))
        log(f"running {len(keys)} units in {len(chunks)} worker processes ({', '.join(map(str, devices))})")
        with ProcessPoolExecutor(max_workers=len(chunks), mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(worker_main, config, chunk, str(shards / f"worker-{i}-{os.getpid()}.db"),
                                   devices[i], threads) for i, chunk in enumerate(chunks)]
            return [_outcome(f.result, f"worker {i}") for i, f in enumerate(futures)]
    import submitit
    folder = output_dir / "jobs"
    if launcher == "slurm":
        c = cluster or ClusterOptions()
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
        params: dict[str, Any] = {"timeout_min": c.time_min, "gpus_per_node": c.gpus, "cpus_per_task": c.cpus,
                                  "name": f"medprobe-{config.name}"}
        if c.partition:
            params["slurm_partition"] = c.partition
        if c.mem_gb:
            params["mem_gb"] = c.mem_gb
        params.update(c.extra)
        executor.update_parameters(**params)
    else:
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=(cluster or ClusterOptions()).time_min)
    jobs = [executor.submit(worker_main, config, chunk, str(shards / f"job-{i}-{os.getpid()}.db"), None, None)
            for i, chunk in enumerate(chunks)]
    log(f"submitted {len(jobs)} {launcher} job(s): {', '.join(str(j.job_id) for j in jobs)}; logs in {folder}")
    return [_outcome(job.result, f"job {job.job_id}") for job in jobs]


def _outcome(result: Callable[[], dict[str, Any]], name: str) -> dict[str, Any]:
    """A worker's outcome; one that died is a failure (its shard keeps what it finished; a rerun redoes the rest)."""
    try:
        return result()
    except Exception as e:
        lines = str(e).strip().splitlines() or [type(e).__name__]
        return {"done": 0, "failed": [(name, f"{type(e).__name__}: {lines[-1][:500]}")]}
