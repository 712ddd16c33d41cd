"""The recipe's run-level option models: data, model, evaluation, selection, output, and the `Recipe` itself.
Paths are resolved relative to the recipe file while validating, so the typed `Recipe` carries absolute paths
for the whole run."""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import Literal

from pydantic import Field, PositiveInt, ValidationInfo, field_validator, model_validator

from toolkit.config.common import (
    Strict,
    base_dir,
    check_max_length,
    existing_file,
    local_model_shape,
    local_tokenizer_config,
    model_reference,
)
from toolkit.config.stages import StageConfig
from toolkit.sources import resolve_local

SplitName = Literal["train", "validation", "test"]
FILE_FORMATS = ("tsv", "csv", "jsonl")


class SplitConfig(Strict):
    """Fractions carved out of `train` (stratified, fixed seed) for splits that have no file of their own."""

    validation: float = Field(0.1, gt=0, lt=1, description="Share of the pool carved out as the validation split.")
    test: float = Field(0.1, gt=0, lt=1, description="Share of the pool carved out as the test split.")
    seed: int = Field(42, description="Seed of the stratified carving.")

    @model_validator(mode="after")
    def _room_for_train(self) -> SplitConfig:
        if self.validation + self.test >= 0.9:
            raise ValueError(
                f"validation + test = {self.validation + self.test:g} leaves too little to train on; keep it below 0.9"
            )
        return self


class DataConfig(Strict):
    """Where the labelled texts come from and how they are read, checked and split."""

    format: Literal["auto", "tsv", "csv", "jsonl", "disk", "hub"] = Field(
        "auto", description="auto: from the file suffix (.tsv/.txt, .csv, .jsonl/.json, optionally .gz/.bz2/.xz)."
    )
    train: str = Field(
        "train",
        description="File formats: a path (relative to the recipe, or `package:NAME/file`). disk/hub: a split name.",
    )
    validation: str | None = Field(None, description="Like `train`; absent: carved out of train (see `split`).")
    test: str | None = Field(None, description="Like `train`; absent: carved out of train (see `split`).")
    path: str | None = Field(
        None,
        description="disk: a folder written by `datasets.save_to_disk`; hub: a dataset id such as `stanfordnlp/sst2`.",
    )
    subset: str | None = Field(None, description="hub: the dataset's configuration name.")
    encoding: str = Field(
        "utf-8",
        description="Text encoding of tsv/csv/jsonl files, by Python's codec names (utf-8, gbk, gb18030, latin-1, "
        "utf-16, ...); a byte-order mark in the file wins.",
    )
    text_column: str = Field("sentence", description="Column (or JSON key) holding the text.")
    label_column: str = Field("label", description="Column (or JSON key) holding the label.")
    labels: list[str] | None = Field(
        None,
        description="Label names in id order. Without it, string labels are sorted and integer labels keep their "
        "values.",
    )
    drop_labels: list[str] = Field([], description="Rows with these labels are left out.")
    dedupe: bool = Field(
        False,
        description="Keep the first copy of each text; drop texts seen with two labels; earlier splits win.",
    )
    split: SplitConfig = Field(SplitConfig(), description="How missing splits are carved out of train.")
    max_samples: dict[SplitName, PositiveInt] = Field({}, description="Stratified subsample per split, by count.")

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        try:
            codecs.lookup(value)
        except LookupError:
            raise ValueError(
                f"unknown encoding {value!r}; use a Python codec name such as utf-8, gbk, gb18030, latin-1, utf-16"
            ) from None
        return value

    @model_validator(mode="after")
    def _resolve(self, info: ValidationInfo) -> DataConfig:
        base = base_dir(info)
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
                    setattr(self, split, str(existing_file(value, base, f"data.{split}")))
        elif fmt == "disk":
            if self.path is None:
                raise ValueError("format disk needs `path`: a folder written by datasets.save_to_disk")
            self.path = str(existing_file(self.path, base, "data.path"))
        elif self.path is None:
            raise ValueError("format hub needs `path`: a Hub dataset id such as `stanfordnlp/sst2`")
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise ValueError(f"`labels` has duplicates: {self.labels}")
        return self


