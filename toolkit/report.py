"""The run's figures, one row per stage: a terminal table (rich), `report.md`, a self-contained `report.html`
and `accuracy_vs_latency.png`, all from `stage_rows`."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from toolkit.manifest import Manifest
from toolkit.selection import baseline_stage

# (header, row key, format); formats apply to numbers, None shows as an em dash.
COLUMNS = (
    ("stage", "stage", "{}"),
    ("type", "type", "{}"),
    ("status", "status", "{}"),
    ("accuracy", "accuracy", "{:.4f}"),
    ("macro-F1", "macro_f1", "{:.4f}"),
    ("Δ acc (pts)", "accuracy_change_pts", "{:+.2f}"),
    ("parity", "parity_agreement", "{:.4f}"),
    ("p50 ms", "latency_p50_ms", "{:.2f}"),
    ("p95 ms", "latency_p95_ms", "{:.2f}"),
    ("texts/s", "throughput_per_s", "{:.1f}"),
    ("speed-up", "speedup", "{:.2f}x"),
    ("size MB", "size_mb", "{:.1f}"),
    ("params M", "parameters_m", "{:.2f}"),
    ("time s", "seconds", "{:.0f}"),
    ("selected", "selected", "{}"),
)
PLOT = "accuracy_vs_latency.png"


def _fmt(value: Any, pattern: str) -> str:
    return "—" if value is None or value == "" else pattern.format(value)


def stage_rows(manifest: Manifest) -> list[dict[str, Any]]:
    """Figures per stage. Accuracy change and speed-up (batch-1 p50) are against the fine-tuned model."""
    base_name = baseline_stage(manifest)
    base = (manifest.stage(base_name) or {}).get("evaluation") or {} if base_name else {}
    base_acc, base_p50 = base.get("accuracy"), (base.get("speed") or {}).get("latency_p50_ms")
    chosen = (manifest.data.get("selection") or {}).get("stage")
    rows = []
    for name, entry in manifest.ordered():
        ev = entry.get("evaluation") or {}
        speed = ev.get("speed") or {}
        accuracy, p50 = ev.get("accuracy"), speed.get("latency_p50_ms")
        rows.append(
            {
                "stage": name,
                "type": entry.get("type"),
                "status": entry.get("status"),
                "accuracy": accuracy,
                "macro_f1": ev.get("macro_f1"),
                "accuracy_change_pts": None if accuracy is None or base_acc is None else 100 * (accuracy - base_acc),
                "parity_agreement": (ev.get("parity") or {}).get("agreement"),
                "latency_p50_ms": p50,
                "latency_p95_ms": speed.get("latency_p95_ms"),
                "throughput_per_s": speed.get("throughput_per_s"),
                "speedup": base_p50 / p50 if base_p50 and p50 else None,
                "size_mb": None if ev.get("size_bytes") is None else ev["size_bytes"] / 1e6,
                "parameters_m": None if ev.get("parameters") is None else ev["parameters"] / 1e6,
                "seconds": entry.get("seconds"),
                "selected": "yes" if name == chosen else "",
            }
        )
    return rows


def formatted_rows(manifest: Manifest) -> list[list[str]]:
    return [[_fmt(row[key], pattern) for _, key, pattern in COLUMNS] for row in stage_rows(manifest)]


def terminal_table(manifest: Manifest):
    from rich.table import Table

    table = Table(title=f"run: {manifest.run_dir}", header_style="bold")
    for header, key, _ in COLUMNS:
        table.add_column(header, justify="left" if key in ("stage", "type", "status") else "right")
    for cells in formatted_rows(manifest):
        table.add_row(*cells)
    return table


def selection_lines(manifest: Manifest) -> list[str]:
    selection = manifest.data.get("selection")
    if not selection:
        return ["No selection recorded."]
    lines = [f"Selected: {selection['stage']} ({selection['reason']}); baseline: {selection.get('baseline')}."]
    for name, record in (selection.get("candidates") or {}).items():
        if record.get("lost"):
            lines.append(f"- {name} not chosen: {record['lost']}")
    return lines


def notes(manifest: Manifest) -> list[str]:
    """Gate failures, skips and fusion counts: what the table's cells cannot hold."""
    lines = []
    for name, entry in manifest.ordered():
        gate, info = entry.get("gate") or {}, entry.get("info") or {}
        if gate and not gate.get("passed"):
            lines.append(f"- {name} FAILED its parity gate: {'; '.join(gate.get('reasons', []))}")
        if entry.get("status") == "skipped":
            lines.append(f"- {name} skipped: {entry.get('reason')}")
        if info.get("fused_ops"):
            fused = ", ".join(f"{op} {n}" for op, n in info["fused_ops"].items())
            lines.append(
                f"- {name} graph ops: {fused}" + (f" (warning: {info['warning']})" if "warning" in info else "")
            )
    return lines


