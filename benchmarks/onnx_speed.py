"""PyTorch FP32 vs ONNX FP32 vs O2-fused vs INT8 of the same model, in one process on this machine.

Takes a run folder of `toolkit run` whose recipe has train -> export -> optimize -> quantize (recipes/ci.yaml or
full.yaml) and times each model on the run's real test texts at batch 1 (p50/p95 latency) and batch 32
(texts/s), at sequence lengths 32/128/512. For a length L every input is exactly L tokens: consecutive test
texts are joined until they reach L and then truncated, so the longer settings are real text too. Variants are
interleaved per setting so that load from other processes spreads over all of them. Accuracy is on the test
split at the recipe's max_length, as in the run.

    flock /tmp/toolkit-heavy.lock python benchmarks/onnx_speed.py runs/ci
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's toolkit, not an installed one

from toolkit.data import PreparedData
from toolkit.manifest import Manifest
from toolkit.metrics import classification_metrics
from toolkit.runtime import load_model

VARIANTS = (("PyTorch FP32", "source"), ("ONNX FP32", "export"), ("ONNX O2", "optimize"), ("ONNX INT8", "quantize"))


def stage_paths(manifest: Manifest) -> dict[str, tuple[str, str]]:
    """label -> (artifact path, format): the first finished stage of each ONNX type, and as "PyTorch FP32" the
    model the export was made from (the fine-tuned model, or the distilled student when the recipe distils), so
    every variant is the same network."""
    found: dict[str, tuple[str, str]] = {}
    for label, kind in VARIANTS[1:]:
        for _, entry in manifest.ordered():
            if entry.get("type") == kind and entry.get("status") in ("done", "failed_gate") and entry.get("output"):
                found[label] = (entry["output"]["path"], entry["output"]["format"])
                break
        else:
            raise SystemExit(f"the run has no finished `{kind}` stage; run recipes/ci.yaml (or full.yaml) first")
    export = next(e for _, e in manifest.ordered() if e.get("type") == "export" and e.get("output"))
    source = export["input"]
    found = {"PyTorch FP32": (source["path"], source["format"]), **found}
    return found


def texts_of_length(texts: list[str], tokenizer, length: int, count: int) -> list[str]:
    out, i = [], 0
    while len(out) < count:
        parts = []
        while tokenizer.count(" ".join(parts)) < length:
            parts.append(texts[i % len(texts)])
            i += 1
        out.append(" ".join(parts))
    return out


def time_batches(predictor, batches: list[list[str]], warmup: int) -> list[float]:
    for batch in batches[:warmup]:
        predictor.logits(batch)
    seconds = []
    for batch in batches:
        start = time.perf_counter()
        predictor.logits(batch)
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    manifest = Manifest.load(args.run_dir)
    meta = json.loads((args.run_dir / "data" / "meta.json").read_text())
    data = PreparedData(args.run_dir / "data", meta["label_names"], meta["fingerprint"])
    texts, labels = data.texts("test"), data.labels("test")
    max_length = manifest.data["recipe"]["model"]["max_length"]
    predictors = {
        label: load_model(path, fmt, max_length, args.threads, "cpu")
        for label, (path, fmt) in stage_paths(manifest).items()
    }
    results: dict[str, dict] = {label: {} for label in predictors}
    for label, predictor in predictors.items():
        logits = predictor.logits_batched(texts, 64)
        results[label]["accuracy"] = classification_metrics(logits.argmax(-1), labels, data.label_names)["accuracy"]
    tokenizer = next(iter(predictors.values())).tokenizer
    for length in args.lengths:
        singles = texts_of_length(texts, tokenizer, length, 40 if length < 512 else 16)
        bulk = texts_of_length(texts, tokenizer, length, args.batch_size * (4 if length < 512 else 2))
        batches = [bulk[i : i + args.batch_size] for i in range(0, len(bulk), args.batch_size)]
        for label, predictor in predictors.items():
            predictor.tokenizer.set_max_length(length)
            lat = np.asarray(time_batches(predictor, [[t] for t in singles], warmup=3)) * 1000
            bulk_s = time_batches(predictor, batches, warmup=1)
            results[label][length] = {
                "p50_ms": float(np.percentile(lat, 50)),
                "p95_ms": float(np.percentile(lat, 95)),
                "texts_per_s": len(bulk) / sum(bulk_s),
            }
            print(f"  L={length} {label}: p50 {results[label][length]['p50_ms']:.2f} ms", flush=True)
    report(results, args)


def report(results: dict[str, dict], args) -> None:
    print(f"\nmachine: {platform.machine()}, {args.threads} threads; batch {args.batch_size} for throughput")
    header = f"{'model':<14}{'accuracy':>9}" + "".join(
        f"{f'L={n} p50 ms':>14}{'p95':>8}{f'b{args.batch_size} /s':>9}" for n in args.lengths
    )
    print(header)
    for label, figs in results.items():
        cells = "".join(
            f"{figs[n]['p50_ms']:>14.2f}{figs[n]['p95_ms']:>8.2f}{figs[n]['texts_per_s']:>9.1f}" for n in args.lengths
        )
        print(f"{label:<14}{100 * figs['accuracy']:>8.2f}%{cells}")
    print("\nratios (higher is better for the first model named)")
    for a, b in (
        ("ONNX INT8", "ONNX FP32"),
        ("ONNX O2", "ONNX FP32"),
        ("ONNX FP32", "PyTorch FP32"),
        ("ONNX INT8", "PyTorch FP32"),
    ):
        cells = "  ".join(
            f"L={n}: b1 {results[b][n]['p50_ms'] / results[a][n]['p50_ms']:.2f}x, "
            f"b{args.batch_size} {results[a][n]['texts_per_s'] / results[b][n]['texts_per_s']:.2f}x"
            for n in args.lengths
        )
        print(f"{a} vs {b}: {cells}")
    base = results["PyTorch FP32"]["accuracy"]
    print(
        "accuracy change vs PyTorch FP32: "
        + ", ".join(f"{k} {100 * (v['accuracy'] - base):+.2f} pts" for k, v in results.items())
    )
    if args.json:
        args.json.write_text(json.dumps({k: {str(n): f for n, f in v.items()} for k, v in results.items()}, indent=2))


if __name__ == "__main__":
    main()
