"""The ``medprobe data`` command: ``medprobe data check NAME --root PATH [-o key=value ...]``.

Exit codes: 0 when the check found no problem, 1 when it found some (all listed),
2 for a mistake in the command itself (unknown adapter or option).
"""
from __future__ import annotations

import argparse
import sys


def cmd_data_check(args: argparse.Namespace) -> int:
    """Run the check and print the report; the exit code says whether all is well."""
    from medprobe.cliargs import parse_options
    from medprobe.data.check import check_dataset

    options = parse_options(args.option or [])
    progress = None
    if not args.quiet and not args.no_read and sys.stderr.isatty():
        def progress(done: int, total: int) -> None:
            if done == total or done % 200 == 0:
                print(f"\rreading files: {done}/{total}", end="\n" if done == total else "", file=sys.stderr,
                      flush=True)
    report = check_dataset(args.name, args.root, options, read_files=not args.no_read, progress=progress)
    print(report.to_json() if args.json else report.format())
    return 0 if report.ok else 1


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``medprobe data`` with its ``check`` subcommand."""
    data = subparsers.add_parser("data", help="inspect and validate local copies of datasets")
    sub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    p = sub.add_parser("check", help="validate a local copy of a dataset: counts, missing/unreadable files, "
                                     "labels, patients across splits",
                       description="Validate a local copy of a dataset. Lists every problem (missing or "
                                   "unreadable files, bad rows, out-of-range labels, patients in more than one "
                                   "split), each naming its file and row. Exit code 0 only when all is well.")
    p.add_argument("name", help="dataset adapter name (see `medprobe list datasets`)")
    p.add_argument("--root", default=None, help="the dataset's folder or file, as the adapter expects")
    p.add_argument("--option", "-o", action="append", metavar="KEY=VALUE", help="adapter option, repeatable")
    p.add_argument("--no-read", action="store_true", help="only check listings and presence; do not read pixels")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(handler=cmd_data_check)
