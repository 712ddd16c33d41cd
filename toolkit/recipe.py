"""The recipe: one YAML file, validated into typed pydantic models before any work starts.

Every model forbids unknown keys. Paths are resolved relative to the recipe file while validating (the
folder comes in through the validation context), so the typed `Recipe` carries absolute paths for the whole
run. Stage option models live beside their stage in `toolkit.stages`; the registry there builds the union.
"""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from toolkit.sources import SourceError, resolve_local, resolve_model
from toolkit.stages import StageConfig


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _base_dir(info: ValidationInfo) -> Path:
    return Path((info.context or {}).get("base_dir", "."))


SplitName = Literal["train", "validation", "test"]
FILE_FORMATS = ("tsv", "csv", "jsonl")


class SplitConfig(Strict):
    """Fractions carved out of `train` (stratified, fixed seed) for splits that have no file of their own."""

    validation: float = Field(0.1, gt=0, lt=1)
    test: float = Field(0.1, gt=0, lt=1)
    seed: int = 42

    @model_validator(mode="after")
    def _room_for_train(self) -> SplitConfig:
        if self.validation + self.test >= 0.9:
            raise ValueError(
                f"validation + test = {self.validation + self.test:g} leaves too little to train on; keep it below 0.9"
            )
        return self


class DataConfig(Strict):
    format: Literal["auto", "tsv", "csv", "jsonl", "disk", "hub"] = "auto"
    # File formats: a path (relative to the recipe, or `package:NAME/file`). `disk`/`hub`: a split name.
    train: str = "train"
    validation: str | None = None
    test: str | None = None
    # `disk`: a folder written by `datasets.save_to_disk`; `hub`: a dataset id such as `stanfordnlp/sst2`.
    path: str | None = None
    subset: str | None = None
    text_column: str = "sentence"
    label_column: str = "label"
    # Label names in id order. Without it, string labels are sorted and integer labels keep their values.
    labels: list[str] | None = None
    drop_labels: list[str] = []
    dedupe: bool = False
    split: SplitConfig = SplitConfig()
    max_samples: dict[SplitName, PositiveInt] = {}

    @model_validator(mode="after")
    def _resolve(self, info: ValidationInfo) -> DataConfig:
        base = _base_dir(info)
        fmt = self.format
        if fmt == "auto":
            fmt = _guess_format(self.path, self.train, base)
        self.format = fmt
        if fmt in FILE_FORMATS:
            if self.path is not None:
                raise ValueError(
                    f"`path` is for format disk or hub; with format {fmt} name files in train/validation/test"
                )
            for split in ("train", "validation", "test"):
                value = getattr(self, split)
                if value is not None:
                    setattr(self, split, str(_existing_file(value, base, f"data.{split}")))
        elif fmt == "disk":
            if self.path is None:
                raise ValueError("format disk needs `path`: a folder written by datasets.save_to_disk")
            self.path = str(_existing_file(self.path, base, "data.path"))
        elif self.path is None:
            raise ValueError("format hub needs `path`: a Hub dataset id such as `stanfordnlp/sst2`")
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise ValueError(f"`labels` has duplicates: {self.labels}")
        return self


def _guess_format(path: str | None, train: str, base: Path) -> str:
    if path is not None:
        return "disk" if resolve_local(path, base) else "hub"
    name = train.lower().removesuffix(".bz2").removesuffix(".gz").removesuffix(".xz")
    for suffix, fmt in (
        (".tsv", "tsv"),
        (".txt", "tsv"),
        (".csv", "csv"),
        (".jsonl", "jsonl"),
        (".json", "jsonl"),
    ):
        if name.endswith(suffix):
            return fmt
    raise ValueError(f"cannot tell the format of {train!r}; set `format` to one of tsv, csv, jsonl, disk, hub")


def _existing_file(value: str, base: Path, key: str) -> Path:
    try:
        path = resolve_local(value, base)
    except SourceError as exc:
        raise ValueError(str(exc)) from None
    if path is None:
        raise ValueError(f"{key}: {value!r} not found (relative to the recipe folder {base})")
    return path


class ModelConfig(Strict):
    # A local folder (relative to the recipe), `package:NAME/folder`, or a Hub id.
    name: str
    revision: str | None = None
    max_length: int = Field(128, ge=8, le=4096)

    @field_validator("name")
    @classmethod
    def _resolve(cls, value: str, info: ValidationInfo) -> str:
        try:
            return resolve_model(value, _base_dir(info))
        except SourceError as exc:
            raise ValueError(str(exc)) from None


class SpeedConfig(Strict):
    enabled: bool = True
    # Fixed and reported so figures from different runs are comparable; 0 means every core.
    threads: int = Field(0, ge=0)
    warmup: int = Field(10, ge=0)
    latency_samples: PositiveInt = 200
    throughput_batch_size: PositiveInt = 32
    throughput_samples: PositiveInt = 512


MetricName = Literal["accuracy", "macro_f1", "per_class"]


class EvaluateConfig(Strict):
    metrics: list[MetricName] = ["accuracy", "macro_f1", "per_class"]
    split: Literal["test", "validation"] = "test"
    batch_size: PositiveInt = 64
    speed: SpeedConfig = SpeedConfig()


