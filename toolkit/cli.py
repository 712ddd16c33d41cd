"""The command line. Heavy libraries are imported inside commands so `toolkit --help` answers at once."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="Recipe-driven chain: fine-tune -> compress -> ONNX -> evaluate -> select -> serve.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)]


def _console():
    from rich.console import Console

    console = Console(highlight=False)
    if not console.is_terminal:  # logs and CI: wide enough that the figures table is not truncated
        console = Console(highlight=False, width=200)
    return console


def _fail(message: str) -> None:
    typer.secho(message, fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


@contextlib.contextmanager
def _errors(log_file: Path | None = None) -> Iterator[None]:
    """Every ToolkitError as its own message; anything else as one line naming the log with the traceback."""
    from toolkit.errors import ToolkitError

    try:
        yield
    except typer.Exit:
        raise
    except ToolkitError as exc:
        _fail(f"error: {exc}")
    except Exception as exc:
        where = f"; the traceback is in {log_file}" if log_file else ""
        _fail(f"error: unexpected {type(exc).__name__}: {exc}{where}")


def _show_progress(console) -> None:
    """The engine logs to the `toolkit` logger; the terminal shows it through rich."""
    import logging

    from rich.logging import RichHandler

    logger = logging.getLogger("toolkit")
    logger.setLevel(logging.INFO)
    logger.handlers = [h for h in logger.handlers if not isinstance(h, RichHandler)]
    handler = RichHandler(console=console, show_time=False, show_path=False, show_level=False, markup=False)
    handler.setLevel(logging.INFO)
    logger.addHandler(handler)


def _load(recipe_path: Path):
    from toolkit.recipe import load_recipe

    with _errors():
        return load_recipe(recipe_path)


@app.command()
def validate(
    recipe: RecipeArg,
    explain: Annotated[bool, typer.Option("--explain", help="Show every stage option, its value and meaning.")] = False,
) -> None:
    """Check a recipe (keys, values, files, model) without running anything."""
    parsed = _load(recipe)
    stages = " -> ".join(f"{s.name}" + ("" if s.enabled else " (disabled)") for s in parsed.stages)
    typer.echo(f"{recipe}: valid recipe {parsed.name!r}")
    typer.echo(f"  model: {parsed.model.name} (max_length {parsed.model.max_length})")
    typer.echo(f"  data: {parsed.data.format} {parsed.data.path or parsed.data.train}")
    typer.echo(f"  stages: {stages}")
    typer.echo(f"  run folder: {parsed.run_dir}")
    if explain:
        from toolkit.config.reference import explain as explained

        for stage in parsed.stages:
            typer.echo(f"  {stage.name}:")
            for line in explained(stage):
                typer.echo(f"    {line}")


@app.command()
def schema(
    markdown: Annotated[bool, typer.Option("--markdown", help="The recipe reference as Markdown.")] = False,
) -> None:
    """Print the recipe's JSON schema (every key, its type, default and description)."""
    import json

    from toolkit.config import reference

    typer.echo(reference.markdown() if markdown else json.dumps(reference.json_schema(), indent=2), nl=not markdown)


@app.command()
def run(
    recipe: RecipeArg,
    only: Annotated[list[str] | None, typer.Option("--only", help="Run only this stage (repeatable).")] = None,
    from_: Annotated[str | None, typer.Option("--from", help="Run this stage and every one after it.")] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Ignore earlier results in the run folder.")] = False,
) -> None:
    """Run a recipe; stages whose inputs and options are unchanged since the last run are skipped."""
    parsed = _load(recipe)
    from toolkit.pipeline import LOG_FILE, StageError, run_recipe

    console = _console()
    _show_progress(console)
    log_file = parsed.run_dir / LOG_FILE
    with _errors(log_file):
        try:
            manifest = run_recipe(parsed, only=only, from_=from_, fresh=fresh)
        except StageError as exc:
            raise StageError(f"{exc}\n(details in {parsed.run_dir / 'manifest.json'} and {log_file})") from exc
    from accelerate import PartialState

    if PartialState().is_main_process:
        _show_report(manifest, console)
        console.print(f"run folder: {parsed.run_dir}")


