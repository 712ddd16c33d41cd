"""The folder layout the serving runtime reads: the model's files plus `toolkit.json` (format, labels,
max length, figures). Written by the `package` stage into the BentoML model store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

META_FILE = "toolkit.json"
# Training leftovers that a served or pushed model does not need.
SKIP = {"training_args.bin", "optimizer.pt", "scheduler.pt", "trainer_state.json", "rng_state.pth"}


def model_files(folder: Path) -> list[Path]:
    """The files of a model folder worth shipping (relative paths, sorted)."""
    folder = Path(folder)
    return sorted(
        p.relative_to(folder)
        for p in folder.rglob("*")
        if p.is_file() and p.name not in SKIP and not p.name.startswith(".") and "logs" not in p.parts
    )


def write_bundle(artifact, dest: str | Path, meta: dict[str, Any]) -> None:
    dest = Path(dest)
    for rel in model_files(Path(artifact.path)):
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path(artifact.path) / rel, dest / rel)
    (dest / META_FILE).write_text(json.dumps(meta, indent=2, default=str))


def read_meta(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / META_FILE).read_text())
