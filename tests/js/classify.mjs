// transformers.js on a pushed repo folder, offline: `node classify.mjs [REQUEST.json]` (or the request on stdin),
// REQUEST = {"model_dir": DIR, "dtype": "q8" | "fp32", "texts": [...]}. Prints one JSON line describing the run
// ({"transformers_js", "dtype", "files": the model files it read}), then one line per text: {"label", "scores"}
// with every label's probability. Run by tests/compat.py (`transformers_js_classes`).
import fs from "node:fs";
import path from "node:path";

import { env, pipeline } from "@huggingface/transformers";

const request = JSON.parse(fs.readFileSync(process.argv[2] ?? 0, "utf8"));
const folder = path.resolve(request.model_dir);
env.allowRemoteModels = false; // the folder, nothing else: no Hub, no cache of another run
env.allowLocalModels = true;
env.useBrowserCache = false;
env.localModelPath = path.dirname(folder) + path.sep;

const files = new Set();
const classify = await pipeline("text-classification", path.basename(folder), {
  dtype: request.dtype,
  device: "cpu",
  progress_callback: (event) => event.file && files.add(event.file),
});
console.log(JSON.stringify({ transformers_js: env.version, dtype: request.dtype, files: [...files].sort() }));
for (const text of request.texts) {
  const ranked = await classify(text, { top_k: null }); // every label, best first
  const scores = Object.fromEntries(ranked.map((r) => [r.label, r.score]));
  console.log(JSON.stringify({ label: ranked[0].label, scores }));
}
