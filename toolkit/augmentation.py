"""Noisy copies of training batches for distillation: the teacher labels them, so the student sees many more
teacher outputs than there are labelled texts (TinyBERT's data augmentation, done on token ids per batch).

A small transfer set is what limits a distilled student: it overfits the few teacher outputs it sees. Each
copy keeps [CLS]/[SEP], optionally keeps only a random contiguous span of the text (a review's phrase, which
still carries sentiment) and then drops, masks or swaps a fraction of the word pieces. Copies are made fresh
every step, so every epoch sees new ones; the hard-label loss never applies to them (their label may have
changed), only the losses against the teacher.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # `toolkit --help` must not load torch
    import torch

    from toolkit.config import AugmentConfig


def noisy_copies(
    batch: dict[str, torch.Tensor], cfg: AugmentConfig, mask_id: int, pad_id: int, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """`cfg.copies` noisy copies of every row of a padded batch (input_ids, attention_mask[, token_type_ids]),
    padded to their own longest row; rows are [CLS] text [SEP] as a BERT tokenizer makes them."""
    import torch

    ids, mask = batch["input_ids"].cpu(), batch["attention_mask"].cpu()
    lengths = mask.sum(dim=1).tolist()
    pool = torch.cat([ids[i, 1 : n - 1] for i, n in enumerate(lengths)])
    rows = [
        noisy_row(ids[i, :n], cfg, mask_id, pool, generator) for _ in range(cfg.copies) for i, n in enumerate(lengths)
    ]
    width = max(len(r) for r in rows)
    out_ids = torch.full((len(rows), width), pad_id, dtype=ids.dtype)
    out_mask = torch.zeros((len(rows), width), dtype=mask.dtype)
    for i, row in enumerate(rows):
        out_ids[i, : len(row)] = row
        out_mask[i, : len(row)] = 1
    device = batch["input_ids"].device
    out = {"input_ids": out_ids.to(device), "attention_mask": out_mask.to(device)}
    if "token_type_ids" in batch:
        out["token_type_ids"] = torch.zeros_like(out_ids).to(device)
    return out


def noisy_row(row: torch.Tensor, cfg: AugmentConfig, mask_id: int, pool: torch.Tensor, generator: torch.Generator):
    """One copy of `[CLS] t1..tn [SEP]`: a random span of the text, then per-piece drop/mask/swap."""
    import torch

    body = row[1:-1]
    n = len(body)
    if n > 1 and torch.rand((), generator=generator) < cfg.crop_probability:
        span = max(1, round(n * cfg.min_span))
        keep = int(torch.randint(span, n + 1, (), generator=generator))
        start = int(torch.randint(0, n - keep + 1, (), generator=generator))
        body = body[start : start + keep]
    draw = torch.rand(len(body), generator=generator)
    third = cfg.token_noise / 3
    body = body.clone()
    masked = (draw >= third) & (draw < 2 * third)
    body[masked] = mask_id
    swapped = (draw >= 2 * third) & (draw < cfg.token_noise)
    if swapped.any() and len(pool):
        body[swapped] = pool[torch.randint(0, len(pool), (int(swapped.sum()),), generator=generator)]
    body = body[draw >= third]  # dropped pieces
    if len(body) == 0:
        body = row[1:2]
    return torch.cat([row[:1], body, row[-1:]])
