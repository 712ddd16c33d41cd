"""Structured pruning of BERT-like encoders: importance scores, weight slicing, and the config that restores
the pruned shapes in `from_pretrained`.

Everything here that touches transformers' model internals (`encoder.layer[i].attention.self.query`, ...) is
kept in this one module: transformers 5 removed `prune_heads`, so the project slices the weights itself and
writes the two config fields transformers 4.57 reads back when it builds the model (`pruned_heads`, indices of
the *original* heads removed per layer, and `intermediate_size`, which must be the same for every layer).

Importance follows Michel et al. 2019 ("Are Sixteen Heads Really Better than One?") as used by FastFormers:
a gate of ones multiplies every head's output (and every FFN neuron's activation); |dL/d gate| accumulated over
training batches estimates how much the loss depends on that head or neuron. Head scores are normalised per
layer (L2), as in the paper.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from toolkit.errors import ToolkitError


class PruningError(ToolkitError, ValueError):
    """The model cannot be pruned as asked (unsupported architecture, impossible target)."""


# ---------------------------------------------------------------------------------------------- model access


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer layers of a BERT-like model (BERT, RoBERTa, ELECTRA, XLM-R share this layout)."""
    base = getattr(model, "base_model", model)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if layers is None or not all(_is_bert_like(layer) for layer in layers):
        raise PruningError(
            f"{type(model).__name__} is not a BERT-like encoder (expected encoder.layer[i].attention.self.query "
            "and intermediate.dense); pruning supports BERT, RoBERTa, ELECTRA and their relatives"
        )
    return layers


def _is_bert_like(layer: nn.Module) -> bool:
    attention = getattr(layer, "attention", None)
    return (
        hasattr(getattr(attention, "self", None), "query")
        and hasattr(getattr(attention, "output", None), "dense")
        and hasattr(getattr(layer, "intermediate", None), "dense")
        and hasattr(getattr(layer, "output", None), "dense")
    )


def head_counts(model: nn.Module) -> list[int]:
    return [layer.attention.self.num_attention_heads for layer in encoder_layers(model)]


def ffn_sizes(model: nn.Module) -> list[int]:
    return [layer.intermediate.dense.out_features for layer in encoder_layers(model)]


def kept_heads(config: Any) -> list[list[int]]:
    """Original indices of the heads each layer still has, from `config.pruned_heads`."""
    pruned = {int(k): set(v) for k, v in (getattr(config, "pruned_heads", None) or {}).items()}
    return [
        [h for h in range(config.num_attention_heads) if h not in pruned.get(layer, set())]
        for layer in range(config.num_hidden_layers)
    ]


# ---------------------------------------------------------------------------------------------- importance


@contextmanager
def _gates(model: nn.Module):
    """Per-layer gates of ones on every head's output and every FFN neuron, for the length of the block."""
    layers = encoder_layers(model)
    device = next(model.parameters()).device
    head_gates = [torch.ones(n, device=device, requires_grad=True) for n in head_counts(model)]
    ffn_gates = [torch.ones(n, device=device, requires_grad=True) for n in ffn_sizes(model)]
    handles = []
    for layer, hg, fg in zip(layers, head_gates, ffn_gates, strict=True):
        # A head's context vector is linear in its attention probabilities, so gating the context equals
        # gating the probabilities (the head mask of the paper) and works with SDPA attention as well.
        handles.append(layer.attention.self.register_forward_hook(_gate_heads(hg, layer.attention.self)))
        handles.append(layer.intermediate.register_forward_hook(lambda _m, _i, out, g=fg: out * g))
    try:
        yield head_gates, ffn_gates
    finally:
        for handle in handles:
            handle.remove()


def _gate_heads(gate: torch.Tensor, attention: nn.Module):
    def hook(_module, _inputs, output):
        context = output[0] if isinstance(output, tuple) else output
        size = attention.attention_head_size
        shape = context.shape
        gated = (context.view(*shape[:-1], -1, size) * gate[:, None]).view(shape)
        return (gated, *output[1:]) if isinstance(output, tuple) else gated

    return hook


