"""The run's figures, one row per stage, as a terminal table (rich)."""

from __future__ import annotations

from typing import Any

from toolkit.manifest import Manifest

COLUMNS = (
    "stage",
    "type",
    "status",
    "accuracy",
    "macro-F1",
    "Δ acc (pts)",
    "parity",
    "p50 ms",
    "p95 ms",
    "texts/s",
    "size MB",
    "params M",
    "time s",
)


def _fmt(value: Any, pattern: str) -> str:
    return "—" if value is None else pattern.format(value)


def stage_rows(manifest: Manifest) -> list[dict[str, Any]]:
    """Figures per evaluated stage; accuracy change is against the first evaluated stage (the fine-tuned model)."""
    rows, baseline = [], None
    for name, entry in manifest.ordered():
        ev = entry.get("evaluation") or {}
        speed = ev.get("speed") or {}
        accuracy = ev.get("accuracy")
        if baseline is None and accuracy is not None:
            baseline = accuracy
        rows.append(
            {
                "stage": name,
                "type": entry.get("type"),
                "status": entry.get("status"),
                "accuracy": accuracy,
                "macro_f1": ev.get("macro_f1"),
                "accuracy_change_pts": None if accuracy is None or baseline is None else 100 * (accuracy - baseline),
                "parity_agreement": (ev.get("parity") or {}).get("agreement"),
                "latency_p50_ms": speed.get("latency_p50_ms"),
                "latency_p95_ms": speed.get("latency_p95_ms"),
                "throughput_per_s": speed.get("throughput_per_s"),
                "size_mb": None if ev.get("size_bytes") is None else ev["size_bytes"] / 1e6,
                "parameters_m": None if ev.get("parameters") is None else ev["parameters"] / 1e6,
                "seconds": entry.get("seconds"),
            }
        )
    return rows


def terminal_table(manifest: Manifest):
    from rich.table import Table

    table = Table(title=f"run: {manifest.run_dir}", header_style="bold")
    for column in COLUMNS:
        table.add_column(column, justify="left" if column in ("stage", "type", "status") else "right")
    for row in stage_rows(manifest):
        table.add_row(
            row["stage"],
            row["type"] or "",
            row["status"] or "",
            _fmt(row["accuracy"], "{:.4f}"),
            _fmt(row["macro_f1"], "{:.4f}"),
            _fmt(row["accuracy_change_pts"], "{:+.2f}"),
            _fmt(row["parity_agreement"], "{:.4f}"),
            _fmt(row["latency_p50_ms"], "{:.2f}"),
            _fmt(row["latency_p95_ms"], "{:.2f}"),
            _fmt(row["throughput_per_s"], "{:.1f}"),
            _fmt(row["size_mb"], "{:.1f}"),
            _fmt(row["parameters_m"], "{:.2f}"),
            _fmt(row["seconds"], "{:.0f}"),
        )
    return table
