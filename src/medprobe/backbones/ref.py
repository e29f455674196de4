"""``BackboneRef``: a backbone as an experiment names it, buildable and with a content identity."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medprobe.backbones.registry import ResizePolicy
from medprobe.errors import ConfigError

_DIGESTS: dict[tuple, tuple[str, float]] = {}
_RACY_S = 2.0  # a file modified this close to its hashing is hashed again (git's "racily clean" rule)


def weights_digest(weights: str) -> str:
    """``random``, ``hub`` or ``file:<sha256>``/``dir:<sha256>`` of the bytes (never the path).

    Digests are memoised per file state (size, mtime, ctime, inode): a file replaced at the
    same path gets a new digest, an unchanged one is hashed once per process. A memo is trusted
    only when the files were last modified well before they were hashed, so a rewrite within the
    same timestamp tick is never mistaken for the old content.
    """
    from medprobe.backbones.weights import parse_weights, path_digest
    source = parse_weights(weights)
    if source.kind in ("random", "hub"):
        return source.kind
    path = Path(source.path).resolve()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    state = (str(path),) + tuple((str(f), *_stat(f)) for f in files)
    newest = max((s[2] for s in state[1:]), default=0) / 1e9
    memo = _DIGESTS.get(state)
    if memo is None or memo[1] - newest < _RACY_S:
        hashed_at = time.time()
        memo = (f"{source.kind}:{path_digest(path)}", hashed_at)
        _DIGESTS[state] = memo
    return memo[0]


def _stat(path: Path) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


@dataclass
class BackboneRef:
    """A registered backbone name, its weights (``random``, ``hub`` or a path), tiny configuration
    and constructor overrides; ``image_size`` (optional) overrides the experiment's; ``resize``
    (optional) replaces the backbone's own resize policy (e.g. ``resize256_crop224``)."""

    name: str
    weights: str = "random"
    tiny: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)
    image_size: int | None = None
    resize: ResizePolicy | None = None

    def __post_init__(self) -> None:
        if self.image_size is not None and self.image_size < 8:
            raise ConfigError(f"image_size: must be >= 8, got {self.image_size}")

    def validate(self) -> None:
        """Check the name and that the weights exist, without building anything."""
        from medprobe.backbones.registry import get_spec
        from medprobe.backbones.weights import parse_weights
        get_spec(self.name)
        parse_weights(self.weights)

    def build(self, weights: str | None = None):
        """The backbone, in eval mode (``weights`` replaces the configured ones, e.g. ``random``)."""
        from dataclasses import replace

        from medprobe.backbones import create_backbone
        bb = create_backbone(self.name, self.weights if weights is None else weights, tiny=self.tiny,
                             overrides=dict(self.overrides))
        if self.resize is not None:  # enters the feature-store identity through Preprocessor.describe()
            bb.preprocess = replace(bb.preprocess, resize=self.resize)
        return bb

    @property
    def is_random(self) -> bool:
        return str(self.weights) == "random"

    def weights_label(self) -> str:
        """How tables name the weights: ``random``, ``hub`` or the path as given."""
        return str(self.weights)

    def identity(self) -> dict[str, Any]:
        """Everything about the backbone that decides its outputs: the weights by content."""
        out = {"name": self.name, "weights": weights_digest(self.weights), "tiny": bool(self.tiny),
               "overrides": dict(self.overrides)}
        if self.resize is not None:  # only when set: the keys of runs with the backbone's own policy stay as they were
            out["resize"] = self.resize
        return out
