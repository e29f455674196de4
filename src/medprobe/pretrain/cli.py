"""``medprobe pretrain FILE.yaml``: continual self-supervised pretraining from the command line."""
from __future__ import annotations

import argparse
import os


def add_pretrain_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``pretrain`` subcommand (its handler is :func:`cmd_pretrain`)."""
    p = subparsers.add_parser(
        "pretrain", help="self-supervised (DINOv2/RAD-DINO) pretraining of a ViT on unlabelled images",
        description="DINOv2-style student/teacher pretraining (DINO + iBOT + KoLeo) of a registered ViT, from "
                    "random or pretrained weights, on images of a dataset adapter or a folder. Writes "
                    "OUTPUT_DIR/teacher_backbone.pth (loadable as `weights: PATH`), losses.csv/png and "
                    "checkpoints; a rerun resumes from the last checkpoint. Several processes: "
                    "torchrun --nproc_per_node K -m medprobe pretrain FILE.yaml")
    p.add_argument("config", metavar="FILE.yaml", help="pretraining configuration (YAML)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a configuration value, e.g. --set train.steps=500 (repeatable)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from the last checkpoint in output_dir (default); --no-resume starts over "
                        "and deletes earlier checkpoints")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_pretrain)
    return p


def cmd_pretrain(args: argparse.Namespace) -> int:
    """Handler: raises :class:`~medprobe.errors.MedprobeError` for user errors."""
    from medprobe.pretrain import load_pretrain_config, pretrain
    cfg = load_pretrain_config(args.config, list(args.overrides or []))
    path = pretrain(cfg, resume=bool(args.resume), progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"teacher backbone: {path}")
        print(f"loss curves: {cfg.output_path / 'losses.csv'} and {cfg.output_path / 'losses.png'}")
    return 0


register_cli = add_pretrain_parser  # listed in medprobe.cli.COMMAND_MODULES
