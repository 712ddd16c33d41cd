"""Structured pruning of encoders: importance scores, weight slicing, and the config that restores the pruned
shapes in `from_pretrained`. One small `Layout` per family says where its attention and FFN projections live
(BERT's layout also serves RoBERTa, XLM-R and ELECTRA; DistilBERT has its own; DeBERTa-v2/v3 and MPNet take
BERT's shape, FFN and layers only, since their configs cannot record fewer heads; ModernBERT has its own, FFN
and layers only, with its gated FFN and its global/local layer pattern).

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

from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from toolkit.config.stages import subset_problem
from toolkit.errors import ToolkitError
from toolkit.sources import PRUNED_HEADS_KEY


class PruningError(ToolkitError, ValueError):
    """The model cannot be pruned as asked (unsupported architecture, impossible target)."""


# ---------------------------------------------------------------------------------------------- model access


@dataclass(frozen=True)
class Layout:
    """Where one encoder family keeps what pruning cuts: the layer list, each layer's attention (q/k/v and the
    output projection) and FFN (in and out projections), and the config fields that record the new shape."""

    family: str
    layers_path: tuple[str, ...]  # the base model's attribute path to its transformer layers
    attention: Callable[[nn.Module], nn.Module]  # a layer -> the module holding q/k/v and the head count
    qkv: tuple[str, str, str]
    attention_out: Callable[[nn.Module], tuple[nn.Module, str]]  # a layer -> (owner, name) of the output Linear
    ffn_in: Callable[[nn.Module], tuple[nn.Module, str]]
    ffn_out: Callable[[nn.Module], tuple[nn.Module, str]]
    heads_attr: str  # the head count on the attention module
    width_attr: str  # heads x head size on the attention module
    ffn_config: str  # the config field of the FFN size
    layers_config: str  # the config field of the layer count
    head_size_attr: str = "attention_head_size"  # one head's width on the attention module
    # Whether the stock config can record pruned heads (`pruned_heads`, any count per layer); False: FFN and
    # layers only.
    heads_prunable: bool = True
    # A gated FFN (GLU): the input projection holds the value and gate halves side by side, 2 x ffn size wide.
    glu: bool = False
    # Layers whose index decides their attention (ModernBERT: global every n-th layer, local otherwise): the
    # config field of n; a layer subset must keep each layer's kind at its new index.
    period_config: str | None = None


BERT_LAYOUT = Layout(
    family="BERT (bert, roberta, xlm-roberta, electra)",
    layers_path=("encoder", "layer"),
    attention=lambda layer: layer.attention.self,
    qkv=("query", "key", "value"),
    attention_out=lambda layer: (layer.attention.output, "dense"),
    ffn_in=lambda layer: (layer.intermediate, "dense"),
    ffn_out=lambda layer: (layer.output, "dense"),
    heads_attr="num_attention_heads",
    width_attr="all_head_size",
    ffn_config="intermediate_size",
    layers_config="num_hidden_layers",
)
DISTILBERT_LAYOUT = Layout(
    family="DistilBERT",
    layers_path=("transformer", "layer"),
    attention=lambda layer: layer.attention,
    qkv=("q_lin", "k_lin", "v_lin"),
    attention_out=lambda layer: (layer.attention, "out_lin"),
    ffn_in=lambda layer: (layer.ffn, "lin1"),
    ffn_out=lambda layer: (layer.ffn, "lin2"),
    heads_attr="n_heads",
    width_attr="dim",
    ffn_config="hidden_dim",
    layers_config="n_layers",
)
# DeBERTa-v2/v3: its model cannot apply `pruned_heads`, and although its config has `attention_head_size`, the
# attention output projection is built hidden_size wide, so fewer heads do not load; FFN and layers can be cut.
DEBERTA_V2_LAYOUT = replace(
    BERT_LAYOUT, family="DeBERTa-v2/v3", qkv=("query_proj", "key_proj", "value_proj"), heads_prunable=False
)
# MPNet: one relative-position bias table (buckets x heads) serves every layer, and its config has no field for
# fewer heads, so its heads cannot be pruned into a folder that loads; FFN and layers can.
MPNET_LAYOUT = replace(
    BERT_LAYOUT,
    family="MPNet",
    attention=lambda layer: layer.attention.attn,
    qkv=("q", "k", "v"),
    attention_out=lambda layer: (layer.attention.attn, "o"),
    heads_prunable=False,
)
# ModernBERT: q/k/v fused in one `Wqkv` whose width the attention derives from hidden_size (no config field for
# fewer heads), a gated FFN (`Wi` holds value and gate), and layers that are global or local (sliding window, other
# RoPE base) by their index: FFN and layer subsets that keep every layer's kind.
MODERNBERT_LAYOUT = replace(
    BERT_LAYOUT,
    family="ModernBERT",
    layers_path=("layers",),
    attention=lambda layer: layer.attn,
    qkv=("Wqkv",),
    attention_out=lambda layer: (layer.attn, "Wo"),
    ffn_in=lambda layer: (layer.mlp, "Wi"),
    ffn_out=lambda layer: (layer.mlp, "Wo"),
    heads_attr="num_heads",
    head_size_attr="head_dim",
    heads_prunable=False,
    glu=True,
    period_config="global_attn_every_n_layers",
)
# By `config.model_type`; `toolkit.config.stages.LAYOUT_FAMILIES` lists the same families for validation.
LAYOUTS = {"bert": BERT_LAYOUT, "roberta": BERT_LAYOUT, "xlm-roberta": BERT_LAYOUT, "electra": BERT_LAYOUT,
           "distilbert": DISTILBERT_LAYOUT, "deberta-v2": DEBERTA_V2_LAYOUT, "mpnet": MPNET_LAYOUT,
           "modernbert": MODERNBERT_LAYOUT}  # fmt: skip


def layout(model: nn.Module) -> Layout:
    family = getattr(model.config, "model_type", None)
    if family not in LAYOUTS:
        raise PruningError(
            f"{type(model).__name__} (model_type {family!r}) has no pruning layout; supported: {', '.join(LAYOUTS)}"
        )
    return LAYOUTS[family]


def _layers_owner(model: nn.Module) -> tuple[nn.Module, str]:
    owner = getattr(model, "base_model", model)
    *path, name = layout(model).layers_path
    for attr in path:
        owner = getattr(owner, attr)
    return owner, name


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer layers of a model of a supported family."""
    owner, name = _layers_owner(model)
    return getattr(owner, name)


