"""Per-token INT8 activation scales: a text's INT8 answer does not depend on the other texts of its model call."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from toolkit.runtime import Tokenizer, load_model, onnx_file
from toolkit.stages.token_scales import calibrated_scales, per_token_scales

# Short and long texts, one with words the tiny vocabulary splits into many pieces: calls of these pad, and their
# activations differ in range from text to text.
TEXTS = [
    "the movie was good",
    "awful plot and it was dull, slow and long",
    "a story",
    "brilliant, lovely film",
    "superb superb superb superb superb superb",
    "zxqv wvut qqqq plmk",
    "the actor",
    "it is a very dull and poor film and the plot is terrible",
]


def quantized(graphs, tmp_path, scales: str, **options):
    from toolkit.config import QuantizeConfig
    from toolkit.stages import quantize
    from toolkit.stages.base import Artifact, StageContext

    out = tmp_path / f"{scales}{len(options)}"
    out.mkdir()
    ctx = StageContext(run_dir=tmp_path, out_dir=out, source=Artifact(graphs / "optimize", "onnx", "optimize"))
    result = quantize.run(QuantizeConfig(type="quantize", smooth_quant=None, activation_scales=scales, **options), ctx)
    return result.artifact.path, result.info


def alone_and_in_calls(model, texts: list[str], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Each text alone, and the same texts in shuffled calls of 3 (one padded call each: no length buckets)."""
    alone = np.concatenate([model.run(model.tokenizer([t])) for t in texts])
    order = np.random.default_rng(seed).permutation(len(texts))
    together = np.empty_like(alone)
    for start in range(0, len(texts), 3):
        index = order[start : start + 3]
        together[index] = model.run(model.tokenizer([texts[i] for i in index]))
    return alone, together


def test_per_token_int8_answers_each_text_as_alone_whatever_shares_its_call(graphs, tmp_path):
    path, info = quantized(graphs, tmp_path, "per_token")
    assert info["batch_invariant"] is True and info["activation_scales"] == "per_token"
    scaled = info["token_scales"]
    assert scaled["applied"] and scaled["attentions"] == 2 and scaled["probe_alone_vs_batched"] <= 1e-4, scaled
    # The tiny model's pooled tail (projection, FFN in and out) and head (pooler, classifier) read pooled rows.
    assert scaled["pooled_in_float"] == 5 and scaled["products"] == 3, scaled
    assert info["pack_tokens"]["applied"] and info["pack_tokens"]["probe_allowed"] == 1e-4  # judged tightly
    ops = info["op_counts"]
    assert "DynamicQuantizeLinear" not in ops and "QAttention" not in ops and ops["MultiHeadAttention"] == 2, ops
    model = load_model(path, "onnx", 16, 1, "cpu")
    for seed in range(3):
        alone, together = alone_and_in_calls(model, TEXTS, seed)
        np.testing.assert_allclose(together, alone, atol=1e-5)
    # Close to the FP32 graph it came from.
    fp32 = load_model(graphs / "optimize", "onnx", 16, 1, "cpu").logits(TEXTS)
    assert (model.logits(TEXTS).argmax(-1) == fp32.argmax(-1)).all()
    np.testing.assert_allclose(model.logits(TEXTS), fp32, atol=0.05)


def test_per_call_int8_is_recorded_as_depending_on_its_call(graphs, tmp_path):
    path, info = quantized(graphs, tmp_path, "per_call")
    assert info["batch_invariant"] is False and "token_scales" not in info
    model = load_model(path, "onnx", 16, 1, "cpu")
    alone, together = alone_and_in_calls(model, TEXTS, 0)
    assert np.abs(together - alone).max() > 1e-4  # what the per-token scales remove


