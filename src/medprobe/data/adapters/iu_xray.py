"""IU-Xray / Open-i chest X-ray collection (Demner-Fushman et al., JAMIA 2016; Indiana
University): 3,955 radiology reports with 7,470 frontal and lateral chest X-rays. RAD-DINO
uses it as an external test set of report generation (image -> Findings section).

Task: none (no labels); every record carries its report's findings text (Record.report).
Findings: the AbstractText element with Label="FINDINGS" of each report XML, whitespace
collapsed; reports without findings are dropped (counted in dataset.source).
Views: views=frontal (default) keeps frontal images, as named by a projections table
(indiana_projections.csv of the Kaggle "Chest X-rays (Indiana University)" release:
columns uid, filename, projection = Frontal | Lateral); the XML files do not record
the view. views=all keeps every image (no table needed).
Modality: chest X-ray, 8-bit PNG (value_range (0, 255)).
Official split: none.
Licence: Open-i, CC BY-NC-ND 4.0 (NLM / Indiana University).
Obtain: https://openi.nlm.nih.gov/faq (NLMCXR_reports.tgz, NLMCXR_png.tgz); the projections
table from https://www.kaggle.com/datasets/raddar/chest-xrays-indiana-university.

Layout (root = a folder holding both archives unpacked):
  ecgen-radiology/1.xml ...     report XML: uId, AbstractText Label=FINDINGS, parentImage ids
  NLMCXR_png/CXR1_1_IM-0001-3001.png ...   images named <parentImage id>.png (any subfolder)
  indiana_projections.csv       for views=frontal (or pass projections=<path>)
Records: one per image; key = the image id; patient = the report's uId (CXR1, ...).
Options: views (frontal | all), projections (path of the projections table).
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

from medprobe.data.adapters import register_adapter
from medprobe.data.adapters._common import (DEFAULT_FRACTIONS, FileIndex, Presence, Problems, PublicDataset,
                                            assign_splits, details, finish, folder_root, read_table, split_policy)
from medprobe.data.base import ImageDataset, Record, TaskSpec
from medprobe.errors import DataError
from medprobe.options import option

NAME = "iu_xray"


def _image_key(uid: str, name: str) -> tuple[str, str] | None:
    """(report number, IM-xxxx-xxxx part) of an image: the same for the XML id (CXR2_IM-0652-1001,
    CXR1_1_IM-0001-3001) and the Kaggle table row (uid 2, 2_IM-0652-1001.dcm.png)."""
    m = re.search(r"IM-\d+-\d+", name)
    number = re.sub(r"^CXR", "", uid.strip(), flags=re.IGNORECASE)
    return (number, m.group(0)) if m else None


def parse_report(path: Path) -> tuple[str | None, str | None, list[str]]:
    """``(uId, findings or None, image ids)`` of one Open-i report XML."""
    try:
        tree = ET.parse(path)
    except (ET.ParseError, OSError) as e:
        raise DataError(f"{path}: not a readable Open-i report XML ({e})") from None
    root = tree.getroot()
    uid = root.find(".//uId")
    findings = None
    for node in root.iter("AbstractText"):
        if (node.get("Label") or "").strip().upper() == "FINDINGS":
            text = " ".join("".join(node.itertext()).split())
            findings = text or None
    images = [n.get("id") for n in root.iter("parentImage") if n.get("id")]
    return (uid.get("id") if uid is not None else None), findings, images  # type: ignore[return-value]


@register_adapter(NAME, "IU-Xray (Open-i): chest X-rays with the Findings of their XML reports (report generation)",
                  details(__doc__, official=False))
def build_iu_xray(root: Path | None, views: str = "frontal", projections: str | None = None,
                  split: str = "systematic", split_seed: int = 0, split_fractions: object = DEFAULT_FRACTIONS,
                  missing: str = "error") -> ImageDataset:
    """Build IU-Xray from the folder ``root`` holding the report XMLs and the PNG images."""
    folder = folder_root(NAME, root, "a folder holding ecgen-radiology/*.xml and the NLMCXR_png images")
    views = option("views", views, str, choices=("frontal", "all"))
    policy = split_policy(split, split_seed, split_fractions)
    problems = Problems(NAME)
    presence = Presence(missing, problems)
    xmls = sorted(p for p in folder.rglob("*.xml") if not p.name.startswith("."))
    if not xmls:
        raise DataError(f"{folder}: no report XML files found; expected ecgen-radiology/*.xml (NLMCXR_reports.tgz)")
    frontal: set[tuple[str, str] | None] | None = None
    files = list(xmls)
    if views == "frontal":
        table_path = Path(projections).expanduser() if projections else folder / "indiana_projections.csv"
        if not table_path.is_file():
            raise DataError(f"{table_path}: projections table not found; views=frontal needs it (columns uid, "
                            f"filename, projection; indiana_projections.csv of the Kaggle release) to tell frontal "
                            f"from lateral images, or build with views=all")
        table = read_table(table_path, ("uid", "filename", "projection"), problems,
                           what="the IU-Xray projections table")
        frontal = {_image_key(r["uid"], r["filename"]) for r in table.rows
                   if r["projection"].strip().lower() == "frontal"}
        files.append(table_path)
    images = FileIndex(folder, (".png",))
    drafts: list[Record] = []
    where: list[str] = []
    no_findings = 0
    seen: dict[str, Path] = {}
    for path in xmls:
        try:
            uid, findings, ids = parse_report(path)
        except DataError as e:
            problems.add(str(e))
            continue
        if uid is None:
            problems.add(f"{path}: no <uId id=...> element; expected an Open-i report XML")
            continue
        if findings is None:
            no_findings += 1
            continue
        for image_id in ids:
            if frontal is not None and _image_key(uid, image_id) not in frontal:
                continue
            if image_id in seen:
                problems.add(f"{path}: image {image_id} is already listed in {seen[image_id]}")
                continue
            seen[image_id] = path
            image = images.get(f"{image_id}.png")
            if not presence.ok(image, str(path), f"{image_id}.png"):
                continue
            drafts.append(Record(image_id, "", uid, None, {}, str(image), report=findings))
            where.append(str(path))
    problems.check()
    records = assign_splits(drafts, policy)
    ds = PublicDataset(NAME, folder, records, TaskSpec("none"), where=where, policy=policy, annotation_files=files,
                       value_range=(0.0, 255.0), notes=[f"views={views}", f"dropped_no_findings={no_findings}",
                                                        presence.note()])
    return finish(ds, problems)
