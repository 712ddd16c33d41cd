"""Which nodes of a dynamic INT8 student cost its agreement with FP32, and what keeping them in FP32 buys.

    python benchmarks/int8_sensitivity.py runs/full [--keep 6]

From the run's `optimize` graph (shape-inferred as `quantize` does): each MatMul/Attention/Gemm is quantized
alone and ranked by the mean |logit| change it causes on the validation texts; then the most sensitive nodes are
kept in FP32 one more at a time (everything else dynamic INT8, ONNX Runtime's `quantize_dynamic`, QInt8,
per tensor), and agreement with FP32 is printed on validation and test. Labelled with the CPU model and date.
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.int8_modes import data_max_length, run_data  # noqa: E402
from toolkit.runtime import cpu_model, load_model, onnx_file  # noqa: E402
from toolkit.stages.quantize import shape_inferred_copy  # noqa: E402


def quantized(inferred: Path, out: Path, exclude=(), only=()) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    shutil.copytree(inferred.parent, out, ignore=shutil.ignore_patterns("*.onnx"), dirs_exist_ok=True)
    quantize_dynamic(inferred, out / "model.onnx", weight_type=QuantType.QInt8, nodes_to_exclude=list(exclude),
                     nodes_to_quantize=list(only))  # fmt: skip
    return out


def main() -> None:
    import onnx

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--keep", type=int, default=6, help="most nodes kept in FP32")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    manifest, data = run_data(args.run)
    length = data_max_length(manifest)
    splits = {s: list(data.texts(s)) for s in ("validation", "test")}
    fp32_path = Path(manifest.stage("optimize")["output"]["path"])
    fp32 = load_model(fp32_path, "onnx", length, args.threads, "cpu")
    ref = {s: fp32.logits_batched(t, 64) for s, t in splits.items()}

    def compare(folder: Path, split: str) -> tuple[float, float]:
        logits = load_model(folder, "onnx", length, args.threads, "cpu").logits_batched(splits[split], 64)
        return float(np.mean(logits.argmax(1) == ref[split].argmax(1))), float(np.abs(logits - ref[split]).mean())

    with tempfile.TemporaryDirectory() as tmp:
        inferred = shape_inferred_copy(fp32_path, Path(tmp) / "inferred")
        graph = onnx.load(str(onnx_file(inferred.parent))).graph
        nodes = [n.name for n in graph.node if n.op_type in ("MatMul", "Attention", "Gemm")]
        cost = {n: compare(quantized(inferred, Path(tmp) / "one", only=[n]), "validation")[1] for n in nodes}
        ranked = sorted(nodes, key=lambda n: -cost[n])
        print(f"CPU: {cpu_model()}, {datetime.date.today()}, {len(nodes)} quantizable nodes")
        print("sensitivity (mean |logit change| on validation, quantized alone):")
        for n in ranked:
            print(f"  {cost[n]:.4f}  {n}")
        print(f"{'kept in FP32':>12} {'agree val':>9} {'agree test':>10}  last node kept")
        for k in range(args.keep + 1):
            folder = quantized(inferred, Path(tmp) / f"keep{k}", exclude=ranked[:k])
            val, test = compare(folder, "validation")[0], compare(folder, "test")[0]
            print(f"{k:>12} {val:>9.2%} {test:>10.2%}  {ranked[k - 1] if k else '-'}")


if __name__ == "__main__":
    main()
