"""`train`: fine-tune the current model (the recipe's pretrained encoder) on the recipe's data."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from toolkit.stages.base import Artifact, StageBase, StageContext, StageResult


class LoopOptions(BaseModel):
    """Options of the shared Accelerate loop (`toolkit.training.fit`); training-like stages extend it."""

    model_config = ConfigDict(extra="forbid")

    epochs: PositiveInt = 3
    batch_size: PositiveInt = 32
    eval_batch_size: PositiveInt = 64
    learning_rate: float = Field(5e-5, gt=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    gradient_accumulation_steps: PositiveInt = 1
    max_grad_norm: float = Field(1.0, ge=0)
    # auto: bf16 (or fp16) on a CUDA device, none on CPU.
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    seed: int = 42
    metric_for_best: Literal["accuracy", "macro_f1"] = "accuracy"
    # Batches of texts of similar length (transformers' LengthGroupedSampler: random mega-batches sorted by
    # length), so a batch pads less; order stays random between batches.
    group_by_length: bool = False


class TrainConfig(StageBase, LoopOptions):
    type: Literal["train"]


def run(cfg: TrainConfig, ctx: StageContext) -> StageResult:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from toolkit.training import fit, make_accelerator, make_dataloaders, save_pretrained

    accelerator = make_accelerator(cfg, ctx.recipe.device)
    revision = ctx.recipe.model.revision if ctx.source.stage == "pretrained" else None
    tokenizer = AutoTokenizer.from_pretrained(ctx.source.path, revision=revision)
    labels = ctx.data.label_names
    model = AutoModelForSequenceClassification.from_pretrained(
        ctx.source.path,
        revision=revision,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        # A checkpoint fine-tuned on other labels gets a fresh head instead of a shape error.
        ignore_mismatched_sizes=True,
    )
    with accelerator.main_process_first():
        tokenized = ctx.data.tokenized(tokenizer, ctx.recipe.model.max_length)
    train_dl, eval_dl = make_dataloaders(tokenized, tokenizer, cfg)
    info = fit(
        accelerator,
        model,
        train_dl,
        eval_dl,
        cfg,
        labels,
        save=lambda best: save_pretrained(best, tokenizer, ctx.out_dir),
        desc=cfg.name,
    )
    return StageResult(Artifact(ctx.out_dir, "pytorch", cfg.name), info)
