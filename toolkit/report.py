"""The run's figures, one row per stage: a terminal table (rich), `report.md`, a self-contained `report.html`
and `accuracy_vs_latency.png`, all from `stage_rows`."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

import numpy as np

from toolkit import plots
from toolkit.machine import describe_load
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
    ("noise", "noise", "{}"),
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
                "busy": bool((speed.get("load") or {}).get("busy")),
                "noise": noise(speed),
                "batch": speed.get("throughput_batch_size"),
            }
        )
    return rows


def noise(speed: dict[str, Any]) -> str | None:
    """p95/p50 and the throughput rounds' spread; BUSY when other processes took our cores meanwhile."""
    if not speed.get("latency_p50_ms"):
        return None
    text = f"p95/p50 {speed['latency_p95_ms'] / speed['latency_p50_ms']:.1f}"
    if "throughput_spread" in speed:
        text += f", ±{50 * speed['throughput_spread']:.0f}%"
    load = speed.get("load") or {}
    if load.get("busy"):
        text += f", BUSY ({load.get('others_cores', 0):.1f} cores taken)"
    return text


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


def curve_note(manifest: Manifest, name: str, record: dict[str, Any]) -> str:
    """For a trained model that missed the accuracy budget: what its own validation curve says (`fit`'s line)."""
    curve = ((manifest.stage(name) or {}).get("info") or {}).get("curve")
    missed = any(reason.startswith("accuracy drop") for reason in record.get("reasons") or [])
    return f"; its validation curve: {curve}" if curve and missed else ""


def selection_lines(manifest: Manifest) -> list[str]:
    selection = manifest.data.get("selection")
    if not selection:
        return ["No selection recorded."]
    lines = [f"Selected: {selection['stage']} ({selection['reason']}); baseline: {selection.get('baseline')}."]
    if selection.get("close_call"):
        lines.append(f"- close call: {selection['close_call']}")
    for name, record in (selection.get("candidates") or {}).items():
        if record.get("lost"):
            lines.append(f"- {name} not chosen: {record['lost']}{curve_note(manifest, name, record)}")
    return lines + [f"- {line}" for line in serving_lines(manifest)]


def serving_lines(manifest: Manifest) -> list[str]:
    """What each `package` stage's serving-parity replay found: the evaluation split through the service's path
    (its micro-batcher, concurrent clients) against the answers evaluation gave."""
    lines = []
    selected = (manifest.data.get("selection") or {}).get("stage")
    info = ((manifest.data.get("stages") or {}).get(selected) or {}).get("info") or {}
    if info.get("batch_invariant") is False:
        why = (info.get("token_scales") or {}).get("reason") or "activation_scales: per_call"
        lines.append(
            f"Answers depend on the model call: the selected `{selected}` graph takes one INT8 activation scale per "
            f"call ({why}), so a text's answer can change with the other texts the service batches with it."
        )
    for name, entry in manifest.ordered():
        record = (entry.get("info") or {}).get("serving_parity")
        if not record:
            continue
        sizes = record.get("call_sizes") or {}
        lines.append(
            f"Served as evaluated: {100 * record['agreement']:.2f} % of {record['texts']:,} {record['split']} texts, "
            f"max logit difference {record['max_logit_difference']:.2g} (`{name}` replayed them through the "
            f"service's micro-batcher: {record['clients']} concurrent clients, {record['model_calls']:,} model calls "
            f"of {sizes.get('min')}-{sizes.get('max')} texts)"
        )
    return lines


def notes(manifest: Manifest) -> list[str]:
    """Gate failures, skips and fusion counts: what the table's cells cannot hold."""
    lines = []
    for name, entry in manifest.ordered():
        gate, info = entry.get("gate") or {}, entry.get("info") or {}
        if gate and not gate.get("passed"):
            lines.append(f"- {name} FAILED its parity gate: {'; '.join(gate.get('reasons', []))}")
        load = ((entry.get("evaluation") or {}).get("speed") or {}).get("load") or {}
        if load.get("busy"):
            lines.append(f"- {name}: speed measured on a busy machine ({describe_load(load)}); its figures are not "
                         "comparable with the others'")  # fmt: skip
        if entry.get("status") == "skipped":
            lines.append(f"- {name} skipped: {entry.get('reason')}")
        if entry.get("status") == "failed":
            lines.append(f"- {name} FAILED: {str(entry.get('error')).splitlines()[0]}")
        if info.get("batch_invariant") is False:
            lines.append(f"- {name}: one INT8 activation scale per model call: its answers depend on the call")
        if info.get("fused_ops"):
            fused = ", ".join(f"{op} {n}" for op, n in info["fused_ops"].items())
            lines.append(
                f"- {name} graph ops: {fused}" + (f" (warning: {info['warning']})" if "warning" in info else "")
            )
    return lines


