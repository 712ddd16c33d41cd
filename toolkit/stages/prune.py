"""`prune`: structured pruning of attention heads and FFN neurons by importance on training data, then an
optional short recovery fine-tune. The weight surgery lives in `toolkit.pruning`."""

from __future__ import annotations

import json
from typing import Any

from toolkit.config import PruneConfig, resolve_target
from toolkit.stages.base import Artifact, StageContext, StageResult


def round_targets(start: list[int], final: list[int], rounds: int) -> list[list[int]]:
    """Per-round keep counts going linearly from `start` to `final` (the last round hits `final`)."""
    return [[round(s - (s - f) * r / rounds) for s, f in zip(start, final, strict=True)] for r in range(1, rounds + 1)]


def run(cfg: PruneConfig, ctx: StageContext) -> StageResult:
    from toolkit import pruning
    from toolkit.runtime.checkpoint import load_classifier
    from toolkit.training import fit, make_dataloaders, save_pretrained, start

    setup = start(cfg, ctx.device, ctx.source.path, ctx.data, ctx.max_length)
    accelerator, tokenizer, tokenized = setup.accelerator, setup.tokenizer, setup.tokenized
    model = load_classifier(ctx.source.path)
    # Every process scores the same batches in the same order, so all of them cut the same model; plainly
    # shuffled batches, since length-grouped ones would put the longest texts first.
    score_dl, eval_dl = make_dataloaders(tokenized, tokenizer, cfg.model_copy(update={"group_by_length": False}))
    before = {"heads": pruning.head_counts(model), "ffn_size": pruning.ffn_sizes(model)[0]}
    head_goal, ffn_goal = targets(cfg, model)
    rounds = []
    for heads, ffn in zip(
        round_targets(before["heads"], head_goal, cfg.iterations),
        round_targets([before["ffn_size"]], [ffn_goal], cfg.iterations),
        strict=True,
    ):
        rounds.append(prune_round(model, score_dl, cfg.importance_batches, heads, ffn[0]))
    kept = {
        "heads_per_layer": pruning.head_counts(model),
        "kept_heads": pruning.kept_heads(model.config),
        "ffn_size": pruning.ffn_sizes(model)[0],
    }
    info: dict[str, Any] = {"before": before, **kept, "rounds": rounds, "importance_batches": cfg.importance_batches}
    info["parameters"] = {"before": rounds[0]["parameters_before"], "after": sum(p.numel() for p in model.parameters())}
    if accelerator.is_main_process:
        (ctx.out_dir / "pruning.json").write_text(json.dumps(info, indent=2))
    if cfg.recover_epochs:
        opts = cfg.model_copy(update={"epochs": cfg.recover_epochs})
        train_dl, eval_dl = make_dataloaders(tokenized, tokenizer, opts)
        info["recovery"] = fit(
            accelerator,
            model,
            train_dl,
            eval_dl,
            opts,
            ctx.data.label_names,
            save=lambda best, state: save_pretrained(best, tokenizer, ctx.out_dir, state),
            desc=f"{cfg.name} recovery",
        )
    elif accelerator.is_main_process:
        save_pretrained(model, tokenizer, ctx.out_dir)
    accelerator.wait_for_everyone()
    return StageResult(Artifact(ctx.out_dir, "pytorch", cfg.name), info)


def targets(cfg: PruneConfig, model) -> tuple[list[int], int]:
    """Final heads per layer and FFN size; a stage error (ValueError) for a target the model rules out."""
    from toolkit import pruning

    heads, ffn = pruning.head_counts(model), pruning.ffn_sizes(model)
    if len(set(ffn)) != 1:
        raise ValueError(f"FFN sizes differ across layers ({ffn}); transformers' config holds one intermediate_size")
    head_goal = heads
    if cfg.heads_per_layer is not None:
        n = resolve_target(cfg.heads_per_layer, model.config.num_attention_heads, "heads_per_layer")
        head_goal = [
            min(n, h) if isinstance(cfg.heads_per_layer, int) else max(1, round(cfg.heads_per_layer * h)) for h in heads
        ]
    ffn_goal = ffn[0] if cfg.ffn_size is None else resolve_target(cfg.ffn_size, ffn[0], "ffn_size")
    return head_goal, ffn_goal


def prune_round(model, dataloader, batches: int, heads: list[int], ffn: int) -> dict[str, Any]:
    """Score on `batches` training batches, then keep the top `heads[layer]` heads and `ffn` neurons per layer."""
    from itertools import islice

    from toolkit import pruning

    before = sum(p.numel() for p in model.parameters())
    head_scores, ffn_scores = pruning.importance(model, islice(dataloader, batches))
    pruning.keep_heads(model, [pruning.top_indices(s, n) for s, n in zip(head_scores, heads, strict=True)])
    pruning.keep_neurons(model, [pruning.top_indices(s, ffn) for s in ffn_scores])
    return {
        "heads_per_layer": heads,
        "ffn_size": ffn,
        "head_importance": [[round(float(x), 4) for x in s] for s in head_scores],
        "parameters_before": before,
    }