def test_report_and_card_say_when_answers_depend_on_the_call(tmp_path):
    from toolkit.hub import model_card
    from toolkit.manifest import Artifact, Manifest
    from toolkit.report import markdown, notes

    evaluation = {"split": "test", "n": 10, "accuracy": 0.9, "macro_f1": 0.9}
    manifest = Manifest(tmp_path, {
        "order": ["quantize"],
        "stages": {"quantize": {"type": "quantize", "status": "done", "evaluation": evaluation,
                                "info": {"batch_invariant": False, "activation_scales": "per_call"}}},
        "selection": {"stage": "quantize", "reason": "best latency", "baseline": "quantize"},
        "data": {"label_names": ["negative", "positive"]},
    })  # fmt: skip
    said = "Answers depend on the model call: the selected `quantize` graph takes one INT8 activation scale per call"
    assert said in markdown(manifest, None, {})
    assert said in model_card(manifest, Artifact(tmp_path, "onnx", "quantize"), "user/model")
    assert "- quantize: one INT8 activation scale per model call: its answers depend on the call" in notes(manifest)
    manifest.stages["quantize"]["info"]["batch_invariant"] = True
    assert said not in markdown(manifest, None, {})


def test_per_token_scales_refuse_what_they_cannot_carry(graphs, tmp_path):
    fp32 = shutil.copytree(graphs / "optimize", tmp_path / "fp32")
    original = onnx_file(fp32).read_bytes()
    assert per_token_scales(onnx_file(fp32)) == {
        "applied": False,
        "reason": "no DynamicQuantizeLinear: the graph has no per-call activation scales",
    }
    assert onnx_file(fp32).read_bytes() == original

    path, _ = quantized(graphs, tmp_path, "per_token")
    assert per_token_scales(onnx_file(path))["reason"] == "the graph's activation scales are rewritten already"


def test_activation_scales_only_with_dynamic_mode():
    from pydantic import ValidationError

    from toolkit.config import QuantizeConfig

    with pytest.raises(ValidationError, match="activation_scales only applies with mode: dynamic"):
        QuantizeConfig(type="quantize", mode="static", activation_scales="per_token")


def test_calibrated_int8_fixes_each_scale_and_keeps_the_fused_int8_attention(graphs, tmp_path):
    path, _ = quantized(graphs, tmp_path, "per_call", pack_tokens=False)
    calibration = [Tokenizer(path, 16)(TEXTS[i : i + 3]) for i in range(0, len(TEXTS), 3)]
    info = calibrated_scales(onnx_file(path), calibration)
    assert info["applied"] and info["attentions"] == 2 and info["products"] == 8, info
    assert info["calibration_tokens"] == sum(len(Tokenizer(path, 16)([t])["input_ids"][0]) for t in TEXTS)
    ops = {n.op_type for n in __import__("onnx").load(str(onnx_file(path))).graph.node}
    assert "DynamicQuantizeLinear" not in ops and {"QAttention", "MatMulIntegerToFloat", "QuantizeLinear"} <= ops
    model = load_model(path, "onnx", 16, 1, "cpu")
    for seed in range(3):
        alone, together = alone_and_in_calls(model, TEXTS, seed)
        np.testing.assert_allclose(together, alone, atol=1e-5)
    fp32 = load_model(graphs / "optimize", "onnx", 16, 1, "cpu").logits(TEXTS)
    np.testing.assert_allclose(model.logits(TEXTS), fp32, atol=0.05)
    assert (
        calibrated_scales(onnx_file(path), calibration)["reason"]
        == "the graph's activation scales are rewritten already"
    )


def test_both_rewrites_carry_weight_zero_points_and_one_scale_per_weight(graphs, tmp_path):
    """avx2's preset stores weights as uint8 with zero points; per_channel: false gives one scale per matrix."""
    options = {"instruction_set": "avx2", "per_channel": False}
    fp32 = load_model(graphs / "optimize", "onnx", 16, 1, "cpu").logits(TEXTS)
    path, info = quantized(graphs, tmp_path, "per_token", **options)
    assert info["token_scales"]["applied"], info["token_scales"]
    per_call, _ = quantized(graphs, tmp_path, "per_call", pack_tokens=False, **options)
    calibration = [Tokenizer(per_call, 16)(TEXTS[i : i + 3]) for i in range(0, len(TEXTS), 3)]
    assert calibrated_scales(onnx_file(per_call), calibration)["applied"]
    for folder in (path, per_call):
        model = load_model(folder, "onnx", 16, 1, "cpu")
        alone, together = alone_and_in_calls(model, TEXTS, 0)
        np.testing.assert_allclose(together, alone, atol=1e-5)
        np.testing.assert_allclose(model.logits(TEXTS), fp32, atol=0.05)
