"""``medprobe run`` and ``medprobe report``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medprobe.errors import MedprobeError


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run an experiment file (resumes: finished units are skipped)")
    p.add_argument("file", help="experiment YAML")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value, e.g. --set protocols.linear.epochs=5 (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="validate and list the units without running them")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=cmd_run)

    p = sub.add_parser("report", help="tables, results.csv, report.md and plots for an output folder")
    p.add_argument("output_dir")
    p.add_argument("--html", action="store_true", help="also write a self-contained report.html")
    p.set_defaults(handler=cmd_report)


def run_and_report(config, quiet: bool = False) -> int:
    from medprobe.experiment.runner import dry_run_lines, plan_experiment, run_experiment
    plan = plan_experiment(config)
    for line in dry_run_lines(plan):
        print(line)
    summary = run_experiment(config, progress=not quiet, plan=plan)
    print(f"finished {summary.done} units, {summary.skipped_done} already done, {len(summary.failed)} failed "
          f"in {summary.wall_s:.1f} s -> {config.output_path / 'results.db'}")
    if summary.done or summary.skipped_done:
        write_report(config.output_path, html=False)
    for name, err in summary.failed[:20]:
        print(f"  failed: {name}: {err}", file=sys.stderr)
    return 1 if summary.failed else 0


def cmd_run(args: argparse.Namespace) -> int:
    from medprobe.experiment.config import load_experiment
    from medprobe.experiment.runner import dry_run_lines, plan_experiment
    config = load_experiment(args.file, args.overrides)
    if args.dry_run:
        for line in dry_run_lines(plan_experiment(config)):
            print(line)
        return 0
    return run_and_report(config, args.quiet)


def write_report(output_dir: Path, html: bool) -> list[Path]:
    from medprobe.results.report import build_report, print_report
    report = build_report(output_dir)
    print_report(report)
    if html:
        try:
            from medprobe.results.html import write_html_report
        except ImportError:
            raise MedprobeError("the HTML report is not available in this version") from None
        report.files.append(write_html_report(output_dir))
    print("wrote " + ", ".join(str(p) for p in report.files if p.suffix != ".png") +
          f" and {sum(p.suffix == '.png' for p in report.files)} plots")
    return report.files


def cmd_report(args: argparse.Namespace) -> int:
    write_report(Path(args.output_dir), args.html)
    return 0
