"""Load benchmark: the toolkit BentoML service against the servers a user would otherwise write, on 127.0.0.1,
same texts, load from `wrk` (one client thread: it does not eat the servers' cores).

    python benchmarks/load.py runs/full [--seconds 15] [--json out.json]

RUN_DIR is a finished run (`toolkit run recipes/full.yaml`). Three servers, one after the other, in one run:
- `toolkit`: `bentoml serve` on the run's selected ONNX model (or an INT8 model of its fine-tuned one, made here
  by the toolkit's export, optimize and quantize stages);
- `optimum`: the same ONNX file through `ORTModelForSequenceClassification` and transformers' `pipeline` behind
  `http.server.ThreadingHTTPServer` (what fifteen lines around Optimum give), with as many intra-op threads;
- `pytorch`: transformers' `pipeline` on the run's fine-tuned PyTorch model behind the same HTTP server.
Also the served model's own capacity (batches of 32 in-process through `toolkit.runtime`). Prints one table and
the ratios the service is judged by, labelled with the CPU model and the date. Needs `wrk` (Debian package).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from toolkit.runtime import cpu_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (api, clients, texts per request)
SCENARIOS = [("single", 1, 1), ("single", 8, 1), ("single", 32, 1), ("batch", 4, 32)]

WRK_SCRIPT = """wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local bodies = {
%s
}
local i = 0
request = function()
  i = (i %% #bodies) + 1
  return wrk.format(nil, nil, nil, bodies[i])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('RESULT {"requests": %%d, "seconds": %%f, "p50": %%f, "p95": %%f, "p99": %%f, "errors": %%d}\\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1e3, latency:percentile(95) / 1e3,
    latency:percentile(99) / 1e3, e.connect + e.read + e.write + e.status + e.timeout))