def _guess_format(path: str | None, train: str, base: Path) -> str:
    if path is not None:
        return "disk" if resolve_local(path, base) else "hub"
    name = train.lower().removesuffix(".bz2").removesuffix(".gz").removesuffix(".xz")
    for suffix, fmt in ((".tsv", "tsv"), (".txt", "tsv"), (".csv", "csv"), (".jsonl", "jsonl"), (".json", "jsonl")):
        if name.endswith(suffix):
            return fmt
    raise ValueError(f"cannot tell the format of {train!r}; set `format` to one of tsv, csv, jsonl, disk, hub")


class ModelConfig(Strict):
    """The pretrained model the run starts from."""

    name: str = Field(description="A local folder (relative to the recipe), `package:NAME/folder`, or a Hub id.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of a Hub model.")
    max_length: int = Field(128, ge=8, le=4096, description="Texts are truncated to this many tokens everywhere.")

    @field_validator("name")
    @classmethod
    def _resolve(cls, value: str, info: ValidationInfo) -> str:
        return model_reference(value, info)

    @field_validator("max_length")
    @classmethod
    def _fits_positions(cls, value: int, info: ValidationInfo) -> int:
        if "name" in info.data:  # a local folder's position table (a Hub model's is not read offline)
            check_max_length(value, local_model_shape(info.data["name"]), "the model")
        return value


class SpeedConfig(Strict):
    """How every model's speed is measured (fixed and reported, so figures from different runs compare)."""

    enabled: bool = Field(True, description="Measure latency and throughput.")
    threads: int = Field(
        0,
        ge=0,
        description="Intra-op threads; 0: TOOLKIT_THREADS, else the cores this process may use (its CPU affinity, lowered to its cgroup CPU quota).",
    )
    warmup: int = Field(
        10, ge=0, description="Untimed single-text calls first (then one untimed pass over the texts timed)."
    )
    latency_samples: PositiveInt = Field(200, description="Timed single-text calls (batch-1 p50/p95).")
    throughput_batch_size: PositiveInt = Field(32, description="Texts per call for the throughput figure.")
    throughput_samples: PositiveInt = Field(512, description="Texts timed for the throughput figure.")


MetricName = Literal["accuracy", "macro_f1", "per_class"]


class EvaluateConfig(Strict):
    """What every model stage's output is measured on."""

    metrics: list[MetricName] = Field(["accuracy", "macro_f1", "per_class"], description="Quality figures kept.")
    split: Literal["test", "validation"] = Field("test", description="The split quality and parity are measured on.")
    batch_size: PositiveInt = Field(64, description="Texts per call when computing quality and parity.")
    speed: SpeedConfig = Field(SpeedConfig(), description="Speed measurement settings.")


class SelectConfig(Strict):
    """Which candidate the run hands on: the best by `objective` among those meeting every constraint."""

    max_accuracy_drop: float = Field(
        1.0,
        ge=0,
        description="Largest accuracy loss allowed against the fine-tuned model, in points: percentage points "
        "(absolute) or percent of the fine-tuned accuracy (relative).",
    )
    drop_mode: Literal["absolute", "relative"] = Field("absolute", description="How max_accuracy_drop is counted.")
    max_latency_ms: float | None = Field(None, gt=0, description="Largest batch-1 p50 latency allowed, in ms.")
    max_size_mb: float | None = Field(None, gt=0, description="Largest size of the weights on disk, in MB.")
    objective: Literal["latency", "throughput", "size"] = Field(
        "latency", description="What the best qualifying candidate is best at."
    )
    finalist_rounds: int = Field(
        5,
        ge=0,
        description="Before choosing, the candidates that meet the quality and size limits are timed again in one "
        "session, each in turn (in a new order every round), this many rounds, and latency and throughput come "
        "from there (per-stage figures are taken minutes apart, under whatever load the machine had then). 0: use "
        "the per-stage figures.",
    )


class CardConfig(Strict):
    """What the pushed model card says that the run cannot know."""

    license: str | None = Field(None, description="The model's license, a Hub license id such as apache-2.0 or mit.")
    language: str | list[str] | None = Field(None, description="Language code(s) of the texts, such as en or zh.")


class OutputConfig(Strict):
    """Where the run's files go."""

    dir: str | None = Field(None, description="The run folder (relative to the recipe); default: runs/<name>.")


