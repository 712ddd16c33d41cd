"""Compatibility tested, not assumed: a repo that `toolkit push --local-dir` wrote, loaded by the loaders its
users run, each against what toolkit itself answers on the same texts.

- transformers 5 (`TESTED_TRANSFORMERS_5`) in a side venv (`side_env`, `.venv-tf5`: plain `python -m venv`, so
  neither toolkit nor the main venv's transformers 4 is visible there): `AutoModelForSequenceClassification`
  and `pipeline` on the repo root (the PyTorch ancestor), against toolkit's runtime on that stage.
- transformers.js (`TESTED_TRANSFORMERS_JS`, pinned in tests/js/package.json) in Node: `dtype: "q8"` reads
  `onnx/model_quantized.onnx`, against `toolkit predict` (the run's INT8 selection); `dtype: "fp32"` reads
  `onnx/model.onnx`, against toolkit's export stage.

`tests/test_compat.py` runs it on a tiny head-pruned run; for a real run:
`python tests/compat.py PUSHED_DIR RUN_DIR` (or `python -m tests.compat ...`) from the repo root prints the table.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

# The versions this check runs against live beside the model card that names them.
from toolkit.hub import TESTED_TRANSFORMERS_5

TORCH = "2.13.0"  # the local CPU wheel (pip's find-links); an unpinned torch would pull the CUDA build

PINS = {"torch": TORCH, "transformers": TESTED_TRANSFORMERS_5}

ROOT = Path(__file__).resolve().parents[1]
JS_DIR = ROOT / "tests" / "js"
SIDE_ENV = ROOT / ".venv-tf5"
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

# Run by the side env's python on {"model_dir", "texts"} (stdin); its last stdout line is the JSON answer.
SIDE_SCRIPT = """
import importlib.util, json, sys
import huggingface_hub, torch, transformers
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

request = json.load(sys.stdin)
folder, texts = request["model_dir"], request["texts"]
tokenizer = AutoTokenizer.from_pretrained(folder)
model, loading = AutoModelForSequenceClassification.from_pretrained(folder, output_loading_info=True)
with torch.inference_mode():
    logits = model.eval()(**tokenizer(texts, padding=True, truncation=True, return_tensors="pt")).logits
classify = pipeline("text-classification", model=folder, device="cpu")
print(json.dumps({
    "transformers": transformers.__version__,
    "huggingface_hub": huggingface_hub.__version__,
    "torch": torch.__version__,
    "sees_toolkit": importlib.util.find_spec("toolkit") is not None,
    "loading": {k: sorted(map(str, v)) for k, v in loading.items()},
    "logits": logits.tolist(),
    "pipeline": [r["label"] for r in classify(texts, truncation=True)],
}))
"""


def _run(cmd: list[str], timeout: int, **kwargs) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    if done.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return done.stdout


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without what would let a child see toolkit or this venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return {**env, **OFFLINE, **extra}


def _installed(python: Path) -> dict[str, str]:
    probe = f"import importlib.metadata as m, json; print(json.dumps({{p: m.version(p) for p in {tuple(PINS)}}}))"
    try:
        return json.loads(_run([str(python), "-I", "-c", probe], 120, env=_clean_env()))
    except (RuntimeError, json.JSONDecodeError):
        return {}


def side_env(root: Path = SIDE_ENV) -> Path:
    """The python of a venv with torch `TORCH` and transformers `TESTED_TRANSFORMERS_5` (huggingface_hub as pip
    resolves it), made once and reused while it has those versions. A plain venv of this interpreter's base
    Python: no system site packages, not toolkit, not the main venv's transformers."""
    python = root / "bin" / "python"
    if python.exists() and {k: v.split("+")[0] for k, v in _installed(python).items()} == PINS:
        return python
    if not python.exists():
        base = getattr(sys, "_base_executable", None) or sys.executable
        _run([base, "-m", "venv", "--clear", str(root)], 300)
    pins = [f"{name}=={version}" for name, version in PINS.items()]
    _run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *pins], 1800, env=_clean_env())
    return python


def transformers5_logits(pushed_dir: Path, texts: list[str], python: Path | None = None) -> dict:
    """transformers 5 in the side env on the pushed repo's root: versions, `loading` (missing, unexpected and
    mismatched keys), `logits` of `AutoModelForSequenceClassification` (padding, truncation as toolkit does)
    and the `pipeline("text-classification")` labels."""
    python = python or side_env()
    request = json.dumps({"model_dir": str(Path(pushed_dir).resolve()), "texts": texts})
    with tempfile.TemporaryDirectory() as cwd:  # -I and a bare cwd: nothing of this repo on sys.path
        out = _run([str(python), "-I", "-c", SIDE_SCRIPT], 900, input=request, cwd=cwd, env=_clean_env())
    answer = json.loads(out.strip().splitlines()[-1])
    answer["logits"] = np.asarray(answer["logits"], dtype=np.float32)
    return answer


