"""What each part of the `quantize` defaults buys: plain ONNX Runtime dynamic INT8 against per-channel weights,
per-row INT8 embeddings and SmoothQuant at several strengths, on one run's student.

    python benchmarks/int8_smoothing.py runs/full [--alphas 0.5,0.75,0.9,1.0] [--rounds 10]

Every variant is made by the `quantize` stage function from the run's `optimize` graph, calibrated on the run's
training texts. Agreement with the FP32 graph on the validation split (what a default is chosen on) and on the
test split (what the run's gate reads), test accuracy, and batch-1 p50 / batch-32 texts/s timed side by side
(each model in turn, round after round, through `toolkit.runtime`). Labelled with the CPU model and date.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.int8_modes import data_max_length, run_data  # noqa: E402
from toolkit.config import QuantizeConfig, SpeedConfig  # noqa: E402
from toolkit.evaluation import side_by_side  # noqa: E402
from toolkit.manifest import Artifact  # noqa: E402
from toolkit.runtime import cpu_model, load_model  # noqa: E402
from toolkit.stages import quantize  # noqa: E402
from toolkit.stages.base import StageContext  # noqa: E402

FIXED = {
    "plain (ORT's defaults)": {"smooth_quant": None, "per_channel": False, "embeddings": "int8"},
    "per-channel weights": {"smooth_quant": None, "embeddings": "int8"},
    "per-channel + int8_rows embeddings": {"smooth_quant": None},
    "SmoothQuant 0.9, fp32 embeddings": {"embeddings": "fp32"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--alphas", default="0.5,0.75,0.9,1.0")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    manifest, data = run_data(args.run)
    length = data_max_length(manifest)
    source = Artifact(Path(manifest.stage("optimize")["output"]["path"]), "onnx", "optimize")
    splits = {split: data.texts(split) for split in ("validation", "test")}
    variants = dict(FIXED)
    variants.update({f"SmoothQuant {a} (+ per-channel, int8_rows)": {"smooth_quant": float(a)}
                     for a in args.alphas.split(",")})  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        models = {"FP32 (optimize)": load_model(source.path, "onnx", length, args.threads, "cpu")}
        for i, (name, options) in enumerate(variants.items()):
            out = Path(tmp) / str(i)
            out.mkdir()
            ctx = StageContext(run_dir=Path(tmp), out_dir=out, source=source, data=data, max_length=length)
            quantize.run(QuantizeConfig(type="quantize", **options), ctx)
            models[name] = load_model(out, "onnx", length, args.threads, "cpu")
        ids = {n: {s: m.logits_batched(t, 64).argmax(1) for s, t in splits.items()} for n, m in models.items()}
        speed = SpeedConfig(threads=args.threads, latency_samples=300 * args.rounds,
                            throughput_samples=1024 * args.rounds)  # fmt: skip
        timing = side_by_side({n: m.logits for n, m in models.items()}, splits["test"], speed, args.rounds)
    reference, labels = ids["FP32 (optimize)"], data.labels("test")
    print(f"CPU: {cpu_model()}, {datetime.date.today()}, {args.threads} threads, {args.rounds} rounds side by side, "
          f"{len(splits['validation'])} validation and {len(splits['test'])} test texts (run: {args.run})")  # fmt: skip
    print(f"{'INT8 variant':<44} {'agree val':>9} {'agree test':>10} {'accuracy':>8} {'b1 p50 ms':>9} {'b32 /s':>7}")
    for name in models:
        agree = {s: np.mean(ids[name][s] == reference[s]) for s in splits}
        t = timing[name]
        print(f"{name:<44} {agree['validation']:>9.2%} {agree['test']:>10.2%} "
              f"{np.mean(ids[name]['test'] == labels):>8.2%} {t['latency_p50_ms']:>9.2f} {t['throughput_per_s']:>7.0f}")  # fmt: skip
    busy = [n for n in models if (timing[n]["load"] or {}).get("busy")]
    print(f"load: {'BUSY during ' + ', '.join(busy) if busy else 'no other process took a core while timing'}")


if __name__ == "__main__":
    main()
