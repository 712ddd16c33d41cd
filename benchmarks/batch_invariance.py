"""Calibrated, per-token and per-call INT8 activation scales: does a text's answer depend on what shares its model
call, and what does invariance cost?

    python benchmarks/batch_invariance.py runs/full

RUN_DIR is a finished run with `optimize` and `quantize` stages (`recipes/full.yaml`). The run's own `quantize`
(its `activation_scales`, `calibrated` by default) is measured as it is; the other two variants (`per_token`, and
`per_call`: ONNX Runtime's dynamic INT8, one scale per call) are made here by the `quantize` stage function from the
same `optimize` graph with the same options (SmoothQuant calibrated on the run's training texts, per-row
embeddings, token packing). Both run through
`toolkit.runtime` on the test split with the same threads:

- each text alone against the same text inside random calls of 32 (`logits`, as the service calls the model), over
  three shuffles: texts whose class changed and the largest logit change;
- accuracy and agreement with the FP32 `optimize` graph (calls of 32);
- speed side by side, in alternating rounds: batch-1 p50 and texts/s in calls of 32 (medians of the rounds).

Prints a table labelled with the CPU model and the date.
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


def run_data(run: Path):
    from toolkit.data import PreparedData

    manifest = Manifest.load(run)
    data = PreparedData(run / "data", manifest.data["data"]["label_names"], manifest.data["data"]["fingerprint"])
    return manifest, data


def call_dependence(model, texts: list[str], shuffles: int, size: int = 32) -> tuple[list[int], float]:
    """Texts whose class alone differs from their class in random calls of `size`, per shuffle; largest change."""
    alone = np.concatenate([model.logits([t]) for t in texts])
    changed, worst = [], 0.0
    for seed in range(shuffles):
        order = np.random.default_rng(seed).permutation(len(texts))
        together = np.empty_like(alone)
        for start in range(0, len(texts), size):
            index = order[start : start + size]
            together[index] = model.logits([texts[i] for i in index])
        changed.append(int((together.argmax(1) != alone.argmax(1)).sum()))
        worst = max(worst, float(np.abs(together - alone).max()))
    return changed, worst


def side_by_side(models: dict, texts: list[str], rounds: int) -> dict[str, tuple[float, float]]:
    """Alternating rounds: each model times the next 30 single texts and 128 texts in calls of 32."""
    figures = {name: ([], []) for name in models}
    for model in models.values():  # one untimed pass each: sessions warm, caches filled
        model.logits_batched(texts[:256], 32)
    for r in range(rounds):
        singles = texts[(r * 30) % len(texts) :][:30]
        batch = texts[(r * 128) % len(texts) :][:128]
        for name in list(models) if r % 2 == 0 else list(models)[::-1]:
            model = models[name]
            latencies = []
            for text in singles:
                start = time.perf_counter()
                model.logits([text])
                latencies.append(time.perf_counter() - start)
            start = time.perf_counter()
            model.logits_batched(batch, 32)
            figures[name][0].append(float(np.median(latencies)) * 1000)
            figures[name][1].append(len(batch) / (time.perf_counter() - start))
    return {name: (float(np.median(p50)), float(np.median(tput))) for name, (p50, tput) in figures.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shuffles", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=16)
    args = parser.parse_args()
    from toolkit.runtime import cpu_model

    manifest, data = run_data(args.run)
    max_length = int(manifest.data["recipe"]["model"]["max_length"])
    texts, labels = data.texts("test"), data.labels("test")
    fp32_path = Path(manifest.stage("optimize")["output"]["path"])
    fp32 = load_model(fp32_path, "onnx", max_length, args.threads, "cpu").logits_batched(texts, 32).argmax(1)
    print(f"CPU: {cpu_model()}, {datetime.date.today()}, {args.threads} threads, {len(texts)} test texts")
    print(f"FP32 (optimize): accuracy {np.mean(fp32 == labels):.2%}\n")
    own = manifest.stage("quantize")
    with tempfile.TemporaryDirectory() as tmp:
        paths = {f"{own['info'].get('activation_scales')} (the run's quantize)": Path(own["output"]["path"])}
        for scales in ("calibrated", "per_token", "per_call"):
            if scales == own["info"].get("activation_scales"):
                continue
            out = Path(tmp) / scales
            out.mkdir()
            ctx = StageContext(run_dir=Path(tmp), out_dir=out, source=Artifact(fp32_path, "onnx", "optimize"),
                               data=data, device="cpu", max_length=max_length)  # fmt: skip
            quantize.run(QuantizeConfig(type="quantize", activation_scales=scales), ctx)
            paths[scales] = out
        models = {name: load_model(path, "onnx", max_length, args.threads, "cpu") for name, path in paths.items()}
        speeds = side_by_side(models, texts, args.rounds)
        header = f"{'INT8 activation scales':<32} {'acc':>7} {'agree FP32':>10} {'changed alone vs calls of 32':>28} "
        print(header + f"{'max logit change':>16} {'b1 p50 ms':>9} {'b32 /s':>7}")
        for name, model in models.items():
            ids = model.logits_batched(texts, 32).argmax(1)
            changed, worst = call_dependence(model, texts, args.shuffles)
            p50, tput = speeds[name]
            print(f"{name:<32} {np.mean(ids == labels):>7.2%} {np.mean(ids == fp32):>10.2%} "
                  f"{', '.join(map(str, changed)):>28} {worst:>16.2g} {p50:>9.3f} {tput:>7.0f}")  # fmt: skip
        baseline = next(name for name in models if name.startswith("per_call"))
        for name in (n for n in models if n != baseline):
            print(f"{name} / per_call: batch 1 {speeds[baseline][0] / speeds[name][0]:.2f}x, batch 32 "
                  f"{speeds[name][1] / speeds[baseline][1]:.2f}x (speed; above 1 is faster)")  # fmt: skip


if __name__ == "__main__":
    main()
