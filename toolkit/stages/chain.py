"""The ONNX stages run in a row outside a recipe, with their default options: benchmarks use it to make the
INT8 model a recipe would make."""

from __future__ import annotations

from pathlib import Path

from toolkit.config import ExportConfig, OptimizeConfig, QuantizeConfig
from toolkit.stages import export, optimize, quantize
from toolkit.stages.base import Artifact, StageContext


def int8_from_pytorch(pytorch: Path, work: Path, fuse: bool = True, device: str = "cpu") -> Path:
    """export -> optimize (O2, when `fuse`) -> quantize on a PyTorch folder; returns the INT8 folder
    (`work/quantize`)."""
    chain = [("export", export.run, ExportConfig(type="export"))]
    if fuse:
        chain.append(("optimize", optimize.run, OptimizeConfig(type="optimize")))
    chain.append(("quantize", quantize.run, QuantizeConfig(type="quantize")))
    artifacts: dict[str, Artifact] = {"pytorch": Artifact(Path(pytorch), "pytorch", "pytorch")}
    source = artifacts["pytorch"]
    for name, run, cfg in chain:
        out = work / name
        out.mkdir(parents=True, exist_ok=True)
        ctx = StageContext(run_dir=work, out_dir=out, source=source, artifacts=dict(artifacts), device=device)
        source = run(cfg, ctx).artifact
        artifacts[name] = source
    return Path(source.path)
