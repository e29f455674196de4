"""Zero-shot classification with a CLIP-family backbone's own text tower (no training).

Each class is described by prompts: every phrase of the class (``class_prompts``, default the
class name) put into every template. Text embeddings of one class are L2-normalised, averaged
and normalised again (CLIP's prompt ensembling); an image's logit for a prompt set is
``logit_scale * cos(image, text) + logit_bias`` with the checkpoint's scale and bias.

Scores: multiclass = softmax over the classes. Binary and multi-label with
``negative_templates`` = per finding, softmax over (positive, negative) prompts (CheXzero's
"{}" vs "no {}"); without them, binary = softmax over its two classes, multi-label = sigmoid.
The test split is scored with the same metrics and per-sample predictions as every protocol.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from medprobe.data.base import ImageDataset
from medprobe.errors import ConfigError
from medprobe.metrics import classification_metrics
from medprobe.options import require
from medprobe.predictions import classification_predictions
from medprobe.protocols.base import Protocol, Unit, UnitContext, UnitResult, register_protocol

CLASSIFICATION = ("binary", "multiclass", "multilabel")


@dataclass
class ZeroShotOptions:
    """``templates``/``negative_templates`` hold ``{}`` where a class phrase goes; ``class_prompts`` maps a
    class name to one phrase or a list of phrases (default: the class name, ``_`` as spaces)."""

    templates: list[str] = field(default_factory=lambda: ["a chest X-ray showing {}", "an X-ray with {}"])
    negative_templates: list[str] = field(default_factory=lambda: ["an X-ray with no {}",
                                                                   "a chest X-ray showing no {}"])
    class_prompts: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        require(len(self.templates) > 0, "templates: give at least one template, e.g. ['a chest X-ray showing {}']")
        for key in ("templates", "negative_templates"):
            for t in getattr(self, key):
                require("{}" in t, f"{key}: every template needs a {{}} where the class phrase goes, got {t!r}")
        for name, phrases in self.class_prompts.items():
            ok = isinstance(phrases, str) or (isinstance(phrases, list) and phrases
                                               and all(isinstance(p, str) and p for p in phrases))
            require(bool(ok), f"class_prompts.{name}: expected a phrase or a non-empty list of phrases, got {phrases!r}")

    def phrases(self, class_name: str) -> list[str]:
        value = self.class_prompts.get(class_name, class_name.replace("_", " "))
        return [value] if isinstance(value, str) else list(value)


def class_texts(options: ZeroShotOptions, class_names: tuple[str, ...], negative: bool) -> list[list[str]]:
    """Per class, every prompt (each phrase in each template)."""
    templates = options.negative_templates if negative else options.templates
    return [[t.format(p) for p in options.phrases(c) for t in templates] for c in class_names]


def zero_shot_scores(image_emb: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor | None, scale: float, bias: float,
                     task: str) -> np.ndarray:
    """Probabilities from image embeddings (N, E) and class text embeddings (C, E) (see the module doc)."""
    img = torch.nn.functional.normalize(image_emb.float(), dim=-1)
    lp = scale * img @ pos.T + bias
    if task == "multiclass":
        return torch.softmax(lp, dim=1).numpy()
    if neg is not None:
        ln = scale * img @ neg.T + bias
        p = torch.sigmoid(lp - ln)  # = softmax over (positive, negative) of each class
        return (p[:, -1] if task == "binary" else p).numpy()
    if task == "binary":
        return torch.softmax(lp, dim=1)[:, 1].numpy()
    return torch.sigmoid(lp).numpy()


def _ensemble(tower, texts: list[list[str]]) -> torch.Tensor:
    """One normalised embedding per class: the normalised mean of its prompts' normalised embeddings."""
    flat = [t for group in texts for t in group]
    emb = torch.nn.functional.normalize(tower.encode_text(flat).float(), dim=-1).cpu()
    out, i = [], 0
    for group in texts:
        out.append(emb[i:i + len(group)].mean(0))
        i += len(group)
    return torch.nn.functional.normalize(torch.stack(out), dim=-1)


