"""Dynamic against static INT8, and how a dynamic INT8 model's answers depend on what else is in its call.

    python benchmarks/int8_modes.py runs/full

RUN_DIR is a finished run with `optimize` and `quantize` stages (`recipes/full.yaml`). The run's own `quantize`
(dynamic) is measured as it is; static variants are made here by the `quantize` stage function from the
`optimize` graph, calibrated on the run's training texts. Every model runs through `toolkit.runtime` on the test
split with the same threads. Prints two tables, labelled with the CPU model and the date.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from toolkit.config import QuantizeConfig  # noqa: E402
from toolkit.manifest import Artifact, Manifest  # noqa: E402
from toolkit.runtime import load_model  # noqa: E402
from toolkit.stages import quantize  # noqa: E402
from toolkit.stages.base import StageContext  # noqa: E402

STATIC = [("minmax", False), ("minmax", True), ("percentile", False), ("percentile", True)]


def run_data(run: Path):
    from toolkit.data import PreparedData

    manifest = Manifest.load(run)
    data = PreparedData(run / "data", manifest.data["data"]["label_names"], manifest.data["data"]["fingerprint"])
    return manifest, data


def speed(model, texts: list[str]) -> tuple[float, float]:
    """Batch-1 p50 in ms over 300 texts, and texts/s in calls of 32 over 1,024."""
    latencies = []
    for text in texts[:300]:
        start = time.perf_counter()
        model.logits([text])
        latencies.append(time.perf_counter() - start)
    start = time.perf_counter()
    model.logits_batched(texts[:1024], 32)
    return float(np.median(latencies) * 1000), 1024 / (time.perf_counter() - start)


def composition(model, texts: list[str], labels: np.ndarray) -> list[str]:
    """Accuracy and agreement with each text alone, for calls padded to their longest or length-bucketed."""
    alone = model.logits_batched(texts, 1).argmax(1)
    rows = [f"  each text alone: accuracy {np.mean(alone == labels):.2%}"]
    for size in (32, 64):
        for buckets in (False, True):
            model.buckets = buckets
            ids = model.logits_batched(texts, size).argmax(1)
            kind = "length-bucketed" if buckets else "padded to the longest"
            rows.append(f"  calls of {size}, {kind}: accuracy {np.mean(ids == labels):.2%}, "
                        f"same class as alone {np.mean(ids == alone):.2%}")  # fmt: skip
    model.buckets = True
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from toolkit.runtime import cpu_model

    manifest, data = run_data(args.run)
    texts, labels = data.texts("test"), data.labels("test")
    fp32_path = Path(manifest.stage("optimize")["output"]["path"])
    fp32 = load_model(fp32_path, "onnx", data_max_length(manifest), args.threads, "cpu").logits_batched(texts, 64)
    print(f"CPU: {cpu_model()}, {datetime.date.today()}, {args.threads} threads, {len(texts)} test texts")
    print(f"FP32 (optimize): accuracy {np.mean(fp32.argmax(1) == labels):.2%}\n")
    print(
        f"{'INT8 model':<36} {'acc':>7} {'agree FP32':>10} {'alone=call':>10} {'b1 p50 ms':>9} {'b32 /s':>7} {'calib s':>7}"
    )
    models = [("dynamic (the run's quantize)", Path(manifest.stage("quantize")["output"]["path"]), None)]
    with tempfile.TemporaryDirectory() as tmp:
        for method, per_channel in STATIC:
            out = Path(tmp) / f"{method}-{per_channel}"
            out.mkdir()
            ctx = StageContext(run_dir=Path(tmp), out_dir=out, source=Artifact(fp32_path, "onnx", "optimize"),
                               data=data, device="cpu", max_length=data_max_length(manifest))  # fmt: skip
            cfg = QuantizeConfig(type="quantize", mode="static", calibration_method=method, per_channel=per_channel)
            info = quantize.run(cfg, ctx).info
            name = f"static, {method}{', per channel' if per_channel else ''}"
            models.append((name, out, info["calibration"]["seconds"]))
        for name, path, calib in models:
            model = load_model(path, "onnx", data_max_length(manifest), args.threads, "cpu")
            ids = model.logits_batched(texts, 64).argmax(1)
            alone = model.logits_batched(texts[:400], 1).argmax(1)
            p50, tput = speed(model, texts)
            print(f"{name:<36} {np.mean(ids == labels):>7.2%} {np.mean(ids == fp32.argmax(1)):>10.2%} "
                  f"{np.mean(alone == ids[:400]):>10.2%} {p50:>9.2f} {tput:>7.0f} {calib or '':>7}")  # fmt: skip
        print("\nthe dynamic model, by call composition:")
        dynamic = load_model(models[0][1], "onnx", data_max_length(manifest), args.threads, "cpu")
        for line in composition(dynamic, texts, labels):
            print(line)


def data_max_length(manifest: Manifest) -> int:
    return int(manifest.data["recipe"]["model"]["max_length"])


if __name__ == "__main__":
    main()
