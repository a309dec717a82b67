"""Plain helpers for the unit tests: datetimes, snapshot values, tiny real stores, FakeRunner."""
from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path
from typing import List, Optional, Sequence

import byteback

UTC = dt.timezone.utc


def at(*args: int) -> dt.datetime:
    """An aware UTC datetime: at(2026, 3, 1, 3, 0)."""
    return dt.datetime(*args, tzinfo=UTC)


def snap_at(host: str, when: dt.datetime) -> byteback.Snapshot:
    """A Snapshot value named the way byteback names it."""
    return byteback.Snapshot(host, byteback.format_snapshot_name(when), when)


def snaps_aged(host: str, now: dt.datetime, ages_days: Sequence[float]) -> List[byteback.Snapshot]:
    """Snapshots of host that are the given numbers of days old at now, oldest first."""
    snaps = [snap_at(host, now - dt.timedelta(days=a)) for a in ages_days]
    return sorted(snaps, key=lambda s: s.when)


class TinyStore:
    """Builds a HardlinkStore in tmp_path out of real directories and history JSON."""

    def __init__(self, root: Path):
        root.mkdir(parents=True, exist_ok=True)
        self.store = byteback.HardlinkStore(root)
        self.root = root

    def add_snapshot(self, host: str, when: dt.datetime, added: int = 100,
                     content: bytes = b"data", **extra) -> byteback.Snapshot:
        """A finished snapshot directory holding one file, and its history entry."""
        snap = snap_at(host, when)
        path = self.root / host / snap.name
        path.mkdir(parents=True)
        (path / "file").write_bytes(content)
        self.store.prepare_host(host)
        backups = self.store.read_history(host)
        entry = {"snapshot": snap.name, "time": when.isoformat(), "size": added,
                 "added": added, "suspicious": False}
        entry.update(extra)
        self.store.write_history(host, backups + [entry])
        return snap

    def names(self, host: str) -> List[str]:
        return [s.name for s in self.store.snapshots(host)]

    def disc(self, total: int, per_snapshot: int, fixed: int = 0) -> None:
        """Model a small disc: free = total - fixed - per_snapshot x snapshots left."""
        def free_bytes() -> int:
            return total - fixed - per_snapshot * len(self.store.snapshots())
        self.store.free_bytes = free_bytes
        self.store.total_bytes = lambda: total


class FakeRunner(byteback.Runner):
    """Records argv and returns canned results (pyfakefs cannot fake subprocesses)."""

    def __init__(self, outputs: Optional[Sequence[str]] = None):
        super().__init__()
        self.calls = []
        self._outputs = list(outputs or [])

    def run(self, argv, *, destructive=True, check=True, input=None, timeout=None,
            capture=True, env=None, **streams):
        self.calls.append((list(argv), destructive))
        out = self._outputs.pop(0) if self._outputs else ""
        return subprocess.CompletedProcess(list(argv), 0, out, "")
