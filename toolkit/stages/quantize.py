"""`quantize`: INT8 through Optimum's `ORTQuantizer`, dynamic (weights INT8 ahead of time, activations quantized
on the fly) or static (activation ranges calibrated on training texts), with the instruction set's kernel
configuration detected from the CPU or named. Before it, SmoothQuant (`toolkit.stages.smoothing`) moves activation
outliers into the weights, which then get one scale per output channel; after it, embedding tables become INT8
with one scale per row, and a call with padding runs its per-token work on the real tokens only
(`toolkit.stages.packing`).

ONNX Runtime's quantizer cannot type the outputs of fused contrib ops (Attention, SkipLayerNormalization), so
quantizing an O2/O3 graph as it is fails ("Unable to find data type for weight_name ..."). Symbolic shape
inference, which knows those ops, is run first on a copy of the graph."""

from __future__ import annotations

import platform
from pathlib import Path

from toolkit.config import QuantizeConfig
from toolkit.stages import packing, smoothing, token_scales
from toolkit.stages.base import Artifact, StageContext, StageResult

# ONNX Runtime's quantizer gives an embedding table one INT8 scale for every row: on the full recipe's student that
# alone cost about 0.7 points of agreement with FP32. `embeddings: int8_rows` gives each token's vector its own.
EMBEDDING_OPS = ("Gather", "EmbedLayerNormalization")


def detect_instruction_set(cpuinfo: Path = Path("/proc/cpuinfo"), machine: str | None = None) -> tuple[str, str]:
    """(instruction set, where it was read from): the best INT8 kernels this CPU runs."""
    machine = (machine or platform.machine()).lower()
    if machine in ("arm64", "aarch64"):
        return "arm64", f"platform.machine() = {machine}"
    if not cpuinfo.is_file():
        return "avx2", f"{cpuinfo} not readable; assumed avx2 (any x86-64 CPU from the last decade)"
    flags = set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    for name, needed in (("avx512_vnni", "avx512_vnni"), ("avx512", "avx512bw"), ("avx2", "avx2")):
        if needed in flags:
            return name, f"{cpuinfo} flag {needed}"
    raise ValueError(
        f"this CPU has none of the flags avx512_vnni, avx512bw, avx2 in {cpuinfo}; "
        "set `instruction_set` to one of avx512_vnni, avx512, avx2, arm64 for the machine that will serve the model"
    )


def shape_inferred_copy(source: Path, work: Path) -> Path:
    """The source folder's graph with every tensor typed, plus its config and tokenizer, in `work`: ONNX Runtime's
    documented pre-processing step (`quant_pre_process`), symbolic and ONNX shape inference. Its own graph
    optimization is skipped: the `optimize` stage already fused the graph as the recipe asked, and re-optimizing
    would fuse what it left unfused on purpose. Without the types, INT8 on a fused graph fails ("Unable to find
    data type for weight_name")."""
    import shutil

    from onnxruntime.quantization.shape_inference import quant_pre_process

    from toolkit.runtime import onnx_file

    shutil.copytree(source, work, ignore=shutil.ignore_patterns("*.onnx", "*.onnx_data"))
    src = onnx_file(source)
    quant_pre_process(src, work / src.name, skip_optimization=True, auto_merge=True)
    return work / src.name


def run(cfg: QuantizeConfig, ctx: StageContext) -> StageResult:
    import shutil

    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    from toolkit.runtime import onnx_file
    from toolkit.stages.onnx_common import fused_counts, onnx_source, op_counts

    source = onnx_source(ctx, cfg.type)
    if cfg.instruction_set == "auto":
        isa, detected_from = detect_instruction_set()
    else:
        isa, detected_from = cfg.instruction_set, "recipe"
    static = cfg.mode == "static"
    qconfig = getattr(AutoQuantizationConfig, isa)(is_static=static, per_channel=cfg.per_channel)
    if cfg.embeddings != "int8":
        qconfig.operators_to_quantize = [op for op in qconfig.operators_to_quantize if op not in EMBEDDING_OPS]
    if not static and cfg.activation_scales != "per_call":
        # An INT8 Transpose only moves an unfused attention's keys into a product of two activations, which the
        # per-token and calibrated rewrites leave in float anyway.
        qconfig.operators_to_quantize = [op for op in qconfig.operators_to_quantize if op != "Transpose"]
    work = ctx.out_dir / "_shape_inferred"
    info: dict = {}
    try:
        inferred = shape_inferred_copy(Path(source.path), work)
        fixed = not static and cfg.activation_scales == "calibrated"
        batches = calibration_batches(cfg, ctx, Path(source.path)) if cfg.smooth_quant is not None or fixed else None
        if cfg.smooth_quant is not None:
            info["smooth_quant"] = smoothing.smooth(inferred, batches, cfg.smooth_quant)
        quantizer = ORTQuantizer.from_pretrained(work, file_name=inferred.name)
        ranges = calibrate(quantizer, qconfig, cfg, ctx, Path(source.path), work, info) if static else None
        quantizer.quantize(qconfig, ctx.out_dir, file_suffix=None, calibration_tensors_range=ranges)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if cfg.embeddings == "int8_rows":
        info["int8_embedding_rows"] = int8_embedding_rows(onnx_file(ctx.out_dir))
    if not static and cfg.activation_scales == "per_token":
        info["token_scales"] = token_scales.per_token_scales(onnx_file(ctx.out_dir))
    elif fixed:
        info["token_scales"] = token_scales.calibrated_scales(onnx_file(ctx.out_dir), batches)
    # What a served answer may depend on: recorded for the report, the card and the serving-parity gate.
    info["batch_invariant"] = static or bool(info.get("token_scales", {}).get("applied"))
    counts = op_counts(onnx_file(ctx.out_dir))  # of the graph both packing branches run
    if cfg.pack_tokens:
        info["pack_tokens"] = packing.pack_tokens(onnx_file(ctx.out_dir))
    info.update(
        {
            "source": source.stage,
            "instruction_set": isa,
            "instruction_set_from": detected_from,
            "per_channel": cfg.per_channel,
            "mode": cfg.mode,
            "activation_scales": "fixed" if static else cfg.activation_scales,
            "quantized_ops": qconfig.operators_to_quantize,
            "embeddings": cfg.embeddings,
            "fused_ops": fused_counts(counts),
            "op_counts": counts,
        }
    )
    return StageResult(Artifact(ctx.out_dir, "onnx", cfg.name), info)


