"""A model pushed to the Hugging Face Hub (or a folder in the same layout) as a bundle the service can serve:
`TOOLKIT_HUB_MODEL=org/name` (`TOOLKIT_HUB_REVISION`, `TOOLKIT_HUB_ONNX` for the graph under `onnx/`).

The layout is the one `toolkit push` writes and Optimum reads: PyTorch weights, config and tokenizer at the root,
the ONNX graphs under `onnx/` with the config and tokenizer beside them. The service runs the ONNX graph (the
CPU bento has no torch); a repo without `onnx/` is served as PyTorch (the GPU bento)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from toolkit.runtime.onnx import ONNX_PREFERENCE
from toolkit.serving.bundle import META_FILE

# A tokenizer's model_max_length is often a placeholder (1e30); the service needs a real bound.
DEFAULT_MAX_LENGTH = 512
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json")


class HubModelError(RuntimeError):
    pass


def fetch(reference: str, revision: str | None) -> Path:
    """A local folder as it is, else the repo's config, tokenizer and ONNX files from the Hub (or its cache)."""
    if Path(reference).is_dir():
        return Path(reference)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(reference, revision=revision, allow_patterns=["*.json", "*.txt", "onnx/*"]))
    except Exception as exc:  # offline, missing repo, bad revision: all say the same to the operator
        raise HubModelError(f"TOOLKIT_HUB_MODEL={reference!r} could not be fetched from the Hub: {exc}") from exc


def _graph(onnx_dir: Path, name: str | None) -> Path:
    if name:
        if not (onnx_dir / name).is_file():
            found = sorted(p.name for p in onnx_dir.glob("*.onnx"))
            raise HubModelError(f"TOOLKIT_HUB_ONNX={name!r} is not in {onnx_dir} (graphs there: {found})")
        return onnx_dir / name
    for preferred in ONNX_PREFERENCE:
        if (onnx_dir / preferred).is_file():
            return onnx_dir / preferred
    return sorted(onnx_dir.glob("*.onnx"))[0]


def _max_length(folder: Path) -> int:
    if os.environ.get("TOOLKIT_MAX_LENGTH"):
        return int(os.environ["TOOLKIT_MAX_LENGTH"])
    config = folder / "tokenizer_config.json"
    declared = json.loads(config.read_text()).get("model_max_length") if config.is_file() else None
    return int(declared) if declared and declared <= 100_000 else DEFAULT_MAX_LENGTH


def hub_bundle(reference: str, dest: Path, revision: str | None = None, onnx_name: str | None = None) -> Path:
    """`dest` made a bundle (links to the fetched files plus `toolkit.json`) of the repo's ONNX graph."""
    root = fetch(reference, revision)
    onnx_dir = root / "onnx"
    has_onnx = onnx_dir.is_dir() and any(onnx_dir.glob("*.onnx"))
    source = onnx_dir if has_onnx else root
    if not (source / "config.json").is_file():
        raise HubModelError(f"{reference}: no config.json in {source}; is it a model pushed by `toolkit push`?")
    dest.mkdir(parents=True, exist_ok=True)
    files = [source / f for f in TOKENIZER_FILES if (source / f).is_file()]
    files += [_graph(onnx_dir, onnx_name)] if has_onnx else [p for p in root.glob("*.safetensors")]
    for file in files:
        link = dest / file.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(file.resolve())
    id2label = json.loads((source / "config.json").read_text())["id2label"]
    meta = {
        "format": "onnx" if has_onnx else "pytorch",
        "stage": f"hub:{reference}" + (f"@{revision}" if revision else ""),
        "labels": [id2label[str(i)] for i in range(len(id2label))],
        "max_length": _max_length(source),
        "source": {"hub_model": reference, "revision": revision, "file": files[-1].name},
    }
    (dest / META_FILE).write_text(json.dumps(meta, indent=2))
    return dest