def budget_band(manifest: Manifest) -> tuple[float, float] | None:
    """The accuracy (%) range `select` accepted: from the baseline's accuracy down by the allowed drop."""
    selection = manifest.data.get("selection") or {}
    base = (manifest.stage(selection.get("baseline") or "") or {}).get("evaluation") or {}
    cfg = selection.get("constraints") or {}
    if base.get("accuracy") is None or "max_accuracy_drop" not in cfg:
        return None
    top = 100 * base["accuracy"]
    drop = cfg["max_accuracy_drop"] if cfg.get("drop_mode") != "relative" else top * cfg["max_accuracy_drop"] / 100
    return top - drop, top


def plot(manifest: Manifest, path: Path) -> Path | None:
    return plots.accuracy_latency(stage_rows(manifest), budget_band(manifest), path)


def teacher_line(manifest: Manifest) -> tuple[str, float] | None:
    """The baseline (fine-tuned) model's best validation accuracy, the line a student's curve is read against."""
    name = baseline_stage(manifest)
    history = histories(manifest).get(name or "")
    return (name, max(row["accuracy"] for row in history)) if history else None


def histories(manifest: Manifest) -> dict[str, list[dict[str, float]]]:
    """Per-epoch training loss and validation figures that train, prune (recovery) and distill recorded."""
    found = {}
    for name, entry in manifest.ordered():
        info = entry.get("info") or {}
        history = info.get("history") or (info.get("recovery") or {}).get("history")
        if history:
            found[name] = history
    return found


def eval_labels(manifest: Manifest) -> tuple[np.ndarray, list[str]] | None:
    from toolkit.data import PreparedData

    data, split = manifest.data.get("data") or {}, (manifest.data.get("recipe") or {}).get("evaluate", {}).get("split")
    if not data or not split or not (manifest.run_dir / "data").is_dir():
        return None
    prepared = PreparedData(manifest.run_dir / "data", data["label_names"], data["fingerprint"])
    return np.asarray(prepared.labels(split)), list(data["label_names"])


def confusion_matrices(manifest: Manifest) -> dict[str, np.ndarray]:
    """The selected model's and its fine-tuned baseline's confusion matrices on the evaluation split."""
    from sklearn.metrics import confusion_matrix

    selection, labelled = manifest.data.get("selection") or {}, eval_labels(manifest)
    if not selection or labelled is None:
        return {}
    labels, names = labelled
    out = {}
    roles = {selection["stage"]: "selected"}
    roles.setdefault(selection.get("baseline"), "fine-tuned")  # one entry when the baseline was selected
    for stage, role in roles.items():
        logits = manifest.run_dir / "evals" / f"{stage}.logits.npy"
        if stage and logits.is_file():
            predicted = np.load(logits).argmax(-1)
            if len(predicted) == len(labels):
                out[f"{role}: {stage}"] = confusion_matrix(labels, predicted, labels=list(range(len(names))))
    return out


def per_class_rows(manifest: Manifest) -> list[list[str]]:
    """Precision, recall, F1 and support per class for the selected model and its fine-tuned baseline."""
    selection = manifest.data.get("selection") or {}
    rows = []
    for stage in dict.fromkeys([selection.get("stage"), selection.get("baseline")]):
        per_class = ((manifest.stage(stage or "") or {}).get("evaluation") or {}).get("per_class") or {}
        for label, m in per_class.items():
            rows.append([stage, label, f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}",
                         str(m["support"])])  # fmt: skip
    return rows


PER_CLASS_HEADERS = ["model", "class", "precision", "recall", "F1", "support"]


