"""The ONNX stages run in a row outside a recipe, with their default options: benchmarks use it to make the
INT8 model a recipe would make."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from toolkit.config import ExportConfig, OptimizeConfig, QuantizeConfig
from toolkit.stages import export, optimize, quantize
from toolkit.stages.base import Artifact, StageContext

if TYPE_CHECKING:
    from toolkit.data import PreparedData


def int8_from_pytorch(
    pytorch: Path, work: Path, fuse: bool = True, device: str = "cpu", data: PreparedData | None = None
) -> Path:
    """export -> optimize (O2, when `fuse`) -> quantize on a PyTorch folder; returns the INT8 folder
    (`work/quantize`). SmoothQuant calibrates on `data`'s training texts; without data it is left out."""
    chain = [("export", export.run, ExportConfig(type="export"))]
    if fuse:
        chain.append(("optimize", optimize.run, OptimizeConfig(type="optimize")))
    # Without training texts nothing can be calibrated: no SmoothQuant, and per-token activation scales.
    smoothing = {} if data is not None else {"smooth_quant": None, "activation_scales": "per_token"}
    chain.append(("quantize", quantize.run, QuantizeConfig(type="quantize", **smoothing)))
    artifacts: dict[str, Artifact] = {"pytorch": Artifact(Path(pytorch), "pytorch", "pytorch")}
    source = artifacts["pytorch"]
    for name, run, cfg in chain:
        out = work / name
        out.mkdir(parents=True, exist_ok=True)
        ctx = StageContext(work, out, source, data=data, artifacts=dict(artifacts), device=device)
        source = run(cfg, ctx).artifact
        artifacts[name] = source
    return Path(source.path)
