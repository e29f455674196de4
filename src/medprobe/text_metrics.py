"""Text metrics of generated reports: ROUGE-L (rouge-score), BLEU-4 (sacrebleu), percentile-bootstrap CIs.

* ROUGE-L: the mean over reports of the ROUGE-L F-measure of Google's ``rouge-score``
  (its tokenizer: lower-cased, non-alphanumerics dropped; Porter stemming optional).
* BLEU-4: sacrebleu's corpus BLEU (13a tokenisation, up to 4-grams, brevity penalty),
  reported on a 0-1 scale (sacrebleu's score / 100).

Bootstrap (RAD-DINO reports 500 resamples): resamples of the reports with replacement; for
BLEU each resample's score comes from the summed per-report n-gram statistics that sacrebleu
itself extracts (the method of its own paired bootstrap), so no n-gram code is written here.

Clinical scorers (CheXbert macro-F1-14, RadGraph F1) need model weights medprobe cannot
download; :func:`clinical_scorer` raises a :class:`ConfigError` naming what to download
when no weights path is given.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from medprobe.errors import ConfigError
from medprobe.metrics import MetricValue

TEXT_METRICS = ("rouge_l", "bleu4")


def _check(generated: Sequence[str], references: Sequence[str]) -> None:
    if len(generated) != len(references):
        raise ValueError(f"{len(generated)} generated reports for {len(references)} references")
    if not len(references):
        raise ValueError("no reports to score")


def rouge_l_scores(generated: Sequence[str], references: Sequence[str], use_stemmer: bool = False) -> np.ndarray:
    """Per-report ROUGE-L F-measure, ``(N,)``."""
    from rouge_score import rouge_scorer
    _check(generated, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
    return np.array([scorer.score(r, g)["rougeL"].fmeasure for g, r in zip(generated, references)], dtype=np.float64)


def _bleu() -> Any:
    from sacrebleu.metrics import BLEU
    return BLEU(max_ngram_order=4)


def bleu_statistics(generated: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """Per-report sufficient statistics of sacrebleu's BLEU (hypothesis/reference lengths, n-gram matches)."""
    _check(generated, references)
    return np.asarray(_bleu()._extract_corpus_statistics(list(generated), [list(references)]), dtype=np.int64)


def bleu4_from_statistics(stats: np.ndarray) -> float:
    """Corpus BLEU-4 (0-1) from summed statistics."""
    return float(_bleu()._compute_score_from_stats(stats.sum(0).tolist()).score) / 100.0


