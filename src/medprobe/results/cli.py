"""``medprobe export-predictions``, ``compare``, ``subgroups`` and ``calibration``: analyses of stored predictions."""
from __future__ import annotations

import argparse
import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medprobe.cliargs import positive_int
from medprobe.errors import ConfigError


def _add_output(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    p.add_argument("--csv", metavar="FILE", help="also write the rows to a CSV file")


def _add_bootstrap(p: argparse.ArgumentParser, default: int) -> None:
    p.add_argument("--bootstrap", type=positive_int, default=default,
                   help=f"bootstrap resamples (by patient when patient ids repeat; default {default})")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resamples (default 0)")
    p.add_argument("--alpha", type=float, default=0.05, help="1 - confidence level of the intervals (default 0.05)")


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-predictions", help="all stored per-sample predictions of an output folder as one CSV")
    p.add_argument("output_dir")
    p.add_argument("--out", required=True, metavar="FILE.csv")
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser("compare", help="paired comparison of backbones on the same test samples "
                       "(bootstrap, DeLong, Holm)")
    p.add_argument("output_dir")
    p.add_argument("--metric", default="auroc", help="auroc (default), auprc, accuracy, balanced_accuracy, kappa, "
                   "recall, specificity")
    p.add_argument("--per-seed", action="store_true", help="add one descriptive row per seed")
    p.add_argument("--per-class", action="store_true", help="add per-class AUROC rows (multiclass/multi-label)")
    _add_bootstrap(p, 2000)
    _add_output(p)
    p.set_defaults(handler=cmd_compare)

    p = sub.add_parser("subgroups", help="metric per metadata group (sex, age_bin, view, site) with CIs and the "
                       "worst-group gap")
    p.add_argument("output_dir")
    p.add_argument("--by", required=True, metavar="COLUMN", help="metadata column")
    p.add_argument("--metric", default="auroc")
    p.add_argument("--metadata", metavar="FILE.csv",
                   help="per-sample metadata (columns sample_key and COLUMN) for predictions stored without it")
    _add_bootstrap(p, 1000)
    _add_output(p)
    p.set_defaults(handler=cmd_subgroups)

    p = sub.add_parser("calibration", help="ECE, Brier score, reliability diagrams and a validation-chosen "
                       "threshold applied to test")
    p.add_argument("output_dir")
    p.add_argument("--bins", type=positive_int, default=10, help="equal-width bins of the ECE (default 10)")
    p.add_argument("--threshold", choices=["youden", "sensitivity"], default="youden",
                   help="how the threshold is chosen on validation (default youden)")
    p.add_argument("--target-sensitivity", type=float, default=None, help="with --threshold sensitivity, e.g. 0.9")
    p.add_argument("--alpha", type=float, default=0.05)
    p.add_argument("--plots", metavar="DIR", help="write one reliability-diagram PNG per unit into DIR")
    _add_output(p)
    p.set_defaults(handler=cmd_calibration)


# --------------------------------------------------------------------------- output
def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        if math.isinf(v):
            return str(v)
        return f"{v:.{digits}f}" if abs(v) >= 10 ** -digits or v == 0 else f"{v:.1e}"
    if isinstance(v, list):
        return ",".join(str(x) for x in v)
    return str(v)


def _p(v: Any) -> str:
    if v is None:
        return "n/a"
    return "<1e-4" if v < 1e-4 else f"{v:.4f}"


def _ci(lo: Any, hi: Any) -> str:
    return "n/a" if lo is None or hi is None else f"[{lo:+.4f}, {hi:+.4f}]"


def _print_plain(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]
    for row in [list(columns)] + [list(r) for r in rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def _emit(rows: list[dict[str, Any]], args: argparse.Namespace, table) -> None:
    if args.csv:
        _write_csv(rows, Path(args.csv))
    if args.json:
        print(json.dumps(rows, indent=1, default=str))
    else:
        table(rows)
        if args.csv:
            print(f"wrote {len(rows)} rows to {args.csv}")


def _write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, cols)
            w.writeheader()
            for r in rows:
                w.writerow({k: (json.dumps(v) if isinstance(v, list) else "" if v is None else v)
                            for k, v in r.items()})
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {e.strerror or e}") from None


# --------------------------------------------------------------------------- handlers
def cmd_export(args: argparse.Namespace) -> int:
    from medprobe.results.export import export_predictions
    summary = export_predictions(args.output_dir, args.out)
    print(f"wrote {summary.rows} rows of {summary.units} units to {summary.path} (every predictions file matched "
          "its recorded checksum)")
    for s in summary.skipped:
        print(f"skipped {s}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from medprobe.results.analyses import compare_table
    rows = compare_table(args.output_dir, args.metric, bootstrap=args.bootstrap, seed=args.seed, alpha=args.alpha,
                         per_seed=args.per_seed, per_class=args.per_class)

    def table(rows: list[dict[str, Any]]) -> None:
        if not rows:
            print("nothing to compare: no configuration was run with two or more backbones")
            return
        print(f"paired comparison of backbones, {args.metric} on test (A - B; {args.bootstrap} paired bootstrap "
              f"resamples, {100 * (1 - args.alpha):g}% CI; p_holm: Holm over the {sum(not r['detail'] for r in rows)}"
              " primary rows)")
        _print_plain(("dataset", "protocol", "label", "class/seed", "A", "B", "seeds", "n (patients)", "A value",
                      "B value", "diff", "CI", "test", "p", "p_holm"),
                     [(r["dataset"], r["protocol"], r["label"],
                       r["class"] or (f"seed {r['seeds'][0]}" if r["detail"] == "seed" else ""),
                       r["backbone_a"], r["backbone_b"], str(len(r["seeds"])),
                       "n/a" if r["n_samples"] is None else f"{r['n_samples']} ({r['n_patients']})",
                       _fmt(r["value_a"]), _fmt(r["value_b"]), _fmt(r["diff"]), _ci(r["ci_low"], r["ci_high"]),
                       r["test"] or "-", _p(r["p"]), _p(r["p_holm"]) if not r["detail"] else "(detail)")
                      for r in rows])
        seen = set()
        for r in rows:
            for note in (r["note"] or "").split("; "):
                line = f"note: {r['dataset']} / {r['protocol']} / {r['label']} ({r['backbone_a']} vs " \
                       f"{r['backbone_b']}): "
                if note and line + note not in seen:
                    seen.add(line + note)
                    print(line + note)

    _emit(rows, args, table)
    return 0


def _read_metadata_csv(path: str, column: str) -> dict[str, str]:
    p = Path(path)
    try:
        with open(p, newline="") as fh:
            reader = csv.DictReader(fh)
            fields = reader.fieldnames or []
            missing = [c for c in ("sample_key", column) if c not in fields]
            if missing:
                raise ConfigError(f"{p}: no column {', '.join(repr(m) for m in missing)} (has {', '.join(fields)})")
            return {row["sample_key"]: row[column] for row in reader}
    except OSError as e:
        raise ConfigError(f"cannot read --metadata {p}: {e.strerror or e}") from None


def cmd_subgroups(args: argparse.Namespace) -> int:
    from medprobe.results.analyses import subgroup_table
    meta = _read_metadata_csv(args.metadata, args.by) if args.metadata else None
    rows = subgroup_table(args.output_dir, args.by, args.metric, bootstrap=args.bootstrap, seed=args.seed,
                          alpha=args.alpha, metadata=meta)

    def table(rows: list[dict[str, Any]]) -> None:
        print(f"{args.metric} on test by {args.by} (seed mean; {100 * (1 - args.alpha):g}% CI from {args.bootstrap} "
              "resamples by patient; gap = best - worst group)")
        _print_plain(("dataset", "protocol", "label", "backbone", "group", "n", "value", "CI", "note"),
                     [(r["dataset"], r["protocol"], r["label"], r["backbone"],
                       (r["group"] or "") if r["row"] == "group" else f"gap ({r['group'] or 'n/a'})", _fmt(r.get("n")),
                       _fmt(r.get("value")), "n/a" if r.get("ci_low") is None else
                       f"[{r['ci_low']:.4f}, {r['ci_high']:.4f}]", r.get("note") or "") for r in rows])

    _emit(rows, args, table)
    return 0


def cmd_calibration(args: argparse.Namespace) -> int:
    from medprobe.results.analyses import calibration_summary, reliability_diagrams
    rows = calibration_summary(args.output_dir, bins=args.bins, threshold=args.threshold,
                               target_sensitivity=args.target_sensitivity, alpha=args.alpha)

    def table(rows: list[dict[str, Any]]) -> None:
        print(f"calibration on test (ECE with {args.bins} equal-width bins; threshold chosen on val by "
              f"{args.threshold}, applied to test; Wilson {100 * (1 - args.alpha):g}% intervals)")
        _print_plain(("dataset", "backbone", "label", "seed", "class", "ECE", "Brier", "threshold", "sensitivity",
                      "specificity", "note"),
                     [(r["dataset"], r["backbone"], r["label"], str(r["seed"]), r["class"] or "", _fmt(r.get("ece")),
                       _fmt(r.get("brier")), _fmt(r.get("threshold")),
                       _fmt(r.get("sensitivity"), 3) + (f" [{r['sensitivity_ci'][0]:.3f}, {r['sensitivity_ci'][1]:.3f}]"
                                                        if r.get("sensitivity_ci") else ""),
                       _fmt(r.get("specificity"), 3) + (f" [{r['specificity_ci'][0]:.3f}, {r['specificity_ci'][1]:.3f}]"
                                                        if r.get("specificity_ci") else ""),
                       r.get("note") or "") for r in rows])

    _emit(rows, args, table)
    if args.plots:
        paths = reliability_diagrams(args.output_dir, args.plots, bins=args.bins)
        print(f"wrote {len(paths)} reliability diagram(s) to {args.plots}")
    return 0
