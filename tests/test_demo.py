"""`medprobe demo`: its phantom task must be learnable by the frozen random-init networks it runs."""
import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from medprobe.backbones import create_backbone
from medprobe.data.adapters import build_dataset
from medprobe.data.preprocess import Preprocessor
from medprobe.demo import DEMO_DATASET, DEMO_SIZE, demo_experiment


def _linear_auroc(options: dict) -> float:
    """Test AUROC of a logistic regression on frozen random ResNet-18 features (last 4 blocks) of a phantom."""
    ds = build_dataset("phantom", None, **options)
    torch.manual_seed(0)
    backbone = create_backbone("resnet18", "random").eval()
    pre = Preprocessor(backbone.preprocess, DEMO_SIZE, ds.value_range)
    with torch.no_grad():
        x = pre.resize(torch.stack([pre.to_tensor(ds.load_image(i)) for i in range(len(ds))]))
        out = backbone.forward_tokens(x, blocks=[-4, -3, -2, -1])  # as the demo's linear probe on 4 blocks
        feats = torch.cat([b.cls for b in out.blocks] + [b.mean_patch for b in out.blocks], dim=1).numpy()
    y, split = ds.labels(), np.array([r.split for r in ds.records])
    train, test = split != "test", split == "test"
    scaler = StandardScaler().fit(feats[train])
    clf = LogisticRegression(C=0.1, max_iter=3000).fit(scaler.transform(feats[train]), y[train])
    return roc_auc_score(y[test], clf.predict_proba(scaler.transform(feats[test]))[:, 1])


def test_demo_phantom_is_learnable_by_a_frozen_random_network(tmp_path):
    options = dict(demo_experiment(tmp_path)["datasets"][DEMO_DATASET])
    assert options.pop("adapter") == "phantom"
    options["n"] = 400
    demo = _linear_auroc(options)
    nodule = _linear_auroc({**options, "finding": "nodule"})  # the subtle default finding: chance for random nets
    assert demo > 0.8, demo
    assert nodule < 0.7 and demo - nodule > 0.2, (demo, nodule)


def test_finding_option_is_validated():
    from medprobe.errors import ConfigError
    with pytest.raises(ConfigError, match="option finding"):
        build_dataset("phantom", None, n=10, finding="mass")
    with pytest.raises(ConfigError, match="finding=consolidation applies to the 2D"):
        build_dataset("phantom", None, n=10, ndim=3, finding="consolidation")
    a = build_dataset("phantom", None, n=10, finding="consolidation")
    b = build_dataset("phantom", None, n=10)
    assert a.fingerprint() != b.fingerprint() and a.task.class_names == ("normal", "consolidation")
