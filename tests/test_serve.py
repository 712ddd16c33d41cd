"""The real `bentoml serve` on a loopback port with a tiny packaged model: answers, bad input, concurrency."""

from __future__ import annotations

import asyncio
import http.client
import json
import select
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests

from toolkit.serving.guard import RequestGuard
from toolkit.serving.launch import serving
from toolkit.stages.base import Artifact

LABELS = ["negative", "positive"]
MAX_LENGTH = 16
LIMITS = {"TOOLKIT_MAX_BATCH": "8", "TOOLKIT_MAX_CHARS": "300"}


def classifier_folder(tiny_model: Path, dest: Path) -> Path:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_model, num_labels=2, id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)}
    )
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(dest)
    return dest


def onnx_folder(pytorch: Path, dest: Path) -> Path:
    from optimum.onnxruntime import ORTModelForSequenceClassification
    from transformers import AutoTokenizer

    ORTModelForSequenceClassification.from_pretrained(pytorch, export=True).save_pretrained(dest)
    AutoTokenizer.from_pretrained(pytorch).save_pretrained(dest)
    return dest


def reference(folder: Path, texts: list[str]) -> tuple[list[int], list[float]]:
    """The model's own predictions, through Optimum (not the service's runtime)."""
    from optimum.onnxruntime import ORTModelForSequenceClassification
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = ORTModelForSequenceClassification.from_pretrained(folder)
    batch = tokenizer(texts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="np")
    logits = model(**batch).logits
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    ids = probs.argmax(-1)
    return ids.tolist(), probs[np.arange(len(ids)), ids].tolist()


def packed_graph(exported: Path, dest: Path) -> Path:
    """The exported graph fused (`optimize`) and token-packed as `quantize` packs its INT8 graph, in FP32: the
    service runs the packed branch for a padded call and the plain one for a single text, and answers as the
    unpacked graph does, within rounding."""
    from toolkit.config import OptimizeConfig
    from toolkit.runtime import onnx_file
    from toolkit.stages import optimize
    from toolkit.stages.base import StageContext
    from toolkit.stages.packing import pack_tokens

    dest.mkdir()
    source = Artifact(exported, "onnx", "export")
    optimize.run(OptimizeConfig(type="optimize"), StageContext(run_dir=dest.parent, out_dir=dest, source=source))
    assert pack_tokens(onnx_file(dest))["applied"]
    return dest


@pytest.fixture
def packaged_onnx(tiny_model, tmp_path) -> Path:
    """The store holds the packed graph; returned is the plain export, which the service's answers are checked
    against."""
    from toolkit.stages.package import save_to_store

    exported = onnx_folder(classifier_folder(tiny_model, tmp_path / "pt"), tmp_path / "onnx")
    folder = packed_graph(exported, tmp_path / "packed")
    meta = {"format": "onnx", "stage": "quantize", "labels": LABELS, "max_length": MAX_LENGTH, "recipe": "toy"}
    save_to_store("toy-onnx", Artifact(folder, "onnx", "quantize"), meta)
    return exported


def post(url: str, path: str, body) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body)
    return requests.post(f"{url}/{path}", data=data, headers={"Content-Type": "application/json"}, timeout=30)


TEXTS = [
    "the movie was great",
    "awful plot and dull actor",
    "a lovely story",
    "bad",
    " ".join(["very"] * 50) + " superb",  # longer than the model: truncated, not an error
]

BAD = [
    ("classify", {}, "Field required"),
    ("classify", {"texts": "x"}, "Field required"),
    ("classify", {"text": 5}, "valid string"),
    ("classify", {"text": ["a"]}, "valid string"),
    ("classify", {"text": ""}, "text is empty"),
    ("classify", {"text": "   "}, "text is empty"),
    ("classify", {"text": "x" * 301}, "at most 300 characters"),
    ("classify", b'{"text": ', "Invalid JSON"),
    ("classify", b"not json", "Invalid JSON"),
    ("classify", b'{"text": "caf\xe9"}', "Invalid JSON"),
    ("classify", b"\xff\xfe\x00", "Invalid JSON"),
    ("classify_batch", {"text": []}, "at least 1 item"),
    ("classify_batch", {"text": "one"}, "valid array"),
    ("classify_batch", {"text": ["ok", 3]}, "valid string"),
    ("classify_batch", {"text": ["ok", ""]}, "text is empty"),
    ("classify_batch", {"text": ["a"] * 9}, "at most 8 items"),
    ("classify_batch", {"text": ["a", "x" * 301]}, "at most 300 characters"),
    ("classify_batch", {}, "Field required"),
]


