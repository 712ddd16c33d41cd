"""Every artifact is measured the same way: quality on the evaluation split, parity with the model it came
from, speed on real texts with fixed threads and warm-up, size and parameter count."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from toolkit.errors import ToolkitError
from toolkit.metrics import classification_metrics
from toolkit.runtime import load_model, weights_size
from toolkit.runtime.checkpoint import zero_filled_heads

if TYPE_CHECKING:
    from toolkit.config import EvaluateConfig, SpeedConfig
    from toolkit.data import PreparedData
    from toolkit.manifest import Artifact


def parity(logits: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """How closely `logits` follow the source model's on the same texts."""
    diff = np.abs(logits.astype(np.float64) - reference.astype(np.float64))
    return {
        "agreement": float((logits.argmax(-1) == reference.argmax(-1)).mean()),
        "max_abs_diff": float(diff.max()) if diff.size else 0.0,
        "mean_abs_diff": float(diff.mean()) if diff.size else 0.0,
        "n": int(len(logits)),
    }


# Largest logit difference allowed between a head-pruned folder loaded stock (pruned heads as zeros) and compact:
# the two only sum the same products in another order.
STOCK_LOAD_TOLERANCE = 1e-4


class StockLoadError(ToolkitError, RuntimeError):
    """A saved PyTorch folder that stock transformers would load with other answers than toolkit evaluated."""


def stock_load(artifact: Artifact, logits: np.ndarray, texts: list[str], cfg: EvaluateConfig, max_length: int,
               device: str) -> dict[str, Any]:  # fmt: skip
    """A head-pruned folder as stock transformers (4 or 5) loads it, every head there and the pruned ones zeros,
    against the compact model toolkit evaluated (`logits`): what a user loads must answer as what was measured."""
    heads = zero_filled_heads(json.loads((Path(artifact.path) / "config.json").read_text(encoding="utf-8")))
    if not heads:
        return {}
    stock = load_model(artifact.path, "pytorch", max_length, cfg.speed.threads, device, compact_heads=False)
    check = {**parity(stock.logits_batched(texts, cfg.batch_size), logits), "zero_filled_heads": heads}
    if check["agreement"] < 1 or check["max_abs_diff"] > STOCK_LOAD_TOLERANCE:
        raise StockLoadError(
            f"{artifact.path} loaded by stock transformers (pruned heads as zeros) answers otherwise than the "
            f"compact model evaluated: agreement {check['agreement']:.4f}, largest logit difference "
            f"{check['max_abs_diff']:.2e} (allowed {STOCK_LOAD_TOLERANCE:.0e}); this is a toolkit bug, please report it"
        )
    return {"stock_load": check}


def percentile_ms(seconds: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(seconds) * 1000.0, q))


def measure_speed(predict: Callable[[list[str]], Any], texts: list[str], cfg: SpeedConfig, threads: int) -> dict:
    """Batch-1 latency (p50/p95) and batch-N throughput on real texts, after a fixed warm-up, with the machine's
    load while it ran. Throughput is timed in `THROUGHPUT_ROUNDS` parts whose spread is recorded."""
    from toolkit.machine import LoadMeter

    if not texts:
        return {}
    single = [texts[i % len(texts)] for i in range(cfg.latency_samples)]
    bulk = [texts[i % len(texts)] for i in range(cfg.throughput_samples)]
    n = cfg.throughput_batch_size
    batches = [bulk[i : i + n] for i in range(0, len(bulk), n)]
    for text in single[: cfg.warmup]:
        predict([text])
    # One untimed pass over what is timed: OpenVINO compiles each new input shape on its first call.
    time_calls(predict, [[text] for text in single], None)
    time_calls(predict, batches, None)
    with LoadMeter() as meter:
        latencies = time_calls(predict, [[text] for text in single], "latency (batch 1)")
        parts = [[batches[i] for i in part] for part in np.array_split(np.arange(len(batches)), THROUGHPUT_ROUNDS)]
        timed = [(sum(map(len, part)), sum(time_calls(predict, part, None))) for part in parts if part]
    rates = [count / seconds for count, seconds in timed]
    return {
        "latency_p50_ms": percentile_ms(latencies, 50),
        "latency_p95_ms": percentile_ms(latencies, 95),
        "throughput_batch_size": n,
        "throughput_per_s": len(bulk) / sum(seconds for _, seconds in timed),
        "throughput_spread": spread(rates),
        "threads": threads,
        "warmup": cfg.warmup,
        "latency_samples": cfg.latency_samples,
        "throughput_samples": cfg.throughput_samples,
        "load": meter.result,
    }


THROUGHPUT_ROUNDS = 3


def time_calls(predict: Callable[[list[str]], Any], calls: list[list[str]], desc: str | None) -> list[float]:
    seconds = []
    for texts in tqdm(calls, desc=desc, leave=False, disable=desc is None):
        start = time.perf_counter()
        predict(texts)
        seconds.append(time.perf_counter() - start)
    return seconds


def spread(values: list[float]) -> float:
    """(max - min) / median: how far apart repeated measurements of one figure came out."""
    return float((max(values) - min(values)) / np.median(values)) if len(values) > 1 else 0.0


# A finalist's turn starts with this long of its own calls, untimed: the previous finalist's threads may still be
# spinning. After an ONNX Runtime FP32 session's calls of 32, the INT8 graph's next four calls took 37, 29, 24 and
# 16 ms against 15-19 ms after its own (20 ms of pause left 25 ms for the first, 100 ms nothing; a predecessor
# session that does not spin, nothing). Over 128 texts that is 1,296 texts/s against 1,965, and OpenVINO's INT8
# lost 21 % the same way (AMD EPYC, 2 cores, 2026-12-02). A server runs one model; this times each as it would.
SETTLE_SECONDS = 0.15


