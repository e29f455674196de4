"""``medprobe check-weights NAME PATH``: verify a downloaded weights file before a long run."""
from __future__ import annotations

import argparse
import json
from typing import Any


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "check-weights", help="load a weights file for a backbone: layout, parameters, conversions, one forward",
        description="Load PATH as the weights of backbone NAME (every tensor must be accounted for) and print the "
                    "layout recognised, the parameter count, each conversion applied and a one-image forward pass "
                    "(shapes and finite values), so a download can be verified before a long run.")
    p.add_argument("name", help="backbone name (see `medprobe list backbones`)")
    p.add_argument("path", help="weights file or folder")
    p.add_argument("--tiny", action="store_true", help="the tiny configuration of the architecture (tests)")
    p.add_argument("--arch", action="append", metavar="KEY=VALUE", help="architecture override, repeatable")
    p.add_argument("--image-size", type=int, default=None, help="forward-pass size (default: the backbone's)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_check_weights)


def check_weights(name: str, path: str, *, tiny: bool = False, overrides: dict[str, Any] | None = None,
                  image_size: int | None = None) -> dict[str, Any]:
    """Load ``path`` for backbone ``name`` and describe it (raises WeightsError when it does not fit)."""
    import torch

    from medprobe.backbones import create_backbone
    from medprobe.backbones.weights import parse_weights
    from medprobe.errors import WeightsError
    if parse_weights(path).kind not in ("file", "dir"):
        raise WeightsError(f"check-weights needs a weights file or folder, got {path!r}")
    bb = create_backbone(name, path, tiny=tiny, overrides=overrides or None)
    report = bb.load_report
    size = image_size or (bb.patch_size * 4 if tiny and bb.patch_size else 64 if tiny else bb.default_image_size)
    x = torch.zeros(1, 3, size, size)
    with torch.inference_mode():
        out = bb.forward_tokens(x)
    finite = bool(torch.isfinite(out.cls).all() and torch.isfinite(out.patch_grid).all())
    if not finite:
        raise WeightsError(f"weights {path} give non-finite outputs for {name} (NaN/inf in the file?)")
    return {"backbone": name, "file": report.source, "layout": report.layout, "conversions": report.conversions,
            "tensors": report.tensors, "parameters": sum(p.numel() for p in bb.parameters()),
            "weights": bb.weights_tag, "forward": {"input": list(x.shape), "cls": list(out.cls.shape),
                                                   "patch_grid": list(out.patch_grid.shape),
                                                   "cls_norm": round(float(out.cls.norm()), 4), "finite": finite}}


def cmd_check_weights(args: argparse.Namespace) -> int:
    from medprobe.cliargs import parse_options
    info = check_weights(args.name, args.path, tiny=args.tiny, overrides=parse_options(args.arch or []),
                         image_size=args.image_size)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    f = info["forward"]
    print(f"backbone     {info['backbone']}\nfile         {info['file']}\nlayout       {info['layout']}\n"
          f"tensors      {info['tensors']} (every tensor of the model read from the file)\n"
          f"parameters   {info['parameters']:,}\nweights tag  {info['weights']}")
    print("conversions  " + ("\n             ".join(info["conversions"]) or "none"))
    print(f"forward      input {f['input']} -> CLS {f['cls']}, patch grid {f['patch_grid']}, "
          f"|CLS| {f['cls_norm']}, all finite")
    print("OK: the weights fit this backbone")
    return 0
