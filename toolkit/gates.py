"""Parity gates: how closely a model must follow the model it came from before later stages may build on it.

A stage whose option model has a `parity: ParityGate` field is gated. The pipeline checks the gate after the
stage is evaluated; a stage that fails is recorded as `failed_gate` and later stages start from the last model
that passed.
"""

from __future__ import annotations

from typing import Any

from toolkit.config import ParityGate


def check_gate(gate: ParityGate, parity: dict[str, Any] | None) -> dict[str, Any]:
    """The gate's verdict with the figures it was judged on; missing figures fail (nothing was verified)."""
    verdict: dict[str, Any] = {"min_agreement": gate.min_agreement, "max_abs_diff": gate.max_abs_diff}
    if not parity:
        return {**verdict, "passed": False, "reasons": ["no parity figures (the source model's logits are missing)"]}
    reasons = []
    if parity["agreement"] < gate.min_agreement:
        reasons.append(f"agreement {parity['agreement']:.4f} < {gate.min_agreement}")
    if gate.max_abs_diff is not None and parity["max_abs_diff"] > gate.max_abs_diff:
        reasons.append(f"max |logit diff| {parity['max_abs_diff']:.4g} > {gate.max_abs_diff}")
    return {
        **verdict,
        "agreement": parity["agreement"],
        "observed_max_abs_diff": parity["max_abs_diff"],
        "passed": not reasons,
        "reasons": reasons,
    }
