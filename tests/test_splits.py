"""Patient-level splits, systematic sampling, leakage detection and resplitting."""
from collections import Counter, defaultdict

import numpy as np
import pytest

from medprobe.data import ArrayDataset, Record, TaskSpec, check_no_leakage, patient_split, resplit
from medprobe.errors import ConfigError, DataError


def _records(n_patients=100, seed=0, per_patient=(1, 3)):
    rng = np.random.default_rng(seed)
    recs = []
    for p in range(n_patients):
        label = int(rng.random() < 0.3)
        for k in range(int(rng.integers(per_patient[0], per_patient[1] + 1))):
            recs.append(Record(f"img{p}_{k}", "train", f"pat{p}", label))
    return recs


def _patients_per_split(recs, assign):
    out = defaultdict(set)
    for r in recs:
        out[assign[r.key]].add(r.patient_id)
    return out


def test_stratified_split_is_patient_level_proportional_and_stratified():
    recs = _records(200)
    assign = patient_split(recs, (0.7, 0.1, 0.2), seed=0)
    assert set(assign) == {r.key for r in recs}
    per = _patients_per_split(recs, assign)
    assert not (per["train"] & per["val"] or per["train"] & per["test"] or per["val"] & per["test"])
    assert [len(per[s]) for s in ("train", "val", "test")] == [140, 20, 40]
    label = {r.patient_id: r.label for r in recs}
    rates = {s: np.mean([label[p] for p in per[s]]) for s in per}
    overall = np.mean(list(label.values()))
    assert all(abs(r - overall) < 0.06 for r in rates.values())


def test_split_is_deterministic_and_seed_dependent():
    recs = _records(50)
    assert patient_split(recs, seed=3) == patient_split(recs, seed=3)
    assert patient_split(recs, seed=3) != patient_split(recs, seed=4)


def test_stratification_uses_any_positive_per_patient():
    recs = [Record(f"p{p}_{k}", "train", f"p{p}", int(k == 0 and p < 10)) for p in range(40) for k in range(2)]
    assign = patient_split(recs, (0.5, 0.5), seed=1)
    assert set(assign.values()) == {"train", "test"}
    pos_patients = Counter(assign[f"p{p}_0"] for p in range(10))
    assert pos_patients == {"train": 5, "test": 5}


def test_systematic_sampling_every_kth_patient_sorted_by_id():
    recs = [Record(f"k{p}", "train", f"P{p}", 0) for p in range(20)]  # natural order P0, P1, ..., P19
    assign = patient_split(recs, (0.8, 0.0, 0.2), method="systematic")
    test_ids = [p for p in range(20) if assign[f"k{p}"] == "test"]
    assert len(test_ids) == 4 and np.all(np.diff(test_ids) == 5)  # every 5th patient
    assert "val" not in assign.values()
    shifted = patient_split(recs, (0.8, 0.0, 0.2), method="systematic", seed=1)
    assert [p for p in range(20) if shifted[f"k{p}"] == "test"] == [t + 1 for t in test_ids]


def test_split_argument_errors():
    recs = _records(5)
    with pytest.raises(ConfigError, match="sum"):
        patient_split(recs, (0.5, 0.2, 0.2))
    with pytest.raises(ConfigError, match="stratified"):
        patient_split(recs, method="stratifed")


def test_leakage_error_lists_patients_and_splits():
    recs = [Record("a", "train", "P1"), Record("b", "test", "P1"), Record("c", "val", "P2"),
            Record("d", "test", "P2"), Record("e", "train", "P3")]
    with pytest.raises(DataError) as err:
        check_no_leakage(recs)
    msg = str(err.value)
    assert "2 patient(s)" in msg and "'P1' in train, test" in msg and "'P2' in val, test" in msg
    assert "P3" not in msg
    check_no_leakage(recs[:1] + recs[2:3] + recs[4:])  # clean: no error


def test_leakage_error_truncates_to_ten():
    recs = [Record(f"{p}{s}", s, f"P{p}") for p in range(15) for s in ("train", "test")]
    ds = ArrayDataset(np.zeros((30, 2, 2)), recs, TaskSpec("none"), name="toy")
    with pytest.raises(DataError, match=r"^toy: 15 patient\(s\).*'P9' in train, test and 5 more"):
        check_no_leakage(ds)


def test_resplit_shares_pixels_and_fixes_leakage():
    images = np.arange(12 * 4, dtype=np.float32).reshape(12, 2, 2)
    recs = [Record(f"i{k}", "train" if k % 2 else "test", f"P{k // 2}", k % 2) for k in range(12)]
    ds = ArrayDataset(images, recs, TaskSpec("binary", ("neg", "pos")), name="toy")
    ds.value_range = (0.0, 255.0)
    with pytest.raises(DataError):
        check_no_leakage(ds)
    new = resplit(ds, (0.5, 0.25, 0.25), seed=0)
    check_no_leakage(new)
    assert [r.key for r in new.records] == [r.key for r in ds.records]
    assert [r.split for r in ds.records] == ["train" if k % 2 else "test" for k in range(12)]  # original untouched
    np.testing.assert_array_equal(new.load_image(5), ds.load_image(5))
    assert new.labels().tolist() == ds.labels().tolist()
    assert new.value_range == (0.0, 255.0) and new.fingerprint() != ds.fingerprint()
    assert sorted(Counter(r.split for r in new.records).values()) == [2, 4, 6]
    sub = resplit(ds.subset(range(6)), (0.5, 0.5))
    np.testing.assert_array_equal(sub.load_image(1), images[1])
