"""Which candidate the run hands on (to packaging and to the report).

Every evaluated model stage is a candidate; the selected one is recorded in the manifest as `selection`.
"""

from __future__ import annotations

from typing import Any

from toolkit.manifest import Manifest
from toolkit.stages.base import Artifact


def select(manifest: Manifest, recipe: Any) -> dict[str, Any]:
    """Without constraints the newest successfully evaluated model stage wins (each stage refines the last)."""
    candidates = [
        (name, entry)
        for name, entry in manifest.ordered()
        if entry.get("status") == "done" and entry.get("output") and entry.get("evaluation")
    ]
    if not candidates:
        raise ValueError("no stage produced an evaluated model; nothing to select")
    name, entry = candidates[-1]
    return {"stage": name, "artifact": entry["output"], "reason": "newest evaluated model stage"}


def selected_artifact(selection: dict[str, Any]) -> Artifact:
    return Artifact.from_json(selection["artifact"])
