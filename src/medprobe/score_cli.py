"""``medprobe score``: external segmentations scored into a results folder (see :mod:`medprobe.score`)."""
from __future__ import annotations

import argparse



def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="score external segmentations (NIfTI/MHA label maps) against ground truth",
                       description="Pair prediction and ground-truth label maps by file name, check that their "
                                   "grids agree, and record per-case Dice, Jaccard, HD95, ASSD and NSD (with "
                                   "bootstrap CIs) in OUT/results.db, beside medprobe's own results.")
    p.add_argument("--pred", required=True, help="folder of predicted label maps")
    p.add_argument("--gt", required=True, help="folder of ground-truth label maps (same file names)")
    p.add_argument("--out", required=True, help="output folder (results.db, predictions/, report)")
    p.add_argument("--labels", nargs="+", default=None, metavar="NAME",
                   help="names of classes 0..C-1, background first (default: background, class_1, ...)")
    p.add_argument("--tolerance-mm", type=float, default=1.0, help="NSD tolerance in mm (default 1)")
    p.add_argument("--empty", choices=["one", "nan"], default="one",
                   help="a class absent from truth and prediction scores Dice/Jaccard/NSD 1 (one) or is left "
                        "out (nan); default one")
    p.add_argument("--include-background", action="store_true", help="score class 0 too")
    p.add_argument("--model", default=None, help="name of the predictions' model (default: the --pred folder name)")
    p.add_argument("--dataset", default=None, help="dataset name (default: the --gt folder name)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs (0 = none)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--no-report", action="store_true", help="skip writing the report files")
    p.set_defaults(handler=cmd_score)


def cmd_score(args: argparse.Namespace) -> int:
    from pathlib import Path

    from medprobe.score import score_folders
    res = score_folders(args.pred, args.gt, args.out, labels=args.labels, tolerance_mm=args.tolerance_mm,
                        empty=args.empty, include_background=args.include_background, bootstrap=args.bootstrap,
                        seed=args.seed, model=args.model, dataset=args.dataset)
    means = {m.metric: m for m in res.metrics if m.cls is None}
    print(f"{'reused' if res.reused else 'scored'} {len(res.per_case)} cases ({', '.join(res.class_names[1:])}); "
          f"run {res.key} in {Path(args.out) / 'results.db'}")
    for name in ("dice", "jaccard", "hd95", "assd", "nsd"):
        m = means.get(name)
        if m is not None:
            ci = f" [{m.ci_low:.4f}, {m.ci_high:.4f}]" if m.ci_low is not None else ""
            unit = " mm" if name in ("hd95", "assd") else ""
            print(f"  {name:8s} {m.value:.4f}{unit}{ci}" + (f"  ({m.note})" if m.note else ""))
    if not args.no_report:
        from medprobe.experiment.cli import write_report
        write_report(Path(args.out), html=False)
    return 0
