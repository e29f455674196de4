"""``medprobe run`` and ``medprobe report``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medprobe.cliargs import positive_int
from medprobe.errors import MedprobeError


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run an experiment file (resumes: finished units are skipped)")
    p.add_argument("file", nargs="?", help="experiment YAML (or --preset NAME)")
    p.add_argument("--preset", metavar="NAME", help="run a shipped preset (see `medprobe presets`)")
    p.add_argument("--stand-in", dest="stand_in", choices=["phantom"],
                   help="replace every dataset by a phantom of the same task kind and dimensionality (presets)")
    p.add_argument("--tiny", action="store_true",
                   help="every backbone at its tiny configuration (random weights, a quarter of the image size)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value, e.g. --set protocols.linear.epochs=5 (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="validate and list the units without running them")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--workers", type=positive_int, default=1,
                   help="run the pending units in N worker processes (one device each, round-robin over GPUs) "
                        "or N cluster jobs; feature stores are extracted once, first")
    p.add_argument("--launcher", choices=["processes", "slurm", "submitit-local"], default="processes",
                   help="where workers run: local processes (default), SLURM jobs through submitit, or "
                        "submitit's local executor")
    p.add_argument("--slurm-partition", default=None)
    p.add_argument("--slurm-time", type=positive_int, default=240, metavar="MINUTES", help="time limit per job")
    p.add_argument("--slurm-gpus", type=int, default=1, metavar="N", help="GPUs per job (default 1)")
    p.add_argument("--slurm-cpus", type=positive_int, default=8, metavar="N", help="CPUs per job (default 8)")
    p.set_defaults(handler=cmd_run)

    p = sub.add_parser("report", help="tables, results.csv, report.md and plots for an output folder")
    p.add_argument("output_dir")
    p.add_argument("--html", action="store_true", help="also write a self-contained report.html")
    p.set_defaults(handler=cmd_report)


def run_and_report(config, quiet: bool = False, args: argparse.Namespace | None = None) -> int:
    from medprobe.experiment.runner import dry_run_lines, plan_experiment, run_experiment
    plan = plan_experiment(config)
    for line in dry_run_lines(plan):
        print(line)
    parallel: dict = {}
    if args is not None and (args.workers > 1 or args.launcher != "processes"):
        from medprobe.experiment.parallel import ClusterOptions
        parallel = {"workers": args.workers, "launcher": args.launcher,
                    "cluster": ClusterOptions(partition=args.slurm_partition, time_min=args.slurm_time,
                                              gpus=args.slurm_gpus, cpus=args.slurm_cpus)}
    summary = run_experiment(config, progress=not quiet, plan=plan, **parallel)
    from medprobe.distributed import is_main_process
    if not is_main_process():  # under torchrun, rank 0 alone reports
        return 1 if summary.failed else 0
    print(f"finished {summary.done} units, {summary.skipped_done} already done, {len(summary.failed)} failed "
          f"in {summary.wall_s:.1f} s -> {config.output_path / 'results.db'}")
    if summary.done or summary.skipped_done:
        write_report(config.output_path, html=False)
    for name, err in summary.failed[:20]:
        print(f"  failed: {name}: {err}", file=sys.stderr)
    return 1 if summary.failed else 0


def _load(args: argparse.Namespace):
    from medprobe.experiment.config import ExperimentConfig, read_yaml_mapping
    from medprobe.options import parse
    from medprobe.presets import load_preset, rewrite
    if (args.file is None) == (args.preset is None):
        raise MedprobeError("run: give an experiment file or --preset NAME (one of them)")
    if args.preset:
        return load_preset(args.preset, args.overrides, args.stand_in, args.tiny)
    raw = read_yaml_mapping(args.file, "experiment file", args.overrides)
    stand_ins = raw.pop("stand_in", None)  # an experiment file may declare its stand-ins as a preset does
    if args.stand_in or args.tiny:
        raw = rewrite(raw, stand_ins, args.stand_in, args.tiny)
    return parse(ExperimentConfig, raw, Path(args.file).name)


def cmd_run(args: argparse.Namespace) -> int:
    from medprobe.experiment.runner import dry_run_lines, plan_experiment
    config = _load(args)
    if args.dry_run:
        for line in dry_run_lines(plan_experiment(config)):
            print(line)
        if config.published:
            print(f"  published numbers: {len(config.published)} ({(config.source or {}).get('table', '')})")
        return 0
    rc = run_and_report(config, args.quiet, args)
    if config.published:
        from medprobe.presets import format_published, published_rows
        for line in format_published(published_rows(config.output_path)):
            print(line)
    return rc


def _merge_leftover_shards(output_dir: Path) -> None:
    """Merge the results shards of workers or cluster jobs into results.db, unless a run holds the folder."""
    import os

    from medprobe.errors import ConfigError
    from medprobe.experiment.lock import OutputLock
    from medprobe.results.store import ResultsStore, merge_shards, shard_paths
    if not shard_paths(output_dir) or not os.access(output_dir, os.W_OK):
        return
    try:
        with OutputLock(output_dir, "medprobe report"):
            results = ResultsStore(output_dir / "results.db")
            try:
                n = merge_shards(results)
            finally:
                results.close()
    except ConfigError as e:
        print(f"note: results shards not merged ({e})", file=sys.stderr)
        return
    if n:
        print(f"merged {n} unit(s) from workers' results shards into {output_dir / 'results.db'}")


def write_report(output_dir: Path, html: bool) -> list[Path]:
    """Print the report of ``output_dir`` and write its files (nothing is written in a read-only folder)."""
    from medprobe.results.report import build_report, print_report
    _merge_leftover_shards(Path(output_dir))
    report = build_report(output_dir)
    print_report(report)
    if not report.written:
        print(f"{output_dir} is not writable: the report was printed only (results.csv, report.md, plots"
              f"{', report.html' if html else ''} not written)")
        return []
    if html:
        from medprobe.results.html import write_html_report
        report.files.append(write_html_report(output_dir, report))
    print("wrote " + ", ".join(str(p) for p in report.files if p.suffix != ".png") +
          f" and {sum(p.suffix == '.png' for p in report.files)} plots")
    return report.files


def cmd_report(args: argparse.Namespace) -> int:
    write_report(Path(args.output_dir), args.html)
    return 0
