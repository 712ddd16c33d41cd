"""`manifest.json`: one file per run folder with every stage's config, fingerprint, status, output, figures
and timings. Written atomically (temp file + rename) so an interrupted run never leaves it half-written.

Under `accelerate launch` every process holds a `Manifest`, but only the main process's is `writable`: the
others keep their in-memory copy in step and `reload()` when they need what the main process wrote.
"""

from __future__ import annotations

import hashlib
import json
import os
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np

MANIFEST = "manifest.json"


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (configs and upstream fingerprints)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class Artifact:
    """A model on disk. `format` tells loaders what `path` holds: a transformers folder or an ONNX folder."""

    path: Path | str  # a str only for the recipe's own model, which may be a Hub id
    format: Literal["pytorch", "onnx"]
    stage: str

    def to_json(self) -> dict[str, str]:
        return {"path": str(self.path), "format": self.format, "stage": self.stage}

    @classmethod
    def from_json(cls, data: dict[str, str]) -> Artifact:
        path = Path(data["path"]) if Path(data["path"]).is_absolute() else data["path"]
        return cls(path, data["format"], data["stage"])  # type: ignore[arg-type]


class Manifest:
    def __init__(self, run_dir: Path, data: dict[str, Any] | None = None, writable: bool = True):
        self.run_dir = Path(run_dir)
        self.data: dict[str, Any] = data or {"stages": {}}
        self.data.setdefault("stages", {})
        self.writable = writable

    @classmethod
    def load(cls, run_dir: Path, writable: bool = True) -> Manifest:
        path = Path(run_dir) / MANIFEST
        if not path.is_file():
            return cls(run_dir, writable=writable)
        return cls(run_dir, json.loads(path.read_text()), writable)

    def reload(self) -> None:
        """What the main process wrote (other processes call this after a barrier)."""
        self.data = Manifest.load(self.run_dir).data

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

    @property
    def selection(self) -> dict[str, Any] | None:
        return self.data.get("selection")

    def save(self) -> None:
        if not self.writable:
            return
        self.data["updated"] = now()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.run_dir / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, self.run_dir / MANIFEST)

    # ------------------------------------------------------------------------------------------ bookkeeping

    def record_run(self, version: str, recipe: dict[str, Any], data: Any, environment: dict | None = None) -> None:
        """The run's header: toolkit's version, the machine, the recipe as validated, the stage order and the
        data (with each split's label counts)."""
        self.data.update(
            {
                "toolkit_version": version,
                "started": now(),
                "environment": environment or {},
                "recipe": recipe,
                "order": [s["name"] for s in recipe["stages"]],
                "data": {
                    "fingerprint": data.fingerprint,
                    "path": str(data.path),
                    "label_names": data.label_names,
                    "counts": {s: data.count(s) for s in ("train", "validation", "test")},
                    "label_counts": {
                        s: np.bincount(data.labels(s), minlength=len(data.label_names)).tolist()
                        for s in ("train", "validation", "test")
                    },
                },
            }
        )
        self.save()

    def update(self, name: str, fields: dict[str, Any], replace: bool = False) -> None:
        """Merge into a stage's entry; `replace` drops what an earlier run left (outputs, figures)."""
        if replace:
            self.stages[name] = {}
        self.stages.setdefault(name, {}).update(fields)
        self.save()

    def set_status(self, name: str, stage_type: str, status: str, reason: str | None = None) -> None:
        """A stage that did not run this time (disabled, skipped, stale), with why."""
        self.update(name, {"type": stage_type, "status": status, **({"reason": reason} if reason else {})}, True)

    def start(self, name: str, stage_type: str, config: dict, stage_fp: str, source: Artifact) -> None:
        self.stages[name] = {
            "type": stage_type,
            "config": config,
            "fingerprint": stage_fp,
            "input": source.to_json(),
            "status": "running",
            "started": now(),
        }
        self.save()

    def finish(self, name: str, output: Artifact | None, info: dict, seconds: float, source: Artifact | None) -> None:
        fields = {
            "status": "done",
            "finished": now(),
            "seconds": round(seconds, 2),
            "output": output.to_json() if output else None,
            "info": info,
        }
        if source is not None:  # the stage read another model than the one it was handed
            fields["input"] = source.to_json()
        self.update(name, fields)

    def fail(self, name: str, error: BaseException) -> None:
        self.update(
            name,
            {
                "status": "failed",
                "finished": now(),
                "error": f"{type(error).__name__}: {error}",
                "traceback": traceback.format_exception(error)[-6:],
            },
        )

    def reusable_entry(self, name: str, stage_fp: str) -> dict[str, Any] | None:
        """The entry of an earlier result with this fingerprint whose model folder still exists."""
        entry = self.stage(name)
        if not entry or entry.get("status") not in ("done", "failed_gate") or entry.get("fingerprint") != stage_fp:
            return None
        output = entry.get("output")
        if output is not None and not Path(output["path"]).exists():
            return None
        return entry
