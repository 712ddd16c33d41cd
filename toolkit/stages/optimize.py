"""`optimize`: ONNX Runtime's transformer graph optimizer through Optimum's `ORTOptimizer` (O1: generic graph
rewrites; O2: plus transformer fusions such as Attention, BiasGelu and (for the GPU) SkipLayerNormalization; O3: plus the FastGelu
approximation), optionally converted to FP16. The fused node types are counted in the result, because a
transformers release that changes the exported graph can make fusion stop without any error."""

from __future__ import annotations

from toolkit.config import OptimizeConfig
from toolkit.stages.base import Artifact, StageContext, StageResult


def resolve_fp16(choice: str | bool, device: str) -> bool:
    from toolkit.runtime import resolve_device

    if choice != "auto":
        return bool(choice)
    return resolve_device(device, "onnx") == "cuda"


def run(cfg: OptimizeConfig, ctx: StageContext) -> StageResult:
    from optimum.onnxruntime import AutoOptimizationConfig, ORTOptimizer

    from toolkit.runtime import onnx_file
    from toolkit.stages import pooled
    from toolkit.stages.onnx_common import fused_counts, onnx_source, op_counts

    source = onnx_source(ctx, cfg.type)
    src_file = onnx_file(source.path)
    fp16 = resolve_fp16(cfg.fp16, ctx.device)
    # FP16 conversion targets the GPU; optimizing for the GPU also picks GPU-only fusions where there are some.
    fuse_sln = fp16 if cfg.fuse_skip_layer_norm == "auto" else bool(cfg.fuse_skip_layer_norm)
    options = AutoOptimizationConfig.with_optimization_level(
        cfg.level,
        for_gpu=fp16,
        fp16=fp16,
        disable_skip_layer_norm_fusion=not fuse_sln,
        disable_bias_skip_layer_norm_fusion=not fuse_sln,
    )
    ORTOptimizer.from_pretrained(source.path, file_names=[src_file.name]).optimize(
        options, ctx.out_dir, file_suffix=None
    )
    tail = pooled.pooled_tail(onnx_file(ctx.out_dir)) if cfg.pooled_tail else {"applied": False, "reason": "off"}
    before, after = op_counts(src_file), op_counts(onnx_file(ctx.out_dir))
    fused = fused_counts(after)
    info = {
        "source": source.stage,
        "level": cfg.level,
        "fp16": fp16,
        "skip_layer_norm_fused": fuse_sln,
        "fused_ops": fused,
        "nodes_before": sum(before.values()),
        "nodes_after": sum(after.values()),
        "op_counts": after,
        "pooled_tail": tail,
    }
    if cfg.level != "O1" and not any(op in fused for op in ("Attention", "MultiHeadAttention")):
        info["warning"] = "no attention fusion happened; the transformers export may have changed its graph"
    return StageResult(Artifact(ctx.out_dir, "onnx", cfg.name), info)
