"""`distill`: knowledge distillation of the current model (the teacher) into a smaller student, with
TextBrewer's loss functions inside the project's Accelerate loop (`toolkit.training.fit`).

TextBrewer's own trainer owns the loop, cannot run multi-process on CPU and needs apex for fp16, so only its
losses are used (`textbrewer.losses`), behind this stage's own options. The student is either a subset of the
teacher's layers (same, possibly pruned, shape) or another pretrained model; its labels always come from the
teacher, so nobody edits `num_labels` by hand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationInfo, field_validator, model_validator

from toolkit.augmentation import AugmentConfig
from toolkit.stages.base import Artifact, StageBase, StageContext, StageResult
from toolkit.stages.train import LoopOptions


class StudentConfig(BaseModel):
    """Exactly one of: `layers` (teacher layer indices to keep, in order), `num_layers` (that many teacher
    layers, evenly spaced, the last one included), or `model` (a folder, `package:` path or Hub id)."""

    model_config = ConfigDict(extra="forbid")

    layers: list[int] | None = Field(None, min_length=1)
    num_layers: PositiveInt | None = None
    model: str | None = None
    revision: str | None = None

    @field_validator("model")
    @classmethod
    def _resolve(cls, value: str | None, info: ValidationInfo) -> str | None:
        from toolkit.sources import SourceError, resolve_model

        if value is None:
            return None
        try:
            return resolve_model(value, Path((info.context or {}).get("base_dir", ".")))
        except SourceError as exc:
            raise ValueError(str(exc)) from None

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
    type: Literal["distill"]
    student: StudentConfig
    # Which earlier stage's model teaches (e.g. `train`, the unpruned fine-tuned model); default: the current
    # model. The student's layers always come from the current model.
    teacher: str | None = None
    temperature: float = Field(4.0, gt=0)
    # constant, or linear_decay: the temperature falls linearly from `temperature` to 1 over training.
    temperature_schedule: Literal["constant", "linear_decay"] = "constant"
    kd_weight: float = Field(1.0, ge=0)
    hard_label_weight: float = Field(0.0, ge=0)
    hidden_mse_weight: float = Field(0.0, ge=0)
    attention_mse_weight: float = Field(0.0, ge=0)
    # layer_map[i]: the teacher layer (0-based) student layer i learns from; default: the kept layers for a
    # layer subset, evenly spaced teacher layers otherwise.
    layer_map: list[int] | None = None
    # Noisy copies of the training texts, labelled by the teacher (see toolkit.augmentation); off by default.
    augment: AugmentConfig | None = None

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
        layers = self.student.layers or ([0] * self.student.num_layers if self.student.num_layers else None)
        if self.layer_map is not None and layers is not None and len(self.layer_map) != len(layers):
            raise ValueError(f"layer_map has {len(self.layer_map)} entries for a {len(layers)}-layer student")
        return self

    def check_shape(self, shape: dict[str, Any] | None) -> dict[str, Any] | None:
        if self.student.model is not None:
            from toolkit.recipe import local_model_shape

            return local_model_shape(self.student.model)
        if not shape or "num_hidden_layers" not in shape:
            return shape
        depth = shape["num_hidden_layers"]
        wanted = self.student.layers or []
        if self.student.num_layers is not None and self.student.num_layers > depth:
            raise ValueError(f"student.num_layers {self.student.num_layers} is more than the teacher's {depth} layers")
        bad = [i for i in [*wanted, *(self.layer_map or [])] if i >= depth]
        if bad:
            raise ValueError(f"teacher layer indices {bad} do not exist (the teacher has layers 0..{depth - 1})")
        layers = wanted or spaced_layers(depth, self.student.num_layers)
        pruned = shape.get("pruned_heads") or {}
        return {
            **shape,
            "num_hidden_layers": len(layers),
            "pruned_heads": {str(n): pruned[str(o)] for n, o in enumerate(layers) if pruned.get(str(o))},
        }


def spaced_layers(teacher_layers: int, student_layers: int) -> list[int]:
    """Evenly spaced teacher layers ending at the last one: 6 -> 3 gives [1, 3, 5] (TinyBERT's mapping)."""
    return [round((i + 1) * teacher_layers / student_layers) - 1 for i in range(student_layers)]


def run(cfg: DistillConfig, ctx: StageContext) -> StageResult:
    from transformers import AutoTokenizer

    from toolkit.training import fit, make_accelerator, make_dataloaders, save_pretrained

    accelerator = make_accelerator(cfg, ctx.recipe.device)
    teacher_path = teacher_artifact(cfg, ctx).path
    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    teacher = load_teacher(teacher_path, cfg)
    student, layer_map = build_student(cfg, ctx, teacher, tokenizer)
    with accelerator.main_process_first():
        tokenized = ctx.data.tokenized(tokenizer, ctx.recipe.model.max_length)
    train_dl, eval_dl = make_dataloaders(tokenized, tokenizer, cfg)
    steps = -(-len(train_dl) // accelerator.num_processes) * cfg.epochs
    noise = NoiseSource(cfg.augment, tokenizer, cfg.seed + accelerator.process_index) if cfg.augment else None
    wrapper = make_distiller(cfg, student, teacher, layer_map, steps, noise)
    info = fit(
        accelerator,
        wrapper,
        train_dl,
        eval_dl,
        cfg,
        ctx.data.label_names,
        save=lambda best: save_pretrained(best.student, tokenizer, ctx.out_dir),
        loss_fn=lambda model, batch: model(batch),
        logits_fn=lambda model, inputs: accelerator.unwrap_model(model).student(**inputs).logits,
        desc=cfg.name,
    )
    info.update(
        {
            "teacher": str(teacher_path),
            "teacher_layers": teacher.config.num_hidden_layers,
            "student_layers": student.config.num_hidden_layers,
            "layer_map": layer_map,
            "student_parameters": sum(p.numel() for p in student.parameters()),
            "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
        }
    )
    return StageResult(Artifact(ctx.out_dir, "pytorch", cfg.name), info)


def teacher_artifact(cfg: DistillConfig, ctx: StageContext) -> Artifact:
    if cfg.teacher is None:
        return ctx.source
    if cfg.teacher not in ctx.artifacts:
        raise ValueError(f"teacher: no earlier stage named {cfg.teacher!r} made a model (have: {list(ctx.artifacts)})")
    artifact = ctx.artifacts[cfg.teacher]
    if artifact.format != "pytorch":
        raise ValueError(f"teacher: stage {cfg.teacher!r} made an {artifact.format} model; a teacher must be PyTorch")
    return artifact


def _attn(cfg: DistillConfig) -> dict[str, str]:
    # Attention maps are only returned by the eager implementation.
    return {"attn_implementation": "eager"} if cfg.attention_mse_weight else {}


def load_teacher(path, cfg: DistillConfig):
    from transformers import AutoModelForSequenceClassification

    teacher = AutoModelForSequenceClassification.from_pretrained(path, **_attn(cfg))
    teacher.requires_grad_(False)
    return teacher.eval()


def build_student(cfg: DistillConfig, ctx: StageContext, teacher, tokenizer):
    """(student model, layer map) with the teacher's labels."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from toolkit import pruning

    spec = cfg.student
    if spec.model is None:
        source = AutoModelForSequenceClassification.from_pretrained(ctx.source.path, **_attn(cfg))
        depth = source.config.num_hidden_layers
        layers = spec.layers or spaced_layers(depth, spec.num_layers)
        if max(layers) >= depth:
            raise ValueError(f"student layers {layers} do not exist in the {depth}-layer model")
        pruning.keep_layers(source, layers)
        default_map = layers if cfg.teacher is None else spaced_layers(teacher.config.num_hidden_layers, len(layers))
        student = source
    else:
        name = spec.model
        if AutoTokenizer.from_pretrained(name, revision=spec.revision).get_vocab() != tokenizer.get_vocab():
            raise ValueError(
                f"student.model {spec.model!r} has a different vocabulary from the teacher; teacher and student "
                "must read the same token ids (pick a student built on the teacher's tokenizer)"
            )
        student = AutoModelForSequenceClassification.from_pretrained(
            name,
            revision=spec.revision,
            num_labels=teacher.config.num_labels,
            id2label=teacher.config.id2label,
            label2id=teacher.config.label2id,
            ignore_mismatched_sizes=True,
            **_attn(cfg),
        )
        default_map = spaced_layers(teacher.config.num_hidden_layers, student.config.num_hidden_layers)
    student.config.id2label = dict(teacher.config.id2label)
    student.config.label2id = dict(teacher.config.label2id)
    layer_map = cfg.layer_map or default_map
    check_layer_map(layer_map, student.config.num_hidden_layers, teacher.config.num_hidden_layers)
    return student, layer_map


def check_layer_map(layer_map: list[int], student_layers: int, teacher_layers: int) -> None:
    if len(layer_map) != student_layers:
        raise ValueError(f"layer_map has {len(layer_map)} entries for a {student_layers}-layer student")
    if max(layer_map) >= teacher_layers:
        raise ValueError(f"layer_map {layer_map}: the teacher has layers 0..{teacher_layers - 1}")


class NoiseSource:
    """Appends the augmentation's noisy copies to a training batch, with its own seeded generator."""

    def __init__(self, cfg: AugmentConfig, tokenizer, seed: int):
        import torch

        if tokenizer.mask_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError("augment needs a tokenizer with [MASK] and [PAD] tokens")
        self.cfg, self.tokenizer = cfg, tokenizer
        self.generator = torch.Generator().manual_seed(seed)

    def extend(self, inputs: dict) -> dict:
        from toolkit.augmentation import noisy_copies

        copies = noisy_copies(
            inputs, self.cfg, self.tokenizer.mask_token_id, self.tokenizer.pad_token_id, self.generator
        )
        return concat_padded(inputs, copies, self.tokenizer.pad_token_id)


def concat_padded(a: dict, b: dict, pad_id: int) -> dict:
    """Rows of `a` then rows of `b`, right-padded to the wider of the two."""
    import torch

    width = max(a["input_ids"].shape[1], b["input_ids"].shape[1])

    def pad(t, value):
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    return {
        k: torch.cat([pad(a[k], pad_id if k == "input_ids" else 0), pad(b[k], pad_id if k == "input_ids" else 0)])
        for k in a
    }


def make_distiller(cfg: DistillConfig, student, teacher, layer_map: list[int], steps: int, noise=None):
    import torch
    from textbrewer import losses
    from torch import nn

    class Distiller(nn.Module):
        """Holds the student (trained), the frozen teacher and the hidden-size projections; forward -> loss."""

        def __init__(self):
            super().__init__()
            self.student = student
            self.teacher = teacher
            hs, ht = student.config.hidden_size, teacher.config.hidden_size
            wants_proj = cfg.hidden_mse_weight and hs != ht
            self.projections = nn.ModuleList([nn.Linear(hs, ht) for _ in layer_map] if wants_proj else [])
            self.step = 0

        def train(self, mode: bool = True):
            super().train(mode)
            self.teacher.eval()  # no dropout in the teacher's targets
            return self

        def temperature(self) -> float:
            if cfg.temperature_schedule == "constant":
                return cfg.temperature
            progress = min(1.0, self.step / max(steps, 1))
            return cfg.temperature + (1.0 - cfg.temperature) * progress

        def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            labelled = len(batch["labels"])
            if noise is not None and self.training:
                inputs = noise.extend(inputs)
            deep = bool(cfg.hidden_mse_weight or cfg.attention_mse_weight)
            extra = {
                "output_hidden_states": bool(cfg.hidden_mse_weight),
                "output_attentions": bool(cfg.attention_mse_weight),
            }
            with torch.no_grad():
                out_t = self.teacher(**inputs, **extra) if deep else self.teacher(**inputs)
            out_s = self.student(**inputs, **extra) if deep else self.student(**inputs)
            if self.training:
                self.step += 1
            loss = out_s.logits.new_zeros(())
            if cfg.kd_weight:
                loss = loss + cfg.kd_weight * losses.kd_ce_loss(out_s.logits, out_t.logits, self.temperature())
            if cfg.hard_label_weight:
                loss = loss + cfg.hard_label_weight * nn.functional.cross_entropy(
                    out_s.logits[:labelled], batch["labels"]
                )
            mask = inputs.get("attention_mask")
            for i, t in enumerate(layer_map):
                if cfg.hidden_mse_weight:
                    state = out_s.hidden_states[i + 1]
                    if len(self.projections):
                        state = self.projections[i](state)
                    loss = loss + cfg.hidden_mse_weight * losses.hid_mse_loss(state, out_t.hidden_states[t + 1], mask)
                if cfg.attention_mse_weight:
                    att_s, att_t = out_s.attentions[i], out_t.attentions[t]
                    # Different head counts (a pruned teacher layer, another student): compare head sums.
                    fn = losses.att_mse_loss if att_s.shape == att_t.shape else losses.att_mse_sum_loss
                    loss = loss + cfg.attention_mse_weight * fn(att_s, att_t, mask)
            return loss

    return Distiller()
