"""The Accelerate training loop every training-like stage shares (fine-tune, recovery after pruning, distil).

Shaped like accelerate's `examples/nlp_example.py`: build the accelerator, the dataloaders (dynamic padding),
AdamW with linear warm-up/decay, `accelerator.prepare`, one epoch at a time, evaluation with
`gather_for_metrics`, and the best checkpoint kept. Stages differ only in the loss they pass to `fit`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import DataCollatorWithPadding, get_linear_schedule_with_warmup

from toolkit.metrics import classification_metrics
from toolkit.pruning import save_uniform
from toolkit.runtime import resolve_device

if TYPE_CHECKING:
    from toolkit.config import LoopOptions
    from toolkit.data import PreparedData

LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]
LogitsFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]


def use_cpu(device: str) -> bool:
    return resolve_device(device, "torch") == "cpu"


def resolve_mixed_precision(choice: str, cpu: bool) -> str:
    if choice != "auto":
        return choice
    if cpu:
        return "no"  # CPU autocast runs no faster here and costs accuracy
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def make_accelerator(opts: LoopOptions, device: str) -> Accelerator:
    # cpu=True matters under `accelerate launch --multi_gpu` on a CPU machine: without it each process
    # trains alone (no gloo process group) and all of them write the same folder.
    cpu = use_cpu(device)
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=resolve_mixed_precision(opts.mixed_precision, cpu),
        gradient_accumulation_steps=opts.gradient_accumulation_steps,
    )
    set_seed(opts.seed)
    return accelerator


@dataclass
class Setup:
    accelerator: Accelerator
    tokenizer: Any
    tokenized: Any  # the run's data, tokenised (a DatasetDict)


def start(
    opts: LoopOptions, device: str, model_path, data: PreparedData, max_length: int, revision: str | None = None
) -> Setup:
    """What every training-like stage does first: the accelerator (seeded), the model's tokenizer, and the data
    tokenised once (the main process first, so the others read its cache)."""
    from transformers import AutoTokenizer

    accelerator = make_accelerator(opts, device)
    tokenizer = AutoTokenizer.from_pretrained(model_path, revision=revision)
    with accelerator.main_process_first():
        tokenized = data.tokenized(tokenizer, max_length)
    return Setup(accelerator, tokenizer, tokenized)


def make_dataloaders(
    tokenized, tokenizer, opts: LoopOptions, eval_split: str = "validation"
) -> tuple[DataLoader, DataLoader]:
    collate = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if torch.cuda.is_available() else None)

    def torch_columns(split):  # "row": a training text's index, for outputs computed once per text
        wanted = ("input_ids", "attention_mask", "token_type_ids", "labels", "row")
        return tokenized[split].with_format("torch", columns=[c for c in wanted if c in tokenized[split].column_names])

    train, evaluation = torch_columns("train"), torch_columns(eval_split)
    generator = torch.Generator().manual_seed(opts.seed)
    if opts.group_by_length:
        from transformers.trainer_pt_utils import LengthGroupedSampler

        lengths = [len(ids) for ids in tokenized["train"]["input_ids"]]
        sampler = LengthGroupedSampler(opts.batch_size, lengths=lengths, generator=generator)
        train_dl = DataLoader(train, batch_size=opts.batch_size, sampler=sampler, collate_fn=collate)
    else:
        train_dl = DataLoader(train, batch_size=opts.batch_size, shuffle=True, collate_fn=collate, generator=generator)
    eval_dl = DataLoader(evaluation, batch_size=opts.eval_batch_size, collate_fn=collate)
    return train_dl, eval_dl


def make_optimizer(model: torch.nn.Module, opts: LoopOptions, steps: int):
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight")
    groups = [
        {
            "params": [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith(no_decay)],
            "weight_decay": opts.weight_decay,
        },
        {
            "params": [p for n, p in model.named_parameters() if p.requires_grad and n.endswith(no_decay)],
            "weight_decay": 0.0,
        },
    ]
    optimizer = torch.optim.AdamW(groups, lr=opts.learning_rate)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(steps * opts.warmup_ratio), steps)
    return optimizer, scheduler


def classifier_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


def classifier_logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**inputs).logits


def predict(
    accelerator: Accelerator,
    model: torch.nn.Module,
    dataloader: DataLoader,
    logits_fn: LogitsFn = classifier_logits,
) -> tuple[np.ndarray, np.ndarray]:
    """Predictions and labels over the whole split, gathered from every process (padding samples dropped)."""
    model.eval()
    preds, refs = [], []
    for batch in dataloader:
        with torch.no_grad():
            logits = logits_fn(model, {k: v for k, v in batch.items() if k != "labels"})
        p, r = accelerator.gather_for_metrics((logits.argmax(dim=-1), batch["labels"]))
        preds.append(p.cpu().numpy())
        refs.append(r.cpu().numpy())
    return np.concatenate(preds), np.concatenate(refs)


def train_one_epoch(accelerator, model, dataloader, optimizer, scheduler, loss_fn, opts, bar) -> float:
    model.train()
    total, count = 0.0, 0
    for batch in dataloader:
        with accelerator.accumulate(model):
            loss = loss_fn(model, batch)
            accelerator.backward(loss)
            if accelerator.sync_gradients and opts.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), opts.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        total += loss.detach().float().item()
        count += 1
        bar.update(1)
        bar.set_postfix(loss=f"{total / count:.4f}")
    return total / max(count, 1)


def diagnose(scores: list[float], metric: str = "accuracy") -> str:
    """One line on what a validation curve (one score per epoch) says about the next run: still rising at the end
    (more epochs or data), flat from the start (learning rate, layer mapping), falling from the first epoch
    (overfitting), or peaked earlier (the best epoch's weights are kept; more data rather than more epochs)."""
    if len(scores) < 2:
        return f"one epoch, so no curve: validation {metric} {100 * scores[0]:.2f} %" if scores else "no epochs"
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    rise, last_step = 100 * (max(scores) - scores[0]), 100 * (scores[-1] - scores[-2])
    fall = 100 * (scores[0] - min(scores))
    if rise < 0.5 and fall >= 0.5:
        return (
            f"best at epoch 1, then up to {fall:.2f} pts lower (validation {metric}; epoch 1's weights are kept): "
            "it overfits the texts it sees; more (augmented or unlabelled) texts or a lower learning rate"
        )
    if rise < 0.5:
        return (
            f"flat from the first epoch (validation {metric} within {rise:.2f} pts of epoch 1): check the learning "
            "rate and, for a student, its layer mapping"
        )
    if best == len(scores) - 1:
        if last_step > 0.2:
            return (
                f"still improving at the last epoch (+{last_step:.2f} pts validation {metric}): more epochs, or "
                "more (augmented) training texts"
            )
        return (
            f"levelling off (+{last_step:.2f} pts validation {metric} in the last epoch, +{rise:.2f} over epoch 1): "
            "more or augmented training texts rather than more epochs"
        )
    return (
        f"peaked at epoch {best + 1} of {len(scores)} (+{rise:.2f} pts over epoch 1; that epoch's weights are kept): "
        "more epochs will not help, more or augmented training texts may"
    )


def fit(
    accelerator: Accelerator,
    model: torch.nn.Module,
    train_dl: DataLoader,
    eval_dl: DataLoader,
    opts: LoopOptions,
    label_names: list[str],
    save: Callable[[torch.nn.Module, dict], None],
    loss_fn: LossFn = classifier_loss,
    logits_fn: LogitsFn = classifier_logits,
    desc: str = "train",
) -> dict[str, Any]:
    """Train for `opts.epochs`, evaluating on `eval_dl` after each epoch; `save(unwrapped_model, state_dict)` runs on
    the main process for every new best, with the full state dict (gathered on every process first). Distillation passes a module whose forward returns the loss, with
    `loss_fn`/`logits_fn` to match; every trainable parameter of `model` is optimised."""
    # Counted on the un-prepared loader: the prepared scheduler steps once per process per optimizer step.
    steps = math.ceil(len(train_dl) / opts.gradient_accumulation_steps) * opts.epochs
    optimizer, scheduler = make_optimizer(model, opts, steps)
    model, optimizer, train_dl, eval_dl, scheduler = accelerator.prepare(model, optimizer, train_dl, eval_dl, scheduler)
    history: list[dict[str, float]] = []
    best, since_best = -1.0, 0
    for epoch in range(opts.epochs):
        bar = tqdm(
            total=len(train_dl),
            desc=f"{desc} epoch {epoch + 1}/{opts.epochs}",
            disable=not accelerator.is_local_main_process,
        )
        loss = train_one_epoch(accelerator, model, train_dl, optimizer, scheduler, loss_fn, opts, bar)
        bar.close()
        preds, refs = predict(accelerator, model, eval_dl, logits_fn)
        scores = classification_metrics(preds, refs, label_names)
        row = {
            "epoch": epoch + 1,
            "train_loss": loss,
            "accuracy": scores["accuracy"],
            "macro_f1": scores["macro_f1"],
        }
        history.append(row)
        accelerator.print(
            f"{desc} epoch {epoch + 1}: loss {loss:.4f}, validation accuracy {row['accuracy']:.4f}, "
            f"macro-F1 {row['macro_f1']:.4f}"
        )
        since_best += 1
        if row[opts.metric_for_best] > best:
            best, since_best = row[opts.metric_for_best], 0
            # On every process: under FSDP this gathers the full weights from the shards (Accelerate's path).
            state_dict = accelerator.get_state_dict(model)
            if accelerator.is_main_process:
                save(accelerator.unwrap_model(model), state_dict)
        accelerator.wait_for_everyone()
        # Every process saw the same gathered metric, so all of them stop at the same epoch.
        if opts.patience and since_best >= opts.patience and epoch + 1 < opts.epochs:
            accelerator.print(
                f"{desc}: no better validation {opts.metric_for_best} for {opts.patience} epoch(s); stopped after "
                f"epoch {epoch + 1} of {opts.epochs}, keeping epoch {epoch + 1 - since_best}"
            )
            break
    return {
        "history": history,
        "epochs_run": len(history),
        "stopped_early": len(history) < opts.epochs,
        "curve": diagnose([row[opts.metric_for_best] for row in history], opts.metric_for_best),
        "best_epoch": max(history, key=lambda r: r[opts.metric_for_best])["epoch"],
        f"best_validation_{opts.metric_for_best}": best,
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "train_batches_per_process": len(train_dl),
    }


def save_pretrained(model, tokenizer, out_dir: Path, state_dict: dict | None = None, prefix: str = "") -> None:
    """`model` with `tokenizer`; `state_dict` (Accelerate's, keys under `prefix` when `model` is part of the
    trained module) instead of the model's own tensors, which under FSDP are shards. Pruned heads are written
    as zeros (`toolkit.pruning.save_uniform`): the folder loads in transformers 4 and 5."""
    if state_dict is not None:
        state_dict = {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
    save_uniform(model, out_dir, state_dict)
    tokenizer.save_pretrained(out_dir)
