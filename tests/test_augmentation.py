"""Noisy copies for distillation: [CLS]/[SEP] kept, only real word pieces changed, padding rebuilt, seeded."""

from __future__ import annotations

import pytest
import torch

from toolkit.augmentation import noisy_copies
from toolkit.config import AugmentConfig

CLS, SEP, PAD, MASK = 101, 102, 0, 103


def batch() -> dict[str, torch.Tensor]:
    rows = [[CLS, *range(1000, 1020), SEP], [CLS, 2000, 2001, SEP], [CLS, 3000, SEP]]
    width = max(map(len, rows))
    ids = torch.tensor([r + [PAD] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def copies(cfg: AugmentConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    return noisy_copies(batch(), cfg, MASK, PAD, torch.Generator().manual_seed(seed))


def rows(out: dict[str, torch.Tensor]) -> list[list[int]]:
    return [ids[m.bool()].tolist() for ids, m in zip(out["input_ids"], out["attention_mask"], strict=True)]


def test_without_noise_the_copies_are_the_texts():
    out = copies(AugmentConfig(copies=2, token_noise=0.0, crop_probability=0.0))
    original = rows(batch())
    assert rows(out) == original + original
    assert set(out) == {"input_ids", "attention_mask", "token_type_ids"}


def test_noise_changes_only_word_pieces_and_keeps_padding_consistent():
    src = batch()
    pool = set(src["input_ids"][src["attention_mask"].bool()].tolist()) - {CLS, SEP}
    out = copies(AugmentConfig(copies=4, token_noise=0.6, crop_probability=1.0, min_span=0.3))
    assert out["input_ids"].shape[0] == 12
    changed = 0
    for new, old in zip(rows(out), rows(src) * 4, strict=True):
        assert new[0] == CLS and new[-1] == SEP and 3 <= len(new) <= len(old)
        assert set(new[1:-1]) <= pool | {MASK}  # dropped, masked, or swapped for a piece of the batch
        changed += new != old
    assert changed >= 6
    padded = out["input_ids"][~out["attention_mask"].bool()]
    assert (padded == PAD).all()
    assert out["input_ids"].shape[1] == max(map(len, rows(out)))  # padded to the longest copy


def test_copies_are_seeded():
    cfg = AugmentConfig(copies=2, token_noise=0.3)
    assert torch.equal(copies(cfg, 1)["input_ids"], copies(cfg, 1)["input_ids"])
    assert not torch.equal(copies(cfg, 1)["input_ids"], copies(cfg, 2)["input_ids"])


@pytest.mark.parametrize("bad", [{"copies": 0}, {"token_noise": 1.0}, {"crop_probability": 2}, {"extra": 1}])
def test_bad_augment_options_rejected(bad):
    with pytest.raises(ValueError):
        AugmentConfig(**bad)


def test_auto_copies_scale_with_the_transfer_set():
    """About 20,000 texts an epoch: the full recipe's 9,692 texts get 1 copy, 2,500 get 7, a tiny set 8."""
    auto = AugmentConfig(copies="auto")
    assert [auto.resolved_copies(n) for n in (100, 2_500, 6_000, 9_692, 50_000)] == [8, 7, 2, 1, 1]
    assert AugmentConfig(copies=3).resolved_copies(100) == 3
