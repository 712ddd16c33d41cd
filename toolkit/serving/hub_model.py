"""A model pushed to the Hugging Face Hub (or a folder in the same layout) as a bundle the service can serve:
`TOOLKIT_HUB_MODEL=org/name` (`TOOLKIT_HUB_REVISION`, `TOOLKIT_HUB_ONNX` for the graph under `onnx/`).

The layout is the one `toolkit push` writes and Optimum reads: PyTorch weights, config and tokenizer at the root,
the ONNX graphs under `onnx/` with the config and tokenizer beside them (else the root's are used), each graph's
external data beside it, and the run's `toolkit.json` (its max length) at the root. The service runs one ONNX
graph (the CPU bento has no torch); a repo without `onnx/` is served as PyTorch (the GPU bento). Only the files
the served model needs are fetched: one graph and its data, or the root's weights, never every graph."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from toolkit.runtime.onnx import ONNX_PREFERENCE
from toolkit.serving.bundle import META_FILE

# A tokenizer's model_max_length is often a placeholder (1e30); the service needs a real bound.
DEFAULT_MAX_LENGTH = 512
# Config and tokenizer files (the runtime reads tokenizer.json and tokenizer_config.json; transformers the rest).
META_SUFFIXES = (".json", ".txt", ".model")
# Files that are neither the model nor what reads it: another framework's weights, the card, git's attributes.
NOT_SERVED = (".md", ".gitattributes", ".h5", ".msgpack", ".ot", ".tflite", ".onnx", ".onnx_data", ".onnx.data")


class HubModelError(RuntimeError):
    pass


@dataclass
class HubFiles:
    """What a repo's served model is made of: its format, and each bundle file's path in the repo."""

    format: str
    links: dict[str, str]
    meta: str | None  # the repo's toolkit.json, when `toolkit push` wrote it

    def fetched(self) -> list[str]:
        return [*self.links.values(), *([self.meta] if self.meta else [])]


def hub_files(files: list[str], onnx_name: str | None = None, reference: str = "") -> HubFiles:
    """The files to fetch and link, from the repo's file list: for ONNX one graph (`onnx_name`, else the most
    compressed) with its external data, the config and tokenizer under `onnx/` (else the root's); without `onnx/`
    graphs the root's config, tokenizer and weights (safetensors, else PyTorch .bin)."""
    root = [f for f in files if "/" not in f and not f.endswith(NOT_SERVED) and f != META_FILE]
    links = {f: f for f in root if f.endswith(META_SUFFIXES)}
    meta = META_FILE if META_FILE in files else None
    graphs = sorted(f.removeprefix("onnx/") for f in files if f.startswith("onnx/") and f.endswith(".onnx"))
    if not graphs:
        weights = [f for f in root if f.endswith(".safetensors") or f == "model.safetensors.index.json"] or [
            f for f in root if f.startswith("pytorch_model") and f.endswith((".bin", ".bin.index.json"))
        ]
        return HubFiles("pytorch", {**links, **{f: f for f in weights}}, meta)
    graph = _graph(graphs, onnx_name, reference)
    others = [g for g in graphs if g != graph and not graph.startswith(g)]
    for path in files:
        name = path.removeprefix("onnx/")
        if path.startswith("onnx/") and not name.endswith((".onnx", ".md")) and not name.startswith(tuple(others)):
            links[name] = path  # config, tokenizer, and the graph's external data (named after it by push)
    return HubFiles("onnx", {**links, graph: f"onnx/{graph}"}, meta)


def _graph(graphs: list[str], name: str | None, reference: str) -> str:
    if name:
        if name not in graphs:
            raise HubModelError(f"TOOLKIT_HUB_ONNX={name!r} is not in {reference}'s onnx/ (graphs there: {graphs})")
        return name
    return next((g for g in ONNX_PREFERENCE if g in graphs), graphs[0])


def fetch(reference: str, revision: str | None, onnx_name: str | None = None) -> tuple[Path, HubFiles]:
    """A local folder as it is, else the files the served model needs from the Hub (`hub_files` over the repo's
    listing), or offline the cached snapshot; and which of them make the bundle."""
    if Path(reference).is_dir():
        root = Path(reference)
        return root, hub_files(_listing(root), onnx_name, reference)
    from huggingface_hub import HfApi, snapshot_download

    try:
        listing = [f.rfilename for f in HfApi().repo_info(reference, revision=revision).siblings or []]
    except Exception as exc:  # offline, unreachable: a cached snapshot, if there is one
        try:
            root = Path(snapshot_download(reference, revision=revision, local_files_only=True))
        except Exception:
            raise HubModelError(f"TOOLKIT_HUB_MODEL={reference!r} could not be fetched from the Hub: {exc}") from exc
        return root, hub_files(_listing(root), onnx_name, reference)
    chosen = hub_files(listing, onnx_name, reference)
    try:
        # Exact names (escaped: fnmatch patterns), so that nothing else in the repo is downloaded.
        patterns = ["".join(f"[{c}]" if c in "*?[" else c for c in name) for name in chosen.fetched()]
        root = Path(snapshot_download(reference, revision=revision, allow_patterns=patterns))
    except Exception as exc:  # missing repo, bad revision, network: all say the same to the operator
        raise HubModelError(f"TOOLKIT_HUB_MODEL={reference!r} could not be fetched from the Hub: {exc}") from exc
    return root, chosen


def _listing(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink())


def _max_length(folder: Path, pushed: dict) -> int:
    """TOOLKIT_MAX_LENGTH, else the run's max_length (the repo's toolkit.json), else the tokenizer's."""
    if os.environ.get("TOOLKIT_MAX_LENGTH"):
        return int(os.environ["TOOLKIT_MAX_LENGTH"])
    if pushed.get("max_length"):
        return int(pushed["max_length"])
    config = folder / "tokenizer_config.json"
    declared = json.loads(config.read_text()).get("model_max_length") if config.is_file() else None
    return int(declared) if declared and declared <= 100_000 else DEFAULT_MAX_LENGTH


def hub_bundle(reference: str, dest: Path, revision: str | None = None, onnx_name: str | None = None) -> Path:
    """`dest` made a bundle (links to the fetched files plus `toolkit.json`) of the repo's ONNX graph, or of its
    PyTorch model when it has no graph."""
    root, chosen = fetch(reference, revision, onnx_name)
    where = f"{root}/onnx" if chosen.format == "onnx" else str(root)
    if "config.json" not in chosen.links:
        raise HubModelError(f"{reference}: no config.json in {where}; is it a model pushed by `toolkit push`?")
    if chosen.format == "pytorch" and not any(f.endswith((".safetensors", ".bin")) for f in chosen.links):
        raise HubModelError(f"{reference}: no onnx/ graph and no weights (*.safetensors, pytorch_model.bin) in {where}")
    dest.mkdir(parents=True, exist_ok=True)
    for name, path in chosen.links.items():
        link = dest / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to((root / path).resolve())
    pushed = json.loads((root / chosen.meta).read_text()) if chosen.meta and (root / chosen.meta).is_file() else {}
    id2label = json.loads((dest / "config.json").read_text())["id2label"]
    served = next(reversed(chosen.links))  # the graph, or the last weights file
    meta = {
        "format": chosen.format,
        "stage": f"hub:{reference}" + (f"@{revision}" if revision else ""),
        "labels": [id2label[str(i)] for i in range(len(id2label))],
        "max_length": _max_length(dest, pushed),
        "source": {"hub_model": reference, "revision": revision, "file": served},
    }
    (dest / META_FILE).write_text(json.dumps(meta, indent=2))
    return dest
