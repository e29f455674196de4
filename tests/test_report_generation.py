"""Report generation (issue 16): text metrics against rouge-score/sacrebleu, report-text adapters, phantom
findings text, the ``report_generation`` protocol end to end through the runner, and bad input."""
from __future__ import annotations

import csv
import gzip
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from medprobe.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

HYPS = ["the heart is normal in size .", "no focal opacity is seen", "a small nodule in the left upper zone",
        "lungs are clear", "catheter tip in the svc . no effusion ."]
REFS = ["heart size is normal .", "no focal opacity", "there is a small opacity in the left upper zone",
        "the lungs are clear without focal opacity", "a right-sided catheter terminates in the svc . no effusion ."]


# --------------------------------------------------------------------------- text metrics
def test_rouge_and_bleu_match_the_libraries():
    from rouge_score import rouge_scorer
    import sacrebleu
    from medprobe.text_metrics import bleu4, bleu4_from_statistics, bleu_statistics, rouge_l_scores, text_metrics

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    expected = [scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(HYPS, REFS)]
    np.testing.assert_allclose(rouge_l_scores(HYPS, REFS), expected)
    lib = sacrebleu.corpus_bleu(HYPS, [REFS]).score / 100
    assert bleu4(HYPS, REFS) == pytest.approx(lib)
    assert bleu4_from_statistics(bleu_statistics(HYPS, REFS)) == pytest.approx(lib)
    # a resample's BLEU from summed per-report statistics == sacrebleu on the resampled corpus
    idx = np.array([0, 0, 2, 4, 4])
    stats = bleu_statistics(HYPS, REFS)
    assert bleu4_from_statistics(stats[idx]) == pytest.approx(
        sacrebleu.corpus_bleu([HYPS[i] for i in idx], [[REFS[i] for i in idx]]).score / 100)
    values = {m.metric: m for m in text_metrics(HYPS, REFS, bootstrap=200, seed=1)}
    assert values["rouge_l"].value == pytest.approx(np.mean(expected))
    assert values["bleu4"].value == pytest.approx(lib)
    for m in values.values():
        assert m.ci_low <= m.value <= m.ci_high and m.ci_low < m.ci_high
    again = {m.metric: (m.ci_low, m.ci_high) for m in text_metrics(HYPS, REFS, bootstrap=200, seed=1)}
    assert again == {k: (m.ci_low, m.ci_high) for k, m in values.items()}


def test_identical_reports_score_one_and_clinical_scorers_name_their_weights():
    from medprobe.text_metrics import clinical_scorer, text_metrics
    values = {m.metric: m.value for m in text_metrics(REFS, REFS, bootstrap=0)}
    assert values == {"rouge_l": pytest.approx(1.0), "bleu4": pytest.approx(1.0)}
    with pytest.raises(ConfigError, match="chexbert.pth"):
        clinical_scorer("chexbert", None)
    with pytest.raises(ConfigError, match="radgraph"):
        clinical_scorer("radgraph", None)


