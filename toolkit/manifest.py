"""`manifest.json`: one file per run folder with every stage's config, fingerprint, status, output, figures
and timings. Written atomically (temp file + rename) so an interrupted run never leaves it half-written."""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (configs and upstream fingerprints)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class Manifest:
    def __init__(self, run_dir: Path, data: dict[str, Any] | None = None):
        self.run_dir = Path(run_dir)
        self.data: dict[str, Any] = data or {"stages": {}}
        self.data.setdefault("stages", {})

    @classmethod
    def load(cls, run_dir: Path) -> Manifest:
        path = Path(run_dir) / MANIFEST
        if not path.is_file():
            return cls(run_dir)
        return cls(run_dir, json.loads(path.read_text()))

    @property
    def stages(self) -> dict[str, dict[str, Any]]:
        return self.data["stages"]

    def stage(self, name: str) -> dict[str, Any] | None:
        return self.stages.get(name)

    def ordered(self) -> list[tuple[str, dict[str, Any]]]:
        """The current recipe's stages in order; entries of stages since removed from the recipe are left out
        (they must not be selected or reported as if they belonged to this run)."""
        order = self.data.get("order") or list(self.stages)
        return [(n, self.stages[n]) for n in order if n in self.stages]

    def save(self) -> None:
        self.data["updated"] = now()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.run_dir / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, self.run_dir / MANIFEST)
