"""The shared file helpers: atomic writes (all or nothing) and file-name slugs."""
import pytest
import torch

from medprobe.fsutil import atomic_write, slug


def test_atomic_write_bytes_text_and_writer(tmp_path):
    assert atomic_write(tmp_path / "a" / "b.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
    assert atomic_write(tmp_path / "t.txt", "héllo").read_text(encoding="utf-8") == "héllo"
    atomic_write(tmp_path / "w.pt", lambda fh: torch.save({"x": torch.arange(3)}, fh))
    assert torch.load(tmp_path / "w.pt")["x"].tolist() == [0, 1, 2]


def test_atomic_write_failure_keeps_the_old_file_and_no_temporary(tmp_path):
    target = atomic_write(tmp_path / "f.txt", "old")

    def broken(fh):
        fh.write(b"half")
        raise RuntimeError("disk trouble")

    with pytest.raises(RuntimeError, match="disk trouble"):
        atomic_write(target, broken)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


def test_slug():
    assert slug("chest x-ray / vit (random)") == "chest_x-ray_vit_random"
    assert slug("a b", sep="-") == "a-b" and slug("///") == "x"
    assert len(slug("y" * 200)) == 80 and len(slug("y" * 200, limit=None)) == 200
