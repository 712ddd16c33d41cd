"""Which candidate the run hands on (to packaging and to the report).

Every evaluated model stage that passed its parity gate is a candidate. The baseline is the fine-tuned model
(the first `train` stage, else the first evaluated one). A candidate qualifies when its accuracy drop from the
baseline and its latency and size are within the recipe's `select` limits; the best qualifying one by the
objective wins, and every other candidate is kept in the record with the reason it lost. When none qualifies
the fine-tuned model is kept and the record says so.
"""

from __future__ import annotations

from typing import Any

from toolkit.config import SelectConfig
from toolkit.manifest import Artifact, Manifest

# objective -> (figure name, True when larger is better)
OBJECTIVES = {
    "latency": ("latency_p50_ms", False),
    "throughput": ("throughput_per_s", True),
    "size": ("size_mb", False),
}


def evaluated(manifest: Manifest) -> list[tuple[str, dict[str, Any]]]:
    return [(n, e) for n, e in manifest.ordered() if e.get("output") and e.get("evaluation")]


def baseline_stage(manifest: Manifest) -> str | None:
    stages = evaluated(manifest)
    trained = [n for n, e in stages if e.get("type") == "train" and e.get("status") == "done"]
    if trained:
        return trained[0]
    return stages[0][0] if stages else None


def figures(entry: dict[str, Any]) -> dict[str, float | None]:
    ev = entry.get("evaluation") or {}
    speed = ev.get("speed") or {}
    return {
        "accuracy": ev.get("accuracy"),
        "latency_p50_ms": speed.get("latency_p50_ms"),
        "throughput_per_s": speed.get("throughput_per_s"),
        "size_mb": None if ev.get("size_bytes") is None else ev["size_bytes"] / 1e6,
    }


def accuracy_drop(accuracy: float, baseline: float, mode: str) -> float:
    """Points lost: percentage points (absolute) or percent of the baseline's accuracy (relative)."""
    lost = 100 * (baseline - accuracy)
    return lost if mode == "absolute" else lost / baseline if baseline else 0.0


def constraint_failures(fig: dict[str, Any], drop: float, cfg: Any) -> list[str]:
    reasons = []
    if drop > cfg.max_accuracy_drop + 1e-9:  # 100 * (0.80 - 0.79) is 1.0000000000000009
        reasons.append(f"accuracy drop {drop:.2f} pts ({cfg.drop_mode}) > max {cfg.max_accuracy_drop}")
    for key, limit, label, unit in (
        ("latency_p50_ms", cfg.max_latency_ms, "batch-1 p50 latency", "ms"),
        ("size_mb", cfg.max_size_mb, "size", "MB"),
    ):
        if limit is None:
            continue
        if fig[key] is None:
            reasons.append(f"{label} not measured (limit {limit} {unit})")
        elif fig[key] > limit:
            reasons.append(f"{label} {fig[key]:.2f} {unit} > max {limit} {unit}")
    return reasons


def select(manifest: Manifest, cfg: SelectConfig) -> dict[str, Any]:
    stages = evaluated(manifest)
    if not stages:
        raise ValueError("no stage produced an evaluated model; nothing to select")
    base_name = baseline_stage(manifest)
    base_acc = manifest.stage(base_name)["evaluation"]["accuracy"]
    key, larger_better = OBJECTIVES[cfg.objective]
    records: dict[str, dict[str, Any]] = {}
    for name, entry in stages:
        fig = figures(entry)
        drop = accuracy_drop(fig["accuracy"], base_acc, cfg.drop_mode)
        if entry.get("status") != "done":
            why = (entry.get("gate") or {}).get("reasons") or [entry.get("reason") or "not usable"]
            reasons = [f"status {entry.get('status')}: " + "; ".join(why)]
        else:
            reasons = constraint_failures(fig, drop, cfg)
            if fig[key] is None:
                reasons.append(f"objective figure {key} not measured")
        records[name] = {**fig, "accuracy_drop": drop, "qualified": not reasons, "reasons": reasons}
    qualified = [n for n, r in records.items() if r["qualified"]]
    constraints = cfg.model_dump(mode="json")
    if not qualified:
        message = f"no candidate meets the constraints ({describe(cfg)}); keeping the fine-tuned model {base_name!r}"
        for record in records.values():
            record["lost"] = "; ".join(record["reasons"])
        return _result(manifest, base_name, message, base_name, constraints, records, qualified=False)
    best = sorted(qualified, key=lambda n: records[n][key], reverse=larger_better)[0]
    for name, record in records.items():
        if name != best:
            record["lost"] = "; ".join(record["reasons"]) or _lost_on_objective(records[best], record, key, cfg)
    reason = f"best {cfg.objective} ({key} {records[best][key]:.4g}) among {len(qualified)} qualifying: {describe(cfg)}"
    return _result(manifest, best, reason, base_name, constraints, records, qualified=True)


def describe(cfg: Any) -> str:
    parts = [f"accuracy drop <= {cfg.max_accuracy_drop} pts ({cfg.drop_mode})"]
    if cfg.max_latency_ms is not None:
        parts.append(f"p50 <= {cfg.max_latency_ms} ms")
    if cfg.max_size_mb is not None:
        parts.append(f"size <= {cfg.max_size_mb} MB")
    return ", ".join(parts)


def _lost_on_objective(best: dict[str, Any], record: dict[str, Any], key: str, cfg: Any) -> str:
    return f"qualified, but {cfg.objective} worse: {key} {record[key]:.4g} vs {best[key]:.4g}"


def _result(manifest, stage, reason, baseline, constraints, records, qualified) -> dict[str, Any]:
    return {
        "stage": stage,
        "artifact": manifest.stage(stage)["output"],
        "reason": reason,
        "qualified": qualified,
        "baseline": baseline,
        "constraints": constraints,
        "candidates": records,
    }


def selected_artifact(selection: dict[str, Any]) -> Artifact:
    return Artifact.from_json(selection["artifact"])
