"""The SQLite results store: one ``runs`` row per unit, its ``metrics`` rows, written atomically.

A unit's metrics, its predictions-file reference and its ``done`` status are committed in
one transaction, so a run killed at any moment leaves either the complete result or none;
a rerun skips ``done`` keys and redoes the rest (clearing partial rows of a unit that was
``running`` or ``failed``; the rows of a ``done`` unit are never deleted).

Besides the label columns (dataset, backbone, protocol, variant), each run row carries the
identities its key was derived from: ``config_key`` (protocol, its full resolved options,
dataset and evaluation settings; seeds and backbone excluded, so units that differ only by
seed share it and backbones can be paired on it), ``backbone_key`` and ``dataset_key``.
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medprobe.errors import ConfigError, DataError
from medprobe.metrics import MetricValue

SCHEMA_VERSION = 2
SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    key TEXT PRIMARY KEY,
    experiment TEXT NOT NULL,
    dataset TEXT NOT NULL,
    backbone TEXT NOT NULL,
    weights TEXT NOT NULL,
    protocol TEXT NOT NULL,
    variant TEXT NOT NULL,
    params_json TEXT NOT NULL,
    seed INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed')),
    started_at REAL,
    finished_at REAL,
    wall_s REAL,
    info_json TEXT,
    error TEXT,
    config_key TEXT,
    options_json TEXT,
    backbone_key TEXT,
    backbone_json TEXT,
    dataset_key TEXT,
    env_json TEXT,
    predictions TEXT,
    predictions_sha256 TEXT,
    settings_json TEXT
);
CREATE TABLE IF NOT EXISTS metrics (
    run_key TEXT NOT NULL REFERENCES runs(key),
    split TEXT NOT NULL,
    metric TEXT NOT NULL,
    class TEXT,
    value REAL,
    ci_low REAL,
    ci_high REAL,
    note TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS metrics_unique ON metrics(run_key, split, metric, IFNULL(class, ''));
"""
# columns added in schema 2 (ALTER TABLE for a results.db written by an earlier version)
_ADDED = ("config_key", "options_json", "backbone_key", "backbone_json", "dataset_key", "env_json", "predictions",
          "predictions_sha256", "settings_json")


@dataclass
class RunRecord:
    """What is known about a unit before it runs (the ``runs`` row minus its outcome)."""

    key: str
    experiment: str
    dataset: str
    backbone: str
    weights: str
    protocol: str
    variant: str
    params: dict[str, Any]
    seed: int
    config_key: str
    options: dict[str, Any]
    backbone_key: str
    backbone_identity: dict[str, Any]
    dataset_key: str
    env: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)  # run-level settings in the key (image size...)


def _check_path(path: Path) -> None:
    if path.is_dir():
        raise ConfigError(f"{path} is a folder, not a results database; move it away or choose another output_dir")
    if path.parent.exists() and not path.parent.is_dir():
        raise ConfigError(f"output folder {path.parent} is a file, not a folder; choose another output_dir")


def _damaged(path: Path, e: Exception) -> ConfigError:
    return ConfigError(f"{path} is not a medprobe results database ({e}); it may be damaged: move it away to start "
                       "afresh (its results are lost unless you can repair it with the sqlite3 tool)")


def connect_readonly(path: str | Path) -> sqlite3.Connection:
    """Open ``results.db`` for reading only (works in a read-only folder; nothing is written)."""
    path = Path(path)
    _check_path(path)
    if not path.is_file():
        raise ConfigError(f"no results database at {path}; run `medprobe run FILE.yaml` first")
    if path.stat().st_size == 0:
        raise ConfigError(f"{path} is empty (0 bytes): no run has written results there yet")
    uri = path.resolve().as_uri()
    last: Exception | None = None
    # a read-only folder: SQLite cannot make its -shm file there, and nothing may be written, so the
    # file is read as immutable (no writer can be running there); else a plain read-only connection
    modes = ("?immutable=1",) if not os.access(path.parent, os.W_OK) else ("?mode=ro", "?immutable=1")
    for mode in modes:
        try:
            conn = sqlite3.connect(uri + mode, uri=True)
            conn.execute("SELECT count(*) FROM runs").fetchone()
            return conn
        except sqlite3.DatabaseError as e:
            last = e
            if "no such table" in str(e):
                raise ConfigError(f"{path} is a SQLite file but not a medprobe results database (no runs table)") from None
    raise _damaged(path, last)  # type: ignore[arg-type]