def plot(manifest: Manifest, path: Path) -> Path | None:
    """Accuracy against batch-1 latency, marker area proportional to size; the selected stage is ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in stage_rows(manifest) if r["accuracy"] is not None and r["latency_p50_ms"] is not None]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    biggest = max((r["size_mb"] or 1.0) for r in rows)
    for i, row in enumerate(rows):
        area = 60 + 900 * (row["size_mb"] or 0) / biggest
        ax.scatter(row["latency_p50_ms"], 100 * row["accuracy"], s=area, alpha=0.55)
        if row["selected"]:
            ax.scatter(row["latency_p50_ms"], 100 * row["accuracy"], s=area * 1.4, facecolors="none", edgecolors="k")
        size = _fmt(row["size_mb"], "{:.1f} MB")
        # Staggered labels: stages with equal accuracy and close latency would print over each other.
        xy = (row["latency_p50_ms"], 100 * row["accuracy"])
        ax.annotate(
            f"{row['stage']} ({size})", xy, xytext=(8, 12 - 12 * (i % 3)), textcoords="offset points", fontsize=8
        )
    ax.set_xlabel("batch-1 latency p50 (ms)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("accuracy vs latency (marker area: size on disk; ring: selected)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown_table(manifest: Manifest) -> list[str]:
    """The per-stage table as markdown lines (the report and the Hub model card share it)."""
    headers = [h for h, _, _ in COLUMNS]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return lines + ["| " + " | ".join(cells) + " |" for cells in formatted_rows(manifest)]


def markdown(manifest: Manifest, plot_file: Path | None) -> str:
    lines = [f"# Run report: {manifest.run_dir.name}", "", *markdown_table(manifest)]
    lines += ["", *selection_lines(manifest), "", *notes(manifest)]
    if plot_file is not None:
        lines += ["", f"![accuracy vs latency]({plot_file.name})"]
    return "\n".join(lines) + "\n"


def html_page(manifest: Manifest, plot_file: Path | None) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h, _, _ in COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>" for cells in formatted_rows(manifest)
    )
    items = "".join(
        f"<li>{esc(line.removeprefix('- '))}</li>" for line in [*selection_lines(manifest), *notes(manifest)]
    )
    image = ""
    if plot_file is not None:
        data = base64.b64encode(plot_file.read_bytes()).decode()
        image = f'<img alt="accuracy vs latency" src="data:image/png;base64,{data}">'
    style = "table{border-collapse:collapse}td,th{border:1px solid #999;padding:3px 8px;text-align:right}"
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(manifest.run_dir.name)}</title>"
        f"<style>{style}</style></head><body><h1>Run report: {esc(manifest.run_dir.name)}</h1>"
        f"<table><tr>{head}</tr>{body}</table><ul>{items}</ul>{image}</body></html>\n"
    )


def write_reports(manifest: Manifest) -> dict[str, Path]:
    run_dir = manifest.run_dir
    plot_file = plot(manifest, run_dir / PLOT)
    md, page = run_dir / "report.md", run_dir / "report.html"
    md.write_text(markdown(manifest, plot_file), encoding="utf-8")
    page.write_text(html_page(manifest, plot_file), encoding="utf-8")
    return {"markdown": md, "html": page, **({"plot": plot_file} if plot_file else {})}
