"""``medprobe analyze {pca,cka,attention,correspondence,ranking}``: pictures (PNG) and their numbers
(CSV/NPY) of what a backbone's features look like. Put them under ``OUTPUT_DIR/analysis/`` to
have ``medprobe report OUTPUT_DIR --html`` include them."""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medprobe.errors import ConfigError

DESCRIPTION = ("Pictures (PNG) and the numbers behind them (CSV/NPY) of what a backbone's features look like. "
               "Write them under OUTPUT_DIR/analysis/ and `medprobe report OUTPUT_DIR --html` includes them.")


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,3,7; got {text!r}") from None


def _point(text: str) -> tuple[float, float]:
    parts = text.split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        return float(parts[0]), float(parts[1])
    except ValueError:
        raise argparse.ArgumentTypeError(f"a point is X,Y (column,row), e.g. 14,10; got {text!r}") from None


def _positive(text: str) -> int:
    from medprobe.cliargs import positive_int
    return positive_int(text)


def _add_model(p: argparse.ArgumentParser, suffix: str = "", required: bool = True, what: str = "") -> None:
    p.add_argument(f"--backbone{suffix}", required=required, help=f"backbone name{what} (see `medprobe list backbones`)")
    p.add_argument(f"--weights{suffix}", default=None if suffix else "random",
                   help="random, hub, or a local file/folder" + (" (default: as --weights)" if suffix
                                                                 else " (default: random)"))
    p.add_argument(f"--tiny{suffix}", action="store_true", help="small configuration of the architecture (tests)")
    p.add_argument(f"--arch{suffix}", action="append", default=[], metavar="KEY=VALUE",
                   help="architecture override passed to the model constructor, e.g. depth=6 (repeatable; the "
                        "same overrides the checkpoint was trained with, see its pretrain_info.json)")


def _add_images(p: argparse.ArgumentParser, default_n: int) -> None:
    g = p.add_argument_group("images (a dataset adapter or image files)")
    g.add_argument("--dataset", help="dataset adapter name (see `medprobe list datasets`)")
    g.add_argument("--root", default=None, help="dataset location (file or folder) for the adapter")
    g.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE", help="adapter option")
    g.add_argument("--split", default=None, help="take images from this split (default: whole dataset)")
    g.add_argument("--indices", type=_int_list, default=None,
                   help="comma-separated image positions within the split/dataset (default: the first --n)")
    g.add_argument("--n", type=_positive, default=default_n, help=f"number of images (default {default_n})")
    g.add_argument("--images", nargs="+", metavar="FILE", help="image files (PNG, DICOM, NIfTI, .npy) instead of "
                   "a dataset; volumes give slices")
    g.add_argument("--slices", type=_int_list, default=None, help="slice indices of volumes (default: the middle)")
    g.add_argument("--slice-axis", type=int, default=2, choices=[0, 1, 2],
                   help="NIfTI axis to slice along (default 2: axial for RAS-oriented volumes)")
    p.add_argument("--image-size", type=_positive, default=None, help="model input size (default: the backbone's)")
    p.add_argument("--batch-size", type=_positive, default=16)


