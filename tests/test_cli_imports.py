"""The command line answers --help, `list backbones|datasets|protocols` and `report --help` without importing torch."""
import subprocess
import sys

import pytest

CHECK = """
import contextlib, io, sys
from medprobe.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        code = main({argv!r})
    except SystemExit as e:  # argparse's --help
        code = e.code
assert code == 0, code
assert out.getvalue().strip()
heavy = sorted(m for m in ("torch", "timm", "transformers", "pandas", "sklearn") if m in sys.modules)
print(",".join(heavy))
"""


@pytest.mark.parametrize("argv", [["--help"], ["list", "backbones"], ["list", "datasets"], ["list", "protocols"], ["report", "--help"],
                                  ["cache", "verify", "--help"], ["extract", "--help"]])
def test_light_commands_do_not_import_torch(argv):
    proc = subprocess.run([sys.executable, "-c", CHECK.format(argv=argv)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"medprobe {' '.join(argv)} imported {proc.stdout.strip()}"


def test_protocol_catalog_matches_the_registry():
    from medprobe.protocols import list_protocols
    from medprobe.protocols.base import get_protocol
    from medprobe.protocols.catalog import CATALOG, protocol_names
    assert protocol_names() == list_protocols()
    for name in list_protocols():
        assert type(get_protocol(name)).__module__ == CATALOG[name], name
