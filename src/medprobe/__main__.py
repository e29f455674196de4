"""``python -m medprobe`` (used by torchrun for multi-process pretraining)."""
import sys

from medprobe.cli import main

sys.exit(main())
