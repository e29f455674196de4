"""``medprobe run`` under ``torchrun``: one job, every process running the same units together.

Each process of the group runs every pending unit; inside a unit the training loops
(:mod:`medprobe.protocols.adapt.training`, :mod:`medprobe.protocols.segmentation.train`) give each
process a part of every batch and synchronise gradients (DistributedDataParallel), and feature
extraction gives each process a part of the dataset. Rank 0 alone takes the output lock, decides
which units are pending (and tells the others) and writes ``results.db``, predictions and
checkpoints; the other ranks record nothing (:class:`DiscardResults`).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from medprobe.distributed import broadcast_object, setup_distributed
from medprobe.errors import ConfigError


class DiscardResults:
    """The results store of ranks other than 0: every unit is run, nothing is written."""

    def start(self, record: Any) -> bool:
        return True

    def finish(self, *args: Any, **kwargs: Any) -> None:
        return None

    def fail(self, *args: Any, **kwargs: Any) -> None:
        return None

    def close(self) -> None:
        return None


def run_ranked(config: Any, plan: Any, progress: bool, log: Callable[[str], None], workers: int,
               launcher: str) -> Any:
    """:func:`medprobe.experiment.runner.run_experiment` in one process of a torchrun job."""
    from medprobe.experiment import runner as R
    from medprobe.experiment.lock import OutputLock
    from medprobe.results.store import ResultsStore, merge_shards

    if workers > 1 or launcher != "processes":
        raise ConfigError("--workers/--launcher cannot be combined with torchrun: under torchrun the processes "
                          "share every unit; use one or the other")
    t0 = time.perf_counter()
    group = setup_distributed("auto")
    summary = R.RunSummary()
    try:
        plan = plan or R.plan_experiment(config)
        if not group.main:
            keys = broadcast_object(None)
            if keys is None:  # rank 0 stopped before running anything (nothing pending, or an error)
                return summary
            todo = [u for u in plan.units if u.key in set(keys)]
            R.run_units(plan, todo, DiscardResults(), R.RunSummary(), False, lambda _: None, device=group.device)
            summary.done = len(todo)
            return summary
        announced = False
        try:
            pending, summary.skipped_done = R.pending_units(plan)
            out = config.output_path
            if not pending:
                return summary
            R._prepare_output(out)
            with OutputLock(out, f"medprobe run {config.name} (torchrun, {group.world_size} processes)"):
                results = ResultsStore(out / "results.db")
                try:
                    R._write_experiment_json(out, config)
                    merge_shards(results)
                    done = results.done_keys()
                    summary.skipped_done = sum(u.key in done for u in plan.units)
                    todo = [u for u in pending if u.key not in done]
                    broadcast_object([u.key for u in todo])
                    announced = True
                    R.run_units(plan, todo, results, summary, progress, log, device=group.device)
                finally:
                    results.close()
        finally:
            if not announced:
                broadcast_object(None)
    finally:
        summary.wall_s = time.perf_counter() - t0
        group.close()
    return summary
