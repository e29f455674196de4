"""``medprobe presets``: the experiments shipped for the seed studies' tables and figures."""
from __future__ import annotations

import argparse
import json
import sys


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("presets", help="list the presets (one experiment per published table/figure)")
    p.add_argument("name", nargs="?", help="show one preset's file (source, experiment, published numbers)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_presets)


def cmd_presets(args: argparse.Namespace) -> int:
    from medprobe.presets import get_preset, list_presets
    if args.name:
        preset = get_preset(args.name)
        if args.json:
            print(json.dumps({"name": preset.name, **preset.raw, "needs": preset.needs()}, indent=1))
        else:
            import yaml
            print(f"# preset {preset.name}; run: medprobe run --preset {preset.name} "
                  "--set datasets.<name>.root=PATH ... (or --stand-in phantom --tiny to try it offline)")
            print(yaml.safe_dump(preset.raw, sort_keys=False, allow_unicode=True), end="")
        return 0
    rows = [p.summary() for p in list_presets()]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    def needs(r: dict) -> str:
        data = ", ".join(f"{k}={v}" for k, v in r["datasets"].items())
        return f"datasets: {data}; backbones: {', '.join(r['backbones'].values())}"
    if not sys.stdout.isatty():
        for r in rows:
            print("\t".join([r["name"], f"{r['study']}, {r['table']}", needs(r)]))
        return 0
    from rich.console import Console
    from rich.table import Table
    table = Table(title="medprobe presets (medprobe run --preset NAME)")
    for col in ("name", "source", "needs", "published"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], f"{r['study']}, {r['table']}: {r['title']}", needs(r), str(r["published"]))
    Console().print(table)
    return 0