def int8_embedding_rows(path: Path, min_bytes: int = 1 << 20) -> list[str]:
    """Every FP32 embedding table (a 2-D initializer read by `Gather`) of at least `min_bytes` to INT8 with one
    scale per row, in place: the lookup reads INT8 rows and their scales and multiplies them back (three more
    small ops per call, not worth it for position or token-type tables). Returns the tables rewritten."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from toolkit.stages.onnx_common import topological_sort

    model = onnx.load(str(path))
    graph = model.graph
    tables = {t.name: t for t in graph.initializer if len(t.dims) == 2 and t.data_type == onnx.TensorProto.FLOAT}
    readers = [n for n in graph.node if n.input and n.input[0] in tables]
    done = []
    for node in readers:
        name = node.input[0]
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        uses = sum(name in n.input for n in graph.node)  # a table read anywhere else (tied weights) stays
        if node.op_type != "Gather" or axis != 0 or uses > 1:
            continue
        table = numpy_helper.to_array(tables[name])
        if table.nbytes < min_bytes:
            continue
        scale = np.abs(table).max(axis=1, keepdims=True) / 127.0
        scale[scale == 0] = 1.0
        rows = np.clip(np.round(table / scale), -127, 127).astype(np.int8)
        graph.initializer.remove(tables[name])
        graph.initializer.extend([numpy_helper.from_array(rows, f"{name}/int8"),
                                  numpy_helper.from_array(scale.astype(np.float32), f"{name}/row_scale")])  # fmt: skip
        out = node.output[0]
        node.input[0], node.output[0] = f"{name}/int8", f"{out}/int8"
        graph.node.extend([
            helper.make_node("Gather", [f"{name}/row_scale", node.input[1]], [f"{out}/row_scale"], name=f"{name}/scale"),
            helper.make_node("Cast", [f"{out}/int8"], [f"{out}/float"], to=onnx.TensorProto.FLOAT, name=f"{name}/cast"),
            helper.make_node("Mul", [f"{out}/float", f"{out}/row_scale"], [out], name=f"{name}/dequantize"),
        ])  # fmt: skip
        done.append(name)
    topological_sort(graph)
    onnx.save(model, str(path))
    return done


def training_texts(cfg: QuantizeConfig, ctx: StageContext) -> list[str]:
    if ctx.data is None:
        raise ValueError(
            "quantize calibrates on the run's training texts (smooth_quant, mode: static, activation_scales: "
            "calibrated) and was given no data; run it in a recipe, or set smooth_quant: null with mode: dynamic and "
            "activation_scales: per_token"
        )
    return ctx.data.texts("train", limit=cfg.calibration_samples)


def calibration_batches(cfg: QuantizeConfig, ctx: StageContext, source: Path) -> list[dict]:
    """The calibration texts tokenised in calls of 32 texts of similar length (less padding to run through)."""
    from toolkit.runtime import Tokenizer

    texts = sorted(training_texts(cfg, ctx), key=len)
    tokenizer = Tokenizer(source, ctx.max_length)
    return [tokenizer(texts[i : i + 32]) for i in range(0, len(texts), 32)]


def calibrate(quantizer, qconfig, cfg: QuantizeConfig, ctx: StageContext, source: Path, work: Path, info: dict):
    """Activation ranges from `calibration_samples` training texts, in the ONNX operator format (QLinearMatMul,
    QGemm: kernels ONNX Runtime's CPU provider runs as they are). The texts are padded to their longest, so every
    calibration method (the histogram ones need one shape) sees the same inputs."""
    import time

    from datasets import Dataset
    from onnxruntime.quantization import QuantFormat
    from optimum.onnxruntime.configuration import AutoCalibrationConfig

    from toolkit.runtime import Tokenizer

    texts = training_texts(cfg, ctx)
    encoded = Tokenizer(source, ctx.max_length)(texts)
    dataset = Dataset.from_dict({name: array.tolist() for name, array in encoded.items()})
    method = {
        "minmax": lambda: AutoCalibrationConfig.minmax(dataset),
        "entropy": lambda: AutoCalibrationConfig.entropy(dataset),
        "percentile": lambda: AutoCalibrationConfig.percentiles(dataset, percentile=99.99),
    }[cfg.calibration_method]()
    qconfig.format = QuantFormat.QOperator
    start = time.perf_counter()
    ranges = quantizer.fit(
        dataset=dataset,
        calibration_config=method,
        operators_to_quantize=qconfig.operators_to_quantize,
        onnx_augmented_model_name=work / "augmented.onnx",
    )
    info["calibration"] = {
        "method": cfg.calibration_method,
        "texts": len(texts),
        "padded_length": int(encoded["input_ids"].shape[1]),
        "seconds": round(time.perf_counter() - start, 2),
    }
    return ranges
