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
CLINICAL = {
    "chexbert": ("CheXbert macro-F1-14",
                 "the CheXbert labeler checkpoint chexbert.pth (https://github.com/stanfordmlgroup/CheXbert, "
                 "'Checkpoint download') and a bert-base-uncased folder (config.json, vocab.txt)"),
    "radgraph": ("RadGraph F1",
                 "the RadGraph model (PhysioNet, https://physionet.org/content/radgraph/1.0.0/, model_checkpoint) "
                 "and the radgraph package (pip install radgraph)"),
}


def clinical_scorer(name: str, weights: str | None) -> Any:
    """Check a clinical scorer's weights path; a ConfigError naming what to download when it is missing.

    Scoring with these models is not implemented in this medprobe version: a given path is
    refused too, with the same message, rather than silently skipped.
    """
    if name not in CLINICAL:
        raise ConfigError(f"unknown clinical text scorer {name!r}; available: {', '.join(CLINICAL)}")
    title, what = CLINICAL[name]
    if not weights:
        raise ConfigError(f"{title} needs model weights that medprobe cannot download: download {what}, then give "
                          f"its path as the {name} option")
    raise ConfigError(f"{title}: scoring with {weights} is not available in this medprobe version (needs {what}); "
                      f"remove the {name} option to score ROUGE-L and BLEU-4 only")