def _show_report(manifest, console) -> None:
    from toolkit.report import notes, selection_lines, terminal_table, write_reports

    console.print(terminal_table(manifest))
    for line in [*selection_lines(manifest), *notes(manifest)]:
        console.print(line, markup=False)
    written = write_reports(manifest)
    console.print("report: " + ", ".join(str(p) for p in written.values()))


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="A run folder (holds manifest.json).")]) -> None:
    """Print the figures of an earlier run and write report.md, report.html and the plot into its folder."""
    _show_report(_manifest(run_dir), _console())


@app.command()
def predict(
    run_dir: Annotated[Path, typer.Argument(help="A run folder whose manifest has a selected model.")],
    file: Annotated[
        Path, typer.Argument(help="A data file (tsv, csv, jsonl; .gz/.bz2/.xz too) with the recipe's text column.")
    ],
    output: Annotated[
        Path | None,
        typer.Option("--output", help="Where the predictions go (TSV); default beside FILE: NAME.predictions.tsv."),
    ] = None,
    fmt: Annotated[
        str | None, typer.Option("--format", help="tsv, csv or jsonl; default from FILE's name, else the recipe's.")
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="Texts per model call (similar lengths are batched together).")
    ] = 64,
    threads: Annotated[
        int,
        typer.Option(
            "--threads",
            min=0,
            help="Intra-op threads; 0: TOOLKIT_THREADS, else the cores this process may use (affinity, CPU quota).",
        ),
    ] = 0,
) -> None:
    """Score a data file with the run's selected model; with the label column present, print the accuracy too."""
    from toolkit.prediction import predict_file

    with _errors():
        done = predict_file(run_dir, file, output, fmt, batch_size, threads)
    accuracy = "" if done.accuracy is None else f", accuracy {done.accuracy:.4f}"
    typer.echo(f"{done.rows} predictions by {done.stage} in {done.output}{accuracy}")


def _manifest(run_dir: Path):
    from toolkit.manifest import MANIFEST, Manifest

    if not (run_dir / MANIFEST).is_file():
        _fail(f"error: {run_dir} has no {MANIFEST}; pass the run folder of a `toolkit run`")
    return Manifest.load(run_dir)


@app.command()
def push(
    run_dir: Annotated[Path, typer.Argument(help="A run folder whose manifest has a selected model.")],
    repo_id: Annotated[str, typer.Option("--repo-id", help="Hub repository, user/name.", show_default=False)],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be uploaded; upload nothing.")] = False,
    private: Annotated[bool, typer.Option("--private", help="Create the repository as private.")] = False,
    local_dir: Annotated[
        Path | None,
        typer.Option(
            "--local-dir",
            help="Write exactly the repo that would be uploaded into this folder (new or empty); upload nothing.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Upload the run's selected model with a generated model card. Token: HF_TOKEN or `hf auth login`.
    `--local-dir` writes the same repo to a folder instead (to review it, or to carry it to another machine:
    `hf upload REPO DIR` pushes it as is; `TOOLKIT_HUB_MODEL=DIR` serves it)."""
    import re

    from toolkit.config import REPO_ID
    from toolkit.hub import plan_upload
    from toolkit.hub import push as push_upload
    from toolkit.manifest import Manifest

    if not re.match(REPO_ID, repo_id):
        _fail(f"error: --repo-id must look like user/name, got {repo_id!r}")
    if local_dir is not None and local_dir.exists() and (not local_dir.is_dir() or any(local_dir.iterdir())):
        _fail(f"error: --local-dir {local_dir} exists and is not an empty folder; name a new or empty one")
    with _errors():
        upload = plan_upload(Manifest.load(run_dir), repo_id)
        what = f"{repo_id} ({upload.artifact.stage}, {upload.artifact.format}{', private' if private else ''})"
        if local_dir is not None:
            typer.echo(f"writing the repo for {what} to {upload.write(local_dir)}:")
        else:
            typer.echo(f"{'would upload' if dry_run else 'uploading'} to {what}:")
        for line in upload.listing():
            typer.echo(f"  {line}")
        if not dry_run and local_dir is None:
            typer.echo(f"done: {push_upload(upload, private)}")
