"""Serving parity: does the service answer every text as evaluation verified it?

Evaluation scores a model on calls of `evaluate.batch_size` texts in the split's order; the service merges
unrelated clients' requests into one model call (`toolkit.serving.batching.MicroBatcher`). A model whose answer
for a text depends on what shares its call (dynamic INT8 takes one activation scale per call) can then serve
another class than the one the report shows. So `package` replays the evaluation split through the service's own
path before BentoML stores the model: the bundle loaded as the service loads it (`ServedModel` with the session
settings the service would use on this machine, its lanes behind a `MicroBatcher` with the service's batch size
and fill wait), many concurrent clients sending single texts and small batches in a seeded, shuffled order, so
that model calls are composed as under load (mixed texts, many call sizes). Each served class and logits are
compared with the answer the selected stage's evaluation gave for that text.

The service never imports this module (nor anything of `toolkit.stages`): it reads the service's code, not the
other way round."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.errors import ToolkitError

# Requests a client sends: mostly single texts (`/classify`), some small batches (`/classify_batch`).
REQUEST_SIZES = (1, 1, 1, 1, 2, 3, 4, 8)
# A client's pause before its request of each round, in lone-text model calls (times a random fraction), the same
# scale for every client in a round: with no pause the queue fills while the model runs (large merged calls; the
# first round starts every client at once), long pauses leave the model idle (a request runs alone at once), and
# the rounds between make the sizes between.
PAUSES = (0, 64, 4, 1, 16)
# The pauses' unit is at least this: a request costs the service about a millisecond before its model call
# (`classify_fast`: 1,250 requests/s on 2 cores, docs/serving.md), so a faster model does not see requests
# arrive faster.
MIN_UNIT_SECONDS = 0.001
SHOWN = 5  # changed texts kept in the manifest and shown in the error
TEXT_CHARS = 200


class ServingParityError(ToolkitError, RuntimeError):
    """The service's path gave some texts of the evaluation split another class than their evaluation did."""


def service_settings(env: dict[str, str] | None = None) -> dict[str, Any]:
    """The service's micro-batching settings, from the environment variables and defaults that
    `toolkit/serving/service.py` reads. Importing that module here would start BentoML's service machinery and
    look up a model in the store (there is none yet before the first `package`), so they are read again; a test
    checks that both agree."""
    env = os.environ if env is None else env
    max_batch = int(env.get("TOOLKIT_MAX_BATCH", "64"))
    return {
        "max_batch_size": int(env.get("TOOLKIT_MAX_BATCH_SIZE", str(max(64, max_batch)))),
        "fill_wait": float(env.get("TOOLKIT_FILL_WAIT", "0.25")),
        "workers": int(env.get("TOOLKIT_WORKERS", "1")),
    }


def evaluated_logits(run_dir: Path, stage: str, count: int) -> np.ndarray:
    """The logits the stage's evaluation gave each text of the evaluation split: evaluation keeps the very logits
    it scored in `evals/NAME.logits.npy` (a re-run evaluates again when the file is missing)."""
    file = Path(run_dir) / "evals" / f"{stage}.logits.npy"
    if not file.is_file():
        raise ServingParityError(f"serving parity: {file} is missing; run the recipe again to evaluate {stage!r}")
    logits = np.load(file)
    if len(logits) != count:
        raise ServingParityError(
            f"serving parity: {file} holds {len(logits)} texts' logits, the evaluation split has {count}; run the "
            f"recipe again to evaluate {stage!r}"
        )
    return logits


def client_requests(count: int, clients: int, seed: int = 0) -> list[list[tuple[float, np.ndarray]]]:
    """The split's text indices, shuffled (seeded), cut into requests of `REQUEST_SIZES` texts and dealt to the
    clients in turn; each client sends its requests one after another, each after a pause (in lone-text model
    calls, `PAUSES` by round)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(count)
    cuts = np.cumsum(rng.choice(REQUEST_SIZES, size=count))
    requests = np.split(order, cuts[cuts < count])
    pauses = rng.random(len(requests))
    rounds = np.arange(len(requests)) // clients
    paced = [
        (float(PAUSES[r % len(PAUSES)] * pause), index)
        for r, pause, index in zip(rounds, pauses, requests, strict=True)
    ]
    return [paced[k::clients] for k in range(clients)]


async def _clients(batcher, texts: list[str], plan: list[list[tuple[float, np.ndarray]]],
                   unit: float) -> list[tuple[np.ndarray, list]]:  # fmt: skip
    async def client(requests: list[tuple[float, np.ndarray]]) -> list[tuple[np.ndarray, list]]:
        answers = []
        for pause, index in requests:
            await asyncio.sleep(pause * unit)
            answers.append((index, await batcher.submit([texts[i] for i in index])))
        return answers

    answered = await asyncio.gather(*(client(requests) for requests in plan))
    return [pair for answers in answered for pair in answers]


def lone_call_seconds(model, text: str, calls: int = 5) -> float:
    """A lone text's model call: the quickest of a few, after one that warms the session up (on a busy machine a
    call with every core's thread can take a hundred times longer now and then)."""
    model.logits([text])
    seconds = []
    for _ in range(calls):
        start = time.perf_counter()
        model.logits([text])
        seconds.append(time.perf_counter() - start)
    return min(seconds)