def bleu4(generated: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU-4 on a 0-1 scale."""
    _check(generated, references)
    return float(_bleu().corpus_score(list(generated), [list(references)]).score) / 100.0


def text_metrics(generated: Sequence[str], references: Sequence[str], bootstrap: int = 500, seed: int = 0,
                 alpha: float = 0.05, use_stemmer: bool = False) -> list[MetricValue]:
    """ROUGE-L and BLEU-4 with ``(alpha/2, 1 - alpha/2)`` percentile-bootstrap intervals over reports."""
    if bootstrap < 0:
        raise ConfigError(f"bootstrap must be >= 0 resamples, got {bootstrap}")
    rouge = rouge_l_scores(generated, references, use_stemmer)
    stats = bleu_statistics(generated, references)
    values = {"rouge_l": float(rouge.mean()), "bleu4": bleu4_from_statistics(stats)}
    out = []
    if bootstrap:
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, len(rouge), (bootstrap, len(rouge)))
        samples = {"rouge_l": rouge[idx].mean(1),
                   "bleu4": np.array([bleu4_from_statistics(stats[i]) for i in idx])}
        for name in TEXT_METRICS:
            lo, hi = np.percentile(samples[name], [100 * alpha / 2, 100 * (1 - alpha / 2)])
            out.append(MetricValue(name, values[name], ci_low=float(lo), ci_high=float(hi)))
    else:
        out = [MetricValue(name, values[name]) for name in TEXT_METRICS]
    return out


def most_frequent(texts: Sequence[str]) -> str:
    """The most common text (ties: the first to reach the top count in order)."""
    counts: dict[str, int] = {}
    for t in texts:
        counts[t] = counts.get(t, 0) + 1
    top = max(counts.values())
    return next(t for t in texts if counts[t] == top)


# --------------------------------------------------------------------------- clinical scorers
CHEXBERT_CONDITIONS = ("Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
                       "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
                       "Pleural Other", "Fracture", "Support Devices", "No Finding")
CLINICAL = {
    "chexbert": ("CheXbert macro-F1-14",
                 "the CheXbert labeler checkpoint chexbert.pth (https://github.com/stanfordmlgroup/CheXbert, "
                 "'Checkpoint download') and put it in a folder with bert-base-uncased's config.json and vocab.txt "
                 "(https://huggingface.co/google-bert/bert-base-uncased)"),
    "radgraph": ("RadGraph F1",
                 "the RadGraph model (PhysioNet, https://physionet.org/content/radgraph/1.0.0/, model_checkpoint) "
                 "and the radgraph package (pip install radgraph)"),
}


def _require_weights(name: str, weights: str | None) -> None:
    if name not in CLINICAL:
        raise ConfigError(f"unknown clinical text scorer {name!r}; available: {', '.join(CLINICAL)}")
    if not weights:
        title, what = CLINICAL[name]
        raise ConfigError(f"{title} needs model weights that medprobe cannot download: download {what}, then give "
                          f"its path as the {name} option")


def clinical_scorer(name: str, weights: str | None) -> Any:
    """The scorer ``name`` with ``weights``; a ConfigError naming what to download when it cannot be built.

    ``chexbert``: a :class:`CheXbertScorer` (``weights`` = a folder holding chexbert.pth and
    bert-base-uncased's config.json / vocab.txt). ``radgraph`` is not implemented in this
    version: a given path is refused with the same message rather than silently skipped.
    """
    _require_weights(name, weights)
    if name == "chexbert":
        return CheXbertScorer(weights)  # type: ignore[arg-type]
    title, what = CLINICAL[name]
    raise ConfigError(f"{title}: scoring with {weights} is not available in this medprobe version (needs {what}); "
                      f"remove the {name} option to score ROUGE-L and BLEU-4 only")


class CheXbertScorer:
    """CheXbert (Smit et al. 2020): BERT-base and 14 linear heads on the [CLS] state (13 conditions: blank,
    positive, negative, uncertain; No Finding: blank, positive), loaded from the released chexbert.pth.

    :meth:`macro_f1` is RAD-DINO's Macro-F1-14: per condition, the F1 of "positive" in the generated
    reports against "positive" in the references (uncertain counts as negative), averaged over 14.
    """

    def __init__(self, folder: str) -> None:
        import torch
        from transformers import BertConfig, BertModel, BertTokenizer
        from medprobe.errors import WeightsError
        ckpt, bert_dir = self.files(folder)
        try:
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001  (any unreadable checkpoint)
            raise WeightsError(f"chexbert: cannot read {ckpt}: {e}") from None
        state = state.get("model_state_dict", state) if isinstance(state, dict) else state
        state = {k.removeprefix("module."): v for k, v in state.items()}
        self.tokenizer = BertTokenizer.from_pretrained(str(bert_dir))
        self.model = _CheXbert(BertModel(BertConfig.from_pretrained(str(bert_dir)), add_pooling_layer=True))
        result = self.model.load_state_dict(state, strict=False)
        bad = [k for k in result.missing_keys if "position_ids" not in k]
        if bad or result.unexpected_keys:
            raise WeightsError(f"chexbert: {ckpt} does not match the CheXbert architecture (missing "
                               f"{bad[:5]}, unexpected {result.unexpected_keys[:5]})")
        self.model.eval()

    @staticmethod
    def files(folder: str) -> tuple[Any, Any]:
        """``(chexbert.pth, BERT folder)`` of ``folder`` (or of a checkpoint path); a ConfigError when absent."""
        from pathlib import Path
        root = Path(folder).expanduser()
        ckpt = root / "chexbert.pth" if root.is_dir() else root
        bert_dir = root if root.is_dir() else root.parent
        missing = [p for p in (ckpt, bert_dir / "config.json", bert_dir / "vocab.txt") if not p.is_file()]
        if missing:
            raise ConfigError(f"chexbert: {', '.join(map(str, missing))} not found; download {CLINICAL['chexbert'][1]}")
        return ckpt, bert_dir

    def labels(self, texts: Sequence[str], batch_size: int = 16) -> np.ndarray:
        """``(N, 14)`` CheXbert classes (0 blank, 1 positive, 2 negative, 3 uncertain)."""
        import torch
        out = []
        for start in range(0, len(texts), batch_size):
            batch = [" ".join(t.split()) for t in texts[start:start + batch_size]]
            enc = self.tokenizer(batch, padding=True, truncation=True, max_length=512, return_tensors="pt")
            with torch.no_grad():
                logits = self.model(enc["input_ids"], enc["attention_mask"])
            out.append(np.stack([lg.argmax(-1).numpy() for lg in logits], axis=1))
        return np.concatenate(out) if out else np.zeros((0, 14), dtype=np.int64)

    def macro_f1(self, generated: Sequence[str], references: Sequence[str], bootstrap: int = 0, seed: int = 0,
                 alpha: float = 0.05) -> MetricValue:
        """Macro-F1-14 (labels computed once; bootstrap resamples of the reports for the CI)."""
        from sklearn.metrics import f1_score
        _check(generated, references)
        pred, true = self.labels(generated) == 1, self.labels(references) == 1

        def score(rows: np.ndarray) -> float:
            return float(np.mean([f1_score(true[rows, c], pred[rows, c], zero_division=0) for c in range(14)]))

        value = score(np.arange(len(true)))
        if not bootstrap:
            return MetricValue("chexbert_macro_f1_14", value)
        rng = np.random.default_rng(seed)
        samples = [score(rng.integers(0, len(true), len(true))) for _ in range(bootstrap)]
        lo, hi = np.percentile(samples, [100 * alpha / 2, 100 * (1 - alpha / 2)])
        return MetricValue("chexbert_macro_f1_14", value, ci_low=float(lo), ci_high=float(hi))


def _chexbert_module() -> Any:
    from torch import nn

    class CheXbert(nn.Module):
        def __init__(self, bert: Any) -> None:
            super().__init__()
            self.bert = bert
            self.dropout = nn.Dropout(0.1)
            width = bert.config.hidden_size
            self.linear_heads = nn.ModuleList([nn.Linear(width, 4) for _ in range(13)] + [nn.Linear(width, 2)])

        def forward(self, ids: Any, mask: Any) -> list[Any]:
            cls = self.dropout(self.bert(ids, attention_mask=mask)[0][:, 0, :])
            return [head(cls) for head in self.linear_heads]

    return CheXbert


def _CheXbert(bert: Any) -> Any:  # noqa: N802  (module class built lazily: torch imported on use only)
    return _chexbert_module()(bert)
