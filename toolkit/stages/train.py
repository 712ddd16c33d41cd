"""`train`: fine-tune the current model (the recipe's pretrained encoder) on the recipe's data."""

from __future__ import annotations

from toolkit.config import TrainConfig
from toolkit.stages.base import Artifact, StageContext, StageResult


def run(cfg: TrainConfig, ctx: StageContext) -> StageResult:
    from toolkit.runtime.checkpoint import load_classifier
    from toolkit.training import fit, make_dataloaders, save_pretrained, start

    revision = ctx.revision_of(ctx.source)
    setup = start(cfg, ctx.device, ctx.source.path, ctx.data, ctx.max_length, revision)
    labels = ctx.data.label_names
    model = load_classifier(
        ctx.source.path,
        revision=revision,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        # A checkpoint fine-tuned on other labels gets a fresh head instead of a shape error.
        ignore_mismatched_sizes=True,
    )
    train_dl, eval_dl = make_dataloaders(setup.tokenized, setup.tokenizer, cfg)
    info = fit(
        setup.accelerator,
        model,
        train_dl,
        eval_dl,
        cfg,
        labels,
        save=lambda best, state: save_pretrained(best, setup.tokenizer, ctx.out_dir, state),
        desc=cfg.name,
    )
    return StageResult(Artifact(ctx.out_dir, "pytorch", cfg.name), info)