def _linear(owner_and_name: tuple[nn.Module, str]) -> nn.Linear:
    owner, name = owner_and_name
    return getattr(owner, name)


def head_counts(model: nn.Module) -> list[int]:
    lay = layout(model)
    return [getattr(lay.attention(layer), lay.heads_attr) for layer in encoder_layers(model)]


def ffn_sizes(model: nn.Module) -> list[int]:
    lay = layout(model)
    return [_linear(lay.ffn_out(layer)).in_features for layer in encoder_layers(model)]


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
    """Per-layer gates of ones on every head's output and every FFN neuron, for the length of the block: they
    multiply the inputs of the attention and FFN output projections (a head's context vector, an activated
    neuron), which works the same for every layout and for SDPA attention."""
    lay = layout(model)
    device = next(model.parameters()).device
    head_gates = [torch.ones(n, device=device, requires_grad=True) for n in head_counts(model)]
    ffn_gates = [torch.ones(n, device=device, requires_grad=True) for n in ffn_sizes(model)]
    handles = []
    for layer, hg, fg in zip(encoder_layers(model), head_gates, ffn_gates, strict=True):
        size = getattr(lay.attention(layer), lay.head_size_attr)
        handles.append(_linear(lay.attention_out(layer)).register_forward_pre_hook(_gate_heads(hg, size)))
        handles.append(_linear(lay.ffn_out(layer)).register_forward_pre_hook(lambda _m, args, g=fg: (args[0] * g,)))
    try:
        yield head_gates, ffn_gates
    finally:
        for handle in handles:
            handle.remove()


def _gate_heads(gate: torch.Tensor, size: int):
    def hook(_module, args):
        context = args[0]
        shape = context.shape
        return ((context.view(*shape[:-1], -1, size) * gate[:, None]).view(shape),)

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
    lay = layout(model)
    if not lay.heads_prunable:
        if [len(k) for k in keep] == head_counts(model):
            return  # every head kept: nothing to record
        raise PruningError(f"{lay.family} heads cannot be pruned into a model that loads; prune ffn_size only")
    originals = kept_heads(model.config)
    pruned: dict[int, list[int]] = {}
    for number, (layer, heads) in enumerate(zip(encoder_layers(model), keep, strict=True)):
        attention = lay.attention(layer)
        count = getattr(attention, lay.heads_attr)
        if not heads:
            raise PruningError(f"layer {number} would lose every attention head; keep at least one")
        if len(set(heads)) != len(heads) or not all(0 <= h < count for h in heads):
            raise PruningError(f"layer {number}: head indices {heads} out of range 0..{count - 1}")
        size = attention.attention_head_size
        index = torch.tensor([h * size + i for h in sorted(heads) for i in range(size)], dtype=torch.long)
        for name in lay.qkv:
            setattr(attention, name, _slice_linear(getattr(attention, name), index, dim=0))
        owner, name = lay.attention_out(layer)
        setattr(owner, name, _slice_linear(getattr(owner, name), index, dim=1))
        setattr(attention, lay.heads_attr, len(heads))
        setattr(attention, lay.width_attr, len(heads) * size)
        remaining = [originals[number][h] for h in sorted(heads)]
        # transformers' own bookkeeping, so a later `prune_heads` (or a reload) agrees with the weights.
        removed = set(range(model.config.num_attention_heads)) - set(remaining)
        layer.attention.pruned_heads = removed
        if removed:
            pruned[number] = sorted(removed)
    model.config.pruned_heads = pruned


