"""Push a run's selected model to the Hugging Face Hub with a generated model card.

The token is never an argument: huggingface_hub reads HF_TOKEN or the stored `huggingface-cli login`, and no
message written here contains it."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from toolkit.config import REPO_ID
from toolkit.errors import ToolkitError
from toolkit.manifest import MANIFEST, Artifact, Manifest
from toolkit.serving.bundle import META_FILE, model_files
from toolkit.sources import PACKAGE_PREFIX


class HubError(ToolkitError, RuntimeError):
    """A push that cannot be done or failed; the message says why and what to do."""


@dataclass
class Upload:
    repo_id: str
    artifact: Artifact
    # (path in the repo, local file or the bytes written for it: a tokenizer_config.json with the run's
    # max_length, toolkit.json, a graph whose external data is renamed)
    files: list[tuple[str, Path | bytes]]
    card: str

    def listing(self) -> list[str]:
        rows = [f"{name}  ({_size(content):,} bytes{_made(content)})" for name, content in self.files]
        return [*rows, f"README.md  ({len(self.card.encode()):,} bytes, generated model card)"]

    def write(self, folder: Path) -> Path:
        """The repo as it would be on the Hub, in a local folder (TOOLKIT_HUB_MODEL serves such a folder)."""
        for name, content in [*self.files, ("README.md", self.card.encode())]:
            target = Path(folder) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content if isinstance(content, bytes) else Path(content).read_bytes())
        return Path(folder)


def _size(content: Path | bytes) -> int:
    return len(content) if isinstance(content, bytes) else content.stat().st_size


def _made(content: Path | bytes) -> str:
    return ", generated" if isinstance(content, bytes) else ""


def plan_upload(manifest: Manifest, repo_id: str) -> Upload:
    """What a push of the run's selected model uploads (a run in progress passes its record; the CLI loads the
    run folder's)."""
    selection = manifest.selection
    if not selection:
        raise HubError(
            f"{manifest.run_dir} has no selected model (no {MANIFEST} with a selection); run the recipe first"
        )
    artifact = Artifact.from_json(selection["artifact"])
    folder = Path(artifact.path)
    if not folder.is_dir():
        raise HubError(f"the selected model's folder {folder} is missing; re-run the recipe")
    files = onnx_layout(manifest, artifact) if artifact.format in ("onnx", "openvino") else pytorch_files(folder)
    max_length = int((manifest.data.get("recipe") or {}).get("model", {}).get("max_length", 128))
    files = [(name, _with_max_length(name, content, max_length)) for name, content in files]
    files.append((META_FILE, json.dumps(hub_meta(manifest, artifact, max_length), indent=2).encode()))
    return Upload(repo_id, artifact, files, model_card(manifest, artifact, repo_id))


def hub_meta(manifest: Manifest, artifact: Artifact, max_length: int) -> dict:
    """The repo's `toolkit.json`: what the service needs beside the model (`TOOLKIT_HUB_MODEL` reads it) and
    where the model came from."""
    return {
        "format": artifact.format,
        "stage": artifact.stage,
        "labels": (manifest.data.get("data") or {}).get("label_names", []),
        "max_length": max_length,
        "recipe": (manifest.data.get("recipe") or {}).get("name"),
    }


def _with_max_length(name: str, content: Path | bytes, max_length: int) -> Path | bytes:
    """A tokenizer_config.json whose `model_max_length` is the run's max_length, so that `truncation=True` cuts
    where training did (the saved one keeps the pretrained model's, often 512 or a 1e30 placeholder)."""
    if Path(name).name != "tokenizer_config.json" or isinstance(content, bytes):
        return content
    config = json.loads(content.read_text(encoding="utf-8"))
    return json.dumps({**config, "model_max_length": max_length}, indent=2, ensure_ascii=False).encode()


# The file names Optimum and transformers.js use for each ONNX step, under `onnx/`.
ONNX_NAMES = {"export": "model.onnx", "optimize": "model_optimized.onnx", "quantize": "model_quantized.onnx"}


def onnx_file_name(manifest: Manifest, stage: str) -> str:
    return ONNX_NAMES.get((manifest.stage(stage) or {}).get("type"), f"model_{stage}.onnx")