def context_lines(manifest: Manifest) -> list[str]:
    """Where and on what the figures were taken: recipe, date, CPU, threads, library versions, data."""
    env, data, recipe = (
        manifest.data.get("environment") or {},
        manifest.data.get("data") or {},
        manifest.data.get("recipe") or {},
    )
    speed = (recipe.get("evaluate") or {}).get("speed") or {}
    lines = [
        f"recipe: {recipe.get('name', '?')} (toolkit {manifest.data.get('toolkit_version', '?')}), "
        f"started {manifest.data.get('started', '?')}",
        f"machine: {env.get('cpu', '?')}, {env.get('cores', '?')} cores, timing threads "
        f"{speed.get('threads') or 'all'}, Python {env.get('python', '?')}",
        "libraries: " + ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items()),
    ]
    names = data.get("label_names") or []
    for split, count in (data.get("counts") or {}).items():
        per_label = (data.get("label_counts") or {}).get(split)
        labelled = f" ({', '.join(f'{n} {c}' for n, c in zip(names, per_label, strict=False))})" if per_label else ""
        lines.append(f"{split}: {count} texts{labelled}")
    return lines


def timing_lines(manifest: Manifest) -> list[str]:
    """The finalists' side-by-side figures that selection compared, with their noise."""
    timing = manifest.data.get("finalist_timing") or {}
    if not timing:
        return []
    first = next(iter(timing.values()))
    rounds = f"{first['rounds']} rounds, each in turn, in a new order every round"
    lines = [f"Finalists timed side by side ({rounds}; {describe_load(first['load'])}):"]
    for name, t in timing.items():
        lines.append(
            f"- {name}: p50 {t['latency_p50_ms']:.2f} ms (rounds within ±{50 * t['latency_spread']:.0f}%), "
            f"{t['throughput_per_s']:.0f} texts/s (±{50 * t['throughput_spread']:.0f}%)"
        )
    return lines


def _section(title: str, body: str) -> str:
    return f"<section><h2>{html.escape(title)}</h2>{body}</section>"


def _table(headers: list[str], rows: list[list[str]], classes: list[str] | None = None, css: str = "") -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join(
        f"<tr class='{(classes or [''] * len(rows))[i]}'>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>"
        for i, cells in enumerate(rows)
    )
    return f"<div class='scroll'><table class='{css}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def _image(path: Path | None, alt: str) -> str:
    if path is None:
        return ""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}">'


def _items(lines: list[str]) -> str:
    return "<ul>" + "".join(f"<li>{html.escape(line.removeprefix('- '))}</li>" for line in lines) + "</ul>"


def _row_class(row: dict[str, Any]) -> str:
    return " ".join(c for c, on in (("selected", row["selected"]), ("failed", row["status"] == "failed_gate"),
                                    ("busy", row.get("busy"))) if on)  # fmt: skip


