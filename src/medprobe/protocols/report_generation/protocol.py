"""The ``report_generation`` protocol: RAD-DINO's vision-language evaluation of a frozen image encoder.

The encoder's patch tokens (one block, cached in the feature store) go through a 2-layer
MLP projector into the embedding space of a causal language model and replace the image
placeholder of an instruction prompt; projector (and the LM: fully, with LoRA, or not at
all) are trained on the train split's (image, report) pairs, then reports are generated for
the test split and scored with ROUGE-L and BLEU-4 (bootstrap CIs). The generated reports are
stored per sample (predictions of kind ``text``: ``reference``, ``generated``).

With ``controls: true`` two reference points are scored as well: the most frequent training
report given for every test image (``rouge_l_most_frequent``), and the trained model given
another test patient's image (``rouge_l_shuffled_image``): a model that reads the image
beats both.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from medprobe.data.base import ImageDataset
from medprobe.errors import ConfigError, DataError
from medprobe.metrics import MetricValue
from medprobe.options import require
from medprobe.predictions import Predictions, SplitPredictions
from medprobe.protocols.base import ArchInfo, FeatureNeeds, Protocol, Unit, UnitContext, UnitResult, register_protocol
from medprobe.protocols.report_generation.model import IMAGE_PLACEHOLDER, split_prompt

DEFAULT_PROMPT = f"{IMAGE_PLACEHOLDER}\nProvide a description of the findings in the radiology image."


@dataclass
class ReportGenerationOptions:
    lm: str  # Hugging Face causal LM: a local folder or a cached hub name (e.g. lmsys/vicuna-7b-v1.5)
    lm_training: Literal["full", "lora", "frozen"] = "full"  # RAD-DINO/LLaVA-1.5 fine-tune the LM with the projector
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=list)  # empty: peft's default modules for the model type
    prompt: str = DEFAULT_PROMPT
    block: int = -1  # encoder block whose patch tokens are used (negative: from the end)
    epochs: int = 3
    lr: float = 2e-5
    warmup: float = 0.03
    weight_decay: float = 0.0
    batch_size: int = 16
    grad_accum: int = 8  # effective batch = batch_size x grad_accum (paper: 128)
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    max_target_tokens: int = 512  # longer training reports are cut (counted in the unit's info)
    max_new_tokens: int = 150
    decoding: Literal["greedy", "beam"] = "greedy"
    num_beams: int = 4
    eval_batch_size: int = 16
    bootstrap: int | None = 500  # None: the experiment's bootstrap setting
    rouge_stemmer: bool = False
    controls: bool = False
    chexbert: str | None = None  # weights of the optional clinical scorers
    radgraph: str | None = None

    def __post_init__(self) -> None:
        split_prompt(self.prompt)
        require(bool(self.lm.strip()), "lm: name a causal language model (a local folder or a hub name)")
        require(self.epochs >= 1, f"epochs: must be >= 1, got {self.epochs}")
        require(self.lr > 0, f"lr: must be > 0, got {self.lr}")
        require(0 <= self.warmup < 1, f"warmup: must be a fraction in [0, 1), got {self.warmup}")
        require(self.batch_size >= 1, f"batch_size: must be >= 1, got {self.batch_size}")
        require(self.grad_accum >= 1, f"grad_accum: must be >= 1, got {self.grad_accum}")
        require(self.eval_batch_size >= 1, f"eval_batch_size: must be >= 1, got {self.eval_batch_size}")
        require(self.max_new_tokens >= 1, f"max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        require(self.max_target_tokens >= 2, f"max_target_tokens: must be >= 2, got {self.max_target_tokens}")
        require(self.num_beams >= 1, f"num_beams: must be >= 1, got {self.num_beams}")
        require(self.lora_rank >= 1, f"lora_rank: must be >= 1, got {self.lora_rank}")
        require(self.bootstrap is None or self.bootstrap >= 0, f"bootstrap: must be >= 0, got {self.bootstrap}")
        if self.chexbert is not None:
            from medprobe.text_metrics import CheXbertScorer, _require_weights
            _require_weights("chexbert", self.chexbert)
            CheXbertScorer.files(self.chexbert)
        if self.radgraph is not None:
            from medprobe.text_metrics import clinical_scorer
            clinical_scorer("radgraph", self.radgraph)


def _reports(dataset: ImageDataset, split: str | None = None) -> dict[str, str]:
    return {r.key: r.report for r in dataset.records if r.report is not None and (split is None or r.split == split)}


def check_dataset(dataset: ImageDataset) -> None:
    """A ConfigError unless every train and test record has report text (2D images)."""
    if dataset.ndim != 2:
        raise ConfigError(f"report_generation needs 2D images; dataset {dataset.name!r} is {dataset.ndim}D")
    for split in ("train", "test"):
        recs = [r for r in dataset.records if r.split == split]
        missing = [r.key for r in recs if r.report is None or not r.report.strip()]
        if missing:
            some = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
            what = "has no report text" if len(missing) == len(recs) else \
                f"has {len(missing)} {split} record(s) without report text ({some})"
            raise ConfigError(f"report_generation: dataset {dataset.name!r} {what}; use an adapter that reads reports "
                              f"(mimic_cxr, iu_xray, phantom with reports: true, or a manifest with a 'report' "
                              f"column), or drop records without one")


@register_protocol
class ReportGeneration(Protocol):
    name = "report_generation"
    summary = ("LLaVA-style report generation: frozen patch tokens -> 2-layer MLP projector -> causal LM "
               "(full/LoRA/frozen), ROUGE-L and BLEU-4 with bootstrap CIs (RAD-DINO)")
    Options = ReportGenerationOptions

    def feature_needs(self, options: ReportGenerationOptions, arch: ArchInfo | None = None) -> FeatureNeeds:
        if arch is None:
            return FeatureNeeds(1)
        return FeatureNeeds(1, (self._block(options, arch.num_blocks),))

    @staticmethod
    def _block(options: ReportGenerationOptions, num_blocks: int) -> int:
        b = options.block + num_blocks if options.block < 0 else options.block
        if not 0 <= b < num_blocks:
            raise ConfigError(f"block: {options.block} is outside the backbone's {num_blocks} blocks")
        return b

    def variant(self, params: dict[str, Any]) -> str:
        return f"report_generation {params['lm_name']}"

    def units(self, options: ReportGenerationOptions, seeds: list[int], dataset: ImageDataset) -> list[Unit]:
        from medprobe.protocols.report_generation.lm import check_causal_lm, lm_identity, max_positions
        check_dataset(dataset)
        limit = max_positions(check_causal_lm(options.lm))
        longest = max(options.max_target_tokens, options.max_new_tokens)
        if limit is not None and longest >= limit:
            raise ConfigError(f"lm: {options.lm!r} takes at most {limit} positions, fewer than the prompt plus "
                              f"max(max_target_tokens, max_new_tokens) = {longest}; lower them")
        params = {"lm_name": options.lm.rstrip("/").split("/")[-1], "lm_weights": lm_identity(options.lm)}
        if options.chexbert is not None:
            from medprobe.backbones.ref import weights_digest
            from medprobe.text_metrics import CheXbertScorer
            params["chexbert_weights"] = weights_digest(str(CheXbertScorer.files(options.chexbert)[0]))
        return [Unit(self.name, dict(params), s) for s in seeds]

    def run(self, unit: Unit, options: ReportGenerationOptions, ctx: UnitContext) -> UnitResult:
        from medprobe.protocols.report_generation.lm import load_lm, max_positions
        from medprobe.protocols.report_generation.model import ReportModel
        from medprobe.protocols.report_generation.train import (TrainSettings, encode_reports, generate,
                                                                 resolve_precision, train)
        from medprobe.text_metrics import most_frequent, rouge_l_scores, text_metrics

        check_dataset(ctx.dataset)
        store = ctx.features(FeatureNeeds(1))
        block = self._block(options, max(store.stored_blocks) + 1)  # stored blocks are the last ones
        store = ctx.features(FeatureNeeds(1, (block,)))
        grids = {s: store.array(s, f"patch.{block}") for s in ("train", "test")}
        refs = {s: _aligned_reports(ctx.dataset, store, s) for s in ("train", "test")}

        with torch.random.fork_rng():
            torch.manual_seed(unit.seed)
            lm, tokenizer = load_lm(options.lm)
            n_tokens = int(np.prod(grids["train"].shape[2:]))
            model = ReportModel(lm, tokenizer, int(grids["train"].shape[1]), options.prompt)
        limit = max_positions(lm.config)
        need = model.prefix_length(n_tokens) + max(options.max_target_tokens, options.max_new_tokens)
        if limit is not None and need > limit:
            raise ConfigError(f"lm: {options.lm!r} takes at most {limit} positions but the prompt with {n_tokens} image "
                              f"tokens plus max(max_target_tokens, max_new_tokens) needs {need}; lower them or use "
                              f"a smaller image_size")
        _set_trainable(model, options)
        device = ctx.device
        model.to(device)
        targets, cut = encode_reports(tokenizer, refs["train"], options.max_target_tokens)
        settings = TrainSettings(options.epochs, options.lr, options.warmup, options.weight_decay, options.batch_size,
                                 options.grad_accum, resolve_precision(options.precision, device), unit.seed)
        with torch.random.fork_rng():
            torch.manual_seed(unit.seed)
            info = train(model, grids["train"], targets, settings, device)
        beams = options.num_beams if options.decoding == "beam" else 1
        rows = np.arange(len(refs["test"]))
        generated = generate(model, grids["test"], rows, options.eval_batch_size, options.max_new_tokens, beams, device)
        boot = ctx.bootstrap if options.bootstrap is None else options.bootstrap
        metrics = text_metrics(generated, refs["test"], bootstrap=boot, seed=unit.seed,
                               use_stemmer=options.rouge_stemmer)
        if options.chexbert is not None:
            from medprobe.text_metrics import clinical_scorer
            metrics.append(clinical_scorer("chexbert", options.chexbert).macro_f1(generated, refs["test"], boot,
                                                                                  unit.seed))
        info.update(trainable_parameters=int(sum(p.numel() for p in model.parameters() if p.requires_grad)),
                    image_tokens=n_tokens, block=block, precision=settings.precision, train_reports=len(targets),
                    truncated_train_reports=cut, decoding=options.decoding if beams > 1 else "greedy")
        columns: dict[str, np.ndarray] = {"reference": np.array(refs["test"], dtype=str),
                                          "generated": np.array(generated, dtype=str)}
        if options.controls:
            frequent = most_frequent(refs["train"])
            shuffled_rows = _derangement(store.patient_ids("test"), unit.seed)
            shuffled = generate(model, grids["test"], shuffled_rows, options.eval_batch_size, options.max_new_tokens,
                                beams, device)
            for name, texts in (("most_frequent", [frequent] * len(rows)), ("shuffled_image", shuffled)):
                score = rouge_l_scores(texts, refs["test"], options.rouge_stemmer).mean()
                metrics.append(MetricValue(f"rouge_l_{name}", float(score),
                                           note="control: " + ("the most frequent training report for every image"
                                                               if name == "most_frequent" else
                                                               "the trained model given another patient's image")))
            columns["generated_shuffled_image"] = np.array(shuffled, dtype=str)
        split = SplitPredictions(store.keys("test"), store.patient_ids("test"), columns)
        return UnitResult(metrics, info, predictions=Predictions("text", "text", (), {"test": split}))


def _aligned_reports(dataset: ImageDataset, store: Any, split: str) -> list[str]:
    """The report of every item of ``split`` in feature-store order."""
    reports = _reports(dataset, split)
    keys = store.keys(split)
    missing = [k for k in keys if k not in reports]
    if missing:
        raise DataError(f"feature store {store.path} lists {split} item(s) {', '.join(missing[:3])} that have no report "
                        f"in dataset {dataset.name!r}; remove the stale cache folder")
    return [reports[k] for k in keys]


def _derangement(patient_ids: list[str], seed: int) -> np.ndarray:
    """A permutation of the test rows that gives every row another patient's image (deterministic)."""
    n = len(patient_ids)
    rng = np.random.default_rng([seed, 17])
    pids = np.asarray(patient_ids)
    for _ in range(100):
        perm = rng.permutation(n)
        bad = np.flatnonzero(pids[perm] == pids)
        for i in bad:  # swap each collision with a row whose patient differs both ways
            for j in rng.permutation(n):
                if pids[perm[j]] != pids[i] and pids[perm[i]] != pids[j]:
                    perm[i], perm[j] = perm[j], perm[i]
                    break
        if not np.any(pids[perm] == pids):
            return perm
    raise ConfigError("controls: cannot give every test image another patient's image (a single test patient?)")


def _set_trainable(model: Any, options: ReportGenerationOptions) -> None:
    """Projector always trained; the LM fully, through LoRA adapters (peft), or frozen."""
    if options.lm_training == "lora":
        from peft import LoraConfig, get_peft_model
        config = LoraConfig(task_type="CAUSAL_LM", r=options.lora_rank, lora_alpha=options.lora_alpha,
                            lora_dropout=options.lora_dropout, target_modules=options.lora_targets or None)
        try:
            model.lm = get_peft_model(model.lm, config)
        except ValueError as e:
            raise ConfigError(f"lora_targets: {e} (name the LM's attention/MLP linear modules, e.g. "
                              f"[q_proj, v_proj])") from None
    else:
        for p in model.lm.parameters():
            p.requires_grad_(options.lm_training == "full")
    for p in model.projector.parameters():
        p.requires_grad_(True)