def test_chexbert_scorer_loads_the_release_checkpoint_layout(tmp_path):
    from sklearn.metrics import f1_score
    from transformers import BertConfig, BertModel
    from medprobe.errors import WeightsError
    from medprobe.text_metrics import clinical_scorer
    words = sorted({w for t in HYPS + REFS for w in t.split()})
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words))
    config = BertConfig(vocab_size=5 + len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32)
    config.save_pretrained(tmp_path)
    torch.manual_seed(0)
    state = {f"bert.{k}": v for k, v in BertModel(config).state_dict().items()}
    for i in range(14):
        state[f"linear_heads.{i}.weight"] = torch.randn(4 if i < 13 else 2, 16)
        state[f"linear_heads.{i}.bias"] = torch.zeros(4 if i < 13 else 2)
    torch.save({"epoch": 1, "model_state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "chexbert.pth")
    scorer = clinical_scorer("chexbert", str(tmp_path))
    labels = scorer.labels(HYPS + REFS)
    assert labels.shape == (10, 14) and labels[:, :13].max() <= 3 and labels[:, 13].max() <= 1
    pred, true = labels[:5] == 1, labels[5:] == 1
    expected = np.mean([f1_score(true[:, c], pred[:, c], zero_division=0) for c in range(14)])
    assert scorer.macro_f1(HYPS, REFS).value == pytest.approx(expected)
    m = scorer.macro_f1(REFS, REFS, bootstrap=30)
    assert m.value == pytest.approx(np.mean(true.any(0))) and m.ci_low <= m.value <= m.ci_high
    del state["linear_heads.3.bias"]
    torch.save({"model_state_dict": state}, tmp_path / "chexbert.pth")
    with pytest.raises(WeightsError, match="linear_heads.3.bias"):
        clinical_scorer("chexbert", str(tmp_path))
    with pytest.raises(ConfigError, match="chexbert.pth"):
        clinical_scorer("chexbert", str(tmp_path / "elsewhere"))


def test_text_examples_pick_spread_rows():
    from medprobe.predictions import Predictions, SplitPredictions
    from medprobe.results.text_examples import text_examples
    sp = SplitPredictions([f"k{i}" for i in range(5)], [f"p{i}" for i in range(5)],
                          {"reference": np.array(REFS), "generated": np.array(HYPS)})
    pred = Predictions("text", "text", (), {"test": sp})
    rows = text_examples(pred, 3)
    assert [r["key"] for r in rows] == ["k0", "k2", "k4"]
    assert rows[1]["generated"] == HYPS[2] and rows[1]["reference"] == REFS[2]
    assert [r["key"] for r in text_examples(pred, 2)] == ["k0", "k4"]


# --------------------------------------------------------------------------- phantom findings
def test_phantom_reports_describe_what_was_drawn():
    from medprobe.data.phantom import make_chest_phantoms
    from medprobe.data.phantom_reports import chest_phantoms_with_reports
    plain, labels0, _, _ = make_chest_phantoms(80, 48, seed=3)
    images, labels, _, _, reports = chest_phantoms_with_reports(80, 48, seed=3)
    findings: list = []
    make_chest_phantoms(80, 48, seed=3, findings=findings, devices=True)
    assert (labels == labels0).all() and len(reports) == 80
    for img, ref, f, text, y in zip(images, plain, findings, reports, labels):
        drawn = bool(f["line"]) or f["ecg"]
        assert np.array_equal(img, ref) != drawn  # devices change exactly the images said to have them
        assert ("central venous catheter" in text) == bool(f["line"])
        assert ("ECG leads" in text) == f["ecg"]
        assert ("No lines or tubes." in text) == (not drawn)
        assert ("opacity in the" in text) == bool(y)
        if y:
            assert f"{f['size']} rounded opacity in the {f['side']} {f['zone']} zone" in text
    assert len(set(reports)) > 10


def test_phantom_opacity_side_follows_radiological_convention():
    from medprobe.data.phantom import make_chest_phantoms
    findings: list = []
    images, labels, masks, _ = make_chest_phantoms(40, 64, seed=1, positive_fraction=1.0, findings=findings)
    normal, *_ = make_chest_phantoms(40, 64, seed=1, positive_fraction=0.0)
    for img, ref, f in zip(images, normal, findings):
        col = np.unravel_index(np.argmax(img - ref), img.shape)[1]  # brightest added pixel = the opacity
        assert f["side"] == ("right" if col < 32 else "left")  # image left = the patient's right


# --------------------------------------------------------------------------- adapters
def _png(path: Path, value: int = 100) -> None:
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((16, 16), value, np.uint8)).save(path)


def _gz_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with gzip.open(path, "wt", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def test_mimic_cxr_findings_frontal_and_official_split(tmp_path):
    from medprobe.data.adapters import build_dataset
    from medprobe.data.adapters.mimic_cxr import findings_section
    report = ("                                 FINAL REPORT\n EXAMINATION:  CHEST (PA AND LAT)\n\n INDICATION:  Cough\n"
              "\n FINDINGS: \n \n The lungs are clear.  No pleural\n effusion.\n \n IMPRESSION: \n \n Normal chest.\n")
    assert findings_section(report) == "The lungs are clear. No pleural effusion."
    assert findings_section(" IMPRESSION: No acute process.\n") is None
    rows, meta = [], []
    studies = {("10000001", "50000001"): report, ("10000002", "50000002"): " IMPRESSION: nothing.\n",
               ("11000003", "50000003"): report.replace("clear", "hyperinflated")}
    splits = {"10000001": "train", "10000002": "validate", "11000003": "test"}
    for (subject, study), text in studies.items():
        folder = tmp_path / "files" / f"p{subject[:2]}" / f"p{subject}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"s{study}.txt").write_text(text)
        for view, dicom in (("PA", f"d{study}a"), ("LATERAL", f"d{study}b")):
            _png(folder / f"s{study}" / f"{dicom}.jpg")
            rows.append([dicom, study, subject, splits[subject]])
            meta.append([dicom, view])
    _gz_csv(tmp_path / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"], rows)
    _gz_csv(tmp_path / "mimic-cxr-2.0.0-metadata.csv.gz", ["dicom_id", "ViewPosition"], meta)
    ds = build_dataset("mimic_cxr", tmp_path)
    got = {r.key: (r.split, r.patient_id, r.report) for r in ds.records}
    assert got == {"d50000001a": ("train", "10000001", "The lungs are clear. No pleural effusion."),
                   "d50000003a": ("test", "11000003", "The lungs are hyperinflated. No pleural effusion.")}
    assert "dropped_no_findings=1" in ds.source
    assert len(build_dataset("mimic_cxr", tmp_path, views="all")) == 4
    assert ds.load_image(0).shape == (16, 16)


IU_XML = """<?xml version="1.0" encoding="utf-8"?>
<eCitation><uId id="{uid}"/><MedlineCitation><Article><Abstract>
<AbstractText Label="COMPARISON">None.</AbstractText>
<AbstractText Label="FINDINGS">{findings}</AbstractText>
<AbstractText Label="IMPRESSION">Normal chest.</AbstractText></Abstract></Article></MedlineCitation>
<parentImage id="{uid}{part}_IM-000{n}-1001"><caption>PA</caption></parentImage>
<parentImage id="{uid}{part}_IM-000{n}-2001"><caption>Lateral</caption></parentImage>
</eCitation>"""


def test_iu_xray_reads_xml_findings_and_frontal_images(tmp_path):
    from medprobe.data.adapters import build_dataset
    (tmp_path / "ecgen-radiology").mkdir()
    table = [["uid", "filename", "projection"]]
    for n in range(1, 11):
        uid = f"CXR{n}"
        findings = "" if n == 10 else f"The heart is normal.\n  Case {n} lungs   clear."
        part = "_1" if n == 1 else ""  # Open-i names CXR1_1_IM-0001-3001 but CXR2_IM-0652-1001
        (tmp_path / "ecgen-radiology" / f"{n}.xml").write_text(IU_XML.format(uid=uid, n=n, findings=findings,
                                                                              part=part))
        for view, suffix in (("Frontal", "1001"), ("Lateral", "2001")):
            _png(tmp_path / "NLMCXR_png" / f"{uid}{part}_IM-000{n}-{suffix}.png")
            table.append([str(n), f"{n}_IM-000{n}-{suffix}.dcm.png", view])
    with open(tmp_path / "indiana_projections.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(table)
    ds = build_dataset("iu_xray", tmp_path)
    assert len(ds) == 9 and all(r.key.endswith("-1001") for r in ds.records)
    rec = next(r for r in ds.records if r.patient_id == "CXR3")
    assert rec.report == "The heart is normal. Case 3 lungs clear."
    assert {r.split for r in ds.records} <= {"train", "val", "test"}
    assert len(build_dataset("iu_xray", tmp_path, views="all")) == 18
    (tmp_path / "indiana_projections.csv").unlink()
    with pytest.raises(Exception, match="projections table"):
        build_dataset("iu_xray", tmp_path)


def test_manifest_report_column(tmp_path):
    from medprobe.data.adapters import build_dataset
    for i in range(4):
        _png(tmp_path / f"im{i}.png")
    with open(tmp_path / "m.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "split", "label", "report", "sex"])
        w.writerows([["im0.png", "train", 0, "Lungs clear.", "F"], ["im1.png", "train", 1, "Left opacity.", "M"],
                     ["im2.png", "test", 0, "", "F"], ["im3.png", "test", 1, "Right opacity.", "M"]])
    ds = build_dataset("manifest", tmp_path / "m.csv")
    assert [r.report for r in ds.records] == ["Lungs clear.", "Left opacity.", None, "Right opacity."]
    assert "report" not in ds.records[0].metadata and ds.records[0].metadata["sex"] == "F"


def test_report_text_is_part_of_the_dataset_fingerprint():
    from dataclasses import replace
    from medprobe.data.adapters import build_dataset
    ds = build_dataset("phantom", None, n=12, size=16, reports=True)
    before = ds.fingerprint()
    ds.records[0] = replace(ds.records[0], report=ds.records[0].report + " Extra.")
    assert ds.fingerprint() != before


# --------------------------------------------------------------------------- protocol
N, SIZE = 48, 32


@pytest.fixture(scope="module")
def scratch_lm(tmp_path_factory) -> Path:
    from medprobe.data.adapters import build_dataset
    from medprobe.protocols.report_generation.lm import write_scratch_lm
    from medprobe.protocols.report_generation.protocol import DEFAULT_PROMPT
    ds = build_dataset("phantom", None, n=N, size=SIZE, reports=True)
    texts = [r.report for r in ds.records if r.split == "train"] + [DEFAULT_PROMPT]
    return write_scratch_lm(texts, tmp_path_factory.mktemp("lm") / "gpt2", layers=2, hidden=32, heads=2)


def _experiment(tmp_path: Path, lm: Path, **options) -> Path:
    rg = {"lm": str(lm), "epochs": 1, "lr": 1e-3, "batch_size": 8, "grad_accum": 2, "max_target_tokens": 48,
          "max_new_tokens": 12, "bootstrap": 20, "controls": True}
    rg.update(options)
    cfg = {"name": "rg", "output_dir": str(tmp_path / "out"), "cache_dir": str(tmp_path / "cache"), "seeds": [0],
           "image_size": 28, "precision": "fp32",
           "datasets": {"ph": {"adapter": "phantom", "n": N, "size": SIZE, "reports": True}},
           "backbones": {"vit": {"name": "dinov2_vits14", "weights": "random", "tiny": True}},
           "protocols": {"report_generation": rg}}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_protocol_runs_through_medprobe_run(tmp_path, scratch_lm):
    from medprobe.cli import main
    from medprobe.predictions import read_predictions
    assert main(["run", str(_experiment(tmp_path, scratch_lm)), "--quiet"]) == 0
    with sqlite3.connect(tmp_path / "out" / "results.db") as c:
        status, = c.execute("SELECT status FROM runs WHERE protocol='report_generation'").fetchone()
        metrics = {m: (v, lo, hi) for m, v, lo, hi in c.execute("SELECT metric, value, ci_low, ci_high FROM metrics")}
    assert status == "done"
    assert {"rouge_l", "bleu4", "rouge_l_most_frequent", "rouge_l_shuffled_image"} <= set(metrics)
    v, lo, hi = metrics["rouge_l"]
    assert 0 <= lo <= v <= hi <= 1
    files = list((tmp_path / "out" / "predictions").glob("*.npz"))
    assert len(files) == 1
    pred = read_predictions(files[0])
    sp = pred.splits["test"]
    assert pred.kind == "text" and len(sp) > 0
    assert set(sp.columns) == {"reference", "generated", "generated_shuffled_image"}
    from medprobe.data.adapters import build_dataset
    ds = build_dataset("phantom", None, n=N, size=SIZE, reports=True)
    truth = {r.key: r.report for r in ds.records}
    assert [truth[k] for k in sp.keys] == list(sp.columns["reference"])
    from medprobe.text_metrics import rouge_l_scores
    assert v == pytest.approx(rouge_l_scores(list(sp.columns["generated"]), list(sp.columns["reference"])).mean())
    assert main(["report", str(tmp_path / "out"), "--html"]) == 0  # a few examples in the HTML report
    page = (tmp_path / "out" / "report.html").read_text()
    assert "Generated reports" in page and sp.columns["generated"][0].split(".")[0] in page


def test_training_lowers_the_loss_and_lora_trains_adapters_only(scratch_lm):
    from medprobe.data.adapters import build_dataset
    from medprobe.protocols.report_generation.lm import load_lm
    from medprobe.protocols.report_generation.model import ReportModel
    from medprobe.protocols.report_generation.protocol import DEFAULT_PROMPT, ReportGenerationOptions, _set_trainable
    from medprobe.protocols.report_generation.train import TrainSettings, encode_reports, generate, train
    ds = build_dataset("phantom", None, n=N, size=SIZE, reports=True)
    reports = [r.report for r in ds.records]
    grids = np.random.default_rng(0).standard_normal((len(reports), 8, 2, 2)).astype(np.float16)
    targets, cut = encode_reports(load_lm(str(scratch_lm))[1], reports, 64)
    assert cut == 0
    counts = {}
    for mode in ("full", "lora", "frozen"):
        torch.manual_seed(0)
        lm, tok = load_lm(str(scratch_lm))
        model = ReportModel(lm, tok, 8, DEFAULT_PROMPT)
        _set_trainable(model, ReportGenerationOptions(lm=str(scratch_lm), lm_training=mode, lora_targets=["c_attn"]))
        counts[mode] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        info = train(model, grids, targets, TrainSettings(3, 3e-3, 0.0, 0.0, 16, 1, "fp32", 0), torch.device("cpu"))
        assert info["epoch_losses"][-1] < info["epoch_losses"][0]
        texts = generate(model, grids, np.arange(3), 2, 5, 2 if mode == "lora" else 1, torch.device("cpu"))
        assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    projector = 8 * 32 + 32 + 32 * 32 + 32
    assert counts["frozen"] == projector < counts["lora"] < counts["full"]


def test_bad_input_fails_before_training(tmp_path, scratch_lm):
    from transformers import T5Config
    from medprobe.experiment.config import load_experiment
    from medprobe.experiment.runner import plan_experiment
    from medprobe.options import parse
    from medprobe.protocols.report_generation.protocol import ReportGenerationOptions

    with pytest.raises(ConfigError, match="image placeholder"):
        parse(ReportGenerationOptions, {"lm": str(scratch_lm), "prompt": "Describe the findings."}, "protocols.rg")
    with pytest.raises(ConfigError, match="missing required key 'lm'"):
        parse(ReportGenerationOptions, {}, "protocols.rg")
    path = _experiment(tmp_path, scratch_lm)
    cfg = yaml.safe_load(path.read_text())
    cfg["datasets"]["ph"].pop("reports")  # the plain phantom has no report text
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="has no report text"):
        plan_experiment(load_experiment(path))
    t5 = tmp_path / "t5"
    T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, vocab_size=50).save_pretrained(t5)
    with pytest.raises(ConfigError, match="not a causal language model"):
        plan_experiment(load_experiment(_experiment(tmp_path, t5)))
    with pytest.raises(ConfigError, match="not found"):
        plan_experiment(load_experiment(_experiment(tmp_path, tmp_path / "no-such-lm")))
    with pytest.raises(ConfigError, match="positions"):
        plan_experiment(load_experiment(_experiment(tmp_path, scratch_lm, max_new_tokens=400)))
    assert not (tmp_path / "out" / "results.db").exists()


def test_scratch_tokenizer_round_trips_report_text():
    from medprobe.protocols.report_generation.lm import word_level_tokenizer
    tok = word_level_tokenizer(REFS)
    for text in REFS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == text
    assert tok(["unseen words"], add_special_tokens=False)["input_ids"][0] == [tok.unk_token_id] * 2


def test_protocol_is_listed():
    from medprobe.protocols import list_protocols
    assert "report_generation" in list_protocols()