def _add_out(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder for the PNG/CSV/NPY files (e.g. RUN_DIR/analysis/pca)")


def register_cli(sub: argparse._SubParsersAction) -> None:
    """Add ``medprobe analyze`` and its five analyses."""
    top = sub.add_parser("analyze", help="look inside the features: pca, cka, attention, correspondence, ranking",
                         description=DESCRIPTION)
    asub = top.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")

    p = asub.add_parser("pca", help="PCA of patch tokens fitted jointly over images, first 3 components as RGB")
    _add_model(p)
    _add_images(p, 4)
    p.add_argument("--block", type=int, default=-1, help="block whose patch tokens to use (default -1: last)")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="background threshold on the first component scaled to [0, 1] (default 0.5)")
    p.add_argument("--background", choices=["auto", "low", "high", "none"], default="auto",
                   help="which side of the first component is background: auto (the side of the image borders), "
                        "low, high, or none (keep all patches)")
    p.add_argument("--clip-percentile", type=float, default=1.0,
                   help="scale each colour between this percentile and 100 minus it (default 1; 0 = min-max)")
    _add_out(p)
    p.set_defaults(handler=cmd_pca)

    p = asub.add_parser("cka", help="linear CKA between every pair of layers of two models (heat map)")
    _add_model(p, required=False, what=" of model A (rows)")
    _add_model(p, "-b", required=False, what=" of model B (columns; default: as --backbone)")
    _add_images(p, 64)
    p.add_argument("--token", choices=["cls", "mean", "flatten"], default="cls",
                   help="representation per layer: CLS/pooled token, mean patch token, or all patch tokens flattened")
    p.add_argument("--minibatch", type=int, default=None,
                   help="minibatch size of the unbiased minibatch CKA (>= 4); 0 = full CKA; default: full up to "
                        "1024 images, else 256")
    p.add_argument("--seed", type=int, default=0, help="seed of the minibatch order")
    p.add_argument("--features", nargs=2, metavar=("A", "B"),
                   help="compare saved features instead: two .npz files (one (n, ...) array per layer) or .npy "
                        "(layers, n, ...)")
    _add_out(p)
    p.set_defaults(handler=cmd_cka)

    p = asub.add_parser("attention", help="last-layer CLS-to-patch attention per head, over the images")
    _add_model(p)
    _add_images(p, 4)
    p.add_argument("--max-heads", type=_positive, default=12, help="heads drawn per image (all are saved)")
    _add_out(p)
    p.set_defaults(handler=cmd_attention)

    p = asub.add_parser("correspondence", help="similarity of a query patch of the first image to every patch of "
                        "the other images")
    _add_model(p)
    _add_images(p, 2)
    p.add_argument("--point", type=_point, action="append", required=True, metavar="X,Y",
                   help="query point on the first image in its native pixels (x = column, y = row); repeatable")
    p.add_argument("--frac", action="store_true", help="--point values are fractions of width and height")
    p.add_argument("--block", type=int, default=-1, help="block whose patch tokens to use (default -1: last)")
    _add_out(p)
    p.set_defaults(handler=cmd_correspondence)

    p = asub.add_parser("ranking", help="average rank of each backbone on classification vs segmentation")
    p.add_argument("output_dir", help="experiment output folder holding results.db")
    p.add_argument("--protocol", action="append", default=None, help="only rank results of this protocol "
                   "(repeatable; default: each backbone's best protocol/variant per dataset)")
    p.add_argument("--out", default=None, help="output folder (default: OUTPUT_DIR/analysis/ranking)")
    p.set_defaults(handler=cmd_ranking)


# --------------------------------------------------------------------------- helpers
def _images(args: argparse.Namespace) -> Any:
    from medprobe.analysis.images import images_from_dataset, images_from_files
    if bool(args.dataset) == bool(args.images):
        raise ConfigError("give either --dataset (with --root) or --images FILE ..., not both and not neither")
    if args.images:
        if args.indices is not None or args.split:
            raise ConfigError("--indices and --split select dataset images; with --images list the files you want")
        return images_from_files(args.images, slices=args.slices, slice_axis=args.slice_axis)
    from medprobe.cliargs import parse_options
    return images_from_dataset(args.dataset, args.root, parse_options(args.option), split=args.split,
                               indices=args.indices, n=args.n, slices=args.slices)


def _backbone(name: str, weights: str, tiny: bool, arch: Sequence[str] = ()) -> Any:
    from medprobe.backbones import create_backbone
    from medprobe.cliargs import parse_options
    from medprobe.runtime import default_device
    return create_backbone(name, weights, tiny=tiny, overrides=parse_options(arch) or None).to(default_device())


def _title(backbone: Any, what: str) -> str:
    return f"{what}: {backbone.name}{' (tiny)' if getattr(backbone, 'tiny', False) else ''}, weights {backbone.weights_tag}"


def _report(files: dict[str, Path], backbones: Sequence[Any] = ()) -> None:
    print("wrote " + ", ".join(str(p) for k, p in files.items() if k != "caption"))
    if any(b.weights_tag == "random" for b in backbones):
        print("note: weights are random (no pretrained weights were loaded); the pictures show an untrained network")


# --------------------------------------------------------------------------- handlers
def cmd_pca(args: argparse.Namespace) -> int:
    from medprobe.analysis.images import require_patch_tokens
    from medprobe.analysis.pca import patch_pca, write_pca
    bb = _backbone(args.backbone, args.weights, args.tiny, args.arch)
    require_patch_tokens(bb, "PCA of patch tokens")
    imgs = _images(args)
    result, display = patch_pca(bb, imgs, image_size=args.image_size, block=args.block, threshold=args.threshold,
                                background=args.background, clip_percentile=args.clip_percentile,
                                batch_size=args.batch_size)
    _report(write_pca(result, display, imgs.names, args.out, title=_title(bb, "PCA of patch tokens")), [bb])
    return 0