def keep_neurons(model: nn.Module, keep: list[list[int]]) -> None:
    """Keep FFN neurons `keep[layer]`; every layer must keep the same number (one `intermediate_size`)."""
    sizes = {len(k) for k in keep}
    if len(sizes) != 1 or 0 in sizes:
        raise PruningError(f"every layer must keep the same, non-zero number of FFN neurons; got {sorted(sizes)}")
    lay = layout(model)
    for layer, neurons in zip(encoder_layers(model), keep, strict=True):
        index = torch.tensor(sorted(neurons), dtype=torch.long)
        width = _linear(lay.ffn_out(layer)).in_features
        rows = torch.cat([index, index + width]) if lay.glu else index  # a GLU's value and gate halves alike
        for (owner, name), cut, dim in ((lay.ffn_in(layer), rows, 0), (lay.ffn_out(layer), index, 1)):
            setattr(owner, name, _slice_linear(getattr(owner, name), cut, dim=dim))
    setattr(model.config, lay.ffn_config, sizes.pop())


def keep_layers(model: nn.Module, keep: list[int]) -> None:
    """Keep only transformer layers `keep` (in that order), renumbering `config.pruned_heads` to match."""
    layers = encoder_layers(model)
    if not keep or any(not 0 <= i < len(layers) for i in keep):
        raise PruningError(f"layer indices {keep} out of range 0..{len(layers) - 1}")
    lay = layout(model)
    problem = subset_problem(keep, getattr(model.config, lay.period_config) if lay.period_config else None)
    if problem:
        raise PruningError(f"{lay.family}: {problem}; the saved model would not behave as the trained one")
    pruned = {int(k): v for k, v in (model.config.pruned_heads or {}).items()}
    kept = nn.ModuleList([layers[i] for i in keep])
    owner, name = _layers_owner(model)
    setattr(owner, name, kept)
    for new_index, layer in enumerate(kept):
        for module in layer.modules():
            for attr in ("layer_idx", "layer_id"):
                if hasattr(module, attr):
                    setattr(module, attr, new_index)
    setattr(model.config, layout(model).layers_config, len(keep))
    if hasattr(owner, "n_layers"):  # DistilBERT's Transformer keeps its own count
        owner.n_layers = len(keep)
    model.config.pruned_heads = {new: pruned[old] for new, old in enumerate(keep) if pruned.get(old)}


# ---------------------------------------------------------------------------------------------- saving


def uniform_state(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """(`state` with every pruned head back at its place as zeros, the zero-filled heads per layer): the weights
    of the uniform layout that stock transformers 4 and 5 load (`toolkit.runtime.checkpoint` says why it is
    exact). `state` is the model's state dict (or Accelerate's copy of it, same keys)."""
    pruned = {int(k): sorted(v) for k, v in (model.config.pruned_heads or {}).items() if v}
    if not pruned:
        return state, {}
    lay = layout(model)
    names = {id(module): name for name, module in model.named_modules()}
    full = dict(state)
    for number, layer in enumerate(encoder_layers(model)):
        if number not in pruned:
            continue
        size = getattr(lay.attention(layer), lay.head_size_attr)
        kept = kept_heads(model.config)[number]
        index = torch.tensor([h * size + i for h in kept for i in range(size)], dtype=torch.long)
        width = model.config.num_attention_heads * size
        for name in lay.qkv:
            key = names[id(getattr(lay.attention(layer), name))]
            full[f"{key}.weight"] = _placed(state[f"{key}.weight"], index, width, dim=0)
            if f"{key}.bias" in state:
                full[f"{key}.bias"] = _placed(state[f"{key}.bias"], index, width, dim=0)
        key = names[id(_linear(lay.attention_out(layer)))]
        full[f"{key}.weight"] = _placed(state[f"{key}.weight"], index, width, dim=1)
    return full, {str(layer): heads for layer, heads in pruned.items()}


def _placed(tensor: torch.Tensor, index: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """A zero tensor `width` wide along `dim` with `tensor`'s slices at `index`."""
    shape = list(tensor.shape)
    shape[dim] = width
    return torch.zeros(shape, dtype=tensor.dtype, device=tensor.device).index_copy_(
        dim, index.to(tensor.device), tensor
    )


def save_uniform(model: nn.Module, out_dir, state: dict[str, torch.Tensor] | None = None) -> dict:
    """`model.save_pretrained(out_dir)` (with `state` instead of the model's own tensors when given) in the
    uniform layout, so the folder loads in stock transformers 4 and 5; returns the zero-filled heads."""
    full, heads = uniform_state(model, state if state is not None else model.state_dict())
    if not heads:
        model.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
        return {}
    config, recorded = model.config, model.config.pruned_heads
    config.pruned_heads = {}  # the default, so config.json has no `pruned_heads` for 4.x to rebuild from
    setattr(config, PRUNED_HEADS_KEY, heads)
    try:
        model.save_pretrained(out_dir, state_dict=full, safe_serialization=True)
    finally:
        config.pruned_heads = recorded
        delattr(config, PRUNED_HEADS_KEY)
    return heads