class Recipe(Strict):
    """One YAML file: data, model, stages in order, and how the results are measured and chosen."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Names the run folder and the package.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: CUDA where a GPU is visible, else the CPU."
    )
    data: DataConfig = Field(description="The labelled texts.")
    model: ModelConfig = Field(description="The pretrained model the run starts from.")
    stages: list[StageConfig] = Field(min_length=1, description="The stages, run in this order.")
    evaluate: EvaluateConfig = Field(EvaluateConfig(), description="How every model is measured.")
    select: SelectConfig = Field(SelectConfig(), description="How the handed-on model is chosen.")
    output: OutputConfig = Field(OutputConfig(), description="Where the run's files go.")
    card: CardConfig = Field(CardConfig(), description="Model card metadata for `push`.")

    @model_validator(mode="after")
    def _finish(self, info: ValidationInfo) -> Recipe:
        names = [stage.name for stage in self.stages]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"stage names must be unique; repeated: {dupes} (set `name:` on one of them)")
        self._check_stage_shapes()
        _check_input_formats(self.stages)
        _check_references(self.stages)
        run_dir = self.output.dir or f"runs/{self.name}"
        self.output.dir = str((base_dir(info) / run_dir).resolve())
        return self

    def _check_stage_shapes(self) -> None:
        """Options that only the model's shape or tokenizer can rule out (pruning to more heads than exist,
        attention fused for a tokenizer that pads on the left) fail here, before any work, when the recipe's
        model is a local folder. A model that a stage brings in (distill's `student.model`) must hold
        `model.max_length` tokens too."""
        shape = local_model_shape(self.model.name)
        tokenizer = local_tokenizer_config(self.model.name)  # every stage's model keeps the recipe model's
        for number, stage in enumerate(self.stages):
            if not stage.enabled:
                continue
            try:
                stage.check_tokenizer(tokenizer)
                shape = stage.check_shape(shape)
            except ValueError as exc:
                raise ValueError(f"stages[{number}] ({stage.name}): {exc}") from None
            student = getattr(getattr(stage, "student", None), "model", None)
            if student is not None:
                try:
                    check_max_length(self.model.max_length, shape, f"its student.model {student}")
                except ValueError as exc:
                    raise ValueError(f"stages[{number}] ({stage.name}): model.max_length: {exc}") from None

    @property
    def run_dir(self) -> Path:
        return Path(self.output.dir)

    def stage(self, name: str):
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)


# Stage types whose model is PyTorch: what a distillation teacher can be.
PYTORCH_MAKERS = ("train", "trim_vocab", "prune", "distill")


def _check_references(stages: list) -> None:
    """A stage that names another (`distill.teacher`) must name an earlier enabled stage that makes its input."""
    earlier: list = []
    for number, stage in enumerate(stages):
        teacher = getattr(stage, "teacher", None)
        if stage.enabled and teacher is not None:
            usable = [s.name for s in earlier if s.type in PYTORCH_MAKERS]
            if teacher not in usable:
                why = (
                    "is not an earlier enabled stage"
                    if teacher not in [s.name for s in earlier]
                    else "makes no PyTorch model"
                )
                raise ValueError(
                    f"stages[{number}] ({stage.name}): teacher {teacher!r} {why}; it must name an earlier enabled "
                    f"train, trim_vocab, prune or distill stage (here: {', '.join(usable) or 'none'})"
                )
        if stage.enabled and stage.type == "openvino":
            graphs = [s.name for s in earlier if s.type in ("export", "optimize")]
            if stage.source not in graphs:
                raise ValueError(
                    f"stages[{number}] ({stage.name}): source {stage.source!r} is not an earlier enabled export or "
                    f"optimize stage (here: {', '.join(graphs) or 'none'}); it names the FP32 ONNX graph to convert"
                )
        if stage.enabled and stage.type == "trim_vocab" and not any(s.type in PYTORCH_MAKERS for s in earlier):
            raise ValueError(
                f"stages[{number}] ({stage.name}): trim_vocab works on a fine-tuned model, whose answers the trimmed "
                "one must keep (its parity gate); put it after an enabled train stage"
            )
        if stage.enabled:
            earlier.append(stage)


def _check_input_formats(stages: list) -> None:
    """Stages that read ONNX (`input_format`) need an enabled export before them."""
    exported = False
    for stage in stages:
        if not stage.enabled:
            continue
        if stage.input_format == "onnx" and not exported:
            raise ValueError(
                f"stage {stage.name!r} ({stage.type}) works on an ONNX model; put an enabled `export` stage before it"
            )
        exported = exported or stage.type == "export"
