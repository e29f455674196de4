"""NIH ChestX-ray14 (Wang et al., CVPR 2017): 112,120 frontal chest X-rays of 30,805 patients
with 14 findings text-mined from the reports (multi-label).

Task: multilabel, 14 classes: Atelectasis, Cardiomegaly, Effusion, Infiltration, Mass,
Nodule, Pneumonia, Pneumothorax, Consolidation, Edema, Emphysema, Fibrosis,
Pleural_Thickening, Hernia ("No Finding" = all zeros).
Modality: chest X-ray, 8-bit PNG 1024 x 1024 (value_range (0, 255); a few PNGs are RGBA).
Official split: yes, by patient (train_val_list.txt / test_list.txt).
Licence: NIH Clinical Center, use unrestricted with citation of Wang et al. 2017 (the
Kaggle mirror lists CC0).
Obtain: https://nihcc.app.box.com/v/ChestXray-NIHCC or kaggle.com/datasets/nih-chest-xrays/data.

Layout (root = the downloaded folder):
  Data_Entry_2017_v2020.csv or Data_Entry_2017.csv  (the v2020 file is used when both
      exist) with the columns Image Index, Finding Labels, Follow-up #, Patient ID,
      Patient Age, Patient Gender, View Position, OriginalImage[Width, Height],
      OriginalImagePixelSpacing[x, y] (the 2017 file ends each line with an extra
      comma: the unnamed last column may be absent). Finding Labels joins findings
      with "|".
  train_val_list.txt, test_list.txt   one image name per line (needed for split=official)
  images_001/images/00000001_000.png ...  the PNGs, in any sub-folder of root
Records: one per CSV row; key and patient: Image Index and Patient ID.
Metadata: sex (M/F), age (years; the 2017 file's impossible ages such as 414 become
None), age_bin, view (PA/AP), follow_up (Follow-up #). No site (single centre).
Options: views (all | PA | AP) keeps those view positions; labels = native (default: the 14
findings) | harmonised (the 18 torchxrayvision findings; the 14 keep their names, Lung Lesion,
Fracture, Lung Opacity and Enlarged Cardiomediastinum are missing: see medprobe.data.harmonise).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from medprobe.data.adapters import register_adapter
from medprobe.data.adapters._common import (DEFAULT_FRACTIONS, FileIndex, Presence, Problems, PublicDataset,
                                            assign_splits, details, find_first, finish, folder_root, parse_int,
                                            read_list, read_table, split_policy)
from medprobe.data import harmonise
from medprobe.data.base import ImageDataset, Record, TaskSpec
from medprobe.data.metadata import demographics
from medprobe.options import option

NAME = "nih_chestxray14"
LABELS: tuple[str, ...] = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
                           "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
                           "Hernia")
CSV_NAMES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
#: labels=harmonised: every NIH finding is one of the 18 under its own name
HARMONISED: dict[str, tuple[str, ...]] = {f: (f,) for f in LABELS}
COLUMNS = ("Image Index", "Finding Labels", "Patient ID", "Patient Age", "Patient Gender", "View Position")


def _official_lists(root: Path, problems: Problems) -> dict[str, str]:
    out: dict[str, str] = {}
    first: dict[str, str] = {}
    for fname, split in (("train_val_list.txt", "train"), ("test_list.txt", "test")):
        path = root / fname
        for n, name in read_list(path, "the official split list (one image name per line; needed for "
                                       "split=official, or use split=systematic)"):
            if name in out and out[name] != split:
                problems.add(f"{path} line {n}: image {name} is also listed in {first[name]}")
                continue
            out[name] = split
            first.setdefault(name, f"{path} line {n}")
    return out


@register_adapter(NAME, "NIH ChestX-ray14: 112k chest X-rays, 14 findings (multi-label), official patient split",
                  details(__doc__, official=True))
def build_nih_chestxray14(root: Path | None, split: str = "official", split_seed: int = 0,
                          split_fractions: Any = DEFAULT_FRACTIONS, val_fraction: float = 0.1, views: str = "all",
                          missing: str = "error", labels: str = "native") -> ImageDataset:
    """Build NIH ChestX-ray14 from its downloaded folder ``root``."""
    folder = folder_root(NAME, root, "the NIH ChestX-ray14 folder holding Data_Entry_2017.csv")
    labels = harmonise.labels_option(labels, NAME)
    policy = split_policy(split, split_seed, split_fractions, val_fraction, official=True)
    views = option("views", views, str, choices=("all", "PA", "AP"))
    problems = Problems(NAME)
    presence = Presence(missing, problems)
    csv_path = find_first(folder, CSV_NAMES, "the NIH label file Data_Entry_2017.csv")
    table = read_table(csv_path, COLUMNS, problems, what="the NIH ChestX-ray14 label file",
                       optional=("Follow-up #",))
    official = _official_lists(folder, problems) if policy.method == "official" else {}
    index = FileIndex(folder, (".png",))
    known = set(LABELS)
    drafts: list[Record] = []
    where: list[str] = []
    seen: dict[str, int] = {}
    for row in table.rows:
        at = table.where(row)
        name = row["Image Index"]
        if not name:
            problems.add(f"{at}: empty 'Image Index'")
            continue
        if name in seen:
            problems.add(f"{at}: image {name} is already listed in row {seen[name]}")
            continue
        seen[name] = row.number
        findings = [f.strip() for f in row["Finding Labels"].split("|") if f.strip()]
        unknown = [f for f in findings if f not in known and f != "No Finding"]
        if not findings or unknown:
            problems.add(f"{at}: Finding Labels {row['Finding Labels']!r}: "
                         f"{'unknown finding(s) ' + ', '.join(map(repr, unknown)) if unknown else 'empty'}; expected "
                         f"findings from {', '.join(LABELS)} joined by '|', or 'No Finding'")
            continue
        pid_raw = row["Patient ID"]
        pid_num = parse_int(pid_raw)
        if not pid_raw:
            problems.add(f"{at}: empty 'Patient ID'")
            continue
        view = row["View Position"].upper()
        if view not in ("PA", "AP"):
            problems.add(f"{at}: View Position {row['View Position']!r}; expected PA or AP")
            continue
        if views != "all" and view != views:
            continue
        split_name = "train"
        if policy.method == "official":
            if name not in official:
                problems.add(f"{at}: image {name} is in neither train_val_list.txt nor test_list.txt")
                continue
            split_name = official[name]
        path = index.get(name)
        if not presence.ok(path, at, name):
            continue
        label = tuple(int(c in findings) for c in LABELS)
        meta = demographics(sex=row["Patient Gender"], age=row["Patient Age"], view=view)
        meta["follow_up"] = parse_int(row["Follow-up #"]) if "Follow-up #" in row.cells else None
        pid = str(pid_num) if pid_num is not None else pid_raw
        drafts.append(Record(name, split_name, pid, label, meta, str(path)))
        where.append(at)
    problems.check()
    records = assign_splits(drafts, policy)
    task = TaskSpec("multilabel", LABELS)
    if labels == "harmonised":
        records, task = harmonise.harmonise_records(records, LABELS, HARMONISED), harmonise.harmonised_task()
    files = [csv_path] + ([folder / "train_val_list.txt", folder / "test_list.txt"] if official else [])
    ds = PublicDataset(NAME, folder, records, task, where=where, policy=policy,
                       annotation_files=files, value_range=(0.0, 255.0),
                       notes=[f"views={views}" if views != "all" else "", presence.note(),
                              harmonise.note(HARMONISED) if labels == "harmonised" else ""])
    return finish(ds, problems)
