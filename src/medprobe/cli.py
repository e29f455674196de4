"""The ``medprobe`` command line.

Every user error (:class:`~medprobe.errors.MedprobeError`) is printed as one message
without a traceback and exits with code 2; ``--debug`` shows the traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence

from medprobe.errors import ConfigError, MedprobeError

Handler = Callable[[argparse.Namespace], int]


def _parse_blocks(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--blocks takes comma-separated integers such as 1,4; got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--blocks values are numbers of last blocks (>= 1); got {text!r}")
    return values


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _parse_options(items: Sequence[str]) -> dict:
    """``key=value`` pairs; values parsed as YAML scalars (numbers, booleans, lists)."""
    import yaml
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"expected key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


# --------------------------------------------------------------------------- list
def cmd_list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table
    console = Console()
    if args.what == "backbones":
        from medprobe.backbones import list_backbones
        specs = list_backbones()
        if args.json:
            print(json.dumps([s.to_dict() for s in specs], indent=1))
            return 0
        table = Table(title="medprobe backbones")
        for col in ("name", "family", "dim", "patch", "blocks", "size", "mean/std", "description"):
            table.add_column(col)
        for s in specs:
            table.add_row(s.name, s.family, str(s.embed_dim), str(s.patch_size or "-"), str(s.num_blocks),
                          str(s.default_image_size), f"{s.preprocess.mean[0]:.3f}/{s.preprocess.std[0]:.3f}",
                          s.description)
        console.print(table)
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
        table = Table(title="medprobe dataset adapters")
        table.add_column("name")
        table.add_column("summary")
        for i in infos:
            table.add_row(i.name, i.summary)
        console.print(table)
        return 0
    from medprobe.protocols import list_protocols
    names = list_protocols()
    print(json.dumps(names) if args.json else "\n".join(names))
    return 0


# --------------------------------------------------------------------------- extract
def cmd_extract(args: argparse.Namespace) -> int:
    from medprobe.backbones import create_backbone
    from medprobe.data.adapters import build_dataset
    from medprobe.data.splits import check_no_leakage
    from medprobe.features import extract_features
    options = _parse_options(args.option or [])
    dataset = build_dataset(args.dataset, args.root, **options)
    check_no_leakage(dataset)  # the same guard as `medprobe run`: no patient in two splits
    backbone = create_backbone(args.backbone, args.weights, tiny=args.tiny,
                               overrides=_parse_options(args.arch or []) or None)
    result = extract_features(backbone, dataset, args.cache_dir, image_size=args.image_size,
                              last_blocks=max(args.blocks), precision=args.precision, batch_size=args.batch_size,
                              progress=not args.quiet)
    store = result.store
    counts = ", ".join(f"{s}: {store.split_info(s)['n']}" for s in store.splits)
    if result.reused:
        print(f"reused feature store {store.path} ({counts}) in {result.seconds:.2f} s; nothing recomputed")
    else:
        print(f"wrote feature store {store.path} ({counts}) in {result.seconds:.1f} s "
              f"({result.items_per_second:.1f} images/s, precision {store.meta['precision']})")
    if backbone.weights_tag == "random":
        print("note: weights are random (no pretrained weights were loaded)")
    return 0


# --------------------------------------------------------------------------- parser
_EXTRA_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def extra_command(register: Callable[[argparse._SubParsersAction], None]) -> Callable:
    """Let a subpackage add a subcommand (``register(subparsers)`` sets ``handler``)."""
    _EXTRA_COMMANDS.append(register)
    return register


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medprobe", description="Measure and adapt vision foundation models "
                                     "for medical imaging.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="list backbones, datasets or protocols")
    p.add_argument("what", choices=["backbones", "datasets", "protocols"])
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--details", metavar="NAME", help="(datasets) full description of one adapter")
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
    p.add_argument("--image-size", type=_positive_int, default=None)
    p.add_argument("--cache-dir", required=True)
    p.add_argument("--blocks", type=_parse_blocks, default=[1, 4],
                   help="numbers of last blocks the probes will use, e.g. 1,4 (default); the store keeps max of them")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=cmd_extract)

    from medprobe import commands  # noqa: F401  (registers the other subcommands)
    for register in _EXTRA_COMMANDS:
        register(sub)
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
