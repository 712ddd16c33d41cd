"""The BentoML service: `bentoml serve` in the project root serves the newest packaged toolkit model, or the
one TOOLKIT_MODEL names (`name` or `name:version`).

One service, one model runtime per worker. Requests that arrive while the model is busy are merged into the next
model call (`MicroBatcher`, at most TOOLKIT_MAX_BATCH_SIZE texts): BentoML's own `batchable=True` needs a second
service for a single-text API, and that inter-service hop answered 503 ("process is overloaded") and dropped
connections under 32 concurrent clients here. Limits come from the environment: TOOLKIT_MAX_BATCH (texts per
batch request, default 64), TOOLKIT_MAX_CHARS (characters per text, default 2000), TOOLKIT_MAX_BODY_BYTES (request
body, default 1 MiB: 413 beyond), TOOLKIT_MAX_PENDING (texts accepted and not yet answered, per worker, default
256: 503 with Retry-After beyond), TOOLKIT_BODY_TIMEOUT_S (seconds to receive a request body, default 10: 408
beyond). A request whose client stops waiting while it is queued (timeout, disconnect) leaves the queue and never
reaches the model.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from typing import Annotated, Any

import bentoml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from toolkit.serving.guard import RequestGuard

MAX_BATCH = int(os.environ.get("TOOLKIT_MAX_BATCH", "64"))
MAX_CHARS = int(os.environ.get("TOOLKIT_MAX_CHARS", "2000"))
MAX_BATCH_SIZE = int(os.environ.get("TOOLKIT_MAX_BATCH_SIZE", str(max(64, MAX_BATCH))))
WORKERS = int(os.environ.get("TOOLKIT_WORKERS", "1"))
TIMEOUT_S = int(os.environ.get("TOOLKIT_TIMEOUT_S", "60"))
MAX_BODY_BYTES = int(os.environ.get("TOOLKIT_MAX_BODY_BYTES", str(1 << 20)))
MAX_PENDING = int(os.environ.get("TOOLKIT_MAX_PENDING", "256"))
RETRY_AFTER_S = int(os.environ.get("TOOLKIT_RETRY_AFTER_S", "1"))
BODY_TIMEOUT_S = float(os.environ.get("TOOLKIT_BODY_TIMEOUT_S", "10"))
FILL_WAIT = float(os.environ.get("TOOLKIT_FILL_WAIT", "0.25"))
ROUTES = ("/classify", "/classify_batch", "/predict")
# Serve a model pushed to the Hub (or a folder in that layout) instead of one from the BentoML model store.
HUB_MODEL = os.environ.get("TOOLKIT_HUB_MODEL")
# A line per request in BentoML's access log cost more than the model call of a batched text: off unless asked.
ACCESS_LOG = os.environ.get("TOOLKIT_ACCESS_LOG", "0") == "1"
# Likewise OpenTelemetry's span per request (sampled or not); TOOLKIT_TRACE_REQUESTS=1 traces the routes again.
TRACE_REQUESTS = os.environ.get("TOOLKIT_TRACE_REQUESTS", "0") == "1"
# Under BentoML's logger: `bentoml serve` passes only warnings from other loggers, so the start-up lines would not
# show; as its child they do, at the level BentoML is given (`--verbose`, quiet).
LOG = logging.getLogger("bentoml.toolkit.serving")


def latest_model_tag() -> str:
    """TOOLKIT_MODEL, else the newest model in the store that a toolkit `package` stage saved."""
    if os.environ.get("TOOLKIT_MODEL"):
        return os.environ["TOOLKIT_MODEL"]
    models = [m for m in bentoml.models.list() if m.info.labels.get("toolkit") == "classifier"]
    if not models:
        raise RuntimeError(
            "no packaged toolkit model in the BentoML model store "
            f"({os.environ.get('BENTOML_HOME', '~/bentoml')}): run a recipe with a `package` stage, "
            "or set TOOLKIT_MODEL=name:version"
        )
    return str(max(models, key=lambda m: m.info.creation_time).tag)


class _Load:
    """What the request guard reads: this worker's service and queue, once the service has started."""

    batcher = None
    service = None

    def overloaded(self) -> bool:
        return self.batcher is not None and self.batcher.load >= MAX_PENDING


LOAD = _Load()


class _Metrics:
    """Served at /metrics beside BentoML's own: model-call sizes, texts waiting, requests shed."""

    def __init__(self) -> None:
        from bentoml.metrics import Counter, Gauge, Histogram

        buckets = (1, 2, 4, 8, 16, 32, 64, 128, 256)
        self.batch_size = Histogram("toolkit_model_batch_size", "Texts per model call", buckets=buckets)
        self.queue = Gauge("toolkit_queue_texts", "Texts accepted and not yet answered")
        self.queue.set_function(lambda: LOAD.batcher.load if LOAD.batcher is not None else 0)
        self.shed = Counter("toolkit_shed_requests", "Requests answered 503 because the queue was full")

    def batch(self, size: int) -> None:
        self.batch_size.observe(size)


