"""Looking inside the features: joint patch PCA, layer-wise CKA, CLS attention maps, patch
correspondences and the cross-task ranking scatter (``medprobe analyze ...``).

>>> from medprobe.analysis import images_from_dataset, patch_pca, write_pca
>>> imgs = images_from_dataset("phantom", None, {"n": 8, "size": 64}, n=4)
>>> result, display = patch_pca(create_backbone("dinov2_vits14"), imgs, image_size=224)
>>> write_pca(result, display, imgs.names, "out/analysis/pca")
"""
from __future__ import annotations

from typing import Any

# name -> module; loaded on first use (torch, pandas): `medprobe --help` imports none of them
_MODULES = {
    "medprobe.analysis.attention": ("AttentionResult", "attention_maps", "cls_attention", "write_attention"),
    "medprobe.analysis.cka": ("CKAResult", "MinibatchCKA", "cka_between", "cka_matrix", "linear_cka", "write_cka"),
    "medprobe.analysis.correspondence": ("CorrespondenceResult", "patch_correspondence", "write_correspondence"),
    "medprobe.analysis.images": ("ImageSet", "images_from_dataset", "images_from_files", "prepare"),
    "medprobe.analysis.pca": ("PCAResult", "patch_pca", "pca_from_tokens", "write_pca"),
    "medprobe.analysis.ranking": ("Ranking", "average_ranks", "dataset_scores", "ranking_from_output",
                                  "write_ranking"),
}
_LAZY = {name: module for module, names in _MODULES.items() for name in names}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["AttentionResult", "CKAResult", "CorrespondenceResult", "ImageSet", "MinibatchCKA", "PCAResult", "Ranking",
           "attention_maps", "average_ranks", "cka_between", "cka_matrix", "cls_attention", "dataset_scores",
           "images_from_dataset", "images_from_files", "linear_cka", "patch_correspondence", "patch_pca",
           "pca_from_tokens", "prepare", "ranking_from_output", "write_attention", "write_cka",
           "write_correspondence", "write_pca", "write_ranking"]
