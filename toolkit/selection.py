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


def constraint_failures(fig: dict[str, Any], drop: float, cfg: Any, speed: bool = True) -> list[str]:
    """Every limit of `select` the figures break; `speed=False` leaves the latency limit out."""
    reasons = []
    if drop > cfg.max_accuracy_drop + 1e-9:  # 100 * (0.80 - 0.79) is 1.0000000000000009
        reasons.append(f"accuracy drop {drop:.2f} pts ({cfg.drop_mode}) > max {cfg.max_accuracy_drop}")
    for key, limit, label, unit in (
        ("latency_p50_ms", cfg.max_latency_ms, "batch-1 p50 latency", "ms"),
        ("size_mb", cfg.max_size_mb, "size", "MB"),
    ):
        if limit is None or (key == "latency_p50_ms" and not speed):
            continue
        if fig[key] is None:
            reasons.append(f"{label} not measured (limit {limit} {unit})")
        elif fig[key] > limit:
            reasons.append(f"{label} {fig[key]:.2f} {unit} > max {limit} {unit}")
    return reasons


def _unusable(entry: dict[str, Any]) -> list[str]:
    if entry.get("status") == "done":
        return []
    why = (entry.get("gate") or {}).get("reasons") or [entry.get("reason") or "not usable"]
    return [f"status {entry.get('status')}: " + "; ".join(why)]


def _quality_failures(entry: dict[str, Any], fig: dict[str, Any], drop: float, cfg: Any) -> list[str]:
    return _unusable(entry) or constraint_failures(fig, drop, cfg, speed=False)


def finalists(manifest: Manifest, cfg: SelectConfig) -> list[str]:
    """The candidates that meet every constraint but speed: those worth timing again side by side."""
    stages = evaluated(manifest)
    base_name = baseline_stage(manifest)
    if base_name is None:
        return []
    base_acc = manifest.stage(base_name)["evaluation"]["accuracy"]
    return [
        name
        for name, entry in stages
        if not _quality_failures(
            entry, fig := figures(entry), accuracy_drop(fig["accuracy"], base_acc, cfg.drop_mode), cfg
        )
    ]


def select(manifest: Manifest, cfg: SelectConfig, timing: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """`timing`: the finalists' side-by-side figures (`evaluation.side_by_side`); where given, latency and
    throughput come from there, and the per-stage figures stay in the record as `stage_*`."""
    stages = evaluated(manifest)
    if not stages:
        raise ValueError("no stage produced an evaluated model; nothing to select")
    base_name = baseline_stage(manifest)
    base_acc = manifest.stage(base_name)["evaluation"]["accuracy"]
    key, larger_better = OBJECTIVES[cfg.objective]
    timing = timing or {}
    records: dict[str, dict[str, Any]] = {}
    for name, entry in stages:
        fig = figures(entry)
        if name in timing:
            fig.update({f"stage_{k}": fig[k] for k in SPEED_KEYS})
            fig.update({k: timing[name][k] for k in SPEED_KEYS}, side_by_side=True)
        drop = accuracy_drop(fig["accuracy"], base_acc, cfg.drop_mode)
        reasons = _unusable(entry)
        if not reasons:
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
    ranked = sorted(qualified, key=lambda n: records[n][key], reverse=larger_better)
    best = ranked[0]
    for name, record in records.items():
        if name != best:
            record["lost"] = "; ".join(record["reasons"]) or _lost_on_objective(records[best], record, key, cfg)
    how = "timed side by side" if best in timing else "per-stage figures"
    reason = (
        f"best {cfg.objective} ({key} {records[best][key]:.4g}, {how}) among {len(qualified)} qualifying: "
        f"{describe(cfg)}"
    )
    result = _result(manifest, best, reason, base_name, constraints, records, qualified=True)
    if len(ranked) > 1:
        result["close_call"] = close_call(best, ranked[1], key, timing)
    return result


SPEED_KEYS = ("latency_p50_ms", "throughput_per_s")
SPREAD_KEYS = {"latency_p50_ms": "latency_spread", "throughput_per_s": "throughput_spread"}


def close_call(best: str, second: str, key: str, timing: dict[str, dict[str, Any]]) -> str | None:
    """A sentence when the winner's lead on the objective is smaller than its figures' own noise (how far the
    side-by-side rounds came apart), else None. Without side-by-side figures there is no noise to compare."""
    if key not in SPREAD_KEYS or best not in timing or second not in timing:
        return None
    a, b = timing[best][key], timing[second][key]
    lead = abs(a - b) / max(min(a, b), 1e-12)
    noise = max(timing[best][SPREAD_KEYS[key]], timing[second][SPREAD_KEYS[key]])
    if lead >= noise:
        return None
    return (
        f"{best} leads {second} by {100 * lead:.1f}% on {key}, less than the {100 * noise:.1f}% their rounds varied: "
        "the two are not told apart by this measurement"
    )


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