STYLE = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;color:#1f2937;max-width:1180px;margin:24px auto;
padding:0 20px;background:#f8fafc}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:0 0 10px;color:#0f172a}
section{background:#fff;border:1px solid #e2e8f0;border-radius:8px;padding:14px 18px;margin:14px 0}
.context{color:#475569;font-size:13px}.context li{margin:1px 0}
table{border-collapse:collapse;font-size:12.5px;width:100%}th{background:#f1f5f9;text-align:right}
td,th{border-bottom:1px solid #e2e8f0;padding:4px 8px;text-align:right;white-space:nowrap}
td:first-child,th:first-child,td:nth-child(2),th:nth-child(2),.stages td:nth-child(3),.stages th:nth-child(3){text-align:left}
tr.selected td{background:#fff7ed;font-weight:600}tr.failed td{color:#b91c1c}tr.failed td:nth-child(3)::after{content:" ✗"}
tr.busy td:nth-child(8)::after{content:" ⚠";color:#b45309}
.figs{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}img{max-width:100%;border:1px solid #e2e8f0;border-radius:6px}
pre{background:#0f172a;color:#e2e8f0;padding:12px;border-radius:6px;overflow:auto;font-size:12px}
ul{margin:4px 0;padding-left:20px}.scroll{overflow-x:auto}
"""


def figures(manifest: Manifest) -> dict[str, Path | None]:
    """Every plot of the report, written into the run folder."""
    run_dir, rows = manifest.run_dir, stage_rows(manifest)
    labelled = eval_labels(manifest)
    return {
        "accuracy vs latency": plot(manifest, run_dir / PLOT),
        "throughput": plots.throughput(rows, run_dir / "throughput.png"),
        "confusion matrices": plots.confusion(
            confusion_matrices(manifest), labelled[1] if labelled else [], run_dir / "confusion.png"
        ),
        "training curves": plots.training_curves(histories(manifest), run_dir / "training.png", teacher_line(manifest)),
    }


def recipe_yaml(manifest: Manifest) -> str:
    import yaml

    return yaml.safe_dump(manifest.data.get("recipe") or {}, sort_keys=False, allow_unicode=True)


def markdown(manifest: Manifest, plot_file: Path | None, images: dict[str, Path | None] | None = None) -> str:
    images = images if images is not None else {"accuracy vs latency": plot_file}
    lines = [f"# Run report: {manifest.run_dir.name}", "", *[f"- {line}" for line in context_lines(manifest)], ""]
    lines += ["## Stages", "", *markdown_table(manifest), "", *selection_lines(manifest), *timing_lines(manifest)]
    lines += ["", *notes(manifest)]
    per_class = per_class_rows(manifest)
    if per_class:
        lines += ["", "## Per class", "", "| " + " | ".join(PER_CLASS_HEADERS) + " |", "|" + "---|" * 6]
        lines += ["| " + " | ".join(cells) + " |" for cells in per_class]
    for name, matrix in confusion_matrices(manifest).items():
        lines += ["", f"Confusion matrix, {name} (rows: true, columns: predicted): {matrix.tolist()}"]
    for title, path in images.items():
        if path is not None:
            lines += ["", f"![{title}]({path.name})"]
    for name, history in histories(manifest).items():
        lines += ["", f"Training, {name}: " + "; ".join(
            f"epoch {r['epoch']} loss {r.get('train_loss', float('nan')):.4f} acc {r['accuracy']:.4f}" for r in history
        )]  # fmt: skip
    lines += ["", "## Recipe as it ran", "", "```yaml", recipe_yaml(manifest).rstrip(), "```"]
    return "\n".join(lines) + "\n"


def html_page(manifest: Manifest, plot_file: Path | None, images: dict[str, Path | None] | None = None) -> str:
    images = images if images is not None else {"accuracy vs latency": plot_file}
    esc, rows = html.escape, stage_rows(manifest)
    name = esc(manifest.run_dir.name)
    stage_table = _table([h for h, _, _ in COLUMNS], formatted_rows(manifest), [_row_class(r) for r in rows], "stages")
    parts = [
        f"<h1>Run report: {name}</h1><ul class='context'>"
        + "".join(f"<li>{esc(line)}</li>" for line in context_lines(manifest))
        + "</ul>",
        _section(
            "Stages", stage_table + _items([*selection_lines(manifest), *timing_lines(manifest), *notes(manifest)])
        ),
        _section(
            "Accuracy, latency and throughput",
            "<div class='figs'>"
            + _image(images.get("accuracy vs latency"), "accuracy vs latency")
            + _image(images.get("throughput"), "throughput")
            + "</div>",
        ),  # fmt: skip
    ]
    per_class = per_class_rows(manifest)
    if per_class or images.get("confusion matrices"):
        body = _table(PER_CLASS_HEADERS, per_class) + _image(images.get("confusion matrices"), "confusion matrices")
        parts.append(_section("Per class: the selected model and its fine-tuned teacher", body))
    if images.get("training curves"):
        parts.append(_section("Training", _image(images["training curves"], "training curves")))
    parts.append(_section("Recipe as it ran", f"<pre>{esc(recipe_yaml(manifest))}</pre>"))
    return (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{name}</title>"
        f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>\n"
    )


def write_reports(manifest: Manifest) -> dict[str, Path]:
    run_dir = manifest.run_dir
    images = figures(manifest)
    md, page = run_dir / "report.md", run_dir / "report.html"
    md.write_text(markdown(manifest, None, images), encoding="utf-8")
    page.write_text(html_page(manifest, None, images), encoding="utf-8")
    written = {"markdown": md, "html": page}
    return written | {title: path for title, path in images.items() if path is not None}


def markdown_table(manifest: Manifest) -> list[str]:
    """The per-stage table as markdown lines (the report and the Hub model card share it)."""
    headers = [h for h, _, _ in COLUMNS]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return lines + ["| " + " | ".join(cells) + " |" for cells in formatted_rows(manifest)]
