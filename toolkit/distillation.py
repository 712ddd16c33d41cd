"""Distillation's torch side: the frozen teacher, the student (a subset of the teacher's layers or another
pretrained model, always with the teacher's labels), the augmentation's noisy copies, and the module whose
forward is the distillation loss (TextBrewer's loss functions; TextBrewer's own trainer is not used: it owns the
loop, cannot run multi-process on CPU and needs apex for fp16). The `distill` stage drives it through the shared
training loop."""

from __future__ import annotations

from pathlib import Path

import torch
from textbrewer import losses
from torch import nn

from toolkit.config import AugmentConfig, DistillConfig, layer_period, spaced_layers, student_layers
from toolkit.runtime.checkpoint import load_classifier

# The label of an unlabelled text in the transfer set: cross-entropy's ignore_index.
UNLABELLED = -100


def transfer_set(tokenized, tokenizer, texts: list[str], max_length: int):
    """The training split plus `texts`, tokenised the same way, with the label UNLABELLED."""
    from datasets import Dataset, Value, concatenate_datasets

    if not texts:
        return tokenized["train"]
    train = tokenized["train"].cast_column("labels", Value("int64"))
    extra = Dataset.from_dict({"text": texts}).map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=max_length),
        batched=True,
        remove_columns=["text"],
        desc="Tokenising unlabelled texts",
    )
    extra = extra.add_column("labels", [UNLABELLED] * len(extra)).cast(train.features)
    return concatenate_datasets([train, extra])


def _attn(cfg: DistillConfig) -> dict[str, str]:
    # Attention maps are only returned by the eager implementation.
    return {"attn_implementation": "eager"} if cfg.attention_mse_weight else {}


def load_teacher(path, cfg: DistillConfig):
    teacher = load_classifier(path, **_attn(cfg))
    teacher.requires_grad_(False)
    return teacher.eval()


def build_student(cfg: DistillConfig, current: Path | str, teacher, tokenizer):
    """(student model, layer map) with the teacher's labels; a layer subset comes from the `current` model."""
    from transformers import AutoTokenizer

    from toolkit import pruning

    spec = cfg.student
    if spec.model is None:
        source = load_classifier(current, **_attn(cfg))
        depth = source.config.num_hidden_layers
        period = layer_period(source.config.to_dict())
        layers = spec.layers or student_layers(depth, spec.num_layers, period)
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
        student = load_classifier(
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
    width = max(a["input_ids"].shape[1], b["input_ids"].shape[1])

    def pad(t, value):
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    return {
        k: torch.cat([pad(a[k], pad_id if k == "input_ids" else 0), pad(b[k], pad_id if k == "input_ids" else 0)])
        for k in a
    }


class Distiller(torch.nn.Module):
    """Holds the student (trained), the frozen teacher and the hidden-size projections; forward -> loss."""

    def __init__(self, cfg: DistillConfig, student, teacher, layer_map: list[int], steps: int, noise=None):
        super().__init__()
        self.cfg, self.layer_map, self.steps, self.noise = cfg, layer_map, steps, noise
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
        cfg = self.cfg
        if cfg.temperature_schedule == "constant":
            return cfg.temperature
        progress = min(1.0, self.step / max(self.steps, 1))
        return cfg.temperature + (1.0 - cfg.temperature) * progress

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        cfg = self.cfg
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        if self.noise is not None and self.training:
            inputs = self.noise.extend(inputs)
        extra = {}
        if cfg.hidden_mse_weight or cfg.attention_mse_weight:
            extra = {
                "output_hidden_states": bool(cfg.hidden_mse_weight),
                "output_attentions": bool(cfg.attention_mse_weight),
            }
        with torch.no_grad():
            out_t = self.teacher(**inputs, **extra)
        out_s = self.student(**inputs, **extra)
        if self.training:
            self.step += 1
        loss = out_s.logits.new_zeros(())
        if cfg.kd_weight:
            loss = loss + cfg.kd_weight * losses.kd_ce_loss(out_s.logits, out_t.logits, self.temperature())
        if cfg.hard_label_weight:  # labelled texts only: not a noisy copy (its label may have changed), nor an
            labels = batch["labels"]  # unlabelled text (label -100)
            if (labels >= 0).any():
                loss = loss + cfg.hard_label_weight * nn.functional.cross_entropy(
                    out_s.logits[: len(labels)], labels, ignore_index=UNLABELLED
                )
        return loss + self.layer_losses(out_s, out_t, inputs.get("attention_mask"))

    def layer_losses(self, out_s, out_t, mask) -> torch.Tensor:
        """Hidden-state and attention MSE along the layer map."""
        cfg, loss = self.cfg, out_s.logits.new_zeros(())
        for i, t in enumerate(self.layer_map):
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