def settle(predict: Callable[[list[str]], Any], texts: list[str], seconds: float) -> None:
    """At least one call of `texts`, and more until `seconds` have passed."""
    end = time.perf_counter() + seconds
    predict(texts)
    while time.perf_counter() < end:
        predict(texts)


def side_by_side(predictors: dict[str, Callable[[list[str]], Any]], texts: list[str], cfg: SpeedConfig,
                 rounds: int) -> dict[str, dict[str, Any]]:  # fmt: skip
    """The finalists timed in one session, each in turn, round after round, in a new order every round (A B C,
    C A B, ...; seeded, so a run can be repeated), so that a busy spell falls on all of them alike and none always
    runs right after the same one. Each round times the next texts of the split (`latency_samples` and
    `throughput_samples` in all, as a stage's own timing), after one untimed pass over all of them (OpenVINO
    compiles each new input shape on its first call; ONNX Runtime and torch allocate); each turn opens with
    `SETTLE_SECONDS` of untimed calls. Per finalist: batch-1 p50/p95 over every round's calls, throughput over
    every round's texts, and how far the rounds' p50 and throughput came apart (`*_spread`)."""
    from toolkit.machine import LoadMeter

    n = cfg.throughput_batch_size
    k, m = max(10, cfg.latency_samples // rounds), max(n, cfg.throughput_samples // rounds)
    singles = [[[texts[(r * k + i) % len(texts)]] for i in range(k)] for r in range(rounds)]
    bulk = [[texts[(r * m + i) % len(texts)] for i in range(m)] for r in range(rounds)]
    batches = [[part[i : i + n] for i in range(0, m, n)] for part in bulk]
    latencies: dict[str, list[list[float]]] = {name: [] for name in predictors}
    seconds: dict[str, list[float]] = {name: [] for name in predictors}
    for predict in predictors.values():  # untimed: each input shape's first call is not the figure
        time_calls(predict, sum(singles, []), None)
        time_calls(predict, sum(batches, []), None)
    order = np.random.default_rng(0)
    with LoadMeter() as meter:
        for r in tqdm(range(rounds), desc="finalists side by side", leave=False):
            for name in order.permutation(list(predictors)):
                predict = predictors[name]
                settle(predict, batches[r][0], SETTLE_SECONDS)
                latencies[name].append(time_calls(predict, singles[r], None))
                seconds[name].append(sum(time_calls(predict, batches[r], None)))
    return {
        name: {
            "latency_p50_ms": percentile_ms(sum(latencies[name], []), 50),
            "latency_p95_ms": percentile_ms(sum(latencies[name], []), 95),
            "latency_spread": spread([percentile_ms(r, 50) for r in latencies[name]]),
            "throughput_per_s": rounds * m / sum(seconds[name]),
            "throughput_spread": spread([m / s for s in seconds[name]]),
            "rounds": rounds,
            "load": meter.result,
        }
        for name in predictors
    }


def evaluate_artifact(
    artifact: Artifact,
    data: PreparedData,
    cfg: EvaluateConfig,
    max_length: int,
    logits_file: Path,
    reference_logits: np.ndarray | None = None,
    device: str = "cpu",
    logits: np.ndarray | None = None,
) -> dict[str, Any]:
    """Quality, parity, speed and size of `artifact`; `logits`: the evaluation split's, already computed (gathered
    from several processes), else computed here."""
    with torch_threads_kept():
        return _evaluate(artifact, data, cfg, max_length, logits_file, reference_logits, device, logits)


def logits_of(artifact: Artifact, texts: list[str], cfg: EvaluateConfig, max_length: int, device: str) -> np.ndarray:
    """The logits of `texts` through the service's runtime (one process's share of the evaluation split)."""
    with torch_threads_kept():
        predictor = load_model(artifact.path, artifact.format, max_length, cfg.speed.threads, device)
        return predictor.logits_batched(texts, cfg.batch_size)


@contextmanager
def torch_threads_kept():
    """The speed settings' thread count is for measuring; training stages after this one keep their own."""
    import torch

    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _evaluate(artifact, data, cfg, max_length, logits_file, reference_logits, device, logits) -> dict[str, Any]:
    # The service's own runtime: the figures below are those of the path a served request takes.
    predictor = load_model(artifact.path, artifact.format, max_length, cfg.speed.threads, device)
    texts = data.texts(cfg.split)
    if logits is None:
        logits = predictor.logits_batched(texts, cfg.batch_size)
    elif len(logits) != len(texts):
        raise ValueError(f"gathered logits for {len(logits)} texts, the {cfg.split} split has {len(texts)}")
    np.save(logits_file, logits)
    scores = classification_metrics(logits.argmax(-1), data.labels(cfg.split), data.label_names)
    result: dict[str, Any] = {"split": cfg.split, "n": len(texts)}
    result.update({k: v for k, v in scores.items() if k in cfg.metrics})
    result["accuracy"] = scores["accuracy"]  # selection and reports rely on it
    if reference_logits is not None and reference_logits.shape == logits.shape:
        result["parity"] = parity(logits, reference_logits)
    if artifact.format == "pytorch":
        result.update(stock_load(artifact, logits, texts, cfg, max_length, device))
    if cfg.speed.enabled:
        result["speed"] = measure_speed(predictor.logits, texts, cfg.speed, predictor.threads)
    result["size_bytes"] = weights_size(Path(artifact.path))
    result["parameters"] = predictor.num_parameters
    result["device"] = predictor.device
    return result