def cmd_cka(args: argparse.Namespace) -> int:
    from medprobe.analysis.cka import FULL_CKA_MAX_N, cka_between, cka_matrix, load_feature_file, write_cka
    if args.minibatch is not None and args.minibatch != 0 and args.minibatch < 4:
        raise ConfigError(f"--minibatch must be 0 (full CKA) or >= 4, got {args.minibatch}")
    if args.features:
        if args.backbone or args.dataset or args.images:
            raise ConfigError("--features compares saved features; do not combine it with --backbone or images")
        (fa, la), (fb, lb) = load_feature_file(args.features[0]), load_feature_file(args.features[1])
        n = len(fa[0]) if fa and hasattr(fa[0], "__len__") else 0
        mb = args.minibatch if args.minibatch is not None else (256 if n > FULL_CKA_MAX_N else 0)
        result = cka_matrix(fa, fb, labels_a=la, labels_b=lb, minibatch=mb or None, seed=args.seed)
        result.name_a, result.name_b = Path(args.features[0]).name, Path(args.features[1]).name
        _report(write_cka(result, args.out))
        return 0
    if not args.backbone:
        raise ConfigError("give --backbone (model A) and images, or --features A B")
    a = _backbone(args.backbone, args.weights, args.tiny, args.arch)
    same = (args.backbone_b in (None, args.backbone) and args.weights_b in (None, args.weights) and not args.tiny_b
            and not args.arch_b)
    # nothing about model B given: compare model A with itself (its layer-by-layer self-similarity)
    b = a if same else _backbone(args.backbone_b or args.backbone, args.weights_b or args.weights,
                                 args.tiny_b or (args.tiny and not args.backbone_b),
                                 args.arch_b or ([] if args.backbone_b else args.arch))
    imgs = _images(args)
    mb = args.minibatch if args.minibatch is not None else (256 if len(imgs) > FULL_CKA_MAX_N else 0)
    result = cka_between(a, b, imgs, image_size=args.image_size, token=args.token, minibatch=mb or None,
                         seed=args.seed, batch_size=args.batch_size)
    _report(write_cka(result, args.out), [a, b])
    return 0


def cmd_attention(args: argparse.Namespace) -> int:
    from medprobe.analysis.attention import attention_maps, check_attention_support, write_attention
    bb = _backbone(args.backbone, args.weights, args.tiny, args.arch)
    check_attention_support(bb)
    imgs = _images(args)
    result, display = attention_maps(bb, imgs, image_size=args.image_size, batch_size=args.batch_size)
    files = write_attention(result, display, imgs.names, args.out, title=_title(bb, "CLS attention"))
    _report(files, [bb])
    return 0


def cmd_correspondence(args: argparse.Namespace) -> int:
    from medprobe.analysis.correspondence import patch_correspondence, write_correspondence
    from medprobe.analysis.images import require_patch_tokens
    bb = _backbone(args.backbone, args.weights, args.tiny, args.arch)
    require_patch_tokens(bb, "patch correspondence")
    imgs = _images(args)
    if len(imgs) < 2:
        raise ConfigError(f"correspondence needs a query image and at least one target image; got {len(imgs)} image "
                          f"(give two --images, or --n 2 / --indices Q,T with a dataset)")
    result, display = patch_correspondence(bb, imgs, args.point, image_size=args.image_size, block=args.block,
                                           fraction=args.frac, batch_size=args.batch_size)
    files = write_correspondence(result, display, imgs.names, args.out, args.point,
                                 title=_title(bb, "patch correspondence"))
    _report(files, [bb])
    return 0


def cmd_ranking(args: argparse.Namespace) -> int:
    from medprobe.analysis.ranking import ranking_from_output, require_both_families, write_ranking
    ranking = ranking_from_output(args.output_dir, args.protocol)
    require_both_families(ranking)
    out = Path(args.out) if args.out else Path(args.output_dir) / "analysis" / "ranking"
    files = write_ranking(ranking, out)
    a = ranking.average
    for r in a.itertuples():
        print(f"  {r.backbone}: classification rank {r.classification_rank:.2f} ({r.n_classification} datasets), "
              f"segmentation rank {r.segmentation_rank:.2f} ({r.n_segmentation} datasets)")
    _report(files)
    return 0