@pytest.mark.slow
def test_service_answers_rejects_bad_input_and_batches(packaged_onnx, tmp_path):
    expected_ids, expected_probs = reference(packaged_onnx, TEXTS)
    with serving(LIMITS, log=tmp_path / "serve.log") as url:
        for text, cat, prob in zip(TEXTS, expected_ids, expected_probs, strict=True):
            response = post(url, "classify", {"text": text})
            assert response.status_code == 200, response.text
            assert response.json() == {
                "categories": cat,
                "probabilities": pytest.approx(prob, abs=1e-5),
                "label": LABELS[cat],
            }

        response = post(url, "classify_batch", {"text": TEXTS})
        assert response.status_code == 200, response.text
        assert response.json() == {
            "categories": expected_ids,
            "probabilities": pytest.approx(expected_probs, abs=1e-5),
            "labels": [LABELS[i] for i in expected_ids],
        }

        for path, body, message in BAD:
            response = post(url, path, body)
            assert 400 <= response.status_code < 500, (path, body, response.status_code, response.text)
            assert message in response.text, (path, body, response.text)

        many = [TEXTS[i % len(TEXTS)] for i in range(50)]
        with ThreadPoolExecutor(50) as pool:
            answers = list(pool.map(lambda t: post(url, "classify", {"text": t}), many))
        assert [a.status_code for a in answers] == [200] * 50
        assert [a.json()["categories"] for a in answers] == [expected_ids[i % len(TEXTS)] for i in range(50)]

        for probe in ("livez", "readyz", "metrics"):
            assert requests.get(f"{url}/{probe}", timeout=10).status_code == 200
        metrics = requests.get(f"{url}/metrics", timeout=10).text
        assert "bentoml_service_request_total" in metrics