def js_modules() -> Path:
    """tests/js/node_modules, installed from the committed lock file when missing."""
    if not (JS_DIR / "node_modules" / "@huggingface" / "transformers").is_dir():
        if not shutil.which("npm"):
            raise RuntimeError("npm is not installed: transformers.js cannot be checked")
        cmd = ["npm", "ci", "--no-audit", "--no-fund"]
        _run(cmd, 900, cwd=JS_DIR, env={**os.environ, "ONNXRUNTIME_NODE_INSTALL_CUDA": "skip"})
    return JS_DIR / "node_modules"


def transformers_js_classes(pushed_dir: Path, texts: list[str], dtype: str) -> dict:
    """transformers.js's text-classification pipeline on the pushed repo (`dtype` q8: the INT8 graph, fp32: the
    export): its version, the `files` it read, and per text the `labels` and `scores` (label -> probability)."""
    js_modules()
    request = json.dumps({"model_dir": str(Path(pushed_dir).resolve()), "dtype": dtype, "texts": texts})
    out = _run(["node", str(JS_DIR / "classify.mjs")], 600, input=request, cwd=JS_DIR)
    head, *rows = (json.loads(line) for line in out.strip().splitlines())
    return {**head, "labels": [r["label"] for r in rows], "scores": [r["scores"] for r in rows]}


def toolkit_answers(run_dir: Path, texts: list[str], stage: str | None = None) -> dict:
    """What toolkit's runtime answers for the selected stage (or `stage`) and its chain: `stages` maps each of
    `selected`, `root` (the PyTorch ancestor, the repo root) and `export` (the FP32 graph, when the chain has
    one) to its stage name, and `logits` maps each stage name to its logits; `labels`: the class names;
    `truncated`: per text, whether it has more tokens than the run's max_length (special tokens included)."""
    from tokenizers import Tokenizer

    from toolkit.hub import lineage, pytorch_root
    from toolkit.manifest import Artifact, Manifest
    from toolkit.runtime import load_model

    manifest = Manifest.load(Path(run_dir), writable=False)
    selected = stage or manifest.selection["stage"]
    artifact = Artifact.from_json(manifest.stage(selected)["output"])
    exports = [name for name, _ in lineage(manifest, artifact) if manifest.stage(name).get("type") == "export"]
    root_stage = pytorch_root(manifest, artifact)
    stages = {"selected": selected, "root": root_stage} | ({"export": exports[0]} if exports else {})
    max_length = manifest.data["recipe"]["model"]["max_length"]
    logits = {}
    for name in dict.fromkeys(stages.values()):
        output = manifest.stage(name)["output"]
        logits[name] = load_model(output["path"], output["format"], max_length, 1, "cpu").logits(texts)
    root = Path(manifest.stage(root_stage)["output"]["path"])
    config = json.loads((root / "config.json").read_text(encoding="utf-8"))
    labels = [name for _, name in sorted((int(k), v) for k, v in config["id2label"].items())]
    tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    truncated = [len(e.ids) > max_length for e in tokenizer.encode_batch(texts)]
    return {"stages": stages, "logits": logits, "labels": labels, "truncated": truncated}


def toolkit_predict(run_dir: Path, texts: list[str]) -> list[str]:
    """The labels `toolkit predict RUN_DIR FILE` writes for `texts` (the run's selected model), through the CLI."""
    from toolkit.manifest import Manifest

    column = Manifest.load(Path(run_dir), writable=False).data["recipe"]["data"]["text_column"]
    with tempfile.TemporaryDirectory() as work:
        file, output = Path(work) / "texts.jsonl", Path(work) / "texts.predictions.tsv"
        file.write_text("".join(json.dumps({column: t}) + "\n" for t in texts), encoding="utf-8")
        cmd = [sys.executable, "-m", "toolkit", "predict", str(run_dir), str(file), "--output", str(output)]
        _run(cmd, 900, env={**os.environ, **OFFLINE, "TQDM_DISABLE": "1"})
        rows = [line.split("\t") for line in output.read_text(encoding="utf-8").splitlines()[1:]]
    return [row[1] for row in rows]


def compare(pushed_dir: Path, run_dir: Path, texts: list[str]) -> dict:
    """Every loader against toolkit on `texts`: the answers of each, and the agreement figures."""
    result = {
        "texts": texts,
        "toolkit": toolkit_answers(run_dir, texts),
        "predict": toolkit_predict(run_dir, texts),
        "transformers5": transformers5_logits(pushed_dir, texts),
        "js_q8": transformers_js_classes(pushed_dir, texts, "q8"),
        "js_fp32": transformers_js_classes(pushed_dir, texts, "fp32"),
    }
    return result | {"figures": figures(result)}


