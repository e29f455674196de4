"""Command-line behaviour: listings, extraction, user errors without tracebacks."""
import json
import subprocess
import sys

import numpy as np
import pytest

from medprobe.cli import main


def cli(capsys, *args):
    """Run the CLI in-process; argparse errors exit with code 2 like user errors."""
    try:
        code = main(list(args))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_list_backbones_json(capsys):
    code, out, _ = cli(capsys, "list", "backbones", "--json")
    assert code == 0
    assert {"dinov2_vitg14_reg", "rad_dino", "biomedclip", "sam_vitl16", "vgg19"} <= {b["name"] for b in json.loads(out)}


def test_list_piped_is_plain_and_never_truncates_names(capsys):
    """Piped output (not a terminal) is one plain line per row with the full name first: `| grep dinov2` works."""
    from medprobe.backbones import list_backbones
    from medprobe.data.adapters import list_adapters
    code, out, _ = cli(capsys, "list", "backbones")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["name", "family"]
    assert [line.split()[0] for line in lines[1:]] == [s.name for s in list_backbones()]
    assert not any(ch in out for ch in "…┃│")
    dinov2 = [line for line in lines if "dinov2" in line]
    assert len(dinov2) >= 4 and all(line.split()[1] == "timm" for line in dinov2)
    code, out, _ = cli(capsys, "list", "datasets")
    assert code == 0
    rows = out.splitlines()[1:]
    assert [r.split()[0] for r in rows] == [i.name for i in list_adapters()]
    assert all(i.summary in r for i, r in zip(list_adapters(), rows))


def test_list_datasets_and_protocols(capsys):
    code, out, _ = cli(capsys, "list", "datasets")
    assert code == 0 and "medmnist" in out and "manifest" in out and "phantom" in out
    code, out, _ = cli(capsys, "list", "protocols", "--json")
    assert {"knn", "linear", "fewshot", "metadata"} <= set(json.loads(out))


def test_extract_then_reuse(tmp_path, capsys):
    args = ["extract", "--backbone", "dinov2_vits14", "--tiny", "--dataset", "phantom", "-o", "n=30", "-o", "size=28",
            "--image-size", "28", "--cache-dir", str(tmp_path), "--precision", "fp32", "--quiet"]
    code, out, err = cli(capsys, *args)
    assert code == 0, err
    assert "wrote feature store" in out and "random" in out
    code, out, _ = cli(capsys, *args)
    assert code == 0 and "reused feature store" in out


def test_extract_refuses_a_patient_in_two_splits(tmp_path, capsys):
    from PIL import Image
    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8)).save(tmp_path / f"im{i}.png")
    (tmp_path / "m.csv").write_text("image,split,label,patient_id\nim0.png,train,0,p1\nim1.png,test,1,p1\n"
                                    "im2.png,train,1,p2\n")
    code, _, err = cli(capsys, "extract", "--backbone", "dinov2_vits14", "--tiny", "--dataset", "manifest",
                       "--root", str(tmp_path / "m.csv"), "--cache-dir", str(tmp_path / "cache"), "--quiet")
    assert code == 2 and "p1" in err and "Traceback" not in err, err
    assert not (tmp_path / "cache").exists()  # refused before any embedding


@pytest.mark.parametrize("args, expected", [
    (["extract", "--backbone", "dinov2_vits41", "--dataset", "phantom", "--cache-dir", "X"], "dinov2_vits14"),
    (["extract", "--backbone", "dinov2_vits14", "--dataset", "medmnst", "--cache-dir", "X"], "medmnist"),
    (["extract", "--backbone", "dinov2_vits14", "--dataset", "medmnist", "--root", "X/nope.npz", "--cache-dir", "X"],
     "nope.npz"),
    (["extract", "--backbone", "dinov2_vits14", "--dataset", "phantom", "--precision", "fp8", "--cache-dir", "X"], "fp32"),
    (["extract", "--backbone", "dinov2_vits14", "--dataset", "phantom", "--blocks", "x", "--cache-dir", "X"], "--blocks"),
    (["extract", "--backbone", "dinov2_vits14", "--dataset", "phantom", "-o", "sise=3", "--cache-dir", "X"], "size"),
    (["run", "X/missing.yaml"], "missing.yaml"),
])
def test_user_errors_are_one_clear_message(tmp_path, capsys, args, expected):
    args = [a.replace("X", str(tmp_path)) for a in args]
    code, _, err = cli(capsys, *args)
    assert code == 2
    assert expected in err and "Traceback" not in err


def test_process_exit_code_and_no_traceback(tmp_path):
    res = subprocess.run([sys.executable, "-m", "medprobe", "run", str(tmp_path / "missing.yaml")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    assert "missing.yaml" in res.stderr and "Traceback" not in res.stderr