def onnx_layout(manifest: Manifest, artifact: Artifact) -> list[tuple[str, Path | bytes]]:
    """The Hub's common layout for an ONNX selection: its PyTorch ancestor at the root (weights, config with the
    labels, tokenizer), so `AutoModelForSequenceClassification`, `pipeline` and the widget load the repo, and
    the ONNX graphs of the chain that made the selection under `onnx/`, with the config and tokenizer beside
    them for `ORTModelForSequenceClassification.from_pretrained(repo, subfolder="onnx", file_name=...)`. An
    OpenVINO selection adds its IR folder as `openvino/` (optimum-intel's `OVModelForSequenceClassification`
    loads it with `subfolder="openvino"`)."""
    from toolkit.runtime import onnx_file

    stage, chain, files = pytorch_root(manifest, artifact), [], []
    for name, output in lineage(manifest, artifact):
        if output.get("format") == "openvino":
            ir = Path(output["path"])
            files += [(f"openvino/{rel.as_posix()}", ir / rel) for rel in model_files(ir) if rel.name != "README.md"]
        elif output.get("format") == "onnx":
            chain.append((name, Path(output["path"])))
    pytorch = Path((manifest.stage(stage) or {}).get("output", {}).get("path", ""))
    if not chain or not pytorch.is_dir():
        raise HubError(f"the PyTorch model behind {artifact.stage!r} is missing ({pytorch}); re-run the recipe")
    files = pytorch_files(pytorch) + files
    selected = Path(chain[0][1])  # the newest graph's folder: its config and tokenizer go beside the graphs
    weights = {data for graph in selected.glob("*.onnx") for data in external_data(graph)}
    for rel in model_files(selected):
        if rel.as_posix() not in weights and not rel.name.endswith((".onnx", ".onnx_data", ".onnx.data", "README.md")):
            files.append((f"onnx/{rel.as_posix()}", selected / rel))
    for name, folder in reversed(chain):
        files += graph_files(onnx_file(folder), onnx_file_name(manifest, name))
    return files


def lineage(manifest: Manifest, artifact: Artifact) -> list[tuple[str, dict]]:
    """(stage, output record) from the selected model back along each stage's recorded input, while the outputs
    are graphs (ONNX, OpenVINO); the PyTorch model the export read is `pytorch_root`."""
    stages, stage = [], artifact.stage
    while True:
        entry = manifest.stage(stage) or {}
        output = entry.get("output") or {}
        if output.get("format") not in ("onnx", "openvino"):
            return stages
        stages.append((stage, output))
        stage = (entry.get("input") or {}).get("stage")


def pytorch_root(manifest: Manifest, artifact: Artifact) -> str | None:
    """The stage whose PyTorch model goes at the repo root: the selected one, or the one its graphs came from."""
    graphs = lineage(manifest, artifact)
    if not graphs:
        return artifact.stage
    return ((manifest.stage(graphs[-1][0]) or {}).get("input") or {}).get("stage")


def pytorch_files(folder: Path) -> list[tuple[str, Path | bytes]]:
    """A PyTorch folder's files for the repo root; refused when only transformers 4 could load it."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if config.get("pruned_heads"):
        raise HubError(
            f"{folder} holds sliced attention heads (`pruned_heads` in its config.json), written by an older toolkit: "
            "transformers 5 cannot load it. Re-run the recipe from that stage (`toolkit run RECIPE --from STAGE`): "
            "toolkit now writes pruned heads as zeros, which every transformers version loads"
        )
    return [(rel.as_posix(), folder / rel) for rel in model_files(folder) if rel.name != "README.md"]


def _data_locations(model) -> list:
    """The `location` entries of a loaded graph's tensors kept in external data files, subgraphs included."""
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    tensors = [t for t in _get_all_tensors(model) if uses_external_data(t)]
    return [entry for t in tensors for entry in t.external_data if entry.key == "location"]


def external_data(graph: Path) -> list[str]:
    """The files a graph keeps its weights in (relative to its folder; none for most graphs, always some for a
    model over 2 GB)."""
    import onnx

    return sorted({entry.value for entry in _data_locations(onnx.load(str(graph), load_external_data=False))})


