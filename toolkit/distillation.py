"""Distillation's torch side: the frozen teacher, the student (a subset of the teacher's layers or another
pretrained model, always with the teacher's labels), the augmentation's noisy copies, and the module whose
forward is the distillation loss (TextBrewer's loss functions; TextBrewer's own trainer is not used: it owns the
loop, cannot run multi-process on CPU and needs apex for fp16). The `distill` stage drives it through the shared
training loop."""

from __future__ import annotations

import itertools
from pathlib import Path
from types import SimpleNamespace

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


# The most memory the cached hidden states may take (FP16); past it the teacher runs at every step.
CACHE_BUDGET_BYTES = 4 << 30


class TeacherCache:
    """The frozen teacher's logits and mapped hidden states for every text of a fixed transfer set (no noisy
    copies), computed once before training: every epoch then costs the student's passes only. The teacher's
    forward pass was 47 % of a 12 -> 3 layer distillation step on the CPU (MPNet-base, batch 32). Hidden states
    are kept in FP16 and only for a text's own tokens; cached outputs are the live ones up to float rounding."""

    def __init__(self, logits: torch.Tensor, states: torch.Tensor | None, offsets: list[int], layers: list[int]):
        self.logits, self.states, self.offsets, self.layers = logits, states, offsets, layers

    @classmethod
    @torch.no_grad()
    def build(cls, teacher, dataloader, lengths: list[int], layers: list[int], hidden: bool, device) -> TeacherCache:
        """`lengths`: each row's token count, in dataset order."""
        from tqdm.auto import tqdm

        dataset, collate = dataloader.dataset, dataloader.collate_fn
        teacher.to(device)
        offsets = [0, *itertools.accumulate(lengths)]
        logits = torch.empty(len(lengths), teacher.config.num_labels)
        width = teacher.config.hidden_size
        states = torch.empty(len(layers), offsets[-1], width, dtype=torch.float16) if hidden else None
        order = sorted(range(len(lengths)), key=lengths.__getitem__)  # similar lengths pad least
        size = dataloader.batch_size * 2
        for start in tqdm(range(0, len(order), size), desc="teacher outputs, once", leave=False):
            rows = order[start : start + size]
            batch = collate([dataset[i] for i in rows])
            inputs = {k: v.to(device) for k, v in batch.items() if k not in ("labels", "row")}
            out = teacher(**inputs, output_hidden_states=hidden)
            logits[rows] = out.logits.float().cpu()
            for j, t in enumerate(layers if hidden else []):
                for k, i in enumerate(rows):
                    keep = inputs["attention_mask"][k].bool()
                    states[j, offsets[i] : offsets[i + 1]] = out.hidden_states[t + 1][k][keep].half().cpu()
        return cls(logits, states, offsets, layers)

    def outputs(self, rows: torch.Tensor, mask: torch.Tensor) -> SimpleNamespace:
        """The teacher's outputs for a padded batch of transfer-set rows, shaped as the live forward's."""
        rows_list = rows.tolist()
        out = SimpleNamespace(logits=self.logits[rows_list].to(mask.device), hidden_states=None)
        if self.states is not None:
            out.hidden_states = [None] * (max(self.layers) + 2)
            for j, t in enumerate(self.layers):
                state = mask.new_zeros((*mask.shape, self.states.shape[-1]), dtype=torch.float32)
                for k, i in enumerate(rows_list):
                    state[k][mask[k].bool()] = (
                        self.states[j, self.offsets[i] : self.offsets[i + 1]].float().to(mask.device)
                    )
                out.hidden_states[t + 1] = state
        return out


def teacher_cache(cfg: DistillConfig, teacher, dataloader, layer_map: list[int], device):
    """(TeacherCache or None, what the manifest records): cached when the transfer set is fixed (no noisy copies,
    no attention loss, whose maps would be too large) and its hidden states fit CACHE_BUDGET_BYTES."""
    if cfg.augment is not None:
        return None, {"cached": False, "why": "noisy copies are new at every step"}
    if cfg.attention_mse_weight:
        return None, {"cached": False, "why": "attention maps are too large to keep"}
    hidden = bool(cfg.hidden_mse_weight)
    lengths = [int(sum(mask)) for mask in dataloader.dataset.with_format(None)["attention_mask"]]
    size = sum(lengths) * len(layer_map) * teacher.config.hidden_size * 2 if hidden else 0
    if size > CACHE_BUDGET_BYTES:
        return None, {"cached": False, "why": f"hidden states would take {size / 2**30:.1f} GiB"}
    cache = TeacherCache.build(teacher, dataloader, lengths, layer_map, hidden, device)
    return cache, {"cached": True, "texts": len(cache.logits), "megabytes": round(size / 2**20, 1)}


class Distiller(torch.nn.Module):
    """Holds the student (trained), the frozen teacher and the hidden-size projections; forward -> loss."""

    def __init__(self, cfg: DistillConfig, student, teacher, layer_map: list[int], steps: int, noise=None, cache=None):
        super().__init__()
        self.cfg, self.layer_map, self.steps, self.noise, self.cache = cfg, layer_map, steps, noise, cache
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
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "row")}
        if self.noise is not None and self.training:
            inputs = self.noise.extend(inputs)
        extra = {}
        if cfg.hidden_mse_weight or cfg.attention_mse_weight:
            extra = {
                "output_hidden_states": bool(cfg.hidden_mse_weight),
                "output_attentions": bool(cfg.attention_mse_weight),
            }
        if self.cache is not None and "row" in batch:
            out_t = self.cache.outputs(batch["row"], inputs["attention_mask"])
        else:
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
