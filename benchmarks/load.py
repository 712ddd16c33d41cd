"""Load benchmark: the toolkit BentoML service (ONNX INT8, adaptive batching) against the plain server a user
would otherwise write (transformers `pipeline` behind a threaded HTTP server), both on 127.0.0.1, same texts.

    flock /tmp/toolkit-heavy.lock python benchmarks/load.py runs/ci [--seconds 10]

RUN_DIR is a finished run (`python -m toolkit run recipes/ci.yaml`): its fine-tuned PyTorch model is the
baseline; the run's selected ONNX model (or, when it selected none, a dynamic-INT8 model of the PyTorch one made
here by the toolkit's export, optimize and quantize stages) is packaged into a temporary BentoML store and served. Prints one table row per scenario.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SCENARIOS = [("single", 1, 1), ("single", 8, 1), ("single", 32, 1), ("batch", 4, 16)]  # (api, clients, texts)


def served_artifact(run_dir: Path, work: Path):
    """The run's selection when it is ONNX, else an INT8 export of its PyTorch model; and the PyTorch model."""
    from toolkit.manifest import Artifact, Manifest
    from toolkit.stages.chain import int8_from_pytorch

    manifest = Manifest.load(run_dir)
    pytorch = next(
        Path(e["output"]["path"])
        for _, e in manifest.ordered()
        if e.get("output") and e["output"]["format"] == "pytorch"
    )
    selection = manifest.data.get("selection")
    selected = Artifact.from_json(selection["artifact"]) if selection else Artifact(pytorch, "pytorch", "train")
    if selected.format != "onnx":
        selected = Artifact(int8_from_pytorch(pytorch, work), "onnx", "int8")
    return manifest, selected, pytorch


def baseline_server(model: str, port: int, max_length: int) -> None:
    """What a user writes first: a transformers pipeline behind the standard library's threaded HTTP server."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import torch
    from transformers import pipeline

    torch.set_num_threads(os.cpu_count() or 1)
    classify = pipeline("text-classification", model=model, truncation=True, max_length=max_length)
    label2id = classify.model.config.label2id

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the BentoML server has

        def do_POST(self):  # noqa: N802
            text = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["text"]
            texts = text if isinstance(text, list) else [text]
            out = [
                {"categories": label2id[r["label"]], "probabilities": r["score"], "label": r["label"]}
                for r in classify(texts)
            ]
            body = json.dumps(out if isinstance(text, list) else out[0]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


def drive(url: str, texts: list[str], clients: int, per_request: int, seconds: float) -> dict:
    import requests

    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def client(offset: int) -> None:
        session = requests.Session()
        i = offset
        while time.perf_counter() < stop_at:
            chunk = [texts[(i + k) % len(texts)] for k in range(per_request)]
            body = {"text": chunk if per_request > 1 else chunk[0]}
            start = time.perf_counter()
            try:
                ok = session.post(url, json=body, timeout=60).status_code == 200
            except requests.RequestException:
                ok = False
            with lock:
                latencies.append(time.perf_counter() - start) if ok else None
                errors[0] += 0 if ok else 1
            i += per_request * clients

    threads = [threading.Thread(target=client, args=(c * per_request,)) for c in range(clients)]
    begin = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - begin
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [float("nan")] * 99
    return {
        "requests_s": len(latencies) / elapsed,
        "texts_s": len(latencies) * per_request / elapsed,
        "p50_ms": 1000 * q[49],
        "p95_ms": 1000 * q[94],
        "p99_ms": 1000 * q[98],
        "errors": errors[0],
        "requests": len(latencies),
    }


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 300) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("baseline server exited")
        try:
            requests.get(url, timeout=2)
            return
        except requests.RequestException:
            time.sleep(0.5)
    raise TimeoutError("baseline server not ready")


def run_scenarios(name: str, base: str, paths: tuple[str, str], texts: list[str], seconds: float) -> list[dict]:
    rows = []
    drive(f"{base}/{paths[0]}", texts, 4, 1, 2)  # warm-up: sessions, thread pools, first batches
    for api, clients, per_request in SCENARIOS:
        path = paths[0] if api == "single" else paths[1]
        row = drive(f"{base}/{path}", texts, clients, per_request, seconds)
        rows.append({"server": name, "api": api, "clients": clients, "texts/request": per_request, **row})
        print_row(rows[-1])
    return rows


HEADER = (
    f"{'server':<9} {'api':<7} {'clients':>7} {'texts/req':>9} {'req/s':>8} {'texts/s':>8} "
    f"{'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'errors':>6}"
)


def print_row(r: dict) -> None:
    print(
        f"{r['server']:<9} {r['api']:<7} {r['clients']:>7} {r['texts/request']:>9} {r['requests_s']:>8.1f} "
        f"{r['texts_s']:>8.1f} {r['p50_ms']:>8.1f} {r['p95_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['errors']:>6}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--seconds", type=float, default=10.0, help="per scenario")
    parser.add_argument("--texts", type=int, default=200)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--baseline-server", nargs=3, metavar=("MODEL", "PORT", "MAX_LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_server:
        model, port, max_length = args.baseline_server
        return baseline_server(model, int(port), int(max_length))

    work = Path(tempfile.mkdtemp(prefix="toolkit-load-"))
    os.environ["BENTOML_HOME"] = str(work / "bentoml")  # before bentoml is imported: a private model store
    from toolkit.serving.launch import free_port, serving, stop
    from toolkit.stages.package import save_to_store

    run_dir = args.run_dir.resolve()
    manifest, artifact, pytorch = served_artifact(run_dir, work)
    recipe = manifest.data["recipe"]
    max_length = recipe["model"]["max_length"]
    meta = {
        "format": "onnx",
        "stage": artifact.stage,
        "labels": manifest.data["data"]["label_names"],
        "max_length": max_length,
        "recipe": recipe["name"],
    }
    tag = save_to_store("load-benchmark", artifact, meta)
    from datasets import load_from_disk

    texts = load_from_disk(str(run_dir / "data" / "dataset"))["test"]["text"][: args.texts]
    print(f"machine: {os.cpu_count()} CPU cores; served {tag} ({artifact.path.name}); baseline {pytorch}")
    print(f"{len(texts)} test texts, max_length {max_length}, {args.seconds:.0f} s per scenario\n")
    print(HEADER)
    rows = []
    env = {"TOOLKIT_MODEL": tag}
    with serving(env, log=work / "serve.log") as url:
        rows += run_scenarios("toolkit", url, ("classify", "classify_batch"), texts, args.seconds)
    port = free_port()
    command = [sys.executable, __file__, str(run_dir), "--baseline-server", str(pytorch), str(port), str(max_length)]
    process = subprocess.Popen(command, start_new_session=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}/", process)
        rows += run_scenarios("pipeline", f"http://127.0.0.1:{port}", ("", ""), texts, args.seconds)
    finally:
        stop(process)
    ours, base = (next(r for r in rows if r["server"] == s and r["clients"] == 32) for s in ("toolkit", "pipeline"))
    print(
        f"\n32 single-text clients: {ours['requests_s'] / base['requests_s']:.1f}x the baseline's throughput, "
        f"p99 {ours['p99_ms']:.0f} ms vs {base['p99_ms']:.0f} ms, errors {ours['errors']} vs {base['errors']}"
    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
