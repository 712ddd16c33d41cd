"""`distill`: knowledge distillation of the current model (the teacher) into a smaller student, inside the
project's Accelerate loop (`toolkit.training.fit`). The torch side (teacher, student, losses, noisy copies) is
`toolkit.distillation`; this stage wires it to the run: which model teaches, the data, the output folder."""

from __future__ import annotations

from pathlib import Path

from toolkit.config import DistillConfig
from toolkit.stages.base import Artifact, StageContext, StageResult


def run(cfg: DistillConfig, ctx: StageContext) -> StageResult:
    from datasets import DatasetDict

    from toolkit.distillation import (
        Distiller,
        NoiseSource,
        build_student,
        load_teacher,
        teacher_cache,
        transfer_set,
    )
    from toolkit.training import fit, make_dataloaders, save_pretrained, start

    teacher_path = teacher_artifact(cfg, ctx).path
    setup = start(cfg, ctx.device, teacher_path, ctx.data, ctx.max_length)
    accelerator, tokenizer = setup.accelerator, setup.tokenizer
    teacher = load_teacher(teacher_path, cfg)
    student, layer_map = build_student(cfg, ctx.source.path, teacher, tokenizer)
    texts, unlabelled = unlabelled_texts(cfg, ctx)
    train = transfer_set(setup.tokenized, tokenizer, texts, ctx.max_length)
    fixed = cfg.augment is None  # the same texts every epoch: the teacher's outputs can be kept
    tokenized = DatasetDict(
        {**setup.tokenized, "train": train.add_column("row", range(len(train))) if fixed else train}
    )
    train_dl, eval_dl = make_dataloaders(tokenized, tokenizer, cfg)
    cache, cached = teacher_cache(cfg, teacher, train_dl, layer_map, accelerator.device)
    steps = -(-len(train_dl) // accelerator.num_processes) * cfg.epochs
    copies = cfg.augment.resolved_copies(len(train)) if cfg.augment else 0
    augment = cfg.augment.model_copy(update={"copies": copies}) if cfg.augment else None
    noise = NoiseSource(augment, tokenizer, cfg.seed + accelerator.process_index) if augment else None
    wrapper = Distiller(cfg, student, teacher, layer_map, steps, noise, cache)
    info = fit(
        accelerator,
        wrapper,
        train_dl,
        eval_dl,
        cfg,
        ctx.data.label_names,
        save=lambda best, state: save_pretrained(best.student, tokenizer, ctx.out_dir, state, prefix="student."),
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
            # What the student learnt from: each training (and unlabelled) text once per epoch run, plus its
            # noisy copies.
            "texts_seen": len(train) * info["epochs_run"] * (1 + copies),
            "augment_copies": copies,
            "teacher_cache": cached,
            "transfer_set": {"labelled": len(setup.tokenized["train"]), "unlabelled": len(texts)},
            **({"unlabelled": unlabelled} if cfg.unlabelled else {}),
            "student_parameters": sum(p.numel() for p in student.parameters()),
            "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
        }
    )
    return StageResult(Artifact(ctx.out_dir, "pytorch", cfg.name), info)


def unlabelled_texts(cfg: DistillConfig, ctx: StageContext) -> tuple[list[str], dict]:
    """The recipe's unlabelled texts that no split holds (at most `max_texts`), and what was read and left out."""
    from toolkit.data import read_texts, unseen_texts

    extra = cfg.unlabelled
    if extra is None:
        return [], {}
    rows = read_texts(Path(extra.path), extra.format, extra.text_column, owner=f"{cfg.name}.unlabelled")
    texts, counts = unseen_texts(ctx.data, rows, extra.text_column, extra.max_texts, cfg.seed)
    return texts, {"path": extra.path, **counts}


def teacher_artifact(cfg: DistillConfig, ctx: StageContext) -> Artifact:
    if cfg.teacher is None:
        return ctx.source
    if cfg.teacher not in ctx.artifacts:
        raise ValueError(f"teacher: no earlier stage named {cfg.teacher!r} made a model (have: {list(ctx.artifacts)})")
    artifact = ctx.artifacts[cfg.teacher]
    if artifact.format != "pytorch":
        raise ValueError(f"teacher: stage {cfg.teacher!r} made an {artifact.format} model; a teacher must be PyTorch")
    return artifact