end
"""


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
    selection = manifest.selection
    selected = Artifact.from_json(selection["artifact"]) if selection else Artifact(pytorch, "pytorch", "train")
    if selected.format != "onnx":
        selected = Artifact(int8_from_pytorch(pytorch, work), "onnx", "int8")
    return manifest, selected, pytorch


def naive_server(kind: str, model: str, port: int, max_length: int, threads: int) -> None:
    """What a user writes first: a transformers pipeline behind the standard library's threaded HTTP server."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from transformers import AutoTokenizer, pipeline

    if kind == "optimum":
        import onnxruntime
        from optimum.onnxruntime import ORTModelForSequenceClassification

        from toolkit.runtime import onnx_file

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        file = onnx_file(model)
        loaded = ORTModelForSequenceClassification.from_pretrained(model, file_name=file.name, session_options=options)
    else:
        import torch
        from transformers import AutoModelForSequenceClassification

        torch.set_num_threads(threads)
        loaded = AutoModelForSequenceClassification.from_pretrained(model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    classify = pipeline(
        "text-classification", model=loaded, tokenizer=tokenizer, truncation=True, max_length=max_length
    )
    label2id = loaded.config.label2id

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the BentoML server has
        # Headers and body go out in two writes: with Nagle's algorithm each answer waits for the client's
        # delayed ACK (40 ms). A fair baseline does not pay that.
        disable_nagle_algorithm = True

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


def wrk_scripts(texts: list[str], work: Path) -> dict[int, Path]:
    """One wrk script per texts-per-request, cycling through the test texts."""
    scripts = {}
    for per_request in sorted({s[2] for s in SCENARIOS}):
        if per_request == 1:
            bodies = [json.dumps({"text": t}) for t in texts]
        else:
            bodies = [json.dumps({"text": texts[i : i + per_request]}) for i in range(0, len(texts), per_request)]
            bodies = [b for b in bodies if len(json.loads(b)["text"]) == per_request]
        path = work / f"wrk-{per_request}.lua"
        path.write_text(WRK_SCRIPT % ",\n".join(f"[==[{b}]==]" for b in bodies))
        scripts[per_request] = path
    return scripts


def drive(url: str, script: Path, clients: int, seconds: float) -> dict:
    command = ["wrk", "-t1", f"-c{clients}", f"-d{seconds:.0f}s", "--timeout", "10s", "-s", str(script), url]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT ")).removeprefix("RESULT "))


def run_scenarios(name: str, base: str, paths: tuple[str, str], scripts: dict, seconds: float) -> list[dict]:
    rows = []
    drive(f"{base}/{paths[0]}", scripts[1], 4, 3)  # warm-up: sessions, thread pools, first batches
    for api, clients, per_request in SCENARIOS:
        path = paths[0] if api == "single" else paths[1]
        result = drive(f"{base}/{path}", scripts[per_request], clients, seconds)
        req_s = result["requests"] / result["seconds"]
        row = {"server": name, "api": api, "clients": clients, "texts/request": per_request, "requests_s": req_s,
               "texts_s": req_s * per_request, "p50_ms": result["p50"], "p95_ms": result["p95"],
               "p99_ms": result["p99"], "errors": result["errors"]}  # fmt: skip
        rows.append(row)
        print_row(row)
    return rows


def model_capacity(folder: Path, max_length: int, texts: list[str], threads: int, seconds: float) -> float:
    """Texts/s of the served model alone, batches of 32, tokenisation included (the service's runtime)."""
    from toolkit.runtime import load_model

    model = load_model(folder, "onnx", max_length, threads, "cpu")
    batches = [texts[i : i + 32] for i in range(0, len(texts) - 31, 32)]
    for batch in batches[:3]:
        model.logits(batch)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for batch in batches:
            model.logits(batch)
            done += len(batch)
    return done / (time.perf_counter() - start)


HEADER = (
    f"{'server':<8} {'api':<7} {'clients':>7} {'texts/req':>9} {'req/s':>8} {'texts/s':>8} "
    f"{'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'errors':>6}"
)


def print_row(r: dict) -> None:
    print(
        f"{r['server']:<8} {r['api']:<7} {r['clients']:>7} {r['texts/request']:>9} {r['requests_s']:>8.1f} "
        f"{r['texts_s']:>8.1f} {r['p50_ms']:>8.2f} {r['p95_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['errors']:>6}",
        flush=True,
    )


def start_naive(kind: str, model: Path, max_length: int, threads: int, log: Path):
    """The naive server in its own process; its output (connection resets when wrk stops) goes to `log`."""
    from toolkit.serving.launch import free_port

    port = free_port()
    command = [sys.executable, __file__, "--naive-server", kind, str(model), str(port), str(max_length), str(threads)]
    with open(log, "w") as out:
        process = subprocess.Popen(command, start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
    return process, f"http://127.0.0.1:{port}"


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 300) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server for {url} exited")
        try:
            requests.get(url, timeout=2)
            return
        except requests.RequestException:
            time.sleep(0.5)
    raise TimeoutError(f"server for {url} not ready")


def summary(rows: list[dict], capacity: float) -> list[str]:
    def row(server, api, clients):
        return next(r for r in rows if (r["server"], r["api"], r["clients"]) == (server, api, clients))

    ours32, batch, naive32 = row("toolkit", "single", 32), row("toolkit", "batch", 4), row("optimum", "single", 32)
    ours1, naive1 = row("toolkit", "single", 1), row("optimum", "single", 1)
    return [
        f"model alone (batches of 32, in-process): {capacity:.0f} texts/s",
        f"32 single-text clients vs the batch API: {ours32['texts_s'] / batch['texts_s']:.0%} "
        f"({ours32['texts_s']:.0f} vs {batch['texts_s']:.0f} texts/s; target >= 85%)",
        f"32 single-text clients vs the naive Optimum server: {ours32['requests_s'] / naive32['requests_s']:.2f}x "
        f"(target >= 1.5x), p99 {ours32['p99_ms']:.1f} vs {naive32['p99_ms']:.1f} ms, "
        f"errors {ours32['errors']} vs {naive32['errors']}",
        f"1 client p50: {ours1['p50_ms']:.2f} ms vs the naive Optimum server's {naive1['p50_ms']:.2f} ms",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, nargs="?")
    parser.add_argument("--seconds", type=float, default=15.0, help="per scenario")
    parser.add_argument("--texts", type=int, default=512)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads of every server; 0: every core")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--naive-server", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.naive_server:
        kind, model, port, max_length, threads = args.naive_server
        return naive_server(kind, model, int(port), int(max_length), int(threads))
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install wrk")

    work = Path(tempfile.mkdtemp(prefix="toolkit-load-"))
    os.environ["BENTOML_HOME"] = str(work / "bentoml")  # before bentoml is imported: a private model store
    from toolkit.runtime import resolve_threads
    from toolkit.serving.launch import serving, stop
    from toolkit.stages.package import save_to_store

    threads = resolve_threads(args.threads)
    run_dir = args.run_dir.resolve()
    manifest, artifact, pytorch = served_artifact(run_dir, work)
    max_length = manifest.data["recipe"]["model"]["max_length"]
    meta = {"format": "onnx", "stage": artifact.stage, "labels": manifest.data["data"]["label_names"],
            "max_length": max_length, "recipe": manifest.data["recipe"]["name"]}  # fmt: skip
    tag = save_to_store("load-benchmark", artifact, meta)
    from datasets import load_from_disk

    texts = load_from_disk(str(run_dir / "data" / "dataset"))["test"]["text"][: args.texts]
    scripts = wrk_scripts(texts, work)
    print(f"CPU: {cpu_model()} ({os.cpu_count()} cores), {datetime.date.today()}, {threads} intra-op threads")
    print(f"served {tag} ({artifact.path}); PyTorch baseline {pytorch}")
    print(f"{len(texts)} test texts, max_length {max_length}, {args.seconds:.0f} s per scenario, wrk -t1\n")
    print(HEADER)
    rows = []
    with serving({"TOOLKIT_MODEL": tag, "TOOLKIT_THREADS": str(threads)}, log=work / "serve.log") as url:
        rows += run_scenarios("toolkit", url, ("classify", "classify_batch"), scripts, args.seconds)
    for kind, model in (("optimum", Path(artifact.path)), ("pytorch", pytorch)):
        process, url = start_naive(kind, model, max_length, threads, work / f"{kind}.log")
        try:
            wait_ready(f"{url}/", process)
            rows += run_scenarios(kind, url, ("", ""), scripts, args.seconds)
        finally:
            stop(process)
    capacity = model_capacity(Path(artifact.path), max_length, texts, threads, min(args.seconds, 10))
    print()
    for line in summary(rows, capacity):
        print(line)
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_model(), "rows": rows, "model_texts_s": capacity}, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
