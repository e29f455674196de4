"""Extraction under torch.distributed: 2 gloo processes (torchrun) give the store one process gives."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from medprobe.backbones import create_backbone
from medprobe.data.base import ArrayDataset, Record, TaskSpec
from medprobe.features import extract_features
from medprobe.features.extract import shard_range

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPT = textwrap.dedent('''
    import json, sys
    import torch, torch.distributed as dist
    torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[2])
    from test_extract_distributed import KW, dataset
    from medprobe.backbones import create_backbone
    from medprobe.features import extract_features
    dist.init_process_group("gloo")
    vit = create_backbone("dinov2_vits14", "random", tiny=True)
    out = {}
    for ndim in (2, 3):
        r = extract_features(vit, dataset(ndim), f"{sys.argv[1]}/{ndim}d", **KW)
        out[ndim] = {"path": str(r.store.path), "items": r.items}
    print("RESULT", dist.get_rank(), json.dumps(out))
    dist.destroy_process_group()
''')

KW = dict(image_size=28, last_blocks=2, patch_blocks=[-1], precision="fp32", batch_size=4, commit_every=8,
          workers=0, progress=False)


def dataset(ndim):
    rng = np.random.default_rng(3)
    n = 27
    images = rng.random((n, 28, 28), dtype=np.float32) * 255 if ndim == 2 else \
        [rng.random((1 + i % 4, 28, 28), dtype=np.float32) * 255 for i in range(n)]
    recs = [Record(f"r{i}", ["train", "train", "val", "test"][i % 4], f"p{i}", i % 2) for i in range(n)]
    return ArrayDataset(images, recs, TaskSpec("binary", ("a", "b")), name=f"dist{ndim}", ndim=ndim)


def _files(path):
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def test_shards_cover_every_item_once():
    for n, b, w, whole in [(27, 4, 2, False), (5, 4, 3, False), (10, 1, 4, True), (1, 8, 2, False)]:
        ranges = [shard_range(n, b, r, w, whole) for r in range(w)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(ranges[i][1] == ranges[i + 1][0] for i in range(w - 1))
        assert all(lo % b == 0 or whole for lo, _ in ranges)  # whole batches: the batches of one process


def test_two_gloo_processes_give_the_single_process_store(tmp_path):
    script = tmp_path / "dist.py"
    script.write_text(SCRIPT)
    tests_dir = str(Path(__file__).parent)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path / "dist"), tests_dir], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {int(line.split()[1]): json.loads(line.split(" ", 2)[2])
               for line in proc.stdout.splitlines() if line.startswith("RESULT")}
    assert sorted(results) == [0, 1]
    vit = create_backbone("dinov2_vits14", "random", tiny=True)
    for ndim in (2, 3):
        single = extract_features(vit, dataset(ndim), tmp_path / "single", **KW).store
        paths = {results[r][str(ndim)]["path"] for r in (0, 1)}
        assert len(paths) == 1
        merged = Path(paths.pop())
        assert merged.name == single.path.name  # the same identity
        items = [results[r][str(ndim)]["items"] for r in (0, 1)]
        assert min(items) > 0  # both processes worked, and each item was embedded once:
        assert sum(items) == sum(len(single.array(s, "item_owner")) for s in single.splits)
        a, b = _files(merged), _files(single.path)
        assert a.keys() == b.keys()
        if ndim == 2:  # same batches in both: the same bytes, checksums included
            assert all(a[k] == b[k] for k in a)
        else:  # batches of slices are cut differently at shard boundaries: equal within fp32 rounding
            from medprobe.features.store import FeatureStore
            m = FeatureStore(merged)
            for key in single.meta["arrays"]:
                split, name = key.split("/")
                np.testing.assert_allclose(m.array(split, name).astype(np.float32),
                                           single.array(split, name).astype(np.float32), rtol=1e-3, atol=1e-3)
        assert [p.name for p in merged.parent.iterdir()] == [merged.name]  # parts removed after the merge
