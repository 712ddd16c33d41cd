"""Option models of every stage, with the pure checks that need only options and the model's shape.

The stage functions live in `toolkit.stages`; these models sit below them so the recipe can be validated (and
`toolkit --help` answered) without importing any stage, and so nothing here imports upward.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, Field, PositiveInt, ValidationInfo, field_validator, model_validator

from toolkit.config.common import (
    REPO_ID,
    ParityGate,
    Strict,
    base_dir,
    existing_file,
    local_model_shape,
    model_reference,
)


class StageBase(Strict):
    type: str = Field(description="The stage's kind; picks which keys are allowed.")
    name: str = Field(
        "",
        pattern=r"^([A-Za-z0-9][A-Za-z0-9_.-]*)?$",
        description="Unique within the recipe; defaults to the type. Names the stage's folder and manifest entry.",
    )
    enabled: bool = Field(True, description="A disabled stage is kept in the recipe but not run.")

    # Stages that read an ONNX model say so; validation then needs an enabled `export` before them.
    input_format: ClassVar[str | None] = None

    @model_validator(mode="after")
    def _default_name(self):
        if not self.name:
            self.name = self.type
        return self

    def branch_from(self) -> str | None:
        """The earlier stage whose model this stage reads, when it is not the current model: the stage is then a
        branch (its model is a candidate for selection, and the stages after it continue from the current one)."""
        return None

    def check_shape(self, shape: dict[str, Any] | None) -> dict[str, Any] | None:
        """Check this stage's options against the shape of the model it will receive (the recipe model's
        `config.json` fields, passed from stage to stage; None when unknown, e.g. a Hub model) and return the
        shape it hands on. Raise ValueError for options the shape rules out. Most stages keep the shape."""
        return shape

    def check_tokenizer(self, tokenizer: dict[str, Any] | None) -> None:
        """Check this stage's options against the model's `tokenizer_config.json` (None when unknown, e.g. a Hub
        model); raise ValueError for options it rules out. Most stages work with any tokenizer."""

    def input_files(self) -> list[str]:
        """Files the stage reads besides its model and the run's data: their bytes are part of its fingerprint,
        so an edited file re-runs the stage."""
        return []


class LoopOptions(BaseModel):
    """Options of the shared Accelerate loop (`toolkit.training.fit`); training-like stages extend it."""

    model_config = {"extra": "forbid"}

    epochs: PositiveInt = Field(3, description="Passes over the training split.")
    batch_size: PositiveInt = Field(32, description="Training texts per step and process.")
    eval_batch_size: PositiveInt = Field(64, description="Texts per step when scoring the validation split.")
    learning_rate: float = Field(5e-5, gt=0, lt=1, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (not on biases and LayerNorm weights).")
    warmup_ratio: float = Field(
        0.06, ge=0, lt=1, description="Share of steps with a linear warm-up, then linear decay."
    )
    gradient_accumulation_steps: PositiveInt = Field(1, description="Steps whose gradients add up before an update.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm; 0 turns clipping off.")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        "auto", description="auto: bf16 (or fp16) on a CUDA device, none on the CPU."
    )
    seed: int = Field(42, description="Seed for weights, shuffling and dropout.")
    metric_for_best: Literal["accuracy", "macro_f1"] = Field(
        "accuracy", description="Validation metric that picks the epoch whose weights are kept."
    )
    group_by_length: bool = Field(
        False,
        description="Batches of texts of similar length (transformers' LengthGroupedSampler), so a batch pads "
        "less; the order of batches stays random.",
    )
    patience: PositiveInt | None = Field(
        None,
        description="Early stopping: stop after this many epochs without a better validation `metric_for_best` "
        "(the best epoch's weights are kept); `epochs` is then a ceiling. None: every epoch runs.",
    )


class TrainConfig(StageBase, LoopOptions):
    """Fine-tune the current model (the recipe's pretrained encoder) on the recipe's data."""

    type: Literal["train"]


# ---------------------------------------------------------------------------------------------- prune

# Encoder families whose layers `toolkit.pruning` can cut (its `LAYOUTS`: BERT's layer layout and DistilBERT's);
# each runs prune -> distill -> export -> optimize -> quantize in the tests.
LAYOUT_FAMILIES = ("bert", "deberta-v2", "distilbert", "electra", "modernbert", "mpnet", "roberta", "xlm-roberta")
# What a family's stock config cannot record (so a pruned folder would not load): checked before any work.
HEAD_LIMITS = {
    "mpnet": "MPNet's relative-position bias table is shared by every layer and its config has no field for fewer "
    "heads, so its heads cannot be pruned; set only ffn_size",
    "modernbert": "ModernBERT fuses q/k/v in one projection whose width it derives from hidden_size, and its config "
    "has no field for fewer heads, so its heads cannot be pruned; set only ffn_size",
    "deberta-v2": "DeBERTa-v2/v3 cannot apply pruned_heads and builds its attention output projection hidden_size "
    "wide, so a model with fewer heads would not load; set only ffn_size",
}


def check_family(shape: dict[str, Any] | None, stage: str, heads: bool = False) -> None:
    """A ValueError naming the model's family when the pruning module cannot cut it (unknown shape: no check);
    `heads`: the stage also prunes attention heads."""
    family = (shape or {}).get("model_type")
    if family is not None and family not in LAYOUT_FAMILIES:
        raise ValueError(
            f"{stage} cannot cut a model_type {family!r} model; supported families: {', '.join(LAYOUT_FAMILIES)}"
            + (" (or distil into another pretrained model with student.model)" if stage.startswith("distill") else "")
        )
    if heads and family in HEAD_LIMITS:
        raise ValueError(f"{stage} cannot prune the heads of a model_type {family!r} model: {HEAD_LIMITS[family]}")


# An absolute count (int >= 1) or a fraction of what the model has (0 < f < 1).
Target = PositiveInt | float


def _check_target(value: Target | None, key: str) -> None:
    if value is None or isinstance(value, int):
        return
    if not 0 < value < 1:
        raise ValueError(
            f"{key} must be a whole number >= 1 (how many to keep) or a fraction strictly between 0 and 1; got {value}"
        )


def resolve_target(value: Target, current: int, key: str, floor: int = 1) -> int:
    """How many to keep out of `current` for a target; fractions round, never below `floor`."""
    keep = value if isinstance(value, int) else max(floor, round(value * current))
    if keep > current:
        raise ValueError(f"{key}: {value} is more than the model has ({current}); choose at most {current}")
    return keep


class PruneConfig(StageBase, LoopOptions):
    """Structured pruning of attention heads and FFN neurons by importance on training data, then an optional
    short recovery fine-tune with the training loop's options."""

    type: Literal["prune"]
    heads_per_layer: Target | None = Field(
        None,
        description="Heads each layer keeps: a count, or a fraction of what the layer has; a layer that already "
        "has fewer keeps all of its heads.",
    )
    ffn_size: Target | None = Field(
        None,
        description="FFN (intermediate) neurons every layer keeps: a count or a fraction; one size for all layers.",
    )
    iterations: PositiveInt = Field(
        1, description="Reach the targets in this many rounds, re-scoring importance on the pruned model in between."
    )
    importance_batches: PositiveInt = Field(
        32, description="Training batches (of batch_size) that importance is accumulated over, per round."
    )
    recover_epochs: int = Field(0, ge=0, description="Epochs of fine-tuning after pruning; 0: none.")

    @model_validator(mode="after")
    def _check(self):
        _check_target(self.heads_per_layer, "heads_per_layer")
        _check_target(self.ffn_size, "ffn_size")
        if self.heads_per_layer is None and self.ffn_size is None:
            raise ValueError("set heads_per_layer and/or ffn_size (how many heads / FFN neurons to keep)")
        if "epochs" in self.model_fields_set:
            raise ValueError("prune has no `epochs`; use recover_epochs for the fine-tune after pruning")
        return self

    def check_shape(self, shape: dict[str, Any] | None) -> dict[str, Any] | None:
        check_family(shape, "prune", heads=self.heads_per_layer is not None)
        if not shape or "num_attention_heads" not in shape or "intermediate_size" not in shape:
            return shape
        shape = dict(shape)
        if self.heads_per_layer is not None:
            heads = resolve_target(self.heads_per_layer, shape["num_attention_heads"], "heads_per_layer")
            layers = shape.get("num_hidden_layers", 0)
            pruned = {int(k): v for k, v in (shape.get("pruned_heads") or {}).items()}
            kept = [
                [h for h in range(shape["num_attention_heads"]) if h not in pruned.get(i, ())] for i in range(layers)
            ]
            shape["pruned_heads"] = {str(i): k[heads:] for i, k in enumerate(kept) if k[heads:]}
        if self.ffn_size is not None:
            shape["intermediate_size"] = resolve_target(self.ffn_size, shape["intermediate_size"], "ffn_size")
        return shape


# ---------------------------------------------------------------------------------------------- distill


MAX_COPIES = 8
# What `copies: auto` aims at per epoch: the full recipe's transfer set (9,692 training texts, one copy each), on
# which its 3-layer student ends 0.6 points below its teacher.
AUTO_EPOCH_TEXTS = 20_000


class AugmentConfig(Strict):
    """Noisy copies of the training texts, labelled by the teacher (TinyBERT's augmentation, on token ids)."""

    copies: Annotated[int, Field(ge=1, le=MAX_COPIES)] | Literal["auto"] = Field(
        1,
        description="Noisy copies of each training text added to every batch (1 doubles the texts). auto: scaled "
        f"to the transfer set (training plus unlabelled texts) so that an epoch shows the student about "
        f"{AUTO_EPOCH_TEXTS:,} texts: round({AUTO_EPOCH_TEXTS:,} / texts) - 1 copies, 1 to {MAX_COPIES}.",
    )

    def resolved_copies(self, texts: int) -> int:
        """The copies per text for a transfer set of `texts` texts."""
        if self.copies != "auto":
            return self.copies
        return min(MAX_COPIES, max(1, round(AUTO_EPOCH_TEXTS / max(texts, 1)) - 1))

    token_noise: float = Field(
        0.15,
        ge=0,
        lt=1,
        description="Fraction of word pieces changed per copy, split evenly between dropped, masked and swapped "
        "for a word piece of another text of the batch.",
    )
    crop_probability: float = Field(
        0.5, ge=0, le=1, description="Probability that a copy keeps only a random contiguous span of its text."
    )
    min_span: float = Field(0.3, gt=0, le=1, description="Shortest span a crop keeps, as a share of the word pieces.")


TEXT_FORMATS = {".txt": "text", ".text": "text", ".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}


class UnlabelledConfig(Strict):
    """In-domain texts without labels that the teacher labels for the student (Tang et al. 2019; TinyBERT): more
    teacher outputs to learn from than the labelled training split holds. Texts that any of the run's splits
    holds are left out (a validation or test text would leak), so a file that also holds those is safe."""

    path: str = Field(description="The file: a path relative to the recipe, or `package:NAME/file`; .bz2/.gz/.xz ok.")
    format: Literal["auto", "text", "tsv", "csv", "jsonl"] = Field(
        "auto", description="text: one text per line; tsv/csv/jsonl: the `text_column`. auto: from the file name."
    )
    text_column: str = Field("text", description="Column (tsv/csv) or key (jsonl) holding the text; labels ignored.")
    max_texts: PositiveInt | None = Field(
        None, description="Use at most this many (drawn at random with the stage's seed); None: all of them."
    )

    @model_validator(mode="after")
    def _resolve(self, info: ValidationInfo) -> UnlabelledConfig:
        self.path = str(existing_file(self.path, base_dir(info), "unlabelled.path"))
        if self.format == "auto":
            name = self.path.lower()
            for packed in (".bz2", ".gz", ".xz"):
                name = name.removesuffix(packed)
            found = next((fmt for suffix, fmt in TEXT_FORMATS.items() if name.endswith(suffix)), None)
            if found is None:
                raise ValueError(
                    f"unlabelled: cannot tell the format of {self.path!r}; set format to text, tsv, csv or jsonl"
                )
            self.format = found
        return self


def spaced_layers(teacher_layers: int, student_layers: int) -> list[int]:
    """Evenly spaced teacher layers ending at the last one: 6 -> 3 gives [1, 3, 5] (TinyBERT's mapping)."""
    return [round((i + 1) * teacher_layers / student_layers) - 1 for i in range(student_layers)]


def layer_period(shape: dict[str, Any] | None) -> int | None:
    """ModernBERT's `global_attn_every_n_layers`: its layers are global or local by index, and its first layer has
    no attention LayerNorm; None for families whose layers are all alike."""
    shape = shape or {}
    return shape.get("global_attn_every_n_layers") if shape.get("model_type") == "modernbert" else None


def subset_problem(layers: list[int], period: int | None) -> str | None:
    """Why a layer subset of a model with index-dependent layers (`period`) would not reload as it was trained."""
    if period is None:
        return None
    if layers[0] != 0:
        return f"the first layer kept must be layer 0 (the only one without an attention LayerNorm); got {layers}"
    moved = [old for new, old in enumerate(layers) if (old % period == 0) != (new % period == 0)]
    if moved:
        return (
            f"layers are global every {period} layers and local otherwise, by index: layers {moved} would change "
            f"kind at their new places in {layers}"
        )
    return None


def student_layers(teacher_layers: int, count: int, period: int | None = None) -> list[int]:
    """The default layer subset: `spaced_layers`, or for index-dependent layers layer 0 then, at each student
    index, the teacher layer of the same kind (global/local) nearest the evenly spaced one."""
    plain = spaced_layers(teacher_layers, count)
    if period is None or count == 1:
        return [0] if period is not None else plain
    chosen = [0]
    for new, target in enumerate(plain[1:], start=1):
        left = count - new - 1  # layers still to place after this one
        kinds = [i for i in range(chosen[-1] + 1, teacher_layers - left) if (i % period == 0) == (new % period == 0)]
        if not kinds:
            raise ValueError(f"no {count}-layer subset of {teacher_layers} layers keeps every layer's kind")
        chosen.append(min(kinds, key=lambda i: (abs(i - target), i)))
    return chosen


class StudentConfig(Strict):
    """Exactly one of: `layers` (teacher layer indices to keep, in order), `num_layers` (that many teacher
    layers, evenly spaced, the last one included), or `model` (a folder, `package:` path or Hub id)."""

    layers: list[int] | None = Field(None, min_length=1, description="Teacher layer indices to keep, in order.")
    num_layers: PositiveInt | None = Field(
        None, description="Keep this many teacher layers, evenly spaced, the last one included."
    )
    model: str | None = Field(None, description="Another pretrained student: a folder, `package:` path or Hub id.")
    revision: str | None = Field(None, description="Hub revision of `model`.")

    @field_validator("model")
    @classmethod
    def _resolve(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else model_reference(value, info)

    @model_validator(mode="after")
    def _one_source(self):
        chosen = [k for k in ("layers", "num_layers", "model") if getattr(self, k) is not None]
        if len(chosen) != 1:
            raise ValueError(f"student needs exactly one of layers, num_layers, model; got {chosen or 'none'}")
        if self.layers is not None and (min(self.layers) < 0 or len(set(self.layers)) != len(self.layers)):
            raise ValueError(f"student.layers must be distinct teacher layer indices >= 0; got {self.layers}")
        if self.revision is not None and self.model is None:
            raise ValueError("student.revision only applies with student.model")
        return self


class DistillConfig(StageBase, LoopOptions):
    """Knowledge distillation of the current model (the teacher) into a smaller student, with TextBrewer's
    loss functions inside the project's training loop."""

    type: Literal["distill"]
    student: StudentConfig = Field(
        description="The model that learns: a subset of the teacher's layers, or another model."
    )
    teacher: str | None = Field(
        None,
        description="Which earlier stage's model teaches (e.g. `train`, the unpruned fine-tuned model); default: "
        "the current model. The student's layers always come from the current model.",
    )
    temperature: float = Field(4.0, gt=0, description="Softmax temperature of the soft-label loss.")
    temperature_schedule: Literal["constant", "linear_decay"] = Field(
        "constant", description="linear_decay: the temperature falls linearly from `temperature` to 1 over training."
    )
    kd_weight: float = Field(1.0, ge=0, description="Weight of the loss against the teacher's soft labels.")
    hard_label_weight: float = Field(0.0, ge=0, description="Weight of the cross-entropy against the true labels.")
    hidden_mse_weight: float = Field(0.0, ge=0, description="Weight of the hidden-state MSE along `layer_map`.")
    attention_mse_weight: float = Field(0.0, ge=0, description="Weight of the attention-map MSE along `layer_map`.")
    layer_map: list[int] | None = Field(
        None,
        description="layer_map[i]: the teacher layer (0-based) student layer i learns from; default: the kept "
        "layers for a layer subset, evenly spaced teacher layers otherwise.",
    )
    augment: AugmentConfig | None = Field(
        None, description="Noisy copies of the training texts, labelled by the teacher; off when absent."
    )
    unlabelled: UnlabelledConfig | None = Field(
        None,
        description="Unlabelled in-domain texts added to the training split for this stage, labelled by the "
        "teacher only (the hard-label loss skips them); off when absent.",
    )

    @field_validator("layer_map")
    @classmethod
    def _map_indices(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or min(value) < 0):
            raise ValueError(f"layer_map must list a teacher layer index >= 0 per student layer; got {value}")
        return value

    @model_validator(mode="after")
    def _check(self):
        if self.kd_weight + self.hard_label_weight + self.hidden_mse_weight + self.attention_mse_weight == 0:
            raise ValueError("every loss weight is 0; set kd_weight and/or hard_label_weight")
        if self.unlabelled is not None and self.kd_weight + self.hidden_mse_weight + self.attention_mse_weight == 0:
            raise ValueError(
                "unlabelled texts are learnt from the teacher only, and every teacher loss weight is 0; set kd_weight"
            )
        layers = self.student.layers or ([0] * self.student.num_layers if self.student.num_layers else None)
        if self.layer_map is not None and layers is not None and len(self.layer_map) != len(layers):
            raise ValueError(f"layer_map has {len(self.layer_map)} entries for a {len(layers)}-layer student")
        return self

    def input_files(self) -> list[str]:
        return [self.unlabelled.path] if self.unlabelled else []

    def check_shape(self, shape: dict[str, Any] | None) -> dict[str, Any] | None:
        if self.student.model is not None:
            return local_model_shape(self.student.model)
        check_family(shape, "distill with a layer subset of the teacher")
        if not shape or "num_hidden_layers" not in shape:
            return shape
        depth = shape["num_hidden_layers"]
        wanted = self.student.layers or []
        if self.student.num_layers is not None and self.student.num_layers > depth:
            raise ValueError(f"student.num_layers {self.student.num_layers} is more than the teacher's {depth} layers")
        bad = [i for i in [*wanted, *(self.layer_map or [])] if i >= depth]
        if bad:
            raise ValueError(f"teacher layer indices {bad} do not exist (the teacher has layers 0..{depth - 1})")
        layers = wanted or student_layers(depth, self.student.num_layers, layer_period(shape))
        problem = subset_problem(layers, layer_period(shape))
        if problem:
            raise ValueError(f"student.layers: {problem}")
        pruned = shape.get("pruned_heads") or {}
        return {
            **shape,
            "num_hidden_layers": len(layers),
            "pruned_heads": {str(n): pruned[str(o)] for n, o in enumerate(layers) if pruned.get(str(o))},
        }


# ---------------------------------------------------------------------------------------------- ONNX


class ExportConfig(StageBase):
    """The current PyTorch model to an ONNX folder that `ORTModelForSequenceClassification` loads."""

    type: Literal["export"]
    opset: int = Field(
        18, ge=14, le=21, description="ONNX opset; 18 is the lowest Optimum recommends for BERT-like models."
    )
    parity: ParityGate = Field(ParityGate(), description="Parity the export must keep with its PyTorch source.")


def pooled_tail_field():
    return Field(
        True,
        description="The last layer's ops after its attention (output projection, FFN, LayerNorms) run on the one "
        "token the classifier reads (hidden[:, 0]) instead of every token: the same logits in FP32; the full "
        "recipe's 3-layer INT8 student's graph calls ran 1.19x as fast (AMD EPYC, 2 cores, 2026-12-02). Where the "
        "graph reads no single position (mean pooling), it is left as it was and the manifest says why.",
    )


class OptimizeConfig(StageBase):
    """ONNX Runtime's transformer graph optimizer through Optimum's `ORTOptimizer`, optionally to FP16."""

    type: Literal["optimize"]
    level: Literal["O1", "O2", "O3"] = Field(
        "O2",
        description="O1: generic graph rewrites; O2: plus transformer fusions (Attention, BiasGelu, ...); "
        "O3: plus the FastGelu approximation.",
    )
    fp16: Literal["auto", True, False] = Field(
        "auto",
        description="auto: FP16 only when ONNX Runtime has the CUDA execution provider; on the CPU FP16 adds "
        "casts and runs no faster.",
    )
    fuse_skip_layer_norm: Literal["auto", True, False] = Field(
        "auto",
        description="Fuse residual Add + LayerNormalization into SkipLayerNormalization. auto: only for the GPU "
        "(with fp16); ONNX Runtime's CPU kernel for it is slower than the unfused ops.",
    )
    pooled_tail: bool = pooled_tail_field()
    parity: ParityGate = Field(ParityGate(), description="Parity the optimized graph must keep with its source.")

    input_format: ClassVar[str | None] = "onnx"

    def check_tokenizer(self, tokenizer: dict[str, Any] | None) -> None:
        if self.level != "O1" and (tokenizer or {}).get("padding_side") == "left":
            raise ValueError(
                f"level {self.level} fuses attention into ONNX Runtime's Attention op, which reads the mask as each "
                "text's length (padding on the right), but the model's tokenizer pads on the left (padding_side: "
                "left in its tokenizer_config.json): training would pad on the left, the toolkit's runtime pads on "
                "the right, and Optimum or transformers users of the pushed graph would pad on the left and get "
                "wrong answers. Set padding_side to right in the model's tokenizer_config.json (tokenizer."
                "padding_side = 'right'; tokenizer.save_pretrained(folder)), or use level: O1 (no fusion)"
            )


# Measured on the full recipe's student: see docs/benchmarks.md, "INT8 that keeps 0.99 agreement".
SMOOTH_QUANT_ALPHA = 0.9


class QuantizeConfig(StageBase):
    """INT8 through Optimum's `ORTQuantizer` (dynamic or static), after SmoothQuant."""

    type: Literal["quantize"]
    instruction_set: Literal["auto", "avx512_vnni", "avx512", "avx2", "arm64"] = Field(
        "auto", description="Kernel configuration; auto: detected from this machine's CPU flags."
    )
    mode: Literal["dynamic", "static"] = Field(
        "dynamic",
        description="dynamic: activation scales computed as the model runs (see activation_scales); static: "
        "scales calibrated once on training texts. Both answer a text independently of its call by default.",
    )
    activation_scales: Literal["calibrated", "per_token", "per_call"] = Field(
        "calibrated",
        description="mode dynamic: how INT8 activations are scaled. calibrated: one fixed scale per tensor (the "
        "largest |x| of calibration_samples training texts / 127), so a text's answer never depends on the other "
        "texts in its model call (the service merges unrelated requests into one call) and the graph keeps ONNX "
        "Runtime's fused INT8 attention; per_token: each token's own scale (max |x| over its features), also "
        "independent of the call, nothing clipped, more ops; per_call: ONNX Runtime's one scale per call (answers "
        "then depend on the call, which the report and the model card say).",
    )
    calibration_samples: PositiveInt = Field(
        300,
        description="static, smooth_quant and activation_scales calibrated: training texts the ranges and "
        "activation maxima come from.",
    )
    calibration_method: Literal["minmax", "entropy", "percentile"] = Field(
        "minmax", description="static: ONNX Runtime's calibration method (percentile at 99.99)."
    )
    smooth_quant: Annotated[float, Field(ge=0.0, le=1.0)] | None = Field(
        SMOOTH_QUANT_ALPHA,
        description="SmoothQuant's migration strength alpha before INT8: activation outliers divided out per channel "
        "and multiplied into the weights (0: none moved, 1: all); null to skip. Needs per_channel.",
    )
    per_channel: bool = Field(True, description="One weight scale per output channel: closer to FP32, slightly larger.")
    embeddings: Literal["int8_rows", "int8", "fp32"] = Field(
        "int8_rows",
        description="Embedding tables: int8_rows: INT8 with one scale per token's vector; int8: ONNX Runtime's "
        "quantizer, one scale for the whole table (less accurate); fp32: left as they are (largest file).",
    )
    pack_tokens: bool = Field(
        True,
        description="A call with padding runs its per-token work (projections, FFN, LayerNorm, GELU) on the real "
        "tokens only, gathered after each fused attention and gathered back before the next; a call without "
        "padding runs the graph as it was. Needs fused attention (an `optimize` stage before); otherwise the "
        "manifest says why it was not applied.",
    )
    parity: ParityGate = Field(
        ParityGate(min_agreement=0.99), description="Parity the INT8 graph must keep with its source."
    )

    @model_validator(mode="after")
    def _calibration_is_used(self):
        if "activation_scales" in self.model_fields_set and self.mode != "dynamic":
            raise ValueError("activation_scales only applies with mode: dynamic (static scales are fixed)")
        if "calibration_method" in self.model_fields_set and self.mode != "static":
            raise ValueError("calibration_method only applies with mode: static")
        calibrates = self.mode == "static" or self.smooth_quant is not None or self.activation_scales == "calibrated"
        if "calibration_samples" in self.model_fields_set and not calibrates:
            raise ValueError(
                "calibration_samples only applies with mode: static, smooth_quant or activation_scales: calibrated"
            )
        if self.smooth_quant is not None and not self.per_channel:
            raise ValueError(
                "smooth_quant needs per_channel: true (smoothed weight rows differ in range, which one scale for "
                "the whole matrix loses); set per_channel: true or smooth_quant: null"
            )
        return self

    input_format: ClassVar[str | None] = "onnx"


class OpenVinoConfig(StageBase):
    """An earlier ONNX stage's FP32 graph converted to OpenVINO IR and, by default, quantized to INT8 with NNCF's
    post-training quantization (transformer preset: SmoothQuant and bias correction, calibrated on training
    texts). Runs in OpenVINO's CPU plugin, is evaluated and gated like every stage and can be selected and
    served. Needs the `openvino` extra (openvino and nncf)."""

    type: Literal["openvino"]
    source: str = Field(
        "export",
        description="The earlier enabled export or optimize stage whose graph is converted (FP32; an INT8 graph "
        "from `quantize` would be quantized twice).",
    )
    quantize: Literal["none", "int8", "int8_accuracy_control"] = Field(
        "int8",
        description="none: the FP32 IR; int8: NNCF post-training quantization; int8_accuracy_control: NNCF's "
        "accuracy-aware variant, which keeps layers in FP32 until the validation accuracy is within "
        "max_accuracy_drop of the FP32 IR's.",
    )
    calibration_samples: PositiveInt = Field(300, description="int8: training texts the ranges are calibrated on.")
    max_accuracy_drop: float = Field(
        0.01, gt=0, lt=1, description="int8_accuracy_control: the validation accuracy the INT8 IR may lose (absolute)."
    )
    validation_samples: PositiveInt = Field(
        1000, description="int8_accuracy_control: validation texts the accuracy is compared on."
    )
    pooled_tail: bool = pooled_tail_field()
    parity: ParityGate = Field(
        ParityGate(min_agreement=0.99), description="Parity the IR must keep with the ONNX graph it came from."
    )

    input_format: ClassVar[str | None] = "onnx"

    def branch_from(self) -> str | None:
        return self.source

    @model_validator(mode="after")
    def _installed(self):
        import importlib.util

        needed = ["openvino"] + (["nncf"] if self.quantize != "none" else [])
        missing = [name for name in needed if importlib.util.find_spec(name) is None]
        if self.enabled and missing:
            raise ValueError(
                f"the openvino stage needs {' and '.join(missing)}, not installed here: pip install -e '.[openvino]'"
            )
        return self


# ---------------------------------------------------------------------------------------------- after selection

# BentoML tag names: lowercase letters, digits, `_`, `-` and `.`, starting with a letter or digit.
TAG_NAME = r"^[a-z0-9][a-z0-9_.-]*$"


class PackageConfig(StageBase):
    """Save the selected model into the BentoML model store, for `bentoml serve` and `bentoml build`."""

    type: Literal["package"]
    model_name: str | None = Field(
        None,
        pattern=TAG_NAME,
        max_length=63,
        description="Name in the BentoML model store; defaults to the recipe's name, lowercased.",
    )
    tune_runtime: bool = Field(
        True,
        description="Time the served ONNX session's settings (intra-op threads, thread spinning, SkipLayerNorm "
        "fusion) on this machine, a few seconds, and ship the fastest with the model; the service uses them on "
        "the same CPU model and the defaults elsewhere.",
    )
    serving_parity: bool = Field(
        True,
        description="Before the model is stored, replay the evaluation split through the service's own path (the "
        "written folder loaded as the service loads it, its micro-batcher merging concurrent clients' requests into "
        "model calls) and compare every text's class and logits with the answer its evaluation gave. A text whose "
        "class changed fails the stage and nothing is stored; the figures go into the manifest "
        "(`info.serving_parity`), the report and the model card.",
    )
    serving_parity_clients: int = Field(
        32,
        ge=1,
        le=1024,
        description="Concurrent clients of that replay, each sending single texts and small batches (up to 8) in a "
        "seeded, shuffled order; more clients make larger and more mixed model calls.",
    )


class PushConfig(StageBase):
    """Upload the selected model and its model card to the Hugging Face Hub (token: HF_TOKEN or the login)."""

    type: Literal["push"]
    repo_id: str = Field(pattern=REPO_ID, description="Hub repository, `user/name`.")
    private: bool = Field(False, description="Create the repository as private.")


class TrimVocabConfig(StageBase):
    """Keep only the vocabulary the training texts (and `extra_corpus`) use: a smaller embedding matrix and
    tokenizer, the same tokens for those texts. For multilingual models whose vocabulary is most of their size."""

    type: Literal["trim_vocab"]
    extra_corpus: str | None = Field(
        None,
        description="A UTF-8 text file, one text per line, whose word pieces are kept too (texts the model will see "
        "in service but the training split lacks); relative to the recipe.",
    )
    parity: ParityGate = Field(
        ParityGate(),
        description="Parity with the untrimmed model on the evaluation split (texts outside the corpus may be cut "
        "into other pieces).",
    )

    @field_validator("extra_corpus")
    @classmethod
    def _existing(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else str(existing_file(value, base_dir(info), "extra_corpus"))

    def input_files(self) -> list[str]:
        return [self.extra_corpus] if self.extra_corpus else []

    def check_shape(self, shape: dict[str, Any] | None) -> dict[str, Any] | None:
        if shape and "vocab_size" in shape:
            shape = dict(shape, vocab_size=None)  # known only once the corpus is read
        return shape


STAGE_CONFIGS: dict[str, type[StageBase]] = {
    "train": TrainConfig,
    "trim_vocab": TrimVocabConfig,
    "prune": PruneConfig,
    "distill": DistillConfig,
    "export": ExportConfig,
    "optimize": OptimizeConfig,
    "quantize": QuantizeConfig,
    "openvino": OpenVinoConfig,
    "package": PackageConfig,
    "push": PushConfig,
}

# A tagged union: pydantic picks the option model by `type` and names the allowed types when it is wrong.
StageConfig = Annotated[Union[tuple(STAGE_CONFIGS.values())], Field(discriminator="type")]  # noqa: UP007
