"""The ``medprobe cache`` command: ``verify`` feature stores in full, ``clean`` leftovers of dead writers.

Exit codes of ``verify``: 0 when every store checked is intact, 1 when some are damaged.
Imports stay light (no torch): the store module needs numpy only.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def cmd_cache_verify(args: argparse.Namespace) -> int:
    import shutil

    from medprobe.errors import DataError
    from medprobe.features.store import FeatureStore, human_bytes, iter_stores

    root = Path(args.path)
    if not root.exists():
        raise DataError(f"{root}: no such feature store or cache folder")
    stores = list(iter_stores(root))
    if not stores:
        raise DataError(f"{root}: no feature store here (a store is a folder with meta.json; "
                        f"a cache folder holds such folders)")
    damaged = 0
    for path in stores:
        try:
            store = FeatureStore(path)
            bad = store.verify()
            size = human_bytes(store.size_bytes())
        except DataError as e:
            bad, size = [str(e)], "?"
        if bad:
            damaged += 1
            note = ""
            if args.delete_damaged:
                shutil.rmtree(path, ignore_errors=True)
                note = " (deleted; the next run extracts it again)"
            print(f"DAMAGED  {path}: {', '.join(bad)}{note}")
        else:
            print(f"ok       {path} ({size}, all chunk checksums match)")
    print(f"{len(stores) - damaged} of {len(stores)} store(s) intact")
    return 1 if damaged else 0


def cmd_cache_clean(args: argparse.Namespace) -> int:
    from medprobe.errors import DataError
    from medprobe.features.store import clean_stale, human_bytes

    root = Path(args.path)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder; give the feature cache folder (e.g. OUTPUT_DIR/features)")
    freed = clean_stale(root, keep_resumable=args.keep_resumable, log=print)
    print(f"freed {human_bytes(freed)}")
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``medprobe cache`` with ``verify`` and ``clean``."""
    cache = subparsers.add_parser("cache", help="check and tidy feature stores")
    sub = cache.add_subparsers(dest="cache_command", required=True, metavar="SUBCOMMAND")
    p = sub.add_parser("verify", help="re-hash every array of feature stores against their checksums",
                       description="Re-hash every chunk of every array of one store, or of every store in a "
                                   "cache folder, against the checksums written when it was committed. "
                                   "Exit code 1 when a store is damaged.")
    p.add_argument("path", help="a feature store folder or a cache folder holding stores")
    p.add_argument("--delete-damaged", action="store_true", help="delete damaged stores (they are rebuilt on use)")
    p.set_defaults(handler=cmd_cache_verify)
    p = sub.add_parser("clean", help="remove unfinished stores (<store>.tmp-<pid>) whose process is gone",
                       description="Remove the temporary folders of extractions whose process is gone. "
                                   "They hold committed chunks an extraction of the same store would continue "
                                   "from; --keep-resumable keeps those.")
    p.add_argument("path", help="the feature cache folder")
    p.add_argument("--keep-resumable", action="store_true", help="keep folders an extraction can continue from")
    p.set_defaults(handler=cmd_cache_clean)