@register_protocol
class ZeroShot(Protocol):
    name = "zero_shot"
    summary = ("zero-shot with the checkpoint's own text tower (CLIP, OpenCLIP, CheXzero, BiomedCLIP, SigLIP): class "
               "prompts x templates, positive vs negative prompts for findings; no training")
    Options = ZeroShotOptions
    uses_store = False

    def supports(self, dataset: ImageDataset) -> str | None:
        if dataset.task.kind not in CLASSIFICATION:
            return f"needs a classification dataset, {dataset.name} is {dataset.task.kind}"
        if dataset.ndim != 2:
            return f"scores 2D images, {dataset.name} is {dataset.ndim}D"
        return None

    def units(self, options: ZeroShotOptions, seeds: list[int], dataset: ImageDataset) -> list[Unit]:
        return [Unit(self.name, {}, seeds[0])]  # deterministic: one unit (the seed only draws bootstrap samples)

    @torch.inference_mode()
    def run(self, unit: Unit, options: ZeroShotOptions, ctx: UnitContext) -> UnitResult:
        from medprobe.backbones.text_towers import load_text_tower
        from medprobe.features.extract import preprocessor_for
        from medprobe.protocols.adapt.data import ImageSource
        ref = ctx.backbone_config
        ds = ctx.dataset
        task, names = ds.task.kind, tuple(ds.task.class_names)
        unknown = sorted(set(options.class_prompts) - set(names))
        if unknown:
            raise ConfigError(f"class_prompts: {', '.join(unknown)} not a class of {ds.name} "
                              f"(its classes: {', '.join(names)})")
        if "test" not in ds.splits():
            raise ConfigError(f"dataset {ds.name} has no 'test' split (it has {', '.join(ds.splits())})")
        tower = load_text_tower(ref.name, ref.weights, tiny=bool(ref.tiny)).to(ctx.device)
        backbone = ctx.backbone().to(ctx.device).eval()
        negative = bool(options.negative_templates) and task in ("binary", "multilabel")
        scored = names[1:] if task == "binary" and negative else names
        pos = _ensemble(tower, class_texts(options, scored, False))
        neg = _ensemble(tower, class_texts(options, scored, True)) if negative else None
        pre = preprocessor_for(backbone, ds, ctx.image_size)
        test = ImageSource(ds, ds.indices("test"), pre, cache_mb=0)
        emb = [tower.encode_image(backbone, b.inputs).float().cpu()
               for b in test.batches(ctx.batch_size, device=ctx.device)]
        scores = zero_shot_scores(torch.cat(emb), pos, neg, tower.logit_scale, tower.logit_bias, task)
        metrics = classification_metrics(test.labels, scores, task, names, bootstrap=ctx.bootstrap, seed=unit.seed)
        predictions = classification_predictions(task, names, {"test": (test.sample_keys, test.patient_ids,
                                                                        test.labels, scores)},
                                                  metadata={"test": test.metadata or {}})
        report = tower.load_report
        info = {"prompts": {c: class_texts(options, (c,), False)[0] for c in scored},
                "negative_prompts": ({c: class_texts(options, (c,), True)[0] for c in scored} if negative else None),
                "scoring": ("positive vs negative prompts" if negative else
                            "softmax over classes" if task != "multilabel" else "sigmoid"),
                "logit_scale": tower.logit_scale, "logit_bias": tower.logit_bias, "tokenizer": tower.tokenizer_kind,
                "text_weights": (None if report is None else
                                 {"source": report.source, "layout": report.layout,
                                  "conversions": report.conversions, "tensors": report.tensors}),
                "image_size": pre.image_size, "test_samples": len(test)}
        return UnitResult(metrics, info, predictions=predictions)
