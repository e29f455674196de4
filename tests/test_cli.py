"""Command-line behaviour: listings, extraction, user errors without tracebacks."""
import json
import subprocess
import sys

from medprobe.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "medprobe", *args], capture_output=True, text=True, timeout=300)


def test_list_backbones_json(capsys):
    assert main(["list", "backbones", "--json"]) == 0
    names = {b["name"] for b in json.loads(capsys.readouterr().out)}
    assert {"dinov2_vitg14_reg", "rad_dino", "biomedclip", "sam_vitl16", "vgg19"} <= names


def test_list_datasets_and_protocols(capsys):
    assert main(["list", "datasets"]) == 0
    out = capsys.readouterr().out
    assert "medmnist" in out and "manifest" in out and "phantom" in out
    assert main(["list", "protocols", "--json"]) == 0
    assert {"knn", "linear", "fewshot", "metadata"} <= set(json.loads(capsys.readouterr().out))


def test_extract_then_reuse(tmp_path):
    args = ["extract", "--backbone", "dinov2_vits14", "--tiny", "--dataset", "phantom", "-o", "n=30", "-o", "size=28",
            "--image-size", "28", "--cache-dir", str(tmp_path), "--precision", "fp32", "--quiet"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    assert "wrote feature store" in first.stdout and "random" in first.stdout
    second = run_cli(*args)
    assert second.returncode == 0 and "reused feature store" in second.stdout


def test_user_errors_have_no_traceback(tmp_path):
    cases = [
        (["extract", "--backbone", "dinov2_vits41", "--dataset", "phantom", "--cache-dir", str(tmp_path)], "dinov2_vits14"),
        (["extract", "--backbone", "dinov2_vits14", "--dataset", "medmnst", "--cache-dir", str(tmp_path)], "medmnist"),
        (["extract", "--backbone", "dinov2_vits14", "--dataset", "medmnist", "--root", str(tmp_path / "nope.npz"),
          "--cache-dir", str(tmp_path)], "nope.npz"),
        (["extract", "--backbone", "dinov2_vits14", "--dataset", "phantom", "--precision", "fp8",
          "--cache-dir", str(tmp_path)], "fp32"),
        (["extract", "--backbone", "dinov2_vits14", "--dataset", "phantom", "--blocks", "x",
          "--cache-dir", str(tmp_path)], "--blocks"),
        (["run", str(tmp_path / "missing.yaml")], "missing.yaml"),
    ]
    for args, expected in cases:
        res = run_cli(*args)
        assert res.returncode != 0, args
        assert expected in res.stderr, (args, res.stderr)
        assert "Traceback" not in res.stderr, res.stderr