def figures(result: dict) -> dict:
    """Each loader against toolkit: texts of the same class (`*_agree`), the largest logit (transformers 5) or
    probability (transformers.js, against toolkit's runtime on the same graph) difference; the fp32 figures
    are None without an export stage."""
    from toolkit.runtime import softmax

    own = result["toolkit"]
    names, stages, tf5 = own["labels"], own["stages"], result["transformers5"]
    root, export = own["logits"][stages["root"]], own["logits"].get(stages.get("export"))

    def agree(labels: list[str], logits: np.ndarray) -> int:
        return sum(a == names[i] for a, i in zip(labels, logits.argmax(-1), strict=True))

    def prob_diff(js: dict, logits: np.ndarray, truncated: bool) -> float | None:
        """Over the texts that fit max_length (or those cut): transformers.js truncates after adding the special
        tokens, so a cut text loses its final [SEP] there, not in transformers and toolkit."""
        rows = [i for i, cut in enumerate(own["truncated"]) if cut == truncated]
        if not rows:
            return None
        js_probs = np.array([[js["scores"][i][n] for n in names] for i in rows])
        return float(np.abs(js_probs - softmax(logits[rows])).max())

    q8, fp32 = result["js_q8"], result["js_fp32"]
    return {
        "tf5_max_logit_diff": float(np.abs(tf5["logits"] - root).max()),
        "tf5_argmax_agree": int((tf5["logits"].argmax(-1) == root.argmax(-1)).sum()),
        "tf5_pipeline_agree": agree(tf5["pipeline"], root),
        "js_q8_agree": sum(a == b for a, b in zip(q8["labels"], result["predict"], strict=True)),
        "js_fp32_agree": None if export is None else agree(fp32["labels"], export),
    } | {
        f"js_{dtype}_max_prob_diff{suffix}": None if logits is None else prob_diff(js, logits, cut)
        for dtype, js, logits in (("q8", q8, own["logits"][stages["selected"]]), ("fp32", fp32, export))
        for suffix, cut in (("", False), ("_truncated", True))
    }


def table(result: dict) -> str:
    """The comparison as a Markdown table, with the versions, the CPU and the date."""
    from toolkit.runtime import cpu_model

    n, f, stages = len(result["texts"]), result["figures"], result["toolkit"]["stages"]
    tf5, cut = result["transformers5"], sum(result["toolkit"]["truncated"])

    def js(dtype: str, against: str) -> str:
        got, agree = result[f"js_{dtype}"], f[f"js_{dtype}_agree"]
        graphs = ", ".join(name for name in got["files"] if name.endswith(".onnx"))
        fit, long = f[f"js_{dtype}_max_prob_diff"], f[f"js_{dtype}_max_prob_diff_truncated"]
        diff = "-" if fit is None else f"{fit:.2e} (probability)"
        diff += "" if long is None else f"; {long:.2e} on the {cut} truncated"
        same = "-" if agree is None else f"{agree}/{n}"
        return f"| transformers.js {got['transformers_js']} {dtype} ({graphs}) | {against} | {diff} | {same} |"

    rows = [
        "| loader | against | max abs diff | same class |",
        "|---|---|---|---|",
        f"| transformers {tf5['transformers']} AutoModelForSequenceClassification | toolkit's PyTorch root "
        f"({stages['root']}) | {f['tf5_max_logit_diff']:.2e} (logit) | {f['tf5_argmax_agree']}/{n} |",
        f"| transformers {tf5['transformers']} pipeline | toolkit's PyTorch root | - | {f['tf5_pipeline_agree']}/{n} |",
        js("q8", f"`toolkit predict` ({stages['selected']})"),
        js("fp32", f"toolkit's export graph ({stages.get('export', 'none')})"),
    ]
    notes = [
        f"side env: transformers {tf5['transformers']}, huggingface_hub {tf5['huggingface_hub']}, "
        f"torch {tf5['torch']}; loading report {tf5['loading']}",
        f"CPU: {cpu_model()}; {datetime.date.today().isoformat()}; {n} texts, {cut} beyond max_length",
    ]
    return "\n".join(rows + [""] + notes)


# Varied texts for a toy sentiment model: one word, a long one (beyond a short max_length: truncation), mixed,
# punctuation, capitals, digits, non-ASCII.
TEXTS = [
    "good",
    "awful",
    "the movie was great",
    "the plot was poor and the actor was dull",
    "a superb story and a lovely film",
    "it was very bad",
    "Brilliant!",
    "TERRIBLE, TERRIBLE acting.",
    "the film is a story",
    "great actor, terrible plot",
    "lovely lovely lovely but dull",
    "10/10 would watch again",
    "电影 很 好 看",
    "the movie was the story and the plot was the actor and it was a film and it is very very long "
    "so the tokenizer has to cut it well before this good ending",
    "it is the plot",
    "not bad at all",
]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (2, 3):
        print(
            "usage: python tests/compat.py PUSHED_DIR RUN_DIR [TEXTS]\n  PUSHED_DIR: from `toolkit push RUN_DIR "
            "--repo-id USER/NAME --local-dir PUSHED_DIR`; TEXTS: a file of texts, one a line (default: 16 toy ones)"
        )
        return 2
    texts = Path(argv[2]).read_text(encoding="utf-8").splitlines() if len(argv) == 3 else TEXTS
    print(table(compare(Path(argv[0]), Path(argv[1]), [t for t in texts if t.strip()])))
    return 0


if __name__ == "__main__":
    if str(ROOT) not in sys.path:  # `python tests/compat.py` puts tests/ first, not the repo root
        sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
