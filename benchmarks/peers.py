"""The same student on every backend this machine has, and the teacher, side by side.

    python benchmarks/peers.py runs/full [--threads 2] [--rounds 5] [--alternating-rounds 3] [--json rows.json]

RUN_DIR is a finished run of `recipes/full.yaml` (train ... distill, export, optimize, quantize). Rows: the PyTorch
teacher (`train`), the student (`distill`) as PyTorch FP32, ONNX Runtime FP32 (`export`) and optimized FP32
(`optimize`), ORT INT8 (the run's `quantize`), ORT's plain dynamic INT8 (per-tensor weights and embedding table,
no SmoothQuant) and static INT8 (per-channel minmax, the stage's defaults otherwise), both made here by the
`quantize` stage from `optimize`, OpenVINO FP32 and NNCF INT8 (made here by the `openvino` stage from
`export`, or the run's own when it has them), and the run's INT8 made again without token packing. Accuracy and
agreement with the student's FP32 graph on the test split; batch-1 p50 and batch-32 throughput timed side by side
(each model in turn, round after round), with tokenisation, through `toolkit.runtime`, the service's path. One
table, labelled with the CPU model and date. A second table times the INT8 models' batch-32 graph calls alone,
alternating every 16 calls (`--alternating-rounds`, 0 to skip): the steadier ratio on a VM whose speed drifts.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from toolkit.config import OpenVinoConfig, QuantizeConfig, SpeedConfig  # noqa: E402
from toolkit.data import PreparedData  # noqa: E402
from toolkit.evaluation import SETTLE_SECONDS, settle, side_by_side  # noqa: E402
from toolkit.manifest import Artifact, Manifest  # noqa: E402
from toolkit.runtime import cpu_model, load_model  # noqa: E402
from toolkit.stages import openvino, quantize  # noqa: E402
from toolkit.stages.base import StageContext  # noqa: E402


def stage_path(manifest: Manifest, name: str) -> Path | None:
    entry = manifest.stage(name) or {}
    return Path(entry["output"]["path"]) if entry.get("status") == "done" else None


def made_here(kind: str, cfg, source: Path, data: PreparedData, max_length: int, tmp: Path) -> Path:
    out = tmp / kind
    out.mkdir()
    ctx = StageContext(run_dir=tmp, out_dir=out, source=Artifact(source, "onnx", source.name), data=data,
                       device="cpu", max_length=max_length)  # fmt: skip
    (quantize if kind.startswith("ort") else openvino).run(cfg, ctx)
    return out


def int8_label(manifest: Manifest) -> str:
    info = (manifest.stage("quantize") or {}).get("info", {})
    smooth = info.get("smooth_quant")
    return f"{info.get('mode', 'dynamic')} INT8" + (f" + SmoothQuant {smooth['alpha']}" if smooth else "")


def models_of(run: Path, manifest: Manifest, data: PreparedData, max_length: int, tmp: Path) -> list[tuple]:
    """(row name, folder, format) for every row the run and this machine can give."""
    rows = [("teacher, PyTorch FP32", stage_path(manifest, "train"), "pytorch"),
            ("student, PyTorch FP32", stage_path(manifest, "distill"), "pytorch"),
            ("student, ORT FP32", stage_path(manifest, "export"), "onnx"),
            ("student, ORT FP32 optimized", stage_path(manifest, "optimize"), "onnx"),
            (f"student, ORT {int8_label(manifest)} (the run's)", stage_path(manifest, "quantize"), "onnx")]  # fmt: skip
    optimized, exported = stage_path(manifest, "optimize"), stage_path(manifest, "export")
    run_cfg = (manifest.stage("quantize") or {}).get("config")
    if run_cfg and run_cfg.get("pack_tokens", True):
        # The run's INT8 without token packing: what packing gains at batch 32 and costs at batch 1.
        defaults = QuantizeConfig(type="quantize").model_dump()  # only what the run changed: options cross-check
        changed = {k: v for k, v in run_cfg.items() if v != defaults.get(k)}
        unpacked = QuantizeConfig(**{**changed, "type": "quantize", "pack_tokens": False})
        rows.append(("student, ORT INT8 (the run's), not packed",
                     made_here("ort-unpacked", unpacked, optimized, data, max_length, tmp), "onnx"))  # fmt: skip
    # ONNX Runtime's quantizer as it comes: one scale per weight matrix and per embedding table, no smoothing.
    plain = QuantizeConfig(
        type="quantize", smooth_quant=None, per_channel=False, embeddings="int8", activation_scales="per_call"
    )
    rows.append(("student, ORT dynamic INT8, plain", made_here("ort-plain", plain, optimized, data, max_length, tmp),
                 "onnx"))  # fmt: skip
    static = QuantizeConfig(type="quantize", mode="static", per_channel=True)
    rows.append(("student, ORT static INT8", made_here("ort-static", static, optimized, data, max_length, tmp), "onnx"))
    for quant, label in (("none", "FP32"), ("int8", "NNCF INT8")):
        cfg = OpenVinoConfig(type="openvino", quantize=quant)
        rows.append((f"student, OpenVINO {label}", made_here(f"ov-{quant}", cfg, exported, data, max_length, tmp),
                     "openvino"))  # fmt: skip
    return [row for row in rows if row[1] is not None]


def alternating_calls(models: dict, texts: list[str], rounds: int, block: int = 16, size: int = 32) -> dict:
    """Batch-32 texts/s per round from graph calls alone (tokenised and bucketed beforehand, as the runtime cuts
    them), the models taking turns every `block` calls in a random order: a slow spell of this VM falls on all of
    them, so the ratios hold where whole-model rounds drift. Each block opens with `SETTLE_SECONDS` of the
    model's own calls, untimed (the previous model's threads may still spin). One untimed pass first (OpenVINO
    compiles each new input shape on its first call)."""
    from toolkit.runtime.model import bucketed

    calls = {}
    for name, model in models.items():
        batches = [model.tokenizer(texts[i : i + size]) for i in range(0, len(texts), size)]
        calls[name] = [call for batch in batches for _, call in bucketed(batch)]
        for call in calls[name]:
            model.run(call)
    count = min(len(c) for c in calls.values())
    seconds = {name: np.zeros(rounds) for name in models}
    order = np.random.default_rng(0)
    for r in range(rounds):
        for start in range(0, count, block):
            for name in order.permutation(list(models)):
                settle(models[name].run, calls[name][start], SETTLE_SECONDS)
                began = time.perf_counter()
                for call in calls[name][start : start + block]:
                    models[name].run(call)
                seconds[name][r] += time.perf_counter() - began
    return {name: (len(texts) / s).tolist() for name, s in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--alternating-rounds", type=int, default=3, help="0: no graph-call table")
    args = parser.parse_args()
    manifest = Manifest.load(args.run)
    data = PreparedData(args.run / "data", manifest.data["data"]["label_names"], manifest.data["data"]["fingerprint"])
    max_length = int(manifest.data["recipe"]["model"]["max_length"])
    texts, labels = data.texts("test"), data.labels("test")
    with tempfile.TemporaryDirectory() as tmp:
        rows = models_of(args.run, manifest, data, max_length, Path(tmp))
        models = {name: load_model(path, fmt, max_length, args.threads, "cpu") for name, path, fmt in rows}
        ids = {name: model.logits_batched(texts, 64).argmax(1) for name, model in models.items()}
        speed = SpeedConfig(
            threads=args.threads, latency_samples=300 * args.rounds, throughput_samples=1024 * args.rounds
        )
        timing = side_by_side({name: model.logits for name, model in models.items()}, texts, speed, args.rounds)
        int8 = {name: model for name, model in models.items() if "INT8" in name}
        alternating = alternating_calls(int8, texts, args.alternating_rounds) if args.alternating_rounds else {}
    reference, teacher = ids["student, ORT FP32"], timing["teacher, PyTorch FP32"]
    print(f"CPU: {cpu_model()}, {datetime.date.today()}, {args.threads} threads, {len(texts)} test texts, "
          f"{args.rounds} rounds side by side (run: {args.run})")  # fmt: skip
    print(f"{'model':<40} {'accuracy':>8} {'agree FP32':>10} {'b1 p50 ms':>9} {'b32 /s':>7} {'x b1':>6} {'x b32':>6}")
    out = []
    for name in models:
        t = timing[name]
        row = {"model": name, "accuracy": float(np.mean(ids[name] == labels)),
               "agreement_fp32": float(np.mean(ids[name] == reference)), "latency_p50_ms": t["latency_p50_ms"],
               "throughput_per_s": t["throughput_per_s"], "load": t["load"]}  # fmt: skip
        out.append(row)
        print(f"{name:<40} {row['accuracy']:>8.2%} {row['agreement_fp32']:>10.2%} {t['latency_p50_ms']:>9.2f} "
              f"{t['throughput_per_s']:>7.0f} {teacher['latency_p50_ms'] / t['latency_p50_ms']:>6.1f} "
              f"{t['throughput_per_s'] / teacher['throughput_per_s']:>6.1f}")  # fmt: skip
    if alternating:
        base = next((n for n in alternating if "OpenVINO" in n), next(iter(alternating)))
        print(f"\nbatch 32, graph calls only, models alternating every 16 calls ({args.alternating_rounds} rounds); "
              f"texts/s per round, and over {base!r} per round:")  # fmt: skip
        for name, rates in alternating.items():
            ratios = np.array(rates) / np.array(alternating[base])
            print(f"{name:<40} {' '.join(f'{x:>6.0f}' for x in rates)}   x {' '.join(f'{x:.2f}' for x in ratios)} "
                  f"(median {np.median(ratios):.2f})")  # fmt: skip
    busy = [r["model"] for r in out if (r["load"] or {}).get("busy")]
    print(f"load: {'BUSY during ' + ', '.join(busy) if busy else 'no other process took a core while timing'}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "cpu": cpu_model(),
                    "date": str(datetime.date.today()),
                    "rows": out,
                    "alternating_graph_calls_b32": alternating,
                },
                indent=2,
            )  # fmt: skip
        )


if __name__ == "__main__":
    main()