METRICS = _Metrics()


# Some character that is not whitespace, with whitespace as JSON Schema's (ECMA) `\s` has it, so that the
# document's pattern and the validator agree on every text (Python's str.strip also strips U+0085 and others).
NON_BLANK = "[^\\t\\n\\v\\f\\r \\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000\\ufeff]"
_NON_BLANK = re.compile(NON_BLANK)


def _not_blank(text: str) -> str:
    if not _NON_BLANK.search(text):
        raise ValueError("text is empty (or only whitespace)")
    return text


# The pattern is for the OpenAPI document; the validator says why in words.
Text = Annotated[
    str,
    Field(max_length=MAX_CHARS, json_schema_extra={"minLength": 1, "pattern": NON_BLANK}),
    AfterValidator(_not_blank),
]


class Single(BaseModel):
    categories: int
    probabilities: float
    label: str


class Batch(BaseModel):
    categories: list[int]
    probabilities: list[float]
    labels: list[str]


class Prediction(BaseModel):
    """One class of one text, as Text Embeddings Inference's `/predict` answers."""

    score: float
    label: str


class PredictInput(BaseModel):
    """Text Embeddings Inference's `/predict` body: `inputs` is a text, `[text]`, or a batch `[[text], [text], ...]`
    (a pair `[a, b]` is TEI's sentence pair, which a single-text classifier does not take)."""

    inputs: (
        Text
        | Annotated[list[Text], Field(min_length=1, max_length=2)]
        | Annotated[
            list[Annotated[list[Text], Field(min_length=1, max_length=2)]], Field(min_length=1, max_length=MAX_BATCH)
        ]
    )
    raw_scores: bool = Field(False, description="Logits instead of probabilities.")
    truncate: bool = Field(False, description="Accepted for TEI clients; texts are always cut to the model's length.")

    @model_validator(mode="after")
    def _no_pairs(self):
        inputs = self.inputs
        pairs = [inputs] if isinstance(inputs, list) and inputs and isinstance(inputs[0], str) else inputs
        if isinstance(pairs, list) and any(isinstance(p, list) and len(p) == 2 for p in pairs):
            raise ValueError("sentence pairs are not supported: send a text, [text] or a batch [[text], [text], ...]")
        return self

    def texts(self) -> tuple[list[str], bool]:
        """The texts, and whether the request was a batch."""
        if isinstance(self.inputs, str):
            return [self.inputs], False
        if isinstance(self.inputs[0], str):
            return [self.inputs[0]], False
        return [item[0] for item in self.inputs], True


@bentoml.service(
    workers=WORKERS,
    traffic={"timeout": TIMEOUT_S},
    logging={"access": {"enabled": ACCESS_LOG}},
    tracing={"excluded_urls": [] if TRACE_REQUESTS else [r.lstrip("/") for r in ROUTES]},
)
class Classifier:
    bento_model = None if HUB_MODEL else bentoml.models.BentoModel(latest_model_tag())

    def __init__(self) -> None:
        from toolkit.runtime.hardware import core_count
        from toolkit.serving.batching import MicroBatcher
        from toolkit.serving.bundle import read_meta
        from toolkit.serving.model import ServedModel, session_settings

        folder = self._model_folder()
        # Threads, spinning and SkipLayerNorm fusion as the package stage measured them on this CPU (or set by
        # TOOLKIT_THREADS, TOOLKIT_ORT_SPIN, TOOLKIT_ORT_FUSE_SLN); workers share the cores, which are the CPU
        # affinity lowered to the cgroup's CPU quota (a container's CPU limit), rounded up.
        settings, source = session_settings(read_meta(folder), WORKERS)
        LOG.info("serving %s; session settings %s (%s)", folder, settings, source)
        LOG.info("intra-op threads: %d per worker, %d worker(s) (%s); this process may use %s",
                 settings["threads"], WORKERS, source, core_count().text)  # fmt: skip
        self.runtime = ServedModel(folder, settings.pop("threads"), **settings)
        self.labels = self.runtime.labels
        lanes = [lambda texts, model=model: list(model.logits(texts)) for model in self.runtime.lanes]
        self.batcher = MicroBatcher(lanes, MAX_BATCH_SIZE, on_batch=METRICS.batch, fill_wait=FILL_WAIT)
        LOAD.batcher = self.batcher
        LOAD.service = self

    def _model_folder(self) -> str:
        if not HUB_MODEL:
            return self.bento_model.path
        import tempfile
        from pathlib import Path

        from toolkit.serving.hub_model import hub_bundle

        dest = Path(tempfile.mkdtemp(prefix="toolkit-hub-model-"))
        revision, graph = os.environ.get("TOOLKIT_HUB_REVISION"), os.environ.get("TOOLKIT_HUB_ONNX")
        return str(hub_bundle(HUB_MODEL, dest, revision, graph))

    async def _predict(
        self, texts: list[str], timeout: float | None = None
    ) -> tuple[list[int], list[float], list[str]]:
        from toolkit.serving.model import top_classes

        ids, probs = top_classes(await self.batcher.submit(texts, timeout))
        return ids, probs, [self.labels[i] for i in ids]

    async def answer(self, text: str, timeout: float | None = None) -> Single:
        ids, probs, labels = await self._predict([text], timeout)
        return Single(categories=ids[0], probabilities=probs[0], label=labels[0])

    @bentoml.api
    async def classify(self, text: Text) -> Single:
        """One text -> its class id, that class's probability and its label."""
        return await self.answer(text)

    @bentoml.api
    async def classify_batch(self, text: Annotated[list[Text], Field(min_length=1, max_length=MAX_BATCH)]) -> Batch:
        """Several texts -> class ids, probabilities and labels, in input order."""
        ids, probs, labels = await self._predict(text)
        return Batch(categories=ids, probabilities=probs, labels=labels)

    @bentoml.api(input_spec=PredictInput)
    async def predict(
        self, inputs: Any, raw_scores: bool = False, truncate: bool = False
    ) -> list[Prediction] | list[list[Prediction]]:
        """Text Embeddings Inference's `/predict`: every class of each text, the most likely first."""
        from toolkit.runtime import softmax

        texts, batch = PredictInput(inputs=inputs, raw_scores=raw_scores, truncate=truncate).texts()
        rows = await self.batcher.submit(texts)
        answers = []
        for row in rows:
            scores = row.astype("float64") if raw_scores else softmax(row.astype("float64"))
            order = sorted(range(len(scores)), key=lambda i: -scores[i])
            answers.append([Prediction(score=float(scores[i]), label=self.labels[i]) for i in order])
        return answers if batch else answers[0]