class ResultsStore:
    """Read/write access to ``results.db``; safe to reopen after a crash. One writer at a time
    (the runner holds :class:`medprobe.experiment.lock.OutputLock`)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        _check_path(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        except (OSError, sqlite3.OperationalError) as e:
            raise ConfigError(f"cannot create the results database {self.path}: {getattr(e, 'strerror', None) or e}; "
                              "check that the output folder is writable") from None
        try:
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.executescript(SCHEMA)
            self._migrate()
        except sqlite3.DatabaseError as e:
            self.conn.close()
            if isinstance(e, sqlite3.OperationalError) and _is_readonly_or_full(e):
                raise _fs_error(self.path, e) from None
            raise _damaged(self.path, e) from None

    def _migrate(self) -> None:
        have = {r[1] for r in self.conn.execute("PRAGMA table_info(runs)")}
        for col in _ADDED:
            if col not in have:
                self.conn.execute(f"ALTER TABLE runs ADD COLUMN {col} TEXT")
        if self.conn.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
            self.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        """Close, leaving the database in rollback-journal mode: readers (``medprobe report``, a rerun's
        look for pending units) then open it without creating ``-wal``/``-shm`` files."""
        try:
            self.conn.execute("PRAGMA journal_mode=DELETE")
        except sqlite3.DatabaseError:
            pass  # another connection still has it open: it stays in WAL mode, which is harmless
        self.conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            raise _fs_error(self.path, e) from None
        try:
            yield self.conn
        except BaseException as e:
            self.conn.execute("ROLLBACK")
            if isinstance(e, sqlite3.OperationalError):
                raise _fs_error(self.path, e) from None
            raise
        try:
            self.conn.execute("COMMIT")
        except sqlite3.OperationalError as e:
            self.conn.execute("ROLLBACK")
            raise _fs_error(self.path, e) from None

    def done_keys(self) -> set[str]:
        return done_keys(self.conn)

    def start(self, record: RunRecord) -> bool:
        """Mark a unit as running, clearing what an interrupted or failed attempt left.

        Returns False, and changes nothing, when the unit is already ``done``.
        """
        r = record
        with self.transaction() as c:
            row = c.execute("SELECT status FROM runs WHERE key = ?", (r.key,)).fetchone()
            if row and row[0] == "done":
                return False
            c.execute("DELETE FROM metrics WHERE run_key = ?", (r.key,))
            c.execute("INSERT OR REPLACE INTO runs (key, experiment, dataset, backbone, weights, protocol, variant, "
                      "params_json, seed, status, started_at, config_key, options_json, backbone_key, backbone_json, "
                      "dataset_key, env_json, settings_json) "
                      "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'running', ?, ?, ?, ?, ?, ?, ?, ?)",
                      (r.key, r.experiment, r.dataset, r.backbone, r.weights, r.protocol, r.variant,
                       _json(r.params), r.seed, time.time(), r.config_key, _json(r.options), r.backbone_key,
                       _json(r.backbone_identity), r.dataset_key, _json(r.env), _json(r.settings)))
        return True

    def finish(self, key: str, metrics: Iterable[MetricValue], split: str, info: dict[str, Any], wall_s: float,
               predictions: tuple[str, str] | None = None) -> None:
        """Write all metrics of a unit (and its predictions file reference) and mark it done, in one transaction."""
        rows = [(key, split, m.metric, m.cls, _num(m.value), _num(m.ci_low), _num(m.ci_high), m.note) for m in metrics]
        path, sha = predictions if predictions else (None, None)
        with self.transaction() as c:
            c.execute("DELETE FROM metrics WHERE run_key = ?", (key,))
            c.executemany("INSERT INTO metrics (run_key, split, metric, class, value, ci_low, ci_high, note) "
                          "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
            c.execute("UPDATE runs SET status = 'done', finished_at = ?, wall_s = ?, info_json = ?, error = NULL, "
                      "predictions = ?, predictions_sha256 = ? WHERE key = ? AND status = 'running'",
                      (time.time(), wall_s, json.dumps(info, default=str), path, sha, key))

    def fail(self, key: str, error: str, wall_s: float) -> None:
        with self.transaction() as c:
            c.execute("DELETE FROM metrics WHERE run_key = ? AND (SELECT status FROM runs WHERE key = ?) != 'done'",
                      (key, key))
            c.execute("UPDATE runs SET status = 'failed', finished_at = ?, wall_s = ?, error = ? "
                      "WHERE key = ? AND status != 'done'", (time.time(), wall_s, error, key))


def done_keys(conn: sqlite3.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT key FROM runs WHERE status = 'done'")}


def _is_readonly_or_full(e: sqlite3.OperationalError) -> bool:
    text = str(e).lower()
    return any(s in text for s in ("readonly", "read-only", "disk is full", "disk i/o", "unable to open"))


def _fs_error(path: Path, e: sqlite3.OperationalError) -> Exception:
    text = str(e).lower()
    if "disk is full" in text:
        return DataError(f"the disk holding {path} is full (SQLite: {e}); free space and rerun: finished units "
                         "are kept and only the rest runs")
    if "readonly" in text or "read-only" in text:
        return ConfigError(f"{path} is read-only ({e}); choose a writable output_dir")
    if "locked" in text or "busy" in text:
        return ConfigError(f"{path} is locked by another process ({e}); wait for it or use another output_dir")
    if _is_readonly_or_full(e):
        return DataError(f"cannot write {path}: {e}")
    return e


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _num(v: float | None) -> float | None:
    if v is None:
        return None
    v = float(v)
    return None if v != v else v  # NaN stored as NULL (the note says why)


# --------------------------------------------------------------------------- shards of parallel workers
SHARDS = "shards"


def shard_paths(output_dir: str | Path) -> list[Path]:
    """Results shards written by workers (``--workers``, cluster jobs) and not merged yet."""
    folder = Path(output_dir) / SHARDS
    return sorted(folder.glob("*.db")) if folder.is_dir() else []


def merge_shards(results: ResultsStore) -> int:
    """Move every finished or failed unit of ``OUTPUT_DIR/shards/*.db`` into ``results`` (one transaction per
    shard; a unit already ``done`` there is kept), then delete the shard. Returns the number of units merged.

    The caller holds the output folder's lock (a shard is written only by a worker of that holder).
    """
    merged = 0
    for shard in shard_paths(results.path.parent):
        if shard.stat().st_size == 0:
            shard.unlink()
            continue
        try:
            src = sqlite3.connect(shard.resolve().as_uri() + "?mode=ro", uri=True)
            cols = [r[1] for r in src.execute("PRAGMA table_info(runs)")]
            runs = src.execute(f"SELECT {', '.join(cols)} FROM runs WHERE status IN ('done', 'failed')").fetchall()
            mcols = [r[1] for r in src.execute("PRAGMA table_info(metrics)")]
            metrics = src.execute(f"SELECT {', '.join(mcols)} FROM metrics").fetchall()
            src.close()
        except sqlite3.DatabaseError as e:
            raise _damaged(shard, e) from None
        have = {r[1] for r in results.conn.execute("PRAGMA table_info(runs)")}
        keep = [i for i, c in enumerate(cols) if c in have]
        by_run: dict[str, list[tuple]] = {}
        key_at = mcols.index("run_key")
        for m in metrics:
            by_run.setdefault(m[key_at], []).append(m)
        with results.transaction() as c:
            done = done_keys(c)
            for row in runs:
                rec = dict(zip(cols, row))
                if rec["key"] in done:
                    continue
                c.execute("DELETE FROM metrics WHERE run_key = ?", (rec["key"],))
                names = [cols[i] for i in keep]
                c.execute(f"INSERT OR REPLACE INTO runs ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
                          [row[i] for i in keep])
                if rec["status"] == "done":
                    c.executemany(f"INSERT INTO metrics ({', '.join(mcols)}) VALUES ({', '.join('?' * len(mcols))})",
                                  by_run.get(rec["key"], []))
                merged += 1
        for suffix in ("", "-wal", "-shm"):
            Path(str(shard) + suffix).unlink(missing_ok=True)
    return merged