def importance(
    model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(head scores per layer, FFN neuron scores per layer), from |dL/d gate| summed over `batches`.

    `batches` carry `labels`; the model's own loss is differentiated. Dropout is off so scores are repeatable.
    """
    was_training = model.training
    model.eval()
    heads = [torch.zeros(n) for n in head_counts(model)]
    neurons = [torch.zeros(n) for n in ffn_sizes(model)]
    seen = 0
    with _gates(model) as (head_gates, ffn_gates):
        for batch in batches:
            loss = model(**batch).loss
            grads = torch.autograd.grad(loss, [*head_gates, *ffn_gates])
            for acc, g in zip([*heads, *neurons], grads, strict=True):
                acc += g.detach().abs().cpu()
            seen += 1
    model.train(was_training)
    if not seen:
        raise PruningError("no batches to measure importance on (the training split is empty)")
    return [normalise(h) for h in heads], neurons


def normalise(scores: torch.Tensor) -> torch.Tensor:
    norm = scores.norm(p=2)
    return scores / norm if norm > 0 else scores


def top_indices(scores: torch.Tensor, keep: int) -> list[int]:
    """The `keep` highest-scoring positions, in their original order (stable on ties)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:keep])


# ---------------------------------------------------------------------------------------------- slicing


def _slice_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear keeping rows (dim 0: outputs) or columns (dim 1: inputs) `index` of `linear`."""
    index = index.to(linear.weight.device)
    weight = linear.weight.detach().index_select(dim, index).clone()
    bias = None
    if linear.bias is not None:
        bias = linear.bias.detach().clone() if dim == 1 else linear.bias.detach()[index].clone()
    out_features, in_features = weight.shape
    new = nn.Linear(in_features, out_features, bias=bias is not None).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new


def keep_heads(model: nn.Module, keep: list[list[int]]) -> None:
    """Keep heads `keep[layer]` (indices among the layer's *current* heads); updates `config.pruned_heads`."""
    layers = encoder_layers(model)
    originals = kept_heads(model.config)
    pruned: dict[int, list[int]] = {}
    for number, (layer, heads) in enumerate(zip(layers, keep, strict=True)):
        attention = layer.attention.self
        if not heads:
            raise PruningError(f"layer {number} would lose every attention head; keep at least one")
        if len(set(heads)) != len(heads) or not all(0 <= h < attention.num_attention_heads for h in heads):
            raise PruningError(
                f"layer {number}: head indices {heads} out of range 0..{attention.num_attention_heads - 1}"
            )
        size = attention.attention_head_size
        index = torch.tensor([h * size + i for h in sorted(heads) for i in range(size)], dtype=torch.long)
        for name in ("query", "key", "value"):
            setattr(attention, name, _slice_linear(getattr(attention, name), index, dim=0))
        layer.attention.output.dense = _slice_linear(layer.attention.output.dense, index, dim=1)
        attention.num_attention_heads = len(heads)
        attention.all_head_size = len(heads) * size
        remaining = [originals[number][h] for h in sorted(heads)]
        # transformers' own bookkeeping, so a later `prune_heads` (or a reload) agrees with the weights.
        layer.attention.pruned_heads = set(range(model.config.num_attention_heads)) - set(remaining)
        removed = sorted(layer.attention.pruned_heads)
        if removed:
            pruned[number] = removed
    model.config.pruned_heads = pruned


def keep_neurons(model: nn.Module, keep: list[list[int]]) -> None:
    """Keep FFN neurons `keep[layer]`; every layer must keep the same number (one `intermediate_size`)."""
    sizes = {len(k) for k in keep}
    if len(sizes) != 1 or 0 in sizes:
        raise PruningError(f"every layer must keep the same, non-zero number of FFN neurons; got {sorted(sizes)}")
    for layer, neurons in zip(encoder_layers(model), keep, strict=True):
        index = torch.tensor(sorted(neurons), dtype=torch.long)
        layer.intermediate.dense = _slice_linear(layer.intermediate.dense, index, dim=0)
        layer.output.dense = _slice_linear(layer.output.dense, index, dim=1)
    model.config.intermediate_size = sizes.pop()


def keep_layers(model: nn.Module, keep: list[int]) -> None:
    """Keep only transformer layers `keep` (in that order), renumbering `config.pruned_heads` to match."""
    layers = encoder_layers(model)
    if not keep or any(not 0 <= i < len(layers) for i in keep):
        raise PruningError(f"layer indices {keep} out of range 0..{len(layers) - 1}")
    pruned = {int(k): v for k, v in (model.config.pruned_heads or {}).items()}
    model.base_model.encoder.layer = nn.ModuleList([layers[i] for i in keep])
    for new_index, layer in enumerate(model.base_model.encoder.layer):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    model.config.num_hidden_layers = len(keep)
    model.config.pruned_heads = {new: pruned[old] for new, old in enumerate(keep) if pruned.get(old)}
