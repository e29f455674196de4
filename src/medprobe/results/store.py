"""The SQLite results store: one ``runs`` row per unit, its ``metrics`` rows, written atomically.

A unit's metrics and its ``done`` status are committed in one transaction, so a run killed
at any moment leaves either the complete result or none; a rerun skips ``done`` keys and
redoes the rest (deleting partial rows of a unit that was ``running`` or ``failed``).
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from medprobe.metrics import MetricValue

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
    error TEXT
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


def run_key(dataset: dict[str, Any], backbone: dict[str, Any], protocol: str, params: dict[str, Any], seed: int) -> str:
    """Deterministic identity of a unit from its configuration."""
    blob = json.dumps({"dataset": dataset, "backbone": backbone, "protocol": protocol, "params": params, "seed": seed},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


class ResultsStore:
    """Thin wrapper over ``results.db``; safe to reopen after a crash."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.executescript(SCHEMA)

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def status(self, key: str) -> str | None:
        row = self.conn.execute("SELECT status FROM runs WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def done_keys(self) -> set[str]:
        return {r[0] for r in self.conn.execute("SELECT key FROM runs WHERE status = 'done'")}

    def start(self, key: str, *, experiment: str, dataset: str, backbone: str, weights: str, protocol: str,
              variant: str, params: dict[str, Any], seed: int) -> None:
        """Mark a unit as running, clearing anything an earlier interrupted attempt left."""
        with self.transaction() as c:
            c.execute("DELETE FROM metrics WHERE run_key = ?", (key,))
            c.execute("INSERT OR REPLACE INTO runs (key, experiment, dataset, backbone, weights, protocol, variant, "
                      "params_json, seed, status, started_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'running', ?)",
                      (key, experiment, dataset, backbone, weights, protocol, variant,
                       json.dumps(params, sort_keys=True, default=str), seed, time.time()))

    def finish(self, key: str, metrics: Iterable[MetricValue], split: str, info: dict[str, Any], wall_s: float) -> None:
        """Write all metrics of a unit and mark it done, in one transaction."""
        rows = [(key, split, m.metric, m.cls, _num(m.value), _num(m.ci_low), _num(m.ci_high), m.note) for m in metrics]
        with self.transaction() as c:
            c.execute("DELETE FROM metrics WHERE run_key = ?", (key,))
            c.executemany("INSERT INTO metrics (run_key, split, metric, class, value, ci_low, ci_high, note) "
                          "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
            c.execute("UPDATE runs SET status = 'done', finished_at = ?, wall_s = ?, info_json = ?, error = NULL "
                      "WHERE key = ?", (time.time(), wall_s, json.dumps(info, default=str), key))

    def fail(self, key: str, error: str, wall_s: float) -> None:
        with self.transaction() as c:
            c.execute("DELETE FROM metrics WHERE run_key = ?", (key,))
            c.execute("UPDATE runs SET status = 'failed', finished_at = ?, wall_s = ?, error = ? WHERE key = ?",
                      (time.time(), wall_s, error, key))


def _num(v: float | None) -> float | None:
    if v is None:
        return None
    v = float(v)
    return None if v != v else v  # NaN stored as NULL (the note says why)
