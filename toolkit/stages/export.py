"""`export`: the current PyTorch model to an ONNX folder that `ORTModelForSequenceClassification` loads
(`model.onnx`, config with the label names, tokenizer). Pruned heads (any count per layer) and a sliced FFN
export as they are: the traced graph follows the modules' actual shapes."""

from __future__ import annotations

from toolkit.config import ExportConfig
from toolkit.stages.base import Artifact, StageContext, StageResult


def pytorch_source(ctx: StageContext) -> Artifact:
    """The model to export: the current one, or the newest PyTorch model when the current one is already ONNX."""
    if ctx.source.format == "pytorch":
        return ctx.source
    latest = ctx.latest("pytorch")
    if latest is None:
        raise ValueError("no PyTorch model before this export stage")
    return latest


def run(cfg: ExportConfig, ctx: StageContext) -> StageResult:
    import torch
    from optimum.exporters.onnx import onnx_export_from_model
    from transformers import AutoTokenizer

    from toolkit import pruning
    from toolkit.runtime import onnx_file
    from toolkit.runtime.checkpoint import load_classifier
    from toolkit.stages.onnx_common import op_counts

    source = pytorch_source(ctx)
    model = load_classifier(source.path, torch_dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    # Validation against PyTorch on dummy inputs is skipped: the parity gate checks the whole test split.
    onnx_export_from_model(
        model,
        ctx.out_dir,
        opset=cfg.opset,
        task="text-classification",
        do_validation=False,
        preprocessors=[tokenizer],
    )
    path = onnx_file(ctx.out_dir)
    try:
        heads, ffn = pruning.head_counts(model), pruning.ffn_sizes(model)[0]
    except pruning.PruningError:  # a family pruning has no layout for: its shape is not recorded
        heads, ffn = None, getattr(model.config, "intermediate_size", None)
    info = {
        "source": source.stage,
        "opset": cfg.opset,
        "file": path.name,
        "heads_per_layer": heads,
        "intermediate_size": ffn,
        "op_counts": op_counts(path),
    }
    return StageResult(Artifact(ctx.out_dir, "onnx", cfg.name), info, source=source)
