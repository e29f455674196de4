"""The ``medprobe`` command line.

Every user error (:class:`~medprobe.errors.MedprobeError`) is printed as one message
without a traceback and exits with code 2; ``--debug`` shows the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence

from medprobe.cliargs import parse_blocks, parse_options, positive_int
from medprobe.errors import MedprobeError

Handler = Callable[[argparse.Namespace], int]


# --------------------------------------------------------------------------- list
def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Print a table without ever cutting a cell: rich on a terminal, plain aligned text otherwise.

    Piped output (``medprobe list backbones | grep dinov2``) is one line per row, columns
    separated by two spaces, the last column unpadded.
    """
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table
        table = Table(title=title)
        for i, col in enumerate(columns):  # the first column (the name) is never wrapped or cut
            table.add_column(col, no_wrap=i == 0, min_width=max([len(col)] + [len(r[0]) for r in rows]) if i == 0
                             else None, overflow="fold")
        for row in rows:
            table.add_row(*row)
        Console().print(table)
        return
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]
    for row in [list(columns)] + [list(r) for r in rows]:
        cells = [c.ljust(w) for c, w in zip(row[:-1], widths)] + [row[-1]]
        print("  ".join(cells).rstrip())


def cmd_list(args: argparse.Namespace) -> int:
    from rich.console import Console
    console = Console()
    if args.what == "backbones":
        from medprobe.backbones import list_backbones
        specs = list_backbones()
        if args.details:
            from medprobe.backbones.registry import describe, get_spec
            info = describe(get_spec(args.details))
            print(json.dumps(info, indent=1) if args.json else
                  "\n".join(f"{k:<20} {v}" for k, v in info.items()))
            return 0
        if args.json:
            print(json.dumps([s.to_dict() for s in specs], indent=1))
            return 0
        print_table("medprobe backbones",
                    ("name", "family", "dim", "patch", "blocks", "size", "mean/std", "description"),
                    [(s.name, s.family, str(s.embed_dim), str(s.patch_size or "-"), str(s.num_blocks),
                      str(s.default_image_size), f"{s.preprocess.mean[0]:.3f}/{s.preprocess.std[0]:.3f}",
                      s.description) for s in specs])
        return 0
    if args.what == "datasets":
        from medprobe.data.adapters import get_adapter, list_adapters
        if args.details:
            info = get_adapter(args.details)
            if args.json:
                print(json.dumps({"name": info.name, "summary": info.summary, "details": info.details}, indent=1))
            else:
                console.print(f"[bold]{info.name}[/bold]: {info.summary}\n\n{info.details}")
            return 0
        infos = list_adapters()
        if args.json:
            print(json.dumps([{"name": i.name, "summary": i.summary} for i in infos], indent=1))
            return 0
        print_table("medprobe dataset adapters", ("name", "summary"), [(i.name, i.summary) for i in infos])
        return 0
    from medprobe.protocols.catalog import protocol_names  # a table: no torch import to list names
    names = protocol_names()
    print(json.dumps(names) if args.json else "\n".join(names))
    return 0


# --------------------------------------------------------------------------- extract
def cmd_extract(args: argparse.Namespace) -> int:
    from medprobe.backbones import create_backbone
    from medprobe.data.adapters import build_dataset
    from medprobe.data.splits import check_no_leakage
    from medprobe.features import extract_features
    options = parse_options(args.option or [])
    dataset = build_dataset(args.dataset, args.root, **options)
    check_no_leakage(dataset)  # the same guard as `medprobe run`: no patient in two splits
    backbone = create_backbone(args.backbone, args.weights, tiny=args.tiny,
                               overrides=parse_options(args.arch or []) or None)
    from medprobe.pretrain.distributed import setup_distributed
    group = setup_distributed("auto")  # under torchrun: one process group, each process extracts its shard
    try:
        result = extract_features(backbone, dataset, args.cache_dir, image_size=args.image_size,
                                  last_blocks=max(args.blocks), precision=args.precision,
                                  batch_size=args.batch_size, progress=not args.quiet, workers=args.workers,
                                  device=group.device)
    finally:
        if group.owns_group:
            import torch.distributed
            torch.distributed.destroy_process_group()
    if not group.main:
        return 0
    store = result.store
    counts = ", ".join(f"{s}: {store.split_info(s)['n']}" for s in store.splits)
    if result.resumed_from:
        print(f"continued an interrupted extraction from item {result.resumed_from}")
    if result.reused:
        print(f"reused feature store {store.path} ({counts}) in {result.seconds:.2f} s; nothing recomputed")
    else:
        print(f"wrote feature store {store.path} ({counts}) in {result.seconds:.1f} s "
              f"({result.items_per_second:.1f} images/s, precision {store.meta['precision']})")
    if backbone.weights_tag == "random":
        print("note: weights are random (no pretrained weights were loaded)")
    return 0


# --------------------------------------------------------------------------- parser
# Modules that add subcommands, each through ``register_cli(subparsers)``; their heavy imports
# happen inside the handlers, so ``medprobe --help`` stays fast.
COMMAND_MODULES: tuple[str, ...] = (
    "medprobe.experiment.cli",
    "medprobe.presets.cli",
    "medprobe.pretrain.cli",
    "medprobe.data.cli",
    "medprobe.features.cli",
    "medprobe.analysis.cli",
    "medprobe.results.cli",
    "medprobe.demo",
    "medprobe.backbones.cli",
    "medprobe.score_cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medprobe", description="Measure and adapt vision foundation models "
                                     "for medical imaging.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="list backbones, datasets or protocols")
    p.add_argument("what", choices=["backbones", "datasets", "protocols"])
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--details", metavar="NAME", help="full description of one dataset adapter, or of one backbone (with "
                   "the weights file it needs and where it is published)")
    p.set_defaults(handler=cmd_list)

    p = sub.add_parser("extract", help="embed a dataset with a backbone into the feature store")
    p.add_argument("--backbone", required=True)
    p.add_argument("--weights", default="random", help="random, hub, or a local file/folder (default: random)")
    p.add_argument("--tiny", action="store_true", help="small configuration of the architecture (tests, demos)")
    p.add_argument("--arch", action="append", metavar="KEY=VALUE",
                   help="architecture override passed to the model constructor, e.g. depth=6 (repeatable)")
    p.add_argument("--dataset", required=True, help="dataset adapter name (see `medprobe list datasets`)")
    p.add_argument("--root", default=None, help="dataset location (file or folder) for the adapter")
    p.add_argument("--option", "-o", action="append", metavar="KEY=VALUE", help="adapter option, repeatable")
    p.add_argument("--image-size", type=positive_int, default=None)
    p.add_argument("--cache-dir", required=True)
    p.add_argument("--blocks", type=parse_blocks, default=[1, 4],
                   help="numbers of last blocks the probes will use, e.g. 1,4 (default); the store keeps max of them")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--workers", type=int, default=None,
                   help="processes reading and resizing images (default: the CPUs available; 0: none)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=cmd_extract)

    for module in COMMAND_MODULES:
        importlib.import_module(module).register_cli(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except MedprobeError as e:
        if args.debug:
            raise
        print(f"medprobe: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medprobe: interrupted; finished results are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
