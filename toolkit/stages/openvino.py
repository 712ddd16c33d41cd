"""`openvino`: an earlier ONNX stage's FP32 graph to OpenVINO IR (`openvino.convert_model`), optionally INT8 through
NNCF's post-training quantization with the transformer preset (SmoothQuant, bias correction), calibrated on the
run's training texts; or NNCF's accuracy-aware variant, which keeps the layers that cost the most accuracy in FP32
until the validation accuracy is within `max_accuracy_drop` of the FP32 IR's. The IR runs in OpenVINO's CPU
plugin through `toolkit.runtime`, like every other model."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from toolkit.config import OpenVinoConfig
from toolkit.stages.base import Artifact, StageContext, StageResult


def run(cfg: OpenVinoConfig, ctx: StageContext) -> StageResult:
    from toolkit.runtime import onnx_file
    from toolkit.runtime.openvino import IR_NAME, import_openvino
    from toolkit.stages import pooled

    ov = import_openvino()
    source = ctx.source  # the `source` stage's model: the pipeline hands a branch the model it names
    graph = onnx_file(source.path)
    info: dict = {"source": source.stage, "onnx_file": graph.name, "quantize": cfg.quantize}
    with tempfile.TemporaryDirectory() as tmp:
        if cfg.pooled_tail:  # on a copy (with any external weights): the source stage's graph stays as it is
            for file in Path(source.path).glob("*.onnx*"):
                shutil.copy(file, tmp)
            graph = Path(tmp) / graph.name
            info["pooled_tail"] = pooled.pooled_tail(graph)
        model = ov.convert_model(str(graph))
    if cfg.quantize != "none":
        model = quantized(model, cfg, ctx, Path(source.path), info)
    ov.save_model(model, str(ctx.out_dir / IR_NAME), compress_to_fp16=False)
    shutil.copytree(
        source.path, ctx.out_dir, ignore=shutil.ignore_patterns("*.onnx", "*.onnx_data"), dirs_exist_ok=True
    )
    info["openvino_version"] = ov.__version__
    return StageResult(Artifact(ctx.out_dir, "openvino", cfg.name), info)


def quantized(model, cfg: OpenVinoConfig, ctx: StageContext, folder: Path, info: dict):
    import nncf

    from toolkit.runtime import Tokenizer, feed

    if ctx.data is None:
        raise ValueError("INT8 calibrates on the run's training texts; this context has no data")
    tokenizer = Tokenizer(folder, ctx.max_length)
    names = [port.get_any_name() for port in model.inputs]

    def one_text(text: str) -> dict:  # one text per item, unpadded: the shapes the service runs
        return feed(tokenizer([text]), names)

    texts = ctx.data.texts("train", limit=cfg.calibration_samples)
    calibration = nncf.Dataset(texts, one_text)
    start = time.perf_counter()
    options = {"model_type": nncf.ModelType.TRANSFORMER, "subset_size": len(texts)}
    if cfg.quantize == "int8":
        model = nncf.quantize(model, calibration, **options)
    else:
        validation = list(zip(ctx.data.texts("validation", limit=cfg.validation_samples),
                              ctx.data.labels("validation")[: cfg.validation_samples].tolist(), strict=True))  # fmt: skip
        model = nncf.quantize_with_accuracy_control(
            model,
            calibration,
            nncf.Dataset(validation, lambda item: item),
            validation_fn=accuracy_fn(tokenizer, names),
            max_drop=cfg.max_accuracy_drop,
            drop_type=nncf.DropType.ABSOLUTE,
            **options,
        )
        info["validation_texts"] = len(validation)
    info["calibration"] = {"texts": len(texts), "seconds": round(time.perf_counter() - start, 2)}
    info["nncf_version"] = nncf.__version__
    return model


def accuracy_fn(tokenizer, names: list[str]):
    """NNCF's validation function: accuracy of a compiled model on (text, label) items."""
    import numpy as np

    from toolkit.runtime import feed

    def validate(compiled, items) -> float:
        output = compiled.outputs[0]
        hits = [int(compiled(feed(tokenizer([text]), names))[output].argmax(-1)[0] == label) for text, label in items]
        return float(np.mean(hits))

    return validate
