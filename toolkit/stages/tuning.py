"""The served session's settings, measured on the machine that runs the recipe instead of fixed from one CPU:
intra-op threads, whether idle threads spin, and whether ONNX Runtime fuses Add + LayerNormalization into
SkipLayerNormalization (its CPU kernel was 6x slower on an AMD Zen 5, only 0.85x on an Intel Xeon).

Every combination is timed in turn, round after round (A B C ... A B C ...), so a busy spell hits them all
alike. A combination replaces the default only when it beats it in every round; a fused graph must also give
the default's answers. The result goes into the manifest (with the CPU model) and into the bundle, and the
service uses it when it runs on the same CPU model."""

from __future__ import annotations

import datetime
import itertools
from typing import Any

import numpy as np

from toolkit.manifest import Artifact


def candidates(cores: int) -> list[dict[str, Any]]:
    """Thread counts: one, half and all cores; spin on/off; SkipLayerNorm fused or not. The default first."""
    threads = sorted({1, max(1, cores // 2), cores}, reverse=True)
    return [
        {"threads": t, "spin": s, "fuse_skip_layer_norm": f}
        for t, s, f in itertools.product(threads, (True, False), (False, True))
    ]


def score(speed: dict[str, float], base: dict[str, float]) -> float:
    """Speed-up over the default: geometric mean of batch-1 latency and batch-N throughput ratios."""
    latency = base["latency_p50_ms"] / speed["latency_p50_ms"]
    throughput = speed["throughput_per_s"] / base["throughput_per_s"]
    return float(np.sqrt(latency * throughput))


def tune_onnx(artifact: Artifact, max_length: int, texts: list[str], rounds: int = 3) -> dict[str, Any]:
    """Measure every candidate on `texts`; return the choice, the per-candidate figures and the machine."""
    from toolkit.config import SpeedConfig
    from toolkit.evaluation import measure_speed
    from toolkit.runtime import available_cores, cpu_model, load_model

    cores = available_cores()
    combos = candidates(cores)
    models = [load_model(artifact.path, "onnx", max_length, c["threads"], "cpu", spin=c["spin"],
                         fuse_skip_layer_norm=c["fuse_skip_layer_norm"]) for c in combos]  # fmt: skip
    cfg = SpeedConfig(warmup=5, latency_samples=60, throughput_samples=256)
    reference = models[0].logits(texts[:64])
    agree = [bool((m.logits(texts[:64]).argmax(-1) == reference.argmax(-1)).all()) for m in models]
    figures = [[measure_speed(m.logits, texts, cfg, m.threads) for m in models] for _ in range(rounds)]
    per_round = [[score(f, r[0]) for f in r] for r in figures]
    rows = []
    for i, combo in enumerate(combos):
        scores = [r[i] for r in per_round]
        rows.append(
            {
                **combo,
                "speedup_min": min(scores),
                "speedup_median": float(np.median(scores)),
                "latency_p50_ms": float(np.median([r[i]["latency_p50_ms"] for r in figures])),
                "throughput_per_s": float(np.median([r[i]["throughput_per_s"] for r in figures])),
                "same_answers": agree[i],
            }
        )
    # Beating the default in every round, not on average, is what makes a choice more than noise.
    winners = [r for r in rows[1:] if r["same_answers"] and r["speedup_min"] > 1.0]
    best = max(winners, key=lambda r: r["speedup_median"], default=rows[0])
    choice = {k: best[k] for k in ("threads", "spin", "fuse_skip_layer_norm")}
    return {
        "choice": choice,
        "default_kept": best is rows[0],
        "cpu": cpu_model(),
        "cores": cores,
        "date": datetime.date.today().isoformat(),
        "rounds": rounds,
        "texts": len(texts),
        "candidates": rows,
    }
