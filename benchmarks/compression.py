"""Teacher vs compressed student, side by side in one process: accuracy, batch-1 latency, batch-32 throughput.

Reads a run folder made by `toolkit run recipes/full.yaml` (fine-tune -> prune -> distill [-> export ->
quantize]): the fine-tuned teacher (`train`, PyTorch FP32), the distilled student (`distill`, PyTorch FP32) and
the student as dynamic INT8 ONNX: the run's own quantized artifact when the recipe has one, otherwise made here
by the toolkit's export, optimize and quantize stages. Every model is timed with the same threads, texts and
warm-up.

    flock /tmp/toolkit-heavy.lock python benchmarks/compression.py --run runs/full
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from toolkit.config import SpeedConfig  # noqa: E402
from toolkit.data import PreparedData  # noqa: E402
from toolkit.evaluation import measure_speed, parity  # noqa: E402
from toolkit.runtime import InferenceModel, load_model, weights_size  # noqa: E402

TARGETS = {"accuracy_drop_points": 1.0, "speedup_batch1": 12.0, "speedup_batch32": 10.0}


def int8_student(run: Path, student: Path, work: Path, fuse: bool, data: PreparedData) -> tuple[Path, str]:
    """The run's quantized model if its recipe made one, else the student through the toolkit's own export,
    optimize and quantize stages here."""
    manifest = json.loads((run / "manifest.json").read_text())
    for name, entry in manifest.get("stages", {}).items():
        if entry.get("type") == "quantize" and entry.get("status") == "done" and entry.get("output"):
            return Path(entry["output"]["path"]), f"run stage {name!r}"
    from toolkit.stages.chain import int8_from_pytorch

    folder = int8_from_pytorch(student, work, fuse=fuse, data=data)
    steps = "export, optimize (O2), quantize" if fuse else "export, quantize"
    return folder, f"the {steps} stages with default options, here"


def depth(folder: Path) -> int:
    return json.loads((folder / "config.json").read_text())["num_hidden_layers"]


def measure(name: str, predictor: InferenceModel, data: PreparedData, speed: SpeedConfig) -> tuple[dict, np.ndarray]:
    texts = data.texts("test")
    logits = predictor.logits_batched(texts, 64)
    accuracy = float((logits.argmax(-1) == data.labels("test")).mean())
    timing = measure_speed(predictor.logits, texts, speed, predictor.threads)
    size = weights_size(Path(predictor.path))
    print(
        f"  {name}: accuracy {accuracy:.4f}, p50 {timing['latency_p50_ms']:.2f} ms, {timing['throughput_per_s']:.0f}/s"
    )
    row = {"model": name, "accuracy": accuracy, **timing, "size_mb": size / 1e6, "parameters": predictor.num_parameters}
    return row, logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "full")
    parser.add_argument("--teacher", default="train")
    parser.add_argument("--student", default="distill")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--latency-samples", type=int, default=300)
    parser.add_argument("--throughput-samples", type=int, default=1024)
    parser.add_argument("--no-fuse", action="store_true", help="quantize the plain export, without O2 fusion")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    speed = SpeedConfig(threads=args.threads, warmup=20, latency_samples=args.latency_samples,
                        throughput_batch_size=32, throughput_samples=args.throughput_samples)  # fmt: skip
    meta = json.loads((args.run / "data" / "meta.json").read_text())
    data = PreparedData(args.run / "data", meta["label_names"], meta["fingerprint"])
    student = args.run / args.student
    rows, outputs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        int8, origin = int8_student(args.run, student, Path(tmp), not args.no_fuse, data)
        print(f"INT8 student: {origin}")
        teacher_layers, student_layers = (depth(args.run / args.teacher), depth(student))
        for name, path, fmt in (
            (f"teacher {teacher_layers}L PyTorch FP32", args.run / args.teacher, "pytorch"),
            (f"student {student_layers}L PyTorch FP32", student, "pytorch"),
            (f"student {student_layers}L ONNX INT8", int8, "onnx"),
        ):
            predictor = load_model(path, fmt, args.max_length, args.threads, "cpu")
            row, logits = measure(name, predictor, data, speed)
            if outputs:
                # INT8 against FP32 student, FP32 student against teacher: what each step changed.
                row["parity_with_previous"] = parity(logits, outputs[-1])
                print(f"    argmax agreement with the row above: {row['parity_with_previous']['agreement']:.4f}")
            rows.append(row)
            outputs.append(logits)
            del predictor
    report(rows, args.threads, len(data.texts("test")))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


def report(rows: list[dict], threads: int, n: int) -> None:
    teacher = rows[0]
    print(f"\n{n} test texts, {threads} threads, max length 64; speed-ups against the PyTorch FP32 teacher")
    header = (
        f"{'model':32} {'acc %':>7} {'Δ pts':>7} {'b1 p50 ms':>10} {'b1 x':>6} {'b32 /s':>8} {'b32 x':>6} {'MB':>6}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        drop = (row["accuracy"] - teacher["accuracy"]) * 100
        b1 = teacher["latency_p50_ms"] / row["latency_p50_ms"]
        b32 = row["throughput_per_s"] / teacher["throughput_per_s"]
        row.update({"accuracy_delta_points": drop, "speedup_batch1": b1, "speedup_batch32": b32})
        print(f"{row['model']:32} {row['accuracy'] * 100:7.2f} {drop:+7.2f} {row['latency_p50_ms']:10.2f} {b1:6.1f} "
              f"{row['throughput_per_s']:8.0f} {b32:6.1f} {row['size_mb']:6.1f}")  # fmt: skip
    final = rows[-1]
    print("\ntargets (issue 4) for the INT8 student:")
    checks = [
        ("accuracy drop <= 1.0 point", -final["accuracy_delta_points"] <= TARGETS["accuracy_drop_points"]),
        ("batch-1 speed-up >= 12x", final["speedup_batch1"] >= TARGETS["speedup_batch1"]),
        ("batch-32 speed-up >= 10x", final["speedup_batch32"] >= TARGETS["speedup_batch32"]),
    ]
    for label, ok in checks:
        print(f"  {'met   ' if ok else 'MISSED'} {label}")


if __name__ == "__main__":
    main()
