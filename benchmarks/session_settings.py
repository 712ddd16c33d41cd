"""The served session's settings on this machine: what the `package` stage's `tune_runtime` measures (threads x
thread spinning x SkipLayerNorm fusion, interleaved rounds), on a finished run's selected ONNX model.

    python benchmarks/session_settings.py runs/full [--stage quantize] [--rounds 3]

Prints one table labelled with the CPU model and the date: each combination's median batch-1 p50, batch-32
texts/s and its speed-up over the default (all cores, spinning, unfused) in its worst and median round.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.int8_modes import data_max_length, run_data  # noqa: E402
from toolkit.manifest import Artifact  # noqa: E402
from toolkit.stages.tuning import tune_onnx  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--stage", help="an ONNX stage of the run; default: the run's selection")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    manifest, data = run_data(args.run)
    stage = args.stage or manifest.selection["stage"]
    artifact = Artifact.from_json(manifest.stage(stage)["output"])
    tuned = tune_onnx(artifact, data_max_length(manifest), list(data.texts("validation")), args.rounds)
    print(f"CPU: {tuned['cpu']} ({tuned['cores']} cores), {datetime.date.today()}, model: {stage}, "
          f"{tuned['texts']} validation texts, {tuned['rounds']} rounds")  # fmt: skip
    print(f"{'threads':>7} {'spin':>5} {'SLN fused':>9} {'b1 p50 ms':>9} {'b32 /s':>7} {'x worst':>7} {'x median':>8}")
    for r in tuned["candidates"]:
        print(f"{r['threads']:>7} {r['spin']!s:>5} {r['fuse_skip_layer_norm']!s:>9} {r['latency_p50_ms']:>9.2f} "
              f"{r['throughput_per_s']:>7.0f} {r['speedup_min']:>7.2f} {r['speedup_median']:>8.2f}")  # fmt: skip
    print(f"choice: {tuned['choice']}{' (the default)' if tuned['default_kept'] else ''}")


if __name__ == "__main__":
    main()