class SelectConfig(Strict):
    """Which candidate the run hands on: the best by `objective` among those meeting every constraint."""

    # Largest accuracy loss allowed against the fine-tuned model, in points: percentage points of accuracy
    # (absolute) or percent of the fine-tuned accuracy (relative).
    max_accuracy_drop: float = Field(1.0, ge=0)
    drop_mode: Literal["absolute", "relative"] = "absolute"
    max_latency_ms: float | None = Field(None, gt=0)  # batch-1 p50
    max_size_mb: float | None = Field(None, gt=0)  # weights on disk
    objective: Literal["latency", "throughput", "size"] = "latency"


class OutputConfig(Strict):
    dir: str | None = None


class Recipe(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: DataConfig
    model: ModelConfig
    stages: list[StageConfig] = Field(min_length=1)
    evaluate: EvaluateConfig = EvaluateConfig()
    select: SelectConfig = SelectConfig()
    output: OutputConfig = OutputConfig()

    @model_validator(mode="after")
    def _finish(self, info: ValidationInfo) -> Recipe:
        names = [stage.name for stage in self.stages]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"stage names must be unique; repeated: {dupes} (set `name:` on one of them)")
        self._check_stage_shapes()
        _check_input_formats(self.stages)
        base = _base_dir(info)
        run_dir = self.output.dir or f"runs/{self.name}"
        self.output.dir = str((base / run_dir).resolve())
        return self

    def _check_stage_shapes(self) -> None:
        """Options that only the model's shape can rule out (pruning to more heads than exist) fail here, before
        any work, when the recipe's model is a local folder."""
        shape = local_model_shape(self.model.name)
        for number, stage in enumerate(self.stages):
            if not stage.enabled:
                continue
            try:
                shape = stage.check_shape(shape)
            except ValueError as exc:
                raise ValueError(f"stages[{number}] ({stage.name}): {exc}") from None

    @property
    def run_dir(self) -> Path:
        return Path(self.output.dir)

    def stage(self, name: str):
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)


def local_model_shape(name: str) -> dict[str, Any] | None:
    """The recipe model's `config.json` when it is a local folder (None for a Hub id: nothing to read offline)."""
    config = Path(name) / "config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _check_input_formats(stages: list) -> None:
    """Stages that read ONNX (`input_format`) need an enabled export before them."""
    exported = False
    for stage in stages:
        if not stage.enabled:
            continue
        if getattr(stage, "input_format", None) == "onnx" and not exported:
            raise ValueError(
                f"stage {stage.name!r} ({stage.type}) works on an ONNX model; put an enabled `export` stage before it"
            )
        exported = exported or stage.type == "export"


class RecipeError(Exception):
    """An invalid recipe: `problems` holds one line per problem, each naming the key path."""

    def __init__(self, path: Path | str, problems: list[str]):
        self.path = path
        self.problems = problems
        super().__init__(f"{path}: invalid recipe\n" + "\n".join(f"  {p}" for p in problems))


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(path, [f"recipe file not found: {path}"])
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except yaml.YAMLError as exc:
        raise RecipeError(path, [f"not valid YAML: {exc}"]) from None
    return parse_recipe(raw, path.resolve().parent, source=path)


def parse_recipe(raw: Any, base_dir: Path, source: Path | str = "<recipe>") -> Recipe:
    if not isinstance(raw, dict):
        raise RecipeError(source, ["the recipe must be a mapping of keys (name, data, model, stages, ...)"])
    try:
        return Recipe.model_validate(raw, context={"base_dir": base_dir})
    except ValidationError as exc:
        raise RecipeError(source, [_describe(err, raw) for err in exc.errors()]) from None


def _describe(err: dict, raw: dict) -> str:
    loc = _strip_stage_tag(tuple(err["loc"]))
    where = _key_path(loc)
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1], raw)
        hint = f"; allowed keys: {', '.join(allowed)}" if allowed else ""
        return f"{where}: unknown key{hint}"
    if err["type"] == "missing":
        return f"{where}: required key is missing"
    shown = err.get("input")
    if isinstance(shown, (str, int, float, bool)) and err["type"] != "union_tag_invalid":
        return f"{where}: {msg} (got {shown!r})"
    return f"{where}: {msg}"


def _strip_stage_tag(loc: tuple) -> tuple:
    """pydantic puts the union tag in the path (stages.0.train.epochs); users wrote stages[0].epochs."""
    from toolkit.stages import REGISTRY

    if len(loc) > 2 and loc[0] == "stages" and isinstance(loc[1], int) and loc[2] in REGISTRY:
        return loc[:2] + loc[3:]
    return loc


def _key_path(loc: tuple) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "(top level)"


def _allowed_keys(loc: tuple, raw: dict) -> list[str]:
    """Walk the model classes along `loc` to list the keys allowed there (a stage's model comes from its type)."""
    from toolkit.stages import REGISTRY

    model: Any = Recipe
    if len(loc) >= 2 and loc[0] == "stages":
        try:
            model = REGISTRY[raw["stages"][loc[1]]["type"]].config
        except (KeyError, IndexError, TypeError):
            return []
        loc = loc[2:]
    for item in loc:
        field = model.model_fields.get(item) if isinstance(item, str) else None
        annotation = getattr(field, "annotation", None)
        # `X | None` (an optional section such as distill's `augment`): the model inside.
        members = [annotation, *typing.get_args(annotation)]
        found = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]
        if not found:
            return []
        model = found[0]
    return list(model.model_fields)


__all__ = ["Recipe", "RecipeError", "StageConfig", "load_recipe", "parse_recipe"]