def graph_files(graph: Path, name: str) -> list[tuple[str, Path | bytes]]:
    """A graph as `onnx/NAME` with its external data beside it as `onnx/NAME_data` (several files:
    `NAME_data_<file>`): the graphs of a chain share a folder on the Hub, where each stage's data would have the
    same name. When a file is renamed, the graph is rewritten to point at the new name (its bytes are uploaded)."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    entries = _data_locations(model)
    old = sorted({entry.value for entry in entries})
    renamed = {f: f"{name}_data" if len(old) == 1 else f"{name}_data_{Path(f).name}" for f in old}
    data: list[tuple[str, Path | bytes]] = [(f"onnx/{new}", graph.parent / f) for f, new in renamed.items()]
    if all(f == new for f, new in renamed.items()):
        return [(f"onnx/{name}", graph), *data]
    for entry in entries:
        entry.value = renamed[entry.value]
    return [(f"onnx/{name}", model.SerializeToString()), *data]


def _scrub(message: str) -> str:
    token = os.environ.get("HF_TOKEN") or _stored_token()
    return message.replace(token, "***") if token else message


def _stored_token() -> str | None:
    from huggingface_hub import get_token

    return get_token()


def push(upload: Upload, private: bool = False) -> str:
    """Create the repo if needed and upload everything in one commit; returns the commit's URL."""
    from huggingface_hub import CommitOperationAdd, HfApi, constants

    # huggingface_hub reads HF_HUB_OFFLINE once, at import; the environment now is what the user meant.
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        raise HubError("HF_HUB_OFFLINE is set: the Hub cannot be reached; unset it to push (or use --dry-run)")
    if not _stored_token():
        raise HubError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (never put it in a recipe)")
    api = HfApi()
    operations = [
        CommitOperationAdd(name, content if isinstance(content, bytes) else str(content))
        for name, content in upload.files
    ]
    operations.append(CommitOperationAdd("README.md", upload.card.encode()))
    try:
        api.create_repo(upload.repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.create_commit(
            upload.repo_id,
            operations,
            commit_message=f"toolkit: {upload.artifact.stage} ({upload.artifact.format})",
        )
    except Exception as exc:  # network, auth, quota: all end as one clear line
        raise HubError(_scrub(f"upload to {upload.repo_id} failed: {type(exc).__name__}: {exc}")) from None
    return str(getattr(commit, "commit_url", commit))


def stage_table(manifest: Manifest) -> str:
    from toolkit.report import markdown_table

    return "\n".join(markdown_table(manifest))


def card_data(manifest: Manifest, artifact: Artifact, repo_id: str):
    """The card's metadata as the Hub reads it (`huggingface_hub.ModelCardData`): library, pipeline, tags, the
    base model and dataset when they are Hub ids, license and language from the recipe, and a model-index with
    the selected model's accuracy and macro-F1 on the evaluation split."""
    from huggingface_hub import EvalResult, ModelCardData

    recipe = manifest.data.get("recipe", {})
    data = recipe.get("data", {})
    model_name = recipe.get("model", {}).get("name", "")
    hub_model = bool(re.match(REPO_ID, model_name)) and not Path(model_name).is_absolute()
    hub_data = data.get("format") == "hub"
    evaluation = (manifest.stage(artifact.stage) or {}).get("evaluation") or {}
    dataset_id = data.get("path") if hub_data else f"{recipe.get('name', 'toolkit')}-data"
    results = [
        EvalResult(
            task_type="text-classification",
            dataset_type=dataset_id,
            dataset_name=dataset_id,
            dataset_split=evaluation.get("split", "test"),
            metric_type=metric,
            metric_name=name,
            metric_value=round(float(evaluation[key]), 4),
            **({"dataset_config": data.get("subset")} if hub_data and data.get("subset") else {}),
            **({"metric_config": "macro"} if key == "macro_f1" else {}),
        )
        for key, metric, name in (("accuracy", "accuracy", "Accuracy"), ("macro_f1", "f1", "Macro F1"))
        if evaluation.get(key) is not None
    ]
    card = recipe.get("card") or {}
    entry = manifest.stage(artifact.stage) or {}
    quantized = entry.get("type") == "quantize" or (entry.get("info") or {}).get("quantize", "none") != "none"
    return ModelCardData(
        model_name=repo_id.split("/")[-1],
        library_name="transformers",
        pipeline_tag="text-classification",
        tags=[
            "text-classification",
            "toolkit",
            *(["onnx"] if artifact.format in ("onnx", "openvino") else []),
            *(["openvino"] if artifact.format == "openvino" else []),
            *(["int8"] if quantized else []),
        ],  # fmt: skip
        base_model=model_name if hub_model else None,
        datasets=[data["path"]] if hub_data else None,
        license=card.get("license"),
        language=card.get("language"),
        eval_results=results or None,
    )


# What toolkit's compatibility test (tests/test_compat.py) loads a pushed folder with, in a side environment
# (transformers) and in Node (transformers.js); the card names them.
TESTED_TRANSFORMERS_5 = "5.25.0"
TESTED_TRANSFORMERS_JS = "4.3.2"


def where_files_run(manifest: Manifest, artifact: Artifact) -> str:
    """The card's table of which file each runtime loads, and what toolkit checked it with."""
    from importlib.metadata import version

    graphs = lineage(manifest, artifact)
    onnx = {onnx_file_name(manifest, name) for name, output in graphs if output.get("format") == "onnx"}
    transformers4 = version("transformers")
    rows = [
        (
            "root: `model.safetensors`, `config.json`, tokenizer",
            "transformers 4.x and 5.x (`AutoModelForSequenceClassification`, `pipeline`), the Hub widget, Text "
            "Embeddings Inference",
            f"transformers {transformers4} (every run) and {TESTED_TRANSFORMERS_5} (toolkit's tests); TEI: not tested",
        )
    ]
    js = f"transformers.js {TESTED_TRANSFORMERS_JS} in Node (toolkit's tests)"
    described = {
        "model.onnx": ("FP32", 'Optimum `ORTModelForSequenceClassification`, transformers.js (`dtype: "fp32"`), '
                       "Text Embeddings Inference's ONNX backend, OpenVINO (`core.read_model`)",
                       f"ONNX Runtime; {js}; TEI's ONNX loading steps replayed in Python (toolkit's tests)"),
        "model_optimized.onnx": ("fused", "Optimum `ORTModelForSequenceClassification` (ONNX Runtime's fused "
                                 "operators, CPU and CUDA): not a file name transformers.js looks for", "ONNX Runtime"),
        "model_quantized.onnx": ("INT8", 'Optimum `ORTModelForSequenceClassification`, transformers.js (`dtype: "q8"`, '
                                 "Node's onnxruntime-node; its INT8 operators are ONNX Runtime contrib operators)",
                                 f"ONNX Runtime; {js}"),
    }  # fmt: skip
    for name in sorted(onnx, key=lambda n: list(described).index(n) if n in described else len(described)):
        kind, where, tested = described.get(name, ("", "Optimum `ORTModelForSequenceClassification`", "ONNX Runtime"))
        rows.append((f"`onnx/{name}`" + (f" ({kind})" if kind else ""), where, tested))
    if any(output.get("format") == "openvino" for _, output in graphs):
        rows.append(("`openvino/`", 'optimum-intel `OVModelForSequenceClassification` (`subfolder="openvino"`)',
                     "OpenVINO"))  # fmt: skip
    table = ["| File | Runs in | Checked with |", "|---|---|---|", *(f"| {a} | {b} | {c} |" for a, b, c in rows)]
    cuts = [
        "Texts longer than the run's max_length: transformers' `pipeline` cuts them only when asked "
        "(`pipeline(..., truncation=True)`; the tokenizer's `model_max_length` is the run's max_length); "
        "transformers.js always cuts, but after adding the special tokens, so a cut text loses its closing "
        "separator token and scores slightly differently (same class on every text of toolkit's check)."
    ]
    return "\n".join([*table, "", *root_lines(manifest, artifact), "", *cuts])


def root_lines(manifest: Manifest, artifact: Artifact) -> list[str]:
    """What the card says about the root's pruned heads: zero-filled, and how close it answered."""
    evaluation = (manifest.stage(pytorch_root(manifest, artifact) or "") or {}).get("evaluation") or {}
    stock = evaluation.get("stock_load")
    if not stock:
        return []
    heads = sum(len(h) for h in stock["zero_filled_heads"].values())
    return [
        f"The root keeps every attention head: the {heads} heads pruning removed are there as zeros (listed under "
        "`toolkit_pruned_heads` in its config.json), which adds nothing to the output and lets every transformers "
        f"version load it. Loaded that way it answered the {stock['n']:,} evaluation texts as the compact model "
        f"did: {100 * stock['agreement']:.2f} % the same class, largest logit difference {stock['max_abs_diff']:.1e}."
        + (" The graphs under `onnx/` are the compact, fast ones." if lineage(manifest, artifact) else "")
    ]


# Where pip puts an installed package's files: `package:NAME/path` in a recipe.
PACKAGE_DIRS = ("site-packages", "dist-packages")


def portable(value: Any, manifest: Manifest) -> Any:
    """The recorded recipe (`value`: it or a part of it) with no absolute local path, which would say nothing on
    the Hub and show the machine's folders: a file of an installed package as `package:NAME/path`, as a recipe
    names it, any other path relative to the run folder."""
    if isinstance(value, dict):
        return {key: portable(item, manifest) for key, item in value.items()}
    if isinstance(value, list):
        return [portable(item, manifest) for item in value]
    if not isinstance(value, str) or not Path(value).is_absolute():
        return value
    parts = Path(value).parts
    inside = [i for i, part in enumerate(parts[:-1]) if part in PACKAGE_DIRS]
    if inside:
        return PACKAGE_PREFIX + "/".join(parts[inside[-1] + 1 :])
    run_dir = (manifest.data.get("recipe") or {}).get("output", {}).get("dir") or manifest.run_dir.resolve()
    return Path(os.path.relpath(value, run_dir)).as_posix()


def data_source(recipe: dict) -> str:
    """Where the recipe's texts came from: a Hub dataset (and its subset), a saved folder, or the files."""
    data = recipe.get("data") or {}
    if data.get("format") in ("hub", "disk"):
        return str(data.get("path")) + (f" ({data['subset']})" if data.get("subset") else "")
    return ", ".join(str(data[split]) for split in ("train", "validation", "test") if data.get(split)) or "?"


def model_card(manifest: Manifest, artifact: Artifact, repo_id: str) -> str:
    from toolkit.report import serving_lines

    data = manifest.data.get("data", {})
    labels = data.get("label_names", [])
    recipe = portable(manifest.data.get("recipe", {}), manifest)
    onnx = artifact.format == "onnx"
    selection = manifest.data.get("selection", {})
    loader = (
        "from optimum.intel import OVModelForSequenceClassification\n"
        f'model = OVModelForSequenceClassification.from_pretrained("{repo_id}", subfolder="openvino")'
        if artifact.format == "openvino"
        else "from optimum.onnxruntime import ORTModelForSequenceClassification\n"
        f'model = ORTModelForSequenceClassification.from_pretrained("{repo_id}", subfolder="onnx", '
        f'file_name="{onnx_file_name(manifest, artifact.stage)}")'
        if onnx
        else "from transformers import AutoModelForSequenceClassification\n"
        f'model = AutoModelForSequenceClassification.from_pretrained("{repo_id}")'
    )
    return f"""---
{card_data(manifest, artifact, repo_id).to_yaml()}
---

# {repo_id.split("/")[-1]}

Text classification ({len(labels)} labels: {", ".join(f"`{n}`" for n in labels)}), built by toolkit from the recipe
`{recipe.get("name", "?")}`. Selected stage: `{artifact.stage}` ({artifact.format}); {selection.get("reason", "")}.

## Data

Source: `{data_source(recipe)}`. Examples per split: {json.dumps(data.get("counts", {}))}.

## Figures per stage

Evaluated on the `{recipe.get("evaluate", {}).get("split", "test")}` split; parity is the argmax agreement with the
stage's input model; speed is single-text latency and batched throughput on the machine that ran the recipe.

{stage_table(manifest)}

{" ".join(serving_lines(manifest))}

## Use

```python
from transformers import AutoTokenizer
{loader}
tokenizer = AutoTokenizer.from_pretrained("{repo_id}")
inputs = tokenizer(["what a great film"], truncation=True, max_length={recipe.get("model", {}).get("max_length", 128)}, return_tensors="pt")
print(model.config.id2label[int(model(**inputs).logits.argmax(-1)[0])])
```

With the toolkit service (BentoML): package the model (`package` stage), then `bentoml serve` in the toolkit
project and

```bash
curl -X POST http://127.0.0.1:3000/classify -H 'Content-Type: application/json' -d '{{"text": "what a great film"}}'
```

## Where each file runs

{where_files_run(manifest, artifact)}

## Recipe

Local paths are relative to the run folder; files of an installed package are named `package:NAME/path`.

```yaml
{yaml.safe_dump(recipe, sort_keys=False).strip()}
```
"""
