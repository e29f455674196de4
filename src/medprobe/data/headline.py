"""The headline metric of a dataset: the one number tables and rankings lead with.

As the studies report them: quadratic kappa for APTOS 2019, recall for ISIC 2019 (WACV), AUPRC
for the RAD-DINO chest X-ray sets (VinDr-CXR, CANDID-PTX, RSNA-Pneumonia), the mean of Dice and
Jaccard for segmentation (the DINOv2-radiology study's metric) and AUROC otherwise. A ``headline_metric:`` key in a ``datasets:`` entry overrides it.
"""
from __future__ import annotations

from medprobe.errors import ConfigError, suggest

HEADLINE_BY_ADAPTER: dict[str, str] = {
    "aptos2019": "kappa",
    "isic2019": "recall",
    "vindr_cxr": "auprc",
    "candid_ptx": "auprc",
    "rsna_pneumonia": "auprc",
}
CLASSIFICATION_HEADLINES = ("auroc", "auprc", "accuracy", "balanced_accuracy", "kappa", "recall", "specificity")
SEGMENTATION_HEADLINES = ("dice_jaccard_mean", "dice", "jaccard", "hd95", "nsd", "assd")


def headline_metric(adapter: str, task_kind: str | None = None, override: str | None = None) -> str:
    """The headline metric of a dataset built by ``adapter`` (``override``: the entry's ``headline_metric``)."""
    allowed = SEGMENTATION_HEADLINES if task_kind == "segmentation" else CLASSIFICATION_HEADLINES
    if override is not None:
        if override not in allowed:
            raise ConfigError(f"headline_metric: {suggest(str(override), allowed, 'metric')}")
        return override
    if task_kind == "segmentation":
        return "dice_jaccard_mean"
    return HEADLINE_BY_ADAPTER.get(adapter, "auroc")