@pytest.mark.slow
def test_bento_ships_the_service_and_its_runtime_only(packaged_onnx, tmp_path):
    """`bentoml build` copies serving and runtime code only, and the service imports from that copy alone."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TOOLKIT_MODEL": "toy-onnx:latest"}
    built = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "--output", "tag"], cwd=root, env=env, capture_output=True, text=True
    )
    assert built.returncode == 0, built.stdout + built.stderr
    src = next((Path(os.environ["BENTOML_HOME"]) / "bentos" / "toolkit-classifier").glob("*/src"))
    shipped = sorted(p.relative_to(src).parts[1] for p in src.rglob("*.py") if p.parts[-2] != "toolkit")
    assert set(shipped) == {"serving", "runtime"}, shipped
    heavy = "('torch', 'transformers', 'datasets', 'accelerate', 'textbrewer', 'optimum')"
    code = f"import toolkit, toolkit.serving.service, sys; print(toolkit.__file__); print([m for m in {heavy} if m in sys.modules])"
    ran = subprocess.run([sys.executable, "-c", code], cwd=src, env=env, capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.splitlines()[0].startswith(str(src)), ran.stdout
    assert ran.stdout.splitlines()[1] == "[]", ran.stdout  # no training library is loaded to serve


def raw_post(url: str, path: str, body: bytes, headers: dict[str, str]) -> requests.Response:
    return requests.post(f"{url}/{path}", data=body, headers=headers, timeout=30)


@pytest.mark.slow
def test_http_contract_media_types_body_size_and_openapi(packaged_onnx, tmp_path):
    env = {**LIMITS, "TOOLKIT_MAX_BODY_BYTES": "4096"}
    with serving(env, log=tmp_path / "serve.log") as url:
        for path in ("classify", "classify_batch"):
            for headers, body in (
                ({"Content-Type": "multipart/form-data"}, b"x"),
                ({"Content-Type": "multipart/form-data; boundary=zz"}, b"--zz\r\n\r\nhello\r\n--zz--\r\n"),
                ({"Content-Type": "text/plain"}, b"a good film"),
                ({"Content-Type": "application/x-www-form-urlencoded"}, b"text=good"),
                ({}, b""),
            ):
                answer = raw_post(url, path, body, headers)
                assert answer.status_code == 415, (path, headers, answer.status_code, answer.text)
                assert "application/json" in answer.json()["error"]
            big = json.dumps({"text": "x" * 10_000}).encode()
            answer = raw_post(url, path, big, {"Content-Type": "application/json"})
            assert answer.status_code == 413 and "over 4096 bytes" in answer.json()["error"]

            def chunks(data=big):
                yield from (data[i : i + 1000] for i in range(0, len(data), 1000))

            answer = requests.post(f"{url}/{path}", data=chunks(), headers={"Content-Type": "application/json"})
            assert answer.status_code == 413, answer.text
        ok = raw_post(url, "classify", b'{"text": "fine"}', {"Content-Type": "application/json; charset=utf-8"})
        assert ok.status_code == 200, ok.text

        spec = requests.get(f"{url}/docs.json", timeout=10).json()
        for path in ("/classify", "/classify_batch"):
            operation = spec["paths"][path]["post"]
            assert operation["requestBody"]["required"] is True
            assert {"400", "413", "415", "503"} <= set(operation["responses"])
            assert "Retry-After" in operation["responses"]["503"]["headers"]
        text = spec["paths"]["/classify"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert text["properties"]["text"]["maxLength"] == 300 and "pattern" in text["properties"]["text"]


@pytest.mark.slow
def test_overload_is_shed_with_503_and_retry_after_then_recovers(packaged_onnx, tmp_path):
    env = {**LIMITS, "TOOLKIT_MAX_PENDING": "8", "TOOLKIT_RETRY_AFTER_S": "2"}
    batch = {"text": [" ".join(["a lovely story"] * 20)] * 8}
    with serving(env, log=tmp_path / "serve.log") as url:
        shed = []
        for _ in range(5):  # bounded: a few bursts until the queue overflows at least once
            with ThreadPoolExecutor(64) as pool:
                answers = list(pool.map(lambda _: post(url, "classify_batch", batch), range(64)))
            assert {a.status_code for a in answers} <= {200, 503}
            shed = [a for a in answers if a.status_code == 503]
            if shed:
                break
        assert shed, "64 concurrent batches never filled an 8-text queue"
        assert all(a.headers["Retry-After"] == "2" and "queue is full" in a.json()["error"] for a in shed)
        assert any(a.status_code == 200 for a in answers)
        recovered = post(url, "classify_batch", batch)
        assert recovered.status_code == 200 and len(recovered.json()["categories"]) == 8
        metrics = requests.get(f"{url}/metrics", timeout=10).text
        assert "toolkit_shed_requests_total" in metrics and "toolkit_model_batch_size_bucket" in metrics
        shed_count = next(line for line in metrics.splitlines() if line.startswith("toolkit_shed_requests_total"))
        assert float(shed_count.split()[-1]) >= len(shed)


@pytest.mark.slow
def test_schemathesis_finds_nothing_on_the_classify_routes(packaged_onnx, tmp_path):
    import shutil
    import subprocess
    import sys

    cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert cli, "schemathesis is a dev dependency"
    with serving(LIMITS, log=tmp_path / "serve.log") as url:
        done = subprocess.run(
            [
                cli,
                "run",
                f"{url}/docs.json",
                "--checks",
                "all",
                "--include-path-regex",
                "/classify",
                "--max-examples",
                "100",
                "--seed",
                "1",
            ],  # fmt: skip
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp_path,
        )
    assert done.returncode == 0, done.stdout[-4000:]
    assert "No issues found" in done.stdout


@pytest.mark.slow
def test_tei_compatible_predict_route(packaged_onnx, tmp_path):
    """`/predict` answers as Text Embeddings Inference does: every class, the most likely first; a batch is
    [[text], ...]; `raw_scores` gives logits. The same numbers as `/classify`."""
    expected_ids, expected_probs = reference(packaged_onnx, TEXTS)
    with serving(LIMITS, log=tmp_path / "serve.log") as url:
        for text, cat, prob in zip(TEXTS, expected_ids, expected_probs, strict=True):
            for inputs in (text, [text]):
                answer = post(url, "predict", {"inputs": inputs})
                assert answer.status_code == 200, answer.text
                classes = answer.json()
                assert [c["label"] for c in classes][0] == LABELS[cat] and len(classes) == len(LABELS)
                assert classes[0]["score"] == pytest.approx(prob, abs=1e-5)
                assert sum(c["score"] for c in classes) == pytest.approx(1.0)
        batch = post(url, "predict", {"inputs": [[t] for t in TEXTS], "raw_scores": True})
        assert batch.status_code == 200, batch.text
        rows = batch.json()
        assert len(rows) == len(TEXTS) and [r[0]["label"] for r in rows] == [LABELS[i] for i in expected_ids]
        assert all(r[0]["score"] >= r[1]["score"] for r in rows)
        assert any(c["score"] < 0 for r in rows for c in r) or any(c["score"] > 1 for r in rows for c in r)  # logits
        for body, message in (
            ({"inputs": ["a text", "its pair"]}, "sentence pairs are not supported"),
            ({"inputs": [["a", "b"]]}, "sentence pairs are not supported"),
            ({"inputs": []}, "inputs"),
            ({"inputs": " "}, "text is empty"),
            ({"text": "x"}, "Field required"),
        ):
            answer = post(url, "predict", body)
            assert answer.status_code == 400 and message in answer.text, (body, answer.text)


@pytest.mark.slow
def test_classify_is_answered_in_front_of_bentomls_middlewares(packaged_onnx, tmp_path):
    """`/classify` is answered by the guard before BentoML's per-request middlewares: not in their request
    metrics, where `/classify_batch` is. (Its own timeout is the micro-batcher's: tests/test_batching.py.)"""
    with serving(LIMITS, log=tmp_path / "serve.log") as url:
        assert post(url, "classify", {"text": "a lovely story"}).status_code == 200
        assert post(url, "classify_batch", {"text": ["a lovely story"]}).status_code == 200
        counted = [line for line in requests.get(f"{url}/metrics", timeout=10).text.splitlines()
                   if "request_total{" in line and float(line.split()[-1]) > 0]  # fmt: skip
        assert any('endpoint="/classify_batch"' in line for line in counted), counted
        assert not any('endpoint="/classify"' in line for line in counted), counted


@pytest.fixture
def packaged_failing_model(tiny_model, tmp_path) -> str:
    """A packaged ONNX model with fewer embedding rows (40) than its tokenizer has tokens: a text of the first ids
    ("a") runs, one with later ids fails in ONNX Runtime's Gather, a real model error. Returns its tag."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from toolkit.stages.package import save_to_store

    config = BertConfig.from_pretrained(tiny_model, vocab_size=40, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(tmp_path / "pt")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path / "pt")
    folder = onnx_folder(tmp_path / "pt", tmp_path / "onnx")
    meta = {"format": "onnx", "stage": "export", "labels": LABELS, "max_length": MAX_LENGTH, "recipe": "toy"}
    save_to_store("toy-failing", Artifact(folder, "onnx", "export"), meta)
    return "toy-failing:latest"


def trickle(url: str, path: str, give_up_s: float = 6.0) -> tuple[http.client.HTTPResponse, float]:
    """POST a JSON body one byte every 0.2 s, as a slow or hostile client does, until the server answers: the answer
    and the seconds it took."""
    host, port = url.removeprefix("http://").split(":")
    head = f"POST /{path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    body = iter(b'{"text": "' + b"x" * 989)
    start = time.monotonic()
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(head.encode())
    while not select.select([sock], [], [], 0.2)[0]:
        assert time.monotonic() - start < give_up_s, f"/{path} still reading a trickled body after {give_up_s} s"
        try:
            sock.sendall(bytes([next(body)]))
        except ConnectionError:  # answered and closed meanwhile: the answer is there to read
            break
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response, time.monotonic() - start


@pytest.mark.slow
def test_a_trickled_body_gets_408_and_a_failing_model_call_a_json_500(packaged_failing_model, tmp_path):
    env = {**LIMITS, "TOOLKIT_MODEL": packaged_failing_model, "TOOLKIT_BODY_TIMEOUT_S": "1"}
    with serving(env, log=tmp_path / "serve.log") as url:
        failing = "the movie was superb"  # ids past the model's 40 embedding rows
        for path, body in (
            ("classify", {"text": failing}),
            ("classify_batch", {"text": ["a", failing]}),
            ("predict", {"inputs": failing}),
        ):
            response = post(url, path, body)
            assert response.status_code == 500, (path, response.status_code, response.text)
            assert response.headers["content-type"] == "application/json", (path, response.headers)
            assert "check the server log" in response.json()["error"], (path, response.text)
        for path in ("classify", "classify_batch", "predict"):
            response, seconds = trickle(url, path)
            assert response.status == 408, (path, response.status, response.read())
            assert "not received within 1 s" in json.loads(response.read())["error"]
            assert 0.9 < seconds < 4, (path, seconds)

        assert post(url, "classify", {"text": "a"}).status_code == 200  # the lane carries on
    assert "/classify failed" in (tmp_path / "serve.log").read_text()  # with the model's traceback


@pytest.mark.parametrize("python310", [False, True], ids=["asyncio.timeout", "3.10 wait_for"])
def test_the_guard_answers_408_to_a_body_slower_than_its_deadline(monkeypatch, python310):
    """Both ways the guard bounds the read: asyncio.timeout, and wait_for where Python 3.10 has no timeout."""
    if python310:
        monkeypatch.delattr(asyncio, "timeout")
    reached = []

    async def app(scope, receive, send):
        reached.append(await receive())

    async def one_byte_at_a_time():
        await asyncio.sleep(0.05)
        return {"type": "http.request", "body": b"{", "more_body": True}

    sent = []

    async def send(message):
        sent.append(message)

    guard = RequestGuard(app, ("/classify_batch",), max_body=1000, overloaded=lambda: False, body_timeout=0.3)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"100")]
    scope = {"type": "http", "method": "POST", "path": "/classify_batch", "headers": headers}
    asyncio.run(guard(scope, one_byte_at_a_time, send))
    assert not reached and sent[0]["status"] == 408, sent
    assert json.loads(sent[1]["body"]) == {"error": "request body not received within 0.3 s; send it at once"}