class SingleInput(BaseModel):
    """`classify`'s body, as BentoML's `Input` model for the route validates it (same errors, same title)."""

    model_config = ConfigDict(title="Input")
    text: Text


# What BentoML answers, with status 500, when an API method raises (`/classify_batch`, `/predict`).
MODEL_FAILED = "An unexpected error has occurred, please check the server log."


async def classify_fast(body: bytes) -> tuple[int, bytes]:
    """`classify` answered by the request guard, without Starlette's routing and BentoML's endpoint machinery:
    a third of a single-text request's cost at 32 clients (1,250 vs 1,000 req/s; Intel(R) Xeon(R) Processor, 2 cores,
    2026-11-23). The same
    validation (`Text`), the same micro-batcher, the same answer model and error body as the API method below,
    which stays the documented route (OpenAPI, in-process clients)."""
    try:
        text = SingleInput.model_validate_json(body).text
    except ValidationError as exc:
        detail = exc.errors(include_input=False, include_context=False)
        return 400, json.dumps({"error": str(exc).splitlines()[0], "detail": detail}).encode()
    try:  # the guard answers before BentoML's timeout middleware: the same limit, here
        return 200, (await LOAD.service.answer(text, timeout=TIMEOUT_S)).model_dump_json().encode()
    except asyncio.TimeoutError:  # not the builtin TimeoutError on Python 3.10
        return 504, json.dumps({"error": f"no answer within TOOLKIT_TIMEOUT_S={TIMEOUT_S} s"}).encode()
    except Exception:  # BentoML's answer to a failing API method, so that every route fails alike
        LOG.exception("/classify failed")
        return 500, json.dumps({"error": MODEL_FAILED}).encode()


GUARD = {
    "paths": ROUTES,
    "max_body": MAX_BODY_BYTES,
    "overloaded": LOAD.overloaded,
    "retry_after_s": RETRY_AFTER_S,
    "on_shed": lambda: METRICS.shed.inc(),
    "answered_here": {"/classify": classify_fast},
    "body_timeout": BODY_TIMEOUT_S,
}


def _guard_outermost() -> None:
    """Wrap the ASGI app BentoML builds in the request guard, so that `/classify` (answered by the guard) skips
    Starlette and BentoML's per-request middlewares: HTTP metrics, OpenTelemetry, the timeout (a task per
    request), the concurrency limit and the request context. The other routes pass the guard's checks and then
    all of them. BentoML has no option for this: the wrap is on its app factory (bentoml is pinned; the serving
    tests run through it)."""
    from _bentoml_impl.server.app import ServiceAppFactory

    stock = ServiceAppFactory.__call__
    if getattr(stock, "toolkit_guard", False):
        return

    def build(self):
        return RequestGuard(stock(self), **GUARD)

    build.toolkit_guard = True
    ServiceAppFactory.__call__ = build


_guard_outermost()