def replay(folder: Path | str, texts: list[str], clients: int, seed: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
    """Every text's logits as the service would serve them from `folder` under `clients` concurrent clients, and
    how the model calls were made. Built as `toolkit.serving.service.Classifier` builds its runtime."""
    from toolkit.evaluation import torch_threads_kept
    from toolkit.serving.batching import MicroBatcher
    from toolkit.serving.bundle import read_meta
    from toolkit.serving.model import ServedModel, session_settings

    service = service_settings()
    with torch_threads_kept():  # a PyTorch model sets torch's threads as the service would
        settings, source = session_settings(read_meta(folder), service["workers"])
        session = {**settings, "source": source}
        runtime = ServedModel(folder, settings.pop("threads"), **settings)
        lanes = [lambda batch, model=model: list(model.logits(batch)) for model in runtime.lanes]
        sizes: list[int] = []
        batcher = MicroBatcher(lanes, service["max_batch_size"], on_batch=sizes.append,
                               fill_wait=service["fill_wait"])  # fmt: skip
        plan = client_requests(len(texts), clients, seed)
        unit = max(MIN_UNIT_SECONDS, lone_call_seconds(runtime.lanes[0], texts[0]))
        start = time.perf_counter()
        answers = asyncio.run(_clients(batcher, texts, plan, unit))
        seconds = time.perf_counter() - start
    served = np.zeros((len(texts), len(runtime.labels)), dtype=np.float32)
    for index, rows in answers:
        served[index] = np.stack(rows)
    calls = {
        "clients": clients,
        "requests": len(answers),
        "model_calls": len(sizes),
        "call_sizes": call_sizes(sizes),
        "max_batch_size": service["max_batch_size"],
        "fill_wait": service["fill_wait"],
        "lone_call_ms": round(1000 * unit, 3),
        "session": session,
        "seed": seed,
        "seconds": round(seconds, 3),
    }
    return served, calls


def call_sizes(sizes: list[int]) -> dict[str, Any]:
    """Texts per model call: least, median, most, mean, and the calls per power-of-two bucket (1, 2, 3-4, 5-8...)."""
    if not sizes:
        return {}
    tops = sorted({1 << (size - 1).bit_length() for size in sizes})
    buckets = {top: sum(top // 2 < size <= top for size in sizes) for top in tops}
    return {
        "min": min(sizes),
        "median": float(np.median(sizes)),
        "max": max(sizes),
        "mean": round(float(np.mean(sizes)), 2),
        "calls_by_size": {(str(t) if t <= 2 else f"{t // 2 + 1}-{t}"): n for t, n in buckets.items()},
    }


def compare(served: np.ndarray, evaluated: np.ndarray, texts: list[str], labels: list[str]) -> dict[str, Any]:
    """Served against evaluated answers, per text: classes (the service's `top_classes`) and logits."""
    from toolkit.serving.model import top_classes

    served_ids, evaluated_ids = np.asarray(top_classes(served)[0]), evaluated.argmax(-1)
    diff = np.abs(served.astype(np.float64) - evaluated.astype(np.float64))
    changed = np.flatnonzero(served_ids != evaluated_ids)
    return {
        "texts": len(texts),
        "agreement": float((served_ids == evaluated_ids).mean()),
        "changed_texts": int(len(changed)),
        "max_logit_difference": float(diff.max()),
        "mean_logit_difference": float(diff.mean()),
        "same_logits": float((diff.max(axis=-1) == 0).mean()),  # bit for bit
        "changed": [
            {
                "index": int(i),
                "text": texts[i][:TEXT_CHARS],
                "evaluated": labels[evaluated_ids[i]],
                "served": labels[served_ids[i]],
                "evaluated_logits": [round(float(x), 5) for x in evaluated[i]],
                "served_logits": [round(float(x), 5) for x in served[i]],
            }
            for i in changed[:SHOWN]
        ],
    }


def check(folder: Path | str, texts: list[str], evaluated: np.ndarray, split: str, clients: int) -> dict[str, Any]:
    """The serving-parity record of the bundle in `folder`; `ServingParityError` when any text's class changed."""
    from toolkit.serving.bundle import read_meta

    served, calls = replay(folder, texts, clients)
    record = {"split": split, **compare(served, evaluated, texts, read_meta(folder)["labels"]), **calls}
    record["passed"] = record["changed_texts"] == 0
    if not record["passed"]:
        raise ServingParityError(failure_message(record))
    return record


def failure_message(record: dict[str, Any]) -> str:
    sizes = record["call_sizes"]
    lines = [
        f"serving parity: {record['changed_texts']:,} of {record['texts']:,} {record['split']} texts got another "
        f"class through the service's path than their evaluation gave (agreement {100 * record['agreement']:.2f} %, "
        f"max logit difference {record['max_logit_difference']:.3g}; {record['clients']} concurrent clients, "
        f"{record['model_calls']:,} model calls of {sizes.get('min')}-{sizes.get('max')} texts); the model was not "
        "stored. First changed texts:"
    ]
    for c in record["changed"]:
        text = c["text"] if len(c["text"]) <= 80 else c["text"][:77] + "..."
        lines.append(f"  #{c['index']} {text!r}: evaluated {c['evaluated']} {c['evaluated_logits']}, "
                     f"served {c['served']} {c['served_logits']}")  # fmt: skip
    lines.append(
        "A model whose answer depends on what shares its model call (dynamic INT8: one activation scale per call) "
        "is not served as it was evaluated: select another stage, or set `serving_parity: false` on the package "
        "stage to store it anyway."
    )
    return "\n".join(lines)
